"""Fuzz the GGUF header reader: random bytes, mutated files, round trips against gguf-py's writer.

``_size_fields`` walks a file we just wrote (only the value types we write) and
returns every length, count, dim, type and offset field, so mutations set exactly
those to 0, 2**32-1, 2**64-1 and friends, the fields of llama.cpp's GGUF CVEs.
"""

from __future__ import annotations

import struct

import gguf
import numpy as np
from fuzzing import mutated, parse_or_refuse, scratch
from hypothesis import given
from hypothesis import strategies as st

from deltamem_edge.gguf_header import read_gguf_header

VT = gguf.GGUFValueType
_FIXED = {VT.UINT8: 1, VT.INT8: 1, VT.UINT16: 2, VT.INT16: 2, VT.UINT32: 4, VT.INT32: 4, VT.FLOAT32: 4,
          VT.BOOL: 1, VT.UINT64: 8, VT.INT64: 8, VT.FLOAT64: 8}
names = st.text("abcdefghij._", min_size=1, max_size=12)


@st.composite
def gguf_files(draw: st.DrawFn) -> tuple[bytes, dict, dict]:
    path = scratch("valid.gguf", b"")
    w = gguf.GGUFWriter(path, "llama")
    kvs: dict = {}
    for key in draw(st.lists(names, max_size=5, unique=True)):
        kind = draw(st.sampled_from(["u32", "f32", "str", "bool", "arr_i32", "arr_str"]))
        key = "k." + key
        if kind == "u32":
            kvs[key] = draw(st.integers(0, 2**32 - 1))
            w.add_uint32(key, kvs[key])
        elif kind == "f32":
            kvs[key] = float(np.float32(draw(st.floats(-1e6, 1e6, width=32))))
            w.add_float32(key, kvs[key])
        elif kind == "str":
            kvs[key] = draw(st.text(min_size=1, max_size=16))  # gguf-py drops empty strings
            w.add_string(key, kvs[key])
        elif kind == "bool":
            kvs[key] = draw(st.booleans())
            w.add_bool(key, kvs[key])
        elif kind == "arr_i32":
            kvs[key] = draw(st.lists(st.integers(-(2**31), 2**31 - 1), min_size=1, max_size=6))  # gguf-py: int32
            w.add_array(key, kvs[key])
        else:
            kvs[key] = draw(st.lists(st.text(max_size=6), min_size=1, max_size=6))
            w.add_array(key, kvs[key])
    tensors: dict = {}
    for i in range(draw(st.integers(0, 3))):
        shape = (draw(st.integers(1, 4)), draw(st.integers(1, 40)))
        arr = np.random.default_rng(i).standard_normal(shape).astype(draw(st.sampled_from([np.float32, np.float16])))
        tensors[f"t{i}"] = arr
        w.add_tensor(f"t{i}", arr)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path.read_bytes(), kvs, tensors


def _size_fields(data: bytes) -> list[tuple[int, int]]:
    fields = [(8, 8), (16, 8)]
    n_tensors, n_kv = struct.unpack_from("<QQ", data, 8)
    pos = 24

    def string() -> None:
        nonlocal pos
        fields.append((pos, 8))
        pos += 8 + struct.unpack_from("<Q", data, pos)[0]

    for _ in range(n_kv):
        string()
        fields.append((pos, 4))
        (vt,) = struct.unpack_from("<I", data, pos)
        pos += 4
        if vt == VT.STRING:
            string()
        elif vt == VT.ARRAY:
            fields += [(pos, 4), (pos + 4, 8)]
            itype, count = struct.unpack_from("<IQ", data, pos)
            pos += 12
            for _ in range(count):
                if itype == VT.STRING:
                    string()
                else:
                    pos += _FIXED[itype]
        else:
            pos += _FIXED[vt]
    for _ in range(n_tensors):
        string()
        fields.append((pos, 4))
        (n_dims,) = struct.unpack_from("<I", data, pos)
        pos += 4
        fields += [(pos + 8 * i, 8) for i in range(n_dims)]
        pos += 8 * n_dims
        fields += [(pos, 4), (pos + 4, 8)]
        pos += 12
    return fields


def _read(data: bytes):
    return parse_or_refuse(lambda: read_gguf_header(scratch("fuzz.gguf", data), max_array=None), len(data))


@given(gguf_files())
def test_valid_files_round_trip(f: tuple[bytes, dict, dict]) -> None:
    data, kvs, tensors = f
    h = read_gguf_header(scratch("rt.gguf", data), max_array=None)
    assert h.fields["general.architecture"] == "llama"
    for k, v in kvs.items():
        assert h.fields[k] == v, k
    assert [t.name for t in h.tensors] == list(tensors)
    for t in h.tensors:
        a = tensors[t.name]
        assert t.shape == tuple(reversed(a.shape)) and t.n_bytes == a.nbytes
        np.testing.assert_array_equal(h.tensor_array(t), a.astype(np.float32))
    assert len(_size_fields(data)) >= 2 + 2 * len(kvs)


@given(st.binary(max_size=4096))
def test_random_bytes_are_refused_cleanly(data: bytes) -> None:
    assert _read(data) is None
    assert _read(b"GGUF\x03\x00\x00\x00" + data) is None or len(data) >= 16


@given(gguf_files(), st.data())
def test_mutated_files_read_or_are_refused(f: tuple[bytes, dict, dict], data: st.DataObject) -> None:
    valid = f[0]
    h = _read(data.draw(mutated(valid, _size_fields(valid))))
    if h is not None:
        assert all(t.offset + t.n_bytes <= h.file_size for t in h.tensors)
