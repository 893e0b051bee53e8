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
import json
from pathlib import Path

from . import gguf_schema as S
from .errors import AdapterError
from .gguf_header import read_gguf_header

_PREFIX = S.KEY_VERSION.rsplit(".", 1)[0] + "."  # "adapter.deltamem."


def adapter_fingerprint(path: str | Path) -> bytes:
    """sha256 over the δ-mem metadata and tensors of an adapter or bundle GGUF."""
    path = Path(path)
    header = read_gguf_header(path)
    h = hashlib.sha256()
    for key in sorted(k for k in header.fields if k.startswith(_PREFIX) and k != S.KEY_SOURCE):
        value = json.dumps(header.fields[key], sort_keys=True, default=str)
        h.update(f"{key}={header.types[key]}:{value}\n".encode())
    n = 0
    for t in sorted(header.tensors, key=lambda t: t.name):
        if S.TENSOR_MARKER not in t.name:
            continue
        n += 1
        h.update(f"{t.name}:{t.ggml_type}:{list(t.shape)}\n".encode())
        h.update(header.tensor_bytes(t).tobytes())
    if n == 0:
        raise AdapterError("no δ-mem tensors in this file", path=path)
    return h.digest()


def short(fp: bytes) -> str:
    """Display form: the first 16 hex digits."""
    return fp.hex()[:16]
