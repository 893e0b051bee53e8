"""Instruction counts inside llama_decode under callgrind: the noise-free backing of small ratios.

``perf`` has no hardware counters in these VMs, and instruction counts do not depend on what
else runs, so the few-percent overheads are checked here as well as in wall time.
"""

from __future__ import annotations

import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

from ..errors import DeltaMemError


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
           sys.executable, "-m", "deltamem_edge.bench.worker", "oneshot", json.dumps(spec)]
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
