"""The registry of installed models: short local names → base GGUF + δ-mem adapter GGUF.

Why a JSON file of our own: ``deltamem-edge chat -m NAME`` must start with no
network call and without importing huggingface_hub (which is an optional extra),
so the name → files mapping cannot live in the hub's cache.  The file is
``<data dir>/models.json`` (``deltamem_edge.paths.data_dir``; move it with
DELTAMEM_DATA or XDG_DATA_HOME).  It is only ever replaced whole (temp file +
rename), after everything it points to has been downloaded, checked and
converted, so a crash mid-pull leaves the previous registry intact.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import tempfile
from dataclasses import asdict, dataclass, fields
from pathlib import Path

from deltamem_edge.errors import DeltaMemError, HubError
from deltamem_edge.paths import data_dir

REGISTRY_NAME = "models.json"
FORMAT = 1
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,95}$")


@dataclass(frozen=True)
class InstalledModel:
    """One registry entry.  Paths are absolute; the base GGUF stays in the Hugging Face cache (no copy)."""

    name: str
    model: str  # base GGUF (the first part of a split model)
    adapter: str  # converted δ-mem adapter GGUF, in <data dir>/models/<name>/
    adapter_fingerprint: str  # full hex sha256 (deltamem_edge.fingerprint.adapter_fingerprint)
    adapter_repo: str  # "org/name", or "" for a local adapter
    adapter_revision: str  # commit hash
    base_repo: str  # "org/name-GGUF", or "" for a local --base FILE
    base_revision: str
    base_files: tuple[str, ...]  # every file of the base (all parts of a split model)
    base_model: str  # the base's model id (e.g. Qwen/Qwen3-4B-Instruct-2507), "" if unknown
    quant: str  # e.g. Q4_K_M, "" if unknown
    size: int  # bytes on disk: base files + adapter
    installed_at: str  # ISO 8601, UTC

    def files(self) -> list[Path]:
        return [Path(self.adapter), *(Path(f) for f in self.base_files)]

    def missing(self) -> list[Path]:
        return [p for p in self.files() if not p.is_file()]


def registry_path() -> Path:
    return data_dir() / REGISTRY_NAME


def models_dir() -> Path:
    """Where converted adapters live: one folder per installed name."""
    return data_dir() / "models"


def check_name(name: str) -> str:
    """A local name is a plain file-name-like word (it names a folder and is typed after ``-m``)."""
    if not _NAME_RE.match(name) or name in (".", ".."):
        raise HubError(f"{name!r} cannot be a local model name",
                       hint="use letters, digits, '.', '_' and '-' (e.g. --name qwen3-dmem)")
    return name


def load() -> dict[str, InstalledModel]:
    """Every installed model by name; an absent registry is an empty one."""
    path = registry_path()
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return {}
    except OSError as e:
        raise DeltaMemError(f"cannot read the model registry ({e.strerror})", path=path) from None
    try:
        data = json.loads(text)
        if data.get("format") != FORMAT:
            raise ValueError(f"format {data.get('format')!r}, expected {FORMAT}")
        known = {f.name for f in fields(InstalledModel)}
        out = {}
        for name, raw in data["models"].items():
            entry = {k: v for k, v in raw.items() if k in known}
            entry["base_files"] = tuple(entry.get("base_files", ()))
            out[name] = InstalledModel(**entry)
        return out
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        raise DeltaMemError(f"the model registry is damaged ({e})", path=path,
                            hint="delete it and pull the models again (downloads are reused from the cache)") from None


def get(name: str) -> InstalledModel | None:
    return load().get(name)


def _write(models: dict[str, InstalledModel]) -> None:
    path = registry_path()
    path.parent.mkdir(parents=True, exist_ok=True)
    data = {"format": FORMAT, "models": {n: asdict(m) for n, m in sorted(models.items())}}
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".part", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(data, f, indent=2)
            f.write("\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def add(entry: InstalledModel) -> None:
    """Register (or replace) ``entry`` atomically."""
    check_name(entry.name)
    models = load()
    models[entry.name] = entry
    _write(models)


def find(adapter_repo: str, quant: str | None = None) -> InstalledModel | None:
    """An installed model pulled from ``adapter_repo`` (with base ``quant`` if given), preferring the default name."""
    candidates = [m for m in load().values() if m.adapter_repo.lower() == adapter_repo.lower()
                  and (quant is None or m.quant.upper() == quant.upper())]
    default = adapter_repo.rsplit("/", 1)[-1]
    candidates.sort(key=lambda m: (m.name != default, m.name))
    return candidates[0] if candidates else None
