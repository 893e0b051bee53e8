"""Upstream δ-mem adapter (``delta_mem_config.json`` + ``delta_mem_adapter.pt`` / ``.safetensors``) → our GGUF.

Why convert at all: the engine is C++ and must not parse pickle, and it wants the
weights in the layout its graph uses (``deltamem_edge.gguf_schema``): one packed
input projection per layer, state rows pre-permuted to GDN order, scalar gates
expanded to one gate per row, trainable δ scales folded into the δ heads, and
inactive δ heads dropped.  Doing that once here keeps the run-time graph small.

Two outputs:

* adapter (default): a small ``general.type = adapter`` GGUF loaded next to a
  stock base model;
* ``bundle=True``: the base model GGUF copied unchanged (every key, every tensor,
  quantized ones as raw bytes) plus our keys and tensors, in one file.

One fix-up depends on the base model: llama.cpp's ``convert_hf_to_gguf`` permutes
the rows of the q and k projections of llama-family models (``llama``,
``smollm3``) so that its adjacent-pair RoPE sees the pairs HF's ``rotate_half``
rotates.  Upstream adds δ_q/δ_k to the HF-order q/k outputs, so the rows of the δ_q
and δ_k heads get the same permutation here (``apply_base_layout``); qwen2/qwen3
keep HF order and need nothing.

``build_adapter_tensors`` is the pure math (dicts in, dicts out) so that tests
can check it without files; ``convert_adapter`` adds file handling, validation
against the base model, and an atomic write.
"""

from __future__ import annotations

import math
import os
import re
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import gguf
import numpy as np

from deltamem_edge import gguf_schema as S
from deltamem_edge.errors import AdapterError, ConversionError, DeltaMemError
from deltamem_edge.gguf_header import GGUFHeader, LongArray, read_gguf_header
from deltamem_edge.limits import ReadLimits
from deltamem_edge.supported import SUPPORTED_ARCHS

from .config import CONFIG_FILENAME, DeltaMemConfig, load_config
from .safetensors_reader import read_safetensors
from .torch_zip import read_torch_zip

WEIGHTS_FILENAME = "delta_mem_adapter.pt"
# Archs whose q/k projection rows convert_hf_to_gguf permutes (LlamaModel.permute; SmolLM3Model inherits it).
ROPE_PERMUTED_ARCHS = ("llama", "smollm3")
ROPE_PERMUTED_NOTE = "δ_q/δ_k rows permuted like convert_hf_to_gguf's llama q/k"
OUTTYPES = ("f32", "f16")
DEFAULT_SOURCE = "deltamem-edge converter"

_KEY_RE = re.compile(r"^model\.layers\.(\d+)\.self_attn\.([A-Za-z0-9_]+)$")
_DELTA_PARAM = {h: f"delta_{h}_proj" for h in S.DELTA_HEADS}
_KNOWN_PARAMS = {
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

_U32 = gguf.GGUFValueType.UINT32
_F32 = gguf.GGUFValueType.FLOAT32
_BOOL = gguf.GGUFValueType.BOOL
_STR = gguf.GGUFValueType.STRING
_METADATA_TYPES: dict[str, gguf.GGUFValueType] = {
    S.KEY_VERSION: _U32,
    S.KEY_RANK: _U32,
    S.KEY_STATE_HEADS: _U32,
    S.KEY_ALPHA: _F32,
    S.KEY_UPDATE_MODE: _STR,
    S.KEY_COUPLE_LAMBDA: _BOOL,
    S.KEY_NORMALIZE_QK: _BOOL,
    S.KEY_NORM_EPS: _F32,
    S.KEY_GATE_CLAMP: _F32,
    S.KEY_DELTA_HEADS: _STR,
    S.KEY_DELTA_O_RMSNORM: _BOOL,
    S.KEY_DELTA_O_RMSNORM_EPS: _F32,
    S.KEY_WRITE_GRANULARITY: _STR,
    S.KEY_LAYERS: gguf.GGUFValueType.ARRAY,  # of u32
    S.KEY_ROW_ORDER: _STR,
    S.KEY_SOURCE: _STR,
}


# --------------------------------------------------------------------------------------------
# The math: upstream tensors -> schema tensors
# --------------------------------------------------------------------------------------------


def split_layers(weights: dict[str, np.ndarray], *, path: Path | None = None) -> dict[int, dict[str, np.ndarray]]:
    """Group ``model.layers.N.self_attn.<param>`` keys by layer; any other key is an error naming it."""
    layers: dict[int, dict[str, np.ndarray]] = {}
    unknown: list[str] = []
    for key, value in weights.items():
        m = _KEY_RE.match(key)
        if m is None or m.group(2) not in _KNOWN_PARAMS:
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


# --------------------------------------------------------------------------------------------
# The base model
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class BaseModelInfo:
    """The hyperparameters of a base GGUF that the adapter's shapes must match (per-layer head counts)."""

    path: Path
    arch: str
    n_layer: int
    n_embd: int
    n_head: tuple[int, ...]
    n_head_kv: tuple[int, ...]
    head_dim_k: int
    head_dim_v: int


def _open_gguf(path: Path, *, full: bool = False) -> GGUFHeader:
    """The base model's GGUF header (fast reader); ``full`` also decodes the long tokenizer arrays."""
    if not path.exists():
        raise AdapterError("base model file not found", path=path)
    return read_gguf_header(path, max_array=None if full else 4096)


def _field(header: GGUFHeader, key: str, path: Path, default: Any = None) -> Any:
    value = header.fields.get(key)
    if value is None:
        if default is None:
            raise AdapterError(f"base model has no {key} key", path=path, hint="is this a llama.cpp model GGUF?")
        return default
    return value


def _per_layer(value: Any, n_layer: int, key: str, path: Path) -> tuple[int, ...]:
    if isinstance(value, list):
        if len(value) != n_layer or not all(isinstance(v, int) for v in value):
            raise AdapterError(f"{key} is an array of {len(value)} values for {n_layer} layers", path=path)
        return tuple(value)
    if not isinstance(value, int) or value <= 0:
        raise AdapterError(f"{key} is {value!r:.40}", path=path)
    return (value,) * n_layer


def base_model_info(header: GGUFHeader, path: Path) -> BaseModelInfo:
    """Read the shape hyperparameters from a base GGUF header (``read_gguf_header``)."""
    general_type = _field(header, S.KEY_GENERAL_TYPE, path, default="model")
    if general_type == S.GENERAL_TYPE_ADAPTER:
        raise AdapterError("this GGUF is an adapter, not a base model", path=path, hint="pass the base model file")
    arch = _field(header, S.KEY_GENERAL_ARCHITECTURE, path)
    if arch not in SUPPORTED_ARCHS:
        raise AdapterError(
            f"architecture {arch!r} is not supported by δ-mem",
            path=path,
            hint=f"supported: {', '.join(SUPPORTED_ARCHS)}",
        )
    n_layer = _field(header, f"{arch}.block_count", path)
    n_embd = _field(header, f"{arch}.embedding_length", path)
    if not isinstance(n_layer, int) or not isinstance(n_embd, int) or n_layer <= 0 or n_embd <= 0:
        raise AdapterError(f"invalid block_count {n_layer!r:.20} or embedding_length {n_embd!r:.20}", path=path)
    n_head = _per_layer(_field(header, f"{arch}.attention.head_count", path), n_layer, "head_count", path)
    kv = _field(header, f"{arch}.attention.head_count_kv", path, default=list(n_head))
    n_head_kv = _per_layer(kv, n_layer, "head_count_kv", path)
    default_dim = n_embd // n_head[0] if n_head[0] else 0
    head_dim_k = _field(header, f"{arch}.attention.key_length", path, default=default_dim)
    head_dim_v = _field(header, f"{arch}.attention.value_length", path, default=default_dim)
    return BaseModelInfo(path, arch, n_layer, n_embd, n_head, n_head_kv, int(head_dim_k), int(head_dim_v))


def read_base_model(path: str | Path) -> BaseModelInfo:
    """``base_model_info`` for a file path."""
    path = Path(path)
    return base_model_info(_open_gguf(path), path)


def _fmt_layers(ils: list[int]) -> str:
    if len(ils) > 1 and ils == list(range(ils[0], ils[-1] + 1)):
        return f"layers {ils[0]}-{ils[-1]}"
    return ("layer " if len(ils) == 1 else "layers ") + ",".join(map(str, ils))


def check_against_base(metadata: dict[str, Any], tensors: dict[str, np.ndarray], base: BaseModelInfo) -> list[str]:
    """Every way the converted adapter does not fit ``base``, each with both numbers; empty if it fits."""
    problems: list[str] = []
    layers = list(metadata[S.KEY_LAYERS])
    outside = [il for il in layers if il >= base.n_layer]
    if outside:
        problems.append(
            f"adapter {_fmt_layers(outside)} not in the base model: block_count is {base.n_layer} "
            f"(layers 0-{base.n_layer - 1})"
        )
    mismatches: dict[tuple[str, int, str], list[int]] = {}
    for il in layers:
        if il >= base.n_layer:
            continue
        nh, nkv = base.n_head[il], base.n_head_kv[il]
        want = {
            "q": (nh * base.head_dim_k, f"n_head*head_dim_k = {nh}*{base.head_dim_k}"),
            "k": (nkv * base.head_dim_k, f"n_head_kv*head_dim_k = {nkv}*{base.head_dim_k}"),
            "v": (nkv * base.head_dim_v, f"n_head_kv*head_dim_v = {nkv}*{base.head_dim_v}"),
            "o": (base.n_embd, "n_embd"),
        }
        d_in = tensors[S.TENSOR_IN.format(bid=il)].shape[1]
        if d_in != base.n_embd:
            mismatches.setdefault(
                (f"hidden size: memory projections have D = {d_in} inputs but the base", base.n_embd, "n_embd"), []
            ).append(il)
        for head, (n, what) in want.items():
            t = tensors.get(S.TENSOR_DELTA[head].format(bid=il))
            if t is not None and t.shape[0] != n:
                mismatches.setdefault((f"δ_{head} has {t.shape[0]} outputs but the base", n, what), []).append(il)
        norm = tensors.get(S.TENSOR_DO_NORM.format(bid=il))
        if norm is not None and norm.shape[0] != base.n_embd:
            mismatches.setdefault(
                (f"δ_o norm has {norm.shape[0]} weights but the base", base.n_embd, "n_embd"), []
            ).append(il)
    for (msg, n, what), ils in mismatches.items():
        problems.append(f"{_fmt_layers(ils)}: {msg} needs {n} ({what})")
    return problems


def rope_row_permutation(n_head: int, head_dim: int) -> np.ndarray:
    """``perm`` with ``gguf_rows = hf_rows[perm]`` for a q or k projection of ``n_head`` heads.

    The same map as ``LlamaModel.permute`` in llama.cpp's converter: within each head,
    HF row ``s*head_dim/2 + j`` (half ``s`` of the rotate_half layout) moves to row
    ``2*j + s`` (the adjacent pairs of llama.cpp's NORM RoPE).
    """
    if head_dim % 2:
        raise AdapterError(f"head_dim {head_dim} is odd; llama-family RoPE needs an even head size")
    return np.arange(n_head * head_dim).reshape(n_head, 2, head_dim // 2).swapaxes(1, 2).reshape(-1)


def apply_base_layout(tensors: dict[str, np.ndarray], base: BaseModelInfo) -> bool:
    """Reorder the δ_q/δ_k rows in place for a llama-family base (see the module docstring).

    Returns True when something was permuted.  The shapes must already fit
    ``base`` (``check_against_base``): q has ``n_head`` heads, k ``n_head_kv``
    heads, each ``head_dim_k`` rows, per layer.
    """
    if base.arch not in ROPE_PERMUTED_ARCHS:
        return False
    done = False
    for il in range(base.n_layer):
        for head, n_head in (("q", base.n_head[il]), ("k", base.n_head_kv[il])):
            name = S.TENSOR_DELTA[head].format(bid=il)
            w = tensors.get(name)
            if w is None:
                continue
            if w.shape[0] != n_head * base.head_dim_k:
                raise AdapterError(
                    f"{name} has {w.shape[0]} rows, expected {n_head}*{base.head_dim_k}", path=base.path
                )
            tensors[name] = np.ascontiguousarray(w[rope_row_permutation(n_head, base.head_dim_k)])
            done = True
    return done


# --------------------------------------------------------------------------------------------
# Files
# --------------------------------------------------------------------------------------------


def resolve_inputs(src: Path, config: Path | None = None) -> tuple[Path, Path]:
    """(weights file, config file) for an adapter directory or an explicit weights file."""
    if src.is_dir():
        candidates = [p for p in [src / WEIGHTS_FILENAME] if p.is_file()] + sorted(src.glob("*.safetensors"))
        if not candidates:
            raise ConversionError(
                f"no {WEIGHTS_FILENAME} or *.safetensors in the adapter directory",
                path=src,
                hint="point at the upstream adapter directory (e.g. <run>/trainer/checkpoint-70)",
            )
        if len(candidates) > 1:
            raise ConversionError(
                f"several weight files: {', '.join(p.name for p in candidates)}",
                path=src,
                hint="pass the one to convert explicitly",
            )
        weights = candidates[0]
        cfg = config or src / CONFIG_FILENAME
    elif src.is_file():
        weights = src
        cfg = config or src.parent / CONFIG_FILENAME
    else:
        raise ConversionError("adapter path not found", path=src)
    return weights, cfg


BUDGET_HEADROOM = 2
"""``adapter_read_limits`` allows twice the largest adapter: an adapter for a slightly different
base still reaches ``check_against_base`` and gets the error with both shapes, not a budget error."""


def adapter_read_limits(cfg: DeltaMemConfig, base: BaseModelInfo) -> ReadLimits:
    """What reading the weights of ``cfg``'s adapter for ``base`` may allocate.

    The largest adapter that config can have on that base: every layer of the base
    with every upstream parameter (also the ones the config forbids), at float32,
    times ``BUDGET_HEADROOM``.  For the released Qwen3-4B rank-8 adapter that is
    ~50 MB instead of a fixed 8 GiB, so a file declaring more is refused before
    anything is inflated.
    """
    r, g, d = cfg.state_dim, cfg.gate_dim, base.n_embd
    q_out = max(base.n_head) * base.head_dim_k
    kv_out = max(base.n_head_kv) * max(base.head_dim_k, base.head_dim_v)
    per_layer = 3 * r * d + 2 * (g * d + g) + r * (q_out + 2 * kv_out + d) + d + 4
    return ReadLimits(
        max_tensor_bytes=BUDGET_HEADROOM * 4 * base.n_layer * per_layer + (1 << 20),
        max_entries=BUDGET_HEADROOM * len(_KNOWN_PARAMS) * base.n_layer,
    )


def load_weights(path: Path, limits: ReadLimits | None = None) -> dict[str, np.ndarray]:
    """Read upstream weights: ``.safetensors`` by extension, anything else as a torch zip.

    ``limits`` (from ``adapter_read_limits``) bounds what the reader may allocate;
    None keeps the readers' default, for callers that know no base model.
    """
    kw = {} if limits is None else {"limits": limits}
    if path.suffix.lower() == ".safetensors":
        return read_safetensors(path, **kw)
    return read_torch_zip(path, **kw)


def default_output_path(base: Path, *, bundle: bool = False) -> Path:
    """``<base stem>.dmem.gguf`` (bundle: ``<base stem>.dmem-bundle.gguf``) next to the base model."""
    return base.with_name(base.stem + (".dmem-bundle.gguf" if bundle else ".dmem.gguf"))


def _to_outtype(name: str, arr: np.ndarray, outtype: str, path: Path) -> np.ndarray:
    if arr.ndim < 2 or outtype == "f32":
        return np.ascontiguousarray(arr, dtype=np.float32)
    with np.errstate(over="ignore"):
        half = arr.astype(np.float16)
    if not np.all(np.isfinite(half)):
        raise ConversionError(f"{name} has values beyond the float16 range", path=path, hint="convert with outtype f32")
    return half


def _add_metadata(writer: gguf.GGUFWriter, metadata: dict[str, Any]) -> None:
    for key, value in metadata.items():
        vtype = _METADATA_TYPES[key]
        if vtype == gguf.GGUFValueType.ARRAY:
            writer.add_key_value(key, [int(v) for v in value], vtype, sub_type=_U32)
        else:
            writer.add_key_value(key, value, vtype)


def _copy_base_fields(header: GGUFHeader, writer: gguf.GGUFWriter, base: Path) -> None:
    """Copy every key of the base (except the architecture, which the writer adds itself)."""
    for name, value in header.fields.items():
        if name == S.KEY_GENERAL_ARCHITECTURE:
            continue
        if name.startswith("adapter."):
            raise ConversionError(
                f"base model already has {name}; it is an adapter or a δ-mem bundle",
                path=base,
                hint="pass the plain base model",
            )
        types = header.types[name]
        vtype = gguf.GGUFValueType(types[0])
        sub_type = gguf.GGUFValueType(types[1]) if vtype == gguf.GGUFValueType.ARRAY else None
        if isinstance(value, LongArray):  # not decoded: _open_gguf(full=True) prevents this
            raise ConversionError(f"key {name} was not read in full", path=base)
        if vtype == gguf.GGUFValueType.ARRAY and len(value) == 0:
            warnings.warn(f"{base}: key {name} is an empty array, which gguf-py cannot write; left out", stacklevel=3)
            continue
        writer.add_key_value(name, value, vtype, sub_type=sub_type)
    if "general.alignment" in header.fields:
        writer.data_alignment = header.alignment


def _write_gguf(
    tmp: Path,
    arch: str,
    metadata: dict[str, Any],
    tensors: dict[str, np.ndarray],
    *,
    name: str,
    base_header: GGUFHeader | None,
    base_path: Path,
) -> None:
    writer = gguf.GGUFWriter(tmp, arch)
    try:
        base_data = []
        if base_header is None:
            writer.add_key_value(S.KEY_GENERAL_TYPE, S.GENERAL_TYPE_ADAPTER, _STR)
            if name:
                writer.add_key_value(S.KEY_GENERAL_NAME, name, _STR)
        else:
            _copy_base_fields(base_header, writer, base_path)
            for t in base_header.tensors:
                if S.TENSOR_MARKER in t.name:
                    raise ConversionError(f"base model already has δ-mem tensor {t.name}", path=base_path)
                raw = base_header.tensor_bytes(t)  # bytes as stored: quantized tensors are copied unchanged
                writer.add_tensor_info(t.name, raw.shape, raw.dtype, t.n_bytes, gguf.GGMLQuantizationType(t.ggml_type))
                base_data.append(raw)
        writer.add_key_value(S.KEY_ADAPTER_TYPE, S.ADAPTER_TYPE, _STR)
        _add_metadata(writer, metadata)
        for tname, arr in tensors.items():
            writer.add_tensor_info(tname, arr.shape, arr.dtype, arr.nbytes)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        for raw in base_data:
            writer.write_tensor_data(raw)
        for arr in tensors.values():
            writer.write_tensor_data(arr)
    finally:
        writer.close()


def _replace_atomically(tmp: Path, out: Path) -> None:
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600; give the file the mode a plain open() would
    os.replace(tmp, out)


def convert_adapter(
    src: Path,
    base: Path,
    out: Path | None = None,
    *,
    outtype: str = "f32",
    bundle: bool = False,
    config: Path | None = None,
) -> Path:
    """Convert an upstream adapter (directory, or weights file) for ``base``; return the written path.

    ``outtype`` sets the type of 2-D weights (1-D tensors are always f32).  With
    ``bundle`` the output is the base model plus the adapter in one GGUF.
    ``config`` overrides ``<weights dir>/delta_mem_config.json``.  Everything is
    read and validated before the output is written; the output appears
    atomically (temp file + rename), so a failure never leaves a partial file.
    """
    src, base = Path(src), Path(base)
    if outtype not in OUTTYPES:
        raise ConversionError(f"unknown outtype {outtype!r}", hint=f"use one of {', '.join(OUTTYPES)}")
    weights_path, config_path = resolve_inputs(src, config)
    cfg = load_config(config_path)
    header = _open_gguf(base, full=bundle)
    info = base_model_info(header, base)
    out = Path(out) if out is not None else default_output_path(base, bundle=bundle)
    if out.is_dir():
        out = out / default_output_path(base, bundle=bundle).name
    if bundle and int(_field(header, "split.count", base, default=1)) > 1:
        raise ConversionError(
            "the base model is split into several files; a bundle needs a single file",
            path=base,
            hint="merge it first (llama-gguf-split --merge), or convert without --bundle",
        )
    if out.exists() and any(out.resolve() == p.resolve() for p in (base, weights_path, config_path)):
        raise ConversionError("the output path is one of the inputs", path=out, hint="choose another output file")

    weights = load_weights(weights_path, adapter_read_limits(cfg, info))
    adapter_dir = weights_path.parent
    source = f"{DEFAULT_SOURCE} from {adapter_dir.name}/{weights_path.name}"
    metadata, tensors = build_adapter_tensors(weights, cfg, source=source, path=weights_path)
    problems = check_against_base(metadata, tensors, info)
    if problems:
        raise AdapterError(
            f"adapter does not fit base model {base}: " + "; ".join(problems),
            path=weights_path,
            hint="convert against the base model the adapter was trained on",
        )
    if apply_base_layout(tensors, info):
        metadata[S.KEY_SOURCE] += f"; {ROPE_PERMUTED_NOTE}"
    typed = {name: _to_outtype(name, arr, outtype, weights_path) for name, arr in tensors.items()}

    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{out.name}.", suffix=".part", dir=out.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        _write_gguf(
            tmp,
            info.arch,
            metadata,
            typed,
            name=adapter_dir.name,
            base_header=header if bundle else None,
            base_path=base,
        )
        _replace_atomically(tmp, out)
    except BaseException as e:
        tmp.unlink(missing_ok=True)
        if isinstance(e, (DeltaMemError, KeyboardInterrupt)):
            raise
        if isinstance(e, (OSError, ValueError)):
            raise ConversionError(f"writing failed ({e})", path=out) from e
        raise
    return out
