"""The on-disk δ-mem memory of one conversation: format, validation, atomic save, lock.

Why this module is careful: the δ-state (float32, shape ``[n_layers, R, r]``,
9 KiB for the released Qwen3-4B rank-8 adapter) *is* the whole memory of a
conversation.  It must never be lost (atomic replace + fsync), never be applied to
the wrong model (fingerprints checked on load), never be read from a corrupt or
hostile file (every field bounded and checksummed before anything is allocated),
and never be written by two processes at once (advisory ``flock``).

It imports nothing of ours except the error family and no engine, so the CLI's
``memory inspect`` and the server can use it without loading a model.

Layout, validation order, locking and versioning are documented field by field in
``docs/state-format.md``; the constants below are the single source of truth.

Typical use::

    with MemoryFile(path) as mf:                 # exclusive lock, or StateLockedError
        mem = mf.load(adapter_fp=a, model_fp=m, shape=(36, 8, 8))  # None if new
        ...
        mf.save(mem)                             # atomic; old file kept on any error
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import re
import secrets
import stat
import struct
import time
from collections import namedtuple
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .errors import StateFileError, StateLockedError, StateMismatchError

try:  # fcntl is POSIX-only; without it only read-only access is possible.
    import fcntl
except ImportError:  # pragma: no cover - exercised on Windows only
    fcntl = None  # type: ignore[assignment]

__all__ = [
    "MAGIC",
    "FORMAT_VERSION",
    "FLAG_TRANSCRIPT",
    "HEADER_SIZE_V1",
    "CHECKSUM_SIZE",
    "FINGERPRINT_SIZE",
    "LABEL_MAX_BYTES",
    "TRANSCRIPT_MAX_BYTES",
    "StateHeader",
    "MemoryState",
    "MemoryFile",
    "encode",
    "decode",
    "read_state_file",
    "check_compatible",
    "memory_path_for",
    "trim_transcript",
    "clip_label",
    "now_us",
    "lock_path_for",
    "temp_name_pattern",
]

# --------------------------------------------------------------------------------------
# Format constants (version 1).  See docs/state-format.md for the table.
# --------------------------------------------------------------------------------------

MAGIC = b"DMEMSTAT"
FORMAT_VERSION = 1

FLAG_TRANSCRIPT = 1 << 0  # a transcript section follows the payload
KNOWN_FLAGS = FLAG_TRANSCRIPT

DTYPE_FLOAT32 = 1  # little-endian IEEE-754 binary32; the only dtype of version 1
_DTYPE_NAMES = {DTYPE_FLOAT32: "float32"}

FINGERPRINT_SIZE = 32
LABEL_MAX_BYTES = 64  # fixed-size, NUL-padded UTF-8 fields
CHECKSUM_SIZE = 32  # sha256

# <  little-endian, no implicit padding.  Offsets are listed in docs/state-format.md.
_HEADER_STRUCT = struct.Struct(
    "<8s"  # 0   magic
    "H"  # 8   format version
    "H"  # 10  flags
    "I"  # 12  header length (offset of the payload)
    "32s"  # 16  adapter fingerprint
    "32s"  # 48  base-model fingerprint
    "64s"  # 80  adapter label
    "64s"  # 144 base-model label
    "I"  # 208 n_layers
    "I"  # 212 rows (R = rank * state_heads)
    "I"  # 216 rank (r)
    "I"  # 220 state_heads (H)
    "H"  # 224 dtype code
    "H"  # 226 reserved, must be 0
    "I"  # 228 transcript length in bytes
    "Q"  # 232 payload length in bytes
    "Q"  # 240 tokens_written
    "Q"  # 248 turns
    "q"  # 256 created, µs since the Unix epoch
    "q"  # 264 updated, µs since the Unix epoch
)
HEADER_SIZE_V1 = _HEADER_STRUCT.size  # 272
_RawHeader = namedtuple(  # field names mirror _HEADER_STRUCT, in order
    "_RawHeader",
    "magic version flags header_len adapter_fp model_fp adapter_label model_label "
    "n_layers rows rank state_heads dtype reserved transcript_len payload_len "
    "tokens_written turns created_us updated_us",
)

# Bounds.  Real states are 36x8x8 (TSW) or 36x32x8 (MSW); these are "absurd" limits
# that still reject anything that could make us allocate or read much.
MAX_N_LAYERS = 1024
MAX_RANK = 64
MAX_STATE_HEADS = 16
MAX_ROWS = MAX_RANK * MAX_STATE_HEADS  # 1024
MAX_PAYLOAD_BYTES = 64 * 1024 * 1024
HEADER_MAX_BYTES = 4096  # header_len above this is treated as corrupt
TRANSCRIPT_MAX_BYTES = 64 * 1024
MAX_FILE_BYTES = HEADER_MAX_BYTES + MAX_PAYLOAD_BYTES + TRANSCRIPT_MAX_BYTES + CHECKSUM_SIZE

_U64_MAX = 2**64 - 1
_I64_MIN, _I64_MAX = -(2**63), 2**63 - 1

_NAME_RE = re.compile(r"[A-Za-z0-9._-]{1,128}")
_TRANSCRIPT_KEYS = ("role", "content")


# --------------------------------------------------------------------------------------
# In-memory objects
# --------------------------------------------------------------------------------------


def now_us() -> int:
    """Current wall-clock time in integer µs: integers keep encode/decode byte-exact."""
    return time.time_ns() // 1000


def clip_label(text: str, max_bytes: int = LABEL_MAX_BYTES) -> str:
    """Shorten ``text`` to at most ``max_bytes`` UTF-8 bytes on a character boundary.

    Why: labels are human hints (model / adapter names) stored in fixed 64-byte
    fields; callers clip long names explicitly instead of having encode fail.
    NUL characters are dropped because NUL is the padding byte.
    """
    raw = text.replace("\0", "").encode("utf-8")[:max_bytes]
    return raw.decode("utf-8", errors="ignore")


@dataclass(frozen=True)
class StateHeader:
    """Everything in a state file except the float payload and the transcript.

    ``adapter_fp`` / ``model_fp`` are 32 opaque bytes computed by the engine (for
    example sha256 of the adapter GGUF and of the base model's identity); this
    module only stores and compares them.  Labels are for humans and for error
    messages, never for identity.  Construction validates every field, so an
    invalid header cannot exist in memory.
    """

    adapter_fp: bytes
    model_fp: bytes
    n_layers: int
    rows: int
    rank: int
    state_heads: int = 1
    adapter_label: str = ""
    model_label: str = ""
    tokens_written: int = 0
    turns: int = 0
    created_us: int = 0
    updated_us: int = 0

    def __post_init__(self) -> None:
        problem = _header_problem(self)
        if problem is not None:
            raise ValueError(f"invalid state header: {problem}")

    @property
    def shape(self) -> tuple[int, int, int]:
        """The payload shape ``(n_layers, rows, rank)``."""
        return (self.n_layers, self.rows, self.rank)


def _header_problem(h: StateHeader) -> str | None:
    """Return why ``h`` cannot be written, or None.  Shared by construction and encode."""
    for name in ("adapter_fp", "model_fp"):
        fp = getattr(h, name)
        if not isinstance(fp, bytes) or len(fp) != FINGERPRINT_SIZE:
            return f"{name} must be {FINGERPRINT_SIZE} bytes"
    for name in ("adapter_label", "model_label"):
        label = getattr(h, name)
        if not isinstance(label, str) or "\0" in label:
            return f"{name} must be a str without NUL"
        try:
            size = len(label.encode("utf-8"))
        except UnicodeEncodeError:
            return f"{name} is not encodable as UTF-8"
        if size > LABEL_MAX_BYTES:
            return f"{name} is {size} bytes, the limit is {LABEL_MAX_BYTES} (use clip_label)"
    dims = (h.n_layers, h.rows, h.rank, h.state_heads)
    if not all(isinstance(v, int) and not isinstance(v, bool) for v in dims):
        return "n_layers, rows, rank and state_heads must be int"
    shape_problem = _shape_problem(*dims)
    if shape_problem is not None:
        return shape_problem
    for name in ("tokens_written", "turns"):
        v = getattr(h, name)
        if not isinstance(v, int) or not 0 <= v <= _U64_MAX:
            return f"{name} must be an int in [0, 2**64)"
    for name in ("created_us", "updated_us"):
        v = getattr(h, name)
        if not isinstance(v, int) or not _I64_MIN <= v <= _I64_MAX:
            return f"{name} must be an int64 count of µs"
    return None


def _shape_problem(n_layers: int, rows: int, rank: int, state_heads: int) -> str | None:
    """Bounds shared by the writer and the reader (Python ints: no overflow possible)."""
    if not 1 <= n_layers <= MAX_N_LAYERS:
        return f"n_layers {n_layers} is outside 1..{MAX_N_LAYERS}"
    if not 1 <= rank <= MAX_RANK:
        return f"rank {rank} is outside 1..{MAX_RANK}"
    if not 1 <= state_heads <= MAX_STATE_HEADS:
        return f"state_heads {state_heads} is outside 1..{MAX_STATE_HEADS}"
    if not 1 <= rows <= MAX_ROWS:
        return f"rows {rows} is outside 1..{MAX_ROWS}"
    if rows != rank * state_heads:
        return f"rows {rows} != rank {rank} * state_heads {state_heads}"
    if n_layers * rows * rank * 4 > MAX_PAYLOAD_BYTES:
        return f"payload of {n_layers}x{rows}x{rank} float32 exceeds {MAX_PAYLOAD_BYTES} bytes"
    return None


@dataclass
class MemoryState:
    """One conversation's memory as held in RAM.

    ``state`` is a C-contiguous float32 array of shape ``header.shape``; the
    engine may update it in place.  ``transcript`` is an optional list of recent
    ``{"role", "content"}`` messages (the δ-state is the memory; the transcript is
    a convenience for showing and for parity mode), capped at
    ``TRANSCRIPT_MAX_BYTES`` once encoded: use :func:`trim_transcript`.
    """

    header: StateHeader
    state: np.ndarray
    transcript: list[dict[str, str]] = field(default_factory=list)

    @classmethod
    def new(
        cls,
        *,
        adapter_fp: bytes,
        model_fp: bytes,
        state: np.ndarray,
        state_heads: int = 1,
        adapter_label: str = "",
        model_label: str = "",
    ) -> MemoryState:
        """A fresh memory: dims taken from ``state`` (copied), both timestamps = now."""
        arr = np.array(state, dtype=np.float32, order="C", copy=True)
        if arr.ndim != 3:
            raise ValueError(f"state must be 3-D [n_layers, rows, rank], got shape {arr.shape}")
        t = now_us()
        header = StateHeader(
            adapter_fp=adapter_fp,
            model_fp=model_fp,
            n_layers=arr.shape[0],
            rows=arr.shape[1],
            rank=arr.shape[2],
            state_heads=state_heads,
            adapter_label=clip_label(adapter_label),
            model_label=clip_label(model_label),
            created_us=t,
            updated_us=t,
        )
        return cls(header=header, state=arr)

    @property
    def shape(self) -> tuple[int, int, int]:
        """Declared shape (``header.shape``); encode checks ``state`` agrees."""
        return self.header.shape


# --------------------------------------------------------------------------------------
# Transcript helpers
# --------------------------------------------------------------------------------------


def _canonical_transcript(messages: Iterable[Mapping[str, str]]) -> bytes:
    """Compact UTF-8 JSON, keys in a fixed order: the one byte form we write and accept.

    Why canonical: decode rejects any other spelling, so a file that decodes always
    re-encodes to the same bytes (byte-exact round trips, golden files stay golden).
    Raises ValueError for anything that is not a list of {role, content} strings.
    """
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, Mapping) or set(m.keys()) != set(_TRANSCRIPT_KEYS):
            raise ValueError(f"transcript message {i} must have exactly the keys 'role' and 'content'")
        role, content = m["role"], m["content"]
        if not isinstance(role, str) or not isinstance(content, str) or not role:
            raise ValueError(f"transcript message {i}: role must be a non-empty str and content a str")
        out.append({"role": role, "content": content})
    try:
        return json.dumps(out, ensure_ascii=False, separators=(",", ":"), allow_nan=False).encode("utf-8")
    except UnicodeEncodeError as exc:  # lone surrogates
        raise ValueError(f"transcript is not valid Unicode: {exc}") from None


def trim_transcript(
    messages: Iterable[Mapping[str, str]], max_turns: int, *, max_bytes: int = TRANSCRIPT_MAX_BYTES
) -> list[dict[str, str]]:
    """Keep the last ``max_turns`` turns that also fit in ``max_bytes`` of encoded JSON.

    A turn starts at each ``"user"`` message; messages before the first user
    message (e.g. the system prompt) belong to the first turn.  If the last turns
    still do not fit, whole messages are dropped from the front, so the result is
    always encodable.  Why drop rather than cut text: the δ-state already holds the
    memory; a transcript with half a message would mislead a reader.
    """
    msgs = [{"role": m["role"], "content": m["content"]} for m in messages]
    if max_turns <= 0:
        return []
    starts = [i for i, m in enumerate(msgs) if m["role"] == "user" and i > 0]
    turn_starts = [0, *starts]
    if len(turn_starts) > max_turns:
        msgs = msgs[turn_starts[-max_turns] :]
    max_bytes = min(max_bytes, TRANSCRIPT_MAX_BYTES)
    while msgs and len(_canonical_transcript(msgs)) > max_bytes:
        msgs = msgs[1:]
    return msgs


# --------------------------------------------------------------------------------------
# Encode
# --------------------------------------------------------------------------------------


def _pack_label(label: str) -> bytes:
    """UTF-8, NUL-padded to the fixed field size (length checked by the header)."""
    return label.encode("utf-8").ljust(LABEL_MAX_BYTES, b"\0")


def encode(mem: MemoryState) -> bytes:
    """Serialise ``mem`` to the version-1 byte format.

    Raises ValueError if the object cannot be written faithfully (wrong dtype or
    shape, NaN/Inf, transcript over the cap): refusing to write keeps the previous
    good file instead of replacing it with one that would not load.
    """
    h = mem.header
    problem = _header_problem(h)
    if problem is not None:
        raise ValueError(f"invalid state header: {problem}")
    arr = mem.state
    if not isinstance(arr, np.ndarray) or arr.dtype != np.float32:
        raise ValueError("state must be a float32 numpy array")
    if arr.shape != h.shape:
        raise ValueError(f"state has shape {list(arr.shape)} but the header says {list(h.shape)}")
    if not np.isfinite(arr).all():
        raise ValueError(f"state holds {int(np.count_nonzero(~np.isfinite(arr)))} NaN/Inf values")
    transcript = _canonical_transcript(mem.transcript) if mem.transcript else b""
    if len(transcript) > TRANSCRIPT_MAX_BYTES:
        raise ValueError(f"transcript is {len(transcript)} bytes, the cap is {TRANSCRIPT_MAX_BYTES} (trim_transcript)")
    payload = arr.astype("<f4", copy=False).tobytes(order="C")
    header = _HEADER_STRUCT.pack(
        MAGIC,
        FORMAT_VERSION,
        FLAG_TRANSCRIPT if transcript else 0,
        HEADER_SIZE_V1,
        h.adapter_fp,
        h.model_fp,
        _pack_label(h.adapter_label),
        _pack_label(h.model_label),
        h.n_layers,
        h.rows,
        h.rank,
        h.state_heads,
        DTYPE_FLOAT32,
        0,
        len(transcript),
        len(payload),
        h.tokens_written,
        h.turns,
        h.created_us,
        h.updated_us,
    )
    body = header + payload + transcript
    return body + hashlib.sha256(body).digest()


# --------------------------------------------------------------------------------------
# Decode: validate everything, in an order where no step trusts an unchecked field
# --------------------------------------------------------------------------------------


def _corrupt(path: str | Path, message: str, hint: str | None = None) -> StateFileError:
    """A StateFileError for a file that is not a valid state (the file is never changed)."""
    return StateFileError(
        message,
        path=path,
        hint=hint
        or "the file is damaged or not a deltamem-edge memory; it was not modified. "
        "Restore it from a backup or start a new memory under another name.",
    )


def _unpack_label(raw: bytes, what: str, path: str | Path) -> str:
    """Fixed field -> str; padding must be all NUL so there is one encoding per label."""
    text, _, pad = raw.partition(b"\0")
    if pad.strip(b"\0"):
        raise _corrupt(path, f"{what} label has bytes after its NUL padding")
    try:
        return text.decode("utf-8")
    except UnicodeDecodeError:
        raise _corrupt(path, f"{what} label is not valid UTF-8") from None


def _decode_transcript(raw: memoryview, path: str | Path) -> list[dict[str, str]]:
    """Parse and validate the transcript section (already bounded to the cap)."""
    try:
        text = bytes(raw).decode("utf-8")
        parsed = json.loads(text, parse_constant=_reject_constant)
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise _corrupt(path, f"transcript is not valid UTF-8 JSON ({type(exc).__name__})") from None
    if not isinstance(parsed, list) or not parsed:
        raise _corrupt(path, "transcript must be a non-empty JSON list of messages")
    try:
        canonical = _canonical_transcript(parsed)
    except ValueError as exc:
        raise _corrupt(path, str(exc)) from None
    if canonical != bytes(raw):
        raise _corrupt(path, "transcript is not in canonical form (compact JSON, keys role then content)")
    return [{"role": m["role"], "content": m["content"]} for m in parsed]


def _reject_constant(name: str) -> None:
    """json.loads hook: NaN / Infinity literals are not JSON and never written by us."""
    raise ValueError(f"non-standard JSON constant {name}")


def _check_prefix(mv: memoryview, path: str | Path) -> _RawHeader:
    """Steps 1-5: enough bytes, our magic, a version and flags we understand, a sane header length.

    Why this order: a foreign file gets "not a state file" and a newer file gets
    "upgrade", instead of a misleading checksum error (a later version may even
    checksum differently).
    """
    n = len(mv)
    if n < HEADER_SIZE_V1 + CHECKSUM_SIZE:
        raise _corrupt(
            path, f"file is {n} bytes, too short for a state file (at least {HEADER_SIZE_V1 + CHECKSUM_SIZE})"
        )
    raw = _RawHeader._make(_HEADER_STRUCT.unpack_from(mv, 0))
    if raw.magic != MAGIC:
        raise _corrupt(path, f"not a deltamem-edge state file (magic {raw.magic!r}, expected {MAGIC!r})")
    if raw.version > FORMAT_VERSION:
        raise StateFileError(
            f"state file format version {raw.version} is newer than this deltamem-edge supports "
            f"(version {FORMAT_VERSION})",
            path=path,
            hint="upgrade deltamem-edge to read it; the file was not modified",
        )
    if raw.version != FORMAT_VERSION:
        raise _corrupt(
            path, f"invalid state file format version {raw.version} (this reader supports version {FORMAT_VERSION})"
        )
    if raw.flags & ~KNOWN_FLAGS:
        raise StateFileError(
            f"state file uses unknown flags 0x{raw.flags & ~KNOWN_FLAGS:04x} (known: 0x{KNOWN_FLAGS:04x})",
            path=path,
            hint="it was written by a newer deltamem-edge; upgrade to read it. The file was not modified.",
        )
    if not HEADER_SIZE_V1 <= raw.header_len <= HEADER_MAX_BYTES or raw.header_len % 8:
        raise _corrupt(
            path, f"header length {raw.header_len} is invalid (a multiple of 8 in {HEADER_SIZE_V1}..{HEADER_MAX_BYTES})"
        )
    return raw


def _check_sizes(raw: _RawHeader, n: int, path: str | Path) -> None:
    """Steps 6-8: dtype, bounded dims, and section sizes that add up to the real length.

    Python ints cannot overflow, and every declared size is compared with ``n``
    (bytes actually present) before anything is sized from it.
    """
    if raw.dtype != DTYPE_FLOAT32:
        raise _corrupt(path, f"unsupported state dtype code {raw.dtype} (version 1 stores float32 = {DTYPE_FLOAT32})")
    if raw.reserved != 0:
        raise _corrupt(path, f"reserved header field is {raw.reserved}, must be 0")
    problem = _shape_problem(raw.n_layers, raw.rows, raw.rank, raw.state_heads)
    if problem is not None:
        raise _corrupt(path, f"implausible state shape: {problem}")
    want_payload = raw.n_layers * raw.rows * raw.rank * 4
    if raw.payload_len != want_payload:
        raise _corrupt(
            path, f"payload length {raw.payload_len} != {raw.n_layers}x{raw.rows}x{raw.rank} float32 ({want_payload})"
        )
    has_transcript = bool(raw.flags & FLAG_TRANSCRIPT)
    if raw.transcript_len > TRANSCRIPT_MAX_BYTES or has_transcript != (raw.transcript_len > 0):
        raise _corrupt(
            path,
            f"transcript length {raw.transcript_len} is invalid (flag {int(has_transcript)}, cap {TRANSCRIPT_MAX_BYTES})",
        )
    expected = raw.header_len + raw.payload_len + raw.transcript_len + CHECKSUM_SIZE
    if n != expected:
        raise _corrupt(path, f"file is {n} bytes but its header declares {expected} (truncated or padded)")


def _check_payload(mv: memoryview, raw: _RawHeader, path: str | Path) -> np.ndarray:
    """Step 11: a read-only float32 view of the payload, refused if any value is NaN/Inf.

    Policy is reject, not sanitize: a non-finite δ-state means the engine or the
    file went wrong, and zeroing values would silently change the memory.
    """
    values = np.frombuffer(mv, dtype="<f4", count=raw.payload_len // 4, offset=raw.header_len)
    finite = np.isfinite(values)
    if not finite.all():
        bad = int(np.count_nonzero(~finite))
        first_layer = int(np.argmin(finite)) // (raw.rows * raw.rank)
        raise _corrupt(path, f"state holds {bad} NaN/Inf values (first in layer {first_layer})")
    return values


def decode(data: bytes | bytearray | memoryview, *, path: str | Path) -> MemoryState:
    """Parse and fully validate a state file image; return a fresh MemoryState.

    Validation order (each step only relies on fields checked before it):
    1. length >= fixed header + checksum, 2. magic, 3. format version, 4. flags,
    5. header length, 6. dtype / reserved, 7. dims bounded and payload length
    consistent, 8. total length equals the declared sizes exactly, 9. sha256,
    10. labels, 11. payload finite, 12. transcript JSON; only then is the payload
    copied into a new array.  Nothing is allocated from a declared size.
    ``path`` only names the file in error messages.
    """
    mv = memoryview(data).cast("B")
    raw = _check_prefix(mv, path)
    _check_sizes(raw, len(mv), path)
    end = len(mv) - CHECKSUM_SIZE
    if hashlib.sha256(mv[:end]).digest() != mv[end:].tobytes():
        raise _corrupt(path, "checksum mismatch: the file is corrupt")
    adapter_label = _unpack_label(raw.adapter_label, "adapter", path)
    model_label = _unpack_label(raw.model_label, "model", path)
    values = _check_payload(mv, raw, path)
    transcript: list[dict[str, str]] = []
    if raw.transcript_len:
        start = raw.header_len + raw.payload_len
        transcript = _decode_transcript(mv[start : start + raw.transcript_len], path)
    header = StateHeader(
        adapter_fp=raw.adapter_fp,
        model_fp=raw.model_fp,
        n_layers=raw.n_layers,
        rows=raw.rows,
        rank=raw.rank,
        state_heads=raw.state_heads,
        adapter_label=adapter_label,
        model_label=model_label,
        tokens_written=raw.tokens_written,
        turns=raw.turns,
        created_us=raw.created_us,
        updated_us=raw.updated_us,
    )
    state = values.astype(np.float32, copy=True).reshape(header.shape)
    return MemoryState(header=header, state=state, transcript=transcript)


# --------------------------------------------------------------------------------------
# Identity check
# --------------------------------------------------------------------------------------


def _short_pair(a: bytes, b: bytes) -> tuple[str, str]:
    """Hex prefixes long enough (>= 12 digits) to show where two fingerprints differ."""
    ha, hb = a.hex(), b.hex()
    diff = next((i for i, (x, y) in enumerate(zip(ha, hb, strict=True)) if x != y), len(ha))
    k = min(len(ha), max(12, diff + 4))
    return ha[:k], hb[:k]


def check_compatible(
    mem: MemoryState,
    adapter_fp: bytes,
    model_fp: bytes,
    shape: tuple[int, int, int],
    *,
    path: str | Path | None = None,
) -> None:
    """Refuse a memory made for another adapter, base model or state shape.

    Why refuse instead of resetting: a δ-state is meaningless under other
    weights, and silently starting over would destroy the user's memory.  The
    message names both fingerprints and both shapes so the user can tell which
    model the file belongs to.
    """
    h = mem.header
    problems = []
    if h.adapter_fp != adapter_fp:
        f, e = _short_pair(h.adapter_fp, adapter_fp)
        problems.append(f"adapter fingerprint: file {f} ({h.adapter_label or 'unlabelled'}) vs loaded {e}")
    if h.model_fp != model_fp:
        f, e = _short_pair(h.model_fp, model_fp)
        problems.append(f"base-model fingerprint: file {f} ({h.model_label or 'unlabelled'}) vs loaded {e}")
    if tuple(h.shape) != tuple(shape):
        problems.append(f"state shape: file {list(h.shape)} vs loaded {list(shape)}")
    if not problems:
        return
    fa, ea = _short_pair(h.adapter_fp, adapter_fp)
    fm, em = _short_pair(h.model_fp, model_fp)
    raise StateMismatchError(
        "memory belongs to another model or adapter ("
        + "; ".join(problems)
        + f"). File: adapter {fa}, model {fm}, shape {list(h.shape)}; "
        f"loaded: adapter {ea}, model {em}, shape {list(shape)}",
        path=path,
        hint=f"load it with the model and adapter it was made with ({h.model_label or '?'} + "
        f"{h.adapter_label or '?'}), or start a new memory file; this one was not modified",
    )


# --------------------------------------------------------------------------------------
# File I/O: bounded read, atomic write
# --------------------------------------------------------------------------------------


def _os_error(path: Path, action: str, exc: OSError) -> StateFileError:
    """Wrap an OSError with the errno text and a hint that fits the errno."""
    code = exc.errno
    text = os.strerror(code) if code else str(exc)
    if code == errno.ENOSPC or code == errno.EDQUOT:
        hint = "free some disk space and save again; the previous memory file is unchanged"
    elif code in (errno.EROFS, errno.EACCES, errno.EPERM):
        hint = "the location is not writable: choose a writable directory, or open the memory read-only"
    elif code == errno.ENOENT:
        hint = "the directory does not exist; create it first"
    else:
        hint = "the previous memory file (if any) is unchanged"
    return StateFileError(f"could not {action}: {text} [errno {code}]", path=path, hint=hint)


def read_state_file(path: str | Path) -> MemoryState:
    """Read and validate one state file without locking.

    Why no lock is needed: writers only ever replace the file with a rename, so a
    reader sees either the old or the new complete file.  Non-regular files and
    files over ``MAX_FILE_BYTES`` are refused before reading (O_NONBLOCK so a FIFO
    cannot hang us).
    """
    p = Path(path)
    try:
        fd = os.open(p, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    except FileNotFoundError:
        raise StateFileError(
            "memory file does not exist", path=p, hint="check the path, or start a new memory"
        ) from None
    except OSError as exc:
        raise _os_error(p, "open the memory file", exc) from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise StateFileError("is not a regular file", path=p, hint="point --memory at a state file")
        if st.st_size > MAX_FILE_BYTES:
            raise _corrupt(p, f"file is {st.st_size} bytes, larger than any valid state file ({MAX_FILE_BYTES})")
        chunks, total = [], 0
        while total <= st.st_size:  # read one byte past the size to notice growth
            chunk = os.read(fd, st.st_size + 1 - total)
            if not chunk:
                break
            chunks.append(chunk)
            total += len(chunk)
    except OSError as exc:
        raise _os_error(p, "read the memory file", exc) from None
    finally:
        os.close(fd)
    if total > st.st_size:
        raise StateFileError(
            "memory file changed while it was read", path=p, hint="another program is writing it; retry"
        )
    return decode(b"".join(chunks), path=p)


def temp_name_pattern(target_name: str) -> re.Pattern[str]:
    """Names of temp files for ``target_name``: ``.<name>.tmp-<pid>-<8 hex>``.

    Why documented and matched exactly: a crashed writer can leave one behind; a
    new writer holding the lock removes exactly these names and nothing else, and
    readers never look at them (they start with a dot and are never the target).
    """
    return re.compile(re.escape(f".{target_name}.tmp-") + r"[0-9]+-[0-9a-f]{8}")


def lock_path_for(path: str | Path) -> Path:
    """The sidecar lock file ``.<name>.lock`` next to the state file."""
    p = Path(path)
    return p.with_name(f".{p.name}.lock")


def _write_all(fd: int, data: bytes) -> None:
    """os.write may write less than asked (signals, quotas): loop until done."""
    view = memoryview(data)
    while view:
        written = os.write(fd, view)
        if written <= 0:  # pragma: no cover - defensive
            raise OSError(errno.EIO, "short write")
        view = view[written:]


def _fsync_dir(directory: Path) -> None:
    """Make the rename durable.  Filesystems that cannot fsync a directory say EINVAL."""
    try:
        dfd = os.open(directory, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0) | getattr(os, "O_CLOEXEC", 0))
    except OSError:
        return  # cannot open the directory for reading: the rename is done, durability best effort
    try:
        os.fsync(dfd)
    except OSError as exc:
        if exc.errno not in (errno.EINVAL, errno.ENOTSUP, errno.EBADF):
            raise
    finally:
        os.close(dfd)


def _atomic_write(path: Path, data: bytes) -> None:
    """Replace ``path`` with ``data`` so that a crash leaves the old or the new file, never a mix.

    Protocol: create ``.<name>.tmp-<pid>-<rand>`` in the same directory with
    O_EXCL and mode 0600 -> write all -> fsync -> close -> os.replace onto the
    target -> fsync the directory.  On any failure before the replace the temp
    file is removed and the target is untouched.
    """
    directory = path.parent
    tmp = directory / f".{path.name}.tmp-{os.getpid()}-{secrets.token_hex(4)}"
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0) | getattr(os, "O_NOFOLLOW", 0)
    try:
        fd = os.open(tmp, flags, 0o600)
    except OSError as exc:
        raise _os_error(path, "create a temporary file to save the memory", exc) from None
    try:
        try:
            _write_all(fd, data)
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except OSError as exc:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise _os_error(path, "save the memory", exc) from None
    try:
        _fsync_dir(directory)
    except OSError as exc:
        raise _os_error(path, "flush the directory after saving (the new file is in place)", exc) from None


# --------------------------------------------------------------------------------------
# Names
# --------------------------------------------------------------------------------------


def memory_path_for(name: str, directory: str | Path) -> Path:
    """Map a user-supplied memory *name* (not a path) to a file inside ``directory``.

    Accepts only ``[A-Za-z0-9._-]{1,128}``, no leading dot (so a name can never
    collide with our ``.x.lock`` / ``.x.tmp-*`` files), no ``..``; the result must
    resolve inside the directory (a pre-existing symlink that escapes is refused).
    The file is ``directory / name``; no suffix is added.
    """
    d = Path(directory)
    valid = isinstance(name, str) and _NAME_RE.fullmatch(name) is not None
    if not valid or name.startswith(".") or ".." in name:
        raise StateFileError(
            f"invalid memory name {name!r}",
            path=d,
            hint="use 1-128 characters from A-Z a-z 0-9 . _ -, not starting with a dot and without '..'",
        )
    candidate = d / name
    base = d.resolve()
    if candidate.resolve().parent != base:
        raise StateFileError(
            f"memory name {name!r} resolves outside the memory directory",
            path=d,
            hint="remove the symlink or pick another name",
        )
    return candidate


# --------------------------------------------------------------------------------------
# Locked access
# --------------------------------------------------------------------------------------


class MemoryFile:
    """A state file opened for one conversation: single writer, any number of readers.

    ``MemoryFile(path)`` takes an exclusive, non-blocking ``flock`` on the sidecar
    ``.<name>.lock`` (which records the holder's pid; it is never deleted, since
    deleting lock files races with lockers).  A second writer, in this or another
    process, gets StateLockedError naming the pid.  ``readonly=True`` takes no lock
    (atomic renames make unlocked reads safe), never writes, and refuses save().
    The lock dies with the process, so a crash never leaves the memory stuck.
    """

    def __init__(self, path: str | Path, *, readonly: bool = False) -> None:
        self.path = Path(path)
        self.readonly = readonly
        self._lock_fd: int | None = None
        self._closed = False
        if not readonly:
            self._lock_fd = self._acquire_lock()
            self._remove_stale_temps()

    # -- lock ----------------------------------------------------------------------
    def _acquire_lock(self) -> int:
        """Open/create the lock file and flock it; report the holder's pid if busy."""
        if fcntl is None:  # pragma: no cover - non-POSIX
            raise StateFileError(
                "file locking is not available on this platform", path=self.path, hint="open it read-only"
            )
        lock_path = lock_path_for(self.path)
        flags = os.O_RDWR | os.O_CREAT | getattr(os, "O_CLOEXEC", 0) | getattr(os, "O_NOFOLLOW", 0)
        try:
            fd = os.open(lock_path, flags, 0o600)
        except OSError as exc:
            raise StateFileError(
                f"cannot create the lock file {lock_path.name}: {os.strerror(exc.errno or 0)} [errno {exc.errno}]",
                path=self.path,
                hint="the directory is not writable: open the memory read-only, or choose a writable directory",
            ) from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            holder = self._read_holder(fd)
            os.close(fd)
            if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                who = f"pid {holder}" if holder else "another process"
                if holder == os.getpid():
                    who += " (this process)"
                raise StateLockedError(
                    f"is in use by {who}",
                    path=self.path,
                    hint="close the other deltamem-edge session using this memory, or open it read-only",
                ) from None
            raise _os_error(self.path, "lock the memory file", exc) from None
        try:
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        except OSError:
            pass  # the pid is informational; the flock is what protects the file
        return fd

    @staticmethod
    def _read_holder(fd: int) -> int | None:
        """Best-effort pid of the current holder, for the error message."""
        try:
            text = os.pread(fd, 32, 0).decode("ascii", "replace").strip()
            return int(text) if text.isdigit() else None
        except OSError:
            return None

    def _remove_stale_temps(self) -> None:
        """Delete temp files left by a crashed writer.

        Why this is safe: every writer holds this lock while its temp file exists,
        and we hold the lock now, so any matching temp file is provably dead.
        """
        pattern = temp_name_pattern(self.path.name)
        try:
            names = os.listdir(self.path.parent)
        except OSError:
            return
        for n in names:
            if pattern.fullmatch(n):
                with contextlib.suppress(OSError):
                    os.unlink(self.path.parent / n)

    # -- API -----------------------------------------------------------------------
    def _require_open(self) -> None:
        if self._closed:
            raise StateFileError("memory file handle is closed", path=self.path, hint="open it again")

    def exists(self) -> bool:
        """True if a state file is present (it may still be invalid: load() checks)."""
        self._require_open()
        return os.path.lexists(self.path)

    def load(
        self,
        *,
        adapter_fp: bytes | None = None,
        model_fp: bytes | None = None,
        shape: tuple[int, int, int] | None = None,
    ) -> MemoryState | None:
        """Return the saved memory, or None if there is none yet.

        Pass ``adapter_fp``, ``model_fp`` and ``shape`` together to also run
        :func:`check_compatible`.  Any problem raises; nothing is ever reset.
        """
        self._require_open()
        expect = (adapter_fp, model_fp, shape)
        if any(v is not None for v in expect) and any(v is None for v in expect):
            raise ValueError("pass adapter_fp, model_fp and shape together, or none of them")
        if not os.path.lexists(self.path):
            return None
        mem = read_state_file(self.path)
        if shape is not None:
            check_compatible(mem, adapter_fp, model_fp, shape, path=self.path)  # type: ignore[arg-type]
        return mem

    def save(self, mem: MemoryState) -> None:
        """Atomically replace the file with ``mem``; on any error the old file stays."""
        self._require_open()
        if self.readonly:
            raise StateFileError(
                "memory was opened read-only; not saving", path=self.path, hint="open it without read-only to save"
            )
        try:
            data = encode(mem)
        except ValueError as exc:
            raise StateFileError(
                f"refusing to save an invalid memory: {exc}",
                path=self.path,
                hint="the previous memory file is unchanged",
            ) from None
        _atomic_write(self.path, data)

    def close(self) -> None:
        """Release the lock (idempotent).  The lock file itself stays, by design."""
        if self._lock_fd is not None:
            with contextlib.suppress(OSError):
                os.close(self._lock_fd)  # closing the last fd releases the flock
            self._lock_fd = None
        self._closed = True

    def __enter__(self) -> MemoryFile:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def __del__(self) -> None:
        with contextlib.suppress(Exception):
            self.close()

    def __repr__(self) -> str:
        mode = "readonly" if self.readonly else "locked"
        return f"MemoryFile({str(self.path)!r}, {mode}{', closed' if self._closed else ''})"
