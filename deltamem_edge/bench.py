"""`deltamem-edge bench`: stock llama.cpp vs our patched library vs δ-mem, side by side.

Variants ("slots"), each a worker process (``bench_worker``) that loads its model once:

    a   stock llama.cpp (same pinned commit and flags, no patch), llama-cpp-python's own API
    b   our patched library, no adapter attached
    b2  a second, identical b process: b2/b is the A/A noise band of this machine and run
    c   patched + δ-mem adapter, writes on     (c and d share one process; writes toggled)
    d   patched + δ-mem adapter, writes off

Why it is built this way: on these 2-core VMs two identical processes differ by
±10-20 % in wall time (shared/design/build-and-models.md, "Measurement noise").  So
every figure is measured in rounds, the variants alternate inside each round with an
order that rotates and reverses from task to task (A B C D, D C B A, …), ratios are
taken per round (paired) and reported as median and min–max, next to the A/A band,
and the small ratios are backed by instruction counts (callgrind; ``perf`` has no
hardware counters in these VMs), which do not depend on what else runs.

Tasks per round and slot: "D" = prefill 128 tokens then 128 single-token decode
steps (prefill-128 and decode figures); "P" = prefill 2048 tokens in 512-token
llama_decode calls (its first call is exactly a 512-token prefill: the 512 figure;
the total is the 2048 figure).  Logits are computed for the same tokens in every
variant (last token of each call, every decode step).
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import platform
import re
import shlex
import shutil
import statistics
import struct
import subprocess
import sys
import time
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import DeltaMemError

REPO_ROOT = Path(__file__).resolve().parent.parent
SLOT_LABELS = {
    "a": "a: stock llama.cpp",
    "b": "b: patched, no adapter",
    "b2": "b2: patched, no adapter (A/A twin)",
    "c": "c: δ-mem, writes on",
    "d": "d: δ-mem, writes off",
}
SLOT_WORKER = {"a": "a", "b": "b", "b2": "b2", "c": "cd", "d": "cd"}
RATIOS = (("c", "b"), ("d", "b"), ("b", "a"), ("b2", "b"))  # time ratios, > 1 = slower
METRICS = ("prefill_128", "prefill_512", "prefill_2048", "decode_128")


@dataclass
class Plan:
    """What one run measures; the defaults are the full spec, tests shrink them."""

    models: list[str]
    reps: int = 5
    threads: int = 2
    n_gpu_layers: int = 0  # -1: everything on the GPU (needs a GPU build, DELTAMEM_BACKEND=cuda|metal)
    slots: tuple[str, ...] = ("a", "b", "b2", "c", "d")
    prompt: int = 128  # D task: prefill length
    decode: int = 128  # D task: decode steps
    prefill: int = 2048  # P task: total length
    chunk: int = 512  # P task: tokens per llama_decode (the 512 figure)
    seq_lengths: tuple[int, ...] = (512, 2048, 8192)  # measured in one conversation
    seq_lengths_for: dict[str, tuple[int, ...]] = field(default_factory=dict)  # per-model override
    statecost_reps: int = 50
    callgrind: bool = True
    callgrind_prefill: dict[str, int] = field(default_factory=dict)  # model -> prefill length (0: decode only)
    budget_s: float | None = None  # stop after the round that would overrun (at least 3 rounds)
    profile: str = "custom"

    def metric_names(self) -> dict[str, str]:
        return {"prefill_128": f"prefill {self.prompt}", "prefill_512": f"prefill {self.chunk}",
                "prefill_2048": f"prefill {self.prefill}", "decode_128": f"decode {self.decode}"}

    def metric_tokens(self) -> dict[str, int]:
        return {"prefill_128": self.prompt, "prefill_512": self.chunk, "prefill_2048": self.prefill,
                "decode_128": self.decode}


PROFILES = {
    # default (`make bench`): about 20 minutes on 2 cores
    # (the 0.6B shape's 8192-token sequence state is extrapolated: feeding 8192 tokens costs ~6 CPU-minutes)
    "quick": dict(models=["smollm2", "qwen3-0.6b"], reps=5, callgrind_prefill={"smollm2": 512, "qwen3-0.6b": 128},
                  seq_lengths_for={"qwen3-0.6b": (512, 2048)}),
    # the goals' model: about 75 minutes on 2 cores; seq sizes measured to 2048, 8192 extrapolated (exact: linear)
    "full": dict(models=["qwen3-4b"], reps=5, seq_lengths=(512, 2048), callgrind_prefill={"qwen3-4b": 0},
                 slots=("a", "b", "b2", "c", "d")),
}


def _say(msg: str) -> None:
    print(f"[bench] {msg}", file=sys.stderr, flush=True)


# --------------------------------------------------------------------------------------------
# workers
# --------------------------------------------------------------------------------------------


class WorkerProc:
    """A bench_worker subprocess speaking JSON lines."""

    def __init__(self, name: str, lib_dir: Path, log: Path) -> None:
        env = dict(os.environ, LLAMA_CPP_LIB_PATH=str(lib_dir))
        env.pop("DELTAMEM_LIB_DIR", None)
        self.name = name
        self.log = log
        self._logf = open(log, "w")  # noqa: SIM115 - closed in close()
        self.proc = subprocess.Popen([sys.executable, "-m", "deltamem_edge.bench_worker", "serve"], env=env,
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self._logf, text=True,
                                     bufsize=1)

    def call(self, cmd: str, **kw: Any) -> Any:
        assert self.proc.stdin and self.proc.stdout
        self.proc.stdin.write(json.dumps({"cmd": cmd, **kw}) + "\n")
        self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        if not line:
            tail = self.log.read_text(errors="replace")[-1500:] if self.log.exists() else ""
            raise DeltaMemError(f"benchmark worker {self.name} died (rc {self.proc.poll()}) during {cmd}:\n{tail}")
        reply = json.loads(line)
        if not reply.get("ok"):
            raise DeltaMemError(f"benchmark worker {self.name}: {cmd} failed: {reply.get('error')}")
        return reply.get("result")

    def close(self) -> None:
        try:
            if self.proc.poll() is None:
                self.call("quit")
                self.proc.wait(timeout=60)
        except Exception:  # noqa: BLE001 - a stuck worker is killed below
            pass
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        self._logf.close()


def round_order(slots: tuple[str, ...], rep: int, task: int, n_tasks: int) -> list[str]:
    """Rotate the start and reverse every other time, so no slot is always first or last."""
    k = (rep * n_tasks + task) % len(slots)
    order = list(slots[k:] + slots[:k])
    return order[::-1] if (rep + task) % 2 else order


# --------------------------------------------------------------------------------------------
# statistics
# --------------------------------------------------------------------------------------------


def stats(xs: list[float]) -> dict[str, float]:
    xs = [float(x) for x in xs]
    return {"median": statistics.median(xs), "min": min(xs), "max": max(xs), "n": len(xs)} if xs else {}


def metric_seconds(task_d: dict, task_p: dict) -> dict[str, float]:
    """Wall seconds of each metric from one round's D and P results of one slot."""
    return {"prefill_128": task_d["prefill_wall_s"], "decode_128": task_d["decode_wall_s"],
            "prefill_512": task_p["marks"][0]["wall_s"], "prefill_2048": task_p["marks"][-1]["wall_s"]}


def metric_cpu_seconds(task_d: dict, task_p: dict) -> dict[str, float]:
    return {"prefill_128": task_d["prefill_cpu_s"], "decode_128": task_d["decode_cpu_s"],
            "prefill_512": task_p["marks"][0]["cpu_s"], "prefill_2048": task_p["marks"][-1]["cpu_s"]}


def summarize(rounds: list[dict[str, dict[str, float]]], tokens: dict[str, int],
              ratios: tuple[tuple[str, str], ...] = RATIOS) -> dict:
    """rounds[i][slot][metric] = seconds  ->  tok/s stats per slot and paired time ratios per pair.

    A ratio x/y is (seconds of x) / (seconds of y) within the same round: 1.03 means x
    took 3 % longer.  Its median and min–max run over rounds; ``of_medians`` is the
    ratio of the two median times, for comparison.
    """
    slots = sorted({s for r in rounds for s in r})
    out: dict[str, Any] = {"tps": {}, "ratios": {}}
    for s in slots:
        out["tps"][s] = {}
        for m, n in tokens.items():
            secs = [r[s][m] for r in rounds if s in r and m in r[s]]
            out["tps"][s][m] = stats([n / x for x in secs if x > 0])
    for x, y in ratios:
        if x not in slots or y not in slots:
            continue
        key = f"{x}/{y}"
        out["ratios"][key] = {}
        for m in tokens:
            pairs = [(r[x][m], r[y][m]) for r in rounds if x in r and y in r and m in r[x] and m in r[y]]
            if not pairs:
                continue
            st = stats([a / b for a, b in pairs])
            st["of_medians"] = statistics.median(a for a, _ in pairs) / statistics.median(b for _, b in pairs)
            out["ratios"][key][m] = st
    return out


def us_stats(samples: dict[str, list[float]]) -> dict[str, dict[str, float]]:
    return {k: stats(v) for k, v in samples.items() if v}


# --------------------------------------------------------------------------------------------
# callgrind
# --------------------------------------------------------------------------------------------


def callgrind_available() -> bool:
    return shutil.which("valgrind") is not None


def parse_callgrind_total(path: Path) -> int | None:
    """Ir of a callgrind output file ("summary:" or "totals:" line)."""
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return None
    for key in ("summary:", "totals:"):
        for line in text.splitlines():
            if line.startswith(key):
                parts = line.split()
                if len(parts) > 1:
                    return int(parts[1])
    return None


def run_callgrind(model: Path, adapter: Path | None, lib_dir: Path, workdir: Path, *, prefill: int, steps: int = 3,
                  timeout: float = 3600, keep_as: str | None = None) -> dict:
    """Instructions (Ir) inside llama_decode, 1 thread: warm-up, prefill `prefill` tokens, `steps` decode steps.

    One thread because valgrind serialises threads anyway and ggml's spinning barriers would add a
    scheduling-dependent number of instructions.
    """
    workdir.mkdir(parents=True, exist_ok=True)
    stem = workdir / f"cg-{os.getpid()}-{time.time_ns()}"
    spec = {"model": str(model), "adapter": str(adapter) if adapter else None, "threads": 1,
            "prefill": max(prefill, 8), "steps": steps}
    env = dict(os.environ, LLAMA_CPP_LIB_PATH=str(lib_dir))
    env.pop("DELTAMEM_LIB_DIR", None)
    # llama_decode itself is entered from libffi in a way callgrind does not name (its body shows up under
    # an anonymous libffi address), so toggle on the C++ method it calls: all of the work but a ~100-
    # instruction batch check
    fn = "llama_context::decode(llama_batch const&)"
    cmd = ["valgrind", "--tool=callgrind", f"--callgrind-out-file={stem}", "--collect-atstart=no",
           f"--toggle-collect={fn}", f"--dump-after={fn}",
           sys.executable, "-m", "deltamem_edge.bench_worker", "oneshot", json.dumps(spec)]
    t0 = time.time()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
    wall = time.time() - t0
    files = sorted(workdir.glob(stem.name + ".*"), key=lambda p: int(p.suffix[1:]) if p.suffix[1:].isdigit() else 1 << 30)
    dumps = [p for p in files if p.suffix[1:].isdigit()]
    counts = [parse_callgrind_total(p) for p in dumps]
    kept = {}
    if keep_as and len(dumps) >= 3:  # the prefill and the first decode step, for callgrind_annotate
        for idx, what in ((1, "prefill"), (2, "decode")):
            target = workdir / f"{keep_as}.{what}.callgrind"
            os.replace(dumps[idx], target)
            kept[what] = str(target)
    for p in workdir.glob(stem.name + "*"):
        p.unlink()
    if proc.returncode != 0 or len(counts) < 2 + steps:
        raise DeltaMemError(f"callgrind run failed (rc {proc.returncode}, {len(counts)} dumps):\n{proc.stderr[-1500:]}")
    decode = [c for c in counts[2:2 + steps] if c is not None]
    return {"warmup_ir": counts[0], "prefill_tokens": spec["prefill"], "prefill_ir": counts[1],
            "decode_step_ir": statistics.median(decode), "decode_steps_ir": decode, "wall_s": wall, "files": kept}


# --------------------------------------------------------------------------------------------
# the run
# --------------------------------------------------------------------------------------------


def machine_info(threads: int) -> dict:
    cpu = platform.processor() or platform.machine()
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
        m = re.search(r"Model name:\s*(.+)", out)
        if m:
            cpu = m.group(1).strip()
    except OSError:
        pass
    mem = None
    try:
        with open("/proc/meminfo") as f:
            mem = int(f.readline().split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass

    def git(*args: str) -> str:
        try:
            return subprocess.run(["git", *args], cwd=REPO_ROOT, capture_output=True, text=True).stdout.strip()
        except OSError:
            return ""

    dirty = bool(git("status", "--porcelain", "--untracked-files=no"))
    return {"cpu": cpu, "cores": os.cpu_count(), "mem_bytes": mem, "kernel": platform.release(),
            "python": platform.python_version(), "threads": threads, "commit": git("rev-parse", "--short", "HEAD"),
            "dirty": dirty, "date": _dt.datetime.now().astimezone().isoformat(timespec="seconds"),
            "loadavg_start": os.getloadavg()}


def run(plan: Plan, *, out_dir: Path, command: str, stock_lib: Path, patched_lib: Path,
        models: dict[str, Any] | None = None) -> dict:
    """Measure every model of the plan; returns the result dict (also written as JSON by `main`)."""
    from . import bench_models as BM
    from .native.build import LLAMA_CPP_COMMIT

    t_run = time.time()
    result: dict[str, Any] = {"schema": 1, "profile": plan.profile, "command": command,
                              "machine": machine_info(plan.threads),
                              "plan": {k: v for k, v in plan.__dict__.items()},
                              "libs": {"stock": str(stock_lib), "patched": str(patched_lib),
                                       "llama_cpp_commit": LLAMA_CPP_COMMIT},
                              "metric_names": plan.metric_names(), "models": {}}
    # worker logs and kept callgrind dumps: outside the repository
    logs = BM.bench_cache() / "logs" / _dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    logs.mkdir(parents=True, exist_ok=True)
    result["logs"] = str(logs)
    for name in plan.models:
        bm = (models or {}).get(name) or BM.get_model(name, stock_lib, threads=plan.threads)
        result["models"][name] = run_model(plan, bm, stock_lib, patched_lib, logs)
    result["machine"]["loadavg_end"] = os.getloadavg()
    result["total_s"] = time.time() - t_run
    return result


def run_model(plan: Plan, bm: Any, stock_lib: Path, patched_lib: Path, logs: Path) -> dict:
    t_model = time.time()
    _say(f"{bm.name}: {bm.label}; slots {', '.join(plan.slots)}; {plan.reps} rounds")
    n_ctx = max(plan.prompt + plan.decode, plan.prefill) + 256
    workers: dict[str, WorkerProc] = {}
    res: dict[str, Any] = {"model": bm.info(), "load": {}, "rounds": [], "rounds_cpu": [], "raw": [],
                           "metric_names": plan.metric_names()}
    try:
        for slot in plan.slots:
            wname = SLOT_WORKER[slot]
            if wname in workers:
                continue
            lib = stock_lib if wname == "a" else patched_lib
            w = WorkerProc(wname, lib, logs / f"{bm.name}.{wname}.log")
            workers[wname] = w
            res["load"][wname] = w.call("load", model=str(bm.path), adapter=str(bm.adapter) if wname == "cd" else None,
                                        threads=plan.threads, n_ctx=n_ctx, n_batch=plan.chunk,
                                        n_gpu_layers=plan.n_gpu_layers)
        if "a" in workers and res["load"]["a"]["dmem_symbols"]:
            raise DeltaMemError("the stock worker loaded a library with δ-mem symbols", path=stock_lib)
        # warm-up: page in the weights, allocate, spin up threads (not measured)
        for slot in plan.slots:
            w = workers[SLOT_WORKER[slot]]
            w.call("decode", prompt=min(16, plan.prompt), n=2, seed=0, write=slot != "d")
            w.call("prefill", n=min(plan.chunk, 32), chunk=plan.chunk, seed=0, write=slot != "d")
        tasks = ("D", "P")
        t_rounds = time.time()
        for rep in range(plan.reps):
            t_rep = time.time()
            got: dict[str, dict[str, dict]] = {s: {} for s in plan.slots}
            for ti, task in enumerate(tasks):
                for slot in round_order(plan.slots, rep, ti, len(tasks)):
                    w = workers[SLOT_WORKER[slot]]
                    seed = 1000 + rep
                    if task == "D":
                        got[slot]["D"] = w.call("decode", prompt=plan.prompt, n=plan.decode, seed=seed,
                                                write=slot != "d")
                    else:
                        probe = rep == 0 and slot in ("a", "c")
                        got[slot]["P"] = w.call("prefill", n=plan.prefill, chunk=plan.chunk, seed=seed,
                                                write=slot != "d", probe=probe)
            res["raw"].append(got)
            res["rounds"].append({s: metric_seconds(g["D"], g["P"]) for s, g in got.items()})
            res["rounds_cpu"].append({s: metric_cpu_seconds(g["D"], g["P"]) for s, g in got.items()})
            dt = time.time() - t_rep
            msg = "  ".join(f"{s} {plan.decode / res['rounds'][-1][s]['decode_128']:.1f}/"
                            f"{plan.prefill / res['rounds'][-1][s]['prefill_2048']:.1f}" for s in plan.slots)
            _say(f"  round {rep + 1}/{plan.reps} ({dt:.0f} s) decode/prefill tok/s: {msg}")
            if plan.budget_s and rep + 1 >= 3 and rep + 1 < plan.reps:
                spent = time.time() - t_rounds
                if spent + spent / (rep + 1) > plan.budget_s:
                    _say(f"  stopping after {rep + 1} rounds: the time budget would be exceeded")
                    break
        res["rounds_done"] = len(res["rounds"])
        res["rss"] = {w: workers[w].call("rss") for w in workers}
        tokens = plan.metric_tokens()
        res["summary"] = summarize(res["rounds"], tokens)
        res["summary_cpu"] = summarize(res["rounds_cpu"], tokens)
        # sequence state bytes at the probe lengths (from round 1) and beyond
        seq: dict[str, Any] = {}
        for slot in ("a", "c"):
            p = res["raw"][0].get(slot, {}).get("P", {}).get("seq_state_bytes") if res["raw"] else None
            if p:
                seq[f"probe_{slot}"] = p
        if "cd" in workers:
            t0 = time.time()
            res["statecost"] = workers["cd"].call("statecost", reps=plan.statecost_reps, dir=str(logs))
            lengths = plan.seq_lengths_for.get(bm.name, plan.seq_lengths)
            if lengths:
                seq["measured"] = workers["cd"].call("seqsize", lengths=sorted(set(lengths)))
            seq["seconds"] = time.time() - t0
        res["seq"] = seq
    finally:
        for w in workers.values():
            w.close()
    if plan.callgrind and callgrind_available():
        cg: dict[str, Any] = {}
        pre = plan.callgrind_prefill.get(bm.name, 512)
        from concurrent.futures import ThreadPoolExecutor

        def one(slot: str, adapter: Path | None) -> tuple[str, dict]:
            try:
                return slot, run_callgrind(bm.path, adapter, patched_lib, logs, prefill=pre or 8,
                                           keep_as=f"{bm.name}.{slot}")
            except (DeltaMemError, subprocess.TimeoutExpired) as e:
                return slot, {"error": str(e)[:500]}

        _say(f"  callgrind b and c (in parallel: counts do not depend on load): 1 thread, prefill {pre or 8}, "
             f"3 decode steps")
        with ThreadPoolExecutor(2) as ex:
            cg.update(dict(ex.map(lambda a: one(*a), (("b", None), ("c", bm.adapter)))))
        if all("prefill_ir" in cg.get(s, {}) for s in ("b", "c")):
            cg["ratio_c_b"] = {"decode_step": cg["c"]["decode_step_ir"] / cg["b"]["decode_step_ir"]}
            if pre:
                cg["ratio_c_b"]["prefill"] = cg["c"]["prefill_ir"] / cg["b"]["prefill_ir"]
        cg["prefill_tokens"] = pre
        res["callgrind"] = cg
    res["seconds"] = time.time() - t_model
    _say(f"{bm.name} done in {res['seconds'] / 60:.1f} min")
    return res


# --------------------------------------------------------------------------------------------
# derived figures: sequence state sizes, goals
# --------------------------------------------------------------------------------------------


def seq_table(mres: dict, want: tuple[int, ...] = (512, 2048, 8192)) -> list[dict]:
    """Rows of (tokens, llama.cpp seq state bytes, ours, ratio, how obtained).

    llama.cpp's sequence state is an affine function of the token count (KV rows of
    every layer plus per-cell metadata), so lengths that were not measured are
    extrapolated from two measured ones and marked as such.
    """
    ours = (mres.get("statecost") or {}).get("file_bytes")
    points: dict[int, int] = {}
    for key in ("probe_c", "probe_a"):
        for k, v in (mres.get("seq", {}).get(key) or {}).items():
            points.setdefault(int(k), int(v))
    for k, v in (mres.get("seq", {}).get("measured") or {}).items():
        if k.isdigit():
            points[int(k)] = int(v["seq_state_bytes"])
    rows = []
    fit = None
    if len(points) >= 2:
        (x0, y0), (x1, y1) = sorted(points.items())[:2]
        slope = (y1 - y0) / (x1 - x0)
        fit = (y0 - slope * x0, slope)
    for n in want:
        if n in points:
            seqb, how = points[n], "measured"
        elif fit:
            seqb, how = int(round(fit[0] + fit[1] * n)), "extrapolated (affine fit of measured lengths)"
        else:
            continue
        rows.append({"tokens": n, "seq_state_bytes": seqb, "ours_bytes": ours, "how": how,
                     "ratio": (seqb / ours) if ours else None})
    return rows


GOALS = {
    "decode": ("decode overhead c/b ≤ 3 %", 1.03),
    "prefill": ("prefill overhead c/b ≤ 5 % at the longest prefill", 1.05),
}


def names_of(mres: dict) -> dict[str, str]:
    return mres.get("metric_names") or {}


def goals(mres: dict) -> list[dict]:
    s = mres.get("summary", {}).get("ratios", {})
    aa = s.get("b2/b", {})
    out = []

    def band(metric: str) -> float | None:
        a = aa.get(metric)
        return max(abs(a["min"] - 1), abs(a["max"] - 1)) if a else None

    for key, metric in (("decode", "decode_128"), ("prefill", "prefill_2048")):
        r = s.get("c/b", {}).get(metric)
        if r:
            text, lim = GOALS[key]
            ir = (mres.get("callgrind") or {}).get("ratio_c_b", {}).get("decode_step" if key == "decode" else "prefill")
            if key == "prefill":
                text = text.replace("the longest prefill", names_of(mres).get(metric, metric))
            out.append({"goal": text, "value": f"{(r['median'] - 1) * 100:+.1f} % (rounds {(r['min'] - 1) * 100:+.1f}"
                        f"…{(r['max'] - 1) * 100:+.1f} %)" + (f"; instructions {(ir - 1) * 100:+.2f} %" if ir else ""),
                        "met": r["median"] <= lim, "aa_band": band(metric)})
    ba = s.get("b/a", {})
    if ba:
        worst = max(abs(v["median"] - 1) for v in ba.values())
        bands = [band(m) for m in ba if band(m) is not None]
        lim = max(bands) if bands else None
        nm = names_of(mres)
        if not bands:  # no A/A twin in this run: nothing to compare against
            lim = None
        out.append({"goal": "b vs a within noise", "value": "medians " + ", ".join(
            f"{nm.get(m, m)}: {(v['median'] - 1) * 100:+.1f} %" for m, v in ba.items()
            if not (m == "prefill_2048" and nm.get(m) == nm.get("prefill_512"))),
                    "met": None if lim is None else worst <= lim, "aa_band": lim})
    sc = mres.get("statecost")
    if sc:
        u = us_stats(sc["us"])
        total = u["save_total"]["median"] + u["load_total"]["median"]
        mem = u["save_mem"]["median"] + u["load_mem"]["median"]
        out.append({"goal": "state save + load ≤ 1 ms", "value": f"{total:.0f} µs with the file (atomic write + fsync);"
                    f" {mem:.0f} µs in memory (get+encode, decode+set)", "met": total <= 1000})
        out.append({"goal": "state file ≤ 16 KiB", "value": f"{sc['file_bytes']} B", "met": sc["file_bytes"] <= 16384})
        rows = {r["tokens"]: r for r in seq_table(mres)}
        if 2048 in rows and rows[2048]["ratio"]:
            r = rows[2048]
            out.append({"goal": "≥ 1000× smaller than llama.cpp's sequence state at 2048 tokens",
                        "value": f"{r['ratio']:.0f}× ({r['seq_state_bytes']} B vs {r['ours_bytes']} B, {r['how']})",
                        "met": r["ratio"] >= 1000})
    return out


# --------------------------------------------------------------------------------------------
# rendering: markdown, plot
# --------------------------------------------------------------------------------------------


def _fmt_range(st: dict, fmt: str = "{:.1f}") -> str:
    if not st:
        return "–"
    return f"{fmt.format(st['median'])} ({fmt.format(st['min'])}–{fmt.format(st['max'])})"


def _fmt_ratio(st: dict) -> str:
    if not st:
        return "–"
    return f"{st['median']:.3f} ({st['min']:.3f}–{st['max']:.3f})"


def _mib(n: float | None) -> str:
    return "–" if n is None else f"{n / 2**20:.0f} MiB"


def render_run(result: dict) -> str:
    """Markdown for one run: header, then per model the tables."""
    m = result["machine"]
    names = result.get("metric_names") or {k: k.replace("_", " ") for k in METRICS}
    lines = [f"### {result['profile']} run, {m['date'][:16].replace('T', ' ')}, commit {m['commit']}"
             f"{' (dirty tree)' if m.get('dirty') else ''}", "",
             f"- command: `{result['command']}`",
             f"- machine: {m['cpu']}, {m['cores']} cores, {(m.get('mem_bytes') or 0) / 2**30:.0f} GiB, "
             f"kernel {m['kernel']}, Python {m['python']}; load average at start "
             f"{', '.join(f'{x:.2f}' for x in m['loadavg_start'])}, at end "
             f"{', '.join(f'{x:.2f}' for x in m.get('loadavg_end', []))}",
             f"- threads: {m['threads']}; llama.cpp {result['libs']['llama_cpp_commit'][:9]} (stock and patched, same "
             f"flags: GGML_NATIVE=OFF, Release); run took {result.get('total_s', 0) / 60:.1f} min", ""]
    for mr in result["models"].values():
        info = mr["model"]
        lines += [f"#### {info['label']}", "",
                  f"File {Path(info['path']).name} ({info['model_bytes'] / 2**20:.0f} MiB), adapter "
                  f"{Path(info['adapter']).name} ({info['adapter_bytes'] / 2**20:.1f} MiB); "
                  f"{mr.get('rounds_done', 0)} rounds; shape {info['shape']}."
                  + (f" Generated once in {info['gen_seconds']:.0f} s (peak disk "
                     f"{info['gen_peak_disk_bytes'] / 2**30:.1f} GiB, f16 deleted)." if info.get("synthetic") else ""),
                  ""]
        summ = mr["summary"]
        slots = [s for s in ("a", "b", "b2", "c", "d") if s in summ["tps"]]
        ratio_keys = [k for k in ("c/b", "d/b", "b/a", "b2/b") if k in summ["ratios"]]
        head = ["tokens/s, median (min–max)"] + [SLOT_LABELS[s].split(":")[0] for s in slots] + \
               [f"{k}{' (A/A)' if k == 'b2/b' else ''}" for k in ratio_keys]
        lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        for met in METRICS:
            if met == "prefill_2048" and names.get(met) == names.get("prefill_512"):
                continue  # the longest prefill is the chunk itself: one row
            row = [names[met]] + [_fmt_range(summ["tps"][s].get(met, {})) for s in slots] + \
                  [_fmt_ratio(summ["ratios"][k].get(met, {})) for k in ratio_keys]
            lines.append("| " + " | ".join(row) + " |")
        lines += ["", "Slots: " + "; ".join(SLOT_LABELS[s] for s in slots) + ". Ratios are per-round time ratios "
                  "(> 1 = slower), median (min–max) over rounds; b2/b is the A/A band.", ""]
        cpu = mr.get("summary_cpu", {}).get("ratios", {})
        if cpu.get("c/b"):
            shown = [mm for mm in METRICS if not (mm == "prefill_2048" and names.get(mm) == names.get("prefill_512"))]
            lines += ["CPU-time ratios (process user+sys, same rounds; medians): " + "; ".join(
                f"{k} " + ", ".join(f"{names[mm]} {cpu[k][mm]['median']:.3f}" for mm in shown if mm in cpu[k])
                for k in ratio_keys if k in cpu), ""]
        cg = mr.get("callgrind") or {}
        if cg.get("ratio_c_b"):
            b, c = cg["b"], cg["c"]
            lines += ["Instructions inside llama_decode (callgrind, 1 thread; repeatable to < 0.1 %):", "",
                      "| | b | c | c/b |", "|---|---|---|---|",
                      f"| one decode step (after {b['prefill_tokens']} tokens) | {b['decode_step_ir'] / 1e6:.1f} M | "
                      f"{c['decode_step_ir'] / 1e6:.1f} M | {cg['ratio_c_b']['decode_step']:.4f} |"]
            if "prefill" in cg["ratio_c_b"]:
                lines.append(f"| prefill {b['prefill_tokens']} tokens | {b['prefill_ir'] / 1e9:.2f} G | "
                             f"{c['prefill_ir'] / 1e9:.2f} G | {cg['ratio_c_b']['prefill']:.4f} |")
            lines.append("")
        rss = mr.get("rss", {})
        if rss:
            lines += ["Peak RSS per worker (VmHWM; weights are repacked into private memory, so each process holds "
                      "its own copy): " + ", ".join(f"{w} {_mib(v.get('VmHWM', v.get('maxrss_bytes')))}"
                                                   for w, v in rss.items()), ""]
        sc = mr.get("statecost")
        if sc:
            u = us_stats(sc["us"])
            lines += [f"δ-state: {sc['state_floats']} floats = {sc['state_bytes']} B in RAM; state file "
                      f"{sc['file_bytes']} B (header + payload + sha256); round trip exact: {sc['roundtrip_exact']}.",
                      "", "| µs, median (min–max) over " + str(u["get"]["n"]) + " | |", "|---|---|"]
            for k, label in (("get", "save: llama_dmem_state_get"), ("encode", "save: encode (statefile)"),
                             ("file_save", "save: atomic write + fsync"), ("save_total", "**save total**"),
                             ("file_load", "load: read + validate"), ("decode", "load: decode"),
                             ("set", "load: llama_dmem_state_set"), ("load_total", "**load total**"),
                             ("save_mem", "save without the file"), ("load_mem", "load without the file")):
                lines.append(f"| {label} | {_fmt_range(u[k], '{:.0f}')} |")
            lines.append("")
        rows = seq_table(mr)
        if rows:
            lines += ["| conversation length | llama.cpp `llama_state_seq_get_size` | our state file | ratio |",
                      "|---|---|---|---|"]
            for r in rows:
                mark = "" if r["how"] == "measured" else " (extrapolated)"
                lines.append(f"| {r['tokens']} | {r['seq_state_bytes']:,} B{mark} | {r['ours_bytes']:,} B | "
                             f"{r['ratio']:,.0f}× |")
            lines.append("")
        gl = goals(mr)
        if gl:
            lines += ["| goal | measured | met |", "|---|---|---|"]
            for g in gl:
                band = f" (A/A band ±{g['aa_band'] * 100:.1f} %)" if g.get("aa_band") is not None else ""
                met = "n/a (no A/A twin in this run)" if g["met"] is None else "yes" if g["met"] else "**no**"
                lines.append(f"| {g['goal']} | {g['value']}{band} | {met} |")
            lines.append("")
        lines += [f"Model section took {mr.get('seconds', 0) / 60:.1f} min.", ""]
    return "\n".join(lines)


def history_row(result: dict, json_link: str) -> list[str]:
    m = result["machine"]
    rows = []
    for name, mr in result["models"].items():
        def g(k: str, met: str, r: dict = mr["summary"]["ratios"]) -> str:
            st = r.get(k, {}).get(met)
            return f"{st['median']:.3f}" if st else "–"

        tps = mr["summary"]["tps"]
        dec_b = tps.get("b", {}).get("decode_128", {}).get("median")
        pre_b = tps.get("b", {}).get("prefill_2048", {}).get("median")
        cg = (mr.get("callgrind") or {}).get("ratio_c_b", {})
        sc = mr.get("statecost") or {}
        rows.append(f"| {m['date'][:10]} | {m['commit']}{'+' if m.get('dirty') else ''} | {result['profile']} | {name} "
                    f"| {m['threads']} | {dec_b or 0:.1f} | {pre_b or 0:.1f} ({result.get('plan', {}).get('prefill', 2048)}) | "
                    f"{g('c/b', 'decode_128')} | "
                    f"{g('c/b', 'prefill_2048')} | {g('b/a', 'decode_128')} | {g('b/a', 'prefill_2048')} | "
                    f"{g('b2/b', 'decode_128')} | {format(cg['decode_step'], '.4f') if cg.get('decode_step') else '–'} | "
                    f"{sc.get('file_bytes', '–')} | "
                    f"[json]({json_link}) |")
    return rows


HISTORY_HEAD = ["| date | commit | profile | model | threads | b decode tok/s | b longest-prefill tok/s (tokens) | "
                "c/b decode | c/b longest prefill | b/a decode | b/a longest prefill | A/A decode | Ir c/b decode | "
                "state file B | raw |",
                "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
MARK = {"latest": ("<!-- bench:latest:begin -->", "<!-- bench:latest:end -->"),
        "history": ("<!-- bench:history:begin -->", "<!-- bench:history:end -->")}
DOC_TEMPLATE = """# Benchmarks

Produced by `deltamem-edge bench` (`make bench`); see `deltamem_edge/bench.py` for the method.
Raw numbers of every run are in `docs/bench/*.json` (kept for every commit, so regressions show),
with a plot of overhead against prompt length next to each.

## Latest runs

{latest_begin}
{latest_end}

## History

One row per model and run; new runs append.

{history_begin}
{history_head}
{history_end}
"""


def latest_key(result: dict) -> str:
    """Which "latest" block a run replaces: its profile, and for custom runs also its models and
    thread count, so that a custom 4B run and a custom 1-thread SmolLM2 run each keep their table."""
    if result["profile"] != "custom":
        return result["profile"]
    threads = (result.get("plan") or {}).get("threads")
    return "custom:" + "+".join(sorted(result["models"])) + (f":t{threads}" if threads else "")


def update_doc(doc: Path, result: dict, json_link: str, png_link: str | None) -> None:
    """Replace this profile's "latest" section and append history rows; text outside the markers stays."""
    if doc.exists():
        text = doc.read_text()
    else:
        text = DOC_TEMPLATE.format(latest_begin=MARK["latest"][0], latest_end=MARK["latest"][1],
                                   history_begin=MARK["history"][0], history_end=MARK["history"][1],
                                   history_head="\n".join(HISTORY_HEAD))
    for k, (b, e) in MARK.items():
        if b not in text or e not in text:
            text += f"\n\n{b}\n" + ("\n".join(HISTORY_HEAD) + "\n" if k == "history" else "") + f"{e}\n"
    # latest: one block per profile, delimited by its own sub-markers
    b, e = MARK["latest"]
    head, rest = text.split(b, 1)
    latest, tail = rest.split(e, 1)
    key = latest_key(result)
    pb, pe = f"<!-- profile:{key}:begin -->", f"<!-- profile:{key}:end -->"
    block = f"{pb}\n{render_run(result)}\n" + (f"![overhead vs prompt length]({png_link})\n\n" if png_link else "") \
        + f"Raw: [{json_link}]({json_link})\n{pe}"
    if pb in latest and pe in latest:
        pre, post = latest.split(pb, 1)
        latest = pre + block + post.split(pe, 1)[1]
    else:
        latest = latest.rstrip("\n") + "\n" + block + "\n"
    text = head + b + latest + e + tail
    b, e = MARK["history"]
    head, rest = text.split(b, 1)
    hist, tail = rest.split(e, 1)
    hist = hist.rstrip("\n") + "\n" + "\n".join(history_row(result, json_link)) + "\n"
    doc.parent.mkdir(parents=True, exist_ok=True)
    doc.write_text(head + b + hist + e + tail)


# --- a tiny PNG plotter (no matplotlib needed) -------------------------------------------------

_FONT = {  # 5x7, rows top to bottom, '1' = ink
    "0": "01110 10001 10011 10101 11001 10001 01110", "1": "00100 01100 00100 00100 00100 00100 01110",
    "2": "01110 10001 00001 00010 00100 01000 11111", "3": "11110 00001 00001 01110 00001 00001 11110",
    "4": "00010 00110 01010 10010 11111 00010 00010", "5": "11111 10000 11110 00001 00001 10001 01110",
    "6": "00110 01000 10000 11110 10001 10001 01110", "7": "11111 00001 00010 00100 01000 01000 01000",
    "8": "01110 10001 10001 01110 10001 10001 01110", "9": "01110 10001 10001 01111 00001 00010 01100",
    "A": "01110 10001 10001 11111 10001 10001 10001", "B": "11110 10001 10001 11110 10001 10001 11110",
    "C": "01110 10001 10000 10000 10000 10001 01110", "D": "11100 10010 10001 10001 10001 10010 11100",
    "E": "11111 10000 10000 11110 10000 10000 11111", "F": "11111 10000 10000 11110 10000 10000 10000",
    "G": "01110 10001 10000 10111 10001 10001 01111", "H": "10001 10001 10001 11111 10001 10001 10001",
    "I": "01110 00100 00100 00100 00100 00100 01110", "J": "00111 00010 00010 00010 00010 10010 01100",
    "K": "10001 10010 10100 11000 10100 10010 10001", "L": "10000 10000 10000 10000 10000 10000 11111",
    "M": "10001 11011 10101 10101 10001 10001 10001", "N": "10001 10001 11001 10101 10011 10001 10001",
    "O": "01110 10001 10001 10001 10001 10001 01110", "P": "11110 10001 10001 11110 10000 10000 10000",
    "Q": "01110 10001 10001 10001 10101 10010 01101", "R": "11110 10001 10001 11110 10100 10010 10001",
    "S": "01111 10000 10000 01110 00001 00001 11110", "T": "11111 00100 00100 00100 00100 00100 00100",
    "U": "10001 10001 10001 10001 10001 10001 01110", "V": "10001 10001 10001 10001 10001 01010 00100",
    "W": "10001 10001 10001 10101 10101 10101 01010", "X": "10001 10001 01010 00100 01010 10001 10001",
    "Y": "10001 10001 01010 00100 00100 00100 00100", "Z": "11111 00001 00010 00100 01000 10000 11111",
    ".": "00000 00000 00000 00000 00000 01100 01100", "-": "00000 00000 00000 11111 00000 00000 00000",
    "/": "00001 00010 00010 00100 01000 01000 10000", "%": "11001 11010 00010 00100 01000 01011 10011",
    "(": "00010 00100 01000 01000 01000 00100 00010", ")": "01000 00100 00010 00010 00010 00100 01000",
    ":": "00000 01100 01100 00000 01100 01100 00000", "=": "00000 00000 11111 00000 11111 00000 00000",
    "+": "00000 00100 00100 11111 00100 00100 00000", ",": "00000 00000 00000 00000 01100 00100 01000",
    "_": "00000 00000 00000 00000 00000 00000 11111", " ": "00000 00000 00000 00000 00000 00000 00000",
    "<": "00010 00100 01000 10000 01000 00100 00010", ">": "01000 00100 00010 00001 00010 00100 01000",
    "?": "01110 10001 00001 00010 00100 00000 00100",
}


class Canvas:
    def __init__(self, w: int, h: int) -> None:
        self.w, self.h = w, h
        self.px = bytearray(b"\xff" * (w * h * 3))

    def dot(self, x: int, y: int, c: tuple[int, int, int]) -> None:
        if 0 <= x < self.w and 0 <= y < self.h:
            i = 3 * (y * self.w + x)
            self.px[i:i + 3] = bytes(c)

    def rect(self, x0: int, y0: int, x1: int, y1: int, c: tuple[int, int, int]) -> None:
        for y in range(max(0, min(y0, y1)), min(self.h, max(y0, y1) + 1)):
            for x in range(max(0, min(x0, x1)), min(self.w, max(x0, x1) + 1)):
                i = 3 * (y * self.w + x)
                self.px[i:i + 3] = bytes(c)

    def line(self, x0: float, y0: float, x1: float, y1: float, c: tuple[int, int, int], width: int = 1,
             dash: int = 0) -> None:
        n = int(max(abs(x1 - x0), abs(y1 - y0))) + 1
        for i in range(n + 1):
            if dash and (i // dash) % 2:
                continue
            t = i / max(n, 1)
            x, y = round(x0 + (x1 - x0) * t), round(y0 + (y1 - y0) * t)
            for dx in range(-(width // 2), width - width // 2):
                for dy in range(-(width // 2), width - width // 2):
                    self.dot(x + dx, y + dy, c)

    def text(self, x: int, y: int, s: str, c: tuple[int, int, int] = (0, 0, 0), scale: int = 2) -> int:
        for ch in s.upper():
            glyph = _FONT.get(ch, _FONT["?"]).split()
            for r, row in enumerate(glyph):
                for col, bit in enumerate(row):
                    if bit == "1":
                        self.rect(x + col * scale, y + r * scale, x + (col + 1) * scale - 1, y + (r + 1) * scale - 1, c)
            x += 6 * scale
        return x

    @staticmethod
    def text_width(s: str, scale: int = 2) -> int:
        return 6 * scale * len(s)

    def png(self) -> bytes:
        raw = b"".join(b"\x00" + bytes(self.px[3 * y * self.w:3 * (y + 1) * self.w]) for y in range(self.h))

        def chunk(kind: bytes, data: bytes) -> bytes:
            return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

        return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", self.w, self.h, 8, 2, 0, 0, 0))
                + chunk(b"IDAT", zlib.compress(raw, 9)) + chunk(b"IEND", b""))


_COLORS = [(31, 119, 180), (214, 39, 40), (44, 160, 44), (148, 103, 189), (255, 127, 14), (23, 190, 207),
           (140, 86, 75), (227, 119, 194)]


def plot_overhead(result: dict, path: Path) -> Path:
    """Time ratio (c/b, d/b, b/a) against prompt length per model, with min–max bars and the A/A band."""
    import math

    W, H = 960, 600
    L, R, T, B = 90, 250, 60, 70
    cv = Canvas(W, H)
    names = result.get("metric_names") or {}
    pre = [m for m in METRICS if m.startswith("prefill")]
    xs_tokens = {m: int(names.get(m, m).split()[-1]) if names.get(m, m).split()[-1].isdigit() else 0 for m in pre}
    series = []  # (label, color, points [(x, med, lo, hi)], dashed)
    band = []
    ci = 0
    for model, mr in result["models"].items():
        rat = mr["summary"]["ratios"]
        for key in ("c/b", "d/b", "b/a"):
            if key in rat:
                pts = [(xs_tokens[m], rat[key][m]["median"], rat[key][m]["min"], rat[key][m]["max"])
                       for m in pre if m in rat[key] and xs_tokens[m]]
                series.append((f"{model} {key}", _COLORS[ci % len(_COLORS)], pts, key != "c/b"))
                ci += 1
        if "b2/b" in rat:
            band += [(xs_tokens[m], rat["b2/b"][m]["min"], rat["b2/b"][m]["max"]) for m in pre
                     if m in rat["b2/b"] and xs_tokens[m]]
    allx = [p[0] for s in series for p in s[2]] or [128, 2048]
    ally = [v for s in series for p in s[2] for v in p[1:]] + [v for b in band for v in b[1:]] + [1.0]
    x0, x1 = math.log2(min(allx)) - 0.3, math.log2(max(allx)) + 0.3
    y0, y1 = min(ally), max(ally)
    pad = max(0.02, (y1 - y0) * 0.08)
    y0, y1 = y0 - pad, y1 + pad

    def X(v: float) -> int:
        return round(L + (math.log2(v) - x0) / (x1 - x0) * (W - L - R))

    def Y(v: float) -> int:
        return round(H - B - (v - y0) / (y1 - y0) * (H - T - B))

    if band:  # A/A band: grey, the envelope of all models' b2/b min–max per length
        env: dict[int, list[float]] = {}
        for x, lo, hi in band:
            e = env.setdefault(x, [lo, hi])
            e[0], e[1] = min(e[0], lo), max(e[1], hi)
        for x, (lo, hi) in env.items():
            cv.rect(X(x) - 18, Y(hi), X(x) + 18, Y(lo), (225, 225, 225))
    step = 10 ** math.floor(math.log10(max((y1 - y0) / 5, 1e-6)))
    for mult in (1, 2, 5, 10):
        if (y1 - y0) / (step * mult) <= 8:
            step *= mult
            break
    v = math.ceil(y0 / step) * step
    while v <= y1:
        cv.line(L, Y(v), W - R, Y(v), (235, 235, 235))
        label = f"{v:.2f}" if step < 0.1 else f"{v:.1f}"
        cv.text(L - 8 - cv.text_width(label), Y(v) - 7, label, (60, 60, 60))
        v += step
    cv.line(L, Y(1.0), W - R, Y(1.0), (120, 120, 120), dash=6)
    for x in sorted(set(allx)):
        cv.line(X(x), H - B, X(x), H - B + 6, (0, 0, 0))
        cv.text(X(x) - cv.text_width(str(x)) // 2, H - B + 12, str(x))
    cv.line(L, H - B, W - R, H - B, (0, 0, 0))
    cv.line(L, T, L, H - B, (0, 0, 0))
    cv.text(L, 18, "TIME RATIO VS PROMPT LENGTH (>1 = SLOWER)", scale=2)
    cv.text(L + (W - L - R) // 2 - cv.text_width("PROMPT TOKENS") // 2, H - 30, "PROMPT TOKENS")
    off = 0
    for _label, color, pts, dashed in series:
        off += 4
        prev = None
        for x, med, lo, hi in pts:
            px = X(x) + off - 2 * len(series)
            cv.line(px, Y(lo), px, Y(hi), color)
            cv.rect(px - 3, Y(med) - 3, px + 3, Y(med) + 3, color)
            if prev:
                cv.line(prev[0], prev[1], px, Y(med), color, width=2, dash=5 if dashed else 0)
            prev = (px, Y(med))
    ly = T
    for label, color, _pts, dashed in series:
        cv.line(W - R + 15, ly + 6, W - R + 45, ly + 6, color, width=2, dash=5 if dashed else 0)
        cv.text(W - R + 52, ly, label, scale=1 if len(label) > 16 else 2)
        ly += 22
    if band:
        cv.rect(W - R + 15, ly + 1, W - R + 45, ly + 11, (225, 225, 225))
        cv.text(W - R + 52, ly, "A/A B2/B RANGE", scale=1)
    path.write_bytes(cv.png())
    return path


# --------------------------------------------------------------------------------------------
# entry point used by the CLI
# --------------------------------------------------------------------------------------------


def rebuild_doc(doc: Path, out_dir: Path) -> int:
    """Re-render the latest blocks and the history of `doc` from every JSON in `out_dir` (oldest first)."""
    if doc.exists():
        text = doc.read_text()
        b, e = MARK["latest"]
        if b in text and e in text:
            text = text.split(b, 1)[0] + b + "\n" + e + text.split(e, 1)[1]
        b, e = MARK["history"]
        if b in text and e in text:
            text = text.split(b, 1)[0] + b + "\n" + "\n".join(HISTORY_HEAD) + "\n" + e + text.split(e, 1)[1]
        doc.write_text(text)
    prefix = os.path.relpath(out_dir.resolve(), doc.parent.resolve())
    prefix = "" if prefix == "." else prefix + "/"
    runs = sorted(out_dir.glob("*.json"))
    for path in runs:
        result = json.loads(path.read_text())
        png = path.with_suffix(".png")
        update_doc(doc, result, prefix + path.name, prefix + png.name if png.exists() else None)
    return len(runs)


def libraries(build_stock: bool = True) -> tuple[Path, Path]:
    """(stock, patched) library folders, building the stock one on first use (a few minutes, cached)."""
    from .native import build as native

    backend = native.default_backend()
    patched = native.installed_library_dir()
    stock_cfg = native.BuildConfig(backend, patched=False)
    stock = native.library_dir(stock_cfg)
    if not (stock / "libllama.so").exists() and not any(stock.glob("libllama.*")):
        if not build_stock:
            raise DeltaMemError("the stock llama.cpp library is not built", path=stock)
        _say("building stock llama.cpp (same commit and flags, no patch) for variant a; cached afterwards")
        stock = native.build(stock_cfg)
    return stock, patched


def main(plan: Plan, *, out_dir: Path | None = None, doc: Path | None = None, command: str | None = None) -> dict:
    out_dir = out_dir or REPO_ROOT / "docs" / "bench"
    if doc is None:
        doc = REPO_ROOT / "docs" / "benchmarks.md" if out_dir.resolve() == (REPO_ROOT / "docs" / "bench").resolve() \
            else out_dir / "benchmarks.md"
    out_dir.mkdir(parents=True, exist_ok=True)
    command = command or "deltamem-edge " + " ".join(shlex.quote(a) for a in sys.argv[1:])
    stock, patched = libraries()
    result = run(plan, out_dir=out_dir, command=command, stock_lib=stock, patched_lib=patched)
    m = result["machine"]
    stamp = _dt.datetime.now().strftime("%Y%m%d-%H%M")
    base = f"{stamp}-{m['commit'] or 'nocommit'}-{plan.profile}"
    json_path = out_dir / f"{base}.json"
    json_path.write_text(json.dumps(result, indent=1, default=str))
    png = plot_overhead(result, out_dir / f"{base}.png")
    prefix = os.path.relpath(out_dir.resolve(), doc.parent.resolve())
    prefix = "" if prefix == "." else prefix + "/"
    update_doc(doc, result, prefix + json_path.name, prefix + png.name)
    _say(f"wrote {json_path}, {png} and {doc} ({result['total_s'] / 60:.1f} min)")
    return result
