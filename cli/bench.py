"""``deltamem-edge bench``: stock vs patched vs δ-mem, interleaved rounds, results into docs/benchmarks.md."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer


def bench(
    quick: bool = typer.Option(False, "--quick", help="SmolLM2 + the Qwen3-0.6B shape, about 20 min (the default)."),
    full: bool = typer.Option(False, "--full", help="The Qwen3-4B shape (the goals' model), about 75 min."),
    model: Annotated[Optional[list[str]], typer.Option(  # noqa: UP045 - typer reads the annotation at run time
        "--model", "-m", help="Model(s) to run: smollm2, qwen3-0.6b, qwen3-4b (repeatable; overrides the profile).")] = None,
    reps: int = typer.Option(None, "--reps", "-n", min=1, help="Rounds (interleaved A B … / … B A); default 5."),
    threads: int = typer.Option(2, "--threads", "-t", min=1, help="CPU threads for every variant."),
    gpu_layers: int = typer.Option(0, "--gpu-layers", "-ngl", "--n-gpu-layers",
                                   help="Layers on the GPU for every variant (-1: all; needs a GPU build)."),
    out: Annotated[Optional[Path], typer.Option(  # noqa: UP045
        "--out", help="Folder for the JSON and PNG (default docs/bench; the table then goes to docs/benchmarks.md, "
                      "else to OUT/benchmarks.md).")] = None,
    no_aa: bool = typer.Option(False, "--no-aa", help="Skip the A/A twin process (b2); faster, but no noise band."),
    variants: str = typer.Option(None, "--variants", help="Only these slots, e.g. 'b,c' for the δ-mem overhead alone "
                                                          "(a stock, b patched, b2 A/A twin, c writes on, d writes off)."),
    no_callgrind: bool = typer.Option(False, "--no-callgrind", help="Skip the instruction counts (valgrind)."),
    prefill: int = typer.Option(None, "--prefill", min=1, help="Longest prefill in tokens (default 2048; measured "
                                                               "in 512-token calls, the first gives the 512 figure)."),
    decode: int = typer.Option(None, "--decode", min=1, help="Decode steps after a 128-token prompt (default 128)."),
    seq_lengths: str = typer.Option(None, "--seq-lengths", help="Conversation lengths at which to measure llama.cpp's "
                                                                "sequence state, e.g. 512,2048,8192 (others are "
                                                                "extrapolated: the size is affine in the length)."),
    callgrind_prefill: int = typer.Option(None, "--callgrind-prefill", min=0,
                                          help="Prefill length for the instruction counts (0: decode step only)."),
    rebuild_doc: bool = typer.Option(False, "--rebuild-doc", help="Measure nothing: re-render the tables and the "
                                                                  "history from the JSON files in --out."),
    budget_min: float = typer.Option(None, "--budget-min", help="Stop after the round that would overrun this many "
                                                                "minutes per model (at least 3 rounds)."),
) -> None:
    """Measure stock llama.cpp (a), patched (b), δ-mem writes on (c) and off (d) side by side."""
    from deltamem_edge import bench as B
    from deltamem_edge.bench.models import MODEL_CHOICES

    if rebuild_doc:
        out_dir = out or B.REPO_ROOT / "docs" / "bench"
        doc = B.REPO_ROOT / "docs" / "benchmarks.md" if out is None else out_dir / "benchmarks.md"
        n = B.rebuild_doc(doc, out_dir)
        print(f"{doc}: rebuilt from {n} runs")
        return
    if quick and full:
        raise typer.BadParameter("--quick and --full exclude each other")
    profile = "full" if full else "quick"
    kw = dict(B.PROFILES[profile])
    if model:
        bad = [m for m in model if m not in MODEL_CHOICES]
        if bad:
            raise typer.BadParameter(f"unknown model {bad[0]!r}; use one of: {', '.join(MODEL_CHOICES)}")
        kw["models"] = list(model)
        profile = "custom"
    if reps:
        kw["reps"] = reps
    if prefill:
        kw["prefill"] = prefill
        kw["chunk"] = min(B.Plan.chunk, prefill)
    if decode:
        kw["decode"] = decode
    if seq_lengths:
        try:
            kw["seq_lengths"] = tuple(int(x) for x in seq_lengths.split(",") if x.strip())
        except ValueError:
            raise typer.BadParameter("--seq-lengths takes comma-separated token counts") from None
        kw["seq_lengths_for"] = {}
    if callgrind_prefill is not None:
        kw["callgrind_prefill"] = {m: callgrind_prefill for m in kw["models"]}
    if variants:
        chosen = tuple(v.strip() for v in variants.split(",") if v.strip())
        if not chosen or any(v not in B.Plan.slots for v in chosen):
            raise typer.BadParameter(f"--variants takes a comma list of {', '.join(B.Plan.slots)}")
        kw["slots"] = tuple(v for v in B.Plan.slots if v in chosen)
    if no_aa:
        kw["slots"] = tuple(s for s in kw.get("slots", B.Plan.slots) if s != "b2")
    plan = B.Plan(**kw, threads=threads, n_gpu_layers=gpu_layers, callgrind=not no_callgrind, profile=profile,
                  budget_s=budget_min * 60 if budget_min else None)
    B.main(plan, out_dir=out)


def register(app: typer.Typer, convert_app: typer.Typer) -> None:  # noqa: ARG001 - the CLI's module interface
    from . import bench_server  # its own verb, registered with bench's (cli/main.py lists the modules)

    app.command("bench")(bench)
    bench_server.register(app)
