"""Per-layer sizes of a δ-state: the norm of each layer, and how far each layer moved between two states.

Why a module of its own: ``deltamem-edge memory inspect/diff``, the chat's ``/stats`` and the
server's memory panel all show these numbers, and they must be the same numbers.  A state is
float32 ``[n_layers, rows, rank]`` (``Session.state()``, ``MemoryState.state``); the norms are
computed in float64, where the difference of two float32 states is exact.
"""

from __future__ import annotations

import numpy as np


def layer_norms(state: np.ndarray) -> np.ndarray:
    """Frobenius norm of each layer of a ``[n_layers, rows, rank]`` state, in float64."""
    return np.linalg.norm(np.asarray(state, dtype=np.float64).reshape(state.shape[0], -1), axis=1)


def layer_change(before: np.ndarray, after: np.ndarray) -> np.ndarray:
    """``‖after[l] − before[l]‖_F`` per layer, in float64."""
    if before.shape != after.shape:
        raise ValueError(f"state shapes differ: {before.shape} vs {after.shape}")
    return layer_norms(np.asarray(after, dtype=np.float64) - np.asarray(before, dtype=np.float64))
