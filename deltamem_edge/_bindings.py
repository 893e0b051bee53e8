"""ctypes bindings for the δ-mem C API, found in llama-cpp-python's own libllama handle.

Why here and like this: llama-cpp-python loads ``libllama`` once, from the
folder in ``LLAMA_CPP_LIB_PATH`` read at import time.  We point that variable at
our patched build *before* the first ``import llama_cpp`` and then bind our
extra functions on the very same handle, so the stock bindings and ours drive
one library.  If ``llama_cpp`` was already imported with another library (or an
old build of ours), the missing symbols are reported as "not the δ-mem build".

This is the only module that touches ``llama_cpp``'s raw library object; the
engine uses the functions it exports.
"""

from __future__ import annotations

import ctypes
import os
import sys
import threading
from collections import deque
from typing import Any

from .errors import NativeLibraryError

API_VERSION = 3  # LLAMA_DMEM_API_VERSION in native/include/llama-deltamem.h


def _prepare_environment() -> None:
    if "llama_cpp" in sys.modules:
        return  # too late to choose the library; _bind() checks what was loaded
    from .native.build import installed_library_dir

    os.environ["LLAMA_CPP_LIB_PATH"] = str(installed_library_dir())


_prepare_environment()

import llama_cpp  # noqa: E402  (the library folder must be chosen first)
from llama_cpp import llama_cpp as llama_lib  # noqa: E402

c_float_p = ctypes.POINTER(ctypes.c_float)
_ctx_p = llama_lib.llama_context_p_ctypes
_model_p = llama_lib.llama_model_p_ctypes
_adapter_p = ctypes.c_void_p

_SIGNATURES: dict[str, tuple[list[Any], Any]] = {
    "llama_dmem_api_version": ([], ctypes.c_int32),
    "llama_dmem_last_error": ([], ctypes.c_char_p),
    "llama_dmem_adapter_init": ([_model_p, ctypes.c_char_p], _adapter_p),
    "llama_dmem_adapter_free": ([_adapter_p], None),
    "llama_dmem_file_has_adapter": ([ctypes.c_char_p], ctypes.c_int32),
    "llama_dmem_adapter_rank": ([_adapter_p], ctypes.c_int32),
    "llama_dmem_adapter_state_heads": ([_adapter_p], ctypes.c_int32),
    "llama_dmem_adapter_n_layers": ([_adapter_p], ctypes.c_int32),
    "llama_dmem_adapter_layer": ([_adapter_p, ctypes.c_int32], ctypes.c_int32),
    "llama_dmem_adapter_write_granularity": ([_adapter_p], ctypes.c_int32),  # index into WRITE_GRANULARITIES
    "llama_dmem_max_rank": ([], ctypes.c_int32),
    "llama_dmem_max_state_heads": ([], ctypes.c_int32),
    "llama_dmem_max_layers": ([], ctypes.c_int32),
    "llama_dmem_attach": ([_ctx_p, _adapter_p], ctypes.c_int32),
    "llama_dmem_is_attached": ([_ctx_p], ctypes.c_bool),
    "llama_dmem_set_write": ([_ctx_p, ctypes.c_bool], ctypes.c_int32),
    "llama_dmem_get_write": ([_ctx_p], ctypes.c_bool),
    "llama_dmem_set_message_ids": ([_ctx_p, ctypes.POINTER(ctypes.c_int32), ctypes.c_int32], ctypes.c_int32),
    "llama_dmem_state_n_floats": ([_ctx_p], ctypes.c_int64),
    "llama_dmem_state_get": ([_ctx_p, ctypes.c_int32, c_float_p, ctypes.c_size_t], ctypes.c_int32),
    "llama_dmem_state_set": ([_ctx_p, ctypes.c_int32, c_float_p, ctypes.c_size_t], ctypes.c_int32),
    "llama_dmem_state_reset": ([_ctx_p, ctypes.c_int32], ctypes.c_int32),
}


class _DeltaMemLib:
    """Our C functions as attributes (``lib.llama_dmem_attach(...)``)."""

    def __init__(self, handle: ctypes.CDLL) -> None:
        missing = [name for name in _SIGNATURES if not hasattr(handle, name)]
        if missing:
            path = getattr(handle, "_name", "libllama")
            raise NativeLibraryError(
                f"this libllama is not the δ-mem build (missing {missing[0]}"
                f"{' and others' if len(missing) > 1 else ''})",
                path=path,
                hint="import deltamem_edge before llama_cpp, or unset LLAMA_CPP_LIB_PATH; "
                "run `deltamem-edge build` if the δ-mem library was never built",
            )
        for name, (argtypes, restype) in _SIGNATURES.items():
            fn = getattr(handle, name)
            fn.argtypes = argtypes
            fn.restype = restype
            setattr(self, name, fn)
        version = handle.llama_dmem_api_version()
        if version != API_VERSION:
            raise NativeLibraryError(
                f"δ-mem C API version {version} does not match these bindings ({API_VERSION})",
                hint="rebuild the native library: `deltamem-edge build --force`",
            )

    def last_error(self) -> str:
        msg = self.llama_dmem_last_error()  # type: ignore[attr-defined]
        return msg.decode("utf-8", "replace") if msg else "unknown error"


dmem = _DeltaMemLib(llama_lib._lib)


# --------------------------------------------------------------------------------------------
# logging: keep llama.cpp quiet unless asked, but remember recent errors for our messages
# --------------------------------------------------------------------------------------------

_GGML_LOG_LEVEL_ERROR = 4
_recent_errors: deque[str] = deque(maxlen=20)
_log_lock = threading.Lock()
_verbose = os.environ.get("DELTAMEM_VERBOSE", "") not in ("", "0")
_partial: list[str] = []


@llama_lib.llama_log_callback
def _log_callback(level: int, text: bytes, _user_data: ctypes.c_void_p) -> None:
    msg = text.decode("utf-8", "replace") if text else ""
    with _log_lock:
        if _verbose:
            sys.stderr.write(msg)
        if level == _GGML_LOG_LEVEL_ERROR:
            _partial.append(msg)
            if msg.endswith("\n"):
                _recent_errors.append("".join(_partial).strip())
                _partial.clear()


def set_verbose(verbose: bool) -> None:
    """Show llama.cpp's own log on stderr (off by default; errors are still collected)."""
    global _verbose
    _verbose = verbose


def take_recent_errors() -> list[str]:
    """llama.cpp error lines logged since the last call (used to explain failures)."""
    with _log_lock:
        out = list(_recent_errors)
        _recent_errors.clear()
        return out


llama_lib.llama_log_set(_log_callback, ctypes.c_void_p(0))
llama_lib.llama_backend_init()

__all__ = ["c_float_p", "dmem", "llama_cpp", "llama_lib", "set_verbose", "take_recent_errors"]
