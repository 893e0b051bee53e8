"""What δ-mem runs on: the base architectures and the adapter shape limits, in one place.

Why a module of its own: the native loader (``native/src/llama-dmem-loader.cpp``) refuses any
adapter outside these bounds, so every Python layer has to agree with it.  The converter
must not write an adapter the loader refuses (``converter/config.py``,
``converter/base_model.py``, ``converter/model.py``), the state file must store every state
an attached adapter can produce (``statefile/format.py``), and the numpy reference must
accept the same architectures (``reference.py``).  When each layer kept its own numbers
they disagreed: an adapter with 17-64 state heads loaded and chatted, then failed at its
first save.

The C++ side keeps its own copies (``native/src/llama-dmem-impl.h``; changing them means
rebuilding the native library) and reports them through the C API (``llama_dmem_max_rank``,
``llama_dmem_max_state_heads``, ``llama_dmem_max_layers``); ``tests/test_supported.py`` asks
the loaded library and asserts they equal the ones here.  This module imports nothing (not
even the library), so any module may import it.
"""

from __future__ import annotations

SUPPORTED_ARCHS = ("llama", "qwen2", "qwen3", "smollm3")
"""GGUF ``general.architecture`` values δ-mem runs on: their attention goes through llama.cpp's
``build_qkv`` + ``build_attn`` with ``wo`` applied there, where the δ hooks sit (``arch_supported``)."""

HF_ARCHS = {
    "Qwen3ForCausalLM": "qwen3",
    "Qwen2ForCausalLM": "qwen2",
    "LlamaForCausalLM": "llama",
    "SmolLM3ForCausalLM": "smollm3",
}
"""Hugging Face ``architectures`` entries whose GGUF conversion is one of ``SUPPORTED_ARCHS``."""

MAX_RANK = 32
"""r (``llama_dmem_max_rank``).  The engine pads each state row to P = 16 or 32 keys per GDN head
(``DMEM_P_MAX``): the head sizes the GPU scan kernels run, and a rank above P would not fit one head."""

MAX_STATE_HEADS = 64
"""H (``llama_dmem_max_state_heads``).  The loader's bound; 64 heads of rank 32 (2048 GDN heads per layer) match the float64
reference to 6e-6 on a tiny qwen3 (``tests/test_supported.py`` runs 20 and 64 heads)."""

MAX_ROWS = MAX_RANK * MAX_STATE_HEADS
"""R = r * H state rows per layer (2048)."""

MAX_LAYERS = 512
"""δ-mem layers of one adapter (``llama_dmem_max_layers``).  The loader allows at most the model's
layers, and llama.cpp holds at most ``LLAMA_MAX_LAYERS`` = 512 (``src/llama-hparams.h`` of the
pinned llama.cpp)."""

MAX_STATE_FLOATS = MAX_LAYERS * MAX_ROWS * MAX_RANK
"""The largest δ-state an attached adapter can have: 2**25 float32 values, 128 MiB."""
