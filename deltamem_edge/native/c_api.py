"""The one table of our C API's ctypes signatures (``native/include/llama-deltamem.h``).

Why a module of its own, with nothing but ctypes: two callers bind these functions on
two different handles.  ``deltamem_edge._bindings`` binds them on llama-cpp-python's
handle of the patched library; the benchmark's worker (``bench/worker.py``) binds them
on whatever library it was started with and must never import ``_bindings`` (that would
pick the patched library for a stock variant).  Pointers to llama.cpp objects are
``c_void_p``, as llama-cpp-python declares them.
"""

from __future__ import annotations

import ctypes
from typing import Any

API_VERSION = 5  # LLAMA_DMEM_API_VERSION in native/include/llama-deltamem.h

SCAN_STANDARD, SCAN_FUSED = 0, 1  # enum llama_dmem_scan

c_float_p = ctypes.POINTER(ctypes.c_float)
_ctx_p = ctypes.c_void_p  # llama_context *
_model_p = ctypes.c_void_p  # llama_model *
_adapter_p = ctypes.c_void_p  # llama_dmem_adapter *

SIGNATURES: dict[str, tuple[list[Any], Any]] = {  # name -> (argtypes, restype)
    "llama_dmem_api_version": ([], ctypes.c_int32),
    "llama_dmem_last_error": ([], ctypes.c_char_p),
    "llama_dmem_adapter_init": ([_model_p, ctypes.c_char_p], _adapter_p),
    "llama_dmem_adapter_free": ([_adapter_p], None),
    "llama_dmem_file_has_adapter": ([ctypes.c_char_p], ctypes.c_int32),
    "llama_dmem_adapter_rank": ([_adapter_p], ctypes.c_int32),
    "llama_dmem_adapter_state_heads": ([_adapter_p], ctypes.c_int32),
    "llama_dmem_adapter_n_layers": ([_adapter_p], ctypes.c_int32),
    "llama_dmem_adapter_layer": ([_adapter_p, ctypes.c_int32], ctypes.c_int32),
    "llama_dmem_adapter_layer_device": ([_adapter_p, ctypes.c_int32], ctypes.c_char_p),
    "llama_dmem_adapter_write_granularity": ([_adapter_p], ctypes.c_int32),  # index into WRITE_GRANULARITIES
    "llama_dmem_max_rank": ([], ctypes.c_int32),
    "llama_dmem_max_state_heads": ([], ctypes.c_int32),
    "llama_dmem_max_layers": ([], ctypes.c_int32),
    "llama_dmem_attach": ([_ctx_p, _adapter_p], ctypes.c_int32),
    "llama_dmem_is_attached": ([_ctx_p], ctypes.c_bool),
    "llama_dmem_set_write": ([_ctx_p, ctypes.c_bool], ctypes.c_int32),
    "llama_dmem_get_write": ([_ctx_p], ctypes.c_bool),
    "llama_dmem_set_scan": ([_ctx_p, ctypes.c_int32], ctypes.c_int32),  # SCAN_STANDARD or SCAN_FUSED
    "llama_dmem_get_scan": ([_ctx_p], ctypes.c_int32),
    "llama_dmem_set_message_ids": ([_ctx_p, ctypes.POINTER(ctypes.c_int32), ctypes.c_int32], ctypes.c_int32),
    "llama_dmem_state_n_floats": ([_ctx_p], ctypes.c_int64),
    "llama_dmem_state_get": ([_ctx_p, ctypes.c_int32, c_float_p, ctypes.c_size_t], ctypes.c_int32),
    "llama_dmem_state_set": ([_ctx_p, ctypes.c_int32, c_float_p, ctypes.c_size_t], ctypes.c_int32),
    "llama_dmem_state_reset": ([_ctx_p, ctypes.c_int32], ctypes.c_int32),
}


def bind(handle: ctypes.CDLL) -> dict[str, Any]:
    """Every function of the table on ``handle``, with its argtypes and restype set (name -> function)."""
    bound = {}
    for name, (argtypes, restype) in SIGNATURES.items():
        fn = getattr(handle, name)
        fn.argtypes, fn.restype = argtypes, restype
        bound[name] = fn
    return bound
