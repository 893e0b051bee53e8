"""``deltamem-edge build``: compile (or find in the cache) the patched native library."""

from __future__ import annotations

import typer


def build(
    force: bool = typer.Option(False, "--force", help="Rebuild even when the cache has this build."),
    backend: str = typer.Option(None, "--backend", help="cpu, cuda, metal or vulkan (default: DELTAMEM_BACKEND or the platform's)."),
) -> None:
    """Build the δ-mem libllama for this checkout (cached: a rerun takes well under a second)."""
    from deltamem_edge.native import build as native

    config = native.BuildConfig(backend) if backend else None
    if config and backend not in native.BACKENDS:
        raise typer.BadParameter(f"backend must be one of {', '.join(native.BACKENDS)}")
    print(native.build(config, force=force))
