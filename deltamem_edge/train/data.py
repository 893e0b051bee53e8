"""The training mix: seeded fact episodes, the base model's own answers, batches of tensors.

Why the base model's own answers: the adapter must leave general behaviour alone
when nothing in memory matters.  A share of episodes therefore writes an unrelated
conversation into the state and then trains the reply to an everyday prompt
towards what the frozen base itself answers (greedy, through the runtime), so the
memory learns to stay quiet there instead of pushing remembered values into it.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from ..conversation import Conversation
from ..engine import Engine
from ..recall.facts import Episode, generic_prompts, make_episodes, training_text
from ..sampling import SamplingParams
from .episodes import EpisodeTokenizer, TokenEpisode, token_span


def base_answers(engine: Engine, prompts: Sequence[str], max_tokens: int = 64) -> dict[str, str]:
    """The frozen base's greedy reply to each prompt (replies that hit the cap are dropped)."""
    out: dict[str, str] = {}
    for prompt in prompts:
        with Conversation(engine, sampling=SamplingParams(temp=0.0), max_new_tokens=max_tokens) as conv:
            reply = conv.say(prompt)
            if conv.stats.generated_tokens < max_tokens and reply.strip():
                out[prompt] = reply
    return out


def value_span(tok: EpisodeTokenizer, answer: str, value: str) -> tuple[int, int]:
    """Token range of ``value`` inside the answer's tokens (for the value-token metrics)."""
    i = answer.find(value)
    if i < 0:
        return 0, 0
    return token_span(lambda s: tok.engine.tokenize(s, add_special=False, parse_special=False), answer, i, i + len(value))


@dataclass
class Example:
    ep: TokenEpisode
    value: tuple[int, int]  # value token span within targets ((0, 0) = none: a generic example)
    text: bool = False  # the targets are plain text's next tokens (a next-token loss), not an answer


def fact_examples(tok: EpisodeTokenizer, episodes: Sequence[Episode]) -> list[Example]:
    return [Example(tok.episode(e), value_span(tok, e.probe.answer, e.probe.value)) for e in episodes]


def in_context_examples(tok: EpisodeTokenizer, episodes: Sequence[Episode]) -> list[Example]:
    """The question asked in the told run itself: the answer can be copied from the context."""
    return [Example(tok.episode(e, in_context=True), value_span(tok, e.probe.answer, e.probe.value)) for e in episodes]


def generic_examples(tok: EpisodeTokenizer, n: int, seed: int, answers: dict[str, str]) -> list[Example]:
    """Unrelated facts in the state, an everyday prompt in run 2, the base's own reply as target."""
    rng = random.Random(f"deltamem-edge/generic/{seed}")
    prompts = sorted(answers)
    if not prompts:
        return []
    eps = make_episodes("train", n, seed + 7919, n_facts=(1, 2, 3))
    out = []
    for e in eps:
        prompt = rng.choice(prompts)
        out.append(Example(tok.episode(e, answer=answers[prompt], question=prompt), (0, 0)))
    return out


PROSE_MAX_TOKENS = 96  # about the longest fact episode: a longer window would pad every batch


def prose_examples(tok: EpisodeTokenizer, n: int, seed: int, answers: dict[str, str]) -> list[Example]:
    """Ordinary prose written into the state, then an everyday prompt answered as the base answers it.

    Why: written prose must not open the write gate (``addressing.beta_loss`` has no told value
    there, so every token's target is "shut"), and what it leaves in the state must not change
    a later reply.  Run 1 is the text as a plain document (BOS, no chat template), as the
    perplexity check feeds it; run 2 is a new run on that state.
    """
    rng = random.Random(f"deltamem-edge/prose/{seed}")
    docs, prompts = training_text(), sorted(answers)
    if not docs or not prompts:
        return []
    out = []
    for _ in range(n):
        window = _prose_window(tok, docs, rng)
        prompt = rng.choice(prompts)
        read, writes, targets = tok.run2(prompt, answers[prompt])
        out.append(Example(TokenEpisode(window, tuple(read), tuple(writes), tuple(targets), "prose"), (0, 0)))
    return out


PROSE_READ_MAX_TOKENS = 48  # about run 2 of a fact episode: a longer window would pad every batch's run 2


def prose_read_examples(tok: EpisodeTokenizer, episodes: Sequence[Episode], seed: int,
                        docs: Sequence[str] | None = None, max_tokens: int = PROSE_READ_MAX_TOKENS) -> list[Example]:
    """Facts told in run 1, then a new run that reads plain prose on that state: next-token targets.

    Why: the perplexity check also reads text from a state that *another* conversation
    wrote, and v3 (trained only on text read from an empty state) lost +120 % there
    (docs/training.md).  Run 2 is a plain document window (BOS, no template), every token
    written as the check feeds it, and each token's target is the next one.
    """
    rng = random.Random(f"deltamem-edge/prose-read/{seed}")
    docs = training_text() if docs is None else docs
    out = []
    for e in episodes if docs else ():
        told = tok.episode(e)
        window = _prose_window(tok, docs, rng, max_tokens)
        ep = TokenEpisode(told.write_ids, window[:-1], (True,) * (len(window) - 1), window[1:], "prose-read",
                          told.value_positions, -1)
        out.append(Example(ep, (0, 0), text=True))
    return out


def _prose_window(tok: EpisodeTokenizer, docs: Sequence[str], rng: random.Random,
                  max_tokens: int = PROSE_MAX_TOKENS) -> tuple[int, ...]:
    """A plain-document window (BOS, no template) of at most ``max_tokens``: half from the start, half inside."""
    ids = tok.engine.tokenize(rng.choice(docs), add_special=True)
    start = rng.randrange(0, max(1, len(ids) - max_tokens // 2)) if rng.random() < 0.5 else 0
    return tuple(ids[start:start + max_tokens])


def text_examples(tok: EpisodeTokenizer, docs: Sequence[str], n: int, seed: int) -> list[Example]:
    """Prose windows as run 1 only (run 2 is one token), for ``dev.text_probe``, which reads run 1 alone."""
    rng = random.Random(f"deltamem-edge/text/{seed}")
    out = []
    for _ in range(n if docs else 0):
        window = _prose_window(tok, docs, rng)
        out.append(Example(TokenEpisode(window, window[:1], (False,), window[:1], "text"), (0, 0)))
    return out


def build_mix(engine: Engine, n_fact: int, n_generic: int, seed: int, n_facts: tuple[int, ...],
              split: str = "train", value_limit: int = 0, n_prose: int = 0, n_in_context: int = 0,
              n_prose_read: int = 0) -> tuple[list[Example], EpisodeTokenizer]:
    """Fact episodes (values from at most ``value_limit`` per kind when > 0) plus generic and prose ones.

    ``n_in_context`` and ``n_prose_read`` draw their own fact episodes (other seeds), so
    adding them leaves the other examples as they were.
    """
    tok = EpisodeTokenizer(engine)
    episodes = make_episodes(split, n_fact, seed + 104729 * value_limit, n_facts=n_facts, value_limit=value_limit)
    examples = fact_examples(tok, episodes)
    if n_in_context:
        examples += in_context_examples(tok, make_episodes(split, n_in_context, seed + 15485863, n_facts=n_facts))
    if n_prose_read:
        examples += prose_read_examples(tok, make_episodes(split, n_prose_read, seed + 32452843, n_facts=n_facts), seed)
    if n_generic or n_prose:
        answers = base_answers(engine, generic_prompts("train"))
        examples += generic_examples(tok, n_generic, seed, answers)
        examples += prose_examples(tok, n_prose, seed, answers)
    return examples, tok


@dataclass
class Batch:
    """Right-padded tensors of one batch."""

    write_ids: torch.Tensor  # [B, Tw]
    write_mask: torch.Tensor  # [B, Tw] bool: a real run-1 token (all of them are written)
    read_ids: torch.Tensor  # [B, Tr]
    read_writes: torch.Tensor  # [B, Tr] bool
    target_rows: torch.Tensor  # [N] batch row of each target
    target_pos: torch.Tensor  # [N] position in run 2 whose logits predict it
    targets: torch.Tensor  # [N]
    value_mask: torch.Tensor  # [N] bool: a token of the remembered value
    n_tokens: int  # real tokens fed (run 1 + run 2)
    value_of: torch.Tensor  # [B, Tw] long: which told fact's value a run-1 token spells (-1: none)
    asked: torch.Tensor  # [B] long: the told fact run 2 asks about (-1: none)
    in_context: torch.Tensor  # [B] bool: run 2 continues run 1's context (attends to it, positions go on)
    text_target: torch.Tensor  # [N] bool: a plain-text next-token target (Example.text), not an answer

    def answer_positions(self) -> torch.Tensor:
        """[B, Tr] bool: the run-2 positions whose logits predict a target."""
        mask = torch.zeros_like(self.read_writes)
        mask[self.target_rows, self.target_pos] = True
        return mask


def collate(examples: Sequence[Example]) -> Batch:
    B = len(examples)
    tw = max(len(e.ep.write_ids) for e in examples)
    tr = max(len(e.ep.read_ids) for e in examples)
    write_ids = torch.zeros(B, tw, dtype=torch.long)
    write_mask = torch.zeros(B, tw, dtype=torch.bool)
    read_ids = torch.zeros(B, tr, dtype=torch.long)
    read_writes = torch.zeros(B, tr, dtype=torch.bool)
    value_of = torch.full((B, tw), -1, dtype=torch.long)
    asked = torch.tensor([e.ep.asked for e in examples], dtype=torch.long)
    in_context = torch.tensor([e.ep.in_context for e in examples], dtype=torch.bool)
    rows, pos, tgt, val, text = [], [], [], [], []
    for b, e in enumerate(examples):
        for j, where in enumerate(e.ep.value_positions):
            value_of[b, list(where)] = j
        w, r = e.ep.write_ids, e.ep.read_ids
        write_ids[b, :len(w)] = torch.tensor(w)
        write_mask[b, :len(w)] = True
        read_ids[b, :len(r)] = torch.tensor(r)
        read_writes[b, :len(r)] = torch.tensor(e.ep.read_writes)
        first = len(r) - len(e.ep.targets)
        for j, t in enumerate(e.ep.targets):
            rows.append(b)
            pos.append(first + j)
            tgt.append(t)
            val.append(e.value[0] <= j < e.value[1])
            text.append(e.text)
    n = sum(len(e.ep.write_ids) + len(e.ep.read_ids) for e in examples)
    return Batch(write_ids, write_mask, read_ids, read_writes, torch.tensor(rows), torch.tensor(pos),
                 torch.tensor(tgt), torch.tensor(val), n, value_of, asked, in_context,
                 torch.tensor(text, dtype=torch.bool))
