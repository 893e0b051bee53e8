"""``deltamem-edge inspect FILE.gguf``: δ-mem metadata, tensors, sizes and fingerprint of a model, adapter or bundle."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer


def inspect(
    path: Annotated[Path, typer.Argument(help="A GGUF file: model, δ-mem adapter or bundle.")],
    as_json: Annotated[bool, typer.Option("--json", help="Machine-readable output (every tensor listed).")] = False,
    all_tensors: Annotated[bool, typer.Option("--all", help="List every tensor instead of grouping layers.")] = False,
) -> None:
    """Show what a GGUF holds: kind, δ-mem settings, tensors, sizes, fingerprint."""
    from deltamem_edge.converter.inspect import inspect_gguf, render_text

    info = inspect_gguf(path)
    if as_json:
        print(json.dumps(info, indent=2, ensure_ascii=False))
    else:
        print(render_text(info, all_tensors=all_tensors))


def register(app: typer.Typer, convert_app: typer.Typer) -> None:  # noqa: ARG001 - the CLI's module interface
    app.command("inspect")(inspect)
