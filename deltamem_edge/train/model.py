"""The frozen base model and a trainable δ-mem, in torch, batched, for training on a CPU.

Why this module exists: ``deltamem-edge train`` needs gradients of the δ-mem
parameters through the frozen backbone and through the state writes, and the
runtime (llama.cpp) has no backward pass.  This is the same forward as
``deltamem_edge.reference`` (and so as the engine): the backbone is built from the
GGUF's own dequantized tensors in llama.cpp's layout (RoPE flavour per arch, the
llama q/k row order, tied output), and δ-mem follows deltamem-math.md §1.3-§1.9.
A test checks it against the numpy reference on random non-zero adapters.

Shapes: a batch of B token rows of length T, right-padded; ``write[b, t]`` says
whether token t of row b is written into the state (pads and read-only tokens are
not).  Every token reads the state from before itself (read-before-write), as in
the runtime, whether it writes or not.

δ-mem weights are kept in *upstream* row order (row ``h*rank + i`` is row i of
state head h) with δ_q/δ_k rows in the GGUF's q/k order; ``export`` turns them into
an upstream adapter folder (undoing the llama row permutation) for the converter.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from ..errors import ModelLoadError
from ..reference import HParams, RefModel

SUPPORTED_TRAIN_ARCHS = ("llama", "qwen2", "qwen3")
INITS = ("upstream", "tied")
UPDATE_MODES = ("standard", "no_lambda")  # the subset of gguf_schema.UPDATE_MODES the trainer builds


@dataclass(frozen=True)
class DeltaMemSpec:
    """What the trainer builds: the subset of upstream's config that training varies.

    Fixed choices (upstream's mainline): token write granularity, coupled λ = 1 − β,
    rank-wise gates, tanh + L2 on memory q/k.  ``update_mode`` is upstream's
    ``state_update_mode``: ``standard`` (every written token decays the whole state
    by 1 − β) or ``no_lambda`` (the plain delta rule: only the written key's
    direction is overwritten, the rest of the state is kept).
    """

    rank: int = 8
    state_heads: int = 1
    alpha: float = 16.0
    delta_heads: tuple[str, ...] = ("q", "o")
    beta_bias_init: float = -1.5
    online_gain: float = 0.05
    base_slice_width: int = 8
    init: str = "upstream"  # or "tied": see DeltaMem.__init__
    update_mode: str = "standard"  # or "no_lambda"
    query_gain: float | None = None  # tied init: initial size of the δ heads other than δ_o (None: online_gain)

    @property
    def R(self) -> int:
        return self.rank * self.state_heads

    @property
    def scale(self) -> float:
        return self.alpha / self.rank

    def to_upstream_config(self) -> dict:
        """The ``delta_mem_config.json`` our converter (and upstream) reads."""
        return {
            "rank": self.rank, "alpha": float(self.alpha), "beta_bias_init": float(self.beta_bias_init),
            "normalize_qk": True, "couple_lambda": True, "state_update_mode": self.update_mode, "rankwise_gates": True,
            "output_init": "base_slice_fixed", "base_slice_ref_width": self.base_slice_width,
            "online_gain": float(self.online_gain), "num_state_heads": self.state_heads,
            "memory_write_granularity": "token", "target_modules": ["self_attn"], "target_layers": [],
            "delta_heads": list(self.delta_heads), "delta_o_rmsnorm": False, "trainable_delta_scale": False,
        }


class FrozenBase(torch.nn.Module):
    """The backbone, frozen: weights from a GGUF (any quant type, dequantized to f32)."""

    def __init__(self, path: str | Path) -> None:
        super().__init__()
        hint = f"training supports the architectures {', '.join(SUPPORTED_TRAIN_ARCHS)}"
        try:
            ref = RefModel(path, dtype=np.float32)
        except NotImplementedError as e:  # an architecture or rope scaling the reference does not cover
            raise ModelLoadError(str(e), path=path, hint=hint) from e
        hp = ref.hp
        if hp.arch not in SUPPORTED_TRAIN_ARCHS:
            raise ModelLoadError(f"architecture {hp.arch!r} cannot be trained yet", path=path, hint=hint)
        self.hp: HParams = hp
        self.path = Path(path)
        self.tied = ref.w["output.weight"] is ref.w["token_embd.weight"]
        for name, arr in ref.w.items():
            if name == "output.weight" and self.tied:
                continue
            self.register_buffer(_buf(name), torch.from_numpy(np.array(arr, copy=True)), persistent=False)
        half = hp.n_rot // 2
        inv = hp.rope_base ** (-torch.arange(half, dtype=torch.float64) * 2.0 / hp.n_rot)
        ff = ref.get("rope_freqs.weight")
        if ff is not None:
            inv = inv / torch.from_numpy(np.asarray(ff, dtype=np.float64))
        self.register_buffer("rope_inv", inv * hp.rope_freq_scale, persistent=False)

    def w(self, name: str) -> torch.Tensor | None:
        if name == "output.weight" and self.tied:
            name = "token_embd.weight"
        return getattr(self, _buf(name), None)

    def rope(self, x: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        """x [B, T, heads, d], pos [B, T]: ggml_rope_ext without YaRN (see reference.rope)."""
        hp = self.hp
        ang = pos.to(torch.float64)[..., None] * self.rope_inv  # [B, T, half]
        cos, sin = (f(ang)[:, :, None, :].to(x.dtype) for f in (torch.cos, torch.sin))
        n = hp.n_rot
        if hp.rope_type == "norm":
            x0, x1 = x[..., 0:n:2], x[..., 1:n:2]
            rot = torch.stack((x0 * cos - x1 * sin, x0 * sin + x1 * cos), dim=-1).flatten(-2)
        else:
            x0, x1 = x[..., : n // 2], x[..., n // 2:n]
            rot = torch.cat((x0 * cos - x1 * sin, x0 * sin + x1 * cos), dim=-1)
        return torch.cat((rot, x[..., n:]), dim=-1) if n < x.shape[-1] else rot


def _buf(name: str) -> str:
    return "w_" + name.replace(".", "_")


def _rms_norm(x: torch.Tensor, w: torch.Tensor | None, eps: float) -> torch.Tensor:
    y = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)
    return y if w is None else y * w


def _causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float,
                      past: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
    """Causal GQA softmax attention, q [B, T, n_head, d], k/v [B, T, n_kv, d] -> [B, T, n_head, d_v].

    ``past`` = (k, v [B, Tp, n_kv, d], valid [B, Tp] bool): an earlier run's cache that every
    query also attends to where valid (a question asked in the told run itself).
    Written out (not SDPA): for the short episodes trained here the plain product is
    several times faster on a CPU, above all in the backward pass.
    """
    T = q.shape[1]
    mask = torch.ones(T, T, dtype=torch.bool, device=q.device).triu(1)[None, None]  # True: not attended
    if past is not None:
        pk, pv, valid = past
        k, v = torch.cat((pk.to(k.dtype), k), dim=1), torch.cat((pv.to(v.dtype), v), dim=1)
        hidden = (~valid)[:, None, None, :].expand(-1, 1, T, -1)
        mask = torch.cat((hidden, mask.expand(valid.shape[0], -1, -1, -1)), dim=-1)
    rep = q.shape[2] // k.shape[2]
    q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
    if rep > 1:
        k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
    scores = (q @ k.transpose(-1, -2)).to(torch.promote_types(q.dtype, torch.float32)) * scale
    probs = torch.softmax(scores.masked_fill(mask, float("-inf")), dim=-1).to(v.dtype)
    return (probs @ v).transpose(1, 2)


class DeltaMem(torch.nn.Module):
    """Trainable δ-mem weights for every layer, stacked: [n_layer, ...] per parameter."""

    def __init__(self, base: FrozenBase, spec: DeltaMemSpec, seed: int = 0) -> None:
        super().__init__()
        hp, R = base.hp, spec.R
        self.spec = spec
        L, D = hp.n_layer, hp.n_embd
        q_out, k_out = hp.n_head * hp.head_dim_k, hp.n_head_kv * hp.head_dim_k
        self.out_dims = {"q": q_out, "k": k_out, "v": hp.n_head_kv * hp.head_dim_v, "o": D}
        g = torch.Generator().manual_seed(seed)
        bound = 1.0 / math.sqrt(D)  # kaiming-uniform with a = sqrt(5), as nn.Linear and upstream use
        self.memory_qkv = torch.nn.Parameter((torch.rand(L, 3 * R, D, generator=g) * 2 - 1) * bound)
        self.beta_proj = torch.nn.Parameter(torch.zeros(L, R, D))
        self.beta_bias = torch.nn.Parameter(torch.full((L, R), float(spec.beta_bias_init)))
        if spec.init not in INITS:
            raise ValueError(f"unknown init {spec.init!r}")
        if spec.update_mode not in UPDATE_MODES:
            raise ValueError(f"unknown update mode {spec.update_mode!r}; the trainer supports {', '.join(UPDATE_MODES)}")
        if spec.init == "tied":  # memory keys start equal to queries: a token's read meets what was written
            with torch.no_grad():
                self.memory_qkv[:, R:2 * R] = self.memory_qkv[:, :R]
        self.delta = torch.nn.ParameterDict()
        base_names = {"q": "attn_q", "k": "attn_k", "v": "attn_v", "o": "attn_output"}
        for h in spec.delta_heads:
            w = torch.zeros(L, self.out_dims[h], R)
            width = min(spec.base_slice_width, spec.rank, R)
            for il in range(L):
                if spec.init == "tied" and h == "o":
                    # δ_o starts as the transpose of the value projection: reading a state written with
                    # token x adds (a projection of) x back into the residual stream, so the memory
                    # starts as a bag of the written tokens, a copy path that training then sharpens.
                    w[il] = F.normalize(self.memory_qkv[il, 2 * R:3 * R].detach().T, dim=0) * spec.online_gain
                    continue
                # upstream's base_slice_fixed: unit columns of the base weight, times the gain
                gain = spec.query_gain if spec.init == "tied" and spec.query_gain is not None else spec.online_gain
                src = base.w(f"blk.{il}.{base_names[h]}.weight")[:, :width]
                w[il, :, :width] = F.normalize(src, dim=0) * gain
            self.delta[h] = torch.nn.Parameter(w)

    def inputs(self, il: int, a: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """§1.3: q, k (tanh + L2 per head), v and β for attention input a [B, T, D]; each [B, T, H, r]."""
        spec = self.spec
        B, T = a.shape[:2]
        qkv = a @ self.memory_qkv[il].T
        q, k, v = (t.reshape(B, T, spec.state_heads, spec.rank) for t in qkv.split(spec.R, dim=-1))
        q = F.normalize(torch.tanh(q), dim=-1, eps=1e-6)
        k = F.normalize(torch.tanh(k), dim=-1, eps=1e-6)
        beta = torch.sigmoid(torch.clamp(a @ self.beta_proj[il].T + self.beta_bias[il], -20.0, 20.0))
        return q, k, v, beta.reshape(B, T, spec.state_heads, spec.rank)

    def outputs(self, il: int, reads: torch.Tensor) -> dict[str, torch.Tensor]:
        """§1.6: δ_h = reads · W_δhᵀ · alpha/rank; reads [B, T, R] head-major."""
        return {h: (reads @ w[il].T) * self.spec.scale for h, w in self.delta.items()}


def delta_scan(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, beta: torch.Tensor, write: torch.Tensor,
               S: torch.Tensor, decay: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """Read-before-write gated delta rule over T tokens for all rows and heads at once.

    q, k, v, beta [B, T, H, r]; write [B, T] (bool); S [B, H, r, r] (S[i, j]: i value row, j key).
    ``decay``: the standard update with λ = 1 − β; without it λ = 1 (``no_lambda``).
    A token that does not write leaves S as it is.  Returns (reads [B, T, H, r], S_T).
    """
    with torch.autocast(q.device.type, enabled=False):  # the recurrence in f32, as the engine runs it
        dt = torch.promote_types(torch.promote_types(S.dtype, k.dtype), torch.float32)
        q, k, v, beta, S = (t.to(dt) for t in (q, k, v, beta, S))
        w = write.to(q.dtype)[:, :, None, None]
        coef = beta * w  # β where the token writes, else 0
        keep = (1.0 - coef).unsqueeze(-1) if decay else None  # λ = 1 - β where it writes, else 1
        qk = torch.stack((q, k), dim=-1)  # [B, T, H, r, 2]: read and prediction in one product
        k_row = k.unsqueeze(-2)  # [B, T, H, 1, r]
        reads = []
        for t in range(q.shape[1]):
            both = S @ qk[:, t]  # [B, H, r, 2]
            reads.append(both[..., 0])
            S = (keep[:, t] * S if decay else S) + (coef[:, t] * (v[:, t] - both[..., 1])).unsqueeze(-1) * k_row[:, t]
        return torch.stack(reads, dim=1), S


class DeltaMemModel(torch.nn.Module):
    """Base + δ-mem: ``forward(ids, pos, write, S0)`` -> (final hidden [B, T, D], state).

    ``trace``, when given a list, receives each layer's memory (q, k, v, β), each
    [B, T, H, r], for the losses that supervise addressing (``addressing.py``).
    ``kv_out``, when given a list, receives each layer's attention keys and values (after
    RoPE); passed back as ``past`` with ``past_valid`` [B, Tp], a later call attends to
    them too, as one context continued (its ``pos`` must then go on from there).
    """

    def __init__(self, base: FrozenBase, mem: DeltaMem | None) -> None:
        super().__init__()
        self.base, self.mem = base, mem

    def empty_state(self, batch: int) -> torch.Tensor:
        spec, L = self.mem.spec, self.base.hp.n_layer
        return torch.zeros(batch, L, spec.state_heads, spec.rank, spec.rank, dtype=self.mem.memory_qkv.dtype)

    def forward(self, ids: torch.Tensor, pos: torch.Tensor, write: torch.Tensor,
                S0: torch.Tensor | None = None, trace: list | None = None, kv_out: list | None = None,
                past: list | None = None, past_valid: torch.Tensor | None = None,
                ) -> tuple[torch.Tensor, torch.Tensor | None]:
        base, hp = self.base, self.base.hp
        B, T = ids.shape
        x = base.w("token_embd.weight")[ids]
        states = []
        for il in range(hp.n_layer):
            p = f"blk.{il}."

            def linear(inp: torch.Tensor, name: str, p: str = p) -> torch.Tensor:
                y = inp @ base.w(p + name + ".weight").T
                b = base.w(p + name + ".bias")
                return y if b is None else y + b

            a = _rms_norm(x, base.w(p + "attn_norm.weight"), hp.norm_eps)
            q, k, v = linear(a, "attn_q"), linear(a, "attn_k"), linear(a, "attn_v")
            deltas: dict[str, torch.Tensor] = {}
            if self.mem is not None:
                mq, mk, mv, beta = self.mem.inputs(il, a)
                if trace is not None:
                    trace.append((mq, mk, mv, beta))
                S = S0[:, il] if S0 is not None else self.empty_state(B)[:, il]
                reads, S = delta_scan(mq, mk, mv, beta, write, S, decay=self.mem.spec.update_mode == "standard")
                states.append(S)
                deltas = self.mem.outputs(il, reads.reshape(B, T, self.mem.spec.R))
                q = q + deltas["q"] if "q" in deltas else q
                k = k + deltas["k"] if "k" in deltas else k
                v = v + deltas["v"] if "v" in deltas else v
            q = q.reshape(B, T, hp.n_head, hp.head_dim_k)
            k = k.reshape(B, T, hp.n_head_kv, hp.head_dim_k)
            v = v.reshape(B, T, hp.n_head_kv, hp.head_dim_v)
            if hp.qk_norm:
                q = _rms_norm(q, base.w(p + "attn_q_norm.weight"), hp.norm_eps)
                k = _rms_norm(k, base.w(p + "attn_k_norm.weight"), hp.norm_eps)
            if hp.use_rope[il]:
                q, k = base.rope(q, pos), base.rope(k, pos)
            if kv_out is not None:
                kv_out.append((k, v))
            attn = _causal_attention(q, k, v, hp.attn_scale,
                                     None if past is None else (past[il][0], past[il][1], past_valid))
            o = linear(attn.reshape(B, T, hp.n_head * hp.head_dim_v), "attn_output")
            if "o" in deltas:
                o = o + deltas["o"]
            x = x + o
            f = _rms_norm(x, base.w(p + "ffn_norm.weight"), hp.norm_eps)
            x = x + linear(F.silu(linear(f, "ffn_gate")) * linear(f, "ffn_up"), "ffn_down")
        state = torch.stack(states, dim=1) if states else None
        return _rms_norm(x, base.w("output_norm.weight"), hp.norm_eps), state

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        out = hidden @ self.base.w("output.weight").T
        b = self.base.w("output.bias")
        return out if b is None else out + b
