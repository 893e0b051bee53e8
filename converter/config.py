"""Upstream ``delta_mem_config.json`` → a validated, frozen ``DeltaMemConfig``.

Why not mirror upstream's dataclass: upstream raises on unknown keys, while the
released config is a subset of its fields (design §3.2, §8 Q10).  We keep only
the fields that change the forward pass, fill missing ones with upstream's
defaults, warn once about keys we do not know, and refuse values that upstream
would refuse or that our runtime cannot honour — before any tensor is read.
"""

from __future__ import annotations

import json
import math
import warnings
from collections.abc import Mapping
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from deltamem_edge import gguf_schema as S
from deltamem_edge.errors import ConversionError
from deltamem_edge.supported import MAX_RANK, MAX_STATE_HEADS

CONFIG_FILENAME = "delta_mem_config.json"
MAX_CONFIG_BYTES = 1 << 20

SCALE_GRANULARITIES = ("layer", "head")

# Fields read only at training/initialisation time: accepted, not kept.
_INIT_ONLY = {
    "beta_bias_init",
    "output_init",
    "base_slice_ref_width",
    "online_gain",
    "delta_scale_init",
    "delta_scale_parameterization",
    "memory_readout_mode",
    "memory_write_source",
}

# Archived options (§3.2 second table): upstream validation forces these values.
_ARCHIVED_FORCED: dict[str, Any] = {
    "num_memory_partitions": 1,
    "num_global_memory_partitions": 0,
    "memory_partition_routing": "soft",
    "memory_partition_basis": "shared",
    "tie_memory_partition_read_write": False,
    "memory_partition_read_mode": "softmax",
    "slot_read_top_k": 0,
    "global_memory_mode": "shared_rw",
    "global_memory_read_top_k": 0,
    "global_memory_merge_mode": "gated_residual",
    "memory_reader_layers": [],
    "memory_write_proposals_per_message": 2,
    "synthetic_memory_slots": 1,
    "latent_memory_layers": [],
}
# Archived options with no effect and no forced value ("free").
_ARCHIVED_FREE = {
    "memory_partition_sigmoid_gate_bias_init",
    "global_memory_gate_bias_init",
    "global_memory_read_logit_bias",
    "memory_reader_hidden_size",
    "memory_reader_residual_scale",
    "memory_reader_read_only",
    "latent_memory_hidden_size",
    "latent_memory_residual_scale",
    "latent_memory_slots",
    "latent_memory_init_std",
    "latent_gate_init",
}


@dataclass(frozen=True)
class DeltaMemConfig:
    """The inference-relevant upstream config fields (design §3.2, ★ rows), with upstream defaults."""

    rank: int = 8
    alpha: float = 16.0
    normalize_qk: bool = True
    couple_lambda: bool = True
    state_update_mode: str = "standard"
    rankwise_gates: bool = True
    num_state_heads: int = 1
    memory_write_granularity: str = "token"
    target_modules: tuple[str, ...] = ("self_attn",)
    target_layers: tuple[int, ...] = ()
    delta_heads: tuple[str, ...] = ("q", "k", "v", "o")
    delta_o_rmsnorm: bool = False
    delta_o_rmsnorm_eps: float = 1e-6
    trainable_delta_scale: bool = False
    delta_scale_max: float = 2.0
    delta_scale_granularity: str = "layer"

    @property
    def state_dim(self) -> int:
        """R = rank · state heads: rows of memory q/k/v and input width of the δ heads."""
        return self.rank * self.num_state_heads

    @property
    def gate_dim(self) -> int:
        """G: rows of beta_proj/lambda_proj upstream (one per row if rank-wise, else one per state head)."""
        return self.state_dim if self.rankwise_gates else self.num_state_heads

    @property
    def delta_scaling(self) -> float:
        """s = alpha / rank (upstream uses rank, not R)."""
        return self.alpha / self.rank


_FIELDS = {f.name for f in fields(DeltaMemConfig)}
_KNOWN = _FIELDS | _INIT_ONLY | set(_ARCHIVED_FORCED) | _ARCHIVED_FREE


def parse_delta_heads(value: Any, *, path: Path | None = None) -> tuple[str, ...]:
    """Upstream accepts a list or a comma string; "none" (or empty) means no heads.  Returns canonical q,k,v,o order."""
    if isinstance(value, str):
        items = [] if value.strip().lower() in ("", "none") else [p.strip() for p in value.split(",")]
    elif isinstance(value, (list, tuple)) and all(isinstance(p, str) for p in value):
        items = [p.strip() for p in value]
    else:
        raise ConversionError(f"delta_heads must be a list or a comma string, got {value!r:.60}", path=path)
    unknown = [p for p in items if p not in S.DELTA_HEADS]
    if unknown:
        raise ConversionError(
            f"unknown delta head(s) {', '.join(repr(u) for u in unknown)} in delta_heads",
            path=path,
            hint=f"allowed: {', '.join(S.DELTA_HEADS)} (or 'none')",
        )
    if len(set(items)) != len(items):
        raise ConversionError(f"delta_heads lists a head twice: {items}", path=path)
    return tuple(h for h in S.DELTA_HEADS if h in items)


def _err(path: Path | None, msg: str, hint: str | None = None) -> ConversionError:
    return ConversionError(f"config: {msg}", path=path, hint=hint)


def _int(data: Mapping[str, Any], key: str, default: int, path: Path | None) -> int:
    v = data.get(key, default)
    if not isinstance(v, int) or isinstance(v, bool):
        raise _err(path, f"{key} must be an integer, got {v!r:.40}")
    return v


def _float(data: Mapping[str, Any], key: str, default: float, path: Path | None) -> float:
    v = data.get(key, default)
    if not isinstance(v, (int, float)) or isinstance(v, bool) or not math.isfinite(v):
        raise _err(path, f"{key} must be a finite number, got {v!r:.40}")
    return float(v)


def _bool(data: Mapping[str, Any], key: str, default: bool, path: Path | None) -> bool:
    v = data.get(key, default)
    if not isinstance(v, bool):
        raise _err(path, f"{key} must be true or false, got {v!r:.40}")
    return v


def _choice(data: Mapping[str, Any], key: str, default: str, allowed: tuple[str, ...], path: Path | None) -> str:
    v = data.get(key, default)
    if v not in allowed:
        raise _err(path, f"{key} is {v!r:.40}; allowed: {', '.join(allowed)}")
    return v


def config_from_dict(data: Mapping[str, Any], *, path: str | Path | None = None) -> DeltaMemConfig:
    """Validate an upstream config mapping.  ``path`` only names the file in errors and warnings."""
    p = None if path is None else Path(path)
    if not isinstance(data, Mapping):
        raise _err(p, "the JSON top level must be an object")

    unknown = sorted(k for k in data if k not in _KNOWN)
    if unknown:
        where = f"{p}: " if p is not None else ""
        warnings.warn(f"{where}ignoring unknown δ-mem config field(s): {', '.join(unknown)}", stacklevel=2)

    for key, forced in _ARCHIVED_FORCED.items():
        value = data.get(key, forced)
        if isinstance(forced, list) and isinstance(value, tuple):
            value = list(value)
        if value != forced or type(value) is not type(forced):
            raise _err(p, f"archived option {key} is {data[key]!r:.60}; only {forced!r} is supported (as upstream)")

    rank = _int(data, "rank", 8, p)
    if not 1 <= rank <= MAX_RANK:
        raise _err(p, f"rank is {rank}; it must be between 1 and {MAX_RANK}", f"the engine pads state rows to {MAX_RANK}")
    alpha = _float(data, "alpha", 16.0, p)
    if alpha <= 0:
        raise _err(p, f"alpha is {alpha}; it must be > 0")
    heads = _int(data, "num_state_heads", 1, p)
    if not 1 <= heads <= MAX_STATE_HEADS:
        raise _err(p, f"num_state_heads is {heads}; it must be between 1 and {MAX_STATE_HEADS}",
                   f"the engine loads at most {MAX_STATE_HEADS} state heads")
    eps = _float(data, "delta_o_rmsnorm_eps", 1e-6, p)
    if eps <= 0:
        raise _err(p, f"delta_o_rmsnorm_eps is {eps}; it must be > 0")

    for key, only in (("memory_readout_mode", "delta"), ("memory_write_source", "learned_hidden")):
        _choice(data, key, only, (only,), p)
    _choice(data, "delta_scale_parameterization", "alpha_over_rank", ("alpha_over_rank",), p)

    trainable = _bool(data, "trainable_delta_scale", False, p)
    scale_max = _float(data, "delta_scale_max", 2.0, p)
    if trainable and scale_max <= 0:
        raise _err(p, f"delta_scale_max is {scale_max}; it must be > 0 with trainable_delta_scale")

    modules = data.get("target_modules", ["self_attn"])
    if isinstance(modules, str):
        modules = [m.strip() for m in modules.split(",")]
    if not isinstance(modules, (list, tuple)) or list(modules) != ["self_attn"]:
        raise _err(p, f"target_modules is {modules!r:.60}; only ['self_attn'] is supported", "upstream wraps self_attn")
    layers = data.get("target_layers", [])
    if not isinstance(layers, (list, tuple)) or not all(
        isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in layers
    ):
        raise _err(p, f"target_layers must be a list of layer indices, got {layers!r:.60}")

    return DeltaMemConfig(
        rank=rank,
        alpha=alpha,
        normalize_qk=_bool(data, "normalize_qk", True, p),
        couple_lambda=_bool(data, "couple_lambda", True, p),
        state_update_mode=_choice(data, "state_update_mode", "standard", S.UPDATE_MODES, p),
        rankwise_gates=_bool(data, "rankwise_gates", True, p),
        num_state_heads=heads,
        memory_write_granularity=_choice(data, "memory_write_granularity", "token", S.WRITE_GRANULARITIES, p),
        target_modules=("self_attn",),
        target_layers=tuple(sorted(set(layers))),
        delta_heads=parse_delta_heads(data.get("delta_heads", list(S.DELTA_HEADS)), path=p),
        delta_o_rmsnorm=_bool(data, "delta_o_rmsnorm", False, p),
        delta_o_rmsnorm_eps=eps,
        trainable_delta_scale=trainable,
        delta_scale_max=scale_max,
        delta_scale_granularity=_choice(data, "delta_scale_granularity", "layer", SCALE_GRANULARITIES, p),
    )


def load_config(path: str | Path) -> DeltaMemConfig:
    """Read and validate ``delta_mem_config.json``."""
    path = Path(path)
    try:
        size = path.stat().st_size
        if size > MAX_CONFIG_BYTES:
            raise ConversionError(f"config is {size} bytes; a δ-mem config is about 1 KB", path=path)
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConversionError(
            "config file not found", path=path, hint=f"the adapter directory must contain {CONFIG_FILENAME}"
        ) from None
    except (OSError, UnicodeDecodeError) as e:
        raise ConversionError(f"cannot read config ({e})", path=path) from None
    try:
        data = json.loads(text)
    except ValueError as e:
        raise ConversionError(f"config is not valid JSON ({e})", path=path) from None
    return config_from_dict(data, path=path)
