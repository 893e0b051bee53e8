"""What is in a GGUF: δ-mem metadata, tensors, sizes and the adapter fingerprint.

Works on the three kinds of file the project deals with: a plain llama.cpp model,
a δ-mem adapter (``general.type = adapter``) and a bundle (a model carrying δ-mem
keys and tensors).  ``inspect_gguf`` returns plain data (JSON-ready);
``render_text`` turns it into the report ``deltamem-edge inspect`` prints.

GGUF headers are read with ``deltamem_edge.gguf_header`` (fast, bounds-checked).

The fingerprint is the one memory state files record for their adapter
(``deltamem_edge.fingerprint``: δ-mem metadata plus every δ-mem tensor's name,
type, shape and bytes), shortened to 16 hex digits, so an adapter and the bundle
made from it show the same value.
"""

from __future__ import annotations

import contextlib
import re
from collections import OrderedDict
from pathlib import Path
from typing import Any

import gguf
import numpy as np

from deltamem_edge import gguf_schema as S
from deltamem_edge.errors import DeltaMemError
from deltamem_edge.gguf_header import GGUFHeader, LongArray, TensorInfo, read_gguf_header  # noqa: F401

NO_DMEM = "no δ-mem tensors"
_DMEM_PREFIX = S.KEY_VERSION.rsplit(".", 1)[0] + "."  # "adapter.deltamem."
_MODEL_KEYS = (
    "block_count",
    "embedding_length",
    "feed_forward_length",
    "attention.head_count",
    "attention.head_count_kv",
    "attention.key_length",
    "attention.value_length",
    "context_length",
    "vocab_size",
)
_BLK = re.compile(r"^blk\.(\d+)\.")


# --------------------------------------------------------------------------------------------
# inspect
# --------------------------------------------------------------------------------------------


def _jsonable(value: Any) -> Any:
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, float):  # GGUF floats are f32: show their shortest f32 spelling (1e-06, not 9.99e-07)
        return float(str(np.float32(value))) if np.isfinite(value) else str(value)
    return value


def inspect_gguf(path: str | Path) -> dict[str, Any]:
    """Everything ``deltamem-edge inspect`` reports about ``path``, as JSON-ready data.

    Keys: path, file_bytes, gguf_version, kind ("model" | "adapter" | "bundle"),
    architecture, name, model (shape hyperparameters of models and bundles), deltamem
    (δ-mem metadata without the ``adapter.deltamem.`` prefix, or None), state (shape and
    bytes of one conversation's δ-state), tensors (name, shape in ggml ne order, dtype,
    bytes, n_elements, deltamem), totals, fingerprint (16 hex digits, or None), note
    (``"no δ-mem tensors"`` for plain models) and problems (inconsistencies between the
    δ-mem metadata and the tensors).  Raises ``ConversionError`` naming the file if it
    is not a readable GGUF.
    """
    path = Path(path)
    header = read_gguf_header(path)
    fields = header.fields

    def get(key: str, default: Any = None) -> Any:
        value = fields.get(key, default)
        return str(value) if isinstance(value, LongArray) else _jsonable(value)

    arch = get(S.KEY_GENERAL_ARCHITECTURE)
    general_type = get(S.KEY_GENERAL_TYPE, "model")
    dmem_meta = {k[len(_DMEM_PREFIX) :]: get(k) for k in fields if k.startswith(_DMEM_PREFIX)}

    tensors = [
        {"name": t.name, "shape": list(t.shape), "dtype": t.type_name, "bytes": t.n_bytes,
         "n_elements": t.n_elements, "deltamem": S.TENSOR_MARKER in t.name}
        for t in header.tensors
    ]  # fmt: skip
    dmem_tensors = [t for t in tensors if t["deltamem"]]
    base_tensors = [t for t in tensors if not t["deltamem"]]
    if general_type == S.GENERAL_TYPE_ADAPTER:
        kind = "adapter"
    elif dmem_meta or dmem_tensors:
        kind = "bundle"
    else:
        kind = "model"

    model = None
    if kind != "adapter" and arch:
        model = {k: get(f"{arch}.{k}") for k in _MODEL_KEYS if f"{arch}.{k}" in fields}
        ftype = get("general.file_type")
        if ftype is not None:
            model["file_type"] = ftype
            with contextlib.suppress(ValueError, TypeError):
                model["file_type_name"] = gguf.LlamaFileType(ftype).name

    problems = _problems(kind, get(S.KEY_ADAPTER_TYPE), dmem_meta, dmem_tensors)
    state = None
    layers, rank = dmem_meta.get("layers"), dmem_meta.get("rank")
    if isinstance(rank, int) and isinstance(layers, list):
        heads = dmem_meta.get("state_heads", 1)
        heads = heads if isinstance(heads, int) else 1
        state = {"shape": [len(layers), rank * heads, rank], "bytes": len(layers) * rank * heads * rank * 4}

    fingerprint = None
    if dmem_tensors:
        from deltamem_edge.fingerprint import adapter_fingerprint, short

        try:
            fingerprint = short(adapter_fingerprint(path))
        except DeltaMemError as e:
            problems.append(f"no fingerprint: {e}")

    return {
        "path": str(path),
        "file_bytes": header.file_size,
        "gguf_version": header.version,
        "kind": kind,
        "architecture": arch,
        "name": get(S.KEY_GENERAL_NAME),
        "model": model,
        "deltamem": dmem_meta or None,
        "state": state,
        "tensors": tensors,
        "totals": {
            "n_tensors": len(tensors),
            "bytes": sum(t["bytes"] for t in tensors),
            "n_elements": sum(t["n_elements"] for t in tensors),
            "deltamem_tensors": len(dmem_tensors),
            "deltamem_bytes": sum(t["bytes"] for t in dmem_tensors),
            "deltamem_elements": sum(t["n_elements"] for t in dmem_tensors),
            "base_tensors": len(base_tensors),
            "base_bytes": sum(t["bytes"] for t in base_tensors),
        },
        "fingerprint": fingerprint,
        "note": None if dmem_tensors else NO_DMEM,
        "problems": problems,
    }


def _problems(kind: str, adapter_type: Any, meta: dict[str, Any], dmem_tensors: list[dict[str, Any]]) -> list[str]:
    out: list[str] = []
    if kind == "adapter" and adapter_type != S.ADAPTER_TYPE:
        out.append(f"general.type is adapter but adapter.type is {adapter_type!r}, not {S.ADAPTER_TYPE!r}")
    if kind == "model" or not (meta or dmem_tensors):
        return out
    if not meta:
        out.append("δ-mem tensors but no adapter.deltamem.* metadata")
        return out
    if not dmem_tensors:
        if kind == "bundle":  # the keys survived a rewrite that dropped the tensors (llama-quantize does)
            out.append("adapter.deltamem.* metadata but no δ-mem tensors: a tool that rewrote this file "
                       "(llama.cpp's quantizer does) dropped them; quantize the plain base model, then bundle it again")
            return out
        out.append("adapter.deltamem.* metadata but no δ-mem tensors")
    version = meta.get("version")
    if version != S.SCHEMA_VERSION:
        out.append(f"schema version {version!r}; this deltamem-edge reads version {S.SCHEMA_VERSION}")
    layers = meta.get("layers")
    if isinstance(layers, list):
        have = sorted({int(m.group(1)) for t in dmem_tensors if (m := _BLK.match(t["name"]))})
        if have != sorted(int(x) for x in layers):
            out.append(f"metadata lists layers {layers} but δ-mem tensors exist for layers {have}")
        for il in layers:
            if S.TENSOR_IN.format(bid=il) not in {t["name"] for t in dmem_tensors}:
                out.append(f"layer {il}: {S.TENSOR_IN.format(bid=il)} is missing")
                break
    return out


# --------------------------------------------------------------------------------------------
# Text
# --------------------------------------------------------------------------------------------


def human_bytes(n: int) -> str:
    """1536 → '1.5 KiB'."""
    size = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if size < 1024 or unit == "GiB":
            return f"{int(size)} B" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{n} B"  # pragma: no cover


def _ranges(ids: list[int]) -> str:
    """[0, 1, 2, 5] → '0-2,5'."""
    out: list[str] = []
    start = prev = ids[0]
    for i in [*ids[1:], None]:
        if i is not None and i == prev + 1:
            prev = i
            continue
        out.append(str(start) if start == prev else f"{start}-{prev}")
        if i is not None:
            start = prev = i
    return ",".join(out)


def _groups(tensors: list[dict[str, Any]]) -> list[tuple[str, list[int], str, int, int]]:
    """(name, shape, dtype, count, bytes) with per-layer tensors of equal shape and type merged.

    A merged name reads ``blk.*.`` when the group covers every layer that has the
    tensor, else ``blk.<ranges>.`` (e.g. ``blk.0-3,7.``).
    """
    groups: OrderedDict[tuple[str, tuple[int, ...], str], list[Any]] = OrderedDict()
    layers_of: dict[str, set[int]] = {}
    for t in tensors:
        m = _BLK.match(t["name"])
        pattern = _BLK.sub("blk.*.", t["name"]) if m else t["name"]
        g = groups.setdefault((pattern, tuple(t["shape"]), t["dtype"]), [0, 0, []])
        g[0] += 1
        g[1] += t["bytes"]
        if m:
            g[2].append(int(m.group(1)))
            layers_of.setdefault(pattern, set()).add(int(m.group(1)))
    rows = []
    for (pattern, shape, dtype), (n, b, ids) in groups.items():
        name = pattern
        if ids and set(ids) != layers_of[pattern]:
            name = pattern.replace("blk.*.", f"blk.{_ranges(sorted(ids))}.", 1)
        rows.append((name, list(shape), dtype, n, b))
    return rows


def render_text(info: dict[str, Any], *, all_tensors: bool = False) -> str:
    """The human report: what the file is, its δ-mem settings, and its tensors grouped by layer pattern."""
    lines = [f"{info['path']}: {info['kind']}, {info['architecture'] or 'unknown architecture'}"
             + (f", {info['name']!r}" if info.get("name") else "")]
    lines.append(f"  file size      {human_bytes(info['file_bytes'])} ({info['file_bytes']} bytes), GGUF v{info['gguf_version']}")
    model = info.get("model")
    if model:
        shown = ", ".join(f"{k.split('.')[-1]}={v}" for k, v in model.items() if k != "file_type")
        lines.append(f"  model          {shown}")
    meta = info.get("deltamem")
    if meta:
        lines.append("  δ-mem")
        for key, value in meta.items():
            if key == "layers" and isinstance(value, list) and value:
                value = f"{_ranges(sorted(int(v) for v in value))} ({len(value)} layers)"
            lines.append(f"    {key:<22} {value}")
        if info.get("state"):
            st = info["state"]
            lines.append(f"    {'state per session':<22} {st['shape']} f32 = {human_bytes(st['bytes'])}")
    tot = info["totals"]
    if info.get("fingerprint"):
        lines.append(f"  fingerprint    {info['fingerprint']}")
    if tot["deltamem_tensors"]:
        lines.append(
            f"  δ-mem tensors  {tot['deltamem_tensors']}, {tot['deltamem_elements']:,} parameters, "
            f"{human_bytes(tot['deltamem_bytes'])}"
        )
    else:
        lines.append(f"  {NO_DMEM}")
    if tot["base_tensors"]:
        lines.append(f"  model tensors  {tot['base_tensors']}, {human_bytes(tot['base_bytes'])}")
    lines.append("  tensors (ggml ne order)" + ("" if all_tensors else "; blk.* = the same in every layer"))
    if all_tensors:
        rows = [(t["name"], t["shape"], t["dtype"], 1, t["bytes"]) for t in info["tensors"]]
    else:
        rows = _groups(info["tensors"])
    width = max((len(r[0]) for r in rows), default=10)
    for name, shape, dtype, n, b in rows:
        count = f"x{n}" if n > 1 else ""
        lines.append(f"    {name:<{width}}  {str(shape):<16} {dtype:<6} {count:>5}  {human_bytes(b):>10}")
    for p in info.get("problems") or []:
        lines.append(f"  problem: {p}")
    return "\n".join(lines)
