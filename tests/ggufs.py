"""Builders of tiny GGUF test fixtures: random base models, random δ-mem adapters, bundles.

Plain functions (no pytest fixtures) so any test, benchmark or debugging script can
import them.  Everything is seeded and takes well under a second.

Weights are drawn large on purpose (matrices N(0, 0.2), norm weights 1 + 0.1·N(0, 1)):
with the usual 0.02 init the logits of a 64-wide model are nearly flat and comparisons
prove little.  Base models carry no tokenizer (``tokenizer.ggml.model = "no_vocab"`` plus
``{arch}.vocab_size``; llama.cpp then creates dummy tokens), so tests feed token ids.

δ-mem weights are generated in UPSTREAM order and named as upstream names them (see
``deltamem_edge.reference.DmemLayer``); ``write_adapter`` applies the schema's GDN row
permutation when it writes them, exactly as the converter must.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import gguf
import numpy as np
from gguf import GGMLQuantizationType as QT
from gguf import GGUFValueType as VT

from deltamem_edge import gguf_schema as S

ARCHS = ("qwen3", "llama", "qwen2", "smollm3")
FTYPES = {"f32": gguf.LlamaFileType.ALL_F32, "f16": gguf.LlamaFileType.MOSTLY_F16,
          "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0}
_ROPE_BASE = {"qwen3": 1e6, "qwen2": 1e6, "llama": 1e4, "smollm3": 5e6}
_TIED_BY_DEFAULT = {"qwen3": False, "qwen2": True, "llama": True, "smollm3": True}


# --------------------------------------------------------------------------------------
# Base models
# --------------------------------------------------------------------------------------


def _encode(arr: np.ndarray, ftype: str) -> tuple[np.ndarray, QT | None]:
    """(data, raw_dtype) for GGUFWriter.add_tensor; 1-D tensors always stay f32."""
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


def write_tiny_model(
    path: str | Path,
    arch: str = "qwen3",
    *,
    n_embd: int = 64,
    n_layer: int | None = None,
    n_head: int = 4,
    n_head_kv: int = 2,
    head_dim: int = 16,
    n_ff: int = 128,
    n_vocab: int = 256,
    seed: int = 0,
    ftype: str = "f32",
    tied: bool | None = None,
    norm_eps: float = 1e-6,
    chat_tokenizer: bool = False,
) -> Path:
    """Write a random ``arch`` model GGUF that stock llama.cpp loads.

    ``chat_tokenizer=True`` gives it a real (tiny) tokenizer instead of none: byte-level
    BPE over the 256 bytes plus ChatML's special tokens (``n_vocab`` is then
    ``len(BYTE_CHAT_TOKENS)``), so that text-level code (chat template, server) can be
    tested in milliseconds instead of on a real model.

    n_layer defaults to 2, or 4 for smollm3 so that llama.cpp's hard-coded NoPE layer
    (il = 3) exists.  ``tied`` defaults per arch (qwen3 untied, others tied: no
    output.weight).  qwen2 gets q/k/v biases, qwen3 gets q/k norms.  ``ftype`` "f16"
    stores 2-D weights in f16, "q8_0" quantizes the 2-D weights (f16 where a row does
    not split into 32-blocks).
    """
    if arch not in ARCHS:
        raise ValueError(f"arch {arch!r} not in {ARCHS}")
    if ftype not in FTYPES:
        raise ValueError(f"ftype {ftype!r} not in {tuple(FTYPES)}")
    if arch == "qwen2" and n_head * head_dim != n_embd:
        raise ValueError("llama.cpp's qwen2 needs n_head * head_dim == n_embd")
    n_layer = n_layer if n_layer is not None else (4 if arch == "smollm3" else 2)
    if chat_tokenizer:
        n_vocab = len(BYTE_CHAT_TOKENS)
    tied = _TIED_BY_DEFAULT[arch] if tied is None else tied
    rng = np.random.default_rng(seed)

    def mat(rows: int, cols: int) -> np.ndarray:
        return rng.normal(0.0, 0.2, (rows, cols))

    def norm(n: int) -> np.ndarray:
        return 1.0 + 0.1 * rng.normal(size=n)

    q_out, kv_out = n_head * head_dim, n_head_kv * head_dim
    w: dict[str, np.ndarray] = {"token_embd.weight": mat(n_vocab, n_embd), "output_norm.weight": norm(n_embd)}
    if not tied:
        w["output.weight"] = mat(n_vocab, n_embd)
    for il in range(n_layer):
        p = f"blk.{il}."
        w[p + "attn_norm.weight"] = norm(n_embd)
        w[p + "attn_q.weight"] = mat(q_out, n_embd)
        w[p + "attn_k.weight"] = mat(kv_out, n_embd)
        w[p + "attn_v.weight"] = mat(kv_out, n_embd)
        if arch == "qwen2":
            for name, n in (("q", q_out), ("k", kv_out), ("v", kv_out)):
                w[p + f"attn_{name}.bias"] = rng.normal(0.0, 0.2, n)
        if arch == "qwen3":
            w[p + "attn_q_norm.weight"] = norm(head_dim)
            w[p + "attn_k_norm.weight"] = norm(head_dim)
        w[p + "attn_output.weight"] = mat(n_embd, q_out)
        w[p + "ffn_norm.weight"] = norm(n_embd)
        w[p + "ffn_gate.weight"] = mat(n_ff, n_embd)
        w[p + "ffn_up.weight"] = mat(n_ff, n_embd)
        w[p + "ffn_down.weight"] = mat(n_embd, n_ff)

    path = Path(path)
    wr = gguf.GGUFWriter(path, arch)
    wr.add_type("model")
    wr.add_name(f"tiny-random-{arch}")
    wr.add_context_length(4096)
    wr.add_embedding_length(n_embd)
    wr.add_block_count(n_layer)
    wr.add_feed_forward_length(n_ff)
    wr.add_head_count(n_head)
    wr.add_head_count_kv(n_head_kv)
    wr.add_key_length(head_dim)
    wr.add_value_length(head_dim)
    wr.add_rope_dimension_count(head_dim)
    wr.add_rope_freq_base(_ROPE_BASE[arch])
    wr.add_layer_norm_rms_eps(norm_eps)
    wr.add_file_type(FTYPES[ftype])
    if chat_tokenizer:
        _add_byte_chat_tokenizer(wr)
    else:
        wr.add_vocab_size(n_vocab)
        wr.add_tokenizer_model("no_vocab")
    for name, arr in w.items():
        data, raw = _encode(arr, ftype)
        wr.add_tensor(name, data, raw_dtype=raw)
    _finish(wr)
    return path


def _byte_tokens() -> list[str]:
    """GPT-2's byte-to-unicode table: the 256 single-byte tokens of a byte-level BPE vocabulary."""
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(0xA1, 0xAD)) + list(range(0xAE, 0x100))
    chars = {b: chr(b) for b in keep}
    extra = 0
    for b in range(256):
        if b not in chars:
            chars[b] = chr(256 + extra)
            extra += 1
    return [chars[b] for b in range(256)]


CHAT_SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")
BYTE_CHAT_TOKENS = (*_byte_tokens(), "\u0120t", *CHAT_SPECIAL_TOKENS)  # one merge ("Ġ t"): llama.cpp needs >= 1


def _add_byte_chat_tokenizer(wr: gguf.GGUFWriter) -> None:
    """A gpt2-style tokenizer over BYTE_CHAT_TOKENS; <|im_end|> is EOS, so ChatML replies can end."""
    n_plain = len(BYTE_CHAT_TOKENS) - len(CHAT_SPECIAL_TOKENS)
    wr.add_tokenizer_model("gpt2")
    wr.add_tokenizer_pre("default")
    wr.add_token_list(list(BYTE_CHAT_TOKENS))
    wr.add_token_types([1] * n_plain + [3] * len(CHAT_SPECIAL_TOKENS))  # 1 normal, 3 control
    wr.add_token_merges(["\u0120 t"])
    wr.add_bos_token_id(BYTE_CHAT_TOKENS.index("<|endoftext|>"))
    wr.add_eos_token_id(BYTE_CHAT_TOKENS.index("<|im_end|>"))
    wr.add_add_bos_token(False)


def _finish(wr: gguf.GGUFWriter) -> None:
    wr.write_header_to_file()
    wr.write_kv_data_to_file()
    wr.write_tensors_to_file()
    wr.close()


# --------------------------------------------------------------------------------------
# δ-mem adapters
# --------------------------------------------------------------------------------------


def base_shapes(base_path: str | Path) -> dict[str, Any]:
    """arch, n_layer and the in/out widths a δ-mem adapter needs, from a base GGUF's metadata."""
    r = gguf.GGUFReader(base_path)
    arch = r.fields[gguf.Keys.General.ARCHITECTURE].contents()

    def key(k: str, default: Any = None) -> Any:
        f = r.fields.get(k.format(arch=arch))
        return default if f is None else f.contents()

    n_embd, n_head = int(key(gguf.Keys.LLM.EMBEDDING_LENGTH)), int(key(gguf.Keys.Attention.HEAD_COUNT))
    n_head_kv = int(key(gguf.Keys.Attention.HEAD_COUNT_KV, n_head))
    hd_k = int(key(gguf.Keys.Attention.KEY_LENGTH, n_embd // n_head))
    hd_v = int(key(gguf.Keys.Attention.VALUE_LENGTH, n_embd // n_head))
    return {"arch": arch, "n_embd": n_embd, "n_layer": int(key(gguf.Keys.LLM.BLOCK_COUNT)),
            "out": {"q": n_head * hd_k, "k": n_head_kv * hd_k, "v": n_head_kv * hd_v, "o": n_embd}}


def _heads(delta_heads: str | tuple[str, ...] | list[str]) -> tuple[str, ...]:
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
    delta_heads: str = "q,o",
    update_mode: str = "standard",
    couple_lambda: bool = True,
    delta_o_rmsnorm: bool = False,
    layers: list[int] | None = None,
    seed: int = 0,
) -> dict[int, dict[str, np.ndarray]]:
    """Random non-zero δ-mem weights in upstream order: {layer: {upstream name: float32 array}}.

    Projections and δ heads N(0, 0.2), biases N(0, 0.5), δ_o norm weight 1 + 0.1·N(0, 1).
    One gate per state row (rank-wise gates).
    """
    shp = base_shapes(base_path)
    R, D = rank * state_heads, shp["n_embd"]
    rng = np.random.default_rng(seed)
    layers = list(range(shp["n_layer"])) if layers is None else sorted(layers)
    heads = _heads(delta_heads)
    out: dict[int, dict[str, np.ndarray]] = {}
    for bid in layers:
        lw = {f"memory_{n}_proj": rng.normal(0.0, 0.2, (R, D)) for n in "qkv"}
        lw["beta_proj"] = rng.normal(0.0, 0.2, (R, D))
        lw["beta_bias"] = rng.normal(0.0, 0.5, R)
        if S.uses_lambda_projection(update_mode, couple_lambda):
            lw["lambda_proj"] = rng.normal(0.0, 0.2, (R, D))
            lw["lambda_bias"] = rng.normal(0.0, 0.5, R)
        for h in heads:
            lw[f"delta_{h}_proj"] = rng.normal(0.0, 0.2, (shp["out"][h], R))
        if delta_o_rmsnorm:
            lw["delta_o_rmsnorm_weight"] = 1.0 + 0.1 * rng.normal(size=D)
        out[bid] = {k: v.astype(np.float32) for k, v in lw.items()}
    return out


def _add_adapter_kv(wr: gguf.GGUFWriter, cfg: dict[str, Any]) -> None:
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
    wr.add_string(S.KEY_SOURCE, "tests/ggufs.py (random)")


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
) -> Path:
    """Write upstream-order ``weights`` as a standalone adapter GGUF at ``path`` and/or a bundle.

    The active δ heads and delta_o_rmsnorm are taken from which tensors ``weights`` holds.
    ``dtype`` ("f32", "f16", "bf16") applies to 2-D tensors; 1-D ones stay f32.  With
    ``bundle_into`` a copy of the base GGUF plus the δ-mem keys and tensors is written
    there too.  Returns the bundle's path when one is written, else ``path``.
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
        "write_granularity": write_granularity, "layers": sorted(weights),
    }
    tensors = adapter_tensors(weights, rank, state_heads, update_mode, couple_lambda)
    if path is not None:
        wr = gguf.GGUFWriter(Path(path), shp["arch"])
        wr.add_type(S.GENERAL_TYPE_ADAPTER)
        wr.add_name("random δ-mem adapter")
        wr.add_string(S.KEY_ADAPTER_TYPE, S.ADAPTER_TYPE)
        _add_adapter_kv(wr, cfg)
        for name, arr in tensors.items():
            data, raw = _encode(arr, dtype)
            wr.add_tensor(name, data, raw_dtype=raw)
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
    _add_adapter_kv(wr, cfg)
    for t in r.tensors:
        wr.add_tensor(t.name, t.data, raw_dtype=t.tensor_type)
    for name, arr in tensors.items():
        data, raw = _encode(arr, dtype)
        wr.add_tensor(name, data, raw_dtype=raw)
    _finish(wr)


def write_random_adapter(
    path: str | Path | None,
    base_path: str | Path,
    *,
    rank: int = 4,
    state_heads: int = 1,
    delta_heads: str = "q,o",
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
        write_granularity=write_granularity,
    )


def write_unnormalized_qk_adapter(path: str | Path, base_path: str | Path, *, rank: int, seed: int = 2) -> Path:
    """A random adapter with normalize_qk=False: raw memory q/k.

    k is scaled down (×0.05) so that the delta rule stays contractive without the l2 norm; the
    one recipe for every test of the unnormalised path.
    """
    weights = random_adapter_weights(base_path, rank=rank, seed=seed)
    for w in weights.values():
        w["memory_k_proj"] *= 0.05
    return write_adapter(path, base_path, weights, rank=rank, normalize_qk=False)
