"""deltamem-edge: δ-mem online memory on llama.cpp, driven from Python.

The public names load lazily, so that importing the package (for example to
run the native build before anything is compiled) never loads libllama.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from .errors import (
    AdapterError,
    BuildError,
    ConversionError,
    DeltaMemError,
    EngineError,
    ModelLoadError,
    NativeLibraryError,
    StateFileError,
    StateLockedError,
    StateMismatchError,
    UnsafeInputError,
)

__version__ = "0.1.0"

__all__ = [
    "AdapterError",
    "BuildError",
    "ConversionError",
    "Conversation",
    "DeltaMemError",
    "Engine",
    "EngineError",
    "ModelLoadError",
    "NativeLibraryError",
    "Session",
    "StateFileError",
    "StateLockedError",
    "StateMismatchError",
    "UnsafeInputError",
    "__version__",
]

_LAZY = {"Engine": "engine", "Session": "engine", "Conversation": "conversation"}

if TYPE_CHECKING:  # pragma: no cover
    from .conversation import Conversation
    from .engine import Engine, Session


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        module = importlib.import_module(f".{_LAZY[name]}", __name__)
        return getattr(module, name)
    raise AttributeError(f"module 'deltamem_edge' has no attribute {name!r}")
