"""Perplexity of held-out prose through the runtime, with and without a δ-state.

Why: a memory that answers questions but makes the model worse at ordinary text is
not free.  Every document is fed through ``Session.feed`` exactly like a prompt (the
engine's own forward pass, never torch), optionally on top of a δ-state written by
some other conversation, and the next-token log-likelihood is pooled over all tokens.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from ..conversation import token_logprobs
from ..engine import Engine

MAX_DOC_TOKENS = 512


@dataclass(frozen=True)
class Perplexity:
    """Pooled next-token NLL of a set of documents under one model setting."""

    label: str
    nll: float  # summed over every predicted token (natural log)
    tokens: int  # predicted tokens: each document's length minus one
    docs: int = 0

    @property
    def value(self) -> float:
        """exp(mean NLL per token)."""
        return math.exp(self.nll / self.tokens) if self.tokens else float("nan")

    def change_vs(self, base: Perplexity) -> float:
        """Relative change against ``base`` in percent (positive: worse than base)."""
        return 100.0 * (self.value / base.value - 1.0)


def document_ids(engine: Engine, docs: list[str], max_tokens: int = MAX_DOC_TOKENS) -> list[list[int]]:
    """Each document tokenized as plain text (BOS added when the model wants one), truncated."""
    out = [engine.tokenize(doc, add_special=True)[:max_tokens] for doc in docs]
    return [ids for ids in out if len(ids) >= 2]


def perplexity(engine: Engine, docs: list[list[int]], *, label: str, state: np.ndarray | None = None,
               on_doc: Callable[[], None] | None = None) -> Perplexity:
    """Feed every document in a fresh session (zero state, or ``state``) with writes on; pool the NLL.

    Writes are on because that is how a conversation reads text: the memory keeps
    updating while the document goes by.  ``state`` needs a δ-mem engine.
    """
    nll, count = 0.0, 0
    with engine.session() as session:
        for ids in docs:
            session.reset()
            if state is not None:
                session.set_state(state)
            logits = session.feed(ids, write=True, logits="all")
            nll -= float(token_logprobs(logits[:-1], ids[1:]).sum())
            count += len(ids) - 1
            if on_doc:
                on_doc()
    return Perplexity(label=label, nll=nll, tokens=count, docs=len(docs))
