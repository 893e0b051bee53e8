"""Training episodes in exactly the token layout ``Conversation`` produces across two runs.

Why this module exists: what is measured through the runtime is only what was
trained if the tokens, and what is written and what is read, are the same.  The
layout is taken from the runtime itself (the model's own chat template through
``chat_template.ChatTemplate``, the engine's tokenizer), not re-implemented:

* **run 1** (fresh memory): the system prompt, then each told message with its
  reply and the template's closing tail: every token written (writes on).
* **run 2** (a new run: empty context, the memory file only): the system prompt
  fed *read-only* (the memory is not empty), then the question with the
  generation prompt and the answer, written as the runtime writes them.  The
  loss is the cross-entropy of the answer tokens and of the end-of-turn token
  that stops the reply (the runtime never feeds that one).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from ..chat_template import ChatTemplate
from ..engine import Engine
from ..recall.facts import Episode


def token_span(encode: Callable[[str], list[int]], text: str, start: int, end: int,
               within: list[int] | None = None) -> tuple[int, int] | None:
    """Token range of ``text[start:end]`` inside ``encode(text)``.

    A span starts at the token after the text before it, with trailing spaces dropped:
    BPE tokenizers merge a leading space into the span's first token.  It covers at
    least one token.  With ``within`` (the ids of the whole text), None when the text up
    to either end does not tokenize to a prefix of it (a merge across the boundary).
    """
    head, upto = encode(text[:start].rstrip(" ")), encode(text[:end])
    first = len(head)
    last = max(first + 1, len(upto))
    if within is not None and (within[:first] != head or within[:last] != upto):
        return None
    return first, last


@dataclass(frozen=True)
class TokenEpisode:
    """One training example: run-1 ids (all written), run-2 ids with write flags and targets."""

    write_ids: tuple[int, ...]
    read_ids: tuple[int, ...]
    read_writes: tuple[bool, ...]  # per run-2 token: written into the state?
    targets: tuple[int, ...]  # the answer tokens + end of turn, predicted at the last len(targets) positions
    kind: str = ""
    value_positions: tuple[tuple[int, ...], ...] = ()  # per told fact: its value's run-1 token indices
    asked: int = -1  # which told fact run 2 asks about (-1: none, e.g. a general-behaviour example)
    in_context: bool = False  # run 2 continues run 1's context (its KV cache and positions), not a new run


class EpisodeTokenizer:
    """Turns text episodes into token episodes with the model's template and tokenizer."""

    def __init__(self, engine: Engine, system: str | None = None) -> None:
        self.engine = engine
        self.template = ChatTemplate(engine)
        default = self.template.default_system()
        self.system = system if system is not None else default
        self._system_msgs = [{"role": "system", "content": self.system}] if self.system else []
        self._system_ids = self._ids(self.template.render(self._system_msgs, generation_prompt=False))
        self.end_of_turn = self._end_of_turn_token()

    def _ids(self, text: str) -> list[int]:
        return self.engine.tokenize(text, add_special=False, parse_special=True) if text else []

    def _end_of_turn_token(self) -> int:
        """The token that closes an assistant message (what generation stops on)."""
        msgs = [*self._system_msgs, {"role": "user", "content": "a"}]
        prompt = self.template.render(msgs, generation_prompt=True)
        full = self.template.render([*msgs, {"role": "assistant", "content": "b"}], generation_prompt=False)
        if not full.startswith(prompt + "b"):
            raise ValueError("the chat template does not append the reply verbatim; cannot find its end token")
        tail = self._ids(full[len(prompt) + 1:])
        if not tail or not self.engine.is_eog(tail[0]):
            raise ValueError("the template's closing tail does not start with an end-of-generation token")
        return tail[0]

    def _told_msgs(self, tell: tuple[str, ...], replies: tuple[str, ...]) -> list[dict[str, str]]:
        msgs = list(self._system_msgs)
        for user, reply in zip(tell, replies, strict=True):
            msgs += [{"role": "user", "content": user}, {"role": "assistant", "content": reply}]
        return msgs

    def _run1_text(self, tell: tuple[str, ...], replies: tuple[str, ...]) -> str:
        return self.template.render(self._told_msgs(tell, replies), generation_prompt=False)

    def run1(self, tell: tuple[str, ...], replies: tuple[str, ...]) -> list[int]:
        """Every token run 1 writes: system prompt + each (message, reply, closing tail)."""
        return self._ids(self._run1_text(tell, replies))

    def _value_positions(self, text: str, full: list[int], values: tuple[str, ...]) -> tuple[tuple[int, ...], ...]:
        """Per value: the indices in ``full`` (run 1's ids of ``text``) that spell it, wherever run 1 says it.

        Why: the addressing losses supervise the write gate on exactly these tokens.  An
        occurrence whose surrounding text does not tokenize to a prefix of run 1 (a merge
        across the boundary) is left out rather than guessed.
        """
        out = []
        for value in values:
            found: set[int] = set()
            start = 0
            while value and (i := text.find(value, start)) >= 0:
                start = i + len(value)
                span = token_span(self._ids, text, i, start, within=full)
                if span is not None:
                    found.update(range(*span))
            out.append(tuple(sorted(found)))
        return tuple(out)

    def run2(self, question: str, answer: str) -> tuple[list[int], list[bool], list[int]]:
        """(ids fed, write flags, targets) of run 2: system read-only, question + answer written."""
        msgs = [*self._system_msgs, {"role": "user", "content": question}]
        text = self.template.render(msgs, generation_prompt=True)
        sys_text = self.template.render(self._system_msgs, generation_prompt=False)
        if not text.startswith(sys_text):
            raise ValueError("the chat template is not prefix-stable after the system prompt")
        question_ids = self._ids(text[len(sys_text):])
        answer_ids = self.engine.tokenize(answer, add_special=False, parse_special=False)
        ids = self._system_ids + question_ids + answer_ids
        writes = [False] * len(self._system_ids) + [True] * (len(question_ids) + len(answer_ids))
        return ids, writes, answer_ids + [self.end_of_turn]

    def continued(self, tell: tuple[str, ...], replies: tuple[str, ...], question: str,
                  answer: str) -> tuple[list[int], list[bool], list[int]]:
        """(ids fed, write flags, targets) of the question asked *in the told run*, after run 1's tokens.

        Why: this is the "history in context" case of one conversation, where the model
        can copy the value from its own KV cache; the memory's reads must not get in its
        way (v3 of docs/training.md fell from 27-32/60 to 7/60 there).  The ids are what
        the template adds after run 1's text, every one written, as ``Conversation`` feeds
        the next turn.
        """
        msgs = self._told_msgs(tell, replies)
        before = self.template.render(msgs, generation_prompt=False)
        text = self.template.render([*msgs, {"role": "user", "content": question}], generation_prompt=True)
        if not text.startswith(before):
            raise ValueError("the chat template is not prefix-stable across turns")
        question_ids = self._ids(text[len(before):])
        answer_ids = self.engine.tokenize(answer, add_special=False, parse_special=False)
        ids = question_ids + answer_ids
        return ids, [True] * len(ids), answer_ids + [self.end_of_turn]

    def episode(self, ep: Episode, answer: str | None = None, question: str | None = None,
                replies: tuple[str, ...] | None = None, in_context: bool = False) -> TokenEpisode:
        replies = replies if replies is not None else ep.acks
        text = self._run1_text(ep.tell, replies)
        write_ids = self._ids(text)
        own_probe = question is None and answer is None
        question, answer = question or ep.probe.question, answer or ep.probe.answer
        if in_context:
            ids, writes, targets = self.continued(ep.tell, replies, question, answer)
        else:
            ids, writes, targets = self.run2(question, answer)
        positions = self._value_positions(text, write_ids, tuple(f.value for f in ep.facts))
        asked = ep.facts.index(ep.probe) if own_probe else -1
        return TokenEpisode(tuple(write_ids), tuple(ids), tuple(writes), tuple(targets), ep.probe.kind,
                            positions, asked, in_context)
