"""Random GGUF files in the real schemas: base models and δ-mem adapters, seeded.

Why this lives in the package: the tests (``tests/ggufs.py``), the benchmark
(``bench/models.py``) and the GPU check (``scripts/gpu_check.py``) all need random
non-zero models and adapters that llama.cpp and the engine load exactly as they load
real ones, and the product cannot import from ``tests/``.  One writer means one place
where a model's hparam keys and tensor plan, and an adapter's keys, tensor names and
GDN row order are spelled (the δ-mem names all come from ``gguf_schema``), and one
reader of the shapes an adapter needs from its base model.

Models: ``model_tensor_plan`` lists the tensors of a llama-family model (names, numpy
shapes, kinds); the caller fills them (in memory, quantized bytes, or streamed: any
object with ``shape``, ``dtype``, ``nbytes`` and ``tofile``) and ``write_model`` writes
them with the hparams and no tokenizer (``no_vocab``, llama.cpp makes dummy tokens)
unless the caller adds one.

Adapters: weights are generated in UPSTREAM order and named as upstream names them
(see ``deltamem_edge.reference.DmemLayer``); ``adapter_tensors`` applies the schema's
GDN row permutation, exactly as the converter must, and ``write_adapter`` writes a
standalone adapter and/or a bundle (base model + δ-mem).  The converter
(``converter/adapter.py``) stays a separate implementation on purpose: these files are
what its tests and the engine's are checked against.

Only numpy, gguf and ``gguf_schema``: the GPU check imports this on a bare machine.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import gguf
import numpy as np
from gguf import GGMLQuantizationType as QT
from gguf import GGUFValueType as VT

from . import gguf_schema as S

# --------------------------------------------------------------------------------------
# Base models
# --------------------------------------------------------------------------------------


def model_tensor_plan(
    arch: str, *, n_layer: int, n_embd: int, n_head: int, n_head_kv: int, head_dim: int, n_ff: int,
    n_vocab: int, tied: bool, output_first: bool = False,
) -> list[tuple[str, tuple[int, ...], str]]:
    """(name, numpy shape, kind) of every tensor of a llama-family ``arch`` model, in file order.

    kind is "mat" (2-D weight), "norm" (RMSNorm weight) or "bias".  qwen2 gets q/k/v
    biases, qwen3 q/k norms; ``tied`` drops output.weight.  ``output_first`` puts
    output_norm/output right after token_embd instead of after the layers (the tests'
    tiny models do; the order fixes which seeded values each tensor gets).
    """
    q, kv = n_head * head_dim, n_head_kv * head_dim
    head = [("output_norm.weight", (n_embd,), "norm")]
    if not tied:
        head.append(("output.weight", (n_vocab, n_embd), "mat"))
    plan = [("token_embd.weight", (n_vocab, n_embd), "mat")]
    if output_first:
        plan += head
    for il in range(n_layer):
        p = f"blk.{il}."
        plan += [(p + "attn_norm.weight", (n_embd,), "norm"), (p + "attn_q.weight", (q, n_embd), "mat"),
                 (p + "attn_k.weight", (kv, n_embd), "mat"), (p + "attn_v.weight", (kv, n_embd), "mat")]
        if arch == "qwen2":
            plan += [(p + f"attn_{n}.bias", (w,), "bias") for n, w in (("q", q), ("k", kv), ("v", kv))]
        if arch == "qwen3":
            plan += [(p + "attn_q_norm.weight", (head_dim,), "norm"), (p + "attn_k_norm.weight", (head_dim,), "norm")]
        plan += [(p + "attn_output.weight", (n_embd, q), "mat"), (p + "ffn_norm.weight", (n_embd,), "norm"),
                 (p + "ffn_gate.weight", (n_ff, n_embd), "mat"), (p + "ffn_up.weight", (n_ff, n_embd), "mat"),
                 (p + "ffn_down.weight", (n_embd, n_ff), "mat")]
    if not output_first:
        plan += head
    return plan


def write_model(
    path: str | Path, arch: str, tensors: Sequence[tuple[str, Any, QT | None]], *, name: str,
    file_type: gguf.LlamaFileType, n_ctx: int, n_embd: int, n_layer: int, n_ff: int, n_head: int, n_head_kv: int,
    head_dim: int, rope_base: float, norm_eps: float, n_vocab: int | None = None,
    tokenizer: Callable[[gguf.GGUFWriter], None] | None = None,
) -> Path:
    """Write a base-model GGUF: the hparams, a tokenizer, then ``tensors`` in order.

    Each tensor is (name, data, raw type): data is an array (uint8 bytes with a raw
    quantized type) or anything with ``shape``, ``dtype``, ``nbytes`` and ``tofile``,
    which is asked for its bytes only when they are written, in order (so a huge model
    can be streamed).  ``tokenizer(writer)`` adds the tokenizer keys; without it the
    model has none (``tokenizer.ggml.model = "no_vocab"`` plus ``{arch}.vocab_size =
    n_vocab``).
    """
    path = Path(path)
    wr = gguf.GGUFWriter(path, arch)
    wr.add_type("model")
    wr.add_name(name)
    wr.add_context_length(n_ctx)
    wr.add_embedding_length(n_embd)
    wr.add_block_count(n_layer)
    wr.add_feed_forward_length(n_ff)
    wr.add_head_count(n_head)
    wr.add_head_count_kv(n_head_kv)
    wr.add_key_length(head_dim)
    wr.add_value_length(head_dim)
    wr.add_rope_dimension_count(head_dim)
    wr.add_rope_freq_base(rope_base)
    wr.add_layer_norm_rms_eps(norm_eps)
    wr.add_file_type(file_type)
    if tokenizer is not None:
        tokenizer(wr)
    else:
        if n_vocab is None:
            raise ValueError("a model without a tokenizer needs n_vocab")
        wr.add_vocab_size(n_vocab)
        wr.add_tokenizer_model("no_vocab")
    for tname, data, raw in tensors:
        wr.add_tensor_info(tname, data.shape, data.dtype, data.nbytes, raw_dtype=raw)
    wr.write_header_to_file()
    wr.write_kv_data_to_file()
    wr.write_ti_data_to_file()
    for _tname, data, _raw in tensors:
        wr.write_tensor_data(data)
    wr.close()
    return path


def encode(arr: np.ndarray, ftype: str) -> tuple[np.ndarray, QT | None]:
    """(data, raw type) of ``arr`` stored as "f32", "f16", "bf16" or "q8_0"; 1-D tensors always stay f32.

    q8_0 falls back to f16 where a row does not split into 32-blocks.
    """
    arr = arr.astype(np.float32)
    if arr.ndim < 2 or ftype == "f32":
        return arr, None
    if ftype == "f16":
        return arr.astype(np.float16), None
    if ftype == "bf16":
        return gguf.quants.quantize(arr, QT.BF16), QT.BF16
    if ftype == "q8_0":
        if arr.shape[-1] % gguf.GGML_QUANT_SIZES[QT.Q8_0][0] != 0:
            return arr.astype(np.float16), None
        return gguf.quants.quantize(arr, QT.Q8_0), QT.Q8_0
    raise ValueError(f"unknown ftype {ftype!r}")


def base_shapes(base_path: str | Path) -> dict[str, Any]:
    """What a δ-mem adapter (or a report) needs from a base GGUF's metadata.

    arch, n_layer, n_embd, n_head, n_head_kv, head_dim (the key length), n_ff (None if
    absent), and ``out``: the output widths of the q, k, v and o projections.
    """
    r = gguf.GGUFReader(base_path)
    arch = r.fields[gguf.Keys.General.ARCHITECTURE].contents()

    def key(k: str, default: Any = None) -> Any:
        f = r.fields.get(k.format(arch=arch))
        return default if f is None else f.contents()

    n_embd, n_head = int(key(gguf.Keys.LLM.EMBEDDING_LENGTH)), int(key(gguf.Keys.Attention.HEAD_COUNT))
    n_head_kv = int(key(gguf.Keys.Attention.HEAD_COUNT_KV, n_head))
    hd_k = int(key(gguf.Keys.Attention.KEY_LENGTH, n_embd // n_head))
    hd_v = int(key(gguf.Keys.Attention.VALUE_LENGTH, n_embd // n_head))
    n_ff = key(gguf.Keys.LLM.FEED_FORWARD_LENGTH)
    return {"arch": arch, "n_embd": n_embd, "n_layer": int(key(gguf.Keys.LLM.BLOCK_COUNT)), "n_head": n_head,
            "n_head_kv": n_head_kv, "head_dim": hd_k, "n_ff": None if n_ff is None else int(n_ff),
            "out": {"q": n_head * hd_k, "k": n_head_kv * hd_k, "v": n_head_kv * hd_v, "o": n_embd}}


# --------------------------------------------------------------------------------------
# δ-mem adapters
# --------------------------------------------------------------------------------------


def _heads(delta_heads: str | Sequence[str]) -> tuple[str, ...]:
    """Canonical (q, k, v, o order) tuple of active heads from "q,o" or ("o", "q")."""
    items = delta_heads.split(",") if isinstance(delta_heads, str) else list(delta_heads)
    items = [h.strip() for h in items if h.strip() and h.strip() != "none"]
    bad = set(items) - set(S.DELTA_HEADS)
    if bad:
        raise ValueError(f"unknown delta heads {sorted(bad)}")
    return tuple(h for h in S.DELTA_HEADS if h in items)


def random_adapter_weights(
    base_path: str | Path,
    *,
    rank: int = 4,
    state_heads: int = 1,
    delta_heads: str | Sequence[str] = "q,o",
    update_mode: str = "standard",
    couple_lambda: bool = True,
    delta_o_rmsnorm: bool = False,
    layers: list[int] | None = None,
    seed: int = 0,
    proj_std: float = 0.2,
    bias_std: float = 0.5,
    delta_std: float = 0.2,
    beta_bias: float | None = None,
) -> dict[int, dict[str, np.ndarray]]:
    """Random non-zero δ-mem weights in upstream order: {layer: {upstream name: float32 array}}.

    Memory q/k/v, β and λ projections N(0, proj_std), their biases N(0, bias_std) (a
    constant ``beta_bias`` instead, when given, draws nothing), δ heads N(0, delta_std),
    δ_o norm weight 1 + 0.1·N(0, 1).  One gate per state row (rank-wise gates).  Values
    are drawn layer by layer in that order, so a seed gives the same weights every time.
    """
    shp = base_shapes(base_path)
    R, D = rank * state_heads, shp["n_embd"]
    rng = np.random.default_rng(seed)
    layers = list(range(shp["n_layer"])) if layers is None else sorted(layers)
    heads = _heads(delta_heads)
    out: dict[int, dict[str, np.ndarray]] = {}
    for bid in layers:
        lw = {f"memory_{n}_proj": rng.normal(0.0, proj_std, (R, D)) for n in "qkv"}
        lw["beta_proj"] = rng.normal(0.0, proj_std, (R, D))
        lw["beta_bias"] = rng.normal(0.0, bias_std, R) if beta_bias is None else np.full(R, beta_bias)
        if S.uses_lambda_projection(update_mode, couple_lambda):
            lw["lambda_proj"] = rng.normal(0.0, proj_std, (R, D))
            lw["lambda_bias"] = rng.normal(0.0, bias_std, R)
        for h in heads:
            lw[f"delta_{h}_proj"] = rng.normal(0.0, delta_std, (shp["out"][h], R))
        if delta_o_rmsnorm:
            lw["delta_o_rmsnorm_weight"] = 1.0 + 0.1 * rng.normal(size=D)
        out[bid] = {k: v.astype(np.float32) for k, v in lw.items()}
    return out


def adapter_tensors(weights: dict[int, dict[str, np.ndarray]], rank: int, state_heads: int,
                    update_mode: str, couple_lambda: bool) -> dict[str, np.ndarray]:
    """Schema tensors (numpy order [rows, cols] = ne reversed) from upstream-order weights.

    q/k rows stay in upstream order; v, β, λ rows and the δ heads' input columns go to
    GDN order (``gdn = upstream[perm]``).
    """
    perm = np.asarray(S.gdn_permutation(rank, state_heads))
    with_lambda = S.uses_lambda_projection(update_mode, couple_lambda)
    t: dict[str, np.ndarray] = {}
    for bid, lw in weights.items():
        blocks = [lw["memory_q_proj"], lw["memory_k_proj"], lw["memory_v_proj"][perm], lw["beta_proj"][perm]]
        if with_lambda:
            blocks.append(lw["lambda_proj"][perm])
        t[S.TENSOR_IN.format(bid=bid)] = np.concatenate(blocks, axis=0)
        t[S.TENSOR_BETA_BIAS.format(bid=bid)] = lw["beta_bias"][perm]
        if with_lambda:
            t[S.TENSOR_LAMBDA_BIAS.format(bid=bid)] = lw["lambda_bias"][perm]
        for h in S.DELTA_HEADS:
            if f"delta_{h}_proj" in lw:
                t[S.TENSOR_DELTA[h].format(bid=bid)] = lw[f"delta_{h}_proj"][:, perm]
        if "delta_o_rmsnorm_weight" in lw:
            t[S.TENSOR_DO_NORM.format(bid=bid)] = lw["delta_o_rmsnorm_weight"]
    return t


def add_adapter_kv(wr: gguf.GGUFWriter, cfg: dict[str, Any]) -> None:
    """The ``adapter.deltamem.*`` keys, from ``cfg`` (see ``write_adapter``), in the converter's order."""
    wr.add_uint32(S.KEY_VERSION, S.SCHEMA_VERSION)
    wr.add_uint32(S.KEY_RANK, cfg["rank"])
    wr.add_uint32(S.KEY_STATE_HEADS, cfg["state_heads"])
    wr.add_float32(S.KEY_ALPHA, cfg["alpha"])
    wr.add_string(S.KEY_UPDATE_MODE, cfg["update_mode"])
    wr.add_bool(S.KEY_COUPLE_LAMBDA, cfg["couple_lambda"])
    wr.add_bool(S.KEY_NORMALIZE_QK, cfg["normalize_qk"])
    wr.add_float32(S.KEY_NORM_EPS, cfg["norm_eps"])
    wr.add_float32(S.KEY_GATE_CLAMP, cfg["gate_clamp"])
    wr.add_string(S.KEY_DELTA_HEADS, ",".join(cfg["delta_heads"]))
    wr.add_bool(S.KEY_DELTA_O_RMSNORM, cfg["delta_o_rmsnorm"])
    wr.add_float32(S.KEY_DELTA_O_RMSNORM_EPS, cfg["delta_o_rmsnorm_eps"])
    wr.add_string(S.KEY_WRITE_GRANULARITY, cfg["write_granularity"])
    wr.add_key_value(S.KEY_LAYERS, list(cfg["layers"]), VT.ARRAY, VT.UINT32)
    wr.add_string(S.KEY_ROW_ORDER, S.ROW_ORDER_GDN)
    wr.add_string(S.KEY_SOURCE, cfg["source"])


def _finish(wr: gguf.GGUFWriter) -> None:
    wr.write_header_to_file()
    wr.write_kv_data_to_file()
    wr.write_tensors_to_file()
    wr.close()


def write_adapter(
    path: str | Path | None,
    base_path: str | Path,
    weights: dict[int, dict[str, np.ndarray]],
    *,
    rank: int,
    state_heads: int = 1,
    update_mode: str = "standard",
    couple_lambda: bool = True,
    normalize_qk: bool = True,
    alpha: float | None = None,
    norm_eps: float = S.DEFAULT_NORM_EPS,
    gate_clamp: float = S.DEFAULT_GATE_CLAMP,
    delta_o_rmsnorm_eps: float = 1e-6,
    dtype: str = "f32",
    bundle_into: str | Path | None = None,
    write_granularity: str = "token",
    name: str = "random δ-mem adapter",
    source: str = "deltamem_edge.random_gguf (random)",
) -> Path:
    """Write upstream-order ``weights`` as a standalone adapter GGUF at ``path`` and/or a bundle.

    The active δ heads and delta_o_rmsnorm are taken from which tensors ``weights`` holds;
    alpha defaults to 2·rank.  ``dtype`` ("f32", "f16", "bf16") applies to 2-D tensors;
    1-D ones stay f32.  With ``bundle_into`` a copy of the base GGUF plus the δ-mem keys
    and tensors is written there too.  ``name`` is general.name of the standalone file,
    ``source`` the provenance key.  Returns the bundle's path when one is written, else
    ``path``.
    """
    if path is None and bundle_into is None:
        raise ValueError("nothing to write: give path and/or bundle_into")
    shp = base_shapes(base_path)
    first = next(iter(weights.values()))
    cfg = {
        "rank": rank, "state_heads": state_heads, "alpha": float(2 * rank if alpha is None else alpha),
        "update_mode": update_mode, "couple_lambda": couple_lambda, "normalize_qk": normalize_qk,
        "norm_eps": norm_eps, "gate_clamp": gate_clamp,
        "delta_heads": tuple(h for h in S.DELTA_HEADS if f"delta_{h}_proj" in first),
        "delta_o_rmsnorm": "delta_o_rmsnorm_weight" in first, "delta_o_rmsnorm_eps": delta_o_rmsnorm_eps,
        "write_granularity": write_granularity, "layers": sorted(weights), "source": source,
    }
    tensors = adapter_tensors(weights, rank, state_heads, update_mode, couple_lambda)
    if path is not None:
        wr = gguf.GGUFWriter(Path(path), shp["arch"])
        wr.add_type(S.GENERAL_TYPE_ADAPTER)
        wr.add_name(name)
        wr.add_string(S.KEY_ADAPTER_TYPE, S.ADAPTER_TYPE)
        add_adapter_kv(wr, cfg)
        for tname, arr in tensors.items():
            data, raw = encode(arr, dtype)
            wr.add_tensor(tname, data, raw_dtype=raw)
        _finish(wr)
    if bundle_into is None:
        return Path(path)
    _write_bundle(Path(bundle_into), base_path, cfg, tensors, dtype)
    return Path(bundle_into)


def _write_bundle(out: Path, base_path: str | Path, cfg: dict[str, Any], tensors: dict[str, np.ndarray],
                  dtype: str) -> None:
    """Copy the base GGUF (metadata and tensors, bytes unchanged) and append the δ-mem part."""
    r = gguf.GGUFReader(base_path)
    arch = r.fields[gguf.Keys.General.ARCHITECTURE].contents()
    wr = gguf.GGUFWriter(out, arch)
    for key, f in r.fields.items():
        if key.startswith("GGUF.") or key == gguf.Keys.General.ARCHITECTURE:
            continue
        vtype = f.types[0]
        sub = f.types[-1] if vtype == VT.ARRAY else None
        val = f.contents()
        if vtype == VT.ARRAY and len(val) == 0:
            continue  # gguf-py cannot write empty arrays
        wr.add_key_value(key, val, vtype, sub)
    add_adapter_kv(wr, cfg)
    for t in r.tensors:
        wr.add_tensor(t.name, t.data, raw_dtype=t.tensor_type)
    for tname, arr in tensors.items():
        data, raw = encode(arr, dtype)
        wr.add_tensor(tname, data, raw_dtype=raw)
    _finish(wr)


def write_random_adapter(
    path: str | Path | None,
    base_path: str | Path,
    *,
    rank: int = 4,
    state_heads: int = 1,
    delta_heads: str | Sequence[str] = "q,o",
    update_mode: str = "standard",
    couple_lambda: bool = True,
    normalize_qk: bool = True,
    delta_o_rmsnorm: bool = False,
    layers: list[int] | None = None,
    alpha: float | None = None,
    seed: int = 0,
    dtype: str = "f32",
    bundle_into: str | Path | None = None,
    write_granularity: str = "token",
) -> Path:
    """Random non-zero δ-mem adapter for ``base_path`` (see ``random_adapter_weights``).

    alpha defaults to 2·rank.  Writes a standalone adapter GGUF at ``path`` (skip it with
    path=None) and, with ``bundle_into``, a bundle (base model + δ-mem) there; returns the
    bundle's path when one is written, else ``path``.
    """
    weights = random_adapter_weights(
        base_path, rank=rank, state_heads=state_heads, delta_heads=delta_heads, update_mode=update_mode,
        couple_lambda=couple_lambda, delta_o_rmsnorm=delta_o_rmsnorm, layers=layers, seed=seed,
    )
    return write_adapter(
        path, base_path, weights, rank=rank, state_heads=state_heads, update_mode=update_mode,
        couple_lambda=couple_lambda, normalize_qk=normalize_qk, alpha=alpha, dtype=dtype, bundle_into=bundle_into,
        write_granularity=write_granularity, source=f"deltamem_edge.random_gguf (random, seed {seed})",
    )
