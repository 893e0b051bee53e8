"""A numpy oracle of the base model forward pass plus δ-mem, written to be read.

Why this module exists: the native engine runs δ-mem inside llama.cpp's graph, with
GDN-ordered rows, padded states and fused kernels.  Tests need an independent answer
to compare it with.  This module computes that answer the plain way, in float64 by
default, straight from ``/work/shared/design/deltamem-math.md`` (§1.3-§1.9):

* the backbone follows llama.cpp's own conventions for the archs we support
  (``llama``, ``qwen2``, ``qwen3``, ``smollm3``), so its logits match stock llama.cpp
  on the same GGUF (rope flavour per arch, NoPE layers, tied output, biases);
* the δ-mem math is written in *upstream* row order (row ``h*rank + i`` is row ``i``
  of state head ``h``); the GDN order of the adapter GGUF is undone at load time, so
  nothing here depends on how the engine lays the rows out.

Reading order: ``delta_scan`` (the recurrence) -> ``memory_inputs`` (projections and
gates) -> ``RefSession._layer`` (one decoder layer) -> ``RefSession.feed``.

Deliberate engine match: gate pre-activations (``x·W_β + b_β`` and ``x·W_λ + b_λ``)
are clamped to ±``gate_clamp`` before the sigmoid, exactly as the engine does (the
clamp keeps ggml's exp-based kernel from producing NaN for huge inputs).  Upstream has
no clamp, but σ(±20) is already 1.0/0.0 in fp32, so an fp32 upstream run cannot tell.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import gguf
import numpy as np
from gguf.quants import dequantize

from . import gguf_schema as S
from .supported import SUPPORTED_ARCHS

# llama.cpp's llama_model_rope_type(): llama and smollm3 rotate adjacent pairs (NORM; the
# HF->GGUF converter permutes their q/k rows to make that right), qwen2/qwen3 rotate the
# two halves of each head (NEOX, the HF rotate_half convention).
ROPE_TYPE = {"llama": "norm", "smollm3": "norm", "qwen2": "neox", "qwen3": "neox"}

# llama.cpp hard-codes SmolLM3's NoPE pattern (hparams.n_no_rope_layer_step = 4, no GGUF
# key): layer il skips RoPE when (il + 1) % 4 == 0.
SMOLLM3_NO_ROPE_STEP = 4

_MISSING = object()


# --------------------------------------------------------------------------------------
# GGUF helpers
# --------------------------------------------------------------------------------------


def _field(reader: gguf.GGUFReader, key: str, default: Any = _MISSING) -> Any:
    """Value of a metadata key (scalars, strings and arrays as Python values)."""
    f = reader.fields.get(key)
    if f is None:
        if default is _MISSING:
            raise KeyError(f"{key} missing from GGUF metadata")
        return default
    return f.contents()


def _tensor_array(t: Any, dtype: np.dtype) -> np.ndarray:
    """Dequantize one GGUF tensor to ``dtype`` in numpy order (ne reversed: [rows, cols])."""
    arr = dequantize(t.data, t.tensor_type)
    shape = tuple(int(n) for n in reversed(t.shape))  # t.shape is ggml ne order
    return np.asarray(arr, dtype=dtype).reshape(shape)


# --------------------------------------------------------------------------------------
# Small math helpers
# --------------------------------------------------------------------------------------


def rms_norm(x: np.ndarray, w: np.ndarray | None, eps: float) -> np.ndarray:
    """RMSNorm over the last axis, like ggml_rms_norm followed by a weight multiply."""
    y = x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps)
    return y if w is None else y * w


def l2n(u: np.ndarray, eps: float) -> np.ndarray:
    """u / max(||u||, eps) over the last axis (torch F.normalize, used by upstream)."""
    return u / np.maximum(np.linalg.norm(u, axis=-1, keepdims=True), eps)


def sigmoid(z: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-z))


def silu(z: np.ndarray) -> np.ndarray:
    return z * sigmoid(z)


def rope(x: np.ndarray, pos: np.ndarray, n_rot: int, base: float, freq_scale: float, kind: str,
         freq_factors: np.ndarray | None = None) -> np.ndarray:
    """Rotary embedding as ggml_rope_ext computes it without YaRN.

    x: [T, n_heads, head_dim]; pos: [T].  Only the first ``n_rot`` dims rotate.
    ``kind="norm"`` pairs dims (2i, 2i+1); ``kind="neox"`` pairs (i, i + n_rot/2).
    Pair i turns by pos·freq_scale·base^(-2i/n_rot) (divided by freq_factors[i] when the
    model ships rope_freqs, as Llama-3 GGUFs do).
    """
    half = n_rot // 2
    inv = base ** (-np.arange(half, dtype=np.float64) * 2.0 / n_rot)
    if freq_factors is not None:
        inv = inv / freq_factors
    ang = (pos.astype(np.float64)[:, None] * freq_scale) * inv[None, :]  # [T, half]
    cos = np.cos(ang)[:, None, :].astype(x.dtype)
    sin = np.sin(ang)[:, None, :].astype(x.dtype)
    out = x.copy()
    if kind == "norm":
        x0, x1 = x[..., 0:n_rot:2], x[..., 1:n_rot:2]
        out[..., 0:n_rot:2] = x0 * cos - x1 * sin
        out[..., 1:n_rot:2] = x0 * sin + x1 * cos
    elif kind == "neox":
        x0, x1 = x[..., :half], x[..., half:n_rot]
        out[..., :half] = x0 * cos - x1 * sin
        out[..., half:n_rot] = x0 * sin + x1 * cos
    else:
        raise ValueError(f"unknown rope kind {kind!r}")
    return out


# --------------------------------------------------------------------------------------
# The δ-mem recurrence (spec §1.5), one state head
# --------------------------------------------------------------------------------------


def delta_scan(q: np.ndarray, k: np.ndarray, v: np.ndarray, keep: np.ndarray, erase: np.ndarray,
               write: np.ndarray, S0: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Read-before-write gated delta scan of ONE state head over T tokens.

    Shapes: q, k [T, r] (key dim, already normalised); v, keep, erase, write [T, r]
    (value dim = state row, one gate per row); S0 [r, r] with S[i, j], i = value row,
    j = key column.  Returns ``(reads [T, r], S_T [r, r])``; S0 is not modified.

    Per token t (the read uses the state from before token t, §1.5):
        read_t = S q_t
        pred_t = S k_t
        S[i,j] <- keep_t[i]·S[i,j] - erase_t[i]·pred_t[i]·k_t[j] + write_t[i]·v_t[i]·k_t[j]
    """
    S = np.array(S0, copy=True)
    reads = np.empty(v.shape, dtype=np.result_type(S, q))
    for t in range(q.shape[0]):
        reads[t] = S @ q[t]
        pred = S @ k[t]
        S = keep[t][:, None] * S + ((write[t] * v[t] - erase[t] * pred)[:, None] * k[t][None, :])
    return reads, S


def delta_read(q: np.ndarray, S: np.ndarray) -> np.ndarray:
    """Write-disabled reads (§1.8): every token reads the same frozen state. q [T, r] -> [T, r]."""
    return q @ S.T


# --------------------------------------------------------------------------------------
# Base model
# --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class HParams:
    """Backbone hyper-parameters, resolved the way llama.cpp's loader resolves them."""

    arch: str
    n_embd: int
    n_layer: int
    n_head: int
    n_head_kv: int
    head_dim_k: int
    head_dim_v: int
    n_ff: int
    n_vocab: int
    norm_eps: float
    rope_base: float
    rope_freq_scale: float
    n_rot: int
    rope_type: str
    attn_scale: float
    use_rope: tuple[bool, ...]
    qk_norm: bool


def read_hparams(reader: gguf.GGUFReader, n_vocab: int) -> HParams:
    """Hyper-parameters from GGUF metadata, with llama.cpp's defaults (llama-model.cpp)."""
    arch = _field(reader, gguf.Keys.General.ARCHITECTURE)
    if arch not in SUPPORTED_ARCHS:
        raise NotImplementedError(f"architecture {arch!r} not supported (supported: {', '.join(SUPPORTED_ARCHS)})")

    def key(k: str, default: Any = _MISSING) -> Any:
        return _field(reader, k.format(arch=arch), default)

    n_embd = int(key(gguf.Keys.LLM.EMBEDDING_LENGTH))
    n_layer = int(key(gguf.Keys.LLM.BLOCK_COUNT))
    n_head = key(gguf.Keys.Attention.HEAD_COUNT)
    n_head_kv = key(gguf.Keys.Attention.HEAD_COUNT_KV, n_head)
    n_ff = key(gguf.Keys.LLM.FEED_FORWARD_LENGTH)
    if any(isinstance(v, list) for v in (n_head, n_head_kv, n_ff)):
        raise NotImplementedError("per-layer head counts / ffn sizes are not supported by the reference")
    n_head, n_head_kv, n_ff = int(n_head), int(n_head_kv), int(n_ff)
    head_dim_k = int(key(gguf.Keys.Attention.KEY_LENGTH, n_embd // n_head))
    head_dim_v = int(key(gguf.Keys.Attention.VALUE_LENGTH, n_embd // n_head))
    n_rot = int(key(gguf.Keys.Rope.DIMENSION_COUNT, head_dim_k))

    scaling = key(gguf.Keys.Rope.SCALING_TYPE, "linear")
    factor = float(key(gguf.Keys.Rope.SCALING_FACTOR, key("{arch}.rope.scale_linear", 0.0)))
    freq_scale = 1.0 if (factor == 0.0 or scaling == "none") else 1.0 / factor
    if scaling not in ("linear", "none") and freq_scale != 1.0:
        raise NotImplementedError(f"rope scaling {scaling!r} is not supported by the reference")

    # qwen2/qwen3 hard-code 1/sqrt(head_dim); llama/smollm3 honour attention.scale when set.
    attn_scale = 1.0 / float(np.sqrt(head_dim_k))
    if arch in ("llama", "smollm3"):
        attn_scale = float(key(gguf.Keys.Attention.SCALE, 0.0)) or attn_scale

    use_rope = tuple(
        not (arch == "smollm3" and (il + 1) % SMOLLM3_NO_ROPE_STEP == 0) for il in range(n_layer)
    )
    return HParams(
        arch=arch, n_embd=n_embd, n_layer=n_layer, n_head=n_head, n_head_kv=n_head_kv,
        head_dim_k=head_dim_k, head_dim_v=head_dim_v, n_ff=n_ff, n_vocab=n_vocab,
        norm_eps=float(key(gguf.Keys.Attention.LAYERNORM_RMS_EPS)),
        rope_base=float(key(gguf.Keys.Rope.FREQ_BASE, 10000.0)), rope_freq_scale=freq_scale,
        n_rot=n_rot, rope_type=ROPE_TYPE[arch], attn_scale=attn_scale, use_rope=use_rope,
        qk_norm=arch == "qwen3",
    )


class RefModel:
    """A base model GGUF, dequantized into numpy arrays (weights kept as [out, in]).

    δ-mem tensors of a bundle (names containing ``.dmem_``) are skipped here; load them
    with ``RefAdapter(path, model)``.
    """

    def __init__(self, path: str | Path, dtype: type = np.float64) -> None:
        self.path = Path(path)
        self.dtype = np.dtype(dtype)
        reader = gguf.GGUFReader(self.path)
        self.w: dict[str, np.ndarray] = {
            t.name: _tensor_array(t, self.dtype) for t in reader.tensors if S.TENSOR_MARKER not in t.name
        }
        self.hp = read_hparams(reader, n_vocab=self.w["token_embd.weight"].shape[0])
        if "output.weight" not in self.w:  # tied output, like llama.cpp's TENSOR_DUPLICATED fallback
            self.w["output.weight"] = self.w["token_embd.weight"]
        self._split_fused_qkv()
        self.has_bundled_adapter = S.KEY_VERSION in reader.fields

    def _split_fused_qkv(self) -> None:
        """Some GGUFs store attn_qkv; split it so the layer code sees attn_q/k/v only."""
        hp = self.hp
        sizes = [hp.n_head * hp.head_dim_k, hp.n_head_kv * hp.head_dim_k, hp.n_head_kv * hp.head_dim_v]
        for il in range(hp.n_layer):
            for kind in ("weight", "bias"):
                fused = self.w.pop(f"blk.{il}.attn_qkv.{kind}", None)
                if fused is not None:
                    q, k, v = np.split(fused, np.cumsum(sizes)[:2], axis=0)
                    for name, part in zip("qkv", (q, k, v), strict=True):
                        self.w[f"blk.{il}.attn_{name}.{kind}"] = part

    def get(self, name: str) -> np.ndarray | None:
        return self.w.get(name)

    def session(self, adapter: RefAdapter | None = None) -> RefSession:
        return RefSession(self, adapter)

    def forward(self, ids: list[int] | np.ndarray, adapter: RefAdapter | None = None) -> np.ndarray:
        """Logits [T, n_vocab] of a fresh session fed ``ids`` in one call."""
        return self.session(adapter).feed(ids)

    def bundled_adapter(self) -> RefAdapter | None:
        """The δ-mem adapter stored in this GGUF (a bundle), or None."""
        return RefAdapter(self.path, self) if self.has_bundled_adapter else None


# --------------------------------------------------------------------------------------
# δ-mem adapter
# --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class AdapterConfig:
    rank: int
    state_heads: int
    alpha: float
    update_mode: str
    couple_lambda: bool
    normalize_qk: bool
    norm_eps: float
    gate_clamp: float
    delta_heads: tuple[str, ...]
    delta_o_rmsnorm: bool
    delta_o_rmsnorm_eps: float
    write_granularity: str
    layers: tuple[int, ...]

    @property
    def R(self) -> int:  # the spec's name for rank * state_heads
        return self.rank * self.state_heads

    @property
    def scale(self) -> float:
        """δ scale s = alpha / rank (uses rank, not R; spec Q13)."""
        return self.alpha / self.rank


@dataclass
class DmemLayer:
    """One layer's δ-mem weights in UPSTREAM row order, named as upstream names them.

    memory_q/k/v_proj, beta_proj, lambda_proj: [R, n_embd]; beta_bias, lambda_bias: [R]
    (one gate per row, scalar gates already expanded); delta_{q,k,v,o}_proj: [out, R]
    (alpha/rank NOT folded in, trainable scales folded in); delta_o_rmsnorm_weight: [n_embd].
    Inactive δ heads are absent.
    """

    w: dict[str, np.ndarray] = field(default_factory=dict)


class RefAdapter:
    """A δ-mem adapter from a standalone adapter GGUF or from a bundle (model GGUF with δ-mem).

    Rows stored in GDN order (see gguf_schema) are put back into upstream order here.
    """

    def __init__(self, path: str | Path, model: RefModel | None = None, dtype: type | None = None) -> None:
        self.path = Path(path)
        dt = np.dtype(dtype or (model.dtype if model is not None else np.float64))
        reader = gguf.GGUFReader(self.path)
        gtype = _field(reader, S.KEY_GENERAL_TYPE, "model")
        if gtype == S.GENERAL_TYPE_ADAPTER:
            if _field(reader, S.KEY_ADAPTER_TYPE, None) != S.ADAPTER_TYPE:
                raise ValueError(f"{self.path}: adapter.type is not {S.ADAPTER_TYPE!r}")
        elif S.KEY_VERSION not in reader.fields:
            raise ValueError(f"{self.path}: neither a δ-mem adapter GGUF nor a bundle with δ-mem keys")
        self.arch = _field(reader, S.KEY_GENERAL_ARCHITECTURE)
        self.cfg = self._read_config(reader)
        tensors = {t.name: t for t in reader.tensors if S.TENSOR_MARKER in t.name}
        self.layers: dict[int, DmemLayer] = {
            bid: self._read_layer(tensors, bid, dt) for bid in self.cfg.layers
        }
        if model is not None:
            self.check_compatible(model)

    def _read_config(self, reader: gguf.GGUFReader) -> AdapterConfig:
        version = int(_field(reader, S.KEY_VERSION))
        if version != S.SCHEMA_VERSION:
            raise ValueError(f"{self.path}: δ-mem schema version {version}, expected {S.SCHEMA_VERSION}")
        order = _field(reader, S.KEY_ROW_ORDER, S.ROW_ORDER_GDN)
        if order != S.ROW_ORDER_GDN:
            raise ValueError(f"{self.path}: row order {order!r}, expected {S.ROW_ORDER_GDN!r}")
        heads = tuple(h for h in str(_field(reader, S.KEY_DELTA_HEADS)).split(",") if h.strip())
        cfg = AdapterConfig(
            rank=int(_field(reader, S.KEY_RANK)),
            state_heads=int(_field(reader, S.KEY_STATE_HEADS, 1)),
            alpha=float(_field(reader, S.KEY_ALPHA)),
            update_mode=str(_field(reader, S.KEY_UPDATE_MODE, "standard")),
            couple_lambda=bool(_field(reader, S.KEY_COUPLE_LAMBDA, True)),
            normalize_qk=bool(_field(reader, S.KEY_NORMALIZE_QK, True)),
            norm_eps=float(_field(reader, S.KEY_NORM_EPS, S.DEFAULT_NORM_EPS)),
            gate_clamp=float(_field(reader, S.KEY_GATE_CLAMP, S.DEFAULT_GATE_CLAMP)),
            delta_heads=tuple(h.strip() for h in heads),
            delta_o_rmsnorm=bool(_field(reader, S.KEY_DELTA_O_RMSNORM, False)),
            delta_o_rmsnorm_eps=float(_field(reader, S.KEY_DELTA_O_RMSNORM_EPS, 1e-6)),
            write_granularity=str(_field(reader, S.KEY_WRITE_GRANULARITY, "token")),
            layers=tuple(int(b) for b in _field(reader, S.KEY_LAYERS)),
        )
        if cfg.update_mode not in S.UPDATE_MODES:
            raise ValueError(f"{self.path}: unknown update mode {cfg.update_mode!r}")
        if not set(cfg.delta_heads) <= set(S.DELTA_HEADS):
            raise ValueError(f"{self.path}: unknown delta heads {cfg.delta_heads}")
        return cfg

    def _read_layer(self, tensors: dict[str, Any], bid: int, dt: np.dtype) -> DmemLayer:
        cfg, R = self.cfg, self.cfg.R
        inv = np.argsort(S.gdn_permutation(cfg.rank, cfg.state_heads))  # gdn -> upstream

        def get(name: str) -> np.ndarray | None:
            t = tensors.get(name.format(bid=bid))
            return None if t is None else _tensor_array(t, dt)

        w_in = get(S.TENSOR_IN)
        if w_in is None:
            raise ValueError(f"{self.path}: layer {bid} lists δ-mem but has no {S.TENSOR_IN.format(bid=bid)}")
        with_lambda = S.uses_lambda_projection(cfg.update_mode, cfg.couple_lambda)
        if w_in.shape[0] != (5 if with_lambda else 4) * R:
            raise ValueError(f"{self.path}: {S.TENSOR_IN.format(bid=bid)} has {w_in.shape[0]} rows, R={R}")
        blocks = np.split(w_in, w_in.shape[0] // R, axis=0)
        w: dict[str, np.ndarray] = {
            "memory_q_proj": blocks[0],  # q/k rows are stored in upstream order already
            "memory_k_proj": blocks[1],
            "memory_v_proj": blocks[2][inv],
            "beta_proj": blocks[3][inv],
            "beta_bias": get(S.TENSOR_BETA_BIAS)[inv],
        }
        if with_lambda:
            w["lambda_proj"] = blocks[4][inv]
            w["lambda_bias"] = get(S.TENSOR_LAMBDA_BIAS)[inv]
        for h in cfg.delta_heads:
            d = get(S.TENSOR_DELTA[h])
            if d is None:
                name = S.TENSOR_DELTA[h].format(bid=bid)
                raise ValueError(f"{self.path}: delta head {h!r} listed but {name} missing")
            w[f"delta_{h}_proj"] = d[:, inv]  # input columns are state rows
        if cfg.delta_o_rmsnorm:
            w["delta_o_rmsnorm_weight"] = get(S.TENSOR_DO_NORM)
        return DmemLayer(w)

    def check_compatible(self, model: RefModel) -> None:
        """Raise if the adapter's shapes or architecture do not fit ``model``."""
        hp = model.hp
        if self.arch != hp.arch:
            raise ValueError(f"{self.path}: adapter is for {self.arch!r}, model is {hp.arch!r}")
        out = {"q": hp.n_head * hp.head_dim_k, "k": hp.n_head_kv * hp.head_dim_k,
               "v": hp.n_head_kv * hp.head_dim_v, "o": hp.n_embd}
        for bid, layer in self.layers.items():
            if not 0 <= bid < hp.n_layer:
                raise ValueError(f"{self.path}: δ-mem layer {bid} outside the model's {hp.n_layer} layers")
            n_in = layer.w["memory_q_proj"].shape[1]
            if n_in != hp.n_embd:
                raise ValueError(f"{self.path}: layer {bid} projections expect n_embd={n_in}, model has {hp.n_embd}")
            for h in self.cfg.delta_heads:
                shape, want = layer.w[f"delta_{h}_proj"].shape, (out[h], self.cfg.R)
                if shape != want:
                    raise ValueError(f"{self.path}: layer {bid} delta_{h} has shape {shape}, want {want}")


# --------------------------------------------------------------------------------------
# δ-mem per layer (spec §1.3, §1.4, §1.6)
# --------------------------------------------------------------------------------------


@dataclass
class MemoryInputs:
    """Per-token scan inputs, each [T, H, r] in upstream head order."""

    q: np.ndarray
    k: np.ndarray
    v: np.ndarray
    keep: np.ndarray
    erase: np.ndarray
    write: np.ndarray
    beta: np.ndarray
    lam: np.ndarray


def memory_inputs(x: np.ndarray, w: dict[str, np.ndarray], cfg: AdapterConfig) -> MemoryInputs:
    """§1.3/§1.4: memory q/k/v and the per-row keep/erase/write gates from x [T, n_embd]."""
    T, H, r = x.shape[0], cfg.state_heads, cfg.rank

    def heads(a: np.ndarray) -> np.ndarray:
        return a.reshape(T, H, r)

    q, k, v = (heads(x @ w[f"memory_{n}_proj"].T) for n in "qkv")
    if cfg.normalize_qk:
        q, k = l2n(np.tanh(q), cfg.norm_eps), l2n(np.tanh(k), cfg.norm_eps)
    c = cfg.gate_clamp
    beta = heads(sigmoid(np.clip(x @ w["beta_proj"].T + w["beta_bias"], -c, c)))
    if cfg.update_mode == "no_lambda":
        lam = np.ones_like(beta)
    elif cfg.couple_lambda:
        lam = 1.0 - beta
    else:
        lam = heads(sigmoid(np.clip(x @ w["lambda_proj"].T + w["lambda_bias"], -c, c)))
    if cfg.update_mode == "standard":
        keep, erase, write = lam, beta, beta
    elif cfg.update_mode == "lambda_outside":
        keep, erase, write = lam, lam * beta, beta
    else:  # no_lambda
        keep, erase, write = np.ones_like(beta), beta, beta
    return MemoryInputs(q=q, k=k, v=v, keep=keep, erase=erase, write=write, beta=beta, lam=lam)


def delta_outputs(reads: np.ndarray, w: dict[str, np.ndarray], cfg: AdapterConfig) -> dict[str, np.ndarray]:
    """§1.6: δ_h = (reads · W_δhᵀ) · alpha/rank for each active head h; reads [T, R] head-major.

    With delta_o_rmsnorm, δ_o is RMS-normalised afterwards (which cancels the scale).
    """
    out = {h: (reads @ w[f"delta_{h}_proj"].T) * cfg.scale for h in cfg.delta_heads}
    if cfg.delta_o_rmsnorm and "o" in out:
        out["o"] = rms_norm(out["o"], w["delta_o_rmsnorm_weight"], cfg.delta_o_rmsnorm_eps)
    return out


# --------------------------------------------------------------------------------------
# Session: KV cache + δ-state, fed in chunks
# --------------------------------------------------------------------------------------


class RefSession:
    """Incremental forward pass: a KV cache and the δ-mem state persist across ``feed`` calls."""

    def __init__(self, model: RefModel, adapter: RefAdapter | None = None) -> None:
        if adapter is not None:
            adapter.check_compatible(model)
        self.model, self.adapter = model, adapter
        self._message_ids: np.ndarray | None = None
        self.reset()

    # ---- state management ------------------------------------------------------------

    def reset(self) -> None:
        """Forget everything: empty KV cache, zero δ-state."""
        hp = self.model.hp
        self.n_past = 0
        self.k_cache = [np.zeros((0, hp.n_head_kv, hp.head_dim_k), self.model.dtype) for _ in range(hp.n_layer)]
        self.v_cache = [np.zeros((0, hp.n_head_kv, hp.head_dim_v), self.model.dtype) for _ in range(hp.n_layer)]
        self.reset_state()

    def reset_state(self) -> None:
        """Zero the δ-state only (the KV cache stays)."""
        if self.adapter is None:
            self._S = np.zeros((0, 0, 0, 0), self.model.dtype)
            return
        cfg = self.adapter.cfg
        self._S = np.zeros((len(cfg.layers), cfg.state_heads, cfg.rank, cfg.rank), self.model.dtype)

    def state(self) -> np.ndarray:
        """δ-state copy, [n_dmem_layers, H*r, r], upstream order: row h*r+i is row i of head h."""
        L, H, r, _ = self._S.shape
        return self._S.reshape(L, H * r, r).copy()

    def set_state(self, arr: np.ndarray) -> None:
        L, H, r, _ = self._S.shape
        arr = np.asarray(arr, dtype=self.model.dtype)
        if arr.shape != (L, H * r, r):
            raise ValueError(f"state shape {arr.shape}, expected {(L, H * r, r)}")
        self._S = arr.reshape(L, H, r, r).copy()

    # ---- forward -----------------------------------------------------------------------

    def feed(self, ids: list[int] | np.ndarray, write: bool = True, trace: dict | None = None,
             message_ids: list[int] | np.ndarray | None = None) -> np.ndarray:
        """Run ``ids`` after everything fed so far (one upstream forward call); return logits [len(ids), n_vocab].

        ``write=False`` reads the frozen δ-state and leaves it unchanged (§1.8).  Pass a
        dict as ``trace`` to receive per-layer intermediates (keys ``"{il}.name"``).
        ``message_ids`` (SSW adapters, §1.11): one id per token, -1 = not written.
        """
        m, hp = self.model, self.model.hp
        ids = np.asarray(ids, dtype=np.int64).reshape(-1)
        self._message_ids = None if message_ids is None else np.asarray(message_ids, dtype=np.int64).reshape(-1)
        if self._message_ids is not None and len(self._message_ids) != len(ids):
            raise ValueError("message_ids must have one id per token")
        pos = self.n_past + np.arange(len(ids))
        x = m.w["token_embd.weight"][ids]
        for il in range(hp.n_layer):
            x = self._layer(il, x, pos, write, trace)
        x = rms_norm(x, m.w["output_norm.weight"], hp.norm_eps)
        logits = x @ m.w["output.weight"].T
        if m.get("output.bias") is not None:
            logits = logits + m.w["output.bias"]
        self.n_past += len(ids)
        return logits

    def _memory(self, il: int, a: np.ndarray, write: bool, trace: dict | None) -> dict[str, np.ndarray]:
        """δ-mem of layer il from its attention input a [T, n_embd]; updates the state."""
        cfg = self.adapter.cfg
        w = self.adapter.layers[il].w
        slot = cfg.layers.index(il)
        mi = memory_inputs(a, w, cfg)
        reads = np.empty_like(mi.v)
        segments = self._segments()
        if write and segments:
            return self._memory_segments(il, a, mi, segments, trace)
        for h in range(cfg.state_heads):
            if write:
                reads[:, h], self._S[slot, h] = delta_scan(
                    mi.q[:, h], mi.k[:, h], mi.v[:, h], mi.keep[:, h], mi.erase[:, h], mi.write[:, h], self._S[slot, h]
                )
            else:
                reads[:, h] = delta_read(mi.q[:, h], self._S[slot, h])
        reads = reads.reshape(len(a), cfg.R)  # head-major: column h*r + i
        deltas = delta_outputs(reads, w, cfg)
        if trace is not None:
            for name in ("q", "k", "v", "keep", "erase", "write", "beta", "lam"):
                trace[f"{il}.mem_{name}"] = getattr(mi, name).reshape(len(a), cfg.R)
            trace[f"{il}.reads"] = reads
            for h, d in deltas.items():
                trace[f"{il}.delta_{h}"] = d
        return deltas

    def _segments(self) -> list[np.ndarray]:
        """SSW (§1.11): token indices of each active message of this call, ids ascending.

        Empty (= ordinary per-token writes) for token-granularity adapters, without ids, or
        when no token of the call has an id >= 0 (upstream's silent fallback, §8 Q4).
        """
        ids = self._message_ids
        if self.adapter.cfg.write_granularity == "token" or ids is None:
            return []
        return [np.flatnonzero(ids == m) for m in np.unique(ids[ids >= 0])]

    def _memory_segments(self, il: int, a: np.ndarray, mi: MemoryInputs, segments: list[np.ndarray],
                         trace: dict | None) -> dict[str, np.ndarray]:
        """SSW write: every token reads the call-start state; then one write per message, from the
        mean of its tokens' attention inputs, in ascending id order."""
        cfg = self.adapter.cfg
        w = self.adapter.layers[il].w
        slot = cfg.layers.index(il)
        means = np.stack([a[idx].mean(axis=0) for idx in segments])
        ms = memory_inputs(means, w, cfg)
        reads = np.empty_like(mi.v)
        for h in range(cfg.state_heads):
            S0 = self._S[slot, h]
            reads[:, h] = delta_read(mi.q[:, h], S0)
            _, self._S[slot, h] = delta_scan(ms.q[:, h], ms.k[:, h], ms.v[:, h], ms.keep[:, h], ms.erase[:, h],
                                            ms.write[:, h], S0)
        reads = reads.reshape(len(a), cfg.R)
        deltas = delta_outputs(reads, w, cfg)
        if trace is not None:
            trace[f"{il}.reads"] = reads
        return deltas

    def _layer(self, il: int, x: np.ndarray, pos: np.ndarray, write: bool, trace: dict | None) -> np.ndarray:
        """One decoder block: attention (with δ-mem injected) and SwiGLU FFN, pre-norm residuals."""
        m, hp = self.model, self.model.hp
        p = f"blk.{il}."
        T = len(x)

        def linear(inp: np.ndarray, name: str) -> np.ndarray:
            y = inp @ m.w[p + name + ".weight"].T
            b = m.get(p + name + ".bias")
            return y if b is None else y + b

        a = rms_norm(x, m.w[p + "attn_norm.weight"], hp.norm_eps)
        q, k, v = linear(a, "attn_q"), linear(a, "attn_k"), linear(a, "attn_v")
        deltas: dict[str, np.ndarray] = {}
        if self.adapter is not None and il in self.adapter.layers:
            deltas = self._memory(il, a, write, trace)
            # δ_q/δ_k/δ_v join the raw projections: after the bias, before q/k-norm and RoPE (§1.6)
            q = q + deltas.get("q", 0.0)
            k = k + deltas.get("k", 0.0)
            v = v + deltas.get("v", 0.0)
        q = q.reshape(T, hp.n_head, hp.head_dim_k)
        k = k.reshape(T, hp.n_head_kv, hp.head_dim_k)
        v = v.reshape(T, hp.n_head_kv, hp.head_dim_v)
        if hp.qk_norm:
            q = rms_norm(q, m.w[p + "attn_q_norm.weight"], hp.norm_eps)
            k = rms_norm(k, m.w[p + "attn_k_norm.weight"], hp.norm_eps)
        if hp.use_rope[il]:
            ff = m.get("rope_freqs.weight")
            q = rope(q, pos, hp.n_rot, hp.rope_base, hp.rope_freq_scale, hp.rope_type, ff)
            k = rope(k, pos, hp.n_rot, hp.rope_base, hp.rope_freq_scale, hp.rope_type, ff)
        self.k_cache[il] = np.concatenate([self.k_cache[il], k])
        self.v_cache[il] = np.concatenate([self.v_cache[il], v])
        attn = attention(q, self.k_cache[il], self.v_cache[il], self.n_past, hp.attn_scale)
        o = linear(attn.reshape(T, hp.n_head * hp.head_dim_v), "attn_output")
        if "o" in deltas:
            o = o + deltas["o"]  # after wo, before the residual add
        if trace is not None:
            trace[f"{il}.attn_in"] = a
            trace[f"{il}.attn_out"] = o
        x = x + o

        f = rms_norm(x, m.w[p + "ffn_norm.weight"], hp.norm_eps)
        return x + linear(silu(linear(f, "ffn_gate")) * linear(f, "ffn_up"), "ffn_down")


def attention(q: np.ndarray, k: np.ndarray, v: np.ndarray, n_past: int, scale: float) -> np.ndarray:
    """Causal GQA softmax attention.  q [T, n_head, d]; k, v [n_past+T, n_head_kv, d] -> [T, n_head, d_v].

    Query head h uses kv head h // (n_head / n_head_kv), as ggml's mul_mat broadcast does.
    """
    T, n_head = q.shape[:2]
    rep = n_head // k.shape[1]
    k, v = np.repeat(k, rep, axis=1), np.repeat(v, rep, axis=1)
    s = np.einsum("thd,shd->hts", q, k) * scale
    allowed = np.arange(k.shape[0])[None, :] <= (n_past + np.arange(T))[:, None]  # [T, S]
    s = np.where(allowed[None], s, -np.inf)
    s = np.exp(s - s.max(-1, keepdims=True))
    s /= s.sum(-1, keepdims=True)
    return np.einsum("hts,shd->thd", s, v)
