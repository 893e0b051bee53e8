"""Continuous batching: the next tokens of concurrently generating sessions in one ``Engine.step``.

Why here and not in the server: each conversation generates in its own thread (the
Conversation turn loop samples, feeds one token, yields text); batching across them is a
group commit on the one-token feeds.  A thread that wants to feed a token puts it in the
pending set and waits; when every session registered as generating has a token pending
(or ``max_wait_s`` passed, so a slow or stuck one cannot hold the others), one waiter
takes the whole set (one ``write`` group at a time: δ-mem writes are a per-call switch)
and runs it as one ``Engine.step``; every waiter gets its own logits row (or its own
error: a refused step is retried one by one, so one bad session fails alone).  Results are
those of feeding one by one (``Engine.step``'s parity test), so batching changes speed,
not replies.

On an engine that cannot batch (``Engine.batches_sessions`` false: one session, or a
unified KV cache with an adapter) ``feed_one`` is a plain ``Session.feed``: no waiting.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Iterator
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from .engine import Engine, Session


class StepBatcher:
    """Groups one-token feeds of sessions of ``engine`` into batched steps (one per engine)."""

    def __init__(self, engine: Engine, max_wait_s: float = 0.01) -> None:
        self.engine = engine
        self.max_wait_s = max_wait_s
        self._cond = threading.Condition()
        self._pending: dict[Session, tuple[int, bool]] = {}  # session -> (token, write), in arrival order
        self._done: dict[Session, np.ndarray | BaseException] = {}
        self._generating = 0  # sessions inside a generation loop (each will feed again soon)
        self._busy = False  # a step is running
        self.steps = 0  # batched steps run, and the tokens they held (tokens / steps = mean batch)
        self.tokens = 0

    @contextlib.contextmanager
    def generating(self) -> Iterator[None]:
        """Mark the caller's session as generating: steps wait (briefly) for its next token."""
        with self._cond:
            self._generating += 1
        try:
            yield
        finally:
            with self._cond:
                self._generating -= 1
                self._cond.notify_all()

    def feed_one(self, session: Session, token: int, *, write: bool = True) -> np.ndarray:
        """Feed ``token`` to ``session`` at its next position; its logits, float32 ``[n_vocab]``."""
        if not self.engine.batches_sessions:
            return session.feed([token], write=write, logits="last")[0]
        with self._cond:
            if session in self._pending or session in self._done:
                raise RuntimeError("a session fed from two threads at once")
            self._pending[session] = (token, write)
            self._cond.notify_all()
            deadline = time.monotonic() + self.max_wait_s
            while session not in self._done:
                full = len(self._pending) >= self._generating or time.monotonic() >= deadline
                if not self._busy and session in self._pending and full:
                    self._lead()
                elif self._busy or session not in self._pending:
                    self._cond.wait()  # our token is in the running step, or the next one
                else:
                    self._cond.wait(max(0.0, deadline - time.monotonic()))
            out = self._done.pop(session)
        if isinstance(out, BaseException):
            raise out
        return out

    def _lead(self) -> None:
        """Run the pending tokens of the oldest write group as one step (called holding the lock)."""
        write = next(iter(self._pending.values()))[1]
        batch = {s: tok for s, (tok, w) in self._pending.items() if w == write}
        for s in batch:
            del self._pending[s]
        self._busy = True
        self._cond.release()
        results: dict[Session, np.ndarray | BaseException] = {}
        try:
            try:
                results = dict(self.engine.step(batch, write=write))
            except Exception:  # noqa: BLE001 - step changed nothing: one by one, so only the faulty session fails
                for s, tok in batch.items():
                    try:
                        results[s] = self.engine.step({s: tok}, write=write)[s]
                    except Exception as exc:  # noqa: BLE001 - raised in that session's own thread
                        results[s] = exc
        except BaseException as exc:  # noqa: BLE001 - e.g. Ctrl-C in the leading thread: no waiter is left hanging
            results = {s: results.get(s, exc) for s in batch}
        finally:
            self._cond.acquire()
            self._busy = False
        self._done.update(results)
        self.steps += 1
        self.tokens += len(batch)
        self._cond.notify_all()
