"""One exception family for everything deltamem-edge refuses to do.

Why: the CLI turns any ``DeltaMemError`` into one plain line plus a hint (no
traceback), and an embedding app can catch the base class.  Every message names
the file involved and what is wrong; ``hint`` says what to do about it.
"""

from __future__ import annotations

from pathlib import Path


class DeltaMemError(Exception):
    """Base class.  ``path`` is the file concerned (if any), ``hint`` the fix."""

    def __init__(self, message: str, *, path: str | Path | None = None, hint: str | None = None) -> None:
        self.path = None if path is None else Path(path)
        self.hint = hint
        text = f"{self.path}: {message}" if self.path is not None else message
        super().__init__(text)


class NativeLibraryError(DeltaMemError):
    """The patched libllama is missing, unbuildable, or not the δ-mem build."""


class BuildError(NativeLibraryError):
    """Fetching, verifying, patching or compiling the native library failed."""


class ModelLoadError(DeltaMemError):
    """A model GGUF could not be loaded."""


class AdapterError(DeltaMemError):
    """A δ-mem adapter is malformed or does not fit the base model."""


class StateFileError(DeltaMemError):
    """A memory state file is corrupt, foreign, or could not be written."""


class StateMismatchError(StateFileError):
    """A state file belongs to another model or adapter (fingerprints differ)."""


class StateLockedError(StateFileError):
    """Another process holds the memory file."""


class ConversionError(DeltaMemError):
    """An upstream checkpoint could not be converted."""


class UnsafeInputError(ConversionError):
    """An input file asked for something we refuse to do (e.g. a pickle global)."""


class GGUFFormatError(ConversionError, AdapterError, ModelLoadError):
    """A GGUF file is truncated, malformed or not a GGUF at all."""


class EngineError(DeltaMemError):
    """A decode or state operation failed inside the engine."""


class ArgumentError(EngineError, ValueError):
    """A public call (Session, SamplingParams, Conversation) got an argument of the wrong type,
    shape or range.  Nothing was converted and nothing was changed: a float64 state or a float
    token id is refused rather than silently cast (``deltamem_edge.args``)."""


class HubError(DeltaMemError):
    """A model could not be pulled from the Hugging Face Hub: the repository is missing, unreachable, not in
    the cache while offline, or holds files that are not what deltamem-edge expects.  The message names the
    repository; nothing was installed (``deltamem_edge.hub``)."""


class HubOfflineError(HubError):
    """Offline (``HF_HUB_OFFLINE=1`` or no network) and the repository is not in the local cache."""


class DownloadIntegrityError(HubError):
    """A downloaded file's sha256 (or git blob id) differs from the hub's metadata; the bad copy was removed."""
