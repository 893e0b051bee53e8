"""``deltamem-edge pull`` and ``deltamem-edge list``: models from the Hugging Face Hub, by name.

``pull`` needs the 'hub' extra (huggingface_hub); ``list`` reads the registry only.
docs/models.md has the details (known bases, registry, offline use, integrity checks).
"""

from __future__ import annotations

import sys
from typing import Annotated

import typer


def _err(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


def pull(
    repo: Annotated[str, typer.Argument(help="δ-mem adapter repository, REPO[:QUANT] (QUANT picks the base GGUF, "
                                        "default Q4_K_M), e.g. declare-lab/delta-mem_qwen3_4b-instruct.")],
    base: Annotated[str | None, typer.Option("--base", "-b", help="Base model: a GGUF repository REPO[:QUANT], a "
                                             "known base model id, or a local GGUF FILE (default: the adapter's "
                                             "base_model, mapped through the table of known bases).")] = None,
    revision: Annotated[str | None, typer.Option("--revision", help="Branch, tag or commit of the adapter "
                                                 "repository (default: main).")] = None,
    name: Annotated[str | None, typer.Option("--name", help="Local name (default: the repository's name).")] = None,
) -> None:
    """Download a δ-mem adapter and its base from the Hugging Face Hub, verify, convert and install them."""
    from deltamem_edge.converter.inspect import human_bytes
    from deltamem_edge.hub.pull import pull as run_pull

    entry = run_pull(repo, base=base, revision=revision, name=name, echo=_err)
    print(f"installed {entry.name} ({entry.quant or 'base'} · {human_bytes(entry.size)}); "
          f"chat with: deltamem-edge chat -m {entry.name}")


def list_models(
    as_json: Annotated[bool, typer.Option("--json", help="Print the registry entries as JSON.")] = False,
) -> None:
    """Show the installed models: name, base, quantization, size on disk, adapter fingerprint."""
    import json
    from dataclasses import asdict

    from deltamem_edge.converter.inspect import human_bytes
    from deltamem_edge.hub import registry

    models = registry.load()
    if as_json:
        print(json.dumps([asdict(m) for m in models.values()], indent=2))
        return
    if not models:
        print(f"no installed models ({registry.registry_path()}); install one with: deltamem-edge pull REPO")
        return
    rows = [("NAME", "BASE", "QUANT", "SIZE", "ADAPTER")]
    for m in models.values():
        base = m.base_model or m.base_repo or m.model
        state = "  (files missing: pull again)" if m.missing() else ""
        rows.append((m.name, base, m.quant or "-", human_bytes(m.size), m.adapter_fingerprint[:16] + state))
    widths = [max(len(r[i]) for r in rows) for i in range(4)]
    for r in rows:
        print("  ".join(c.ljust(w) for c, w in zip(r[:4], widths, strict=True)) + "  " + r[4])


def register(app: typer.Typer, convert_app: typer.Typer) -> None:
    app.command("pull")(pull)
    app.command("list")(list_models)
