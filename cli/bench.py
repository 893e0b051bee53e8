"""``deltamem-edge bench``: stock vs patched vs δ-mem, interleaved rounds, results into docs/benchmarks.md."""

from __future__ import annotations

from pathlib import Path

import typer


def bench(
    quick: bool = typer.Option(False, "--quick", help="SmolLM2 + the Qwen3-0.6B shape, about 20 min (the default)."),
    full: bool = typer.Option(False, "--full", help="The Qwen3-4B shape (the goals' model), about 75 min."),
    model: list[str] = typer.Option(None, "--model", "-m",
                                    help="Model(s) to run: smollm2, qwen3-0.6b, qwen3-4b (repeatable; overrides the profile)."),
    reps: int = typer.Option(None, "--reps", "-n", min=1, help="Rounds (interleaved A B … / … B A); default 5."),
    threads: int = typer.Option(2, "--threads", "-t", min=1, help="CPU threads for every variant."),
    out: Path = typer.Option(None, "--out", help="Folder for the JSON and PNG (default docs/bench; the table then goes "
                                                "to docs/benchmarks.md, else to OUT/benchmarks.md)."),
    no_aa: bool = typer.Option(False, "--no-aa", help="Skip the A/A twin process (b2); faster, but no noise band."),
    no_callgrind: bool = typer.Option(False, "--no-callgrind", help="Skip the instruction counts (valgrind)."),
    budget_min: float = typer.Option(None, "--budget-min", help="Stop after the round that would overrun this many "
                                                                "minutes per model (at least 3 rounds)."),
) -> None:
    """Measure stock llama.cpp (a), patched (b), δ-mem writes on (c) and off (d) side by side."""
    from deltamem_edge import bench as B
    from deltamem_edge.bench_models import MODEL_CHOICES

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
    if no_aa:
        kw["slots"] = tuple(s for s in kw.get("slots", B.Plan.slots) if s != "b2")
    plan = B.Plan(**kw, threads=threads, callgrind=not no_callgrind, profile=profile,
                  budget_s=budget_min * 60 if budget_min else None)
    B.main(plan, out_dir=out)


def register(app: typer.Typer, convert_app: typer.Typer) -> None:  # noqa: ARG001 - the CLI's module interface
    app.command("bench")(bench)
