"""`deltamem-edge bench-server`: the HTTP server under concurrent users, δ-mem against no adapter.

What is measured, per number of concurrent users U (default 1, 4, 8) and variant:

    dmem     the model + δ-mem adapter; every user has a memory (``X-Memory-Id``), so each
             reply is written into its state and the state file is saved after every turn
    vanilla  the same model without an adapter; stateless requests (a model without an
             adapter has no memory)

U client threads each send ``requests`` streaming chat completions one after another
(``stream_options.include_usage``, greedy, ``max_tokens``), after one untimed warm-up
request each.  Figures per phase: aggregate decode tokens/s (completion tokens of all
requests / wall time of the phase, first send to last byte), requests/s, time to first
token (send to the first content chunk) and the per-request decode rate (tokens after
the first / time after the first).  Rounds repeat every phase, the variant order
alternating; ratios δ-mem / no adapter are paired per round (median, min–max).

Why two server processes started by this module (``python -m deltamem_edge.bench.server
serve``) rather than ``deltamem-edge serve``: the CLI refuses a model without an adapter.
The entry below builds the same app (``server.app.create_app``, the same pool and
conversations, the same uvicorn settings) with or without one; both run at once, idle
while the other is measured.  Its KV cache is split per user so that users share decode
steps (``--no-batch``: the unified cache of ``deltamem-edge serve`` today).  The clients run in this process: on a 2-core machine they
take CPU from the server, so compare variants, not machines.  Each memory's ``turns`` is
checked against the requests sent to it at the end (a benchmark that lost turns would
measure the wrong thing).

Results: a JSON file per run in ``--out`` (default ``docs/bench/server-<date>-<commit>.json``)
and a table in ``docs/benchmarks.md`` between the ``server-bench`` markers.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as _dt
import json
import os
import re
import shlex
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from ..errors import DeltaMemError
from .plan import REPO_ROOT

VARIANTS = ("dmem", "vanilla")
VARIANT_LABELS = {"dmem": "δ-mem, a memory per user", "vanilla": "no adapter, stateless"}
DOC_BEGIN = "<!-- server-bench:begin -->"
DOC_END = "<!-- server-bench:end -->"
PROMPT = "User {user}, request {request}: write a long story about a lighthouse keeper and a storm."


@dataclass
class ServerPlan:
    """What one run measures."""

    model: Path
    adapter: Path
    label: str
    users: tuple[int, ...] = (1, 4, 8)
    requests: int = 4  # timed requests per user and phase
    max_tokens: int = 128
    rounds: int = 3
    threads: int = 2
    ctx_per_user: int = 1024
    n_gpu_layers: int = 0
    variants: tuple[str, ...] = VARIANTS
    batched: bool = True  # one llama_decode per step for all users (kv_unified=False); False: one per user

    def info(self) -> dict[str, Any]:
        return {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(self).items()}


@dataclass
class Sample:
    """One streamed request, as the client saw it."""

    ttft_s: float
    total_s: float
    tokens: int

    @property
    def decode_rate(self) -> float | None:
        after = self.total_s - self.ttft_s
        return (self.tokens - 1) / after if self.tokens > 1 and after > 0 else None


@dataclass
class Phase:
    """U users at once, ``requests`` each: the samples and the wall time."""

    users: int
    wall_s: float
    samples: list[Sample] = field(default_factory=list)

    def summary(self) -> dict[str, float]:
        tokens = sum(s.tokens for s in self.samples)
        ttft = sorted(s.ttft_s for s in self.samples)
        rates = [r for r in (s.decode_rate for s in self.samples) if r is not None]
        return {"tokens": tokens, "requests": len(self.samples), "wall_s": self.wall_s,
                "tok_s": tokens / self.wall_s, "req_s": len(self.samples) / self.wall_s,
                "ttft_ms_median": 1000 * statistics.median(ttft), "ttft_ms_p90": 1000 * ttft[(len(ttft) * 9) // 10],
                "decode_tok_s_per_request": statistics.median(rates) if rates else 0.0}


def _say(msg: str) -> None:
    print(f"[bench-server] {msg}", file=sys.stderr, flush=True)


def stats(xs: list[float]) -> dict[str, float]:
    return {"median": statistics.median(xs), "min": min(xs), "max": max(xs), "n": len(xs)} if xs else {}


# --------------------------------------------------------------------------------------------
# the server process
# --------------------------------------------------------------------------------------------


class ServerProc:
    """One server subprocess on 127.0.0.1 (a free port), stopped with SIGTERM."""

    def __init__(self, plan: ServerPlan, variant: str, memdir: Path, log: Path) -> None:
        n_seq = max(plan.users)
        cmd = [sys.executable, "-m", "deltamem_edge.bench.server", "serve", "--model", str(plan.model),
               "--memory-dir", str(memdir), "--parallel", str(n_seq), "--ctx-size", str(plan.ctx_per_user * n_seq),
               "--threads", str(plan.threads), "--gpu-layers", str(plan.n_gpu_layers)]
        if variant == "dmem":
            cmd += ["--adapter", str(plan.adapter)]
        if not plan.batched:
            cmd.append("--no-batch")
        self.variant = variant
        self.log = log
        self._logf = open(log, "w")  # noqa: SIM115 - closed in close()
        self.proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                                     env=dict(os.environ, PYTHONUNBUFFERED="1"))
        self.url = self._wait_for_port()

    def _wait_for_port(self) -> str:
        assert self.proc.stderr is not None
        found: list[str] = []
        ready = threading.Event()

        def pump() -> None:  # keeps draining stderr into the log, so the server never blocks on it
            assert self.proc.stderr is not None
            for line in self.proc.stderr:
                self._logf.write(line)
                self._logf.flush()
                if line.startswith("listening on "):
                    found.append(line.split()[-1])
                    ready.set()
            ready.set()

        threading.Thread(target=pump, daemon=True).start()
        ready.wait(600)
        if not found:
            self.close()
            raise DeltaMemError(f"the {self.variant} server did not start:\n{self.log.read_text()[-2000:]}")
        return found[0]

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._logf.close()


def serve_main(argv: list[str]) -> None:
    """The server under test: ``cli/serve.py``'s app and settings, with the adapter optional.

    By default the KV cache is split per user (``kv_unified=False``) so that concurrent users'
    tokens share one llama_decode per step (``deltamem_edge.batching``); ``--no-batch`` keeps the
    unified cache ``deltamem-edge serve`` uses today (one decode per user and token).
    """
    ap = argparse.ArgumentParser(prog="python -m deltamem_edge.bench.server serve")
    ap.add_argument("--model", type=Path, required=True)
    ap.add_argument("--adapter", type=Path)
    ap.add_argument("--memory-dir", type=Path, required=True)
    ap.add_argument("--parallel", type=int, default=8)
    ap.add_argument("--ctx-size", type=int, default=8192)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--gpu-layers", type=int, default=0)
    ap.add_argument("--no-batch", action="store_true", help="a unified KV cache: one llama_decode per user")
    ap.add_argument("--transcript-turns", type=int, default=8)
    args = ap.parse_args(argv)

    import uvicorn

    from ..conversation import Conversation
    from ..engine import Engine
    from ..server.app import ServerState, create_app
    from ..server.completion import SamplingDefaults
    from ..server.memories import MemoryPool
    from ..server.protocol import Limits

    per_seq = args.ctx_size // args.parallel
    engine = Engine(args.model, args.adapter if args.adapter else False, n_ctx=args.ctx_size,
                    n_threads=args.threads, n_gpu_layers=args.gpu_layers, n_seq_max=args.parallel,
                    kv_unified=args.no_batch)
    name = args.model.name.removesuffix(".gguf")

    def open_conversation(path: Path | None) -> Conversation:
        return Conversation(engine, path, system="", max_new_tokens=per_seq // 2, transcript_turns=args.transcript_turns,
                            context_limit=per_seq, model_label=name)

    args.memory_dir.mkdir(parents=True, exist_ok=True)
    pool = MemoryPool(args.memory_dir, args.parallel, open_conversation)
    state = ServerState(engine=engine, pool=pool, model_name=name, sampling=SamplingDefaults(temp=0.0),
                        limits=Limits(max_tokens=per_seq, default_max_tokens=per_seq // 2))

    class _Server(uvicorn.Server):
        def handle_exit(self, sig: int, frame: object) -> None:
            state.stop_all()
            super().handle_exit(sig, frame)

        async def startup(self, sockets: list | None = None) -> None:
            await super().startup(sockets)
            for server in self.servers if self.started else ():
                for sock in server.sockets:
                    host, port = sock.getsockname()[:2]
                    print(f"listening on http://{host}:{port}", file=sys.stderr, flush=True)

    config = uvicorn.Config(create_app(state), host="127.0.0.1", port=0, log_level="warning", access_log=False,
                            timeout_graceful_shutdown=10, lifespan="on")
    _Server(config).run()


# --------------------------------------------------------------------------------------------
# the clients
# --------------------------------------------------------------------------------------------


def stream_request(client: Any, url: str, body: dict[str, Any], headers: dict[str, str]) -> Sample:
    """One streamed completion; the usage chunk gives the token count (the server's own tokenizer)."""
    t0 = time.perf_counter()
    first: float | None = None
    usage: dict[str, int] | None = None
    with client.stream("POST", f"{url}/v1/chat/completions", json=body, headers=headers, timeout=600) as r:
        if r.status_code != 200:
            r.read()
            raise DeltaMemError(f"the server answered {r.status_code}: {r.text[:300]}")
        for line in r.iter_lines():
            if not line.startswith("data: "):
                continue
            data = line[len("data: "):]
            if data == "[DONE]":
                break
            chunk = json.loads(data)
            if "error" in chunk:
                raise DeltaMemError(f"the server failed mid-stream: {chunk['error'].get('message')}")
            if chunk.get("usage"):
                usage = chunk["usage"]
            choices = chunk.get("choices") or []
            if first is None and choices and choices[0].get("delta", {}).get("content"):
                first = time.perf_counter()
    end = time.perf_counter()
    if usage is None:
        raise DeltaMemError("the stream carried no usage chunk")
    return Sample(ttft_s=(first or end) - t0, total_s=end - t0, tokens=int(usage["completion_tokens"]))


class Users:
    """The request bodies and headers of user ``i`` (a memory id in the δ-mem variant)."""

    def __init__(self, variant: str, max_tokens: int) -> None:
        self.variant = variant
        self.max_tokens = max_tokens
        self.sent: dict[str, int] = {}  # memory id -> requests sent to it
        self._counter = 0
        self._lock = threading.Lock()

    def request(self, user: int) -> tuple[dict[str, Any], dict[str, str]]:
        with self._lock:
            self._counter += 1
            n = self._counter
            memory = f"bench-user-{user}" if self.variant == "dmem" else None
            if memory:
                self.sent[memory] = self.sent.get(memory, 0) + 1
        body = {"model": "bench", "messages": [{"role": "user", "content": PROMPT.format(user=user, request=n)}],
                "max_tokens": self.max_tokens, "temperature": 0, "stream": True,
                "stream_options": {"include_usage": True}}
        return body, ({"X-Memory-Id": memory} if memory else {})


def run_phase(url: str, users: Users, n_users: int, requests: int) -> Phase:
    """``n_users`` threads at once, each one untimed warm-up request then ``requests`` timed ones."""
    import httpx

    samples: list[Sample] = []
    errors: list[BaseException] = []
    lock = threading.Lock()
    start = threading.Barrier(n_users + 1)
    done = threading.Barrier(n_users + 1)

    def user(i: int) -> None:
        with httpx.Client() as client:
            try:
                stream_request(client, url, *users.request(i))  # opens the memory, warms the connection
                start.wait()
                for _ in range(requests):
                    s = stream_request(client, url, *users.request(i))
                    with lock:
                        samples.append(s)
            except BaseException as exc:  # noqa: BLE001 - reported below
                errors.append(exc)
                start.abort()
            finally:
                with_abort(done)

    threads = [threading.Thread(target=user, args=(i,), daemon=True) for i in range(n_users)]
    for t in threads:
        t.start()
    with_abort(start)
    t0 = time.perf_counter()
    with_abort(done)
    wall = time.perf_counter() - t0
    for t in threads:
        t.join()
    if errors:
        raise DeltaMemError(f"a benchmark client failed: {errors[0]}")
    return Phase(users=n_users, wall_s=wall, samples=samples)


def with_abort(barrier: threading.Barrier) -> None:
    """Wait at a barrier that a failing thread may have broken."""
    with contextlib.suppress(threading.BrokenBarrierError):
        barrier.wait()


def memory_turns(url: str, ids: list[str]) -> dict[str, int]:
    import httpx

    return {m: int(httpx.get(f"{url}/v1/memories/{m}", timeout=60).json()["turns"]) for m in ids}


# --------------------------------------------------------------------------------------------
# a run
# --------------------------------------------------------------------------------------------


def run(plan: ServerPlan, *, workdir: Path) -> dict[str, Any]:
    """Measure every (round, users, variant); returns the result document (also the JSON file)."""
    from .machine import machine_info

    t_start = time.perf_counter()
    result: dict[str, Any] = {"kind": "server", "machine": machine_info(plan.threads), "plan": plan.info(),
                              "rounds": []}
    servers: dict[str, ServerProc] = {}
    users = {v: Users(v, plan.max_tokens) for v in plan.variants}
    try:
        for v in plan.variants:
            _say(f"starting the {v} server ({VARIANT_LABELS[v]})")
            servers[v] = ServerProc(plan, v, workdir / f"memories-{v}", workdir / f"server-{v}.log")
        for r in range(plan.rounds):
            order = list(plan.variants) if r % 2 == 0 else list(reversed(plan.variants))
            rnd: dict[str, dict[str, Any]] = {v: {} for v in plan.variants}
            for n in plan.users:
                for v in order:
                    s = run_phase(servers[v].url, users[v], n, plan.requests).summary()
                    rnd[v][str(n)] = s
                    _say(f"round {r + 1}/{plan.rounds} · {n} users · {v}: {s['tok_s']:.1f} tok/s, "
                         f"{s['req_s']:.2f} req/s, TTFT {s['ttft_ms_median']:.0f} ms")
            result["rounds"].append(rnd)
        if "dmem" in servers:  # every turn reached its memory: the δ-mem variant measured what it claims
            sent = users["dmem"].sent
            turns = memory_turns(servers["dmem"].url, sorted(sent))
            if turns != sent:
                raise DeltaMemError(f"memories lost turns under load: sent {sent}, saved {turns}")
            result["memory_turns"] = turns
    finally:
        for s in servers.values():
            s.close()
    result["summary"] = summarize(result["rounds"], plan)
    result["total_s"] = time.perf_counter() - t_start
    return result


def summarize(rounds: list[dict[str, dict[str, Any]]], plan: ServerPlan) -> dict[str, Any]:
    """Median (min–max) over rounds per (users, variant), and δ-mem / no-adapter ratios paired per round."""
    out: dict[str, Any] = {}
    for n in (str(u) for u in plan.users):
        row: dict[str, Any] = {}
        for v in plan.variants:
            row[v] = {k: stats([rnd[v][n][k] for rnd in rounds]) for k in
                      ("tok_s", "req_s", "ttft_ms_median", "ttft_ms_p90", "decode_tok_s_per_request")}
        if set(VARIANTS) <= set(plan.variants):
            row["dmem_over_vanilla_tok_s"] = stats([rnd["dmem"][n]["tok_s"] / rnd["vanilla"][n]["tok_s"]
                                                    for rnd in rounds])
        out[n] = row
    first = str(plan.users[0])
    for v in plan.variants:  # aggregate rate at U users over the rate at the first (single-user) phase
        for n in out:
            out[n][v]["scaling"] = stats([rnd[v][n]["tok_s"] / rnd[v][first]["tok_s"] for rnd in rounds])
    return out


# --------------------------------------------------------------------------------------------
# the document
# --------------------------------------------------------------------------------------------


def _rng(st: dict[str, float], fmt: str = "{:.1f}") -> str:
    if not st:
        return "–"
    if st["n"] == 1:
        return fmt.format(st["median"])
    return f"{fmt.format(st['median'])} ({fmt.format(st['min'])}–{fmt.format(st['max'])})"


def render(result: dict[str, Any], json_link: str) -> str:
    """The markdown block that goes between the markers of docs/benchmarks.md."""
    m, p = result["machine"], result["plan"]
    commit = f"{m.get('commit') or 'no commit'}{' (dirty tree)' if m.get('dirty') else ''}"
    lines = [
        f"### {m['date'][:16].replace('T', ' ')}, commit {commit}, {p['label']}",
        "",
        f"{p['rounds']} rounds · {p['requests']} streamed requests per user and phase after one warm-up · "
        f"max_tokens {p['max_tokens']}, greedy · "
        f"{'batched decode (one llama_decode per step)' if p.get('batched', True) else 'one decode per user'} · "
        f"{p['threads']} threads · {p['ctx_per_user']} context tokens per "
        f"user · {m['cores']} cores ({m['cpu']}) · load at start {m['loadavg_start'][0]:.2f} · "
        f"[raw]({json_link})",
        "",
        f"| users | variant | aggregate tok/s | × {p['users'][0]} user{'s' if p['users'][0] > 1 else ''} "
        "| requests/s | TTFT median ms | TTFT p90 ms "
        "| tok/s per request | δ-mem / no adapter (tok/s) |",
        "|---:|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for n, row in result["summary"].items():
        ratio = row.get("dmem_over_vanilla_tok_s")
        for i, v in enumerate(p["variants"]):
            s = row[v]
            lines.append(f"| {n} | {VARIANT_LABELS[v]} | {_rng(s['tok_s'])} | {_rng(s['scaling'], '{:.2f}')} | "
                         f"{_rng(s['req_s'], '{:.2f}')} | {_rng(s['ttft_ms_median'], '{:.0f}')} | "
                         f"{_rng(s['ttft_ms_p90'], '{:.0f}')} | {_rng(s['decode_tok_s_per_request'])} | "
                         f"{_rng(ratio, '{:.3f}') if ratio and i == 0 else ''} |")
    lines += ["", f"Command: `{result.get('command', '')}`"]
    return "\n".join(lines)


def update_doc(doc: Path, block: str) -> None:
    """Put ``block`` between the server-bench markers (appending a section with them when missing)."""
    text = doc.read_text() if doc.exists() else "# Benchmarks\n"
    section = f"{DOC_BEGIN}\n{block}\n{DOC_END}"
    if DOC_BEGIN in text and DOC_END in text:
        text = re.sub(re.escape(DOC_BEGIN) + r".*?" + re.escape(DOC_END), lambda _: section, text, count=1,
                      flags=re.S)
    else:
        text = text.rstrip("\n") + "\n\n## Server: concurrent users (`deltamem-edge bench-server`)\n\n" + section + "\n"
    doc.write_text(text)


def main(plan: ServerPlan, *, out_dir: Path | None = None, doc: Path | None = None) -> dict[str, Any]:
    """Run, write ``out_dir/server-<stamp>-<commit>.json`` and the table into ``doc``."""
    out_dir = out_dir or REPO_ROOT / "docs" / "bench"
    if doc is None:
        default = out_dir.resolve() == (REPO_ROOT / "docs" / "bench").resolve()
        doc = REPO_ROOT / "docs" / "benchmarks.md" if default else out_dir / "benchmarks.md"
    out_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="deltamem-bench-server-") as tmp:
        result = run(plan, workdir=Path(tmp))
    result["command"] = "deltamem-edge " + " ".join(shlex.quote(a) for a in sys.argv[1:])
    stamp = _dt.datetime.now().strftime("%Y%m%d-%H%M%S")  # one file per run, never overwritten
    path = out_dir / f"server-{stamp}-{result['machine']['commit'] or 'nocommit'}.json"
    path.write_text(json.dumps(result, indent=1, default=str))
    link = os.path.relpath(path.resolve(), doc.parent.resolve())
    update_doc(doc, render(result, link))
    _say(f"wrote {path} and {doc} ({result['total_s'] / 60:.1f} min)")
    return result


if __name__ == "__main__":
    if sys.argv[1:2] != ["serve"]:
        sys.exit("usage: python -m deltamem_edge.bench.server serve --model M [--adapter A] --memory-dir D ...")
    serve_main(sys.argv[2:])
