"""One chat completion on a pooled Conversation: what is written into memory, stop sequences, events.

The memory-write rule (docs/server.md, "What is written into memory").  An app sends its
whole view of the conversation every time; the memory must get each user turn and each
reply exactly once.  So, per request with a memory:

* Only the **last message** (it must be the user's) and **the reply** are new.  They are
  written, in order, as the CLI writes a turn.
* Every earlier message (system prompt included) is **context**: the model reads it in its
  KV cache, fed with writes off.  Earlier turns that came through this server were written
  when they were new; turns the app had before it used this memory are not ours to write.
* A **retry**: when the last user message equals the last user turn already written into
  the memory, and the user message before it (if the request has one) equals the one
  before that in the memory, the request repeats the memory's last turn (a regenerate
  button, a client retry after a timeout).  It is answered with writes off and the memory
  file is not changed, so a repeated request never writes twice.
* A request without a memory id is **stateless**: a fresh zero state, every message fed
  with writes on (the model's normal reading of a prompt), nothing saved.

Runs in a worker thread; ``emit`` hands events to the event loop: ("ready", None) once
the prompt is read and generation has begun (or an ("error", ApiError) instead), then
("delta", text)..., then ("done", Outcome) or ("error", ApiError).
"""

from __future__ import annotations

import sys
import threading
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from ..conversation import Conversation, Message, TurnStats
from ..errors import EngineError, StateFileError, StateLockedError, StateMismatchError
from ..sampling import SamplingParams
from ..state_norms import layer_change
from ..statefile import trim_transcript
from .layer_stats import TurnChange
from .memories import Lease, MemoryPool, PoolClosed
from .protocol import ApiError, ChatRequest

Emit = Callable[[str, Any], None]


@dataclass(frozen=True)
class TurnPlan:
    context: list[Message]  # shown to the model, never written (stateless: written)
    user: str  # the new user turn
    retry: bool  # a repeat of the memory's last turn: answered read-only


def _user_texts(messages: list[Message]) -> list[str]:
    return [m["content"] for m in messages if m["role"] == "user"]


def plan_turn(messages: list[Message], history: list[Message]) -> TurnPlan:
    """Split a request's messages into context and the new turn, and spot a retry (rule above)."""
    context, user = messages[:-1], messages[-1]["content"]
    asked, written = _user_texts(messages), _user_texts(history)
    retry = bool(written) and asked[-1] == written[-1] and (
        len(asked) == 1 or (len(written) >= 2 and asked[-2] == written[-2]))
    return TurnPlan(context=context, user=user, retry=retry)


class StopMatcher:
    """Cut the reply at the first stop sequence, holding back text that may be the start of one."""

    def __init__(self, stops: tuple[str, ...]) -> None:
        self.stops = stops
        self.hold = max((len(s) for s in stops), default=1) - 1
        self.buf = ""

    def push(self, text: str) -> tuple[str, bool]:
        """(text safe to send now, whether a stop sequence was found)."""
        self.buf += text
        hits = [i for i in (self.buf.find(s) for s in self.stops) if i >= 0]
        if hits:
            out, self.buf = self.buf[:min(hits)], ""
            return out, True
        cut = len(self.buf) - self.hold
        if cut <= 0:
            return "", False
        out, self.buf = self.buf[:cut], self.buf[cut:]
        return out, False

    def flush(self) -> str:
        out, self.buf = self.buf, ""
        return out


@dataclass(frozen=True)
class SamplingDefaults:
    """The server's sampling flags; a request's temperature / top_p / seed override them."""

    temp: float = 0.8
    top_k: int = 40
    top_p: float = 0.95
    min_p: float = 0.05

    def for_request(self, req: ChatRequest) -> SamplingParams:
        return SamplingParams(temp=self.temp if req.temperature is None else req.temperature, top_k=self.top_k,
                              top_p=self.top_p if req.top_p is None else req.top_p, min_p=self.min_p,
                              seed=-1 if req.seed is None else req.seed)


@dataclass(frozen=True)
class Outcome:
    text: str
    finish_reason: str
    prompt_tokens: int
    completion_tokens: int
    memory: dict[str, Any] | None
    change: TurnChange | None = None  # how much each layer moved in this turn (a turn written into a memory)


def as_api_error(exc: BaseException) -> ApiError:
    """What a client is told about a failure (no tracebacks, no server paths for state files)."""
    if isinstance(exc, ApiError):
        return exc
    if isinstance(exc, PoolClosed):
        return ApiError(503, "the server is shutting down", type="server_error", code="shutting_down")
    if isinstance(exc, StateLockedError):
        return ApiError(409, "this memory is in use by another program", type="memory_error", code="memory_locked")
    if isinstance(exc, StateMismatchError):
        return ApiError(409, "this memory was written by another model or adapter; it was left unchanged",
                        type="memory_error", code="memory_mismatch")
    if isinstance(exc, StateFileError):
        return ApiError(409, f"this memory's file cannot be used: {exc.args[0].split(': ', 1)[-1]}",
                        type="memory_error", code="memory_unreadable")
    if isinstance(exc, EngineError) and "does not fit the context" in str(exc):
        return ApiError(400, f"{exc}; hint: {exc.hint}" if exc.hint else str(exc), param="messages",
                        code="context_length_exceeded")
    try:
        from jinja2 import TemplateError
    except ImportError:  # pragma: no cover
        TemplateError = ()  # type: ignore[assignment]  # noqa: N806
    if isinstance(exc, TemplateError):
        return ApiError(400, f"the model's chat template refused these messages: {exc}", param="messages",
                        code="template_error")
    print(f"deltamem-edge serve: internal error: {type(exc).__name__}: {exc}", file=sys.stderr)
    traceback.print_exception(exc, file=sys.stderr)
    return ApiError(500, "internal server error (the server log has the details)", type="server_error",
                    code="internal_error")


def run_completion(pool: MemoryPool, memory_id: str | None, req: ChatRequest, sampling: SamplingDefaults,
                   emit: Emit, cancel: threading.Event) -> None:
    """Run one completion and report it through ``emit``; never raises."""
    try:
        lease = pool.acquire(memory_id)
    except BaseException as exc:  # noqa: BLE001 - reported to the client
        emit("error", as_api_error(exc))
        return
    broken = False
    try:
        out = _complete(lease, memory_id, req, sampling, emit, cancel)
        if out.change is not None:  # before "done": a client that asks for the memory's info next sees it
            pool.changes.record(lease.slot.key, out.change)
        emit("done", out)
    except BaseException as exc:  # noqa: BLE001 - reported to the client
        broken = not isinstance(exc, ApiError | PoolClosed) and not (
            isinstance(exc, EngineError) and "does not fit the context" in str(exc))
        emit("error", as_api_error(exc))
    finally:
        pool.release(lease, broken=broken)


def _complete(lease: Lease, memory_id: str | None, req: ChatRequest, sampling: SamplingDefaults, emit: Emit,
              cancel: threading.Event) -> Outcome:
    conv: Conversation = lease.conv
    stateless = lease.stateless
    plan = plan_turn(req.messages, [] if stateless else conv.history)
    conv.max_new_tokens = req.max_tokens
    conv.set_sampling(sampling.for_request(req))
    user_tokens = len(conv.engine.tokenize(plan.user)) + 16
    conv.set_context(plan.context, write=stateless, room=user_tokens + min(req.max_tokens, conv.n_ctx // 2) + 16)
    context_tokens = conv.session.n_past

    retry = plan.retry and not stateless
    before = (list(conv.history), conv.turns)
    if retry:
        conv.readonly = True  # feeds with writes off, save() does nothing; counters restored below
    # the state this turn starts from (the file's: the context above was fed with writes off)
    state_before = None if retry or stateless else conv.session.state()
    matcher = StopMatcher(req.stop)
    conv.stats = TurnStats()  # a reply cancelled before it began generated nothing (not the last turn's count)
    pieces: list[str] = []
    stopped = started = False
    try:
        gen = conv.say(plan.user, stream=True)
        try:
            while not cancel.is_set():
                try:
                    piece = next(gen)
                except StopIteration:
                    break
                if not started:
                    started = True
                    emit("ready", None)
                out, stopped = matcher.push(piece)
                if out:
                    pieces.append(out)
                    emit("delta", out)
                if stopped:
                    break
        finally:
            gen.close()  # ends the reply: its template tail is fed and the memory saved (unless retry)
    finally:
        if retry:
            conv.readonly = False
            conv.history, conv.turns = before
    if not started:
        emit("ready", None)
    if not stopped:
        tail = matcher.flush()
        if tail:
            pieces.append(tail)
            emit("delta", tail)
    if conv.transcript_turns:
        conv.history = trim_transcript(conv.history, conv.transcript_turns)  # bounded in RAM as on disk
    change = None
    if state_before is not None and conv.turns > before[1]:  # the turn was written and saved
        norms = layer_change(state_before, conv.session.state())
        change = TurnChange(conv.turns, conv.tokens_written, tuple(float(x) for x in norms))
    generated = conv.stats.generated_tokens
    finish = "length" if not stopped and generated >= req.max_tokens else "stop"
    memory = None if stateless else {
        "id": memory_id, "turns": conv.turns, "tokens_written": conv.tokens_written, "written": not retry,
        "retry": retry,
    }
    return Outcome(text="".join(pieces), finish_reason=finish, prompt_tokens=context_tokens + conv.stats.prompt_tokens,
                   completion_tokens=generated, memory=memory, change=change)
