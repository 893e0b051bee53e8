"""Fuzz the safetensors reader: random bytes, mutated files, mutated JSON headers, round trips.

Valid files come from the safetensors library itself (an independent writer).
Header mutations set a shape dim or a data offset to an edge value (including
negative numbers and 2**64-1) and rewrite the length prefix, so the checks behind
the JSON parse see them.
"""

from __future__ import annotations

import json
import struct

import numpy as np
import pytest
from fuzzing import SPECIAL, mutated, parse_or_refuse, scratch
from hypothesis import given
from hypothesis import strategies as st

from deltamem_edge.converter.safetensors_reader import read_safetensors

st_numpy = pytest.importorskip("safetensors.numpy")


@st.composite
def array_dicts(draw: st.DrawFn) -> dict[str, np.ndarray]:
    out = {}
    for i in range(draw(st.integers(1, 4))):
        shape = tuple(draw(st.lists(st.integers(0, 5), max_size=3)))
        rng = np.random.default_rng(draw(st.integers(0, 2**16)))
        out[f"t{i}"] = rng.standard_normal(shape).astype(draw(st.sampled_from([np.float32, np.float16])))
    return out


def _read(data: bytes):
    return parse_or_refuse(lambda: read_safetensors(scratch("fuzz.safetensors", data)), len(data))


@given(array_dicts())
def test_valid_files_round_trip(d: dict[str, np.ndarray]) -> None:
    got = read_safetensors(scratch("valid.safetensors", st_numpy.save(d)))
    assert set(got) == set(d)
    for k, a in d.items():
        assert got[k].dtype == a.dtype and got[k].shape == a.shape
        np.testing.assert_array_equal(got[k], a)


@given(st.binary(max_size=4096))
def test_random_bytes_are_refused_cleanly(data: bytes) -> None:
    assert _read(data) is None
    assert _read(struct.pack("<Q", len(data)) + data) is None or data.startswith(b"{")


@given(array_dicts(), st.data())
def test_mutated_files_read_or_are_refused(d: dict[str, np.ndarray], data: st.DataObject) -> None:
    _read(data.draw(mutated(st_numpy.save(d), [(0, 8), (4, 4)])))


@given(array_dicts(), st.data())
def test_mutated_headers_read_or_are_refused(d: dict[str, np.ndarray], data: st.DataObject) -> None:
    raw = st_numpy.save(d)
    n = struct.unpack_from("<Q", raw)[0]
    header = json.loads(raw[8 : 8 + n])
    name = data.draw(st.sampled_from(sorted(k for k in header if k != "__metadata__")))
    entry = header[name]
    field = data.draw(st.sampled_from(["shape", "data_offsets"]))
    values = entry[field]
    value = data.draw(st.sampled_from(SPECIAL + [-1, -(2**63), 2**64, 10**30]) | st.just(None))
    if value is None:
        entry[field] = data.draw(st.sampled_from([[], "x", {"a": 1}, [1.5], [True], None]))
    elif values:
        values[data.draw(st.integers(0, len(values) - 1))] = value
    else:
        values.append(value)
    text = json.dumps(header).encode()
    got = _read(struct.pack("<Q", len(text)) + text + raw[8 + n :])
    if got is not None:
        assert all(a.size * a.itemsize <= len(raw) for a in got.values())
