"""Engine: one model, one llama context, at most one δ-mem adapter; tokens in, logits out.

This module and ``session.py`` drive the model, the context and the δ-mem state through
the C API (``_bindings``); elsewhere only ``sampling.py`` (llama.cpp's sampler chain) and
``converter/model.py`` (its quantizer) call it.  ``Session`` lives in ``session.py`` and is
re-exported here.
``Engine`` owns one model, one llama context and at most one δ-mem adapter;
each ``Session`` is one sequence of that context with its own KV cells and its
own δ-state.  Every token fed with ``write=True`` enters the state exactly once,
in order, when it enters the KV cache.

Thread safety: an Engine serialises all native calls with a lock, so sessions
may be driven from different threads; a single Session must not be used from
two threads at once (its token position would race).

Batched decode: ``Engine.step({session: token, ...})`` decodes the next token of
several sessions in ONE ``llama_decode`` (continuous batching, as llama-server
does for its slots).  The δ-mem graph runs such a batch as an equal-split ubatch,
each sequence reading and writing its own state row; that needs the context's
sequences in separate KV streams (``kv_unified=False``, each session then has
``n_ctx / n_seq_max`` positions).  On a unified context with an adapter the
native side takes one sequence per call, so ``step`` decodes one by one there:
same results, no batching.
"""

from __future__ import annotations

import contextlib
import ctypes
import hashlib
import os
import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from . import _bindings, rpc
from ._bindings import dmem, llama_lib
from .args import check_bool, check_int
from .errors import AdapterError, ArgumentError, EngineError, ModelLoadError
from .gguf_schema import WRITE_GRANULARITIES
from .native.c_api import SCAN_FUSED, SCAN_STANDARD
from .session import Session

if TYPE_CHECKING:
    from .batching import StepBatcher

ADAPTER_SUFFIX = ".dmem.gguf"  # converter default: <model stem>.dmem.gguf next to the model


@dataclass(frozen=True)
class AdapterInfo:
    """Shape of the attached δ-mem adapter."""

    path: Path
    rank: int
    state_heads: int
    layers: tuple[int, ...]
    bundled: bool
    write_granularity: str = "token"
    devices: tuple[str, ...] = ()  # per δ-mem layer, the device that runs it and holds its state ("CPU", "RPC0", …)

    @property
    def rows(self) -> int:
        return self.rank * self.state_heads

    @property
    def state_shape(self) -> tuple[int, int, int]:
        return (len(self.layers), self.rows, self.rank)


SCANS = ("auto", "fused", "standard")  # Engine(scan=...): see the Engine docstring


def _tensor_split(weights: Sequence[float] | None) -> ctypes.Array | None:
    """``tensor_split`` as llama.cpp takes it: llama_max_devices() floats, the rest zero."""
    if weights is None:
        return None
    n_max = llama_lib.llama_max_devices()
    values = list(weights) if not isinstance(weights, (str, bytes)) else None
    if (values is None or not 1 <= len(values) <= n_max
            or not all(isinstance(w, (int, float)) and not isinstance(w, bool) and 0 <= w < float("inf") for w in values)
            or not any(values)):
        raise ArgumentError(f"tensor_split must be 1 to {n_max} non-negative weights, not all zero; "
                            f"got {weights!r:.60}")
    return (ctypes.c_float * n_max)(*values)


def find_adapter_for(model_path: Path) -> Path | None:
    """The adapter `deltamem-edge chat` uses when none is named: bundled, else next to the model."""
    if dmem.llama_dmem_file_has_adapter(str(model_path).encode()) == 1:
        return model_path
    sidecar = model_path.with_name(model_path.name.removesuffix(".gguf") + ADAPTER_SUFFIX)
    return sidecar if sidecar.exists() else None


class Engine:
    """A loaded model, optionally with a δ-mem adapter, and one llama context.

    ``adapter_path=None`` uses δ-mem tensors bundled in the model file; pass
    ``adapter_path=False`` for the vanilla model.  ``n_seq_max`` is the number of
    sessions (conversations) that can live in the context at once.

    ``exact=True`` is the one switch for exact numerics (parity tests, ``verify``): an
    f32 KV cache *and* flash attention off.  Either alone is not enough: with flash
    attention on, the engine differs from an f32 reference by ~1e-2 on the logits even
    without δ-mem, against ~1e-5 with it off.  ``f32_kv`` alone only sets the cache type.

    ``scan`` picks how the δ-mem scan runs: ``"fused"`` (one CPU op per δ-mem layer, the
    fewest graph nodes; only when every δ-mem layer runs on the CPU), ``"standard"``
    (standard ggml ops, every backend), or ``"auto"`` (fused where it can run).  Both give
    the same results to float32 rounding and share the state; see also :attr:`scan`.

    ``rpc_servers`` (``["host:port", ...]``) adds the devices of running ``rpc-server``s
    (llama.cpp's RPC backend, docs/distributed.md): each server is checked first (reachable,
    same protocol) and an unusable one raises :class:`~deltamem_edge.rpc.RpcError` before
    anything loads.  ``n_gpu_layers`` then defaults to every layer (-1) on those devices and
    ``tensor_split`` (one weight per device, RPC devices first) divides them; a δ-mem layer's
    state lives on its layer's device (:attr:`AdapterInfo.devices`).  Without ``rpc_servers``
    ``n_gpu_layers`` defaults to 0.
    """

    def __init__(
        self,
        model_path: str | os.PathLike[str],
        adapter_path: str | os.PathLike[str] | None | bool = None,
        *,
        n_ctx: int = 4096,
        n_threads: int | None = None,
        n_gpu_layers: int | None = None,
        n_seq_max: int = 1,
        n_batch: int = 512,
        n_ubatch: int | None = None,
        f32_kv: bool = False,
        flash_attn: bool | None = None,
        kv_unified: bool = True,
        exact: bool = False,
        scan: str = "auto",
        rpc_servers: str | Sequence[str] | None = None,
        tensor_split: Sequence[float] | None = None,
    ) -> None:
        self._lock = threading.RLock()
        self._step_batch = None  # llama_batch of n_seq_max one-token slots, made on the first batched step
        self._batcher: StepBatcher | None = None
        self._model = None
        self._ctx = None
        self._adapter = None
        self.model_path = Path(model_path)
        if not self.model_path.is_file():
            raise ModelLoadError("model file not found", path=self.model_path,
                                 hint="pass the path of a .gguf model file")
        u32 = 2**32 - 1  # the C parameters are uint32 / int32: larger values would wrap, not fail
        n_ctx = check_int("n_ctx", n_ctx, low=16, high=u32)
        n_seq_max = check_int("n_seq_max", n_seq_max, low=1, high=u32)
        n_batch = check_int("n_batch", n_batch, low=1, high=u32)
        n_ubatch = None if n_ubatch is None else check_int("n_ubatch", n_ubatch, low=1, high=u32)
        n_threads = None if n_threads is None else check_int("n_threads", n_threads, low=0, high=4096)  # 0: default
        self.rpc_servers = () if rpc_servers is None else rpc.parse_endpoints(rpc_servers)
        if n_gpu_layers is None:
            n_gpu_layers = -1 if self.rpc_servers else 0
        n_gpu_layers = check_int("n_gpu_layers", n_gpu_layers, low=-1, high=2**31 - 1)
        split = _tensor_split(tensor_split)
        f32_kv = check_bool("f32_kv", f32_kv)
        kv_unified = check_bool("kv_unified", kv_unified)
        flash_attn = None if flash_attn is None else check_bool("flash_attn", flash_attn)
        self.exact = check_bool("exact", exact)
        if not isinstance(scan, str) or scan not in SCANS:
            raise ArgumentError(f"scan must be one of {', '.join(SCANS)}, got {scan!r:.40}")
        self._scan_wanted = scan
        if self.exact:
            if flash_attn:
                raise ArgumentError("exact=True needs flash attention off: leave flash_attn unset or pass False")
            f32_kv, flash_attn = True, False

        mparams = llama_lib.llama_model_default_params()
        mparams.n_gpu_layers = n_gpu_layers
        # explicit devices once any RPC server is registered in this process: ours, never another engine's
        # (both arrays are read during the load call only; llama.cpp keeps its own copies)
        devices = rpc.model_devices(rpc.connect(self.rpc_servers) if self.rpc_servers else ())
        if devices is not None:
            mparams.devices = ctypes.cast(devices, ctypes.c_void_p)
        if split is not None:
            mparams.tensor_split = split
        _bindings.take_recent_errors()
        self._model = llama_lib.llama_model_load_from_file(str(self.model_path).encode(), mparams)
        if not self._model:
            raise ModelLoadError(_bindings.with_last_error("could not load the model"), path=self.model_path,
                                 hint="is this a GGUF model file of a supported architecture?")

        threads = n_threads or max(1, min(8, os.cpu_count() or 1))
        cparams = llama_lib.llama_context_default_params()
        cparams.n_ctx = n_ctx
        cparams.n_batch = min(n_batch, n_ctx)
        cparams.n_ubatch = min(n_ubatch or n_batch, cparams.n_batch)
        cparams.n_seq_max = n_seq_max
        cparams.n_threads = threads
        cparams.n_threads_batch = threads
        # unified: sessions share the cells (any one may grow to n_ctx), each δ-mem decode holds one sequence;
        # not unified: one KV stream of n_ctx / n_seq_max cells per session, and step() batches sessions
        cparams.kv_unified = kv_unified
        cparams.no_perf = True
        if f32_kv:
            cparams.type_k = 0  # GGML_TYPE_F32
            cparams.type_v = 0
        if flash_attn is not None:
            cparams.flash_attn_type = 1 if flash_attn else 0
        self._ctx = llama_lib.llama_init_from_model(self._model, cparams)
        if not self._ctx:
            self.close()
            raise ModelLoadError(_bindings.with_last_error("could not create a context"), path=self.model_path,
                                 hint="try a smaller n_ctx")
        self.n_ctx = llama_lib.llama_n_ctx(self._ctx)
        self.kv_unified = kv_unified
        # positions one session may use: all of them when unified, its own stream otherwise
        self.n_ctx_seq = self.n_ctx if kv_unified else llama_lib.llama_n_ctx_seq(self._ctx)
        self.n_batch = cparams.n_batch
        self.n_seq_max = n_seq_max
        self.n_threads = threads
        self.n_gpu_layers = n_gpu_layers
        self._vocab = llama_lib.llama_model_get_vocab(self._model)
        self.n_vocab = llama_lib.llama_vocab_n_tokens(self._vocab)
        self._free_seqs = list(range(n_seq_max - 1, -1, -1))
        self.adapter: AdapterInfo | None = None

        if adapter_path is None:
            found = find_adapter_for(self.model_path)
            if found is not None:
                self.attach(found)
        elif adapter_path is not False:
            self.attach(adapter_path)

    # -- adapter ---------------------------------------------------------------------------

    def attach(self, adapter_path: str | os.PathLike[str]) -> AdapterInfo:
        """Load a δ-mem adapter (or bundle) and attach it; every session's state becomes zero."""
        path = Path(adapter_path)
        if not path.is_file():
            raise AdapterError("adapter file not found", path=path)
        with self._lock:
            self.detach()
            handle = dmem.llama_dmem_adapter_init(self._model, str(path).encode())
            if not handle:
                raise AdapterError(_strip_path(dmem.last_error(), path), path=path,
                                   hint="convert upstream adapters with `deltamem-edge convert adapter`")
            if dmem.llama_dmem_attach(self._ctx, handle) != 0:
                dmem.llama_dmem_adapter_free(handle)
                raise AdapterError(dmem.last_error(), path=path)
            if self._scan_wanted != "auto":
                try:
                    self._set_scan(self._scan_wanted, path)
                except AdapterError:
                    dmem.llama_dmem_attach(self._ctx, None)
                    dmem.llama_dmem_adapter_free(handle)
                    raise
            self._adapter = handle
            n = dmem.llama_dmem_adapter_n_layers(handle)
            self.adapter = AdapterInfo(
                path=path,
                rank=dmem.llama_dmem_adapter_rank(handle),
                state_heads=dmem.llama_dmem_adapter_state_heads(handle),
                layers=tuple(dmem.llama_dmem_adapter_layer(handle, i) for i in range(n)),
                bundled=path.resolve() == self.model_path.resolve(),
                # as the loader parsed it: the file is read once per load
                write_granularity=WRITE_GRANULARITIES[dmem.llama_dmem_adapter_write_granularity(handle)],
                devices=tuple(dmem.llama_dmem_adapter_layer_device(handle, i).decode() for i in range(n)),
            )
            return self.adapter

    @property
    def scan(self) -> str | None:
        """How the attached adapter's scan runs now: ``"fused"`` or ``"standard"`` (None: no adapter)."""
        if not self._adapter:
            return None
        return "fused" if dmem.llama_dmem_get_scan(self._ctx) == SCAN_FUSED else "standard"

    @scan.setter
    def scan(self, scan: str) -> None:
        if not isinstance(scan, str) or scan not in SCANS[1:]:
            raise ArgumentError(f"scan must be 'fused' or 'standard', got {scan!r:.40}")
        with self._lock:
            self._check_open()
            if not self._adapter:
                raise EngineError("no δ-mem adapter is attached: there is no scan to choose")
            self._set_scan(scan, self.adapter.path)
            self._scan_wanted = scan

    def _set_scan(self, scan: str, path: Path | None) -> None:
        """Switch the native scan; a refusal (fused with δ-mem layers off the CPU) detaches nothing."""
        code = SCAN_FUSED if scan == "fused" else SCAN_STANDARD
        if dmem.llama_dmem_set_scan(self._ctx, code) != 0:
            raise AdapterError(dmem.last_error(), path=path, hint="use scan='standard' (or 'auto')")

    def detach(self) -> None:
        """Back to the vanilla model (the δ-states are dropped)."""
        with self._lock:
            if self._adapter:
                dmem.llama_dmem_attach(self._ctx, None)
                dmem.llama_dmem_adapter_free(self._adapter)
                self._adapter = None
                self.adapter = None

    # -- sessions --------------------------------------------------------------------------

    def session(self) -> Session:
        """A new conversation slot: empty KV cells and a zero δ-state."""
        with self._lock:
            self._check_open()
            if not self._free_seqs:
                raise EngineError(f"all {self.n_seq_max} sessions of this engine are in use",
                                  hint="close a session, or create the Engine with a larger n_seq_max")
            seq = self._free_seqs.pop()
            s = Session(self, seq)
            s.reset()
            return s

    def _release(self, seq: int) -> None:
        with self._lock:
            if self._ctx:
                llama_lib.llama_memory_seq_rm(llama_lib.llama_get_memory(self._ctx), seq, -1, -1)
                if self._adapter:
                    dmem.llama_dmem_state_reset(self._ctx, seq)
                self._free_seqs.append(seq)

    # -- batched decode --------------------------------------------------------------------

    @property
    def batcher(self) -> StepBatcher:
        """The engine's continuous-batching front for one-token feeds (``deltamem_edge.batching``)."""
        with self._lock:
            if self._batcher is None:
                from .batching import StepBatcher

                self._batcher = StepBatcher(self)
            return self._batcher

    @property
    def batches_sessions(self) -> bool:
        """True when ``step`` decodes several sessions in one llama_decode (see the module docstring)."""
        return self.n_seq_max > 1 and (not self.kv_unified or self._adapter is None)

    def step(self, tokens: Mapping[Session, int], *, write: bool = True) -> dict[Session, np.ndarray]:
        """Feed one token to each of several sessions at its next position; logits per session.

        Equal to ``{s: s.feed([t], write=write, logits="last")[0] for s, t in tokens.items()}``
        (the parity test holds it to 1e-4 of the float64 reference, states included), but in
        one llama_decode when ``batches_sessions``: a server's concurrent users cost one
        decode per step instead of one each.  Every session and token is checked before
        anything runs; on a refusal nothing has changed.  ``write`` applies to all of them
        (δ-mem writes are a per-call switch).  Returns float32 ``[n_vocab]`` per session.
        """
        write = check_bool("write", write)
        if not isinstance(tokens, Mapping):
            raise ArgumentError(f"tokens must be a mapping {{Session: token id}}, got {type(tokens).__name__}")
        with self._lock:
            self._check_open()
            items: list[tuple[Session, int]] = []
            for sess, tok in tokens.items():
                if not isinstance(sess, Session) or sess.engine is not self:
                    raise ArgumentError("every key of tokens must be a Session of this engine")
                sess._check()
                tok = check_int("token id", tok, low=0, high=self.n_vocab - 1)
                if sess.n_past + 1 > self.n_ctx_seq:
                    raise EngineError(f"context full: session {sess.seq} holds {sess.n_past} of {self.n_ctx_seq} "
                                      "positions", hint="drop old tokens with Session.drop_positions() or use a larger n_ctx")
                items.append((sess, tok))
            if len(items) <= 1 or not self.batches_sessions:
                return {sess: sess.feed([tok], write=write, logits="last")[0] for sess, tok in items}
            return self._decode_step(items, write)

    def _decode_step(self, items: list[tuple[Session, int]], write: bool) -> dict[Session, np.ndarray]:
        """One llama_decode holding one token of each session (all checked by ``step``)."""
        if self._step_batch is None:
            self._step_batch = llama_lib.llama_batch_init(self.n_seq_max, 0, 1)
        batch = self._step_batch
        for i, (sess, tok) in enumerate(items):
            batch.token[i] = tok
            batch.pos[i] = sess.n_past
            batch.n_seq_id[i] = 1
            batch.seq_id[i][0] = sess.seq
            batch.logits[i] = 1
        batch.n_tokens = len(items)
        if self._adapter:
            dmem.llama_dmem_set_write(self._ctx, write)
        _bindings.take_recent_errors()
        rc = llama_lib.llama_decode(self._ctx, batch)
        if rc != 0:
            raise EngineError(_bindings.with_last_error(f"llama_decode failed (code {rc})"),
                              hint="the KV cache may be full (code 1); try a larger n_ctx")
        out: dict[Session, np.ndarray] = {}
        for i, (sess, _) in enumerate(items):
            ptr = llama_lib.llama_get_logits_ith(self._ctx, i)
            out[sess] = np.ctypeslib.as_array(ptr, shape=(self.n_vocab,)).copy()
            sess.n_past += 1
            if write and self._adapter:
                sess.tokens_written += 1
        return out

    # -- tokens ----------------------------------------------------------------------------

    @property
    def has_tokenizer(self) -> bool:
        """False for GGUFs without a vocabulary (llama.cpp would abort when asked to tokenize)."""
        return llama_lib.llama_vocab_type(self._vocab) != llama_lib.LLAMA_VOCAB_TYPE_NONE

    def tokenize(self, text: str, *, add_special: bool = False, parse_special: bool = True) -> list[int]:
        if not self.has_tokenizer:
            raise EngineError("this model has no tokenizer (its GGUF carries no vocabulary)", path=self.model_path,
                              hint="feed token ids directly")
        data = text.encode("utf-8")
        n_max = len(data) + 16
        buf = (llama_lib.llama_token * n_max)()
        n = llama_lib.llama_tokenize(self._vocab, data, len(data), buf, n_max, add_special, parse_special)
        if n < 0:
            buf = (llama_lib.llama_token * -n)()
            n = llama_lib.llama_tokenize(self._vocab, data, len(data), buf, -n, add_special, parse_special)
        return list(buf[:n])

    def token_bytes(self, token: int, *, special: bool = False) -> bytes:
        buf = ctypes.create_string_buffer(64)
        n = llama_lib.llama_token_to_piece(self._vocab, token, buf, 64, 0, special)
        if n < 0:
            buf = ctypes.create_string_buffer(-n)
            n = llama_lib.llama_token_to_piece(self._vocab, token, buf, -n, 0, special)
        return buf.raw[:n]

    def detokenize(self, tokens: list[int], *, special: bool = False) -> str:
        return b"".join(self.token_bytes(t, special=special) for t in tokens).decode("utf-8", "replace")

    def is_eog(self, token: int) -> bool:
        return bool(llama_lib.llama_vocab_is_eog(self._vocab, token))

    def meta(self, key: str) -> str | None:
        """A GGUF metadata value of the model, as text (None if absent)."""
        buf = ctypes.create_string_buffer(1 << 16)
        n = llama_lib.llama_model_meta_val_str(self._model, key.encode(), buf, len(buf))
        if n < 0:
            return None
        if n >= len(buf):
            buf = ctypes.create_string_buffer(n + 1)
            llama_lib.llama_model_meta_val_str(self._model, key.encode(), buf, len(buf))
        return buf.value.decode("utf-8", "replace")

    def model_fingerprint(self) -> bytes:
        """sha256 of what makes a δ-state meaningful for a base model: shape and vocabulary."""
        h = hashlib.sha256()
        for key in ("general.architecture",):
            h.update((self.meta(key) or "").encode() + b"\0")
        for value in (llama_lib.llama_model_n_layer(self._model), llama_lib.llama_model_n_embd(self._model),
                      llama_lib.llama_model_n_head(self._model), llama_lib.llama_model_n_head_kv(self._model),
                      self.n_vocab):
            h.update(int(value).to_bytes(8, "little"))
        get_text = llama_lib.llama_vocab_get_text
        for t in range(self.n_vocab):
            h.update(get_text(self._vocab, t) or b"")
            h.update(b"\0")
        return h.digest()

    # -- lifetime --------------------------------------------------------------------------

    def _check_open(self) -> None:
        if not self._ctx:
            raise EngineError("this engine is closed")

    def close(self) -> None:
        with self._lock:
            if self._step_batch is not None:
                llama_lib.llama_batch_free(self._step_batch)
                self._step_batch = None
            if self._ctx:
                self.detach()
                llama_lib.llama_free(self._ctx)
                self._ctx = None
            if self._model:
                llama_lib.llama_model_free(self._model)
                self._model = None

    def __enter__(self) -> Engine:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:
        with contextlib.suppress(Exception):
            self.close()


def _strip_path(message: str, path: Path) -> str:
    """The C side prefixes the path; our error type adds it again."""
    prefix = f"{path}: "
    return message[len(prefix):] if message.startswith(prefix) else message
