"""``pull``: an upstream δ-mem adapter repository + a GGUF of its base → an installed, named model.

Steps, each of which can fail with one HubError naming the repository, before
anything is registered:

1. the adapter repository's ``delta_mem_config.json`` and weights (``.safetensors``
   preferred, else ``delta_mem_adapter.pt``) and its model card, downloaded and
   verified (``deltamem_edge.hub.fetch``);
2. the base: ``--base FILE`` (a local GGUF), ``--base REPO[:QUANT]``, or the model
   card's ``base_model`` (else ``bases.KNOWN_ADAPTERS``) mapped through
   ``bases.known_bases()`` to a GGUF repository, where the quantization picks the file;
3. conversion with our own readers (``converter.adapter.convert_adapter``; a ``.pt``
   is parsed by the restricted reader, never unpickled) into a temporary folder,
   checked against the base's shapes, then renamed into ``<data dir>/models/<name>/``;
4. the registry entry, written atomically (``deltamem_edge.hub.registry``).

Converting a base from Hugging Face safetensors is not done here: without a known
GGUF repository the error says to pass ``--base`` (``convert model`` makes one).
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import tempfile
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path

from deltamem_edge.errors import DeltaMemError, HubError

from . import bases, registry
from .fetch import Fetched, fetch

CONFIG_FILENAME = "delta_mem_config.json"
PT_WEIGHTS = "delta_mem_adapter.pt"
CARD = "README.md"
_REPO_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,95}/[A-Za-z0-9][A-Za-z0-9._-]{0,95}$")

Echo = Callable[[str], None]


def parse_repo(spec: str, *, what: str = "repository") -> tuple[str, str | None]:
    """``org/name[:QUANT]`` → (``org/name``, ``QUANT`` upper-cased or None)."""
    repo, sep, quant = spec.strip().partition(":")
    if not _REPO_RE.match(repo) or (sep and not quant):
        raise HubError(f"{what} {spec!r} is not a hub repository id",
                       hint="write it as org/name, optionally with :QUANT (e.g. org/name:Q4_K_M)")
    return repo, (bases.normalize_quant(quant) if quant else None)


def default_name(repo: str) -> str:
    """The local name of a pulled adapter: its repository's name (``org/delta-mem_x`` → ``delta-mem_x``)."""
    return repo.rsplit("/", 1)[-1]


def _adapter_files(repo: str) -> Callable[[list[str]], list[str]]:
    def choose(files: list[str]) -> list[str]:
        top = [f for f in files if "/" not in f]
        if CONFIG_FILENAME not in top:
            raise HubError(f"{repo}: not a δ-mem adapter repository (no {CONFIG_FILENAME} at its top level)",
                           hint=f"pull an upstream δ-mem adapter: {CONFIG_FILENAME} + {PT_WEIGHTS} or *.safetensors")
        safetensors = sorted(f for f in top if f.endswith(".safetensors"))
        if len(safetensors) > 1:
            raise HubError(f"{repo}: several weight files ({', '.join(safetensors)}); expected one adapter")
        weights = safetensors or [f for f in top if f == PT_WEIGHTS]
        if not weights:
            raise HubError(f"{repo}: no adapter weights ({PT_WEIGHTS} or *.safetensors) next to {CONFIG_FILENAME}")
        return [CONFIG_FILENAME, weights[0], *([CARD] if CARD in top else [])]

    return choose


def card_base_model(card: Path | None) -> str | None:
    """``base_model`` from a model card's YAML header (the hub's "finetuned from"), if it names exactly one."""
    if card is None:
        return None
    from huggingface_hub.repocard import metadata_load

    try:
        meta = metadata_load(card) or {}
    except Exception:  # noqa: BLE001 - a card we cannot parse names no base; the caller says what to pass
        return None
    value = meta.get("base_model")
    if isinstance(value, list) and len(value) == 1:
        value = value[0]
    return value if isinstance(value, str) and _REPO_RE.match(value) else None


def _base_from_table(repo: str, base_id: str | None, quant: str | None) -> tuple[str, str, str]:
    """(GGUF repo, quant, base id) for the adapter's own base."""
    if base_id is None:
        raise HubError(f"{repo}: the repository does not name its base model (no base_model in its model card)",
                       hint="pass --base REPO[:QUANT] (a GGUF repository) or --base FILE (a local GGUF)")
    source = bases.gguf_source(base_id)
    if source is None:
        raise HubError(f"{repo}: no GGUF repository is known for its base model {base_id}",
                       hint=f"pass --base with a GGUF of {base_id}: REPO[:QUANT] on the hub, or a local FILE "
                            "(`deltamem-edge convert model` makes one); docs/models.md has the table of known bases")
    return source.repo, quant or bases.DEFAULT_QUANT, base_id


def _is_file_arg(base: str) -> bool:
    return Path(base).expanduser().exists() or base.lower().endswith(".gguf") or base.startswith((".", "/", "~"))


def resolve_base(repo: str, base: str | None, base_id: str | None, quant: str | None, *, echo: Echo
                 ) -> tuple[list[Path], Fetched | None, str, str]:
    """(base GGUF files, the fetch they came from or None for a local file, quant label, base model id)."""
    if base is not None and _is_file_arg(base):
        path = Path(base).expanduser().resolve()
        if not path.is_file():
            raise HubError("--base: no such GGUF file", path=path)
        echo(f"base: {path} (local file)")
        return [path], None, bases.quant_of(path) or "", base_id or ""
    if base is None:
        base_repo, quant, base_id = _base_from_table(repo, base_id, quant)
    else:
        base_repo, base_quant = parse_repo(base, what="--base")
        mapped = bases.gguf_source(base_repo)  # --base Qwen/Qwen3-4B-Instruct-2507 means a GGUF of it
        base_id = base_repo if mapped else (base_id or "")
        base_repo = mapped.repo if mapped else base_repo
        quant = base_quant or quant or bases.DEFAULT_QUANT
    echo(f"base: {base_repo} ({quant}){f' for {base_id}' if base_id else ''}")
    fetched = fetch(base_repo, None, lambda files: bases.pick_gguf(files, quant, base_repo), echo=echo)
    paths = [fetched.files[n] for n in sorted(fetched.files)]
    return paths, fetched, quant, base_id


def _convert(repo: str, adapter: Fetched, weights: str, model: Path, target_dir: Path) -> tuple[Path, str]:
    """Convert into a temporary folder inside ``target_dir``; return (final adapter path, fingerprint hex)."""
    from deltamem_edge.converter.adapter import convert_adapter
    from deltamem_edge.fingerprint import adapter_fingerprint

    new_dir = not target_dir.exists()
    target_dir.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".pull-", dir=target_dir))
    try:
        try:
            written = convert_adapter(adapter.files[weights], model, tmp / "adapter.dmem.gguf",
                                      config=adapter.files[CONFIG_FILENAME])
            fp = adapter_fingerprint(written).hex()
        except DeltaMemError as e:
            raise HubError(f"{repo}: {e}", hint=e.hint or "this repository is not an adapter deltamem-edge can use"
                           ) from e
        final = target_dir / f"{model.name.removesuffix('.gguf')}.{fp[:16]}.dmem.gguf"
        os.replace(written, final)
        return final, fp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        if new_dir:  # a failed first pull leaves no folder behind
            with contextlib.suppress(OSError):
                target_dir.rmdir()
        raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def pull(spec: str, *, base: str | None = None, revision: str | None = None, name: str | None = None,
         echo: Echo = print) -> registry.InstalledModel:
    """Install the δ-mem adapter repository ``spec`` (``org/name[:QUANT]``) on its base; return its entry."""
    repo, quant = parse_repo(spec)
    name = registry.check_name(name or default_name(repo))
    echo(f"adapter: {repo}{f' @ {revision}' if revision else ''}")
    adapter = fetch(repo, revision, _adapter_files(repo), echo=echo)
    weights = next(n for n in adapter.files if n not in (CONFIG_FILENAME, CARD))
    base_id = card_base_model(adapter.files.get(CARD)) or bases.known_adapter_base(repo)
    base_files, base_fetch, quant_label, base_id = resolve_base(repo, base, base_id, quant, echo=echo)
    model = base_files[0]
    echo(f"checked sha256 of {len(adapter.files) + (len(base_files) if base_fetch else 0)} downloaded files")

    previous = registry.get(name)
    target_dir = registry.models_dir() / name
    final, fp = _convert(repo, adapter, weights, model, target_dir)
    entry = registry.InstalledModel(
        name=name, model=str(model), adapter=str(final), adapter_fingerprint=fp, adapter_repo=repo,
        adapter_revision=adapter.commit, base_repo=base_fetch.repo if base_fetch else "",
        base_revision=base_fetch.commit if base_fetch else "", base_files=tuple(str(p) for p in base_files),
        base_model=base_id, quant=quant_label,
        size=sum(p.stat().st_size for p in base_files) + final.stat().st_size,
        installed_at=datetime.now(timezone.utc).replace(microsecond=0).isoformat())
    replaced = Path(previous.adapter) if previous and Path(previous.adapter) != final else None
    try:
        registry.add(entry)
    except BaseException:
        if previous is None or replaced is not None:  # a new file nothing refers to
            final.unlink(missing_ok=True)
        raise
    if replaced is not None and replaced.parent == target_dir:  # the adapter of the pull this one replaces
        with contextlib.suppress(OSError):
            replaced.unlink()
    echo(f"installed {name}: adapter {fp[:16]} on {model.name}")
    return entry


def installed_or_pull(spec: str, *, echo: Echo = print) -> registry.InstalledModel:
    """What ``chat -hf REPO[:QUANT]`` runs: the installed model pulled from that repository, else a pull now."""
    repo, quant = parse_repo(spec)
    entry = registry.find(repo, quant)
    if entry is not None and not entry.missing():
        return entry
    return pull(spec, echo=echo)
