"""``-m NAME`` and ``-hf REPO[:QUANT]``: the one place where chat and serve turn a model argument into files.

Why here and not in each command: both must accept the same things (a GGUF path,
an installed name, a hub repository) with the same errors.  Resolving a name reads
the registry only: no network call and no huggingface_hub import, so installed
models start offline.  Only ``-hf`` for a model that is not installed pulls.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path

from deltamem_edge.errors import HubError, ModelLoadError

from . import registry


@dataclass(frozen=True)
class ResolvedModel:
    """Files to load; ``name`` is the installed model's name (None for a plain path or the default)."""

    model: Path | None
    adapter: Path | None
    name: str | None = None


def _looks_like_path(text: str) -> bool:
    return "/" in text or "\\" in text or text.lower().endswith(".gguf") or text.startswith((".", "~"))


def _echo_err(line: str) -> None:
    print(line, file=sys.stderr)


def from_entry(entry: registry.InstalledModel, adapter: Path | None) -> ResolvedModel:
    missing = entry.missing()
    if missing:
        source = entry.adapter_repo or entry.name
        raise ModelLoadError(f"installed model {entry.name!r}: {missing[0]} is gone", path=None,
                             hint=f"deltamem-edge pull {source} restores it (from the cache where it still is)")
    return ResolvedModel(Path(entry.model), adapter or Path(entry.adapter), entry.name)


def resolve_model(model: str | Path | None, adapter: Path | None = None, *, hf: str | None = None
                  ) -> ResolvedModel:
    """A ``--model`` value (path or installed name) or a ``-hf`` repository → the files to load.

    An existing path wins over a name; a missing path (anything with a slash or
    ending in .gguf) is left for the engine, which names it in its error.
    """
    if hf is not None:
        if model is not None:
            raise HubError("give --model or -hf, not both")
        from .pull import installed_or_pull

        return from_entry(installed_or_pull(hf, echo=_echo_err), adapter)
    if model is None:
        return ResolvedModel(None, adapter)
    text = str(model)
    if Path(text).expanduser().exists() or _looks_like_path(text):
        return ResolvedModel(Path(text).expanduser(), adapter)
    entry = registry.get(text)
    if entry is None:
        installed = sorted(registry.load())
        known = f" (installed: {', '.join(installed)})" if installed else ""
        raise ModelLoadError(f"no model file and no installed model named {text!r}{known}",
                             hint="`deltamem-edge list` shows installed models; `deltamem-edge pull REPO` installs one")
    return from_entry(entry, adapter)
