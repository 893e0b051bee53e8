"""Exact-type checks for the arguments of the public API.

Why refuse instead of converting: ``np.asarray(x, np.float32)`` turns a float64
1e39 into inf, ``np.int32`` wraps 2**40 to 0, ``int(2.7)`` is 2 and
``bool("no")`` is True.  Each of those stores or feeds something other than
what the caller passed, silently.  These helpers accept exactly the documented
types (``bool`` is never an int here) and raise ``ArgumentError`` naming the
argument, the type or dtype, and the allowed range; converting is the caller's
explicit choice (``np.asarray(x, np.float32)``).
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from .errors import ArgumentError


def _type_name(value: Any) -> str:
    if isinstance(value, np.ndarray):
        return f"ndarray of dtype {value.dtype}"
    return type(value).__name__


def check_int(name: str, value: Any, *, low: int | None = None, high: int | None = None) -> int:
    """``value`` as an int if it is an int (numpy integers too, never bool) within ``low..high``."""
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)):
        raise ArgumentError(f"{name} must be an int, got {_type_name(value)} {value!r:.40}")
    v = int(value)
    if (low is not None and v < low) or (high is not None and v > high):
        lo = "" if low is None else f"{low}"
        hi = "" if high is None else f"{high}"
        raise ArgumentError(f"{name} must be in {lo}..{hi}, got {v}")
    return v


def check_float(name: str, value: Any, *, low: float | None = None, high: float | None = None) -> float:
    """``value`` as a float if it is a finite real number (int or float, never bool) within ``low..high``."""
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, float, np.integer, np.floating)):
        raise ArgumentError(f"{name} must be a number, got {_type_name(value)} {value!r:.40}")
    v = float(value)
    if not math.isfinite(v):
        raise ArgumentError(f"{name} must be finite, got {v}")
    if (low is not None and v < low) or (high is not None and v > high):
        raise ArgumentError(f"{name} must be in {low}..{high}, got {v}")
    return v


def check_bool(name: str, value: Any) -> bool:
    """``value`` if it is a bool (numpy bool too): truthiness of a string or a number is not a choice."""
    if not isinstance(value, (bool, np.bool_)):
        raise ArgumentError(f"{name} must be True or False, got {_type_name(value)} {value!r:.40}")
    return bool(value)


def int_array(name: str, values: Any) -> np.ndarray:
    """A 1-D int64 array of ``values`` (a sequence of ints or an integer ndarray), without casting floats.

    An empty sequence is fine.  Floats, bools, strings, nested lists, multi-dim
    arrays and integers outside int64 are refused.
    """
    if isinstance(values, (str, bytes)) or np.isscalar(values):
        raise ArgumentError(f"{name} must be a sequence of ints, got {_type_name(values)} {values!r:.40}")
    try:
        arr = values if isinstance(values, np.ndarray) else np.asarray(values)
    except (ValueError, TypeError, OverflowError) as e:
        raise ArgumentError(f"{name} must be a flat sequence of ints ({e})") from None
    if arr.size == 0 and arr.ndim == 1:
        return np.zeros(0, dtype=np.int64)
    if arr.ndim != 1:
        raise ArgumentError(f"{name} must be 1-D, got shape {arr.shape}")
    if arr.dtype.kind not in "iu":
        raise ArgumentError(f"{name} must hold ints, got dtype {arr.dtype}", hint="pass token ids as int, not float")
    if arr.dtype.kind == "u" and arr.size and int(arr.max()) > np.iinfo(np.int64).max:
        raise ArgumentError(f"{name} holds {int(arr.max())}, beyond int64")
    return arr.astype(np.int64, copy=False)
