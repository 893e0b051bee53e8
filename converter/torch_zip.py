"""Read a ``torch.save`` zip checkpoint (a dict of tensors) without torch and without running its pickle.

Why: upstream ships ``delta_mem_adapter.pt``, a pickle.  Unpickling calls whatever
globals the file names, so a hostile ``.pt`` can run code on load.  We parse the
pickle with an Unpickler whose ``find_class`` resolves only the handful of globals
a dict of dense tensors needs, each to a harmless stand-in of ours; every other
global is refused before anything is called.  Tensor bytes are read from the
zip entries with every size and offset checked, so a corrupt file raises a
``ConversionError`` instead of reading past a buffer or allocating without bound.

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
import pickle
import zipfile
import zlib
from pathlib import Path
from typing import Any

import numpy as np

from deltamem_edge.errors import ConversionError, DeltaMemError, UnsafeInputError

DEFAULT_MAX_TOTAL_BYTES = 8 << 30  # decoded bytes of all storages (and, separately, of all tensors)
MAX_PICKLE_BYTES = 64 << 20  # data.pkl of a 36-layer adapter is ~50 KB
MAX_NDIM = 32

_HINT_REGENERATE = "re-save the adapter with torch.save(dict_of_tensors) or convert it to .safetensors"


class _StorageType:
    """Stand-in for a ``torch.<Dtype>Storage`` class: only records which dtype the bytes have."""

    __slots__ = ("name", "np_dtype", "itemsize", "is_bf16")

    def __init__(self, name: str, np_dtype: str | None, itemsize: int, is_bf16: bool = False) -> None:
        self.name = name
        self.np_dtype = np_dtype  # None: a known torch dtype we do not convert
        self.itemsize = itemsize
        self.is_bf16 = is_bf16

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
    """A decoded storage: a flat little-endian numpy array (bf16 already widened to float32)."""

    __slots__ = ("key", "array")

    def __init__(self, key: str, array: np.ndarray) -> None:
        self.key = key
        self.array = array

    def __setstate__(self, state: Any) -> None:  # a pickle BUILD must not swap the array
        raise TypeError("stand-in objects take no pickle state")


class _OrderedDict(dict):
    """Stand-in for ``collections.OrderedDict``: a dict that ignores BUILD state (``_metadata``)."""

    def __setstate__(self, state: Any) -> None:
        pass


def _is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


class _SafeUnpickler(pickle.Unpickler):
    """Unpickler that resolves only the tensor-dict globals, each to our own stand-in."""

    def __init__(self, data: bytes, zf: zipfile.ZipFile, prefix: str, path: Path, max_total_bytes: int) -> None:
        super().__init__(io.BytesIO(data))
        self._zf = zf
        self._prefix = prefix
        self._path = path
        self._max_total = max_total_bytes
        self._storages: dict[str, _Storage] = {}
        self._storage_bytes = 0
        self._tensor_bytes = 0
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
        if not _is_int(numel) or numel < 0:
            raise ConversionError(f"storage {key} has invalid element count {numel!r:.40}", path=self._path)
        cached = self._storages.get(key)
        if cached is not None:
            if cached.array.size != numel:
                raise ConversionError(f"storage {key} is referenced with two sizes", path=self._path)
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
        decoded = numel * (4 if stype.is_bf16 else stype.itemsize)
        self._storage_bytes += decoded
        if self._storage_bytes > self._max_total:
            raise ConversionError(
                f"storages exceed the {self._max_total} byte limit", path=self._path, hint="is this really an adapter?"
            )
        try:
            raw = self._zf.read(entry)
        except (zipfile.BadZipFile, EOFError, OSError, zlib.error) as e:
            raise ConversionError(f"storage {key} is truncated or corrupt ({e})", path=self._path) from None
        if len(raw) != nbytes:  # zipfile already checks, but never trust a length we did not see
            raise ConversionError(f"storage {key} is truncated", path=self._path)
        arr = np.frombuffer(raw, dtype=stype.np_dtype)
        if stype.is_bf16:
            # bf16 is the top half of an IEEE float32: widening by a 16-bit shift is exact.
            arr = (arr.astype(np.uint32) << np.uint32(16)).view(np.float32)
        else:
            arr = arr.astype(np.float32 if stype.itemsize == 4 else np.float16)  # native order, owned copy
        storage = _Storage(key, arr)
        self._storages[key] = storage
        return storage

    # --- stand-ins for torch._utils -----------------------------------------------------------

    def _rebuild_tensor(self, storage: Any, storage_offset: Any, size: Any, stride: Any) -> np.ndarray:
        if not isinstance(storage, _Storage):
            raise ConversionError("tensor rebuilt from something that is not a storage", path=self._path)
        if not _is_int(storage_offset) or storage_offset < 0:
            raise ConversionError(f"invalid storage offset {storage_offset!r:.40}", path=self._path)
        if not (isinstance(size, tuple) and isinstance(stride, tuple) and len(size) == len(stride)):
            raise ConversionError("tensor size and stride must be tuples of equal length", path=self._path)
        if len(size) > MAX_NDIM:
            raise ConversionError(f"tensor has {len(size)} dimensions (limit {MAX_NDIM})", path=self._path)
        if not all(_is_int(s) and s >= 0 for s in size):
            raise ConversionError(f"tensor has invalid size {size!r:.80}", path=self._path)
        if not all(_is_int(s) and s >= 0 for s in stride):
            raise ConversionError(f"tensor has invalid stride {stride!r:.80}", path=self._path)
        src = storage.array
        numel = math.prod(size)
        self._tensor_bytes += numel * src.itemsize
        if self._tensor_bytes > self._max_total:
            raise ConversionError(f"tensors exceed the {self._max_total} byte limit", path=self._path)
        if numel == 0:
            return np.zeros(size, dtype=src.dtype)
        last = storage_offset + sum((n - 1) * s for n, s in zip(size, stride, strict=True))
        if last >= src.size:
            raise ConversionError(
                f"storage {storage.key} smaller than shape: a tensor of size {tuple(size)}, stride {tuple(stride)} "
                f"at offset {storage_offset} needs {last + 1} elements but the storage has {src.size}",
                path=self._path,
                hint="the file is corrupt or was crafted; " + _HINT_REGENERATE,
            )
        view = np.lib.stride_tricks.as_strided(
            src[storage_offset:], shape=size, strides=tuple(s * src.itemsize for s in stride), writeable=False
        )
        return np.array(view, copy=True, order="C")

    def _rebuild_tensor_v2(
        self,
        storage: Any,
        storage_offset: Any,
        size: Any,
        stride: Any,
        requires_grad: Any = False,
        backward_hooks: Any = None,
        metadata: Any = None,
    ) -> np.ndarray:
        # requires_grad, hooks and python metadata do not affect the values.
        return self._rebuild_tensor(storage, storage_offset, size, stride)

    def _rebuild_parameter(self, data: Any, requires_grad: Any = False, backward_hooks: Any = None) -> np.ndarray:
        if not isinstance(data, np.ndarray):
            raise ConversionError("parameter rebuilt from something that is not a tensor", path=self._path)
        return data


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


def read_torch_zip(path: str | Path, *, max_total_bytes: int = DEFAULT_MAX_TOTAL_BYTES) -> dict[str, np.ndarray]:
    """Return the ``{name: array}`` dict saved with ``torch.save`` in ``path``.

    float32 → float32, float16 → float16, bfloat16 → float32 (exact).  Raises
    ``UnsafeInputError`` for any pickle global outside the tensor whitelist and
    ``ConversionError`` for anything malformed, oversized or not a flat dict of
    tensors.  Nothing from the file is ever executed.
    """
    path = Path(path)
    try:
        zf = zipfile.ZipFile(path)
    except FileNotFoundError:
        raise ConversionError("file not found", path=path) from None
    except (zipfile.BadZipFile, OSError, ValueError, EOFError) as e:
        raise ConversionError(
            f"cannot open as a zip archive ({e}); the file is truncated, corrupt, or a legacy non-zip torch file",
            path=path,
            hint="download it again, or re-save it with torch>=1.6 (zip format)",
        ) from None
    with zf:
        prefix = _find_archive_prefix(zf, path)
        try:
            order = zf.read(f"{prefix}/byteorder") if f"{prefix}/byteorder" in zf.namelist() else b"little"
            pkl_info = zf.getinfo(f"{prefix}/data.pkl")
            if pkl_info.file_size > MAX_PICKLE_BYTES:
                raise ConversionError(
                    f"data.pkl is {pkl_info.file_size} bytes (limit {MAX_PICKLE_BYTES})",
                    path=path,
                    hint="a dict of tensors pickles to a few KB; this is not an adapter checkpoint",
                )
            data = zf.read(pkl_info)
        except DeltaMemError:
            raise
        except (zipfile.BadZipFile, OSError, EOFError, ValueError) as e:
            raise ConversionError(f"corrupt zip archive ({e})", path=path, hint="download the file again") from None
        if order.strip() != b"little":
            raise ConversionError(
                f"byteorder is {order.strip()[:16]!r}; only little-endian checkpoints are supported", path=path
            )
        unpickler = _SafeUnpickler(data, zf, prefix, path, max_total_bytes)
        try:
            obj = unpickler.load()
        except DeltaMemError:
            raise
        except Exception as e:  # any failure of a hostile or corrupt pickle becomes one error type
            raise ConversionError(
                f"malformed checkpoint pickle ({type(e).__name__}: {e})", path=path, hint=_HINT_REGENERATE
            ) from None
    return _as_tensor_dict(obj, path)


def _as_tensor_dict(obj: Any, path: Path) -> dict[str, np.ndarray]:
    if not isinstance(obj, dict):
        raise ConversionError(
            f"checkpoint holds a {type(obj).__name__}, expected a dict of tensors", path=path, hint=_HINT_REGENERATE
        )
    out: dict[str, np.ndarray] = {}
    for k, v in obj.items():
        if not isinstance(k, str):
            raise ConversionError(f"checkpoint key {k!r:.60} is not a string", path=path)
        if not isinstance(v, np.ndarray):
            raise ConversionError(
                f"checkpoint entry {k!r} is a {type(v).__name__}, expected a tensor",
                path=path,
                hint="the file must be a flat {name: tensor} dict as written by upstream save_delta_mem_adapter",
            )
        out[k] = v
    return out
