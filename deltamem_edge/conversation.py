"""Conversations with memory: the turn loop on top of an Engine Session and a memory file.

The protocol follows upstream's chat session (deltamem-math.md §4.2) with these
deliberate differences (docs/embedding.md lists them):

* **Memory regime across runs.**  A new run starts with an empty KV cache and the
  saved δ-state: the history lives in the state.  Within a run, earlier turns stay
  in the KV cache as upstream keeps them.  ``recall_turns`` replays the last turns
  of the saved transcript into the context with writes OFF, so nothing is written
  twice.
* **Sampled ids are kept.**  The KV cache holds exactly the tokens that were fed.
  The next prompt is the *text* the chat template adds after what is already in
  the cache; only when a template is not prefix-stable do we fall back to a token
  prefix match, and then the re-rendered old part is fed read-only (upstream
  rebuilds the whole conversation with writes on, which would write it twice).
* **Every end-of-generation token stops** (upstream checks only ``eos``); like
  upstream, the stop token itself is not fed, the template's closing tail is.
* **Context overflow.**  When the context fills, the oldest messages leave the KV
  cache and the conversation goes on; they already live in the state.
* The system prompt is written into memory once: in a later run with a non-empty
  memory it is fed read-only.

Every token that enters the KV cache with writes on is written exactly once, in
order, at the moment it enters.  The state is saved atomically after every turn.

This module holds ``Conversation``: its memory file and the turn loop (``say``,
``score_reply``, the save after each turn).  The chat template is ``chat_template.py``'s;
what the KV cache holds (feeding, eviction, undo, ``recall``, ``set_context``) is
``context_window.py``'s, a base class of ``Conversation``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from . import statefile
from .args import check_bool, check_int
from .chat_template import CHATML, ChatTemplate, Message
from .context_window import ContextWindow, Progress
from .engine import Engine
from .errors import ArgumentError, EngineError
from .fingerprint import adapter_fingerprint
from .interrupts import deferred_interrupts
from .sampling import Sampler, SamplingParams
from .state_norms import layer_norms

# Kept importable from here: the server, the recall evaluation and the training code import
# these names from ``deltamem_edge.conversation``.
__all__ = ["CHATML", "Conversation", "Message", "Progress", "TurnStats", "deferred_interrupts", "token_logprobs"]


@dataclass
class TurnStats:
    prompt_tokens: int = 0
    generated_tokens: int = 0
    prefill_s: float = 0.0
    decode_s: float = 0.0
    interrupted: bool = False


def token_logprobs(logits: np.ndarray, ids: list[int]) -> np.ndarray:
    """log p(ids[i]) under logits row i, float64, by a max-shifted (stable) log-softmax."""
    x = np.asarray(logits, dtype=np.float64)
    x = x - x.max(axis=1, keepdims=True)
    log_z = np.log(np.exp(x).sum(axis=1))
    return x[np.arange(len(ids)), np.asarray(ids, dtype=np.int64)] - log_z


class Conversation(ContextWindow):
    """A chat whose memory is a δ-mem state file.

    ``say(text)`` returns the reply; ``say(text, stream=True)`` yields text pieces as
    they are generated.  One Conversation per thread; several Conversations can share
    one Engine (``n_seq_max`` sessions).  What the KV cache holds (``recall``,
    ``set_context``, eviction, undo) is kept by ``ContextWindow`` (context_window.py).
    """

    def __init__(
        self,
        engine: Engine,
        memory: str | Path | None = None,
        *,
        system: str | None = None,
        sampling: SamplingParams | None = None,
        max_new_tokens: int = 512,
        recall_turns: int = 0,
        readonly: bool = False,
        transcript_turns: int = 8,
        model_label: str = "",
        context_limit: int | None = None,
    ) -> None:
        # Checked before anything is opened: a float max_new_tokens or a "false" readonly string
        # would otherwise fail mid-turn or silently mean True.
        max_new_tokens = check_int("max_new_tokens", max_new_tokens, low=0, high=2**31 - 1)
        recall_turns = check_int("recall_turns", recall_turns, low=0, high=2**31 - 1)
        transcript_turns = check_int("transcript_turns", transcript_turns, low=0, high=2**31 - 1)
        readonly = check_bool("readonly", readonly)
        if context_limit is not None:
            context_limit = check_int("context_limit", context_limit, low=0, high=2**32 - 1)
        if memory is not None and not isinstance(memory, (str, Path)):
            raise ArgumentError(f"memory must be a path (str or Path) or None, got {type(memory).__name__}")
        if system is not None and not isinstance(system, str):
            raise ArgumentError(f"system must be a str or None, got {type(system).__name__}")
        if sampling is not None and not isinstance(sampling, SamplingParams):
            raise ArgumentError(f"sampling must be a SamplingParams or None, got {type(sampling).__name__}")
        if not isinstance(model_label, str):
            raise ArgumentError(f"model_label must be a str, got {type(model_label).__name__}")
        self.engine = engine
        # Positions this conversation may use.  Why below n_ctx: sessions of one Engine share the
        # KV cells (kv_unified), so a server with N users gives each a share (llama-server's n_ctx/np);
        # without a unified cache each session has its own stream of engine.n_ctx_seq cells.
        self.n_ctx = min(context_limit, engine.n_ctx_seq) if context_limit else engine.n_ctx_seq
        self.max_new_tokens = max_new_tokens
        self.transcript_turns = transcript_turns
        self.readonly = readonly
        self.stats = TurnStats()
        self.history: list[Message] = []  # the whole transcript known to this conversation
        self.turns = 0
        self._tokens_before = 0  # tokens written by earlier runs (from the memory file)
        self._created_us = statefile.now_us()
        self._template = ChatTemplate(engine)
        self._sampler = Sampler(sampling or SamplingParams(), engine.n_vocab)
        self._file: statefile.MemoryFile | None = None
        self._closed = False

        granularity = engine.adapter.write_granularity if engine.adapter else "token"
        if granularity == "sentence_mean":
            raise EngineError("sentence_mean adapters are not supported in conversations yet",
                              hint="drive them with Session.feed(..., message_ids=sentence ids)")
        self._segments = granularity == "message_mean"  # SSW: one write per message per call
        if memory is not None and engine.adapter is None:
            raise EngineError("a memory file needs a δ-mem adapter, and this model has none",
                              hint="pass --adapter, use a bundled model, or drop --memory")
        self.session = engine.session()
        # what is in the KV cache right now
        self.messages: list[Message] = []  # messages whose tokens are in the cache
        self._spans: list[tuple[int, int]] = []  # (tokens, messages) per evictable block after the preamble
        self._preamble = 0  # tokens before the first message span (never evicted)
        self._kv: list[int] = []  # the token ids in the cache, in position order
        self._rendered: str | None = ""  # template text equal to the cache, or None if unknown

        try:
            if engine.adapter is not None:
                self._adapter_fp = adapter_fingerprint(engine.adapter.path)
                self._model_fp = engine.model_fingerprint()
            self.model_label = model_label or (engine.meta("general.name") or engine.model_path.stem)
            self.adapter_label = engine.meta("general.name") if engine.adapter and engine.adapter.bundled else (
                engine.adapter.path.name if engine.adapter else "")
            if memory is not None:
                self._open_memory(Path(memory))
            system = system if system is not None else self._template.default_system()
            if system:
                self._start_with_system({"role": "system", "content": system})
            if recall_turns > 0:
                self.recall(recall_turns)
        except BaseException:
            self.session.close()
            if self._file:
                self._file.close()
            raise

    # -- memory file -----------------------------------------------------------------------

    @property
    def memory_path(self) -> Path | None:
        return self._file.path if self._file else None

    @property
    def tokens_written(self) -> int:
        return self._tokens_before + self.session.tokens_written

    def _open_memory(self, path: Path) -> None:
        self._file = statefile.MemoryFile(path, readonly=self.readonly)
        mem = self._file.load(adapter_fp=self._adapter_fp, model_fp=self._model_fp,
                              shape=self.engine.adapter.state_shape)
        if mem is None:
            return
        self.session.set_state(mem.state)
        self._tokens_before = mem.header.tokens_written
        self.turns = mem.header.turns
        self._created_us = mem.header.created_us
        self.history = [dict(m) for m in mem.transcript]

    def _memory_state(self) -> statefile.MemoryState:
        state = self.session.state()
        if not np.isfinite(state).all():
            raise EngineError("the δ-state holds NaN or Inf values; the memory file was not overwritten",
                              hint="this adapter diverged on this input; the last saved memory is intact")
        mem = statefile.MemoryState.new(adapter_fp=self._adapter_fp, model_fp=self._model_fp, state=state,
                                        state_heads=self.engine.adapter.state_heads,
                                        adapter_label=statefile.clip_label(self.adapter_label),
                                        model_label=statefile.clip_label(self.model_label))
        header = dataclasses.replace(mem.header, tokens_written=self.tokens_written, turns=self.turns,
                                     created_us=self._created_us, updated_us=statefile.now_us())
        transcript = statefile.trim_transcript(self.history, self.transcript_turns) if self.transcript_turns else []
        return statefile.MemoryState(header=header, state=state, transcript=transcript)

    def save(self) -> Path | None:
        """Write the memory file now (it is also written after every turn)."""
        if self._file is None or self.readonly:
            return None
        self._file.save(self._memory_state())
        return self._file.path

    # -- a turn ----------------------------------------------------------------------------

    def say(self, text: str, *, stream: bool = False, progress: Progress | None = None) -> str | Iterator[str]:
        """Answer `text`.  With stream=True, an iterator of text pieces (closing it stops the reply)."""
        if self._closed:
            raise EngineError("this conversation is closed")
        if not isinstance(text, str):
            raise ArgumentError(f"text must be a str, got {type(text).__name__}")
        gen = self._turn(text, progress)
        return gen if stream else "".join(gen)

    def _turn(self, text: str, progress: Progress | None) -> Iterator[str]:
        eng = self.engine
        user = {"role": "user", "content": text}
        reserve = min(self.max_new_tokens, self.n_ctx // 2) + 16
        while True:
            written_ids, prompt_text = self._prompt_ids(self.messages + [user], progress)
            if self.session.n_past + len(written_ids) + reserve <= self.n_ctx:
                break
            if not self._evict_oldest():
                raise EngineError(f"this turn ({len(written_ids)} tokens) does not fit the context of {self.n_ctx}",
                                  hint="use a larger --ctx-size, a smaller --predict, or a shorter message")
        self.stats = TurnStats(prompt_tokens=len(written_ids))
        message_ids = self._prompt_message_ids(user, written_ids, prompt_text)
        t0 = time.perf_counter()
        logits = self._feed_prompt(written_ids, progress, message_ids)
        self.stats.prefill_s = time.perf_counter() - t0
        self.messages.append(user)
        self.history.append(user)
        self._rendered = prompt_text  # the rendering the fed ids were cut from: now the cache's text

        generated: list[int] = []
        decoder = _Utf8Stream(eng)
        batcher = eng.batcher  # other conversations of this engine generating now share each decode step
        t1 = time.perf_counter()
        try:
            with batcher.generating():
                for _ in range(self.max_new_tokens):
                    token = self._sampler.sample(logits[-1])
                    if eng.is_eog(token):
                        break
                    if self.session.n_past + 8 >= self.n_ctx:
                        self._make_room(64)
                    generated.append(token)
                    with deferred_interrupts():
                        logits = batcher.feed_one(self.session, token, write=not self.readonly)[None, :]
                        self._kv.append(token)
                    piece = decoder.push(token)
                    if piece:
                        yield piece
            tail = decoder.flush()
            if tail:
                yield tail
        except (GeneratorExit, KeyboardInterrupt):
            self.stats.interrupted = True
            raise
        finally:
            self.stats.decode_s = time.perf_counter() - t1
            self.stats.generated_tokens = len(generated)
            self._finish_reply(generated)

    def _feed_prompt(self, ids: list[int], progress: Progress | None,
                     message_ids: list[int] | None = None) -> np.ndarray | None:
        """Feed a new message; if interrupted (Ctrl-C) undo it completely: cache, state and counter."""
        cp = self._checkpoint()
        try:
            return self._feed(ids, write=not self.readonly, progress=progress, message_ids=message_ids)
        except KeyboardInterrupt:
            self._rollback(cp)
            self.stats.interrupted = True
            raise

    def _prompt_message_ids(self, user: Message, written_ids: list[int], prompt_text: str) -> list[int] | None:
        """SSW adapters: upstream's message id for the user's tokens, -1 for the generation prompt.

        ``prompt_text``: what ``_prompt_ids`` rendered for ``self.messages + [user]``.
        """
        if not self._segments:
            return None
        index = sum(1 for m in self.history if m["role"] != "system")  # upstream's message id of this turn
        gen = len(self._tokenize(self._template.generation_prompt(self.messages + [user], rendered=prompt_text)))
        return [index] * (len(written_ids) - gen) + [-1] * gen

    def score_reply(self, text: str, reply: str) -> np.ndarray:
        """Natural-log probability of each token of ``reply`` as the answer to ``text``; changes nothing.

        Why: a memory evaluation needs "how likely is the right answer", not only "was it
        generated".  The user turn is fed exactly as ``say`` feeds it (same prompt ids, written
        unless read-only), then the reply's tokens -- tokenized as generated text is -- are
        teacher-forced one at a time, written like generated tokens.  Afterwards everything is
        undone (``_rollback``): KV cache, δ-state, counters, messages, nothing saved.  Unlike
        ``say`` a probe never evicts old turns (that cannot be undone): it raises if the turn
        does not fit.  Returns float64 ``[len(reply tokens)]``.
        """
        if self._closed:
            raise EngineError("this conversation is closed")
        eng = self.engine
        user = {"role": "user", "content": text}
        reply_ids = eng.tokenize(reply, add_special=False, parse_special=False)
        write = not self.readonly
        cp = self._checkpoint()
        try:
            prompt_ids, prompt_text = self._prompt_ids(self.messages + [user])
            if self.session.n_past + len(prompt_ids) + len(reply_ids) > self.n_ctx:
                raise EngineError(f"this probe ({len(prompt_ids)} + {len(reply_ids)} tokens) does not fit the "
                                  f"context of {self.n_ctx} next to {self.session.n_past} tokens",
                                  hint="use a larger n_ctx or a shorter conversation (a probe never evicts)")
            logits = self._feed(prompt_ids, write=write,
                                message_ids=self._prompt_message_ids(user, prompt_ids, prompt_text))
            rows = [logits[-1]] if reply_ids else []
            for token in reply_ids[:-1]:  # the last token's successor is not scored, so it is not fed
                with deferred_interrupts():
                    rows.append(self.session.feed([token], write=write, logits="last")[-1])
                    self._kv.append(token)
            return token_logprobs(np.asarray(rows, dtype=np.float32).reshape(len(rows), eng.n_vocab), reply_ids)
        finally:
            self._rollback(cp)

    def _finish_reply(self, generated: list[int]) -> None:
        """Close the assistant message in the cache (the template's tail, written) and save.

        The cache holds the prompt's rendering (``_rendered``, set by ``_turn``: the history has
        not changed since, or an eviction set it to None) and the reply's sampled ids, i.e. the
        text ``_rendered + reply``; it is not rendered again.  If the tail cannot go in (no room
        even after evicting, or its feed fails), ``_rendered`` is left at that text, so the next
        turn writes the tail before the new message (a fast path that took the older text for
        ``_rendered`` would feed the reply again and write it twice).
        """
        reply = self.engine.detokenize(generated)
        assistant = {"role": "assistant", "content": reply}
        full = self._template.render(self.messages + [assistant], generation_prompt=False)
        in_cache = None if self._rendered is None else self._rendered + reply
        if in_cache is not None and full.startswith(in_cache):
            tail_ids = self._tokenize(full[len(in_cache):])
            self._rendered = in_cache  # the cache's text until the tail is in (an eviction: None)
            with contextlib.suppress(EngineError):  # no room for the tail, or its feed failed: left out
                self._make_room(len(tail_ids) + 1)
                index = sum(1 for m in self.history if m["role"] != "system")  # the reply's message id
                mids = [index] * len(tail_ids) if self._segments else None
                self._feed(tail_ids, write=not self.readonly, message_ids=mids)
                if self._rendered is not None:
                    self._rendered = full
        else:
            self._rendered = None  # the next turn re-renders and matches tokens instead
        self.messages.append(assistant)
        self.history.append(assistant)
        # one evictable block per turn (user header .. reply tail): what the other blocks leave
        self._spans.append((self._unspanned(), 2))
        self.turns += 1
        self.save()

    # -- commands --------------------------------------------------------------------------

    def set_sampling(self, params: SamplingParams) -> None:
        """Sample the next replies with ``params`` (a server sets them per request)."""
        if not isinstance(params, SamplingParams):
            raise ArgumentError(f"params must be a SamplingParams, got {type(params).__name__}")
        self._sampler.close()
        self._sampler = Sampler(params, self.engine.n_vocab)

    def reset_memory(self) -> None:
        """Forget everything: zero state, empty context and transcript, counters to 0 (and save)."""
        self.session.reset()
        self.messages.clear()
        self._spans.clear()
        self._kv.clear()
        self._preamble = 0
        self._rendered = ""
        self.history.clear()
        self.turns = 0
        self._tokens_before = 0
        self._created_us = statefile.now_us()
        self.save()

    def layer_norms(self) -> np.ndarray:
        """Frobenius norm of each layer's δ-state (what /stats shows)."""
        return layer_norms(self.session.state())

    @property
    def sampler_seed(self) -> int:
        return self._sampler.seed

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        try:
            self._sampler.close()
            self.session.close()
        finally:
            if self._file:
                self._file.close()

    def __enter__(self) -> Conversation:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class _Utf8Stream:
    """Token ids -> text pieces, never splitting a UTF-8 character."""

    def __init__(self, engine: Engine) -> None:
        import codecs

        self._engine = engine
        self._dec = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def push(self, token: int) -> str:
        return self._dec.decode(self._engine.token_bytes(token))

    def flush(self) -> str:
        return self._dec.decode(b"", final=True)
