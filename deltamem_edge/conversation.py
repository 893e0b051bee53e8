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
"""

from __future__ import annotations

import contextlib
import dataclasses
import signal
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from . import statefile
from .args import check_bool, check_int
from .engine import Engine
from .errors import ArgumentError, EngineError
from .fingerprint import adapter_fingerprint
from .sampling import Sampler, SamplingParams

CHATML = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n'}}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
Message = dict[str, str]
Progress = Callable[[int, int], None]


@dataclass
class TurnStats:
    prompt_tokens: int = 0
    generated_tokens: int = 0
    prefill_s: float = 0.0
    decode_s: float = 0.0
    interrupted: bool = False


@contextlib.contextmanager
def deferred_interrupts() -> Iterator[None]:
    """Hold Ctrl-C until the block is done, so a decode and its bookkeeping stay together."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    caught: list[object] = []
    previous = signal.signal(signal.SIGINT, lambda *a: caught.append(a))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
        if caught:
            raise KeyboardInterrupt


class _Template:
    """The model's Jinja chat template, rendered like llama-cpp-python does."""

    def __init__(self, engine: Engine) -> None:
        from llama_cpp.llama_chat_format import Jinja2ChatFormatter

        source = engine.meta("tokenizer.chat_template")
        self.is_default = source is None
        source = source or CHATML

        def tok_text(key: str) -> str:
            value = engine.meta(key)
            return engine.detokenize([int(value)], special=True) if value not in (None, "") else ""

        bos, eos = tok_text("tokenizer.ggml.bos_token_id"), tok_text("tokenizer.ggml.eos_token_id")
        self._gen = Jinja2ChatFormatter(source, eos, bos, add_generation_prompt=True)
        self._plain = Jinja2ChatFormatter(source, eos, bos, add_generation_prompt=False)

    def render(self, messages: list[Message], *, generation_prompt: bool) -> str:
        if not messages:
            return ""
        fmt = self._gen if generation_prompt else self._plain
        return fmt(messages=messages).prompt

    def default_system(self) -> str | None:
        """The system prompt the template inserts by itself when none is given (SmolLM2 does).

        Found by rendering a conversation with and without a marker system message.  We make it
        an explicit system message so that it is written into memory once, not once per run, and
        so that evicting old turns never cuts it.
        """
        marker = "\x00"
        user = {"role": "user", "content": "a"}
        try:
            bare = self.render([user], generation_prompt=False)
            marked = self.render([{"role": "system", "content": marker}, user], generation_prompt=False)
        except Exception:  # templates that reject a system role
            return None
        if marker not in marked:
            return None
        before, after = marked.split(marker, 1)
        if bare.startswith(before) and bare.endswith(after) and len(bare) > len(before) + len(after):
            return bare[len(before):len(bare) - len(after)]
        return None


def _common_prefix(a: list[int], b: list[int]) -> int:
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i


def token_logprobs(logits: np.ndarray, ids: list[int]) -> np.ndarray:
    """log p(ids[i]) under logits row i, float64, by a max-shifted (stable) log-softmax."""
    x = np.asarray(logits, dtype=np.float64)
    x = x - x.max(axis=1, keepdims=True)
    log_z = np.log(np.exp(x).sum(axis=1))
    return x[np.arange(len(ids)), np.asarray(ids, dtype=np.int64)] - log_z


@dataclass(frozen=True)
class _Checkpoint:
    """A conversation's cache and memory at one moment (see ``Conversation._rollback``)."""

    kv: list[int]
    written: int
    state: np.ndarray | None
    spans: list[tuple[int, int]]
    rendered: str | None


class Conversation:
    """A chat whose memory is a δ-mem state file.

    ``say(text)`` returns the reply; ``say(text, stream=True)`` yields text pieces as
    they are generated.  One Conversation per thread; several Conversations can share
    one Engine (``n_seq_max`` sessions).
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
        self._template = _Template(engine)
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

    def _generation_prompt(self, messages: list[Message]) -> str:
        """The text the template adds for the assistant's turn (SSW gives it id -1, like upstream)."""
        with_prompt = self._template.render(messages, generation_prompt=True)
        without = self._template.render(messages, generation_prompt=False)
        return with_prompt[len(without):] if with_prompt.startswith(without) else ""

    def _evict_oldest(self) -> bool:
        """Drop the oldest evictable block of messages from the cache (the state keeps them)."""
        if not self._spans:
            return False
        n, n_messages = self._spans.pop(0)
        first = 1 if self._preamble else 0  # the system message stays
        p0 = self._preamble
        with deferred_interrupts():
            if n:
                self.session.forget(p0, p0 + n)
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

    def _prompt_ids(self, messages: list[Message], progress: Progress | None = None) -> list[int]:
        """The ids to write so that the cache holds `messages` + the generation prompt.

        Fast path: the template text already in the cache is a prefix of the new rendering,
        so only the added text is tokenized (the sampled ids in the cache stay as they are).
        Otherwise the history is re-rendered, the cache is cut where its tokens stop matching,
        and the re-rendered old messages are fed back READ-ONLY here (they are in memory
        already); only the new message is returned for writing.
        """
        text = self._template.render(messages, generation_prompt=True)
        if self._rendered is not None and text.startswith(self._rendered):
            return self._tokenize(text[len(self._rendered):])
        old_ids = self._tokenize(self._template.render(messages[:-1], generation_prompt=False))
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
        self._rendered = self._template.render(messages[:-1], generation_prompt=False)
        return new_ids[boundary:]

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

    def _prompt_message_ids(self, user: Message, written_ids: list[int]) -> list[int] | None:
        """SSW adapters: upstream's message id for the user's tokens, -1 for the generation prompt."""
        if not self._segments:
            return None
        index = sum(1 for m in self.history if m["role"] != "system")  # upstream's message id of this turn
        gen = len(self._tokenize(self._generation_prompt(self.messages + [user])))
        return [index] * (len(written_ids) - gen) + [-1] * gen

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

    def set_sampling(self, params: SamplingParams) -> None:
        """Sample the next replies with ``params`` (a server sets them per request)."""
        if not isinstance(params, SamplingParams):
            raise ArgumentError(f"params must be a SamplingParams, got {type(params).__name__}")
        self._sampler.close()
        self._sampler = Sampler(params, self.engine.n_vocab)

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
            written_ids = self._prompt_ids(self.messages + [user], progress)
            if self.session.n_past + len(written_ids) + reserve <= self.n_ctx:
                break
            if not self._evict_oldest():
                raise EngineError(f"this turn ({len(written_ids)} tokens) does not fit the context of {self.n_ctx}",
                                  hint="use a larger --ctx-size, a smaller --predict, or a shorter message")
        self.stats = TurnStats(prompt_tokens=len(written_ids))
        message_ids = self._prompt_message_ids(user, written_ids)
        t0 = time.perf_counter()
        logits = self._feed_prompt(written_ids, progress, message_ids)
        self.stats.prefill_s = time.perf_counter() - t0
        self.messages.append(user)
        self.history.append(user)
        self._rendered = self._template.render(self.messages, generation_prompt=True)

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
            prompt_ids = self._prompt_ids(self.messages + [user])
            if self.session.n_past + len(prompt_ids) + len(reply_ids) > self.n_ctx:
                raise EngineError(f"this probe ({len(prompt_ids)} + {len(reply_ids)} tokens) does not fit the "
                                  f"context of {self.n_ctx} next to {self.session.n_past} tokens",
                                  hint="use a larger n_ctx or a shorter conversation (a probe never evicts)")
            logits = self._feed(prompt_ids, write=write, message_ids=self._prompt_message_ids(user, prompt_ids))
            rows = [logits[-1]] if reply_ids else []
            for token in reply_ids[:-1]:  # the last token's successor is not scored, so it is not fed
                with deferred_interrupts():
                    rows.append(self.session.feed([token], write=write, logits="last")[-1])
                    self._kv.append(token)
            return token_logprobs(np.asarray(rows, dtype=np.float32).reshape(len(rows), eng.n_vocab), reply_ids)
        finally:
            self._rollback(cp)

    def _finish_reply(self, generated: list[int]) -> None:
        """Close the assistant message in the cache (the template's tail, written) and save."""
        reply = self.engine.detokenize(generated)
        assistant = {"role": "assistant", "content": reply}
        in_cache = self._template.render(self.messages, generation_prompt=True) + reply
        full = self._template.render(self.messages + [assistant], generation_prompt=False)
        if self._rendered is not None and full.startswith(in_cache):
            tail_ids = self._tokenize(full[len(in_cache):])
            with contextlib.suppress(EngineError):
                self._make_room(len(tail_ids) + 1)
                index = sum(1 for m in self.history if m["role"] != "system")  # the reply's message id
                mids = [index] * len(tail_ids) if self._segments else None
                self._feed(tail_ids, write=not self.readonly, message_ids=mids)
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
        return np.linalg.norm(self.session.state().reshape(self.session.state().shape[0], -1), axis=1)

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
