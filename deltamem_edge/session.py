"""Session: one conversation of an Engine, its own KV cells (a sequence id) and δ-state.

Why a module of its own: the Engine sets up the model, the context and the adapter and
hands out sequences; a Session is what a caller feeds, reads the state of and rolls back,
one sequence at a time.  Both drive the C API through ``_bindings``.
Every token fed with ``write=True`` enters the state exactly once, in order, when it
enters the KV cache.  A single Session must not be used from two threads at once (its
token position would race); the Engine's lock serialises the native calls.
"""

from __future__ import annotations

import ctypes
import warnings
from typing import TYPE_CHECKING

import numpy as np

from . import _bindings
from ._bindings import dmem, llama_lib
from .args import check_bool, check_int, int_array
from .errors import ArgumentError, EngineError

if TYPE_CHECKING:
    from .engine import AdapterInfo, Engine


class Session:
    """One conversation in an Engine: its own KV cells (sequence id) and δ-state."""

    def __init__(self, engine: Engine, seq: int) -> None:
        self.engine = engine
        self.seq = seq
        self.n_past = 0
        self.tokens_written = 0
        self._closed = False
        self._batch = llama_lib.llama_batch_init(engine.n_batch, 0, 1)
        n = engine.n_batch
        self._tok = np.ctypeslib.as_array(self._batch.token, shape=(n,))
        self._pos = np.ctypeslib.as_array(self._batch.pos, shape=(n,))
        self._nseq = np.ctypeslib.as_array(self._batch.n_seq_id, shape=(n,))
        self._out = np.ctypeslib.as_array(ctypes.cast(self._batch.logits, ctypes.POINTER(ctypes.c_int8)), shape=(n,))
        self._nseq[:] = 1
        for i in range(n):
            self._batch.seq_id[i][0] = seq

    # -- feeding ---------------------------------------------------------------------------

    def feed(self, ids: list[int] | np.ndarray, write: bool = True, *, logits: str = "all",
             message_ids: list[int] | np.ndarray | None = None) -> np.ndarray:
        """Run tokens through the model at the next positions.

        Returns float32 logits ``[len(ids), n_vocab]`` (``logits="last"``: only the last
        row, ``[1, n_vocab]``; ``"none"``: an empty array).  With ``write=True`` every
        token is written into the δ-state; ``write=False`` reads the frozen state.

        ``message_ids`` (SSW adapters, write granularity message_mean / sentence_mean): one
        id per token, -1 = not written.  The call is one upstream forward call: every token
        reads the state as it was at the start, then each message writes once from the mean
        of its tokens.  It must fit one ubatch (``n_batch``).  Token-granularity adapters
        ignore the ids.
        """
        ids = int_array("token ids", ids)
        write = check_bool("write", write)
        if not isinstance(logits, str) or logits not in ("all", "last", "none"):
            raise ArgumentError(f"logits must be 'all', 'last' or 'none', got {logits!r:.40}")
        segment_ids = self._segment_ids(ids, message_ids, write)
        eng = self.engine
        with eng._lock:
            self._check()
            if ids.size == 0:
                return np.zeros((0, eng.n_vocab), dtype=np.float32)
            if ids.min() < 0 or ids.max() >= eng.n_vocab:
                raise EngineError(f"token ids must be in 0..{eng.n_vocab - 1}")
            if self.n_past + ids.size > eng.n_ctx_seq:
                raise EngineError(f"context full: {self.n_past} + {ids.size} tokens > {eng.n_ctx_seq} positions",
                                  hint="drop old tokens with Session.drop_positions() or use a larger n_ctx")
            if eng._adapter:
                dmem.llama_dmem_set_write(eng._ctx, bool(write))
                if segment_ids is not None:
                    dmem.llama_dmem_set_message_ids(
                        eng._ctx, segment_ids.ctypes.data_as(ctypes.POINTER(ctypes.c_int32)), segment_ids.size)
            rows: list[np.ndarray] = []
            for start in range(0, ids.size, eng.n_batch):
                chunk = ids[start:start + eng.n_batch]
                n = chunk.size
                last_chunk = start + n == ids.size
                self._tok[:n] = chunk
                self._pos[:n] = np.arange(self.n_past, self.n_past + n)
                self._out[:n] = 1 if logits == "all" else 0
                if logits == "last" and last_chunk:
                    self._out[n - 1] = 1
                self._batch.n_tokens = n
                _bindings.take_recent_errors()
                rc = llama_lib.llama_decode(eng._ctx, self._batch)
                if rc != 0:
                    raise EngineError(_bindings.with_last_error(f"llama_decode failed (code {rc})"),
                                      hint="the KV cache may be full (code 1); try a larger n_ctx")
                self.n_past += n
                if write and eng._adapter:
                    self.tokens_written += n
                n_out = int(self._out[:n].sum())
                if n_out:
                    ptr = llama_lib.llama_get_logits(eng._ctx)
                    rows.append(np.ctypeslib.as_array(ptr, shape=(n_out, eng.n_vocab)).copy())
            if not rows:
                return np.zeros((0, eng.n_vocab), dtype=np.float32)
            return rows[0] if len(rows) == 1 else np.concatenate(rows, axis=0)

    def _segment_ids(self, ids: np.ndarray, message_ids: list[int] | np.ndarray | None,
                     write: bool) -> np.ndarray | None:
        """Validated int32 segment ids for this call, or None when they change nothing."""
        if message_ids is None:
            return None
        mids64 = int_array("message ids", message_ids)
        if mids64.size != ids.size:
            raise ArgumentError(f"{mids64.size} message ids for {ids.size} tokens: give one id per token")
        if mids64.size and (mids64.min() < -1 or mids64.max() > np.iinfo(np.int32).max):
            raise ArgumentError(f"message ids must be -1 (not written) or in 0..{np.iinfo(np.int32).max}, got "
                                f"{int(mids64.min())}..{int(mids64.max())}")
        mids = np.ascontiguousarray(mids64, dtype=np.int32)  # exact: the range was checked
        info = self.engine.adapter
        if not write or info is None or info.write_granularity == "token" or ids.size <= 1:
            return None  # a one-token call writes the same way per token or per message
        if ids.size > self.engine.n_batch:
            raise EngineError(f"a call with message ids must fit one batch ({ids.size} tokens > n_batch "
                              f"{self.engine.n_batch}): segment writes average over the whole call",
                              hint="create the Engine with a larger n_batch")
        return mids

    def drop_positions(self, p0: int, p1: int) -> None:
        """Drop KV positions [p0, p1) and slide later ones back; the δ-state keeps everything.

        Used when the context fills: old turns leave the KV cache but already live in the
        state.  The δ-state is never touched here (so nothing is forgotten: the name
        ``forget``, kept as a deprecated alias, said otherwise).
        """
        p0, p1 = check_int("p0", p0), check_int("p1", p1)
        eng = self.engine
        with eng._lock:
            self._check()
            if not (0 <= p0 < p1 <= self.n_past):
                raise EngineError(f"cannot drop positions {p0}..{p1} of {self.n_past}")
            mem = llama_lib.llama_get_memory(eng._ctx)
            if not llama_lib.llama_memory_seq_rm(mem, self.seq, p0, p1):
                raise EngineError("this model's memory cannot drop a range of positions")
            llama_lib.llama_memory_seq_add(mem, self.seq, p1, -1, -(p1 - p0))
            self.n_past -= p1 - p0

    def forget(self, p0: int, p1: int) -> None:
        """Deprecated name of ``drop_positions`` (it drops KV cells only; the memory keeps everything)."""
        warnings.warn("Session.forget() is now Session.drop_positions(): it drops KV positions only, "
                      "the δ-state keeps everything", DeprecationWarning, stacklevel=2)
        self.drop_positions(p0, p1)

    def truncate(self, n_keep: int) -> None:
        """Drop KV positions from n_keep on (undo tokens that were fed with write=False)."""
        n_keep = check_int("n_keep", n_keep)
        eng = self.engine
        with eng._lock:
            self._check()
            if not 0 <= n_keep <= self.n_past:
                raise EngineError(f"cannot keep {n_keep} of {self.n_past} positions")
            llama_lib.llama_memory_seq_rm(llama_lib.llama_get_memory(eng._ctx), self.seq, n_keep, -1)
            self.n_past = n_keep

    # -- δ-state ---------------------------------------------------------------------------

    def _require_adapter(self) -> AdapterInfo:
        info = self.engine.adapter
        if info is None:
            raise EngineError("no δ-mem adapter is attached to this engine",
                              hint="pass adapter_path=… or a bundled model")
        return info

    def state(self) -> np.ndarray:
        """float32 [n_dmem_layers, H*r, r]: upstream's (H, r, r) per layer, row h*r+i."""
        eng = self.engine
        with eng._lock:
            self._check()
            info = self._require_adapter()
            out = np.empty(info.state_shape, dtype=np.float32)
            rc = dmem.llama_dmem_state_get(eng._ctx, self.seq, out.ctypes.data_as(_bindings.c_float_p), out.size)
            if rc != 0:
                raise EngineError(dmem.last_error())
            return out

    def set_state(self, state: np.ndarray) -> None:
        """Replace this session's δ-state with ``state``, exactly.

        ``state`` must be a float32 ndarray of shape ``adapter.state_shape`` with
        finite values; anything else (float64, int, a nested list, another shape)
        raises ``ArgumentError`` (an ``EngineError``) naming the dtype or shape, and
        the state is unchanged.  Why no cast: float64 → float32 rounds, and turns a
        finite 1e39 into inf; convert explicitly with ``np.asarray(x, np.float32)``
        if that is what you mean.  Non-contiguous float32 arrays are copied as is.
        """
        eng = self.engine
        with eng._lock:
            self._check()
            info = self._require_adapter()
            if not isinstance(state, np.ndarray):
                raise ArgumentError(f"state must be a float32 numpy array, got {type(state).__name__}; nothing "
                                    "was changed", hint="convert explicitly: np.asarray(x, np.float32)")
            if state.dtype != np.float32:
                raise ArgumentError(f"state has dtype {state.dtype}, the δ-state is float32; nothing was changed",
                                    hint="convert explicitly if you accept the rounding: np.asarray(x, np.float32)")
            if state.shape != info.state_shape:
                raise ArgumentError(f"state has shape {state.shape}, this adapter needs {info.state_shape}; "
                                    "nothing was changed")
            arr = np.ascontiguousarray(state)
            if not np.isfinite(arr).all():
                raise ArgumentError("state holds NaN or Inf values; nothing was changed")
            rc = dmem.llama_dmem_state_set(eng._ctx, self.seq, arr.ctypes.data_as(_bindings.c_float_p), arr.size)
            if rc != 0:
                raise EngineError(dmem.last_error())

    def reset_state(self) -> None:
        """Zero δ-state; the KV cache is kept."""
        eng = self.engine
        with eng._lock:
            self._check()
            self._require_adapter()
            if dmem.llama_dmem_state_reset(eng._ctx, self.seq) != 0:
                raise EngineError(dmem.last_error())

    def reset(self) -> None:
        """Fresh KV cells and a zero δ-state."""
        eng = self.engine
        with eng._lock:
            self._check()
            llama_lib.llama_memory_seq_rm(llama_lib.llama_get_memory(eng._ctx), self.seq, -1, -1)
            if eng._adapter:
                dmem.llama_dmem_state_reset(eng._ctx, self.seq)
            self.n_past = 0
            self.tokens_written = 0

    # -- lifetime --------------------------------------------------------------------------

    def _check(self) -> None:
        if self._closed:
            raise EngineError("this session is closed")
        self.engine._check_open()

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            self.engine._release(self.seq)
            llama_lib.llama_batch_free(self._batch)

    def __enter__(self) -> Session:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
