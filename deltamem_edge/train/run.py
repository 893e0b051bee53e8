"""One training run from a GGUF base to a runtime adapter: what ``deltamem-edge train`` does.

Steps: tokenize the seeded mix with the runtime's own template (an Engine without
adapter), load the frozen base in torch, train, export the upstream folder and the
``.dmem.gguf``, and write ``train_log.json`` (config, per-step loss, dev probes,
time taken) next to them.
"""

from __future__ import annotations

import json
import math
import os
import platform
import sys
import time
from dataclasses import asdict
from pathlib import Path

import torch

from ..engine import Engine
from ..recall.facts import dev_text, make_episodes
from .data import PROSE_MAX_TOKENS, build_mix, fact_examples, in_context_examples, prose_read_examples, text_examples
from .dev import in_context_probe, read_text_nll, recall_probe, text_nll, text_probe
from .export import export_gguf
from .loop import TrainConfig, curriculum_steps, resolved, train
from .model import DeltaMem, DeltaMemModel, FrozenBase

LOG_NAME = "train_log.json"
TEXT_PROBE_WINDOWS = 32  # dev prose windows (facts.dev_text) the dev probe reads with the memory on and off


def run_training(base_path: Path, out_dir: Path, cfg: TrainConfig, *, threads: int | None = None,
                 adapter_name: str | None = None, dev_episodes: int = 64, eval_every: int = 50,
                 quiet: bool = False) -> Path:
    """Train, export and log; returns the written ``.dmem.gguf``."""
    from tqdm import tqdm

    t0 = time.perf_counter()
    cfg = resolved(cfg)  # bf16 decided for this CPU, so the log and the checkpoint digest say which
    torch.set_num_threads(threads or os.cpu_count() or 1)
    base = FrozenBase(base_path)  # first: a model we cannot train is refused before any data work
    out_dir.mkdir(parents=True, exist_ok=True)
    t_data0 = time.perf_counter()
    engine = Engine(base_path, adapter_path=False, n_ctx=2048)
    try:
        examples, tok = build_mix(engine, cfg.n_fact_episodes, cfg.n_generic_episodes, cfg.seed,
                                  cfg.facts_per_memory, n_prose=cfg.n_prose_episodes,
                                  n_in_context=cfg.n_in_context_episodes, n_prose_read=cfg.n_prose_read_episodes)
        dev_eps = make_episodes("dev", dev_episodes, cfg.seed, n_facts=1)
        dev = fact_examples(tok, dev_eps)
        dev_in_context = in_context_examples(tok, dev_eps)
        prose = text_examples(tok, dev_text(), TEXT_PROBE_WINDOWS, cfg.seed)  # prose the training never reads
        told_eps = make_episodes("dev", TEXT_PROBE_WINDOWS, cfg.seed + 1, n_facts=cfg.facts_per_memory)
        prose_read = prose_read_examples(tok, told_eps, cfg.seed, docs=dev_text(), max_tokens=PROSE_MAX_TOKENS)
        small: list = []
        if curriculum_steps(cfg):
            n_small = min(cfg.n_fact_episodes, curriculum_steps(cfg) * cfg.batch)
            small, _ = build_mix(engine, n_small, 0, cfg.seed, cfg.facts_per_memory[:1], value_limit=cfg.small_values)
    finally:
        engine.close()
    t_data = time.perf_counter() - t_data0
    mem = DeltaMem(base, cfg.spec, seed=cfg.seed)
    model = DeltaMemModel(base, mem)

    bar = tqdm(total=cfg.steps, desc="train", unit="step", disable=quiet, file=sys.stderr, dynamic_ncols=True)

    def on_step(p) -> None:  # noqa: ANN001 - loop.Progress
        bar.n = p.step
        bar.set_postfix(loss=f"{p.loss:.3f}", tok_s=f"{p.tokens_per_s:.0f}")
        bar.refresh()

    bare = DeltaMemModel(base, None)  # the frozen base: its numbers are computed once
    bf16 = bool(cfg.bf16)
    base_text_nll = text_nll(bare, prose, bf16=bf16)
    base_read_nll = read_text_nll(bare, prose_read, bf16=bf16)
    base_in_context = in_context_probe(bare, dev_in_context, bf16=bf16)

    def evaluate(step: int) -> dict:
        probe = recall_probe(model, dev, bf16=bf16)
        if prose:
            probe |= text_probe(model, prose, bf16=bf16, base_nll=base_text_nll)
        if prose_read:
            probe["read_text_ppl_ratio"] = math.exp(read_text_nll(model, prose_read, bf16=bf16) - base_read_nll)
        probe |= in_context_probe(model, dev_in_context, bf16=bf16)
        probe["in_context_top1_base"] = base_in_context["in_context_top1"]
        bar.write(f"step {step}: dev value log-prob own {probe['value_logp_own']:.2f} "
                  f"other {probe['value_logp_other']:.2f}, value top-1 {probe['value_top1']:.0%}, "
                  f"likelier than with an empty memory {probe['better_than_empty']:.0%}"
                  + (f"; dev prose perplexity ×{probe['text_ppl_ratio']:.3f} of the base" if prose else "")
                  + (f", after another conversation ×{probe['read_text_ppl_ratio']:.3f}" if prose_read else "")
                  + f"; in context top-1 {probe['in_context_top1']:.0%} (base {probe['in_context_top1_base']:.0%})")
        return probe

    try:
        history = train(model, examples, cfg, out_dir, on_step=on_step, evaluate=evaluate, eval_every=eval_every,
                        small_examples=small)
    finally:
        bar.close()
    name = adapter_name or f"{base_path.name.removesuffix('.gguf')}.dmem.gguf"
    out = export_gguf(mem, base, out_dir / name, folder=out_dir / "adapter")
    log = {
        "config": asdict(cfg), "config_digest": cfg.digest(), "base": str(base_path), "adapter": str(out),
        "examples": len(examples), "threads": torch.get_num_threads(), "torch": torch.__version__,
        "machine": platform.processor() or platform.machine(), "data_s": round(t_data, 1),
        "total_s": round(time.perf_counter() - t0, 1), "history": history,
    }
    (out_dir / LOG_NAME).write_text(json.dumps(log, indent=1) + "\n")
    return out
