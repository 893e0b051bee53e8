"""Fuzz the state-file decoder (statefile.decode): random bytes, mutated files, round trips.

A mutated file is also re-checksummed, so the steps after the sha256 (labels,
payload values, transcript JSON) see hostile bytes too, not only the checksum.
"""

from __future__ import annotations

import hashlib

import numpy as np
from fuzzing import mutated, parse_or_refuse
from hypothesis import given
from hypothesis import strategies as st

from deltamem_edge import statefile as sf

# (offset, width) of every size, count and code field of the version-1 header (docs/state-format.md)
FIELDS = [(8, 2), (10, 2), (12, 4), (208, 4), (212, 4), (216, 4), (220, 4), (224, 2), (226, 2), (228, 4),
          (232, 8), (240, 8), (248, 8), (256, 8), (264, 8)]


@st.composite
def memories(draw: st.DrawFn) -> sf.MemoryState:
    n_layers, rank, heads = draw(st.integers(1, 4)), draw(st.integers(1, 4)), draw(st.integers(1, 3))
    shape = (n_layers, rank * heads, rank)
    values = draw(st.lists(st.floats(width=32, allow_nan=False, allow_infinity=False), min_size=int(np.prod(shape)), max_size=int(np.prod(shape))))
    text = st.text(max_size=20)
    mem = sf.MemoryState.new(
        adapter_fp=draw(st.binary(min_size=32, max_size=32)),
        model_fp=draw(st.binary(min_size=32, max_size=32)),
        state=np.array(values, dtype=np.float32).reshape(shape),
        state_heads=heads,
        adapter_label=sf.clip_label(draw(text)),
        model_label=sf.clip_label(draw(text)),
    )
    roles = st.sampled_from(["user", "assistant", "system"])
    messages = draw(st.lists(st.fixed_dictionaries({"role": roles, "content": text}), max_size=3))
    mem.transcript = messages
    return mem


def _decode(data: bytes):
    return parse_or_refuse(lambda: sf.decode(data, path="fuzz.state"), len(data))


@given(memories())
def test_valid_state_files_round_trip(mem: sf.MemoryState) -> None:
    data = sf.encode(mem)
    got = sf.decode(data, path="x.state")
    assert got.header == mem.header
    np.testing.assert_array_equal(got.state, mem.state)
    assert got.transcript == mem.transcript
    assert sf.encode(got) == data  # byte-exact


@given(st.binary(max_size=2048))
def test_random_bytes_are_refused_cleanly(data: bytes) -> None:
    assert _decode(data) is None
    assert _decode(sf.MAGIC + data) is None


@given(memories(), st.data())
def test_mutated_state_files_decode_or_are_refused(mem: sf.MemoryState, data: st.DataObject) -> None:
    valid = sf.encode(mem)
    bad = data.draw(mutated(valid, FIELDS))
    got = _decode(bad)
    assert got is None or sf.encode(got) == bad  # what decodes is exactly what re-encodes
    if len(bad) >= sf.CHECKSUM_SIZE:
        body = bad[: -sf.CHECKSUM_SIZE]
        resealed = body + hashlib.sha256(body).digest()
        got = _decode(resealed)
        assert got is None or sf.encode(got) == resealed
