"""The version-1 bytes of a state file: header layout, bounds, encode and a decode that trusts nothing.

Why a module of its own: this is the part every reader of a memory needs (the CLI's
``memory inspect``, the server's upload check) and the part the golden file pins; it
does no file I/O and loads no model.  The layout is documented field by field in
``docs/state-format.md``; the constants below are the single source of truth for it.
The shape bounds are what the native loader can attach (``supported.py``), so every
state an engine produces can be saved and nothing larger is ever read.
"""

from __future__ import annotations

import hashlib
import struct
import time
from collections import namedtuple
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..errors import StateFileError
from ..supported import MAX_LAYERS, MAX_RANK, MAX_ROWS, MAX_STATE_FLOATS, MAX_STATE_HEADS
from .transcript import TRANSCRIPT_MAX_BYTES, canonical_transcript, parse_transcript

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

# Bounds.  Real states are 36x8x8 (TSW) or 36x32x8 (MSW).  The dims are bounded by what the
# native loader attaches (supported.py), so the payload is at most MAX_PAYLOAD_BYTES and a
# file at most MAX_FILE_BYTES: nothing outside them is ever read or allocated.
MAX_N_LAYERS = MAX_LAYERS
MAX_PAYLOAD_BYTES = 4 * MAX_STATE_FLOATS  # 128 MiB: implied by the dims' bounds, sizes the file bound
HEADER_MAX_BYTES = 4096  # header_len above this is treated as corrupt
MAX_FILE_BYTES = HEADER_MAX_BYTES + MAX_PAYLOAD_BYTES + TRANSCRIPT_MAX_BYTES + CHECKSUM_SIZE

_U64_MAX = 2**64 - 1
_I64_MIN, _I64_MAX = -(2**63), 2**63 - 1


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
    package only stores and compares them (``identity.py``).  Labels are for humans and for error
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
    return None  # within these bounds n_layers * rows * rank * 4 <= MAX_PAYLOAD_BYTES


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
    transcript = canonical_transcript(mem.transcript) if mem.transcript else b""
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


def corrupt(path: str | Path, message: str, hint: str | None = None) -> StateFileError:
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
        raise corrupt(path, f"{what} label has bytes after its NUL padding")
    try:
        return text.decode("utf-8")
    except UnicodeDecodeError:
        raise corrupt(path, f"{what} label is not valid UTF-8") from None


def _decode_transcript(raw: memoryview, path: str | Path) -> list[dict[str, str]]:
    """Step 12: the transcript section, as :func:`parse_transcript` accepts it."""
    try:
        return parse_transcript(bytes(raw))
    except ValueError as exc:
        raise corrupt(path, str(exc)) from None



def _check_prefix(mv: memoryview, path: str | Path) -> _RawHeader:
    """Steps 1-5: enough bytes, our magic, a version and flags we understand, a sane header length.

    Why this order: a foreign file gets "not a state file" and a newer file gets
    "upgrade", instead of a misleading checksum error (a later version may even
    checksum differently).
    """
    n = len(mv)
    if n < HEADER_SIZE_V1 + CHECKSUM_SIZE:
        raise corrupt(
            path, f"file is {n} bytes, too short for a state file (at least {HEADER_SIZE_V1 + CHECKSUM_SIZE})"
        )
    raw = _RawHeader._make(_HEADER_STRUCT.unpack_from(mv, 0))
    if raw.magic != MAGIC:
        raise corrupt(path, f"not a deltamem-edge state file (magic {raw.magic!r}, expected {MAGIC!r})")
    if raw.version > FORMAT_VERSION:
        raise StateFileError(
            f"state file format version {raw.version} is newer than this deltamem-edge supports "
            f"(version {FORMAT_VERSION})",
            path=path,
            hint="upgrade deltamem-edge to read it; the file was not modified",
        )
    if raw.version != FORMAT_VERSION:
        raise corrupt(
            path, f"invalid state file format version {raw.version} (this reader supports version {FORMAT_VERSION})"
        )
    if raw.flags & ~KNOWN_FLAGS:
        raise StateFileError(
            f"state file uses unknown flags 0x{raw.flags & ~KNOWN_FLAGS:04x} (known: 0x{KNOWN_FLAGS:04x})",
            path=path,
            hint="it was written by a newer deltamem-edge; upgrade to read it. The file was not modified.",
        )
    if not HEADER_SIZE_V1 <= raw.header_len <= HEADER_MAX_BYTES or raw.header_len % 8:
        raise corrupt(
            path, f"header length {raw.header_len} is invalid (a multiple of 8 in {HEADER_SIZE_V1}..{HEADER_MAX_BYTES})"
        )
    return raw


def _check_sizes(raw: _RawHeader, n: int, path: str | Path) -> None:
    """Steps 6-8: dtype, bounded dims, and section sizes that add up to the real length.

    Python ints cannot overflow, and every declared size is compared with ``n``
    (bytes actually present) before anything is sized from it.
    """
    if raw.dtype != DTYPE_FLOAT32:
        raise corrupt(path, f"unsupported state dtype code {raw.dtype} (version 1 stores float32 = {DTYPE_FLOAT32})")
    if raw.reserved != 0:
        raise corrupt(path, f"reserved header field is {raw.reserved}, must be 0")
    problem = _shape_problem(raw.n_layers, raw.rows, raw.rank, raw.state_heads)
    if problem is not None:
        raise corrupt(path, f"implausible state shape: {problem}")
    want_payload = raw.n_layers * raw.rows * raw.rank * 4
    if raw.payload_len != want_payload:
        raise corrupt(
            path, f"payload length {raw.payload_len} != {raw.n_layers}x{raw.rows}x{raw.rank} float32 ({want_payload})"
        )
    has_transcript = bool(raw.flags & FLAG_TRANSCRIPT)
    if raw.transcript_len > TRANSCRIPT_MAX_BYTES or has_transcript != (raw.transcript_len > 0):
        raise corrupt(
            path,
            f"transcript length {raw.transcript_len} is invalid (flag {int(has_transcript)}, cap {TRANSCRIPT_MAX_BYTES})",
        )
    expected = raw.header_len + raw.payload_len + raw.transcript_len + CHECKSUM_SIZE
    if n != expected:
        raise corrupt(path, f"file is {n} bytes but its header declares {expected} (truncated or padded)")


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
        raise corrupt(path, f"state holds {bad} NaN/Inf values (first in layer {first_layer})")
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
        raise corrupt(path, "checksum mismatch: the file is corrupt")
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
