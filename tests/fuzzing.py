"""Shared parts of the parser fuzz tests (tests/test_fuzz_*.py): profiles, mutations, the oracle.

Profiles (``DELTAMEM_FUZZ_PROFILE``):

* ``ci`` (default, ``make test``): 100 examples per test, three or four tests per
  parser, ``derandomize=True`` so every run tries the same inputs;
* ``fuzz`` (``make fuzz``, via scripts/fuzz.py): random seeds, ``DELTAMEM_FUZZ_EXAMPLES``
  examples per call, repeated until the time budget is spent.

The oracle: a parser either returns or raises a ``DeltaMemError``; anything else
(an ``IndexError``, ``struct.error``, ``MemoryError``, ...) fails the test, as does
a Python-level allocation larger than ``alloc_bound`` (tracemalloc sees numpy and
the pickle memo too) and an example slower than the deadline (a hang).
"""

from __future__ import annotations

import atexit
import os
import shutil
import struct
import tempfile
import tracemalloc
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path
from typing import Any

from hypothesis import HealthCheck, settings
from hypothesis import strategies as st

from deltamem_edge.errors import DeltaMemError

PROFILE_ENV = "DELTAMEM_FUZZ_PROFILE"
_COMMON: dict[str, Any] = {
    "database": None,
    "suppress_health_check": [HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much],
}
settings.register_profile("ci", max_examples=100, derandomize=True, deadline=timedelta(seconds=5), **_COMMON)
settings.register_profile(
    "fuzz",
    max_examples=int(os.environ.get("DELTAMEM_FUZZ_EXAMPLES", "500")),
    derandomize=False,
    deadline=timedelta(seconds=10),
    **_COMMON,
)
settings.load_profile(os.environ.get(PROFILE_ENV, "ci"))

# Values a hostile size field takes: zero, one, the int32/uint32/int64/uint64 edges, -1 as unsigned.
SPECIAL = [0, 1, 2**31 - 1, 2**31, 2**32 - 1, 2**63 - 1, 2**63, 2**64 - 1, 2**64 - 2]

_DIR = Path(tempfile.mkdtemp(prefix="deltamem-fuzz-"))
atexit.register(shutil.rmtree, _DIR, True)


def scratch(name: str, data: bytes) -> Path:
    """Write ``data`` to a scratch file (readers take paths); one file per name, overwritten."""
    p = _DIR / name
    p.write_bytes(data)
    return p


def alloc_bound(n_input: int) -> int:
    """What parsing ``n_input`` bytes may allocate: 32 MiB plus 16x the input (no size field trusted)."""
    return (32 << 20) + 16 * n_input


def parse_or_refuse(parse: Callable[[], Any], n_input: int) -> Any:
    """Run ``parse``: return its result, or None if it raised a DeltaMemError; check the allocation bound."""
    tracemalloc.start()
    try:
        try:
            return parse()
        except DeltaMemError:
            return None
    finally:
        _, peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
        assert peak <= alloc_bound(n_input), f"parsing {n_input} bytes allocated {peak} bytes"


def _put(data: bytearray, offset: int, value: int, width: int) -> None:
    if offset + width <= len(data):
        data[offset : offset + width] = (value % (1 << (8 * width))).to_bytes(width, "little")


@st.composite
def mutated(draw: st.DrawFn, valid: bytes, fields: list[tuple[int, int]] = ()) -> bytes:
    """``valid`` after 1-3 mutations: truncation, bit flips, a size field (or any offset) set to an edge value,
    inserted or deleted bytes.  ``fields`` are (offset, width) of the format's known size fields."""
    data = bytearray(valid)
    for _ in range(draw(st.integers(1, 3))):
        kind = draw(st.sampled_from(["truncate", "flip", "field", "anywhere", "insert", "delete"]))
        n = len(data)
        if kind == "truncate" and n:
            del data[draw(st.integers(0, n - 1)) :]
        elif kind == "flip" and n:
            for _ in range(draw(st.integers(1, 8))):
                i = draw(st.integers(0, n - 1))
                data[i] ^= 1 << draw(st.integers(0, 7))
        elif kind == "field" and fields:
            off, width = draw(st.sampled_from(list(fields)))
            _put(data, off, draw(st.sampled_from(SPECIAL)), width)
        elif kind == "anywhere" and n:
            width = draw(st.sampled_from([1, 2, 4, 8]))
            _put(data, draw(st.integers(0, n - 1)), draw(st.sampled_from(SPECIAL)), width)
        elif kind == "insert":
            i = draw(st.integers(0, n))
            data[i:i] = draw(st.binary(min_size=1, max_size=64))
        elif kind == "delete" and n:
            i = draw(st.integers(0, n - 1))
            del data[i : i + draw(st.integers(1, 64))]
    return bytes(data)


def u64_fields(*offsets: int) -> list[tuple[int, int]]:
    return [(o, 8) for o in offsets]


def pack_u64(value: int) -> bytes:
    return struct.pack("<Q", value)
