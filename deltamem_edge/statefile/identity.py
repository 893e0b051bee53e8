"""Whether a memory belongs to the loaded model: fingerprints and shape, refused with both sides named.

Why a module of its own: the format stores the fingerprints as opaque bytes; deciding
that a memory may be applied is a separate policy (refuse, never reset), used by a load
from disk and by a server upload alike.
"""

from __future__ import annotations

from pathlib import Path

from ..errors import StateMismatchError
from .format import MemoryState


def _short_pair(a: bytes, b: bytes) -> tuple[str, str]:
    """Hex prefixes long enough (>= 12 digits) to show where two fingerprints differ."""
    ha, hb = a.hex(), b.hex()
    diff = next((i for i, (x, y) in enumerate(zip(ha, hb, strict=True)) if x != y), len(ha))
    k = min(len(ha), max(12, diff + 4))
    return ha[:k], hb[:k]


def check_compatible(
    mem: MemoryState,
    adapter_fp: bytes,
    model_fp: bytes,
    shape: tuple[int, int, int],
    *,
    path: str | Path | None = None,
) -> None:
    """Refuse a memory made for another adapter, base model or state shape.

    Why refuse instead of resetting: a δ-state is meaningless under other
    weights, and silently starting over would destroy the user's memory.  The
    message names both fingerprints and both shapes so the user can tell which
    model the file belongs to.
    """
    h = mem.header
    problems = []
    if h.adapter_fp != adapter_fp:
        f, e = _short_pair(h.adapter_fp, adapter_fp)
        problems.append(f"adapter fingerprint: file {f} ({h.adapter_label or 'unlabelled'}) vs loaded {e}")
    if h.model_fp != model_fp:
        f, e = _short_pair(h.model_fp, model_fp)
        problems.append(f"base-model fingerprint: file {f} ({h.model_label or 'unlabelled'}) vs loaded {e}")
    if tuple(h.shape) != tuple(shape):
        problems.append(f"state shape: file {list(h.shape)} vs loaded {list(shape)}")
    if not problems:
        return
    fa, ea = _short_pair(h.adapter_fp, adapter_fp)
    fm, em = _short_pair(h.model_fp, model_fp)
    raise StateMismatchError(
        "memory belongs to another model or adapter ("
        + "; ".join(problems)
        + f"). File: adapter {fa}, model {fm}, shape {list(h.shape)}; "
        f"loaded: adapter {ea}, model {em}, shape {list(shape)}",
        path=path,
        hint=f"load it with the model and adapter it was made with ({h.model_label or '?'} + "
        f"{h.adapter_label or '?'}), or start a new memory file; this one was not modified",
    )
