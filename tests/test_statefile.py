"""Tests for deltamem_edge.statefile: one group per reliability case of ecosystem.md §5.4 (1-12).

Headers for hostile files are packed here with ``struct`` from the layout in
docs/state-format.md (independently of the module's own Struct), so these tests
also pin the documented byte layout.  States are random and non-zero (seeded), so
a writer that dropped or reordered values would fail.

Regenerate the golden file (only when the format version changes, into a new
file name)::

    PYTHONPATH=. .venv/bin/python tests/test_statefile.py write-golden
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import random
import signal
import struct
import subprocess
import sys
import time
import tracemalloc
from pathlib import Path

import numpy as np
import pytest

from deltamem_edge import statefile as sf
from deltamem_edge.errors import StateFileError, StateLockedError, StateMismatchError

ROOT = Path(__file__).resolve().parents[1]
DATA = Path(__file__).resolve().parent / "data"
GOLDEN = DATA / "state_v1_golden.state"

# Layout of the version-1 fixed header, as documented (offsets in the comments).
HEADER_FMT = "<8sHHI32s32s64s64sIIIIHHIQQQqq"
HEADER_SIZE = 272
FIELDS = (
    "magic", "version", "flags", "header_len",  # 0, 8, 10, 12
    "adapter_fp", "model_fp", "adapter_label", "model_label",  # 16, 48, 80, 144
    "n_layers", "rows", "rank", "state_heads",  # 208, 212, 216, 220
    "dtype", "reserved", "transcript_len", "payload_len",  # 224, 226, 228, 232
    "tokens_written", "turns", "created_us", "updated_us",  # 240, 248, 256, 264
)  # fmt: skip

FP_A = hashlib.sha256(b"test adapter").digest()
FP_M = hashlib.sha256(b"test model").digest()
QWEN_SHAPE = (36, 8, 8)


def _env() -> dict[str, str]:
    """Environment for child processes: they import the package from this checkout."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    return env


def _random_mem(
    seed: int = 0, shape: tuple[int, int, int] = QWEN_SHAPE, *, heads: int = 1, transcript: bool = False
) -> sf.MemoryState:
    """A valid, non-zero memory from a seeded rng."""
    rng = np.random.default_rng(seed)
    state = rng.standard_normal(shape).astype(np.float32)
    header = sf.StateHeader(
        adapter_fp=FP_A,
        model_fp=FP_M,
        n_layers=shape[0],
        rows=shape[1],
        rank=shape[2],
        state_heads=heads,
        adapter_label="delta-mem_qwen3_4b-instruct",
        model_label="Qwen3-4B-Instruct-2507",
        tokens_written=int(rng.integers(1, 10**9)),
        turns=int(rng.integers(1, 1000)),
        created_us=1_767_225_600_000_000,
        updated_us=1_767_225_600_000_000 + int(rng.integers(1, 10**9)),
    )
    msgs = [
        {"role": "user", "content": "Remember: my cat is called Ödön."},
        {"role": "assistant", "content": 'Noted "Ödön".\n'},
    ]
    return sf.MemoryState(header=header, state=state, transcript=msgs if transcript else [])


def _fields(**overrides: object) -> dict[str, object]:
    """Header fields of a valid 36x8x8 file without transcript, with overrides."""
    f: dict[str, object] = dict(
        magic=b"DMEMSTAT", version=1, flags=0, header_len=HEADER_SIZE,
        adapter_fp=FP_A, model_fp=FP_M, adapter_label=b"adapter", model_label=b"model",
        n_layers=36, rows=8, rank=8, state_heads=1, dtype=1, reserved=0,
        transcript_len=0, payload_len=36 * 8 * 8 * 4,
        tokens_written=7, turns=2, created_us=1, updated_us=2,
    )  # fmt: skip
    f.update(overrides)
    return f


def _pack(fields: dict[str, object], payload: bytes, transcript: bytes = b"", extra_header: bytes = b"") -> bytes:
    """Build a file image by hand, with a *correct* checksum (so only the tested field is wrong)."""
    header = struct.pack(HEADER_FMT, *(fields[k] for k in FIELDS)) + extra_header
    body = header + payload + transcript
    return body + hashlib.sha256(body).digest()


def _reseal(data: bytes) -> bytes:
    """Recompute the trailing sha256 after editing a file image."""
    return data[:-32] + hashlib.sha256(data[:-32]).digest()


def _payload(seed: int = 1, n: int = 36 * 8 * 8) -> bytes:
    return np.random.default_rng(seed).standard_normal(n).astype("<f4").tobytes()


def _assert_same(a: sf.MemoryState, b: sf.MemoryState) -> None:
    assert a.header == b.header
    assert a.state.dtype == b.state.dtype == np.float32
    assert a.state.shape == b.state.shape
    assert a.state.tobytes() == b.state.tobytes()
    assert a.transcript == b.transcript


def _snapshot(mem: sf.MemoryState) -> tuple[sf.StateHeader, bytes, str]:
    return mem.header, mem.state.tobytes(), json.dumps(mem.transcript)


def _dir_entries(d: Path) -> set[str]:
    return set(os.listdir(d))


# ---------------------------------------------------------------------------------------
# Layout and size
# ---------------------------------------------------------------------------------------


def test_layout_matches_documented_struct_and_size() -> None:
    """The module's bytes equal a file packed by hand from the documented layout; 36x8x8 is 9520 B."""
    mem = _random_mem(3)
    data = sf.encode(mem)
    assert len(data) == 272 + 9216 + 32 == 9520 <= 16 * 1024
    h = mem.header
    fields = _fields(
        adapter_label=h.adapter_label.encode(), model_label=h.model_label.encode(),
        tokens_written=h.tokens_written, turns=h.turns, created_us=h.created_us, updated_us=h.updated_us,
    )  # fmt: skip
    assert data == _pack(fields, mem.state.astype("<f4").tobytes())
    assert struct.calcsize(HEADER_FMT) == sf.HEADER_SIZE_V1 == HEADER_SIZE


# ---------------------------------------------------------------------------------------
# §5.4-1 truncation at every offset; live state untouched
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("with_transcript", [False, True])
def test_truncation_at_every_offset_raises_and_live_state_is_untouched(with_transcript: bool) -> None:
    live = _random_mem(11, transcript=with_transcript)
    before = _snapshot(live)
    data = sf.encode(_random_mem(12, transcript=with_transcript))
    for k in range(len(data)):
        with pytest.raises(StateFileError) as ei:
            sf.decode(data[:k], path="me.state")
        assert "me.state" in str(ei.value)
        assert ei.value.hint
    with pytest.raises(StateFileError, match="declares"):
        sf.decode(data + b"\0", path="me.state")
    assert _snapshot(live) == before


def test_truncated_file_on_disk_load_fails_and_keeps_live_state(tmp_path: Path) -> None:
    path = tmp_path / "me.state"
    with sf.MemoryFile(path) as mf:
        mf.save(_random_mem(21))
        live = mf.load()
        assert live is not None
        before = _snapshot(live)
        good = path.read_bytes()
        for k in (0, 1, 8, 271, 272, 273, len(good) // 2, len(good) - 1):
            path.write_bytes(good[:k])
            with pytest.raises(StateFileError, match="me.state"):
                live = mf.load() or live
            assert path.read_bytes() == good[:k]  # a failed load never rewrites the file
        assert _snapshot(live) == before


# ---------------------------------------------------------------------------------------
# §5.4-2 bit flips
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("with_transcript", [False, True])
def test_single_bit_flip_at_every_byte_is_detected(with_transcript: bool) -> None:
    data = sf.encode(_random_mem(31, transcript=with_transcript))
    rng = random.Random(31)
    for i in range(len(data)):
        flipped = bytearray(data)
        flipped[i] ^= 1 << rng.randrange(8)
        with pytest.raises(StateFileError):
            sf.decode(bytes(flipped), path="me.state")


def test_every_bit_of_header_and_checksum_is_covered() -> None:
    data = sf.encode(_random_mem(32))
    positions = [*range(HEADER_SIZE), *range(len(data) - 32, len(data))]
    for i in positions:
        for bit in range(8):
            flipped = bytearray(data)
            flipped[i] ^= 1 << bit
            with pytest.raises(StateFileError) as ei:
                sf.decode(bytes(flipped), path="me.state")
            assert not isinstance(ei.value, StateMismatchError)


# ---------------------------------------------------------------------------------------
# §5.4-3 magic, version, flags, header length
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("magic", [b"DMEMSTAU", b"\0" * 8, b"GGUF\x03\0\0\0", b"dmemstat"])
def test_wrong_magic(magic: bytes) -> None:
    data = _pack(_fields(magic=magic), _payload())
    with pytest.raises(StateFileError, match="not a deltamem-edge state file"):
        sf.decode(data, path="me.state")


def test_version_zero_is_invalid() -> None:
    with pytest.raises(StateFileError, match="invalid state file format version 0"):
        sf.decode(_pack(_fields(version=0), _payload()), path="me.state")


@pytest.mark.parametrize("version", [2, 0x7FFF, 0xFFFF])
def test_future_version_names_both_versions(version: int) -> None:
    with pytest.raises(StateFileError) as ei:
        sf.decode(_pack(_fields(version=version), _payload()), path="me.state")
    msg = str(ei.value)
    assert f"version {version}" in msg and "version 1" in msg and "me.state" in msg
    assert "upgrade" in ei.value.hint


@pytest.mark.parametrize("flags", [0x0002, 0x0004, 0x8000, 0xFFFE])
def test_unknown_flags_are_rejected(flags: int) -> None:
    with pytest.raises(StateFileError, match="unknown flags"):
        sf.decode(_pack(_fields(flags=flags), _payload()), path="me.state")


def test_longer_header_is_skipped_as_documented() -> None:
    """Forward-compat rule: a v1 file may carry extra header bytes; v1 readers skip them."""
    payload = _payload(5)
    data = _pack(_fields(header_len=HEADER_SIZE + 16), payload, extra_header=b"future-field\0\0\0\0")
    mem = sf.decode(data, path="me.state")
    assert mem.state.tobytes() == payload
    assert sf.encode(mem) == _pack(_fields(), payload)  # re-written as plain v1


@pytest.mark.parametrize("header_len", [0, HEADER_SIZE - 8, HEADER_SIZE + 4, 4096 + 8, 0xFFFFFFFF])
def test_bad_header_length(header_len: int) -> None:
    with pytest.raises(StateFileError, match="header length"):
        sf.decode(_pack(_fields(header_len=header_len), _payload()), path="me.state")


@pytest.mark.parametrize(("field", "value"), [("dtype", 0), ("dtype", 2), ("reserved", 1)])
def test_unknown_dtype_or_reserved(field: str, value: int) -> None:
    with pytest.raises(StateFileError):
        sf.decode(_pack(_fields(**{field: value}), _payload()), path="me.state")


# ---------------------------------------------------------------------------------------
# §5.4-4 identity mismatch
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("adapter", "model", "shape"),
    [
        (hashlib.sha256(b"other adapter").digest(), FP_M, QWEN_SHAPE),
        (FP_A, hashlib.sha256(b"other model").digest(), QWEN_SHAPE),
        (FP_A, FP_M, (28, 8, 8)),  # other layer count
        (FP_A, FP_M, (36, 16, 16)),  # other rank
        (FP_A, FP_M, (36, 32, 8)),  # other state_heads (MSW)
    ],
)
def test_mismatch_is_refused_naming_both_sides(
    tmp_path: Path, adapter: bytes, model: bytes, shape: tuple[int, int, int]
) -> None:
    path = tmp_path / "me.state"
    with sf.MemoryFile(path) as mf:
        mf.save(_random_mem(41))
        before = path.read_bytes()
        with pytest.raises(StateMismatchError) as ei:
            mf.load(adapter_fp=adapter, model_fp=model, shape=shape)
    msg = str(ei.value)
    for fp in (FP_A, adapter, FP_M, model):
        assert fp.hex()[:12] in msg
    assert str(list(QWEN_SHAPE)) in msg and str(list(shape)) in msg
    assert str(path) in msg and "not modified" in ei.value.hint
    assert path.read_bytes() == before  # never reset


def test_mismatch_late_in_fingerprint_shows_a_distinguishing_prefix() -> None:
    other = FP_A[:-1] + bytes([FP_A[-1] ^ 1])
    with pytest.raises(StateMismatchError) as ei:
        sf.check_compatible(_random_mem(42), other, FP_M, QWEN_SHAPE, path="me.state")
    assert FP_A.hex() in str(ei.value) and other.hex() in str(ei.value)


def test_matching_identity_passes() -> None:
    sf.check_compatible(_random_mem(43), FP_A, FP_M, QWEN_SHAPE)


def test_replace_from_bytes_validates_like_load_and_keeps_the_old_file_on_refusal(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An upload replaces the file only if load would accept it; then the bytes are exactly the upload."""
    path = tmp_path / "me.state"
    upload = sf.encode(_random_mem(50, transcript=True))
    with sf.MemoryFile(path) as mf:
        mf.save(_random_mem(51))
        before = path.read_bytes()
        flipped = bytearray(upload)
        flipped[len(flipped) // 2] ^= 0x10
        foreign = sf.encode(_random_mem(52)).replace(FP_A, hashlib.sha256(b"other adapter").digest())
        refusals = [
            (bytes(flipped), StateFileError, "checksum"),
            (upload[:-1], StateFileError, "the uploaded state file"),
            (b"", StateFileError, "the uploaded state file"),
            (_reseal(foreign), StateMismatchError, "adapter fingerprint"),
        ]
        for data, error, words in refusals:
            with pytest.raises(error, match=words):
                mf.replace_from_bytes(data, adapter_fp=FP_A, model_fp=FP_M, shape=QWEN_SHAPE)
            assert path.read_bytes() == before
        with monkeypatch.context() as m:  # the size bound of a load, without building a 64 MiB upload
            m.setattr(sf.store, "MAX_FILE_BYTES", len(upload) - 1)  # where the bound is read
            with pytest.raises(StateFileError, match="larger than any valid state file"):
                mf.replace_from_bytes(upload, adapter_fp=FP_A, model_fp=FP_M, shape=QWEN_SHAPE)
        assert path.read_bytes() == before
        with pytest.raises(StateMismatchError):  # the shape is part of the identity
            mf.replace_from_bytes(upload, adapter_fp=FP_A, model_fp=FP_M, shape=(36, 16, 16))
        mem = mf.replace_from_bytes(upload, adapter_fp=FP_A, model_fp=FP_M, shape=QWEN_SHAPE)
        _assert_same(mem, _random_mem(50, transcript=True))
        assert path.read_bytes() == upload and sf.read_state_bytes(path) == upload
        _assert_same(mf.load(adapter_fp=FP_A, model_fp=FP_M, shape=QWEN_SHAPE), mem)
    assert sorted(_dir_entries(tmp_path)) == [".me.state.lock", "me.state"]  # no temp file left
    with sf.MemoryFile(path, readonly=True) as ro, pytest.raises(StateFileError, match="read-only"):
        ro.replace_from_bytes(upload, adapter_fp=FP_A, model_fp=FP_M, shape=QWEN_SHAPE)


# ---------------------------------------------------------------------------------------
# §5.4-5 absurd sizes, with a valid checksum, without big allocations
# ---------------------------------------------------------------------------------------

# (header overrides, what the error must name): the specific check must fire, not a later one.
ABSURD: list[tuple[dict[str, int], str]] = [
    ({"n_layers": 0}, "n_layers 0 "),
    ({"n_layers": 0xFFFFFFFF}, "n_layers 4294967295"),  # -1 as u32
    ({"n_layers": 0x80000000}, "n_layers 2147483648"),  # negative as i32
    ({"n_layers": 1025}, "n_layers 1025"),
    ({"rank": 0}, "rank 0 "),
    ({"rank": 65}, "rank 65"),
    ({"rank": 0xFFFFFFFF}, "rank 4294967295"),
    ({"rows": 0}, "rows 0 "),
    ({"rows": 0xFFFFFFFF}, "rows 4294967295"),
    ({"rows": 16}, r"rows 16 != rank 8 \* state_heads 1"),
    ({"state_heads": 0}, "state_heads 0 "),
    ({"state_heads": 0xFFFFFFFF}, "state_heads 4294967295"),
    ({"n_layers": 513}, "n_layers 513"),  # above LLAMA_MAX_LAYERS
    ({"rank": 33, "rows": 33}, "rank 33"),  # above what the loader attaches (supported.MAX_RANK)
    ({"state_heads": 65, "rows": 520}, "state_heads 65"),  # above supported.MAX_STATE_HEADS
    ({"n_layers": 512, "rows": 2048, "rank": 32, "state_heads": 64}, "payload length 9216 != 512x2048x32"),  # the
    # largest shape the loader attaches is valid (128 MiB declared); the short file is refused without allocating
    ({"payload_len": 0}, "payload length 0 "),
    ({"payload_len": 2**32}, f"payload length {2**32}"),
    ({"payload_len": 2**63}, f"payload length {2**63}"),
    ({"payload_len": 2**64 - 1}, f"payload length {2**64 - 1}"),
    ({"payload_len": 36 * 8 * 8 * 4 + 4}, "payload length 9220"),
    ({"transcript_len": 0xFFFFFFFF, "flags": 1}, "transcript length 4294967295"),
    ({"transcript_len": 64 * 1024 + 1, "flags": 1}, "transcript length 65537"),
    ({"transcript_len": 5, "flags": 0}, "transcript length 5"),
    ({"header_len": 0xFFFFFFFF}, "header length 4294967295"),
]


@pytest.mark.parametrize(
    ("overrides", "names"), ABSURD, ids=[",".join(f"{k}={v}" for k, v in o.items()) for o, _ in ABSURD]
)
def test_absurd_sizes_rejected_without_allocation(overrides: dict[str, int], names: str) -> None:
    """Each header has a correct checksum; tracemalloc proves nothing big was allocated."""
    data = _pack(_fields(**overrides), _payload())
    tracemalloc.start()
    try:
        with pytest.raises(StateFileError, match=names):
            sf.decode(data, path="me.state")
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 1_000_000


@pytest.mark.parametrize(
    ("shape", "heads"),
    [((2, 20 * 4, 4), 20), ((1, 64 * 32, 32), 64), ((512, 1, 1), 1)],
    ids=["20-heads", "64-heads-rank-32", "512-layers"],
)
def test_every_shape_the_loader_attaches_round_trips(shape: tuple[int, int, int], heads: int) -> None:
    """The state file stores whatever the native loader can attach (supported.py), up to its limits."""
    mem = _random_mem(91, shape, heads=heads, transcript=True)
    data = sf.encode(mem)
    _assert_same(sf.decode(data, path="me.state"), mem)
    assert sf.encode(sf.decode(data, path="me.state")) == data


@pytest.mark.parametrize("delta", [-4, 4, 1])
def test_payload_length_differs_from_declared(delta: int) -> None:
    payload = _payload()
    payload = payload[:delta] if delta < 0 else payload + b"\0" * delta
    with pytest.raises(StateFileError, match="declares"):
        sf.decode(_pack(_fields(), payload), path="me.state")


def test_huge_file_on_disk_is_refused_before_reading(tmp_path: Path) -> None:
    path = tmp_path / "huge.state"
    with open(path, "wb") as f:
        f.truncate(2**31)  # sparse: costs no disk
    tracemalloc.start()
    try:
        with pytest.raises(StateFileError, match="larger than any valid state file"):
            sf.read_state_file(path)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 1_000_000


def test_non_regular_file_is_refused(tmp_path: Path) -> None:
    fifo = tmp_path / "fifo.state"
    os.mkfifo(fifo)
    with pytest.raises(StateFileError, match="not a regular file"):
        sf.read_state_file(fifo)


# ---------------------------------------------------------------------------------------
# §5.4-6 NaN / Inf: policy is reject, on load and on save
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_non_finite_payload_is_rejected(bad: float) -> None:
    values = np.frombuffer(_payload(7), dtype="<f4").copy()
    values[5 * 64 + 3] = bad
    with pytest.raises(StateFileError, match=r"NaN/Inf.*layer 5"):
        sf.decode(_pack(_fields(), values.tobytes()), path="me.state")


def test_non_finite_state_is_not_saved_and_old_file_stays(tmp_path: Path) -> None:
    path = tmp_path / "me.state"
    with sf.MemoryFile(path) as mf:
        mf.save(_random_mem(61))
        before = path.read_bytes()
        bad = _random_mem(62)
        bad.state[0, 0, 0] = np.nan
        with pytest.raises(ValueError, match="NaN"):
            sf.encode(bad)
        with pytest.raises(StateFileError, match="NaN"):
            mf.save(bad)
    assert path.read_bytes() == before


# ---------------------------------------------------------------------------------------
# §5.4-7 crash mid-write: SIGKILL a writer at random times
# ---------------------------------------------------------------------------------------

# Shared by the test and the child so both know every state the child can write.
_CRASH_STATE_SRC = """
import numpy as np
from deltamem_edge import statefile as sf

def crash_state(k):
    rng = np.random.default_rng(10_000 + k)
    state = rng.standard_normal((36, 8, 8)).astype(np.float32)
    header = sf.StateHeader(adapter_fp=b"A" * 32, model_fp=b"M" * 32, n_layers=36, rows=8, rank=8,
                            tokens_written=k, turns=k // 3, created_us=1, updated_us=k)
    transcript = [{"role": "user", "content": "x" * (k % 97)}] if k % 2 else []
    return sf.MemoryState(header=header, state=state, transcript=transcript)
"""

_CRASH_CHILD_SRC = (
    _CRASH_STATE_SRC
    + """
import sys
path, k = sys.argv[1], int(sys.argv[2])
with sf.MemoryFile(path) as mf:
    sys.stdout.write("ready\\n")
    sys.stdout.flush()
    while True:
        mf.save(crash_state(k))
        k += 1
"""
)


def test_sigkill_during_saves_leaves_old_or_new_file(tmp_path: Path) -> None:
    """50 writers (5 lanes x 10 rounds, lanes run in parallel to keep this ~5 s) are
    SIGKILLed at random moments while saving in a loop; each file is always one
    complete state: the one before the round or one the killed writer saved."""
    ns: dict[str, object] = {}
    exec(_CRASH_STATE_SRC, ns)  # our own constant source, shared with the child
    crash_state = ns["crash_state"]
    lanes, rounds, rng = 5, 10, random.Random(7)
    paths = [tmp_path / f"lane{i}" / "me.state" for i in range(lanes)]
    prev = [0] * lanes
    for p in paths:
        p.parent.mkdir()
        with sf.MemoryFile(p) as mf:
            mf.save(crash_state(0))  # type: ignore[operator]
    new_seen = temps_seen = 0
    for r in range(rounds):
        starts = [(r * lanes + i + 1) * 100_000 for i in range(lanes)]
        procs = [
            subprocess.Popen(
                [sys.executable, "-c", _CRASH_CHILD_SRC, str(p), str(s)], stdout=subprocess.PIPE, env=_env()
            )
            for p, s in zip(paths, starts, strict=True)
        ]
        try:
            for proc in procs:
                assert proc.stdout is not None and proc.stdout.readline() == b"ready\n"
            t0 = time.monotonic()
            for i in sorted(range(lanes), key=lambda _: rng.random()):
                time.sleep(max(0.0, t0 + rng.uniform(0.005, 0.06) - time.monotonic()))
                procs[i].send_signal(signal.SIGKILL)
        finally:
            for proc in procs:
                proc.kill()
                proc.wait()
                if proc.stdout is not None:
                    proc.stdout.close()
        for i, p in enumerate(paths):
            mem = sf.read_state_file(p)
            k = mem.header.tokens_written
            assert k == prev[i] or starts[i] <= k < starts[i] + 100_000, (r, i, k, prev[i])
            _assert_same(mem, crash_state(k))  # type: ignore[operator]
            new_seen += k != prev[i]
            prev[i] = k
            temps_seen += any(".tmp-" in n for n in os.listdir(p.parent))
            with sf.MemoryFile(p):  # the next writer removes the dead writer's temp file
                assert not any(".tmp-" in n for n in os.listdir(p.parent))
    assert new_seen >= 20  # most kills really hit a writer that had been saving
    print(f"crash test: {new_seen}/{lanes * rounds} kills after a new save, {temps_seen} left a temp file")


_KILL_AT_SRC = """
import os, signal, sys
import numpy as np
from deltamem_edge import statefile as sf
path, point = sys.argv[1], sys.argv[2]
mem = sf.MemoryState.new(adapter_fp=b"A" * 32, model_fp=b"M" * 32, state=np.full((36, 8, 8), 2.5, np.float32))
real_write = os.write
def die(*args, **kwargs):
    os.kill(os.getpid(), signal.SIGKILL)
def half_then_die(fd, data):
    real_write(fd, bytes(data)[: len(data) // 2])
    die()
with sf.MemoryFile(path) as mf:
    setattr(os, point, {"write": half_then_die}.get(point, die))
    mf.save(mem)
"""


@pytest.mark.parametrize("point", ["write", "fsync", "replace"])
def test_kill_at_each_step_of_a_save(tmp_path: Path, point: str) -> None:
    """Fault injection: the writer SIGKILLs itself mid-write, before fsync, or just before
    the rename.  The old file is intact, the dead temp file is removed by the next writer."""
    path = tmp_path / "me.state"
    with sf.MemoryFile(path) as mf:
        mf.save(_random_mem(71))
    before = path.read_bytes()
    proc = subprocess.run([sys.executable, "-c", _KILL_AT_SRC, str(path), point], env=_env(), timeout=60)
    assert proc.returncode == -signal.SIGKILL
    assert path.read_bytes() == before
    temps = [n for n in os.listdir(tmp_path) if sf.temp_name_pattern(path.name).fullmatch(n)]
    assert len(temps) == 1
    with sf.MemoryFile(path) as mf:
        assert not any(".tmp-" in n for n in os.listdir(tmp_path))
        mem = mf.load()
    assert mem is not None
    _assert_same(mem, _random_mem(71))


# ---------------------------------------------------------------------------------------
# §5.4-8 two writers
# ---------------------------------------------------------------------------------------

_HOLDER_SRC = """
import sys
from deltamem_edge import statefile as sf
mf = sf.MemoryFile(sys.argv[1])
sys.stdout.write("locked\\n")
sys.stdout.flush()
sys.stdin.read()
"""


def test_second_writer_gets_locked_error_naming_pid(tmp_path: Path) -> None:
    path = tmp_path / "me.state"
    with sf.MemoryFile(path) as mf:
        mf.save(_random_mem(81))
    proc = subprocess.Popen(
        [sys.executable, "-c", _HOLDER_SRC, str(path)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=_env()
    )
    try:
        assert proc.stdout is not None and proc.stdout.readline() == b"locked\n"
        with pytest.raises(StateLockedError) as ei:
            sf.MemoryFile(path)
        assert f"in use by pid {proc.pid}" in str(ei.value) and str(path) in str(ei.value)
        assert "read-only" in ei.value.hint
        with sf.MemoryFile(path, readonly=True) as ro:  # readers are never blocked
            mem = ro.load()
            assert mem is not None
            _assert_same(mem, _random_mem(81))
            with pytest.raises(StateFileError, match="read-only"):
                ro.save(mem)
    finally:
        assert proc.stdin is not None
        proc.stdin.close()
        proc.wait(timeout=10)
        if proc.stdout is not None:
            proc.stdout.close()
    with sf.MemoryFile(path) as mf:  # the lock went away with the process
        mf.save(_random_mem(82))


def test_second_writer_in_same_process_is_locked(tmp_path: Path) -> None:
    path = tmp_path / "me.state"
    with sf.MemoryFile(path), pytest.raises(StateLockedError, match=rf"pid {os.getpid()} \(this process\)"):
        sf.MemoryFile(path)
    sf.MemoryFile(path).close()


# ---------------------------------------------------------------------------------------
# §5.4-9 read-only directory, disk full, unwritable target
# ---------------------------------------------------------------------------------------


def _make_dir_readonly(d: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    """chmod 0o500; if that does not stop writes (root has CAP_DAC_OVERRIDE), make os.open
    refuse to create entries in ``d`` with EACCES, which is what a 0o500 directory does."""
    d.chmod(0o500)
    probe = d / "probe"
    try:
        probe.write_bytes(b"")
    except PermissionError:
        return "chmod"
    probe.unlink()
    real_open = os.open

    def guarded_open(p: object, flags: int, mode: int = 0o777, *, dir_fd: int | None = None) -> int:
        target = Path(os.fsdecode(p))  # type: ignore[arg-type]
        if target.parent == d and flags & os.O_CREAT and (flags & os.O_EXCL or not target.exists()):
            raise OSError(errno.EACCES, os.strerror(errno.EACCES), str(target))
        return real_open(p, flags, mode, dir_fd=dir_fd)

    monkeypatch.setattr(os, "open", guarded_open)
    return "monkeypatched os.open"


def test_readonly_directory(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Read-only directory: chmod 0o500, or (as root, where chmod does not stop writes)
    os.open monkeypatched to raise EACCES for new entries.  A writer that cannot make
    its lock file gets a clear error; one that already had a lock file cannot save;
    the original stays intact and read-only access works."""
    d = tmp_path / "ro"
    d.mkdir()
    path, other = d / "me.state", d / "fresh.state"
    with sf.MemoryFile(path) as mf:
        mf.save(_random_mem(91))
    before = path.read_bytes()
    try:
        print(f"read-only mechanism: {_make_dir_readonly(d, monkeypatch)}")
        entries = _dir_entries(d)
        with pytest.raises(StateFileError) as ei:
            sf.MemoryFile(other)
        assert "lock file" in str(ei.value) and str(other) in str(ei.value) and "read-only" in ei.value.hint
        with sf.MemoryFile(path) as mf:  # lock file exists from before: the lock works, the save cannot
            with pytest.raises(StateFileError) as ei:
                mf.save(_random_mem(92))
            assert "Permission denied" in str(ei.value) and str(path) in str(ei.value)
        with sf.MemoryFile(path, readonly=True) as ro:
            mem = ro.load()
            assert mem is not None
            _assert_same(mem, _random_mem(91))
        with sf.MemoryFile(other, readonly=True) as ro:
            assert ro.load() is None and not ro.exists()
        assert path.read_bytes() == before
        assert _dir_entries(d) == entries
    finally:
        d.chmod(0o700)


@pytest.mark.parametrize("where", ["write", "write-partial", "fsync"])
def test_disk_full_keeps_original_and_leaves_no_temp(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, where: str
) -> None:
    """ENOSPC injected by monkeypatching os.write (at once, or after a partial write) or os.fsync."""
    path = tmp_path / "me.state"
    mf = sf.MemoryFile(path)
    mf.save(_random_mem(95))
    before, entries = path.read_bytes(), _dir_entries(tmp_path)
    real_write, calls = os.write, []

    def enospc(*args: object) -> int:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    def partial(fd: int, data: bytes) -> int:
        calls.append(fd)
        if len(calls) == 1:
            return real_write(fd, bytes(data)[: len(data) // 2])
        return enospc()

    monkeypatch.setattr(
        os,
        {"write": "write", "write-partial": "write", "fsync": "fsync"}[where],
        {"write": enospc, "write-partial": partial, "fsync": enospc}[where],
    )
    with pytest.raises(StateFileError) as ei:
        mf.save(_random_mem(96, transcript=True))
    monkeypatch.undo()
    mf.close()
    assert "No space left on device" in str(ei.value) and str(path) in str(ei.value)
    assert "disk space" in ei.value.hint
    assert path.read_bytes() == before
    assert _dir_entries(tmp_path) == entries


def test_target_is_a_directory(tmp_path: Path) -> None:
    """The rename itself fails (EISDIR/ENOTEMPTY): error, no temp file left."""
    path = tmp_path / "me.state"
    (path / "child").mkdir(parents=True)
    with sf.MemoryFile(path) as mf:
        with pytest.raises(StateFileError, match="could not save"):
            mf.save(_random_mem(97))
        with pytest.raises(StateFileError, match="not a regular file"):
            mf.load()
    assert not any(".tmp-" in n for n in os.listdir(tmp_path))


def test_missing_directory(tmp_path: Path) -> None:
    with pytest.raises(StateFileError, match="lock file"):
        sf.MemoryFile(tmp_path / "nope" / "me.state")


# ---------------------------------------------------------------------------------------
# §5.4-10 names
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "name",
    [
        "../x",
        "..",
        "a/../b",
        "/abs",
        "a/b",
        "a\\b",
        ".hidden",
        ".",
        "",
        "x" * 129,
        "x" * 300,
        "a..b",
        "a\0b",
        "a\nb",
        "name\n",
        "é",
        " a",
        "a b",
    ],
)
def test_bad_names_are_rejected(tmp_path: Path, name: str) -> None:
    with pytest.raises(StateFileError, match="memory name"):
        sf.memory_path_for(name, tmp_path)


@pytest.mark.parametrize("name", ["alice", "a.state", "A-b_c.9", "x" * 128, "-x"])
def test_good_names_resolve_inside(tmp_path: Path, name: str) -> None:
    p = sf.memory_path_for(name, tmp_path)
    assert p == tmp_path / name and p.resolve().parent == tmp_path.resolve()


def test_symlink_escaping_the_directory_is_rejected(tmp_path: Path) -> None:
    (tmp_path / "mem").mkdir()
    (tmp_path / "mem" / "evil").symlink_to(tmp_path / "outside.state")
    with pytest.raises(StateFileError, match="outside"):
        sf.memory_path_for("evil", tmp_path / "mem")


# ---------------------------------------------------------------------------------------
# §5.4-11 round-trip determinism
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("shape", "heads", "transcript"),
    [(QWEN_SHAPE, 1, False), (QWEN_SHAPE, 1, True), ((36, 32, 8), 4, True), ((1, 1, 1), 1, False)],
)
def test_round_trip_is_byte_exact(tmp_path: Path, shape: tuple[int, int, int], heads: int, transcript: bool) -> None:
    mem = _random_mem(111, shape, heads=heads, transcript=transcript)
    mem.state[0, 0, 0] = -0.0  # sign of zero survives
    data = sf.encode(mem)
    back = sf.decode(data, path="me.state")
    _assert_same(back, mem)
    assert sf.encode(back) == data
    path = tmp_path / "me.state"
    with sf.MemoryFile(path) as mf:
        mf.save(back)
        assert path.read_bytes() == data
        again = mf.load()
        assert again is not None
        mf.save(again)
    assert path.read_bytes() == data
    assert (os.stat(path).st_mode & 0o777) == 0o600


def test_decoded_state_is_a_fresh_writable_array() -> None:
    data = bytearray(sf.encode(_random_mem(112)))
    mem = sf.decode(data, path="me.state")
    assert mem.state.flags.writeable and mem.state.flags.c_contiguous and mem.state.dtype == np.float32
    mem.state += 1.0
    assert sf.decode(data, path="me.state").state.tobytes() != mem.state.tobytes()


def test_non_canonical_or_malformed_transcript_is_rejected() -> None:
    payload = _payload()
    cases = [
        b'[{"role": "user", "content": "hi"}]',  # spaces
        b'[{"content":"hi","role":"user"}]',  # key order
        b'[{"role":"user","content":"hi","x":1}]',
        b'[{"role":"user","content":1}]',
        b'{"role":"user","content":"hi"}',
        b"[]",
        b"[" * 5000 + b"]" * 5000,
        b'[{"role":"user","content":"\\ud800"}]',
        b'[{"role":"user","content":NaN}]',
        b"\xff\xfe",
    ]
    for raw in cases:
        data = _pack(_fields(flags=1, transcript_len=len(raw)), payload, raw)
        with pytest.raises(StateFileError, match="transcript"):
            sf.decode(data, path="me.state")


def test_trim_transcript_keeps_last_turns_within_cap() -> None:
    msgs = [{"role": "system", "content": "sys"}]
    for i in range(10):
        msgs += [{"role": "user", "content": f"q{i}"}, {"role": "assistant", "content": f"a{i}"}]
    kept = sf.trim_transcript(msgs, 3)
    assert kept == msgs[-6:]
    assert sf.trim_transcript(msgs, 100) == msgs
    assert sf.trim_transcript(msgs, 0) == []
    big = [{"role": "user", "content": "x" * 40_000} for _ in range(3)]
    kept = sf.trim_transcript(big, 10)
    assert kept == big[-1:]
    mem = _random_mem(113)
    mem.transcript = big
    with pytest.raises(ValueError, match="trim_transcript"):
        sf.encode(mem)


def test_labels_are_capped() -> None:
    assert len(sf.clip_label("ü" * 100).encode()) <= sf.LABEL_MAX_BYTES
    with pytest.raises(ValueError, match="adapter_label"):
        sf.StateHeader(adapter_fp=FP_A, model_fp=FP_M, n_layers=1, rows=1, rank=1, adapter_label="x" * 65)
    mem = sf.MemoryState.new(adapter_fp=FP_A, model_fp=FP_M, state=np.ones((2, 8, 8)), adapter_label="y" * 200)
    assert mem.header.adapter_label == "y" * 64 and mem.header.created_us == mem.header.updated_us > 0


# ---------------------------------------------------------------------------------------
# §5.4-12 golden file of format version 1
# ---------------------------------------------------------------------------------------

GOLDEN_SEED = 20260115
GOLDEN_SHAPE = (3, 16, 8)  # 3 layers, 2 state heads of rank 8
GOLDEN_SHA256 = "5ccb02545baea2b483a5261077bcb75612136684ddc1cc99f9d79236ca4beec5"


def _golden_expected() -> sf.MemoryState:
    """The golden memory, from constants and stdlib ``random`` (stable across versions)."""
    rng = random.Random(GOLDEN_SEED)
    n = GOLDEN_SHAPE[0] * GOLDEN_SHAPE[1] * GOLDEN_SHAPE[2]
    values = np.array([rng.uniform(-4.0, 4.0) for _ in range(n)], dtype=np.float64).astype(np.float32)
    header = sf.StateHeader(
        adapter_fp=hashlib.sha256(b"golden adapter").digest(),
        model_fp=hashlib.sha256(b"golden model").digest(),
        n_layers=3,
        rows=16,
        rank=8,
        state_heads=2,
        adapter_label="δ-mem golden adapter",
        model_label="Qwen3-4B-Instruct-2507",
        tokens_written=1_234_567_890_123,
        turns=42,
        created_us=1_767_225_600_000_000,  # 2026-01-01T00:00:00Z
        updated_us=1_767_229_200_123_456,
    )
    transcript = [
        {"role": "system", "content": "You are a helpful assistant."},
        {"role": "user", "content": 'My cat is "Ödön" 🐈\nremember it.'},
        {"role": "assistant", "content": "I will remember Ödön."},
    ]
    return sf.MemoryState(header=header, state=values.reshape(GOLDEN_SHAPE), transcript=transcript)


def _write_golden() -> None:
    """Write tests/data/state_v1_golden.state.  Run by hand, once per format version."""
    DATA.mkdir(exist_ok=True)
    data = sf.encode(_golden_expected())
    GOLDEN.write_bytes(data)
    print(f"wrote {GOLDEN} ({len(data)} bytes, sha256 {hashlib.sha256(data).hexdigest()})")


def test_golden_v1_file_loads_with_every_field() -> None:
    raw = GOLDEN.read_bytes()
    assert hashlib.sha256(raw).hexdigest() == GOLDEN_SHA256, "the golden file changed: never rewrite a released golden"
    mem = sf.read_state_file(GOLDEN)
    want = _golden_expected()
    h, w = mem.header, want.header
    assert (h.n_layers, h.rows, h.rank, h.state_heads) == (3, 16, 8, 2)
    assert h.adapter_fp == hashlib.sha256(b"golden adapter").digest() == w.adapter_fp
    assert h.model_fp == hashlib.sha256(b"golden model").digest() == w.model_fp
    assert h.adapter_label == "δ-mem golden adapter" and h.model_label == "Qwen3-4B-Instruct-2507"
    assert (h.tokens_written, h.turns) == (1_234_567_890_123, 42)
    assert (h.created_us, h.updated_us) == (1_767_225_600_000_000, 1_767_229_200_123_456)
    assert h == w
    assert mem.state.shape == GOLDEN_SHAPE and mem.state.dtype == np.float32
    assert np.array_equal(mem.state, want.state)
    assert mem.transcript == want.transcript
    assert raw[:8] == b"DMEMSTAT" and struct.unpack_from("<HHI", raw, 8) == (1, 1, HEADER_SIZE)
    assert sf.encode(want) == raw  # the writer still produces version-1 bytes exactly


if __name__ == "__main__":
    if sys.argv[1:] == ["write-golden"]:
        _write_golden()
    else:
        sys.exit("usage: PYTHONPATH=. python tests/test_statefile.py write-golden")
