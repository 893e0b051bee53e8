"""Read a ``torch.save`` zip checkpoint (a dict of tensors) without torch and without running its pickle.

Why: upstream ships ``delta_mem_adapter.pt``, a pickle.  Unpickling calls whatever
globals the file names, so a hostile ``.pt`` can run code on load.  We parse the
pickle with an Unpickler whose ``find_class`` resolves only the handful of globals
a dict of dense tensors needs, each to a harmless stand-in of ours; every other
global is refused before anything is called.  Tensor bytes are read from the
zip entries with every size and offset checked, so a corrupt file raises a
``ConversionError`` instead of reading past a buffer or allocating without bound.

Bounded by need, in this order, before anything is inflated (``deltamem_edge.limits``):
the zip's end record (entry count, central-directory size), ``data.pkl``'s size,
compression ratio and opcodes (memo indices), then the pickle itself, which only
records storages and views; then every storage against the extent its tensors
reach (a 2 GiB storage behind a 2,304-element tensor is a bomb, not a checkpoint)
and all tensors against the budget the caller derived from the base model.  Only
then are the storages inflated, each streamed into an array of the checked size.

Layout written by ``torch.save`` (new zip format, torch ≥ 1.6)::

    <archive>/data.pkl        pickle of the object; tensors as _rebuild_tensor_v2(...)
    <archive>/data/<key>      raw little-endian bytes of storage <key>
    <archive>/byteorder       b"little" (absent in old files: native order)
    <archive>/version, .format_version, .storage_alignment, .data/serialization_id

What torch 2.13 pickles for ``{name: tensor}`` with f32/f16/bf16 tensors:
``torch._utils._rebuild_tensor_v2``, ``torch.FloatStorage`` / ``torch.HalfStorage``
/ ``torch.BFloat16Storage`` (via persistent ids), and ``collections.OrderedDict``
(the empty backward-hooks argument; also the top-level object of a
``state_dict()``, which then carries a BUILD of its ``_metadata``).  An
``nn.Parameter`` adds ``torch._utils._rebuild_parameter``.
"""

from __future__ import annotations

import io
import math
import os
import pickle
import pickletools
import struct
import zipfile
import zlib
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np

from deltamem_edge.errors import ConversionError, DeltaMemError, UnsafeInputError
from deltamem_edge.limits import (
    COMPRESSION_CHECK_MIN_BYTES,
    DEFAULT_READ_LIMITS,
    INT64_MAX,
    MAX_COMPRESSION_RATIO,
    MAX_TENSOR_NDIM,
    ReadLimits,
    storage_slack_bytes,
)

MAX_SMALL_ENTRY_BYTES = 64  # byteorder ("little"), version: a few bytes each
_READ_CHUNK = 1 << 20
_MEMO_OPS = frozenset({"PUT", "BINPUT", "LONG_BINPUT", "GET", "BINGET", "LONG_BINGET"})

_HINT_REGENERATE = "re-save the adapter with torch.save(dict_of_tensors) or convert it to .safetensors"
_HINT_CRAFTED = "the file is corrupt or was crafted; " + _HINT_REGENERATE


class _StorageType:
    """Stand-in for a ``torch.<Dtype>Storage`` class: only records which dtype the bytes have."""

    __slots__ = ("name", "np_dtype", "itemsize", "is_bf16")

    def __init__(self, name: str, np_dtype: str | None, itemsize: int, is_bf16: bool = False) -> None:
        self.name = name
        self.np_dtype = np_dtype  # None: a known torch dtype we do not convert
        self.itemsize = itemsize
        self.is_bf16 = is_bf16

    @property
    def decoded_itemsize(self) -> int:
        """Bytes per element once decoded (bf16 is widened to float32)."""
        return 4 if self.is_bf16 else self.itemsize

    def __setstate__(self, state: Any) -> None:  # a pickle BUILD must not rewrite our stand-ins
        raise TypeError("stand-in objects take no pickle state")


_SUPPORTED_STORAGES = {
    "FloatStorage": _StorageType("FloatStorage", "<f4", 4),
    "HalfStorage": _StorageType("HalfStorage", "<f2", 2),
    "BFloat16Storage": _StorageType("BFloat16Storage", "<u2", 2, is_bf16=True),
}
# Harmless to name (they are just dtype tags) but not convertible: refused with a dtype message.
_UNSUPPORTED_STORAGES = {
    name: _StorageType(name, None, size)
    for name, size in (
        ("DoubleStorage", 8),
        ("LongStorage", 8),
        ("IntStorage", 4),
        ("ShortStorage", 2),
        ("CharStorage", 1),
        ("ByteStorage", 1),
        ("BoolStorage", 1),
    )
}


class _Storage:
    """A storage the pickle referenced: checked against its zip entry, not read yet.

    ``reach`` is how many elements the tensors viewing it need (the largest
    offset + extent); the bytes are inflated only after every view is known.
    """

    __slots__ = ("key", "stype", "numel", "info", "reach")

    def __init__(self, key: str, stype: _StorageType, numel: int, info: zipfile.ZipInfo) -> None:
        self.key = key
        self.stype = stype
        self.numel = numel
        self.info = info
        self.reach = 0

    def __setstate__(self, state: Any) -> None:  # a pickle BUILD must not swap fields
        raise TypeError("stand-in objects take no pickle state")


class _Tensor:
    """A tensor the pickle rebuilt: a checked view of a storage, materialized after all checks."""

    __slots__ = ("storage", "offset", "size", "stride", "numel")

    def __init__(self, storage: _Storage, offset: int, size: tuple[int, ...], stride: tuple[int, ...]) -> None:
        self.storage = storage
        self.offset = offset
        self.size = size
        self.stride = stride
        self.numel = math.prod(size)

    def __setstate__(self, state: Any) -> None:
        raise TypeError("stand-in objects take no pickle state")


class _OrderedDict(dict):
    """Stand-in for ``collections.OrderedDict``: a dict that ignores BUILD state (``_metadata``)."""

    def __setstate__(self, state: Any) -> None:
        pass


def _is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _check_ratio(info: zipfile.ZipInfo, what: str, path: Path) -> None:
    """Refuse an entry that no real tensor data compresses to (stored entries must be what they say)."""
    if info.flag_bits & 0x1:
        raise ConversionError(f"zip entry {info.filename} ({what}) is encrypted", path=path, hint=_HINT_REGENERATE)
    if info.compress_type == zipfile.ZIP_STORED:
        if info.compress_size != info.file_size:
            raise ConversionError(
                f"zip entry {info.filename} ({what}) is stored uncompressed but declares {info.compress_size} "
                f"bytes on disk and {info.file_size} inflated",
                path=path,
                hint=_HINT_CRAFTED,
            )
        return
    if info.file_size >= COMPRESSION_CHECK_MIN_BYTES and info.file_size > MAX_COMPRESSION_RATIO * max(
        info.compress_size, 1
    ):
        raise ConversionError(
            f"zip entry {info.filename} ({what}) inflates {info.compress_size} bytes to {info.file_size} "
            f"(ratio {info.file_size // max(info.compress_size, 1)}:1, limit {MAX_COMPRESSION_RATIO}:1); "
            "no tensor data compresses like that (a zip bomb?)",
            path=path,
            hint=_HINT_CRAFTED,
        )


class _SafeUnpickler(pickle.Unpickler):
    """Unpickler that resolves only the tensor-dict globals, each to our own stand-in.

    It reads no tensor bytes: storages and views are recorded and checked, and
    ``materialize`` inflates them once the caller has the whole picture.
    """

    def __init__(self, data: bytes, zf: zipfile.ZipFile, prefix: str, path: Path, limits: ReadLimits) -> None:
        super().__init__(io.BytesIO(data))
        self._zf = zf
        self._prefix = prefix
        self._path = path
        self._limits = limits
        self._storages: dict[str, _Storage] = {}
        self._tensor_bytes = 0
        self._n_tensors = 0
        self._globals: dict[tuple[str, str], Any] = {
            ("collections", "OrderedDict"): _OrderedDict,
            ("torch._utils", "_rebuild_tensor_v2"): self._rebuild_tensor_v2,
            ("torch._utils", "_rebuild_tensor"): self._rebuild_tensor,
            ("torch._utils", "_rebuild_parameter"): self._rebuild_parameter,
        }
        for name, st in {**_SUPPORTED_STORAGES, **_UNSUPPORTED_STORAGES}.items():
            self._globals[("torch", name)] = st

    # --- pickle hooks -------------------------------------------------------------------------

    def find_class(self, module: str, name: str) -> Any:
        found = self._globals.get((module, name))
        if found is None:
            raise UnsafeInputError(
                f"refusing pickle global {module}.{name}: a tensor checkpoint never needs it "
                "(the file may be malicious; nothing was executed)",
                path=self._path,
                hint=f"only convert adapters from a source you trust; {_HINT_REGENERATE}",
            )
        return found

    def persistent_load(self, pid: Any) -> _Storage:
        if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage"):
            raise ConversionError(f"unexpected persistent id {pid!r:.80} (not a tensor storage)", path=self._path)
        _, stype, key, _location, numel = pid
        if not isinstance(stype, _StorageType):
            raise ConversionError(f"storage type {stype!r:.60} is not a storage class", path=self._path)
        if not isinstance(key, str) or not key or "/" in key or "\\" in key or key in (".", ".."):
            raise ConversionError(f"invalid storage key {key!r:.60}", path=self._path)
        if not _is_int(numel) or not 0 <= numel <= INT64_MAX:
            raise ConversionError(f"storage {key} has invalid element count {numel!r:.40}", path=self._path)
        cached = self._storages.get(key)
        if cached is not None:
            if cached.numel != numel or cached.stype is not stype:
                raise ConversionError(
                    f"storage {key} is referenced with two sizes or dtypes ({cached.numel} x {cached.stype.name} "
                    f"and {numel} x {stype.name})",
                    path=self._path,
                    hint=_HINT_CRAFTED,
                )
            return cached
        if stype.np_dtype is None:
            raise ConversionError(
                f"storage {key} has dtype {stype.name[: -len('Storage')]}; only float32, float16 and bfloat16 "
                "tensors can be converted",
                path=self._path,
                hint="cast the tensors to float32 or bfloat16 before saving",
            )
        entry = f"{self._prefix}/data/{key}"
        try:
            info = self._zf.getinfo(entry)
        except KeyError:
            raise ConversionError(f"zip entry {entry} for storage {key} is missing", path=self._path) from None
        nbytes = numel * stype.itemsize
        if info.file_size != nbytes:
            raise ConversionError(
                f"storage {key} should hold {numel} x {stype.itemsize} = {nbytes} bytes but its zip entry has "
                f"{info.file_size}",
                path=self._path,
            )
        _check_ratio(info, f"storage {key}", self._path)
        if len(self._storages) >= self._limits.max_entries:
            raise ConversionError(
                f"more than {self._limits.max_entries} storages; the base model allows no adapter that large",
                path=self._path,
                hint="is this really an adapter for this base model?",
            )
        storage = _Storage(key, stype, numel, info)
        self._storages[key] = storage
        return storage

    # --- stand-ins for torch._utils -----------------------------------------------------------

    def _rebuild_tensor(self, storage: Any, storage_offset: Any, size: Any, stride: Any) -> _Tensor:
        if not isinstance(storage, _Storage):
            raise ConversionError("tensor rebuilt from something that is not a storage", path=self._path)
        if not _is_int(storage_offset) or not 0 <= storage_offset <= INT64_MAX:
            raise ConversionError(f"invalid storage offset {storage_offset!r:.40}", path=self._path)
        if not (isinstance(size, tuple) and isinstance(stride, tuple) and len(size) == len(stride)):
            raise ConversionError("tensor size and stride must be tuples of equal length", path=self._path)
        if len(size) > MAX_TENSOR_NDIM:
            raise ConversionError(f"tensor has {len(size)} dimensions (limit {MAX_TENSOR_NDIM})", path=self._path)
        if not all(_is_int(s) and 0 <= s <= INT64_MAX for s in size):
            raise ConversionError(f"tensor has invalid size {size!r:.80}", path=self._path)
        if not all(_is_int(s) and 0 <= s <= INT64_MAX for s in stride):
            raise ConversionError(f"tensor has invalid stride {stride!r:.80}", path=self._path)
        numel = math.prod(size)  # Python ints: exact, so an overflow is seen, not wrapped
        # numpy sizes an array by its non-zero dimensions (a 0 cannot hide an overflow there):
        # (2**63 - 1, 0) holds nothing but is still "too big" for it
        if math.prod(s for s in size if s) * 8 > INT64_MAX:
            raise ConversionError(
                f"tensor of size {size!r:.80} on storage {storage.key} overflows int64 (its dimensions times 8 bytes)",
                path=self._path,
                hint=_HINT_CRAFTED,
            )
        self._n_tensors += 1
        if self._n_tensors > self._limits.max_entries:
            raise ConversionError(f"more than {self._limits.max_entries} tensors", path=self._path)
        self._tensor_bytes += numel * storage.stype.decoded_itemsize
        if self._tensor_bytes > self._limits.max_tensor_bytes:
            raise ConversionError(
                f"tensors need {self._tensor_bytes} bytes (so far, at storage {storage.key}, size {size!r:.80}), "
                f"over the {self._limits.max_tensor_bytes} byte limit",
                path=self._path,
                hint="the limit is the largest adapter its config allows on this base model; "
                "is this really an adapter for it?",
            )
        if numel:
            reach = storage_offset + sum((n - 1) * s for n, s in zip(size, stride, strict=True)) + 1
            if reach > storage.numel:
                raise ConversionError(
                    f"storage {storage.key} smaller than shape: a tensor of size {tuple(size)}, stride "
                    f"{tuple(stride)} at offset {storage_offset} needs {reach} elements but the storage has "
                    f"{storage.numel}",
                    path=self._path,
                    hint=_HINT_CRAFTED,
                )
            storage.reach = max(storage.reach, reach)
        return _Tensor(storage, storage_offset, size, stride)

    def _rebuild_tensor_v2(
        self,
        storage: Any,
        storage_offset: Any,
        size: Any,
        stride: Any,
        requires_grad: Any = False,
        backward_hooks: Any = None,
        metadata: Any = None,
    ) -> _Tensor:
        # requires_grad, hooks and python metadata do not affect the values.
        return self._rebuild_tensor(storage, storage_offset, size, stride)

    def _rebuild_parameter(self, data: Any, requires_grad: Any = False, backward_hooks: Any = None) -> _Tensor:
        if not isinstance(data, _Tensor):
            raise ConversionError("parameter rebuilt from something that is not a tensor", path=self._path)
        return data

    # --- after the pickle: check storages against need, then inflate --------------------------

    def materialize(self, tensors: dict[str, _Tensor]) -> dict[str, np.ndarray]:
        """Check every storage the result uses against what its tensors reach, then read them."""
        used: dict[str, _Storage] = {}
        viewers: dict[str, int] = {}
        for t in tensors.values():
            used[t.storage.key] = t.storage
            viewers[t.storage.key] = viewers.get(t.storage.key, 0) + 1
        for s in used.values():
            need = s.reach * s.stype.itemsize
            have = s.numel * s.stype.itemsize
            if have > need + storage_slack_bytes(need):
                raise ConversionError(
                    f"storage {s.key} (zip entry {s.info.filename}) holds {s.numel} elements ({have} bytes) but "
                    f"the tensors that view it reach only {s.reach} ({need} bytes); a storage larger than its "
                    "tensors need is refused before it is inflated (a zip bomb?)",
                    path=self._path,
                    hint=_HINT_CRAFTED,
                )
        arrays = {key: self._inflate(s) for key, s in used.items()}
        out: dict[str, np.ndarray] = {}
        for name, t in tensors.items():
            src = arrays[t.storage.key]
            if t.numel == 0:
                out[name] = np.zeros(t.size, dtype=src.dtype)
                continue
            whole = t.offset == 0 and t.numel == src.size and t.stride == _contiguous_strides(t.size)
            if whole and viewers[t.storage.key] == 1:
                out[name] = src.reshape(t.size)  # the storage is exactly this tensor: no copy
                continue
            view = np.lib.stride_tricks.as_strided(
                src[t.offset :], shape=t.size, strides=tuple(s * src.itemsize for s in t.stride), writeable=False
            )
            out[name] = np.array(view, copy=True, order="C")
        return out

    def _inflate(self, s: _Storage) -> np.ndarray:
        """Stream one entry into an array of exactly the checked size (never more), then decode."""
        disk = np.empty(s.numel, dtype=s.stype.np_dtype)
        buf = memoryview(disk).cast("B")
        nbytes = len(buf)
        try:
            with self._zf.open(s.info) as fh:
                pos = 0
                while pos < nbytes:
                    n = fh.readinto(buf[pos : pos + _READ_CHUNK])
                    if not n:
                        raise ConversionError(
                            f"storage {s.key} is truncated ({pos} of {nbytes} bytes)", path=self._path
                        )
                    pos += n
                if fh.read(1):  # also makes zipfile check the CRC at the end of the entry
                    raise ConversionError(f"storage {s.key} is longer than {nbytes} bytes", path=self._path)
        except DeltaMemError:
            raise
        except (zipfile.BadZipFile, EOFError, OSError, zlib.error, RuntimeError, NotImplementedError, ValueError) as e:
            raise ConversionError(f"storage {s.key} is truncated or corrupt ({e})", path=self._path) from None
        del buf
        if s.stype.is_bf16:
            # bf16 is the top half of an IEEE float32: widening by a 16-bit shift is exact.
            wide = disk.astype(np.uint32)
            del disk
            wide <<= np.uint32(16)
            return wide.view(np.float32)
        return disk.astype(np.float32 if s.stype.itemsize == 4 else np.float16, copy=False)


def _contiguous_strides(size: tuple[int, ...]) -> tuple[int, ...]:
    out, step = [], 1
    for n in reversed(size):
        out.append(step)
        step *= n
    return tuple(reversed(out))


def _check_central_directory(f: BinaryIO, size: int, path: Path, limits: ReadLimits) -> None:
    """Read the zip's end record ourselves and bound its entry count and directory size.

    Why before ``zipfile``: it parses the whole central directory into objects, so
    a zip with a million entries costs seconds and hundreds of MB before any check
    of ours could run.  An end record we cannot find is left to zipfile's error.
    """
    tail_len = min(size, 22 + 65535)
    f.seek(size - tail_len)
    tail = f.read(tail_len)
    at = tail.rfind(b"PK\x05\x06")
    if at < 0 or at + 22 > len(tail):
        return
    _, _, _, _, n_total, cd_size, _, _ = struct.unpack_from("<4s4H2LH", tail, at)
    if n_total == 0xFFFF or cd_size == 0xFFFFFFFF:  # zip64: the real numbers are in the zip64 end record
        loc = at - 20
        if loc < 0 or tail[loc : loc + 4] != b"PK\x06\x07":
            return
        (z64_offset,) = struct.unpack_from("<Q", tail, loc + 8)
        if z64_offset + 56 > size:
            raise ConversionError(f"zip64 end record at {z64_offset} lies past the end of the file", path=path)
        f.seek(z64_offset)
        rec = f.read(56)
        if len(rec) == 56 and rec[:4] == b"PK\x06\x06":
            n_total, cd_size = struct.unpack_from("<QQ", rec, 32)
    if n_total > limits.max_zip_entries or cd_size > limits.max_central_directory_bytes:
        raise ConversionError(
            f"zip has {n_total} entries and a {cd_size}-byte central directory; a checkpoint of at most "
            f"{limits.max_entries} tensors has at most {limits.max_zip_entries} entries "
            f"({limits.max_central_directory_bytes} bytes)",
            path=path,
            hint="is this really an adapter for this base model?",
        )


def _find_archive_prefix(zf: zipfile.ZipFile, path: Path) -> str:
    prefixes = [n[: -len("/data.pkl")] for n in zf.namelist() if n.endswith("/data.pkl") and n.count("/") == 1]
    if len(prefixes) != 1:
        what = "no" if not prefixes else f"{len(prefixes)}"
        raise ConversionError(
            f"{what} '<archive>/data.pkl' entries; not a torch.save zip checkpoint",
            path=path,
            hint=_HINT_REGENERATE,
        )
    return prefixes[0]


def _prescan_pickle(data: bytes, path: Path) -> None:
    """Walk the opcodes without running them; refuse memo indices no real pickler writes.

    Why: CPython's unpickler grows its memo table to twice the largest PUT index,
    so ``LONG_BINPUT 0xFFFFFFFF`` in a 30-byte pickle asks for 64 GiB.  A pickler
    numbers memo entries 0, 1, 2, ... so an index is always below the opcode count.
    """
    n_ops = 0
    try:
        for op, arg, _pos in pickletools.genops(data):
            n_ops += 1
            if op.name in _MEMO_OPS and (not _is_int(arg) or not 0 <= arg < n_ops):
                raise ConversionError(
                    f"data.pkl uses memo index {arg!r:.40} at opcode {n_ops}; a pickler never writes that",
                    path=path,
                    hint=_HINT_CRAFTED,
                )
    except DeltaMemError:
        raise
    except Exception as e:  # genops raises ValueError and friends for malformed streams
        raise ConversionError(
            f"malformed checkpoint pickle ({type(e).__name__}: {e})", path=path, hint=_HINT_REGENERATE
        ) from None


def _read_small(zf: zipfile.ZipFile, name: str, limit: int, path: Path) -> bytes:
    info = zf.getinfo(name)
    if info.file_size > limit:
        raise ConversionError(f"zip entry {name} is {info.file_size} bytes (limit {limit})", path=path)
    _check_ratio(info, name.rsplit("/", 1)[-1], path)
    return zf.read(info)


def read_torch_zip(path: str | Path, *, limits: ReadLimits = DEFAULT_READ_LIMITS) -> dict[str, np.ndarray]:
    """Return the ``{name: array}`` dict saved with ``torch.save`` in ``path``.

    float32 → float32, float16 → float16, bfloat16 → float32 (exact).  Raises
    ``UnsafeInputError`` for any pickle global outside the tensor whitelist and
    ``ConversionError`` for anything malformed, oversized for ``limits`` or not a
    flat dict of tensors.  Nothing from the file is ever executed, and nothing is
    inflated before every size has been checked against what the tensors need.
    """
    path = Path(path)
    try:
        f = open(path, "rb")  # noqa: SIM115 - handed to ZipFile, closed below
    except FileNotFoundError:
        raise ConversionError("file not found", path=path) from None
    except OSError as e:
        raise ConversionError(f"cannot open ({e.strerror})", path=path) from None
    try:
        _check_central_directory(f, os.fstat(f.fileno()).st_size, path, limits)
        f.seek(0)
        try:
            zf = zipfile.ZipFile(f)
        except (zipfile.BadZipFile, OSError, ValueError, EOFError, struct.error, NotImplementedError) as e:
            # NotImplementedError: zipfile's answer to a zip64 end record naming a version it does not know
            raise ConversionError(
                f"cannot open as a zip archive ({e}); the file is truncated, corrupt, or a legacy non-zip torch file",
                path=path,
                hint="download it again, or re-save it with torch>=1.6 (zip format)",
            ) from None
        with zf:
            return _read_archive(zf, path, limits)
    finally:
        f.close()


def _read_archive(zf: zipfile.ZipFile, path: Path, limits: ReadLimits) -> dict[str, np.ndarray]:
    if len(zf.infolist()) > limits.max_zip_entries:  # the end record may undercount
        raise ConversionError(
            f"zip has {len(zf.infolist())} entries (limit {limits.max_zip_entries})",
            path=path,
            hint="is this really an adapter for this base model?",
        )
    prefix = _find_archive_prefix(zf, path)
    try:
        names = set(zf.namelist())
        byteorder = f"{prefix}/byteorder"
        order = _read_small(zf, byteorder, MAX_SMALL_ENTRY_BYTES, path) if byteorder in names else b"little"
        pkl_info = zf.getinfo(f"{prefix}/data.pkl")
        if pkl_info.file_size > limits.max_pickle_bytes:
            raise ConversionError(
                f"data.pkl is {pkl_info.file_size} bytes (limit {limits.max_pickle_bytes})",
                path=path,
                hint="a dict of tensors pickles to a few KB; this is not an adapter checkpoint",
            )
        _check_ratio(pkl_info, "data.pkl", path)
        data = zf.read(pkl_info)
    except DeltaMemError:
        raise
    except (zipfile.BadZipFile, OSError, EOFError, ValueError, zlib.error, RuntimeError, NotImplementedError) as e:
        raise ConversionError(f"corrupt zip archive ({e})", path=path, hint="download the file again") from None
    if order.strip() != b"little":
        raise ConversionError(
            f"byteorder is {order.strip()[:16]!r}; only little-endian checkpoints are supported", path=path
        )
    _prescan_pickle(data, path)
    unpickler = _SafeUnpickler(data, zf, prefix, path, limits)
    try:
        obj = unpickler.load()
    except DeltaMemError:
        raise
    except Exception as e:  # any failure of a hostile or corrupt pickle becomes one error type
        raise ConversionError(
            f"malformed checkpoint pickle ({type(e).__name__}: {e})", path=path, hint=_HINT_REGENERATE
        ) from None
    return unpickler.materialize(_as_tensor_dict(obj, path))


def _as_tensor_dict(obj: Any, path: Path) -> dict[str, _Tensor]:
    if not isinstance(obj, dict):
        raise ConversionError(
            f"checkpoint holds a {type(obj).__name__}, expected a dict of tensors", path=path, hint=_HINT_REGENERATE
        )
    out: dict[str, _Tensor] = {}
    for k, v in obj.items():
        if not isinstance(k, str):
            raise ConversionError(f"checkpoint key {k!r:.60} is not a string", path=path)
        if not isinstance(v, _Tensor):
            raise ConversionError(
                f"checkpoint entry {k!r} is a {type(v).__name__}, expected a tensor",
                path=path,
                hint="the file must be a flat {name: tensor} dict as written by upstream save_delta_mem_adapter",
            )
        out[k] = v
    return out
