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

from .errors import NativeLibraryError
from .native.c_api import API_VERSION, SIGNATURES, bind, c_float_p


def _prepare_environment() -> None:
    if "llama_cpp" in sys.modules:
        return  # too late to choose the library; _bind() checks what was loaded
    from .native.build import installed_library_dir

    os.environ["LLAMA_CPP_LIB_PATH"] = str(installed_library_dir())


_prepare_environment()

import llama_cpp  # noqa: E402  (the library folder must be chosen first)
from llama_cpp import llama_cpp as llama_lib  # noqa: E402


class _DeltaMemLib:
    """Our C functions as attributes (``lib.llama_dmem_attach(...)``)."""

    def __init__(self, handle: ctypes.CDLL) -> None:
        missing = [name for name in SIGNATURES if not hasattr(handle, name)]
        if missing:
            path = getattr(handle, "_name", "libllama")
            raise NativeLibraryError(
                f"this libllama is not the δ-mem build (missing {missing[0]}"
                f"{' and others' if len(missing) > 1 else ''})",
                path=path,
                hint="import deltamem_edge before llama_cpp, or unset LLAMA_CPP_LIB_PATH; "
                "run `deltamem-edge build` if the δ-mem library was never built",
            )
        for name, fn in bind(handle).items():
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


def with_last_error(prefix: str) -> str:
    """``prefix`` plus the last llama.cpp error line logged since the last call, when there is one."""
    errors = take_recent_errors()
    return f"{prefix}: {errors[-1]}" if errors else prefix


llama_lib.llama_log_set(_log_callback, ctypes.c_void_p(0))
llama_lib.llama_backend_init()

__all__ = ["c_float_p", "dmem", "llama_cpp", "llama_lib", "set_verbose", "take_recent_errors", "with_last_error"]
