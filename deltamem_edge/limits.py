"""Bounds on what a reader may allocate for one input file: the one place they are set.

Why a module of its own: every reader of untrusted bytes (the ``.pt`` and
``.safetensors`` adapter readers, the GGUF header reader, the HF converter's
JSON inputs) must size its allocations by what the data *needs*, never by a
size field it has not checked.  The numbers below say what "needs" means; the
readers import them, the tests and ``docs/reliability.md`` quote them.  The
state-file format keeps its own bounds next to its layout (``statefile/format.py``);
what shapes an adapter may have is ``supported.py``'s job.

``ReadLimits`` carries the two limits that depend on the file's purpose: the
converter derives them from the base model's shapes and the adapter config
(``converter.adapter.adapter_read_limits``: the largest adapter that config can
have on that base), so a 3 MB file that claims 2 GiB is refused before any of it
is inflated.
"""

from __future__ import annotations

from dataclasses import dataclass

# --- tensor-checkpoint readers (.pt zip, .safetensors) -----------------------------------------

STORAGE_SLACK_MIN_BYTES = 4096
"""A storage may hold this many bytes more than the tensors that view it reach (plus 1/16)."""

STORAGE_SLACK_FRACTION = 16
"""...plus 1/16 of what they reach: torch saves a whole storage even for a view of part of it."""

MAX_COMPRESSION_RATIO = 32
"""Inflated / deflated size of a zip entry.  torch.save stores entries uncompressed (ratio 1);
float weights deflate to at most ~1.2:1; only long runs of one byte (a bomb) reach 1000:1."""

COMPRESSION_CHECK_MIN_BYTES = 1 << 20
"""Entries inflating to less than this are not ratio-checked (a small all-zero tensor is normal)."""

PICKLE_BASE_BYTES = 64 << 10
PICKLE_BYTES_PER_ENTRY = 1024
"""data.pkl may be PICKLE_BASE_BYTES + this per allowed zip entry (a tensor pickles to ~100 bytes)."""

ZIP_ENTRY_DIR_BYTES = 46 + 1024 + 256
"""Central-directory bytes one entry may take (fixed record + name + extra fields)."""

ZIP_ARCHIVE_ENTRIES = 16
"""Zip entries of a torch.save archive besides storages: data.pkl, byteorder, version, ... ."""

SAFETENSORS_HEADER_BASE_BYTES = 64 << 10
SAFETENSORS_HEADER_BYTES_PER_TENSOR = 1024
"""The JSON header may be this big: ~100 bytes per tensor entry is typical; __metadata__ is small."""

MAX_TENSOR_NDIM = 8
"""ggml tensors have at most 4 dims, torch checkpoints of adapters 2; 8 leaves room, not a stack overflow."""

INT64_MAX = (1 << 63) - 1
"""Element counts, sizes and strides beyond this overflow int64 (ggml, torch, numpy indexing)."""


@dataclass(frozen=True)
class ReadLimits:
    """What one checkpoint file may make a reader allocate.

    ``max_tensor_bytes``: decoded bytes (bf16 widened to f32) of all tensors
    together; ``max_entries``: tensors (and, for a zip, entries besides the
    archive's own few).  Storages are bounded by their tensors (the slack above),
    so storages are bounded by ``max_tensor_bytes`` too.
    """

    max_tensor_bytes: int
    max_entries: int

    @property
    def max_zip_entries(self) -> int:
        return self.max_entries + ZIP_ARCHIVE_ENTRIES

    @property
    def max_pickle_bytes(self) -> int:
        return PICKLE_BASE_BYTES + PICKLE_BYTES_PER_ENTRY * self.max_entries

    @property
    def max_central_directory_bytes(self) -> int:
        return ZIP_ENTRY_DIR_BYTES * self.max_zip_entries

    @property
    def max_safetensors_header_bytes(self) -> int:
        return SAFETENSORS_HEADER_BASE_BYTES + SAFETENSORS_HEADER_BYTES_PER_TENSOR * self.max_entries


def storage_slack_bytes(needed_bytes: int) -> int:
    """How many bytes a storage may exceed what its tensors reach before it is refused."""
    return STORAGE_SLACK_MIN_BYTES + needed_bytes // STORAGE_SLACK_FRACTION


DEFAULT_READ_LIMITS = ReadLimits(max_tensor_bytes=1 << 30, max_entries=4096)
"""For callers that know no base model (tests, tools).  1 GiB is 40x the released Qwen3-4B
rank-8 adapter (25 MB of f32); ``convert_adapter`` always derives tighter limits."""

# --- GGUF header reader ------------------------------------------------------------------------

GGUF_MAX_STRING_BYTES = 64 << 20
"""One GGUF string (key, value or array item).  ggml caps them at 64 MiB too (ggml PR #1516);
the longest real value, a chat template, is tens of KB."""

GGUF_MAX_KEY_BYTES = 65535
"""GGUF keys are at most 65535 bytes (the spec)."""

GGUF_MAX_ARRAY_ITEMS = 1 << 24
"""Items in one metadata array (decoded to a Python list, ~30x its on-disk size).  The largest
vocabularies have ~262k tokens and ~500k merges."""

GGUF_MAX_TENSOR_NAME_BYTES = 63
"""GGML_MAX_NAME is 64 including the NUL: llama.cpp refuses longer tensor names."""

GGUF_MAX_ALIGNMENT = 1 << 16
"""general.alignment above this is no real file (llama.cpp writes 32)."""

GGUF_MAX_DIMS = 4
"""GGML_MAX_DIMS."""

# --- JSON inputs of the converters -------------------------------------------------------------

MAX_HF_CONFIG_BYTES = 1 << 20
"""A Hugging Face config.json is a few KB; 1 MiB of JSON is already ~10 MB parsed."""
