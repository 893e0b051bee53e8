"""Helpers of the tests that drive the engine: an exact engine, relative errors, independent counts.

Plain functions (the fixtures are in tests/conftest.py).  Nothing here loads libllama at
import time (the engine and the bindings are imported when a helper runs), so a file that
must not need the native library, or that guards its import as test_gpu_parity.py does,
can still import this module.

* ``exact_engine``: an Engine held to the float64 reference (``exact=True``, 256 positions
  unless told otherwise);
* ``rel`` / ``close``: the largest absolute difference relative to the largest |value| of
  the reference, computed in float64; ``close`` asserts it is within a tolerance;
* ``kv_positions``: the tokens in a conversation's KV cache, asked of llama.cpp itself;
* ``count_decodes``: the batch size of every ``llama_decode`` the engine makes from now on.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pytest

if TYPE_CHECKING:
    from deltamem_edge import Engine
    from deltamem_edge.conversation import Conversation

TOL = 1e-4  # relative to the largest |logit| (or |state|) of the reference


def exact_engine(model: str | os.PathLike[str], adapter: Path | bool | None = False, **kw) -> Engine:
    """``Engine(model, adapter, exact=True, **kw)`` with ``n_ctx=256`` unless ``kw`` says otherwise."""
    from deltamem_edge import Engine

    kw.setdefault("n_ctx", 256)
    return Engine(model, adapter, exact=True, **kw)


def rel(a: np.ndarray, ref: np.ndarray) -> float:
    """Max |a - ref| divided by max |ref| (at least 1e-12), in float64."""
    return float(np.abs(np.asarray(a, np.float64) - ref).max() / max(float(np.abs(ref).max()), 1e-12))


def close(a: np.ndarray, ref: np.ndarray, tol: float = TOL, what: str = "") -> float:
    """``rel(a, ref)``; asserts it is within tol (``what`` names the comparison in the message)."""
    err = rel(a, ref)
    assert err <= tol, f"{what + ': ' if what else ''}relative error {err:.3e} > {tol:.0e}"
    return err


def kv_positions(conv: Conversation) -> int:
    """Tokens in the sequence's KV cache, asked of llama.cpp (not of our counters)."""
    from deltamem_edge._bindings import llama_lib

    mem = llama_lib.llama_get_memory(conv.engine._ctx)
    return llama_lib.llama_memory_seq_pos_max(mem, conv.session.seq) + 1


def count_decodes(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Record the batch size of every llama_decode the engine makes (until ``monkeypatch`` undoes it)."""
    from deltamem_edge import engine as engine_module

    calls: list[int] = []
    real = engine_module.llama_lib.llama_decode

    def counting(ctx, batch):
        calls.append(batch.n_tokens)
        return real(ctx, batch)

    monkeypatch.setattr(engine_module.llama_lib, "llama_decode", counting)
    return calls
