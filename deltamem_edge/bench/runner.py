"""Running a plan: one worker process per variant, rounds with rotating order, callgrind last.

A process can load only one libllama and variant (a) is the stock library, so every variant
is a ``python -m deltamem_edge.bench.worker serve`` subprocess spoken to in JSON lines.
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from ..errors import DeltaMemError
from .callgrind import callgrind_available, run_callgrind
from .machine import machine_info
from .plan import SLOT_WORKER, Plan
from .stats import metric_cpu_seconds, metric_seconds, summarize


def _say(msg: str) -> None:
    print(f"[bench] {msg}", file=sys.stderr, flush=True)


class WorkerProc:
    """A bench.worker subprocess speaking JSON lines."""

    def __init__(self, name: str, lib_dir: Path, log: Path) -> None:
        env = dict(os.environ, LLAMA_CPP_LIB_PATH=str(lib_dir))
        env.pop("DELTAMEM_LIB_DIR", None)
        self.name = name
        self.log = log
        self._logf = open(log, "w")  # noqa: SIM115 - closed in close()
        self.proc = subprocess.Popen([sys.executable, "-m", "deltamem_edge.bench.worker", "serve"], env=env,
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


def run(plan: Plan, *, out_dir: Path, command: str, stock_lib: Path, patched_lib: Path,
        models: dict[str, Any] | None = None) -> dict:
    """Measure every model of the plan; returns the result dict (also written as JSON by `main`)."""
    from ..native.build import LLAMA_CPP_COMMIT
    from . import models as BM

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
