"""The base model GGUF as the adapter sees it: its shapes, the check against them, and its q/k row layout.

Its one job is everything the adapter must agree with in a stock llama.cpp base model:
reading the shape hyperparameters from the GGUF header (``BaseModelInfo``), listing
every way converted tensors do not fit them (``check_against_base``), and the one
fix-up the base's layout needs.  llama.cpp's ``convert_hf_to_gguf`` permutes the rows
of the q and k projections of llama-family models (``llama``, ``smollm3``) so that its
adjacent-pair RoPE sees the pairs HF's ``rotate_half`` rotates.  Upstream adds δ_q/δ_k
to the HF-order q/k outputs, so the rows of the δ_q and δ_k heads get the same
permutation (``apply_base_layout``); qwen2/qwen3 keep HF order and need nothing.
It is separate from the weight math (``adapter_tensors``) because that needs no base
model, and the fine-tune exporter (``deltamem_edge.train.export``) uses the same
permutation in reverse.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from deltamem_edge import gguf_schema as S
from deltamem_edge.errors import AdapterError
from deltamem_edge.gguf_header import GGUFHeader, read_gguf_header
from deltamem_edge.supported import SUPPORTED_ARCHS

# Archs whose q/k projection rows convert_hf_to_gguf permutes (LlamaModel.permute; SmolLM3Model inherits it).
ROPE_PERMUTED_ARCHS = ("llama", "smollm3")
ROPE_PERMUTED_NOTE = "δ_q/δ_k rows permuted like convert_hf_to_gguf's llama q/k"


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


def open_base_gguf(path: Path, *, full: bool = False) -> GGUFHeader:
    """The base model's GGUF header (fast reader); ``full`` also decodes the long tokenizer arrays."""
    if not path.exists():
        raise AdapterError("base model file not found", path=path)
    return read_gguf_header(path, max_array=None if full else 4096)


def header_field(header: GGUFHeader, key: str, path: Path, default: Any = None) -> Any:
    """``header``'s value for ``key``; without a ``default`` a missing key is an error naming it."""
    value = header.fields.get(key)
    if value is None:
        if default is None:
            raise AdapterError(f"base model has no {key} key", path=path, hint="is this a llama.cpp model GGUF?")
        return default
    return value


def _per_layer(value: Any, n_layer: int, key: str, path: Path) -> tuple[int, ...]:
    """One value per layer: GGUF stores a head count as a scalar, or as an array where layers differ."""
    if isinstance(value, list):
        if len(value) != n_layer or not all(isinstance(v, int) for v in value):
            raise AdapterError(f"{key} is an array of {len(value)} values for {n_layer} layers", path=path)
        return tuple(value)
    if not isinstance(value, int) or value <= 0:
        raise AdapterError(f"{key} is {value!r:.40}", path=path)
    return (value,) * n_layer


def base_model_info(header: GGUFHeader, path: Path) -> BaseModelInfo:
    """Read the shape hyperparameters from a base GGUF header (``read_gguf_header``)."""
    general_type = header_field(header, S.KEY_GENERAL_TYPE, path, default="model")
    if general_type == S.GENERAL_TYPE_ADAPTER:
        raise AdapterError("this GGUF is an adapter, not a base model", path=path, hint="pass the base model file")
    arch = header_field(header, S.KEY_GENERAL_ARCHITECTURE, path)
    if arch not in SUPPORTED_ARCHS:
        raise AdapterError(
            f"architecture {arch!r} is not supported by δ-mem",
            path=path,
            hint=f"supported: {', '.join(SUPPORTED_ARCHS)}",
        )
    n_layer = header_field(header, f"{arch}.block_count", path)
    n_embd = header_field(header, f"{arch}.embedding_length", path)
    if not isinstance(n_layer, int) or not isinstance(n_embd, int) or n_layer <= 0 or n_embd <= 0:
        raise AdapterError(f"invalid block_count {n_layer!r:.20} or embedding_length {n_embd!r:.20}", path=path)
    n_head = _per_layer(header_field(header, f"{arch}.attention.head_count", path), n_layer, "head_count", path)
    kv = header_field(header, f"{arch}.attention.head_count_kv", path, default=list(n_head))
    n_head_kv = _per_layer(kv, n_layer, "head_count_kv", path)
    default_dim = n_embd // n_head[0] if n_head[0] else 0
    head_dim_k = header_field(header, f"{arch}.attention.key_length", path, default=default_dim)
    head_dim_v = header_field(header, f"{arch}.attention.value_length", path, default=default_dim)
    return BaseModelInfo(path, arch, n_layer, n_embd, n_head, n_head_kv, int(head_dim_k), int(head_dim_v))


def read_base_model(path: str | Path) -> BaseModelInfo:
    """``base_model_info`` for a file path."""
    path = Path(path)
    return base_model_info(open_base_gguf(path), path)


def _fmt_layers(ils: list[int]) -> str:
    """``layers 0-35`` for a run, else the list: an error about every layer stays one short line."""
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
