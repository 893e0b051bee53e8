"""Upstream δ-mem weights → our adapter tensors and ``adapter.deltamem.*`` metadata: the pure math.

Its one job is the layout change the engine's graph needs (``deltamem_edge.gguf_schema``):
one packed input projection per layer, state rows pre-permuted to GDN order, scalar gates
expanded to one gate per row, trainable δ scales folded into the δ heads, inactive δ
heads dropped, plus checking that every tensor fits the config.  It is separate from
the files around it (``adapter``), the base model (``base_model``) and the writer
(``adapter_writer``) because it is dicts in, dicts out: it needs no base model and
no file, so tests check the math on its own.
"""

from __future__ import annotations

import math
import re
import warnings
from pathlib import Path
from typing import Any

import numpy as np

from deltamem_edge import gguf_schema as S
from deltamem_edge.errors import ConversionError

from .config import DeltaMemConfig

DEFAULT_SOURCE = "deltamem-edge converter"

_KEY_RE = re.compile(r"^model\.layers\.(\d+)\.self_attn\.([A-Za-z0-9_]+)$")
_DELTA_PARAM = {h: f"delta_{h}_proj" for h in S.DELTA_HEADS}
# Every per-layer parameter upstream may write; adapter_read_limits sizes its read budget from the count.
KNOWN_PARAMS = {
    "memory_q_proj",
    "memory_k_proj",
    "memory_v_proj",
    *_DELTA_PARAM.values(),
    "delta_o_rmsnorm_weight",
    "beta_proj",
    "beta_bias",
    "lambda_proj",
    "lambda_bias",
    "delta_scale_raw",
}


def split_layers(weights: dict[str, np.ndarray], *, path: Path | None = None) -> dict[int, dict[str, np.ndarray]]:
    """Group ``model.layers.N.self_attn.<param>`` keys by layer; any other key is an error naming it."""
    layers: dict[int, dict[str, np.ndarray]] = {}
    unknown: list[str] = []
    for key, value in weights.items():
        m = _KEY_RE.match(key)
        if m is None or m.group(2) not in KNOWN_PARAMS:
            unknown.append(key)
            continue
        layers.setdefault(int(m.group(1)), {})[m.group(2)] = value
    if unknown:
        shown = ", ".join(unknown[:8]) + (f" (+{len(unknown) - 8} more)" if len(unknown) > 8 else "")
        raise ConversionError(
            f"unknown adapter tensor key(s): {shown}",
            path=path,
            hint="expected upstream keys model.layers.N.self_attn.<memory_q_proj|...|beta_bias>",
        )
    if not layers:
        raise ConversionError("the weights file contains no δ-mem tensors", path=path)
    return dict(sorted(layers.items()))


def delta_scale_factors(cfg: DeltaMemConfig, raw: np.ndarray | None) -> dict[str, float]:
    """c_h per head: 1 without a trainable scale, else sigmoid(raw[idx]) · delta_scale_max (idx 0 or q,k,v,o index)."""
    if not cfg.trainable_delta_scale or raw is None:
        return dict.fromkeys(S.DELTA_HEADS, 1.0)
    flat = np.asarray(raw, dtype=np.float64).reshape(-1)
    out = {}
    for i, h in enumerate(S.DELTA_HEADS):
        x = float(flat[0 if cfg.delta_scale_granularity == "layer" else i])
        out[h] = cfg.delta_scale_max / (1.0 + math.exp(-x))
    return out


def _expected_shapes(cfg: DeltaMemConfig, d: int) -> dict[str, tuple[int, ...]]:
    """The shapes the config fixes for hidden size ``d`` (the δ heads' outputs depend on the base: checked there)."""
    r_, g_ = cfg.state_dim, cfg.gate_dim
    shapes: dict[str, tuple[int, ...]] = {
        "memory_q_proj": (r_, d),
        "memory_k_proj": (r_, d),
        "memory_v_proj": (r_, d),
        "beta_proj": (g_, d),
        "beta_bias": (g_,),
        "lambda_proj": (g_, d),
        "lambda_bias": (g_,),
        "delta_scale_raw": (4,) if cfg.delta_scale_granularity == "head" else (1,),
    }
    return shapes


def _check_layers(layers: dict[int, dict[str, np.ndarray]], cfg: DeltaMemConfig, path: Path | None) -> None:
    """Check presence, shapes and finiteness of every tensor against the config; one error listing all problems."""
    required = {"memory_q_proj", "memory_k_proj", "memory_v_proj", "beta_proj", "beta_bias"}
    required |= {_DELTA_PARAM[h] for h in cfg.delta_heads}
    forbidden: dict[str, str] = {}
    if cfg.couple_lambda:
        forbidden.update(lambda_proj="couple_lambda is true", lambda_bias="couple_lambda is true")
    else:
        required |= {"lambda_proj", "lambda_bias"}
    if cfg.delta_o_rmsnorm:
        required.add("delta_o_rmsnorm_weight")
    else:
        forbidden["delta_o_rmsnorm_weight"] = "delta_o_rmsnorm is false"
    if cfg.trainable_delta_scale:
        required.add("delta_scale_raw")
    else:
        forbidden["delta_scale_raw"] = "trainable_delta_scale is false"

    problems: list[str] = []
    for il, params in layers.items():
        missing = sorted(required - params.keys())
        if missing:
            problems.append(f"layer {il}: missing {', '.join(missing)}")
        for name in sorted(params.keys() & forbidden.keys()):
            problems.append(f"layer {il}: unexpected {name} ({forbidden[name]} in the config)")
    if problems:
        raise ConversionError(
            "adapter weights do not match delta_mem_config.json: " + "; ".join(problems),
            path=path,
            hint="the config and the weights must come from the same upstream run",
        )

    first = next(iter(layers.values()))["memory_q_proj"]
    d = int(first.shape[1]) if first.ndim == 2 else -1
    expected = _expected_shapes(cfg, d)
    outs: dict[str, int] = {}
    for il, params in layers.items():
        for name, arr in params.items():
            if name in expected:
                want = expected[name]
            elif name.startswith("delta_") and name.endswith("_proj"):
                h = name[len("delta_")]
                if arr.ndim != 2 or arr.shape[1] != cfg.state_dim:
                    problems.append(
                        f"layer {il}: {name} has shape {tuple(arr.shape)}, expected (out, R={cfg.state_dim})"
                    )
                    continue
                if h in cfg.delta_heads:
                    outs.setdefault(h, int(arr.shape[0]))
                    if outs[h] != arr.shape[0]:
                        problems.append(f"layer {il}: {name} has {arr.shape[0]} outputs, other layers {outs[h]}")
                continue
            else:  # delta_o_rmsnorm_weight, checked against delta_o below
                if arr.ndim != 1:
                    problems.append(f"layer {il}: {name} has shape {tuple(arr.shape)}, expected a vector")
                continue
            if tuple(arr.shape) != want:
                problems.append(f"layer {il}: {name} has shape {tuple(arr.shape)}, expected {want}")
        norm = params.get("delta_o_rmsnorm_weight")
        do = params.get("delta_o_proj")
        if norm is not None and do is not None and norm.ndim == 1 and do.ndim == 2 and norm.shape[0] != do.shape[0]:
            problems.append(
                f"layer {il}: delta_o_rmsnorm_weight has {norm.shape[0]} entries, delta_o_proj {do.shape[0]} outputs"
            )
        for name, arr in params.items():
            inactive = name in _DELTA_PARAM.values() and name[len("delta_")] not in cfg.delta_heads
            if not inactive and not np.all(np.isfinite(arr)):
                problems.append(f"layer {il}: {name} contains NaN or infinity")
    if problems:
        raise ConversionError(
            "adapter tensors have inconsistent shapes or values: " + "; ".join(problems),
            path=path,
            hint=f"config says rank={cfg.rank}, num_state_heads={cfg.num_state_heads}, "
            f"rankwise_gates={str(cfg.rankwise_gates).lower()}; check that it belongs to these weights",
        )


def build_adapter_tensors(
    weights: dict[str, np.ndarray],
    cfg: DeltaMemConfig,
    *,
    source: str = DEFAULT_SOURCE,
    path: Path | None = None,
) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """Upstream ``{key: array}`` + config → (schema metadata, ``{gguf tensor name: float32 array}``).

    Arrays use numpy (out, in) shapes, i.e. ggml ``ne = [in, out]``.  Metadata
    holds only the ``adapter.deltamem.*`` keys (``general.*`` depends on the base
    model and is added by the writer).  ``path`` only names the source in errors.
    """
    layers = split_layers(weights, path=path)
    if cfg.target_layers and not set(layers) <= set(cfg.target_layers):
        extra = sorted(set(layers) - set(cfg.target_layers))
        raise ConversionError(
            f"weights have layer(s) {extra} that target_layers {list(cfg.target_layers)} does not include", path=path
        )
    _check_layers(layers, cfg, path)

    r, h_state = cfg.rank, cfg.num_state_heads
    perm = np.asarray(S.gdn_permutation(r, h_state), dtype=np.intp)
    with_lambda = S.uses_lambda_projection(cfg.state_update_mode, cfg.couple_lambda)
    keep_norm = cfg.delta_o_rmsnorm and "o" in cfg.delta_heads

    def gates(x: np.ndarray) -> np.ndarray:
        """(G, ...) → (R, ...) in GDN order: a scalar gate per state head is repeated for its r rows."""
        x = np.asarray(x, dtype=np.float32)
        if not cfg.rankwise_gates:
            x = np.repeat(x, r, axis=0)
        return x[perm]

    tensors: dict[str, np.ndarray] = {}
    dropped: dict[str, list[int]] = {}
    for il, p in layers.items():
        f32 = {k: np.asarray(v, dtype=np.float32) for k, v in p.items()}
        rows = [f32["memory_q_proj"], f32["memory_k_proj"], f32["memory_v_proj"][perm], gates(f32["beta_proj"])]
        if with_lambda:
            rows.append(gates(f32["lambda_proj"]))
        tensors[S.TENSOR_IN.format(bid=il)] = np.ascontiguousarray(np.concatenate(rows, axis=0))
        tensors[S.TENSOR_BETA_BIAS.format(bid=il)] = np.ascontiguousarray(gates(f32["beta_bias"]))
        if with_lambda:
            tensors[S.TENSOR_LAMBDA_BIAS.format(bid=il)] = np.ascontiguousarray(gates(f32["lambda_bias"]))

        scale = delta_scale_factors(cfg, f32.get("delta_scale_raw"))
        for head in S.DELTA_HEADS:
            w = f32.get(_DELTA_PARAM[head])
            if head not in cfg.delta_heads:
                if w is not None and np.any(w != 0):
                    dropped.setdefault(head, []).append(il)
                continue
            assert w is not None  # _check_layers guarantees it
            w = w[:, perm]
            if scale[head] != 1.0:
                # With delta_o_rmsnorm the o scale is folded before the norm, where it cancels exactly (errata).
                w = (w.astype(np.float64) * scale[head]).astype(np.float32)
            tensors[S.TENSOR_DELTA[head].format(bid=il)] = np.ascontiguousarray(w)
        if keep_norm:
            tensors[S.TENSOR_DO_NORM.format(bid=il)] = np.ascontiguousarray(f32["delta_o_rmsnorm_weight"])

    for head, ils in dropped.items():
        warnings.warn(
            f"{path or 'adapter'}: delta_{head}_proj is not all zero in layer(s) {ils} but '{head}' is not in "
            f"delta_heads {list(cfg.delta_heads)}; dropping it as upstream ignores it",
            stacklevel=2,
        )

    metadata: dict[str, Any] = {
        S.KEY_VERSION: S.SCHEMA_VERSION,
        S.KEY_RANK: cfg.rank,
        S.KEY_STATE_HEADS: cfg.num_state_heads,
        S.KEY_ALPHA: cfg.alpha,
        S.KEY_UPDATE_MODE: cfg.state_update_mode,
        S.KEY_COUPLE_LAMBDA: cfg.couple_lambda,
        S.KEY_NORMALIZE_QK: cfg.normalize_qk,
        S.KEY_NORM_EPS: S.DEFAULT_NORM_EPS,
        S.KEY_GATE_CLAMP: S.DEFAULT_GATE_CLAMP,
        S.KEY_DELTA_HEADS: ",".join(cfg.delta_heads),
        S.KEY_DELTA_O_RMSNORM: keep_norm,
        S.KEY_DELTA_O_RMSNORM_EPS: cfg.delta_o_rmsnorm_eps,
        S.KEY_WRITE_GRANULARITY: cfg.memory_write_granularity,
        S.KEY_LAYERS: sorted(layers),
        S.KEY_ROW_ORDER: S.ROW_ORDER_GDN,
        S.KEY_SOURCE: source,
    }
    return metadata, tensors
