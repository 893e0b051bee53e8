"""Writers of hostile checkpoint files for the tests: hand-made zips, torch-layout pickles, a zip bomb.

Why by hand: the cases (an entry that inflates 1000:1, a storage key reused with
two sizes, strides past the storage, 5,000 entries) are exactly what torch.save
and zipfile never write.  The zip writer is the format's plain layout (local
headers, central directory, end record) so that every size field is ours to set.
The pickles use the real ``torch._utils._rebuild_tensor_v2`` and storage classes
as globals, i.e. the bytes torch.save writes, with sizes of our choosing.
"""

from __future__ import annotations

import collections
import pickle
import struct
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

BOMB_CHUNK = 16 << 20


@dataclass
class Entry:
    """One zip entry: ``data`` stored as is, or a raw deflate ``stream`` that inflates to ``size`` bytes."""

    name: str
    data: bytes | None = None
    stream: bytes | None = None
    size: int = 0
    crc: int = 0

    def record(self) -> tuple[int, bytes, int, int]:
        """(method, bytes on disk, crc32, inflated size)."""
        if self.stream is None:
            assert self.data is not None
            return 0, self.data, zlib.crc32(self.data), len(self.data)
        return 8, self.stream, self.crc, self.size


def zip_bytes(entries: list[Entry]) -> bytes:
    """A classic (non-zip64) zip of ``entries``; sizes and CRCs are whatever the entries say."""
    out = bytearray()
    central = bytearray()
    for e in entries:
        method, body, crc, size = e.record()
        name = e.name.encode()
        offset = len(out)
        out += struct.pack("<4s5H3L2H", b"PK\x03\x04", 20, 0, method, 0, 0x21, crc, len(body), size, len(name), 0)
        out += name + body
        central += struct.pack(
            "<4s6H3L5H2L", b"PK\x01\x02", 20, 20, 0, method, 0, 0x21, crc, len(body), size, len(name), 0, 0, 0, 0, 0,
            offset,
        )  # fmt: skip
        central += name
    cd_offset = len(out)
    out += central
    out += struct.pack("<4s4H2LH", b"PK\x05\x06", 0, 0, len(entries), len(entries), len(central), cd_offset, 0)
    return bytes(out)


class StorageRef:
    """A storage as torch pickles it: a persistent id (key, numel, storage class name)."""

    def __init__(self, key: str, numel: int, kind: str = "FloatStorage") -> None:
        self.key, self.numel, self.kind = key, numel, kind


class TensorRef:
    """A tensor as torch pickles it: ``_rebuild_tensor_v2(storage, offset, size, stride, ...)``."""

    def __init__(self, storage: StorageRef, offset: int, size: tuple[int, ...], stride: tuple[int, ...]) -> None:
        self.storage, self.offset, self.size, self.stride = storage, offset, size, stride

    def __reduce__(self) -> Any:
        import torch._utils

        args = (self.storage, self.offset, self.size, self.stride, False, collections.OrderedDict())
        return (torch._utils._rebuild_tensor_v2, args)


class _TorchLayoutPickler(pickle.Pickler):
    def persistent_id(self, obj: Any) -> Any:
        if isinstance(obj, StorageRef):
            import torch

            return ("storage", getattr(torch, obj.kind), obj.key, "cpu", obj.numel)
        return None


def tensor_pickle(tensors: dict[str, TensorRef]) -> bytes:
    """``data.pkl`` for ``{name: tensor}``, protocol 2 like torch.save."""
    import io

    buf = io.BytesIO()
    _TorchLayoutPickler(buf, protocol=2).dump(tensors)
    return buf.getvalue()


def checkpoint(tensors: dict[str, TensorRef], storages: dict[str, Entry | bytes], prefix: str = "archive") -> bytes:
    """A torch.save-layout zip: data.pkl, byteorder, version and one ``data/<key>`` entry per storage."""
    entries = [Entry(f"{prefix}/data.pkl", tensor_pickle(tensors)), Entry(f"{prefix}/byteorder", b"little")]
    for key, body in storages.items():
        entries.append(body if isinstance(body, Entry) else Entry(f"{prefix}/data/{key}", body))
    entries.append(Entry(f"{prefix}/version", b"3\n"))
    return zip_bytes(entries)


def contiguous(storage: StorageRef, shape: tuple[int, ...], offset: int = 0) -> TensorRef:
    stride, step = [], 1
    for n in reversed(shape):
        stride.append(step)
        step *= n
    return TensorRef(storage, offset, shape, tuple(reversed(stride)))


def zeros_bomb(size: int) -> Entry:
    """A deflate stream of ``size`` zero bytes (a multiple of 16 MiB): ~1/1000 of that on disk.

    Built from one 16 MiB chunk compressed with a full flush (which resets the
    window, so the same bytes encode every chunk), repeated; the CRC is the real one.
    """
    assert size % BOMB_CHUNK == 0
    zero = bytes(BOMB_CHUNK)
    c = zlib.compressobj(9, zlib.DEFLATED, -15)
    first = c.compress(zero) + c.flush(zlib.Z_FULL_FLUSH)
    second = c.compress(zero) + c.flush(zlib.Z_FULL_FLUSH)
    assert first == second, "zlib did not encode two zero chunks alike"
    n = size // BOMB_CHUNK
    stream = first * n + c.flush(zlib.Z_FINISH)
    crc = 0
    for _ in range(n):
        crc = zlib.crc32(zero, crc)
    return Entry("", stream=stream, size=size, crc=crc)


def torch_like_dict(arrays: dict[str, np.ndarray]) -> tuple[dict[str, TensorRef], dict[str, bytes]]:
    """Tensors and storage bytes for float32 arrays, one storage each, keys "0", "1", ... like torch.save."""
    tensors, storages = {}, {}
    for i, (name, a) in enumerate(arrays.items()):
        a = np.ascontiguousarray(a, dtype="<f4")
        ref = StorageRef(str(i), a.size)
        tensors[name] = contiguous(ref, a.shape)
        storages[str(i)] = a.tobytes()
    return tensors, storages


def write(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path
