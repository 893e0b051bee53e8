"""Upstream δ-mem adapter (``delta_mem_config.json`` + ``delta_mem_adapter.pt`` / ``.safetensors``) → our GGUF.

Why convert at all: the engine is C++ and must not parse pickle, and it wants the
weights in the layout its graph uses (``deltamem_edge.gguf_schema``).  Doing that
once here keeps the run-time graph small.

Two outputs:

* adapter (default): a small ``general.type = adapter`` GGUF loaded next to a
  stock base model;
* ``bundle=True``: the base model GGUF copied unchanged (every key, every tensor,
  quantized ones as raw bytes) plus our keys and tensors, in one file.

This module is the entry point (``convert_adapter``) and owns the inputs: finding
the weights and config, and bounding what reading them may allocate.  The steps
live in one module each, so that each can be read and tested alone:

* ``adapter_tensors``: upstream weights → schema tensors + metadata (pure math);
* ``base_model``: the base GGUF's shapes, the check against them, and the δ_q/δ_k
  row permutation llama-family bases need;
* ``adapter_writer``: the GGUF file, standalone or bundled, written atomically.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from deltamem_edge import gguf_schema as S
from deltamem_edge.errors import AdapterError, ConversionError
from deltamem_edge.limits import ReadLimits

from .adapter_tensors import DEFAULT_SOURCE, KNOWN_PARAMS, build_adapter_tensors
from .adapter_writer import OUTTYPES, to_outtype, write_adapter_gguf
from .base_model import (
    ROPE_PERMUTED_NOTE,
    BaseModelInfo,
    apply_base_layout,
    base_model_info,
    check_against_base,
    header_field,
    open_base_gguf,
)
from .config import CONFIG_FILENAME, DeltaMemConfig, load_config
from .safetensors_reader import read_safetensors
from .torch_zip import read_torch_zip

__all__ = [
    "BUDGET_HEADROOM",
    "WEIGHTS_FILENAME",
    "adapter_read_limits",
    "convert_adapter",
    "default_output_path",
    "load_weights",
    "resolve_inputs",
]

WEIGHTS_FILENAME = "delta_mem_adapter.pt"


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
        max_entries=BUDGET_HEADROOM * len(KNOWN_PARAMS) * base.n_layer,
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
    header = open_base_gguf(base, full=bundle)
    info = base_model_info(header, base)
    out = Path(out) if out is not None else default_output_path(base, bundle=bundle)
    if out.is_dir():
        out = out / default_output_path(base, bundle=bundle).name
    if bundle and int(header_field(header, "split.count", base, default=1)) > 1:
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
    typed = {name: to_outtype(name, arr, outtype, weights_path) for name, arr in tensors.items()}
    write_adapter_gguf(
        out,
        info.arch,
        metadata,
        typed,
        name=adapter_dir.name,
        base_header=header if bundle else None,
        base_path=base,
    )
    return out
