"""A small, bounds-checked reader of GGUF metadata and tensor tables.

Why not gguf-py's ``GGUFReader``: it builds a numpy view per array element, which
takes ~30 s for a 151k-token vocabulary; this reader decodes the same header in
well under a second, can skip long arrays altogether, and checks every length and
offset against the file size (a malformed file gives ``GGUFFormatError`` naming
the file, never a crash or a huge allocation).  Used by the adapter fingerprint,
``verify``, the converter and ``inspect``.

Beyond the file size, every declared size is bounded by what a real model needs
(``deltamem_edge.limits``: string and key lengths, array items, tensor name
length, dims, int64 element counts, alignment), the checks llama.cpp's own
``gguf.cpp`` grew after its overflow CVEs.
"""

from __future__ import annotations

import math
import mmap
import os
import stat
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import gguf
import numpy as np

from .errors import GGUFFormatError
from .limits import (
    GGUF_MAX_ALIGNMENT,
    GGUF_MAX_ARRAY_ITEMS,
    GGUF_MAX_DIMS,
    GGUF_MAX_KEY_BYTES,
    GGUF_MAX_STRING_BYTES,
    GGUF_MAX_TENSOR_NAME_BYTES,
    INT64_MAX,
)

GGUF_MAGIC = b"GGUF"
DEFAULT_ALIGNMENT = 32
_VT = gguf.GGUFValueType
_SCALARS: dict[int, str] = {
    _VT.UINT8: "<B", _VT.INT8: "<b", _VT.UINT16: "<H", _VT.INT16: "<h", _VT.UINT32: "<I", _VT.INT32: "<i",
    _VT.FLOAT32: "<f", _VT.BOOL: "<?", _VT.UINT64: "<Q", _VT.INT64: "<q", _VT.FLOAT64: "<d",
}
_NP: dict[int, str] = {
    _VT.UINT8: "<u1", _VT.INT8: "<i1", _VT.UINT16: "<u2", _VT.INT16: "<i2", _VT.UINT32: "<u4", _VT.INT32: "<i4",
    _VT.FLOAT32: "<f4", _VT.BOOL: "?", _VT.UINT64: "<u8", _VT.INT64: "<i8", _VT.FLOAT64: "<f8",
}


@dataclass(frozen=True)
class LongArray:
    """Stand-in for an array longer than ``read_gguf_header``'s ``max_array`` (not decoded)."""

    item_type: int
    count: int

    def __str__(self) -> str:
        return f"[{self.count} items]"


@dataclass(frozen=True)
class TensorInfo:
    """One tensor of a GGUF: ``shape`` in ggml ne order, ``offset`` absolute in the file."""

    name: str
    shape: tuple[int, ...]
    ggml_type: int
    type_name: str
    offset: int
    n_elements: int
    n_bytes: int


@dataclass
class GGUFHeader:
    """Metadata and tensor table of a GGUF file (values decoded to Python, arrays to lists)."""

    path: Path
    version: int
    alignment: int
    data_offset: int
    file_size: int
    fields: dict[str, Any]
    types: dict[str, tuple[int, ...]]  # key -> (value type,) or (ARRAY, item type)
    tensors: list[TensorInfo]

    def get(self, key: str, default: Any = None) -> Any:
        return self.fields.get(key, default)

    def tensor_bytes(self, t: TensorInfo) -> np.ndarray:
        """The raw bytes of ``t``: a read-only uint8 memmap shaped (ne[n-1], ..., ne[1], bytes per row)."""
        rows = t.n_elements // t.shape[0] if t.shape[0] else 0
        row_bytes = t.n_bytes // rows if rows else 0
        shape = (*reversed(t.shape[1:]), row_bytes)
        if t.n_bytes == 0:
            return np.zeros(shape, dtype=np.uint8)
        return np.memmap(self.path, dtype=np.uint8, mode="r", offset=t.offset, shape=shape)

    def tensor_array(self, t: TensorInfo) -> np.ndarray:
        """``t`` as float32 in numpy order (ne reversed), dequantized if needed."""
        shape = tuple(reversed(t.shape))
        qtype = gguf.GGMLQuantizationType(t.ggml_type)
        raw = np.array(self.tensor_bytes(t))
        if qtype == gguf.GGMLQuantizationType.F32:
            return raw.view("<f4").reshape(shape)
        if qtype == gguf.GGMLQuantizationType.F16:
            return raw.view("<f2").astype(np.float32).reshape(shape)
        return np.asarray(gguf.quants.dequantize(raw, qtype), dtype=np.float32).reshape(shape)


class _Cursor:
    def __init__(self, buf: Any, path: Path) -> None:
        self.buf, self.pos, self.path, self.size = buf, 0, path, len(buf)

    def fail(self, what: str) -> GGUFFormatError:
        return GGUFFormatError(
            f"not a readable GGUF file ({what} at byte {self.pos})",
            path=self.path,
            hint="the file is truncated, corrupt, or not a GGUF (download or convert it again)",
        )

    def unpack(self, fmt: str) -> Any:
        n = struct.calcsize(fmt)
        if self.pos + n > self.size:
            raise self.fail("unexpected end of file")
        (value,) = struct.unpack_from(fmt, self.buf, self.pos)
        self.pos += n
        return value

    def raw(self, n: int) -> bytes:
        if n < 0 or self.pos + n > self.size:
            raise self.fail(f"a length of {n} bytes runs past the end of the file")
        out = self.buf[self.pos : self.pos + n]
        self.pos += n
        return out

    def length(self, limit: int, what: str) -> int:
        """A u64 length field, refused above ``limit`` before anything is sized from it."""
        n = self.unpack("<Q")
        if n > limit:
            raise self.fail(f"{what} of {n} bytes (limit {limit})")
        return n

    def string(self, limit: int = GGUF_MAX_STRING_BYTES, what: str = "a string") -> str:
        try:
            return self.raw(self.length(limit, what)).decode("utf-8")
        except UnicodeDecodeError as e:
            raise self.fail(f"invalid UTF-8 string ({e.reason})") from None

    def skip_string(self) -> None:
        n = self.length(GGUF_MAX_STRING_BYTES, "a string")
        if self.pos + n > self.size:
            raise self.fail(f"a length of {n} bytes runs past the end of the file")
        self.pos += n

    def value(self, vtype: int, max_array: int | None) -> tuple[Any, tuple[int, ...]]:
        if vtype in _SCALARS:
            return self.unpack(_SCALARS[vtype]), (vtype,)
        if vtype == _VT.STRING:
            return self.string(), (vtype,)
        if vtype != _VT.ARRAY:
            raise self.fail(f"unknown value type {vtype}")
        itype, count = self.unpack("<I"), self.unpack("<Q")
        if itype == _VT.ARRAY:
            raise self.fail("nested arrays are not supported")
        if count > GGUF_MAX_ARRAY_ITEMS:
            raise self.fail(f"an array of {count} items (limit {GGUF_MAX_ARRAY_ITEMS})")
        if itype in _NP:
            nbytes = count * np.dtype(_NP[itype]).itemsize
            data = self.raw(nbytes)
            if max_array is not None and count > max_array:
                return LongArray(itype, count), (vtype, itype)
            return np.frombuffer(data, dtype=_NP[itype]).tolist(), (vtype, itype)
        if itype != _VT.STRING:
            raise self.fail(f"unknown array item type {itype}")
        if max_array is not None and count > max_array:
            for _ in range(count):
                self.skip_string()
            return LongArray(itype, count), (vtype, itype)
        if count > self.size:
            raise self.fail(f"an array of {count} strings cannot fit")
        return [self.string() for _ in range(count)], (vtype, itype)


def read_gguf_header(path: str | Path, *, max_array: int | None = 4096) -> GGUFHeader:
    """Parse the metadata and tensor table of a little-endian GGUF (v2/v3) without reading tensor data.

    Arrays longer than ``max_array`` come back as ``LongArray`` (None: decode all).
    Every length and offset is checked against the file size; any problem raises
    ``GGUFFormatError`` naming the file.
    """
    path = Path(path)
    if not path.exists():
        raise GGUFFormatError("file not found", path=path)
    if path.is_dir():
        raise GGUFFormatError("is a directory, not a GGUF file", path=path)
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))  # a FIFO must not hang us
    except OSError as e:
        raise GGUFFormatError(f"cannot read the file ({e})", path=path) from None
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            os.close(fd)
            raise GGUFFormatError("is not a regular file", path=path, hint="pass a .gguf file")
        with open(fd, "rb") as f:
            size = f.seek(0, 2)
            if size < 24:
                raise GGUFFormatError(
                    f"not a GGUF file ({size} bytes, too short for a GGUF header)",
                    path=path,
                    hint="the file is truncated, empty, or not a GGUF (download or convert it again)",
                )
            with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mm:
                return _parse(path, mm, size, max_array)
    except (OSError, ValueError) as e:  # ValueError: mmap of a file another process just emptied
        raise GGUFFormatError(f"cannot read the file ({e})", path=path) from None


def _parse(path: Path, mm: Any, size: int, max_array: int | None) -> GGUFHeader:
    cur = _Cursor(mm, path)
    if cur.raw(4) != GGUF_MAGIC:
        cur.pos = 0
        raise cur.fail("no GGUF magic")
    version = cur.unpack("<I")
    if version & 0xFFFF == 0 and version != 0:
        raise GGUFFormatError("big-endian GGUF files are not supported", path=path)
    if version not in (2, 3):
        raise GGUFFormatError(f"GGUF version {version} is not supported (2 and 3 are)", path=path)
    n_tensors, n_kv = cur.unpack("<Q"), cur.unpack("<Q")
    if n_tensors > size or n_kv > size:
        raise cur.fail(f"implausible counts ({n_tensors} tensors, {n_kv} keys)")
    fields: dict[str, Any] = {}
    types: dict[str, tuple[int, ...]] = {}
    for _ in range(n_kv):
        key = cur.string(GGUF_MAX_KEY_BYTES, "a key")
        value, vt = cur.value(cur.unpack("<I"), max_array)
        if key in fields:
            raise cur.fail(f"duplicate key {key}")
        fields[key], types[key] = value, vt
    alignment = fields.get("general.alignment", DEFAULT_ALIGNMENT)
    bad_alignment = not isinstance(alignment, int) or isinstance(alignment, bool) or alignment <= 0
    if bad_alignment or alignment & (alignment - 1) or alignment > GGUF_MAX_ALIGNMENT:
        raise GGUFFormatError(
            f"general.alignment is {alignment!r:.40}; it must be a power of two up to {GGUF_MAX_ALIGNMENT}", path=path
        )
    raw_tensors = []
    names: set[str] = set()
    for _ in range(n_tensors):
        name = cur.string(GGUF_MAX_TENSOR_NAME_BYTES, "a tensor name")
        if name in names:
            raise cur.fail(f"duplicate tensor name {name}")
        names.add(name)
        n_dims = cur.unpack("<I")
        if not 1 <= n_dims <= GGUF_MAX_DIMS:
            raise cur.fail(f"tensor {name} has {n_dims} dimensions (1..{GGUF_MAX_DIMS})")
        shape = tuple(cur.unpack("<Q") for _ in range(n_dims))
        if any(d > INT64_MAX for d in shape) or math.prod(shape) > INT64_MAX:
            raise cur.fail(f"tensor {name} of shape {shape} has more elements than int64 holds")
        raw_tensors.append((name, shape, cur.unpack("<I"), cur.unpack("<Q")))
    data_offset = -(-cur.pos // alignment) * alignment
    tensors = []
    for name, shape, ttype, rel in raw_tensors:
        try:
            qtype = gguf.GGMLQuantizationType(ttype)
            block, type_size = gguf.GGML_QUANT_SIZES[qtype]
        except (ValueError, KeyError):
            raise GGUFFormatError(f"tensor {name} has unknown type {ttype}", path=path) from None
        n = math.prod(shape)
        if shape[0] % block:
            raise GGUFFormatError(f"tensor {name}: row of {shape[0]} is not a multiple of {qtype.name} blocks", path=path)
        nbytes = n // block * type_size
        if rel % alignment:
            raise GGUFFormatError(f"tensor {name}: data offset {rel} is not a multiple of {alignment}", path=path)
        start = data_offset + rel
        if start + nbytes > size:
            raise GGUFFormatError(
                f"truncated: tensor {name} needs bytes {start}..{start + nbytes} but the file has {size}",
                path=path,
                hint="the download or conversion was interrupted; fetch or convert the file again",
            )
        tensors.append(TensorInfo(name, shape, int(ttype), qtype.name, start, n, nbytes))
    return GGUFHeader(path, version, alignment, data_offset, size, fields, types, tensors)
