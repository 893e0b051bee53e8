"""``deltamem-edge bench-server``: the server under 1, 4 and 8 concurrent users, δ-mem against no adapter."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer


def bench_server(
    model: str = typer.Option("smollm2", "--model", "-m", help="'smollm2' (the real SmolLM2-135M-Instruct with a "
                                                               "random δ-mem adapter of the released shape) or a "
                                                               "GGUF path with a tokenizer (then --adapter)."),
    adapter: Annotated[Optional[Path], typer.Option(  # noqa: UP045 - typer reads the annotation at run time
        "--adapter", "-a", help="δ-mem adapter for a --model path.")] = None,
    users: str = typer.Option("1,4,8", "--users", help="Concurrent users per phase, comma-separated."),
    requests: int = typer.Option(4, "--requests", "-r", min=1, help="Timed requests per user and phase."),
    max_tokens: int = typer.Option(128, "--max-tokens", min=1, help="max_tokens of every request (greedy)."),
    rounds: int = typer.Option(3, "--rounds", "-n", min=1, help="Rounds (variant order alternates)."),
    threads: int = typer.Option(2, "--threads", "-t", min=1, help="CPU threads of each server."),
    ctx_per_user: int = typer.Option(1024, "--ctx-per-user", min=64, help="Context tokens per user (sequence)."),
    gpu_layers: int = typer.Option(0, "--gpu-layers", "-ngl", help="Layers on the GPU (-1: all)."),
    variants: str = typer.Option("dmem,vanilla", "--variants", help="dmem (δ-mem, a memory per user), vanilla "
                                                                    "(no adapter, stateless), or both."),
    no_batch: bool = typer.Option(False, "--no-batch", help="One llama_decode per user and token (a unified KV "
                                                            "cache, for comparison) instead of batched steps, as `serve` runs."),
    out: Annotated[Optional[Path], typer.Option(  # noqa: UP045
        "--out", help="Folder for the JSON (default docs/bench; the table then goes to docs/benchmarks.md, "
                      "else to OUT/benchmarks.md).")] = None,
) -> None:
    """Aggregate decode tokens/s, requests/s and time to first token of `serve` at several concurrencies."""
    from deltamem_edge.bench import server as BS

    try:
        counts = tuple(int(x) for x in users.split(",") if x.strip())
    except ValueError:
        raise typer.BadParameter("--users takes comma-separated counts, e.g. 1,4,8") from None
    if not counts or min(counts) < 1:
        raise typer.BadParameter("--users takes counts of at least 1")
    chosen = tuple(v for v in BS.VARIANTS if v in {x.strip() for x in variants.split(",")})
    if not chosen:
        raise typer.BadParameter(f"--variants takes a comma list of {', '.join(BS.VARIANTS)}")
    if model == "smollm2":
        from deltamem_edge.bench.models import smollm2_model

        bm = smollm2_model()
        model_path, adapter_path, label = bm.path, bm.adapter, bm.label
    else:
        model_path = Path(model)
        if not model_path.is_file():
            raise typer.BadParameter(f"--model: no such file {model_path} (or use 'smollm2')")
        if adapter is None and "dmem" in chosen:
            raise typer.BadParameter("--adapter is needed with a --model path (or --variants vanilla)")
        adapter_path, label = adapter or model_path, model_path.name
    plan = BS.ServerPlan(model=model_path, adapter=adapter_path, label=label, users=counts, requests=requests,
                         max_tokens=max_tokens, rounds=rounds, threads=threads, ctx_per_user=ctx_per_user,
                         n_gpu_layers=gpu_layers, variants=chosen, batched=not no_batch)
    BS.main(plan, out_dir=out)


def register(app: typer.Typer) -> None:
    app.command("bench-server")(bench_server)
