"""Fingerprints that tie a memory state to the adapter it was written with.

Why: a δ-state is only meaningful for the exact adapter weights that wrote it
(and for the base model, see ``Engine.model_fingerprint``).  The adapter
fingerprint covers every δ-mem tensor (name, type, shape, bytes) and every
``adapter.deltamem.*`` metadata value, so a re-converted adapter with other
weights, another rank, another update mode or another row order gets another
fingerprint, while the same adapter standalone or bundled gets the same one.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import gguf
import numpy as np

from . import gguf_schema as S
from .errors import AdapterError


def _field_value(field: gguf.ReaderField) -> bytes:
    parts = [np.asarray(field.parts[i]).tobytes() for i in field.data]
    return b"|".join(parts) + str([int(t) for t in field.types]).encode()


def adapter_fingerprint(path: str | Path) -> bytes:
    """sha256 over the δ-mem metadata and tensors of an adapter or bundle GGUF."""
    path = Path(path)
    try:
        reader = gguf.GGUFReader(path)
    except Exception as e:  # gguf raises ValueError/struct errors on malformed files
        raise AdapterError(f"cannot read GGUF: {e}", path=path) from e
    h = hashlib.sha256()
    prefix = S.KEY_VERSION.rsplit(".", 1)[0] + "."
    for name in sorted(k for k in reader.fields if k.startswith(prefix) and k != S.KEY_SOURCE):
        h.update(name.encode() + b"=" + _field_value(reader.fields[name]) + b"\n")
    n = 0
    for t in sorted(reader.tensors, key=lambda t: t.name):
        if S.TENSOR_MARKER not in t.name:
            continue
        n += 1
        h.update(f"{t.name}:{int(t.tensor_type)}:{list(map(int, t.shape))}\n".encode())
        h.update(np.ascontiguousarray(t.data).tobytes())
    if n == 0:
        raise AdapterError("no δ-mem tensors in this file", path=path)
    return h.digest()


def short(fp: bytes) -> str:
    """Display form: the first 16 hex digits."""
    return fp.hex()[:16]
