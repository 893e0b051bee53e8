"""The context window of a conversation: which tokens are in the KV cache, and why.

Why a module of its own: keeping the KV cache, the token ids mirrored in Python, the
evictable message blocks and the template text equal to the cache in step is one job,
apart from the turn loop that decides what to say (``conversation.py``) and from the
template that renders messages (``chat_template.py``).  ``Conversation`` inherits these
methods, so their names and behaviour are the conversation's own (the protocol is in
``conversation.py``'s docstring: prefix-stable prompts, read-only re-feeds, eviction).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from . import statefile
from .args import check_int
from .chat_template import ChatTemplate, Message
from .errors import EngineError
from .interrupts import deferred_interrupts

if TYPE_CHECKING:  # pragma: no cover
    from .engine import Engine, Session

Progress = Callable[[int, int], None]


def _common_prefix(a: list[int], b: list[int]) -> int:
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i


@dataclass(frozen=True)
class _Checkpoint:
    """A conversation's cache and memory at one moment (see ``ContextWindow._rollback``)."""

    kv: list[int]
    written: int
    state: np.ndarray | None
    spans: list[tuple[int, int]]
    rendered: str | None


class ContextWindow:
    """The KV-cache bookkeeping of a ``Conversation`` (its base class; not used on its own).

    The conversation sets these attributes in its constructor; the methods here keep them
    in step with the session's cache.
    """

    engine: Engine
    session: Session
    n_ctx: int  # positions this conversation may use
    readonly: bool
    history: list[Message]  # the whole transcript known to the conversation
    tokens_written: int  # a property of the conversation: this run's writes plus earlier runs'
    _template: ChatTemplate
    _segments: bool  # an SSW adapter: one write per message per call
    messages: list[Message]  # messages whose tokens are in the cache
    _spans: list[tuple[int, int]]  # (tokens, messages) per evictable block after the preamble
    _preamble: int  # tokens before the first message span (never evicted)
    _kv: list[int]  # the token ids in the cache, in position order
    _rendered: str | None  # template text equal to the cache, or None if unknown

    # -- what the cache holds --------------------------------------------------------------

    def recall(self, n_turns: int, progress: Progress | None = None) -> int:
        """Replay the last `n_turns` user turns of the transcript into the context, writes off."""
        n_turns = check_int("n_turns", n_turns, low=0)
        recalled = statefile.trim_transcript(self.history, n_turns) if n_turns > 0 else []
        if not recalled:
            return 0
        messages = self.messages + recalled
        text = self._template.render(messages, generation_prompt=False)
        ids = self._tokenize(text)
        self._make_room(max(0, len(ids) - len(self._kv)) + 8)
        keep = _common_prefix(self._kv, ids)
        self.session.truncate(keep)
        del self._kv[keep:]
        self._feed(ids[keep:], write=False, progress=progress)
        self._spans.append((self._unspanned(), len(recalled)))
        self.messages = messages
        self._rendered = text
        return len(recalled)

    def set_context(self, messages: list[Message], *, write: bool = False, room: int = 0) -> int:
        """Make the KV cache hold exactly ``messages``: an app's view of the conversation so far.

        Why: an HTTP client resends the whole history with every request.  The server shows it to
        the model without writing it again (``write=False``: it is in the memory already, or it was
        never ours); a stateless request passes ``write=True``.  Nothing is fed when the cache
        already holds these messages (the sampled ids of earlier replies stay as they are);
        otherwise the longest token prefix in the cache is kept and the rest is fed.  A default
        system prompt the template would insert by itself becomes an explicit first message (as in
        the constructor).  The oldest non-system messages are left out until the rendering plus
        ``room`` tokens fit.  Returns how many messages were left out.
        """
        msgs = [{"role": m["role"], "content": m["content"]} for m in messages]
        default = self._template.default_system()
        if default and (not msgs or msgs[0]["role"] != "system"):
            msgs.insert(0, {"role": "system", "content": default})
        if msgs == self.messages and self._rendered is not None:
            return 0
        first = 1 if msgs and msgs[0]["role"] == "system" else 0
        dropped = 0
        while True:
            text = self._template.render(msgs, generation_prompt=False)
            ids = self._tokenize(text)
            if len(ids) + room <= self.n_ctx:
                break
            if len(msgs) <= first:
                raise EngineError(f"the system prompt ({len(ids)} tokens) does not fit the context of {self.n_ctx}",
                                  hint="use a larger --ctx-size or a shorter system prompt")
            del msgs[first]
            dropped += 1
        keep = _common_prefix(self._kv, ids)
        with deferred_interrupts():
            self.session.truncate(keep)
            del self._kv[keep:]
        self._feed(ids[keep:], write=write and not self.readonly)
        preamble = 0
        if first:
            pre = self._tokenize(self._template.render(msgs[:1], generation_prompt=False))
            preamble = len(pre) if ids[:len(pre)] == pre else 0
        self.messages = msgs
        self._preamble = preamble
        rest = len(msgs) - (1 if preamble else 0)
        self._spans = [(len(ids) - preamble, rest)] if rest > 0 else []
        self._rendered = text
        return dropped

    # -- feeding ---------------------------------------------------------------------------

    def _feed(self, ids: list[int], write: bool, progress: Progress | None = None,
              message_ids: list[int] | None = None) -> np.ndarray | None:
        """Feed ids in chunks (for progress), keeping the cache bookkeeping in step.

        With message ids (SSW adapters) the ids are one upstream call: fed in one piece.
        """
        if message_ids is not None:
            with deferred_interrupts():
                logits = self.session.feed(ids, write=write, logits="last", message_ids=message_ids)
                self._kv.extend(ids)
            return logits
        logits = None
        step = self.engine.n_batch * 4 if progress else len(ids)
        for start in range(0, len(ids), max(step, 1)):
            chunk = ids[start:start + step]
            with deferred_interrupts():
                logits = self.session.feed(chunk, write=write, logits="last")
                self._kv.extend(chunk)
            if progress:
                progress(start + len(chunk), len(ids))
        return logits

    def _tokenize(self, text: str) -> list[int]:
        # template output already carries its special tokens (BOS included when the template wants it)
        return self.engine.tokenize(text, add_special=False, parse_special=True)

    def _start_with_system(self, message: Message) -> None:
        text = self._template.render([message], generation_prompt=False)
        ids = self._tokenize(text)
        # written into a fresh memory once (an SSW adapter never writes it: upstream gives it id -1)
        write = self.tokens_written == 0 and not self.readonly and not self._segments
        self._feed(ids, write=write)
        self.messages.append(message)
        self._preamble = len(self._kv)
        self._rendered = text

    # -- eviction --------------------------------------------------------------------------

    def _evict_oldest(self) -> bool:
        """Drop the oldest evictable block of messages from the cache (the state keeps them)."""
        if not self._spans:
            return False
        n, n_messages = self._spans.pop(0)
        first = 1 if self._preamble else 0  # the system message stays
        p0 = self._preamble
        with deferred_interrupts():
            if n:
                self.session.drop_positions(p0, p0 + n)
            del self._kv[p0:p0 + n]
            del self.messages[first:first + n_messages]
        self._rendered = None  # the template may render the shortened history differently
        return True

    def _unspanned(self) -> int:
        """Cache tokens after the preamble that belong to no evictable block yet."""
        return len(self._kv) - self._preamble - sum(n for n, _ in self._spans)

    def _make_room(self, needed: int) -> None:
        """Evict old messages until `needed` more tokens fit."""
        while self.session.n_past + needed > self.n_ctx:
            if not self._evict_oldest():
                raise EngineError(f"{needed} tokens do not fit the context of {self.n_ctx}",
                                  hint="use a larger --ctx-size")

    def _prompt_ids(self, messages: list[Message], progress: Progress | None = None) -> tuple[list[int], str]:
        """The ids to write so that the cache holds `messages` + the generation prompt, and that text.

        Fast path: the template text already in the cache is a prefix of the new rendering,
        so only the added text is tokenized (the sampled ids in the cache stay as they are).
        Otherwise the history is re-rendered, the cache is cut where its tokens stop matching,
        and the re-rendered old messages are fed back READ-ONLY here (they are in memory
        already); only the new message is returned for writing.

        The rendering of `messages` with the generation prompt is returned with the ids: once
        the ids are fed it is the template text equal to the cache (the caller's next
        ``_rendered``), and rendering the whole history again for it would make every turn
        cost more the longer the conversation gets.
        """
        text = self._template.render(messages, generation_prompt=True)
        if self._rendered is not None and text.startswith(self._rendered):
            return self._tokenize(text[len(self._rendered):]), text
        old_text = self._template.render(messages[:-1], generation_prompt=False)
        old_ids = self._tokenize(old_text)
        new_ids = self._tokenize(text)
        boundary = _common_prefix(old_ids, new_ids)
        keep = min(_common_prefix(self._kv, new_ids), boundary)
        with deferred_interrupts():
            self.session.truncate(keep)
            del self._kv[keep:]
        self._feed(new_ids[keep:boundary], write=False, progress=progress)
        first = 1 if self._preamble else 0
        n_old = len(messages) - 1 - first
        self._spans = [(boundary - self._preamble, n_old)] if n_old > 0 else []
        self._rendered = old_text
        return new_ids[boundary:], text

    # -- undo ------------------------------------------------------------------------------

    def _checkpoint(self) -> _Checkpoint:
        """What a probe or an interrupted prompt must put back: cache tokens, counters, state."""
        state = self.session.state() if self.engine.adapter is not None else None
        return _Checkpoint(kv=list(self._kv), written=self.session.tokens_written, state=state,
                           spans=list(self._spans), rendered=self._rendered)

    def _rollback(self, cp: _Checkpoint) -> None:
        """Undo everything fed since ``cp``: KV cache, δ-state, tokens-written counter, bookkeeping.

        Why one routine: Ctrl-C during a prompt and ``score_reply`` both need "as if it never
        happened".  Tokens after ``cp`` are truncated away.  When the slow path of
        ``_prompt_ids`` replaced older cache tokens by a re-rendering (read-only), the old
        tokens are fed back read-only, so the cache holds the same ids again (their K/V are
        recomputed with the current state; the next turn, which takes the same re-rendering
        path, recomputes them anyway).  Never writes into the δ-state.
        """
        with deferred_interrupts():
            cut = _common_prefix(self._kv, cp.kv)
            self.session.truncate(cut)
            del self._kv[cut:]
            if cp.state is not None:
                self.session.set_state(cp.state)
            self.session.tokens_written = cp.written
            if cut < len(cp.kv):
                self.session.feed(cp.kv[cut:], write=False, logits="none")
                self._kv.extend(cp.kv[cut:])
            self._spans = list(cp.spans)
            self._rendered = cp.rendered
