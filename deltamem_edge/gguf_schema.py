"""Names of the δ-mem GGUF keys and tensors, in one place.

Why a module of constants: the converter writes these names, the native loader
(``native/src/llama-dmem-loader.cpp``) and the numpy reference read them, and a typo in
one of three places would be a silent mismatch.  gguf-py keeps its keys the same
way (``gguf.constants.Keys``).  This module imports nothing of ours.  What values the
engine accepts (rank, state heads, layers, architectures) is ``supported.py``'s job.

Layout conventions (see ``docs/adapter-gguf.md`` for the full schema):

* ``R = rank * state_heads`` state rows per layer.
* Memory q/k rows are stored in upstream order: row ``h*rank + i`` is
  component ``i`` of state head ``h``.
* Everything indexed by a state *row* (memory v, β and λ gate rows, and the
  input columns of the δ heads) is stored in *GDN order*: upstream row
  ``h*rank + i`` sits at index ``i*state_heads + h``.  For one state head both
  orders are the same.  The engine maps each row onto one head of
  ``ggml_gated_delta_net``, whose key heads broadcast as ``head % H``; storing
  the rows pre-permuted costs nothing at run time.
* Scalar gates are expanded to one gate per row; trainable delta scales are
  folded into the δ-head weights; ``alpha / rank`` is applied by the engine.
"""

from __future__ import annotations

SCHEMA_VERSION = 1

GENERAL_TYPE_ADAPTER = "adapter"
ADAPTER_TYPE = "deltamem"

# general.* keys (gguf-py spells them the same way)
KEY_GENERAL_TYPE = "general.type"
KEY_GENERAL_ARCHITECTURE = "general.architecture"
KEY_GENERAL_NAME = "general.name"
KEY_ADAPTER_TYPE = "adapter.type"

_P = "adapter.deltamem."
KEY_VERSION = _P + "version"  # u32, SCHEMA_VERSION
KEY_RANK = _P + "rank"  # u32, r in 1..supported.MAX_RANK
KEY_STATE_HEADS = _P + "state_heads"  # u32, H in 1..supported.MAX_STATE_HEADS
KEY_ALPHA = _P + "alpha"  # f32, δ scale s = alpha / rank
KEY_UPDATE_MODE = _P + "update_mode"  # str, one of UPDATE_MODES
KEY_COUPLE_LAMBDA = _P + "couple_lambda"  # bool
KEY_NORMALIZE_QK = _P + "normalize_qk"  # bool
KEY_NORM_EPS = _P + "norm_eps"  # f32, l2-norm eps of memory q/k (1e-6)
KEY_GATE_CLAMP = _P + "gate_clamp"  # f32, clamp of gate pre-activations (20)
KEY_DELTA_HEADS = _P + "delta_heads"  # str, comma list from DELTA_HEADS
KEY_DELTA_O_RMSNORM = _P + "delta_o_rmsnorm"  # bool
KEY_DELTA_O_RMSNORM_EPS = _P + "delta_o_rmsnorm_eps"  # f32
KEY_WRITE_GRANULARITY = _P + "write_granularity"  # str, one of WRITE_GRANULARITIES
KEY_LAYERS = _P + "layers"  # u32 array, base layer indices carrying δ-mem
KEY_ROW_ORDER = _P + "row_order"  # str, always ROW_ORDER_GDN in version 1
KEY_SOURCE = _P + "source"  # str, free-form provenance (converter, upstream dir)

UPDATE_MODES = ("standard", "lambda_outside", "no_lambda")
DELTA_HEADS = ("q", "k", "v", "o")
WRITE_GRANULARITIES = ("token", "message_mean", "sentence_mean")  # index = enum llama_dmem_write_granularity
ROW_ORDER_GDN = "gdn"

DEFAULT_NORM_EPS = 1e-6
DEFAULT_GATE_CLAMP = 20.0

# Tensor names; ``{bid}`` is the base layer index, as in gguf-py's MODEL_TENSOR names.
TENSOR_IN = "blk.{bid}.dmem_in.weight"  # ne [n_embd, 4R or 5R]: q, k, v, beta(, lambda)
TENSOR_BETA_BIAS = "blk.{bid}.dmem_beta.bias"  # ne [R]
TENSOR_LAMBDA_BIAS = "blk.{bid}.dmem_lambda.bias"  # ne [R], only with a separate lambda
TENSOR_DELTA = {
    "q": "blk.{bid}.dmem_dq.weight",  # ne [R, n_head * head_dim]
    "k": "blk.{bid}.dmem_dk.weight",  # ne [R, n_head_kv * head_dim_k]
    "v": "blk.{bid}.dmem_dv.weight",  # ne [R, n_head_kv * head_dim_v]
    "o": "blk.{bid}.dmem_do.weight",  # ne [R, n_embd]
}
TENSOR_DO_NORM = "blk.{bid}.dmem_do_norm.weight"  # ne [n_embd]

TENSOR_MARKER = ".dmem_"  # every δ-mem tensor name contains this; the base loader skips them


def uses_lambda_projection(update_mode: str, couple_lambda: bool) -> bool:
    """True when the adapter carries its own λ projection (rows 4R..5R of dmem_in)."""
    return update_mode != "no_lambda" and not couple_lambda


def gdn_index(upstream_row: int, rank: int, state_heads: int) -> int:
    """Index in GDN order of upstream state row ``h*rank + i``."""
    h, i = divmod(upstream_row, rank)
    return i * state_heads + h


def gdn_permutation(rank: int, state_heads: int) -> list[int]:
    """``perm`` such that ``gdn_array = upstream_array[perm]`` along the row axis."""
    rows = rank * state_heads
    perm = [0] * rows
    for up in range(rows):
        perm[gdn_index(up, rank, state_heads)] = up
    return perm
