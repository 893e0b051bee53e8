"""Fuzz the torch-zip reader (converter/torch_zip.py): random bytes, mutated zips, mutated pickles, round trips.

Mutating the whole file mostly trips zipfile's CRC, so the pickle is also mutated
on its own and re-zipped with a correct CRC (tests/hostile.py): then the opcode
scan, the unpickler's stand-ins and the storage checks see the hostile bytes.
"""

from __future__ import annotations

import io
import struct
import zipfile

import hostile as H
import numpy as np
import pytest
from fuzzing import mutated, parse_or_refuse, scratch
from hypothesis import given
from hypothesis import strategies as st

from deltamem_edge.converter.torch_zip import read_torch_zip

torch = pytest.importorskip("torch")  # writes the genuine files the mutations start from

DTYPES = {"f32": torch.float32, "f16": torch.float16, "bf16": torch.bfloat16}


@st.composite
def tensor_dicts(draw: st.DrawFn) -> dict:
    out = {}
    for i in range(draw(st.integers(1, 4))):
        shape = tuple(draw(st.lists(st.integers(0, 5), max_size=3)))
        gen = torch.Generator().manual_seed(draw(st.integers(0, 2**16)))
        t = torch.randn(shape, generator=gen).to(DTYPES[draw(st.sampled_from(list(DTYPES)))])
        if t.ndim == 2 and draw(st.booleans()):
            t = t.t()  # a strided view of its storage
        out[f"t{i}"] = t
    return out


def _save(d: dict) -> bytes:
    buf = io.BytesIO()
    torch.save(d, buf)
    return buf.getvalue()


def _zip_fields(data: bytes) -> list[tuple[int, int]]:
    """(offset, width) of the size, count and offset fields of every zip record in ``data``."""
    fields = []
    for sig, rel in ((b"PK\x03\x04", [(18, 4), (22, 4), (26, 2), (28, 2)]),
                     (b"PK\x01\x02", [(20, 4), (24, 4), (28, 2), (30, 2), (42, 4)]),
                     (b"PK\x05\x06", [(8, 2), (10, 2), (12, 4), (16, 4)]),
                     (b"PK\x06\x06", [(24, 8), (32, 8), (40, 8), (48, 8)]),
                     (b"PK\x06\x07", [(8, 8)])):
        at = data.find(sig)
        while at >= 0:
            fields += [(at + o, w) for o, w in rel]
            at = data.find(sig, at + 1)
    return fields


def _read(data: bytes):
    return parse_or_refuse(lambda: read_torch_zip(scratch("fuzz.pt", data)), len(data))


def _rezip(valid: bytes, pickle_bytes: bytes) -> bytes:
    with zipfile.ZipFile(io.BytesIO(valid)) as z:
        entries = [H.Entry(i.filename, pickle_bytes if i.filename.endswith("/data.pkl") else z.read(i))
                   for i in z.infolist()]
    return H.zip_bytes(entries)


@given(tensor_dicts())
def test_valid_checkpoints_round_trip(d: dict) -> None:
    got = read_torch_zip(scratch("valid.pt", _save(d)))
    assert list(got) == list(d)
    for k, t in d.items():
        want = t.float().numpy() if t.dtype == torch.bfloat16 else t.numpy()
        assert got[k].dtype == want.dtype and got[k].shape == want.shape
        np.testing.assert_array_equal(got[k], want)


@given(st.binary(max_size=4096))
def test_random_bytes_are_refused_cleanly(data: bytes) -> None:
    assert _read(data) is None
    assert _read(b"PK\x03\x04" + data) is None


@given(tensor_dicts(), st.data())
def test_mutated_zips_read_or_are_refused(d: dict, data: st.DataObject) -> None:
    valid = _save(d)
    _read(data.draw(mutated(valid, _zip_fields(valid))))


@given(tensor_dicts(), st.data())
def test_mutated_pickles_read_or_are_refused(d: dict, data: st.DataObject) -> None:
    valid = _save(d)
    with zipfile.ZipFile(io.BytesIO(valid)) as z:
        pkl = z.read(next(n for n in z.namelist() if n.endswith("/data.pkl")))
    # the int arguments torch writes (BININT 'J', BININT1 'K', BININT2 'M'): sizes, strides, offsets, numel
    fields = [(i + 1, {74: 4, 75: 1, 77: 2}[b]) for i, b in enumerate(pkl) if b in (74, 75, 77)]
    bad = data.draw(mutated(pkl, fields))
    got = _read(_rezip(valid, bad))
    if got is not None:
        assert all(isinstance(v, np.ndarray) for v in got.values())


def test_pickle_int_fields_reach_the_checks() -> None:
    """The mutation above does hit real fields: setting a BININT size to 2**31-1 is refused, not crashed."""
    valid = _save({"w": torch.ones(70, 3)})
    with zipfile.ZipFile(io.BytesIO(valid)) as z:
        pkl = bytearray(z.read(next(n for n in z.namelist() if n.endswith("/data.pkl"))))
    i = pkl.index(b"KF")  # BININT1 70: the first dim of the size tuple
    pkl[i : i + 2] = b"J" + struct.pack("<i", 2**31 - 1)[:1]
    pkl[i + 2 : i + 2] = struct.pack("<i", 2**31 - 1)[1:]
    assert _read(_rezip(valid, bytes(pkl))) is None
