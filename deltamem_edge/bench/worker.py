"""One benchmark variant in its own process: loads one libllama, one model, then measures on request.

Why a process per variant: a process can load only one libllama, and variant (a)
is the *stock* library.  The worker therefore uses only llama-cpp-python's
low-level ctypes API (``llama_cpp.llama_cpp``) for model, context, batch and
decode, on whatever library ``LLAMA_CPP_LIB_PATH`` names, and binds the δ-mem C
functions itself (the one table, ``native/c_api.py``), only when an adapter is
requested.  It never imports ``deltamem_edge._bindings`` or ``deltamem_edge.engine`` (those pick the patched
library), so a stock worker really runs stock llama.cpp: ``load`` reports whether
the loaded library has any ``llama_dmem_*`` symbol.

Protocol (``serve``): one JSON object per line on stdin, one JSON reply per line
on the original stdout (C code that prints goes to stderr).  Commands:

    {"cmd": "load", "model": path, "adapter": path|null, "threads": 2, "n_ctx": 2304, "n_batch": 512}
    {"cmd": "decode", "prompt": 128, "n": 128, "seed": 1, "write": true}   prefill then n single steps
    {"cmd": "prefill", "n": 2048, "chunk": 512, "seed": 1, "write": true, "probe": false}
    {"cmd": "statecost", "reps": 50, "dir": path}   δ-state save/load latency and bytes
    {"cmd": "seqsize", "lengths": [512, 2048, 8192], "seed": 9}  llama.cpp sequence state vs ours
    {"cmd": "rss"} / {"cmd": "quit"}

Other entry points: ``quantize SRC DST --ftype Q4_K_M --threads N`` and
``oneshot JSON`` (load, warm up, prefill, a few decode steps: run under callgrind
with ``--toggle-collect=llama_decode --dump-after=llama_decode``).
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import resource
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from deltamem_edge.native.c_api import bind

FTYPES = {"Q4_0": 2, "Q4_1": 3, "Q8_0": 7, "Q4_K_M": 15, "Q5_K_M": 17, "Q6_K": 18}


class WorkerError(RuntimeError):
    pass


def _llama():
    from llama_cpp import llama_cpp as L  # the library chosen by LLAMA_CPP_LIB_PATH

    return L


def loaded_library() -> str | None:
    """Path of the libllama mapped into this process (from /proc/self/maps)."""
    try:
        with open("/proc/self/maps") as f:
            for line in f:
                if "libllama" in line and "/" in line:
                    return line[line.index("/"):].strip()
    except OSError:
        pass
    return None


def _ptr(x: Any) -> int:
    return ctypes.cast(x, ctypes.c_void_p).value or 0


class Worker:
    def __init__(self) -> None:
        self.L = None
        self.model = None
        self.ctx = None
        self.dmem: dict[str, Any] | None = None
        self.adapter = None
        self.write = True

    # -- setup -----------------------------------------------------------------------------

    def _quiet(self) -> None:
        L = self.L

        @L.llama_log_callback
        def _cb(level: int, text: bytes, _ud: ctypes.c_void_p) -> None:
            if os.environ.get("DELTAMEM_VERBOSE") and text:
                sys.stderr.write(text.decode("utf-8", "replace"))

        self._log_cb = _cb  # keep alive
        L.llama_log_set(_cb, ctypes.c_void_p(0))

    def _make_ctx(self, n_ctx: int, n_batch: int, n_ubatch: int | None = None):  # noqa: ANN202
        L = self.L
        cp = L.llama_context_default_params()
        cp.n_ctx = n_ctx
        cp.n_batch = n_batch
        cp.n_ubatch = min(n_ubatch or n_batch, n_batch)
        cp.n_seq_max = 1
        cp.n_threads = self.threads
        cp.n_threads_batch = self.threads
        cp.no_perf = True
        ctx = L.llama_init_from_model(self.model, cp)
        if not ctx:
            raise WorkerError(f"could not create a context (n_ctx {n_ctx})")
        return ctx

    def load(self, model: str, adapter: str | None = None, threads: int = 2, n_ctx: int = 2304,
             n_batch: int = 512, n_ubatch: int | None = None, n_gpu_layers: int = 0, **_: Any) -> dict:
        self.L = L = _llama()
        self._quiet()
        L.llama_backend_init()
        lib = L._lib
        has_dmem = hasattr(lib, "llama_dmem_api_version")
        self.threads = threads
        self.n_batch = n_batch
        mp = L.llama_model_default_params()
        mp.n_gpu_layers = n_gpu_layers
        t0 = time.perf_counter()
        self.model = L.llama_model_load_from_file(model.encode(), mp)
        if not self.model:
            raise WorkerError(f"could not load {model}")
        self.ctx = self._make_ctx(n_ctx, n_batch, n_ubatch)
        load_s = time.perf_counter() - t0
        self.n_vocab = L.llama_vocab_n_tokens(L.llama_model_get_vocab(self.model))
        self.batch = L.llama_batch_init(n_batch, 0, 1)
        info: dict[str, Any] = {"lib": loaded_library(), "dmem_symbols": has_dmem, "n_vocab": self.n_vocab,
                                "n_ctx": L.llama_n_ctx(self.ctx), "load_s": load_s,
                                "python_modules_ours": sorted(m for m in sys.modules if m.startswith("deltamem_edge"))}
        if adapter:
            if not has_dmem:
                raise WorkerError("an adapter was requested but this libllama has no δ-mem API")
            self.dmem = bind(lib)
            d = self.dmem
            self.adapter = d["llama_dmem_adapter_init"](_ptr(self.model), adapter.encode())
            if not self.adapter:
                raise WorkerError(f"adapter: {d['llama_dmem_last_error']().decode()}")
            if d["llama_dmem_attach"](_ptr(self.ctx), self.adapter) != 0:
                raise WorkerError(f"attach: {d['llama_dmem_last_error']().decode()}")
            info["adapter"] = {"rank": d["llama_dmem_adapter_rank"](self.adapter),
                               "layers": d["llama_dmem_adapter_n_layers"](self.adapter),
                               "state_heads": d["llama_dmem_adapter_state_heads"](self.adapter),
                               "state_floats": d["llama_dmem_state_n_floats"](_ptr(self.ctx))}
        return info

    # -- feeding ---------------------------------------------------------------------------

    def _tokens(self, seed: int, n: int) -> np.ndarray:
        return np.random.default_rng(seed).integers(0, self.n_vocab, n, dtype=np.int64)

    def _reset(self, ctx=None) -> None:  # noqa: ANN001
        ctx = ctx or self.ctx
        self.L.llama_memory_clear(self.L.llama_get_memory(ctx), True)
        if self.dmem:
            self.dmem["llama_dmem_state_reset"](_ptr(ctx), -1)

    def _set_write(self, write: bool) -> None:
        if self.dmem and write != self.write:
            self.dmem["llama_dmem_set_write"](_ptr(self.ctx), bool(write))
            self.write = write

    def _decode(self, ctx, ids: np.ndarray, pos0: int, logits_last: bool) -> None:  # noqa: ANN001
        b = self.batch
        n = int(ids.size)
        if not 0 < n <= self.n_batch:
            raise WorkerError(f"{n} tokens do not fit a batch of {self.n_batch}")
        for i in range(n):
            b.token[i] = int(ids[i])
            b.pos[i] = pos0 + i
            b.n_seq_id[i] = 1
            b.seq_id[i][0] = 0
            b.logits[i] = 0
        if logits_last:
            b.logits[n - 1] = 1
        b.n_tokens = n
        rc = self.L.llama_decode(ctx, b)
        if rc != 0:
            raise WorkerError(f"llama_decode returned {rc}")

    def _feed(self, ctx, ids: np.ndarray, pos0: int, logits_last: bool) -> None:  # noqa: ANN001
        """ids in calls of at most n_batch tokens."""
        for start in range(0, int(ids.size), self.n_batch):
            part = ids[start:start + self.n_batch]
            self._decode(ctx, part, pos0 + start, logits_last and start + part.size == ids.size)

    def _seq_bytes(self, ctx=None) -> int:  # noqa: ANN001
        return int(self.L.llama_state_seq_get_size(ctx or self.ctx, 0))

    def prefill(self, n: int, chunk: int = 512, seed: int = 1, write: bool = True, probe: bool = False,
                **_: Any) -> dict:
        """Prefill n tokens in chunks of `chunk` (one llama_decode each, chunk <= n_batch), logits of the last token.

        Returns the cumulative wall and CPU time at the end of every chunk, so that one
        2048-token prefill also gives the 512-token figure (its first chunk is exactly a
        512-token prompt).
        """
        self._set_write(write)
        self._reset()
        ids = self._tokens(seed, n)
        marks = []
        probes = {}
        wall = cpu = 0.0
        for start in range(0, n, chunk):
            part = ids[start:start + chunk]
            t0, c0 = time.perf_counter(), time.process_time()
            self._decode(self.ctx, part, start, logits_last=True)
            wall += time.perf_counter() - t0
            cpu += time.process_time() - c0
            end = start + part.size
            marks.append({"tokens": end, "wall_s": wall, "cpu_s": cpu})
            if probe:
                probes[str(end)] = self._seq_bytes()
        out: dict[str, Any] = {"marks": marks}
        if probe:
            out["seq_state_bytes"] = probes
        return out

    def decode(self, prompt: int = 128, n: int = 128, seed: int = 1, write: bool = True, **_: Any) -> dict:
        """Prefill `prompt` tokens (timed), then n single-token steps with logits (timed)."""
        self._set_write(write)
        self._reset()
        ids = self._tokens(seed, prompt + n)
        t0, c0 = time.perf_counter(), time.process_time()
        self._feed(self.ctx, ids[:prompt], 0, logits_last=True)
        t1, c1 = time.perf_counter(), time.process_time()
        for i in range(n):
            self._decode(self.ctx, ids[prompt + i:prompt + i + 1], prompt + i, logits_last=True)
        t2, c2 = time.perf_counter(), time.process_time()
        return {"prefill_wall_s": t1 - t0, "prefill_cpu_s": c1 - c0, "decode_wall_s": t2 - t1,
                "decode_cpu_s": c2 - c1, "prompt": prompt, "n": n}

    # -- state -----------------------------------------------------------------------------

    def statecost(self, reps: int = 50, dir: str | None = None, fill: int = 256, **_: Any) -> dict:  # noqa: A002
        """Latency (µs, median and min–max) and bytes of saving and loading one δ-state.

        Parts: native get (llama_dmem_state_get into a numpy array), encode (statefile
        format, sha256 included), file (atomic write with fsync via MemoryFile.save);
        load: file read + validation + decode (MemoryFile.load), native set.
        """
        if not self.dmem:
            raise WorkerError("statecost needs an adapter")
        from .. import statefile as sf

        d = self.dmem
        self._set_write(True)
        self._reset()
        self._feed(self.ctx, self._tokens(99, fill), 0, logits_last=True)  # a non-zero state
        n = int(d["llama_dmem_state_n_floats"](_ptr(self.ctx)))
        layers = d["llama_dmem_adapter_n_layers"](self.adapter)
        rank = d["llama_dmem_adapter_rank"](self.adapter)
        heads = d["llama_dmem_adapter_state_heads"](self.adapter)
        shape = (layers, rank * heads, rank)
        buf = np.empty(shape, np.float32)
        fptr = buf.ctypes.data_as(ctypes.POINTER(ctypes.c_float))
        fp_a, fp_m = bytes(32), bytes(range(32))
        times: dict[str, list[float]] = {k: [] for k in ("get", "encode", "file_save", "file_load", "decode", "set",
                                                          "save_total", "load_total", "save_mem", "load_mem")}
        tmpdir = tempfile.mkdtemp(prefix="dmem-bench-", dir=dir)
        path = Path(tmpdir) / "bench.state"
        pc = time.perf_counter_ns
        file_bytes = 0
        try:
            with sf.MemoryFile(path) as mf:
                for _ in range(reps):
                    t0 = pc()
                    if d["llama_dmem_state_get"](_ptr(self.ctx), 0, fptr, n) != 0:
                        raise WorkerError(d["llama_dmem_last_error"]().decode())
                    t1 = pc()
                    mem = sf.MemoryState.new(adapter_fp=fp_a, model_fp=fp_m, state=buf, state_heads=heads)
                    data = sf.encode(mem)
                    t2 = pc()
                    mf.save(mem)  # encodes again inside; time the file part as save - encode
                    t3 = pc()
                    loaded = mf.load()
                    t4 = pc()
                    dec = sf.decode(data, path=path)
                    t5 = pc()
                    arr = np.ascontiguousarray(loaded.state, dtype=np.float32)
                    if d["llama_dmem_state_set"](_ptr(self.ctx), 0, arr.ctypes.data_as(ctypes.POINTER(ctypes.c_float)),
                                                 n) != 0:
                        raise WorkerError(d["llama_dmem_last_error"]().decode())
                    t6 = pc()
                    assert dec.state.shape == shape
                    us = lambda a, b: (b - a) / 1e3  # noqa: E731
                    times["get"].append(us(t0, t1))
                    times["encode"].append(us(t1, t2))
                    times["file_save"].append(max(0.0, us(t2, t3) - us(t1, t2)))
                    times["file_load"].append(max(0.0, us(t3, t4) - us(t4, t5)))
                    times["decode"].append(us(t4, t5))
                    times["set"].append(us(t5, t6))
                    times["save_total"].append(us(t0, t1) + us(t2, t3))  # get + (encode + atomic write + fsync)
                    times["load_total"].append(us(t3, t4) + us(t5, t6))  # (read + validate + decode) + set
                    times["save_mem"].append(us(t0, t2))  # get + encode, no file
                    times["load_mem"].append(us(t4, t5) + us(t5, t6))  # decode + set, no file
                file_bytes = path.stat().st_size
                # round trip is exact
                back = np.empty(shape, np.float32)
                d["llama_dmem_state_get"](_ptr(self.ctx), 0, back.ctypes.data_as(ctypes.POINTER(ctypes.c_float)), n)
                exact = bool(np.array_equal(back, buf))
        finally:
            for p in Path(tmpdir).iterdir():
                p.unlink()
            os.rmdir(tmpdir)
        return {"us": times, "state_floats": n, "state_bytes": 4 * n, "encoded_bytes": len(data),
                "file_bytes": file_bytes, "shape": list(shape), "roundtrip_exact": exact}

    def seqsize(self, lengths: list[int], seed: int = 9, chunk: int = 512, **_: Any) -> dict:
        """For one conversation grown to each length: llama_state_seq_get_size and get_data time.

        Uses a fresh context as long as the longest length (the timing context stays).
        """
        L = self.L
        n_max = max(lengths)
        ctx = self._make_ctx(n_max + 256, self.n_batch) if n_max > L.llama_n_ctx(self.ctx) else self.ctx
        try:
            if ctx is not self.ctx and self.dmem and self.dmem["llama_dmem_attach"](_ptr(ctx), self.adapter) != 0:
                raise WorkerError(self.dmem["llama_dmem_last_error"]().decode())
            self._reset(ctx)
            ids = self._tokens(seed, n_max)
            out: dict[str, Any] = {}
            pos = 0
            t0 = time.perf_counter()
            for target in sorted(lengths):
                while pos < target:
                    part = ids[pos:min(target, pos + min(chunk, self.n_batch))]
                    self._decode(ctx, part, pos, logits_last=False)
                    pos += part.size
                size = self._seq_bytes(ctx)
                entry: dict[str, Any] = {"seq_state_bytes": size}
                if size <= 1 << 30:
                    buf = (ctypes.c_uint8 * size)()
                    t = time.perf_counter_ns()
                    got = L.llama_state_seq_get_data(ctx, buf, size, 0)
                    entry["seq_get_data_us"] = (time.perf_counter_ns() - t) / 1e3
                    entry["seq_get_data_bytes"] = int(got)
                    del buf
                out[str(target)] = entry
            out["feed_s"] = time.perf_counter() - t0
            return out
        finally:
            if ctx is not self.ctx:
                if self.dmem:
                    self.dmem["llama_dmem_attach"](_ptr(ctx), None)
                L.llama_free(ctx)

    def rss(self, **_: Any) -> dict:
        ru = resource.getrusage(resource.RUSAGE_SELF)
        st = {}
        try:
            with open("/proc/self/status") as f:
                for line in f:
                    k, _, v = line.partition(":")
                    if k in ("VmHWM", "VmRSS", "RssFile", "RssAnon"):
                        st[k] = int(v.split()[0]) * 1024
        except OSError:
            pass
        return {"maxrss_bytes": ru.ru_maxrss * 1024, **st, "cpu_user_s": ru.ru_utime, "cpu_sys_s": ru.ru_stime}

    def close(self) -> None:
        if self.ctx:
            if self.dmem:
                self.dmem["llama_dmem_attach"](_ptr(self.ctx), None)
            self.L.llama_free(self.ctx)
            self.ctx = None
        if self.model:
            self.L.llama_model_free(self.model)
            self.model = None


# --------------------------------------------------------------------------------------------
# entry points
# --------------------------------------------------------------------------------------------


def serve() -> int:
    out = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)  # anything C prints goes to stderr, never into the protocol
    w = Worker()
    for line in sys.stdin:
        line = line.strip()
        if not line:
            continue
        try:
            req = json.loads(line)
            cmd = req.pop("cmd")
            if cmd == "quit":
                w.close()
                out.write(json.dumps({"ok": True}) + "\n")
                return 0
            fn = {"load": w.load, "prefill": w.prefill, "decode": w.decode, "statecost": w.statecost,
                  "seqsize": w.seqsize, "rss": w.rss}.get(cmd)
            if fn is None:
                raise WorkerError(f"unknown command {cmd!r}")
            reply = {"ok": True, "result": fn(**req)}
        except Exception as e:  # reported to the parent, which decides
            reply = {"ok": False, "error": f"{type(e).__name__}: {e}"}
        out.write(json.dumps(reply) + "\n")
    w.close()
    return 0


def oneshot(spec: dict) -> dict:
    """For callgrind: load, warm up, then prefill `prefill` tokens in one call and `steps` decode steps.

    Every llama_decode is one callgrind dump (--dump-after=llama_decode): dump 1 is
    the warm-up, dump 2 the prefill, dumps 3.. the decode steps.
    """
    w = Worker()
    n_pre = int(spec.get("prefill", 512))
    w.load(spec["model"], spec.get("adapter"), threads=int(spec.get("threads", 1)), n_ctx=max(512, n_pre + 64),
           n_batch=max(n_pre, 8), n_ubatch=max(n_pre, 8))
    w._decode(w.ctx, w._tokens(5, 8), 0, logits_last=True)  # warm-up (dump 1)
    w._reset()
    ids = w._tokens(7, n_pre + int(spec.get("steps", 3)))
    w._decode(w.ctx, ids[:n_pre], 0, logits_last=True)  # prefill (dump 2)
    for i in range(int(spec.get("steps", 3))):
        w._decode(w.ctx, ids[n_pre + i:n_pre + i + 1], n_pre + i, logits_last=True)
    w.close()
    return {"ok": True}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m deltamem_edge.bench.worker")
    sub = ap.add_subparsers(dest="what", required=True)
    sub.add_parser("serve")
    q = sub.add_parser("quantize")
    q.add_argument("src")
    q.add_argument("dst")
    q.add_argument("--ftype", default="Q4_K_M", choices=sorted(FTYPES))
    q.add_argument("--threads", type=int, default=2)
    o = sub.add_parser("oneshot")
    o.add_argument("spec")
    args = ap.parse_args(argv)
    if args.what == "serve":
        return serve()
    if args.what == "oneshot":
        oneshot(json.loads(args.spec))
        return 0
    L = _llama()
    L.llama_backend_init()
    p = L.llama_model_quantize_default_params()
    p.nthread = args.threads
    p.ftype = FTYPES[args.ftype]
    rc = L.llama_model_quantize(args.src.encode(), args.dst.encode(), ctypes.byref(p))
    return 0 if rc == 0 else 1


if __name__ == "__main__":
    raise SystemExit(main())
