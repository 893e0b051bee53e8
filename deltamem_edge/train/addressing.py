"""Supervised addressing: teach the write gate *where* a fact is, and the reads *which* key to meet.

Why this module exists: trained on the answer's cross-entropy alone, no variant of
docs/training.md read an episode-specific value back from the state.  A diagnostic
found why: with *perfect* addressing (the state holding only the value's tokens and
every read meeting them) the untrained copy path already makes the own value
likelier than another episode's, on values never seen in training.  What the answer
loss cannot find by itself is the addressing: a write gate β that opens on the
value's tokens and stays shut elsewhere (the system prompt, the chit-chat, the
template, the question of run 2 all write too), and queries at the answer that meet
the keys the value was written with.

Both are value-independent targets, so they can generalise to values never seen:
* **β** (binary cross-entropy, mean over layers and gate dimensions): 1 on every token
  of a told value in run 1, 0 on every other written token of both runs;
* **keys** (cosine): at every answer position of run 2, the memory query of each layer
  and head should point along the mean memory key of the asked value's tokens in
  run 1, and away from the keys of the other values told in the same episode.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

Trace = Sequence[tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]]  # per layer (q, k, v, β)


def beta_loss(trace1: Trace, trace2: Trace, written_value: torch.Tensor, write_mask: torch.Tensor,
              read_writes: torch.Tensor) -> tuple[torch.Tensor, float, float]:
    """BCE of the write gate; returns (loss, mean β on value tokens, mean β on the other written tokens)."""
    pos = written_value & write_mask
    neg = ~written_value & write_mask
    loss = torch.zeros((), dtype=torch.float32)
    on, off = 0.0, 0.0
    for (_, _, _, b1), (_, _, _, b2) in zip(trace1, trace2, strict=True):
        g1 = b1.float().mean((-1, -2)).clamp(1e-5, 1 - 1e-5)  # [B, Tw]
        g2 = b2.float().mean((-1, -2)).clamp(1e-5, 1 - 1e-5)  # [B, Tr]
        parts = [-torch.log(1 - g1[neg]).mean()]
        if pos.any():
            parts.append(-torch.log(g1[pos]).mean())
            on += float(g1[pos].detach().mean())
        if read_writes.any():
            parts.append(-torch.log(1 - g2[read_writes]).mean())
        loss = loss + sum(parts)
        off += float(g1[neg].detach().mean())
    n = max(len(trace1), 1)
    return loss / n, on / n, off / n


def key_loss(trace1: Trace, trace2: Trace, value_of: torch.Tensor, asked: torch.Tensor,
             answer_pos: torch.Tensor) -> tuple[torch.Tensor, float]:
    """Queries at the answer meet the asked value's key, not the other told values' keys.

    ``value_of`` [B, Tw] long: which told fact a run-1 token belongs to (-1: none);
    ``asked`` [B] long: the fact asked about (-1: no fact, e.g. a general-behaviour
    example); ``answer_pos`` [B, Tr] bool.  Returns (loss, mean cosine with the asked key).
    """
    rows = asked >= 0
    if not rows.any():
        return torch.zeros((), dtype=torch.float32), 0.0
    n_facts = max(int(value_of.max()), int(asked.max())) + 1
    onehot = F.one_hot((value_of + 1).clamp(min=0), n_facts + 1)[..., 1:].float()  # [B, Tw, F]
    counts = onehot.sum(1)  # [B, F]
    sel = (answer_pos & rows[:, None])[..., None]  # [B, Tr, 1]
    is_asked = F.one_hot(asked.clamp(min=0), n_facts).bool()[:, None, :]  # [B, 1, F]
    told = (counts > 0)[:, None, :]  # [B, 1, F]
    asked_mask = is_asked & told & sel  # an asked value run 1 never spelled has no key
    other_mask = ~is_asked & told & sel
    loss = torch.zeros((), dtype=torch.float32)
    cos_asked = 0.0
    for (_, k1, _, _), (q2, _, _, _) in zip(trace1, trace2, strict=True):
        keys = torch.einsum("btf,bthr->bfhr", onehot, k1.float()) / counts.clamp(min=1)[..., None, None]
        keys = F.normalize(keys, dim=-1)
        cos = torch.einsum("bthr,bfhr->btfh", q2.float(), keys).mean(-1)  # [B, Tr, F]
        c_asked = cos[asked_mask.expand_as(cos)]
        c_other = cos[other_mask.expand_as(cos)]
        if c_asked.numel():
            loss = loss + (1 - c_asked).mean()
            cos_asked += float(c_asked.detach().mean())
        if c_other.numel():
            loss = loss + F.relu(c_other).mean()
    n = max(len(trace1), 1)
    return loss / n, cos_asked / n
