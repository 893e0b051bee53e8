"""Read a ``.safetensors`` file into numpy, validating the header before touching any data.

Why our own reader: the format is simple (8-byte little-endian header length, a
JSON header, raw bytes), the converter must not depend on torch, and an adapter
file from the internet deserves the same bounds checks as our pickle reader: the
header length, every offset and every size are checked against the real file
size, and against the caller's ``ReadLimits`` (the converter derives them from the
base model), before anything is allocated or read.  Each tensor is read straight
into an array of its checked size.

Format: ``u64 n`` | ``n`` bytes of JSON ``{name: {"dtype", "shape", "data_offsets": [begin, end]}, "__metadata__"?}``
| data, with offsets relative to the start of the data section.
"""

from __future__ import annotations

import itertools
import json
import math
import os
from pathlib import Path
from typing import Any

import numpy as np

from deltamem_edge.errors import ConversionError
from deltamem_edge.limits import DEFAULT_READ_LIMITS, INT64_MAX, MAX_TENSOR_NDIM, ReadLimits

MAX_HEADER_BYTES = 100_000_000  # the safetensors library's own limit; ReadLimits is usually far lower

# dtype → (bytes per element, numpy dtype read from disk)
_DTYPES: dict[str, tuple[int, str]] = {"F32": (4, "<f4"), "F16": (2, "<f2"), "BF16": (2, "<u2")}

_HINT = "re-export the adapter with safetensors.torch.save_file({name: tensor})"


def _is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in pairs:
        if k in out:
            raise ValueError(f"duplicate key {k!r} in header")
        out[k] = v
    return out


def _parse_entry(name: str, entry: Any, data_size: int, path: Path) -> tuple[str, tuple[int, ...], int, int]:
    if not isinstance(entry, dict) or set(entry) != {"dtype", "shape", "data_offsets"}:
        raise ConversionError(
            f"header entry {name!r} must have exactly dtype, shape and data_offsets", path=path, hint=_HINT
        )
    dtype, shape, offsets = entry["dtype"], entry["shape"], entry["data_offsets"]
    if dtype not in _DTYPES:
        raise ConversionError(
            f"tensor {name!r} has dtype {dtype!r:.20}; only F32, F16 and BF16 can be converted",
            path=path,
            hint="cast the tensors to float32 or bfloat16 before saving",
        )
    if (
        not isinstance(shape, list)
        or len(shape) > MAX_TENSOR_NDIM
        or not all(_is_int(d) and 0 <= d <= INT64_MAX for d in shape)
    ):
        raise ConversionError(f"tensor {name!r} has invalid shape {shape!r:.80}", path=path, hint=_HINT)
    # numpy sizes an array by the product of its non-zero dimensions times the item size (so that a 0
    # cannot hide an overflow): (2**63 - 1, 0) holds nothing but is still "too big" for it.
    if math.prod(d for d in shape if d) * _DTYPES[dtype][0] > INT64_MAX:
        raise ConversionError(
            f"tensor {name!r} of shape {tuple(shape)} {dtype} overflows int64 bytes",
            path=path,
            hint=_HINT,
        )
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(_is_int(o) for o in offsets)):
        raise ConversionError(f"tensor {name!r} has invalid data_offsets {offsets!r:.80}", path=path, hint=_HINT)
    begin, end = offsets
    if not 0 <= begin <= end <= data_size:
        raise ConversionError(
            f"tensor {name!r} claims bytes [{begin}, {end}) but the data section has {data_size} bytes",
            path=path,
            hint="the file is truncated or corrupt",
        )
    need = math.prod(shape) * _DTYPES[dtype][0]
    if end - begin != need:
        raise ConversionError(
            f"tensor {name!r} of shape {tuple(shape)} {dtype} needs {need} bytes but data_offsets span {end - begin}",
            path=path,
            hint=_HINT,
        )
    return dtype, tuple(shape), begin, end


def read_safetensors(path: str | Path, *, limits: ReadLimits = DEFAULT_READ_LIMITS) -> dict[str, np.ndarray]:
    """Return ``{name: array}`` from a safetensors file.

    F32 → float32, F16 → float16, BF16 → float32 (exact).  Any inconsistent
    header, or one that needs more than ``limits``, raises ``ConversionError``
    before data is allocated.
    """
    max_header = min(MAX_HEADER_BYTES, limits.max_safetensors_header_bytes)
    path = Path(path)
    try:
        f = open(path, "rb")  # noqa: SIM115 - closed in the finally below
    except FileNotFoundError:
        raise ConversionError("file not found", path=path) from None
    except OSError as e:
        raise ConversionError(f"cannot open ({e.strerror})", path=path) from None
    try:
        file_size = os.fstat(f.fileno()).st_size
        head = f.read(8)
        if len(head) != 8:
            raise ConversionError("file is shorter than the 8-byte safetensors header length", path=path)
        n = int.from_bytes(head, "little")
        if n > max_header:
            raise ConversionError(
                f"header length {n} exceeds the {max_header} byte limit for {limits.max_entries} tensors; "
                "not a valid adapter safetensors file",
                path=path,
                hint=_HINT,
            )
        if 8 + n > file_size:
            raise ConversionError(
                f"header length {n} is larger than the file ({file_size} bytes); the file is truncated", path=path
            )
        raw = f.read(n)
        if len(raw) != n:
            raise ConversionError("file is truncated inside the header", path=path)
        try:
            header = json.loads(raw.decode("utf-8"), object_pairs_hook=_no_duplicates)
        except (UnicodeDecodeError, ValueError, RecursionError) as e:
            raise ConversionError(f"header is not valid JSON ({e})", path=path, hint=_HINT) from None
        if not isinstance(header, dict):
            raise ConversionError("header is not a JSON object", path=path, hint=_HINT)
        meta = header.pop("__metadata__", None)
        if meta is not None and not isinstance(meta, dict):
            raise ConversionError("__metadata__ is not an object", path=path, hint=_HINT)

        if len(header) > limits.max_entries:
            raise ConversionError(
                f"header lists {len(header)} tensors (limit {limits.max_entries})",
                path=path,
                hint="is this really an adapter for this base model?",
            )
        data_start = 8 + n
        data_size = file_size - data_start
        entries = {name: _parse_entry(name, e, data_size, path) for name, e in header.items()}

        total = sum(math.prod(shape) * (4 if dt == "BF16" else _DTYPES[dt][0]) for dt, shape, _, _ in entries.values())
        if total > limits.max_tensor_bytes:
            raise ConversionError(
                f"tensors total {total} bytes, over the {limits.max_tensor_bytes} byte limit",
                path=path,
                hint="the limit is the largest adapter its config allows on this base model",
            )
        spans = sorted((b, e, name) for name, (_, _, b, e) in entries.items() if e > b)
        for (_, e0, a), (b1, _, b) in itertools.pairwise(spans):
            if b1 < e0:
                raise ConversionError(f"tensors {a!r} and {b!r} overlap", path=path, hint=_HINT)

        out: dict[str, np.ndarray] = {}
        for name, (dtype, shape, begin, end) in entries.items():
            f.seek(data_start + begin)
            arr = np.empty(shape, dtype=_DTYPES[dtype][1])
            if f.readinto(memoryview(arr.reshape(-1)).cast("B")) != end - begin:
                raise ConversionError(f"file is truncated inside tensor {name!r}", path=path)
            if dtype == "BF16":
                # bf16 is the top half of an IEEE float32: widening by a 16-bit shift is exact.
                wide = arr.astype(np.uint32)
                wide <<= np.uint32(16)
                arr = wide.view(np.float32)
            else:
                arr = arr.astype(np.float32 if dtype == "F32" else np.float16, copy=False)
            out[name] = arr
        return out
    finally:
        f.close()
