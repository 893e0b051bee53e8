"""The on-disk δ-mem memory of one conversation: format, identity check, atomic save, lock.

Why this package is careful: the δ-state (float32, shape ``[n_layers, R, r]``,
9 KiB for the released Qwen3-4B rank-8 adapter) *is* the whole memory of a
conversation.  It must never be lost (atomic replace + fsync), never be applied to
the wrong model (fingerprints checked on load), never be read from a corrupt or
hostile file (every field bounded and checksummed before anything is allocated),
and never be written by two processes at once (advisory ``flock``).

One job per module, each importable without an engine (the CLI's ``memory inspect``
and the server use them without loading a model):

* ``format``: the version-1 bytes: header layout, bounds, ``encode`` / ``decode``;
* ``transcript``: the optional transcript section (canonical JSON, cap, trimming);
* ``identity``: ``check_compatible``: may this memory be applied to the loaded model;
* ``atomic``: the durable replace protocol and its temp-file names;
* ``store``: reads, memory names, and the locked ``MemoryFile``.

Layout, validation order, locking and versioning are documented field by field in
``docs/state-format.md``.  Everything below is re-exported here, so callers import
from ``deltamem_edge.statefile``.

Typical use::

    with MemoryFile(path) as mf:                 # exclusive lock, or StateLockedError
        mem = mf.load(adapter_fp=a, model_fp=m, shape=(36, 8, 8))  # None if new
        ...
        mf.save(mem)                             # atomic; old file kept on any error
"""

from __future__ import annotations

from .atomic import temp_name_pattern
from .format import (
    CHECKSUM_SIZE,
    DTYPE_FLOAT32,
    FINGERPRINT_SIZE,
    FLAG_TRANSCRIPT,
    FORMAT_VERSION,
    HEADER_MAX_BYTES,
    HEADER_SIZE_V1,
    KNOWN_FLAGS,
    LABEL_MAX_BYTES,
    MAGIC,
    MAX_FILE_BYTES,
    MAX_N_LAYERS,
    MAX_PAYLOAD_BYTES,
    MemoryState,
    StateHeader,
    clip_label,
    decode,
    encode,
    now_us,
)
from .identity import check_compatible
from .store import (
    MemoryFile,
    lock_path_for,
    memory_path_for,
    read_state_bytes,
    read_state_file,
    validate_state_bytes,
)
from .transcript import TRANSCRIPT_MAX_BYTES, trim_transcript

__all__ = [
    "MAGIC",
    "FORMAT_VERSION",
    "FLAG_TRANSCRIPT",
    "KNOWN_FLAGS",
    "DTYPE_FLOAT32",
    "HEADER_SIZE_V1",
    "HEADER_MAX_BYTES",
    "CHECKSUM_SIZE",
    "FINGERPRINT_SIZE",
    "LABEL_MAX_BYTES",
    "TRANSCRIPT_MAX_BYTES",
    "MAX_N_LAYERS",
    "MAX_PAYLOAD_BYTES",
    "MAX_FILE_BYTES",
    "StateHeader",
    "MemoryState",
    "MemoryFile",
    "encode",
    "decode",
    "read_state_file",
    "read_state_bytes",
    "validate_state_bytes",
    "check_compatible",
    "memory_path_for",
    "trim_transcript",
    "clip_label",
    "now_us",
    "lock_path_for",
    "temp_name_pattern",
]
