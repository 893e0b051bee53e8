"""``deltamem-edge eval-memory``: does the memory file remember held-out facts?

Runs every condition of ``deltamem_edge.recall.evaluate`` through the runtime (Engine and
Conversation, greedy) and prints the markdown table that models/README.md carries; with
``--json`` every number and every answer is written too.  With no --model, the embedded
default model and its default adapter are measured, like ``chat`` picks them.
"""

from __future__ import annotations

import json
from pathlib import Path

import typer

from deltamem_edge.errors import DeltaMemError

from ._options import facts_per_memory

N_CTX = 2048


def _check_json_target(path: Path | None) -> None:
    """Fail before a long run, not after it, when the report cannot be written."""
    if path is not None and not path.parent.is_dir():
        raise DeltaMemError("the folder for the JSON report does not exist", path=path,
                            hint="create the folder first, or pass another --json path")


def eval_memory(
    model: Path = typer.Option(None, "--model", "-m", help="Model GGUF (default: the embedded SmolLM2-135M-Instruct)."),
    adapter: Path = typer.Option(None, "--adapter", "-a", help="δ-mem adapter GGUF (default: bundled in the model, or <model>.dmem.gguf next to it; with no --model the default adapter of models/)."),
    episodes: int = typer.Option(60, "-n", "--episodes", min=1, help="Episodes per condition (and per capacity)."),
    seed: int = typer.Option(1, "--seed", "-s", help="Seed of the held-out episodes."),
    capacity: str = typer.Option("1,3,8", "--capacity", help="Facts per memory for the capacity runs, comma-separated."),
    tell_max_tokens: int = typer.Option(48, "--tell-max-tokens", min=1, help="Cap on the model's replies to the told facts."),
    answer_max_tokens: int = typer.Option(24, "--answer-max-tokens", min=1, help="Cap on each answer."),
    threads: int = typer.Option(None, "--threads", "-t", help="CPU threads (default: all cores, at most 8)."),
    json_path: Path = typer.Option(None, "--json", help="Also write every number and answer here."),
    no_perplexity: bool = typer.Option(False, "--no-perplexity", help="Skip the perplexity check."),
) -> None:
    """Measure recall of held-out facts: no history, empty memory, history in context, state only."""
    from deltamem_edge import defaults
    from deltamem_edge.engine import Engine
    from deltamem_edge.recall.evaluate import EvalConfig, evaluate_memory
    from deltamem_edge.recall.report import markdown

    cfg = EvalConfig(n=episodes, seed=seed, capacity=facts_per_memory(capacity, "--capacity"), tell_max_tokens=tell_max_tokens,
                     answer_max_tokens=answer_max_tokens, perplexity=not no_perplexity)
    _check_json_target(json_path)
    command = cfg.command(model, adapter)
    model_path = model or defaults.default_model_path()
    adapter_path = adapter if adapter is not None or model is not None else defaults.default_adapter_path()
    with Engine(model_path, adapter_path, n_ctx=N_CTX, n_threads=threads) as engine, \
            Engine(model_path, False, n_ctx=N_CTX, n_threads=threads) as base:
        result = evaluate_memory(engine, base, cfg, command=command)
    text = markdown(result)
    if model is None and adapter is None and defaults.default_adapter_label(adapter_path) == defaults.PLACEHOLDER_LABEL:
        text += f"\nThe adapter is the {defaults.PLACEHOLDER_LABEL}: it is not expected to remember.\n"
    print(text)
    if json_path is not None:
        try:
            json_path.write_text(json.dumps(result.as_dict(), indent=2, ensure_ascii=False) + "\n")
        except OSError as e:
            raise DeltaMemError(f"could not write the JSON report: {e.strerror}", path=json_path,
                                hint="check the path and its permissions") from e
