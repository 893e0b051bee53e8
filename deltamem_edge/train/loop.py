"""The training loop: AdamW on the δ-mem weights only, resumable, Ctrl-C safe, seeded.

Why it looks like this: upstream's regime (deltamem-math.md §4.4, training.md) with
the two runs of ``Conversation``: run 1 writes the told facts, run 2 reads them
from the state alone and is trained on the answer.  Gradients flow through the
state writes (the state is not detached).  A checkpoint is written atomically
every ``checkpoint_every`` steps and on Ctrl-C, so an interrupted run resumes
where it stopped and ends with the same weights as an uninterrupted one.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch
import torch.nn.functional as F

from ..conversation import deferred_interrupts
from .addressing import beta_loss, key_loss
from .data import Batch, Example, collate
from .model import DeltaMem, DeltaMemModel, DeltaMemSpec

CHECKPOINT = "checkpoint.pt"


@dataclass(frozen=True)
class TrainConfig:
    """Everything that decides the trained weights (its hash names the checkpoint's run)."""

    spec: DeltaMemSpec = field(default_factory=DeltaMemSpec)
    steps: int = 300
    batch: int = 16
    lr: float = 2e-3
    warmup: float = 0.1
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    seed: int = 1
    n_fact_episodes: int = 6000
    n_generic_episodes: int = 600
    n_prose_episodes: int = 0  # prose written into the state, the gate trained shut on it (data.prose_examples)
    facts_per_memory: tuple[int, ...] = (1, 1, 2, 3)
    value_weight: float = 1.0  # extra weight of the remembered value's tokens in the loss
    contrast_weight: float = 0.0  # own-state vs other-state margin on the value tokens (see episode_loss)
    small_values: int = 0  # curriculum: the first `small_fraction` of the steps use this many values per kind
    small_fraction: float = 0.0
    addressing_weight: float = 0.0  # write-gate BCE: open on told values, shut elsewhere (addressing.beta_loss)
    key_weight: float = 0.0  # answer queries meet the asked value's keys (addressing.key_loss)
    beta_lr_mult: float = 1.0  # learning-rate factor of the write-gate weights
    lm_weight: float = 0.0  # next-token loss on run 1 while it is written: the memory must not hurt ordinary text
    n_in_context_episodes: int = 0  # the question asked in the told run itself (data.in_context_examples)
    n_prose_read_episodes: int = 0  # prose read from a fact episode's state, next-token targets (weight lm_weight)
    checkpoint_every: int = 25
    bf16: bool | None = None  # backbone matmuls in bfloat16 (δ-mem weights and scan stay f32); None: native_bf16()

    def digest(self) -> str:
        return hashlib.sha256(json.dumps(asdict(self), sort_keys=True).encode()).hexdigest()[:16]


def native_bf16() -> bool:
    """Whether this CPU multiplies bfloat16 natively (AVX512-BF16 or AMX).

    Why it matters: with AMX a bf16 matmul is ~6x faster than f32, but on a CPU without
    bf16 instructions torch emulates it and the same matmul is ~50x *slower* (measured:
    a 960x576x1536 product takes 24 ms in f32 and 1.3 s in bf16 on a 2-core AVX2 EPYC).
    """
    return bool(torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported())


def resolved(cfg: TrainConfig) -> TrainConfig:
    """``cfg`` with ``bf16=None`` decided for this CPU (the digest then names the precision used)."""
    return cfg if cfg.bf16 is not None else replace(cfg, bf16=native_bf16())


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Linear warm-up then cosine decay to 0 (upstream's schedule)."""
    warm = max(1, int(cfg.warmup * cfg.steps))
    if step < warm:
        return cfg.lr * (step + 1) / warm
    t = (step - warm) / max(1, cfg.steps - warm)
    return cfg.lr * 0.5 * (1.0 + math.cos(math.pi * t))


def curriculum_steps(cfg: TrainConfig) -> int:
    """How many of the first steps train on the small value sets."""
    return int(round(cfg.small_fraction * cfg.steps)) if cfg.small_values > 0 else 0


def batch_order(n: int, cfg: TrainConfig, steps: int | None = None, tag: str = "") -> list[list[int]]:
    """Example indices of every step: seeded epochs of shuffled examples."""
    steps = cfg.steps if steps is None else steps
    rng = random.Random(f"deltamem-edge/order/{cfg.seed}{tag}")
    order: list[int] = []
    while len(order) < steps * cfg.batch:
        perm = list(range(n))
        rng.shuffle(perm)
        order += perm
    return [order[i * cfg.batch:(i + 1) * cfg.batch] for i in range(steps)]


def _answer_logp(model: DeltaMemModel, batch: Batch, state: torch.Tensor, trace: list | None = None,
                 past: list | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Run 2 from ``state``: (log-prob of each target, best log-prob at each target position).

    ``past``: run 1's keys and values (``DeltaMemModel.forward(kv_out=)``); the rows with
    ``batch.in_context`` then attend to their run 1 and continue its positions.
    """
    B, T = batch.read_ids.shape
    pos = torch.arange(T).expand(B, -1)
    valid = None
    if past is not None:
        valid = batch.write_mask & batch.in_context[:, None]
        pos = pos + valid.sum(1, keepdim=True)
    hidden, _ = model(batch.read_ids, pos, batch.read_writes, state, trace=trace, past=past, past_valid=valid)
    h = hidden[batch.target_rows, batch.target_pos]
    logp = F.log_softmax(model.logits(h).float(), dim=-1)
    return logp.gather(1, batch.targets[:, None])[:, 0], logp.max(-1).values


def written_text_nll(model: DeltaMemModel, hidden: torch.Tensor, batch: Batch) -> torch.Tensor:
    """Mean next-token NLL of run 1 from its own hidden states (each token read the state before it).

    Why: this is the setting of the perplexity check and of any long conversation, a text
    read while it is written.  The answer loss never sees it, and without it the read-out
    of the text's own writes raised perplexity by 64-164 % (docs/training.md).
    """
    nxt = batch.write_mask[:, 1:]
    h = hidden[:, :-1][nxt]
    return F.cross_entropy(model.logits(h).float(), batch.write_ids[:, 1:][nxt])


def episode_loss(model: DeltaMemModel, batch: Batch, value_weight: float = 1.0,
                 state: torch.Tensor | None = None, contrast_weight: float = 0.0,
                 contrast_margin: float = 1.0, addressing_weight: float = 0.0,
                 key_weight: float = 0.0, lm_weight: float = 0.0) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Cross-entropy of run 2's answers after run 1 wrote the state (or from ``state`` when given).

    With ``contrast_weight`` > 0, run 2 is also run from another row's state (the batch
    rolled by one: same kind of episode, other values), and the value's tokens are pushed
    to be at least ``contrast_margin`` nats likelier with their own state than with it:
    the loss then rewards exactly what a prior over values cannot give.

    ``addressing_weight`` and ``key_weight`` add the supervised-addressing terms of
    ``addressing.py``, and ``lm_weight`` the next-token loss of run 1 itself
    (``written_text_nll``); all three need run 1, so only when ``state`` is not given.
    ``lm_weight`` also weighs the run-2 targets that are plain text's next tokens
    (``batch.text_target``: prose read from a state another conversation wrote), which are
    kept out of the answer loss's mean.  Rows with ``batch.in_context`` ask their question
    in run 1's context (attending to it), as one conversation does.

    Returns (loss, per-target details: log-probs, best log-probs, value mask, the state,
    and the addressing statistics when those terms are on).
    """
    B = batch.write_ids.shape[0]
    addressing = state is None and (addressing_weight > 0 or key_weight > 0)
    trace1: list | None = [] if addressing else None
    trace2: list | None = [] if addressing else None
    stats: dict[str, torch.Tensor] = {}
    lm: torch.Tensor | None = None
    past: list | None = None
    if state is None:
        pos = torch.arange(batch.write_ids.shape[1]).expand(B, -1)
        past = [] if bool(batch.in_context.any()) else None
        hidden1, state = model(batch.write_ids, pos, batch.write_mask, trace=trace1, kv_out=past)
        if lm_weight > 0:
            lm = written_text_nll(model, hidden1, batch)
            stats["text_nll"] = lm.detach()
    tok_logp, top = _answer_logp(model, batch, state, trace2, past=past)
    answer = ~batch.text_target
    weights = (1.0 + (value_weight - 1.0) * batch.value_mask.float()) * answer.float()
    loss = -(tok_logp * weights).sum() / weights.sum().clamp(min=1.0)
    if lm is not None:
        loss = loss + lm_weight * lm
    if lm_weight > 0 and bool(batch.text_target.any()):
        read_text = -tok_logp[batch.text_target].mean()
        loss = loss + lm_weight * read_text
        stats["read_text_nll"] = read_text.detach()
    if addressing:
        lb, beta_on, beta_off = beta_loss(trace1, trace2, batch.value_of >= 0, batch.write_mask, batch.read_writes)
        lk, cos = key_loss(trace1, trace2, batch.value_of, batch.asked, batch.answer_positions())
        loss = loss + addressing_weight * lb + key_weight * lk
        stats |= {"beta_on": torch.tensor(beta_on), "beta_off": torch.tensor(beta_off), "key_cos": torch.tensor(cos)}
    if contrast_weight > 0 and B > 1 and batch.value_mask.any():
        other_logp, _ = _answer_logp(model, batch, state.roll(1, dims=0), past=past)
        gap = (tok_logp - other_logp)[batch.value_mask]
        loss = loss + contrast_weight * F.relu(contrast_margin - gap).mean()
    return loss, {"logp": tok_logp.detach(), "top": top.detach(), "value": batch.value_mask,
                  "state": None if state is None else state.detach(), **stats}


@dataclass
class Progress:
    step: int
    steps: int
    loss: float
    tokens_per_s: float
    eta_s: float


def _save_checkpoint(path: Path, mem: DeltaMem, opt: torch.optim.Optimizer, step: int, cfg: TrainConfig,
                     history: list[dict]) -> None:
    tmp = path.with_name(path.name + ".part")
    torch.save({"step": step, "config": cfg.digest(), "mem": mem.state_dict(), "opt": opt.state_dict(),
                "history": history}, tmp)
    os.replace(tmp, path)


def train(model: DeltaMemModel, examples: Sequence[Example], cfg: TrainConfig, out_dir: Path,
          on_step: Callable[[Progress], None] | None = None,
          evaluate: Callable[[int], dict] | None = None, eval_every: int = 0,
          small_examples: Sequence[Example] = ()) -> list[dict]:
    """Train ``model.mem`` in place; returns the per-step history (loss, lr, tokens/s, evals).

    The first ``curriculum_steps(cfg)`` steps draw from ``small_examples`` (episodes whose
    values come from a few per kind), the rest from ``examples``.  Resumes from
    ``out_dir/checkpoint.pt`` when it belongs to the same config.
    """
    cfg = resolved(cfg)
    mem = model.mem
    out_dir.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(cfg.seed)
    gate = [mem.beta_proj, mem.beta_bias]
    rest = [p for p in mem.parameters() if all(p is not g for g in gate)]
    opt = torch.optim.AdamW([{"params": rest, "lr_mult": 1.0}, {"params": gate, "lr_mult": cfg.beta_lr_mult}],
                            lr=cfg.lr, weight_decay=cfg.weight_decay, betas=(0.9, 0.999))
    ckpt = out_dir / CHECKPOINT
    history: list[dict] = []
    start = 0
    if ckpt.is_file():
        saved = torch.load(ckpt, map_location="cpu", weights_only=True)
        if saved.get("config") == cfg.digest():
            mem.load_state_dict(saved["mem"])
            opt.load_state_dict(saved["opt"])
            start, history = int(saved["step"]), list(saved["history"])
    n_small = curriculum_steps(cfg) if small_examples else 0
    order = [[("s", i) for i in b] for b in batch_order(len(small_examples), cfg, n_small, "/small")] if n_small else []
    order += [[("f", i) for i in b] for b in batch_order(len(examples), cfg, cfg.steps - n_small)]
    pools = {"s": small_examples, "f": examples}
    done = start
    t_run, tokens_run = time.perf_counter(), 0
    try:
        for step in range(start, cfg.steps):
            for g in opt.param_groups:
                g["lr"] = lr_at(step, cfg) * g["lr_mult"]
            batch = collate([pools[pool][i] for pool, i in order[step]])
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=cfg.bf16):
                loss, info = episode_loss(model, batch, cfg.value_weight, contrast_weight=cfg.contrast_weight,
                                          addressing_weight=cfg.addressing_weight, key_weight=cfg.key_weight,
                                          lm_weight=cfg.lm_weight)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            with deferred_interrupts():  # the weights and the step count move together
                grad_norm = float(torch.nn.utils.clip_grad_norm_(mem.parameters(), cfg.grad_clip))
                opt.step()
                done = step + 1
            tokens_run += batch.n_tokens
            elapsed = time.perf_counter() - t_run
            rec = {"step": step + 1, "loss": float(loss.detach()), "lr": lr_at(step, cfg), "grad_norm": grad_norm,
                   "tokens_per_s": tokens_run / elapsed,
                   **{k: float(info[k]) for k in ("beta_on", "beta_off", "key_cos", "text_nll", "read_text_nll")
                      if k in info}}
            if evaluate is not None and eval_every and ((step + 1) % eval_every == 0 or step + 1 == cfg.steps):
                rec["eval"] = evaluate(step + 1)
            history.append(rec)
            if on_step:
                per_step = elapsed / (done - start)
                on_step(Progress(step + 1, cfg.steps, rec["loss"], rec["tokens_per_s"],
                                 per_step * (cfg.steps - step - 1)))
            if (step + 1) % cfg.checkpoint_every == 0:
                _save_checkpoint(ckpt, mem, opt, step + 1, cfg, history)
    except KeyboardInterrupt:
        with contextlib.suppress(Exception):
            _save_checkpoint(ckpt, mem, opt, done, cfg, history[:done])
        raise
    _save_checkpoint(ckpt, mem, opt, cfg.steps, cfg, history)
    return history
