"""A quick recall check during training, on the ``dev`` split (never the evaluation set).

Why: comparing training variants needs a number that moves before greedy recall
through the runtime does, and it must not come from the held-out evaluation facts
(that would tune on them).  For each dev episode we teacher-force the answer in
run 2 and look at the value's tokens: their mean log-probability with the
episode's *own* state, with *another* episode's state (same kind of question, other
value: what a prior over values alone would score), and how often the value's
tokens are all the model's top-1 choice with its own state, and in how many
episodes the value is likelier with the own state than with an empty one (what a
restart from the memory file gives over a fresh memory).

``text_probe`` is the other half: what the memory costs on ordinary text.  It
compares run 1's next-token loss with the memory on and off, the setting of the
perplexity check, on ``facts.dev_text`` prose: text neither the training nor the
check reads (the training prose misled: see docs/training.md, v3).  ``read_text_nll``
measures the same from a state another conversation wrote (dev facts told first),
and ``in_context_probe`` the question asked in the told run itself, where the model
can copy the value from its context: the two settings v3 lost (docs/training.md).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from .data import Batch, Example, collate
from .loop import episode_loss, written_text_nll
from .model import DeltaMemModel


def _value_rows(b: Batch) -> list[torch.Tensor]:
    """Per batch row with a remembered value: the mask of that row's value targets."""
    rows = (b.value_mask & (b.target_rows == row) for row in range(b.read_ids.shape[0]))
    return [sel for sel in rows if sel.any()]


def _all_top1(info: dict, sel: torch.Tensor) -> int:
    """1 when every selected value token is the model's top-1 choice: a greedy answer would contain it."""
    return int((info["logp"][sel] >= info["top"][sel] - 1e-6).all())


@torch.no_grad()
def recall_probe(model: DeltaMemModel, examples: Sequence[Example], batch: int = 32,
                 bf16: bool = False) -> dict[str, float]:
    own_lp, other_lp, hits, n, better, facts = 0.0, 0.0, 0, 0, 0, 0
    for start in range(0, len(examples), batch):
        chunk = list(examples[start:start + batch])
        if len(chunk) < 2:
            break
        b = collate(chunk)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            _, own = episode_loss(model, b)
            swapped = own["state"].roll(1, dims=0)  # every row reads its neighbour's memory
            _, other = episode_loss(model, b, state=swapped)
            _, empty = episode_loss(model, b, state=torch.zeros_like(own["state"]))
        value = b.value_mask
        if not value.any():
            continue
        own_lp += float(own["logp"][value].sum())
        other_lp += float(other["logp"][value].sum())
        n += int(value.sum())
        for sel in _value_rows(b):
            hits += _all_top1(own, sel)
            better += int(own["logp"][sel].sum() > empty["logp"][sel].sum())
            facts += 1
    rows = len(examples)
    return {"value_logp_own": own_lp / max(n, 1), "value_logp_other": other_lp / max(n, 1),
            "value_top1": hits / max(rows, 1), "better_than_empty": better / max(facts, 1)}


@torch.no_grad()
def text_nll(model: DeltaMemModel, examples: Sequence[Example], batch: int = 16, bf16: bool = False) -> float:
    """Run 1's next-token loss over ``examples`` (nats per predicted token, pooled over every window)."""
    total, tokens = 0.0, 0
    for start in range(0, len(examples), batch):
        b = collate(list(examples[start:start + batch]))
        pos = torch.arange(b.write_ids.shape[1]).expand(b.write_ids.shape[0], -1)
        n = int(b.write_mask[:, 1:].sum())
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            total += float(written_text_nll(model, model(b.write_ids, pos, b.write_mask)[0], b)) * n
        tokens += n
    return total / max(tokens, 1)


def text_probe(model: DeltaMemModel, examples: Sequence[Example], batch: int = 16, bf16: bool = False,
               base_nll: float | None = None) -> dict[str, float]:
    """Run 1's loss with the memory and without it (nats per token), and the ratio of their perplexities.

    ``base_nll``: ``text_nll`` of the bare base on the same examples, when the caller has it
    (the base is frozen, so a training run computes it once, not at every probe).
    """
    if base_nll is None:
        base_nll = text_nll(DeltaMemModel(model.base, None), examples, batch, bf16)
    with_mem = text_nll(model, examples, batch, bf16)
    return {"text_nll": with_mem, "text_nll_base": base_nll, "text_ppl_ratio": math.exp(with_mem - base_nll)}


@torch.no_grad()
def read_text_nll(model: DeltaMemModel, examples: Sequence[Example], batch: int = 16, bf16: bool = False) -> float:
    """Run 2's next-token loss on plain-text targets (``Example.text``), pooled; for the bare base too."""
    total, tokens = 0.0, 0
    for start in range(0, len(examples), batch):
        b = collate(list(examples[start:start + batch]))
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            _, info = episode_loss(model, b)
        sel = b.text_target
        total -= float(info["logp"][sel].sum())
        tokens += int(sel.sum())
    return total / max(tokens, 1)


@torch.no_grad()
def in_context_probe(model: DeltaMemModel, examples: Sequence[Example], batch: int = 32,
                     bf16: bool = False) -> dict[str, float]:
    """The value asked in the told run itself: mean log-prob of its tokens, and the share all top-1."""
    lp, n, hits, rows = 0.0, 0, 0, 0
    for start in range(0, len(examples), batch):
        b = collate(list(examples[start:start + batch]))
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            _, info = episode_loss(model, b)
        value = b.value_mask
        lp += float(info["logp"][value].sum())
        n += int(value.sum())
        for sel in _value_rows(b):
            hits += _all_top1(info, sel)
            rows += 1
    return {"in_context_logp": lp / max(n, 1), "in_context_top1": hits / max(rows, 1)}
