"""``deltamem-edge train``: train a δ-mem adapter for a frozen GGUF base on this CPU (needs the 'train' extra).

The defaults are the recipe of the shipped SmolLM2 adapter (models/README.md); every
flag changes one thing of it.  The run writes, in --out: the upstream adapter folder
(``adapter/``), the runtime adapter (``<model>.dmem.gguf``), ``checkpoint.pt`` (a run
interrupted with Ctrl-C resumes from it when started again with the same flags) and
``train_log.json``.
"""

from __future__ import annotations

import sys
from pathlib import Path

import typer

from ._options import facts_per_memory


def train(
    model: Path = typer.Option(None, "--model", "-m", help="Base model GGUF (default: the embedded SmolLM2-135M-Instruct)."),
    out: Path = typer.Option(None, "--out", "-o", help="Output folder (default: <data dir>/adapters/<model name>)."),
    steps: int = typer.Option(None, "--steps", help="Optimizer steps."),
    batch: int = typer.Option(None, "--batch", help="Episodes per step."),
    lr: float = typer.Option(None, "--lr", help="Peak learning rate (cosine, 10 % warm-up)."),
    rank: int = typer.Option(None, "--rank", help="δ-mem rank r."),
    state_heads: int = typer.Option(None, "--state-heads", help="State heads (1: TSW, 4: MSW)."),
    delta_heads: str = typer.Option(None, "--delta-heads", help="Where the read-out is added: q,k,v,o."),
    beta_bias: float = typer.Option(None, "--beta-bias-init", help="Initial write-gate bias (upstream: -1.5)."),
    gain: float = typer.Option(None, "--gain", help="Initial size of the δ heads (upstream online_gain 0.05)."),
    facts: str = typer.Option(None, "--facts", help="Facts per training memory, drawn from this list (e.g. 1,1,2,3)."),
    episodes: int = typer.Option(None, "--episodes", help="Fact episodes in the training set."),
    generic: int = typer.Option(None, "--generic", help="General-behaviour episodes (the base model's own answers)."),
    prose: int = typer.Option(None, "--prose", help="Episodes that write ordinary prose into the state (the gate learns to stay shut)."),
    in_context: int = typer.Option(None, "--in-context",
                                   help="Episodes that ask the question in the told conversation itself (reads must not spoil copying from the context)."),
    prose_read: int = typer.Option(None, "--prose-read",
                                   help="Episodes that read prose from a state another conversation wrote (next-token loss, weighed by --lm-weight)."),
    update: str = typer.Option(None, "--update", help="State update: standard (λ = 1 − β) or no_lambda (plain delta rule)."),
    precision: str = typer.Option("auto", "--precision",
                                  help="Backbone matmuls: bf16, f32, or auto (bf16 only where the CPU has native bf16)."),
    contrast: float = typer.Option(None, "--contrast-weight", help="Weight of the own-vs-swapped-state margin on the value tokens."),
    value_weight: float = typer.Option(None, "--value-weight", help="Loss weight of the remembered value's tokens (others: 1)."),
    addressing: float = typer.Option(None, "--addressing-weight",
                                     help="Weight of the write-gate loss: open on told values, shut elsewhere (0: off)."),
    key_weight: float = typer.Option(None, "--key-weight",
                                     help="Weight of the loss that points answer queries at the asked value's keys (0: off)."),
    beta_lr_mult: float = typer.Option(None, "--beta-lr-mult", help="Learning-rate factor of the write-gate weights."),
    lm_weight: float = typer.Option(None, "--lm-weight",
                                    help="Weight of the next-token loss on the text being written (keeps ordinary text as the base predicts it; 0: off)."),
    init: str = typer.Option(None, "--init", help="Initial δ-mem weights: upstream, or tied (keys = queries, δ_o = W_vᵀ)."),
    query_gain: float = typer.Option(None, "--query-gain", help="With --init tied: initial size of δ_q (and δ_k, δ_v)."),
    seed: int = typer.Option(None, "--seed", "-s", help="Seed of the data, the order and the initial weights."),
    threads: int = typer.Option(None, "--threads", "-t", help="CPU threads (default: all cores)."),
) -> None:
    """Train a δ-mem adapter that remembers facts across conversations, for a frozen GGUF base."""
    import dataclasses

    from deltamem_edge import defaults
    from deltamem_edge.errors import DeltaMemError

    try:
        from deltamem_edge.train.loop import resolved
        from deltamem_edge.train.model import INITS, UPDATE_MODES
        from deltamem_edge.train.recipe import DEFAULT_RECIPE
        from deltamem_edge.train.run import run_training
    except ModuleNotFoundError as e:
        if e.name not in ("torch", "safetensors", "tqdm"):
            raise
        raise DeltaMemError(f"training needs {e.name}, which is not installed",
                            hint="pip install 'deltamem-edge[train]'") from e

    model = model or defaults.default_model_path()
    if not model.is_file():
        raise DeltaMemError("model file not found", path=model)
    cfg = DEFAULT_RECIPE
    spec_changes = {k: v for k, v in {
        "rank": rank, "state_heads": state_heads, "beta_bias_init": beta_bias, "online_gain": gain,
        "delta_heads": tuple(h.strip() for h in delta_heads.split(",")) if delta_heads else None,
        "update_mode": update, "init": init, "query_gain": query_gain,
    }.items() if v is not None}
    changes = {k: v for k, v in {
        "steps": steps, "batch": batch, "lr": lr, "seed": seed, "n_fact_episodes": episodes,
        "n_generic_episodes": generic, "n_prose_episodes": prose, "contrast_weight": contrast, "facts_per_memory": facts_per_memory(facts, "--facts") if facts else None,
        "value_weight": value_weight, "addressing_weight": addressing, "key_weight": key_weight, "beta_lr_mult": beta_lr_mult,
        "lm_weight": lm_weight, "n_in_context_episodes": in_context, "n_prose_read_episodes": prose_read,
    }.items() if v is not None}
    precisions = {"auto": None, "bf16": True, "f32": False}
    if precision not in precisions:
        raise typer.BadParameter(f"{precision!r}: choose auto, bf16 or f32", param_hint="--precision")
    changes["bf16"] = precisions[precision]
    if init is not None and init not in INITS:
        raise typer.BadParameter(f"{init!r}: choose {' or '.join(INITS)}", param_hint="--init")
    if update is not None and update not in UPDATE_MODES:
        raise typer.BadParameter(f"{update!r}: choose {' or '.join(UPDATE_MODES)}", param_hint="--update")
    cfg = resolved(dataclasses.replace(cfg, spec=dataclasses.replace(cfg.spec, **spec_changes), **changes))
    if cfg.n_prose_read_episodes and cfg.lm_weight <= 0:
        raise typer.BadParameter("prose-read episodes are trained by the next-token loss; give --lm-weight > 0",
                                 param_hint="--prose-read")
    if out is None:
        from .chat import data_dir

        out = data_dir() / "adapters" / model.name.removesuffix(".gguf").lower()
    print(f"training a δ-mem adapter for {model}\n  into {out} (config {cfg.digest()}, {'bf16' if cfg.bf16 else 'f32'})", file=sys.stderr)
    try:
        adapter = run_training(model, out, cfg, threads=threads)
    except KeyboardInterrupt:
        print(f"\ninterrupted: the last checkpoint in {out} is kept; run the same command again to resume",
              file=sys.stderr)
        raise typer.Exit(130) from None
    print(f"wrote {adapter}")
    print(f"chat with it: deltamem-edge chat -m {model} --adapter {adapter}")
    print(f"measure it:   deltamem-edge eval-memory -m {model} --adapter {adapter}")


def register(app: typer.Typer, convert_app: typer.Typer) -> None:
    app.command("train")(train)
