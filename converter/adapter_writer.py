"""Writing the converted adapter as a GGUF: standalone, or bundled into a copy of the base model.

Its one job is the file format and the file system: the GGUF value type of every
``adapter.deltamem.*`` key, the f16/f32 output type of the weights, copying the base
model's keys and tensors (quantized ones as raw bytes) for a bundle, and an atomic
replace so that a failure never leaves a partial file.  It is separate from the
weight math (``adapter_tensors``) and the base-model checks (``base_model``) because
it only writes what those have already built and validated.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import gguf
import numpy as np

from deltamem_edge import gguf_schema as S
from deltamem_edge.errors import ConversionError, DeltaMemError
from deltamem_edge.gguf_header import GGUFHeader, LongArray

OUTTYPES = ("f32", "f16")  # of the 2-D weights; 1-D tensors are always f32

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


def to_outtype(name: str, arr: np.ndarray, outtype: str, path: Path) -> np.ndarray:
    """``arr`` as written: f32, or f16 for a 2-D weight when asked; refused rather than saturated to infinity."""
    if arr.ndim < 2 or outtype == "f32":
        return np.ascontiguousarray(arr, dtype=np.float32)
    with np.errstate(over="ignore"):
        half = arr.astype(np.float16)
    if not np.all(np.isfinite(half)):
        raise ConversionError(f"{name} has values beyond the float16 range", path=path, hint="convert with outtype f32")
    return half


def _add_metadata(writer: gguf.GGUFWriter, metadata: dict[str, Any]) -> None:
    """Our keys with their schema types: gguf-py would guess int32/float64 from the Python values."""
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
        if isinstance(value, LongArray):  # not decoded: base_model.open_base_gguf(full=True) prevents this
            raise ConversionError(f"key {name} was not read in full", path=base)
        if vtype == gguf.GGUFValueType.ARRAY and len(value) == 0:
            warnings.warn(f"{base}: key {name} is an empty array, which gguf-py cannot write; left out", stacklevel=3)
            continue
        writer.add_key_value(name, value, vtype, sub_type=sub_type)
    if "general.alignment" in header.fields:
        writer.data_alignment = header.alignment


@contextlib.contextmanager
def _atomic_output(out: Path) -> Iterator[Path]:
    """A temp file next to ``out`` that replaces it when the block succeeds and is removed when it fails.

    Write errors become ``ConversionError``; our own errors and Ctrl-C pass through unchanged.
    """
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{out.name}.", suffix=".part", dir=out.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        yield tmp
        _replace_atomically(tmp, out)
    except BaseException as e:
        tmp.unlink(missing_ok=True)
        if isinstance(e, (DeltaMemError, KeyboardInterrupt)):
            raise
        if isinstance(e, (OSError, ValueError)):
            raise ConversionError(f"writing failed ({e})", path=out) from e
        raise


def _replace_atomically(tmp: Path, out: Path) -> None:
    """Move the finished ``tmp`` over ``out`` in one step, so readers see the old file or the new one."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600; give the file the mode a plain open() would
    os.replace(tmp, out)


def write_adapter_gguf(
    out: Path,
    arch: str,
    metadata: dict[str, Any],
    tensors: dict[str, np.ndarray],
    *,
    name: str,
    base_header: GGUFHeader | None,
    base_path: Path,
) -> None:
    """Write ``out`` atomically (temp file next to it + rename): a failure never leaves a partial file.

    ``tensors`` are written as they are (``to_outtype`` first).  ``base_header``
    (read in full) makes a bundle: the base model at ``base_path`` with every key and
    tensor, then the adapter; None writes a standalone adapter named ``name``.
    """
    with _atomic_output(out) as tmp:
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
                    qtype = gguf.GGMLQuantizationType(t.ggml_type)
                    writer.add_tensor_info(t.name, raw.shape, raw.dtype, t.n_bytes, qtype)
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
