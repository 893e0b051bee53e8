"""``Engine.step`` for 1, 2, 4 and 8 sessions: no adapter, δ-mem on the standard scan, δ-mem fused.

In-process (no HTTP), one mean over ``steps`` steps per size after a warm-up; a single run, so
read differences under ~10 % as noise.  Run it alone on the machine:

    python scripts/step_bench.py MODEL.gguf ADAPTER.gguf [THREADS] [STEPS]
"""

from __future__ import annotations

import sys
import time

from deltamem_edge import Engine


def main(model: str, adapter: str, threads: int, steps: int) -> None:
    for path, scan in ((None, "auto"), (adapter, "standard"), (adapter, "fused")):
        eng = Engine(model, path or False, n_ctx=8 * 512, n_seq_max=8, kv_unified=False, n_threads=threads, scan=scan)
        for n in (1, 2, 4, 8):
            sessions = [eng.session() for _ in range(n)]
            for s in sessions:
                s.feed(list(range(10, 42)), logits="last")
            tokens = {s: 100 for s in sessions}
            for _ in range(3):
                eng.step(tokens)
            t0 = time.perf_counter()
            for _ in range(steps):
                eng.step(tokens)
            dt = (time.perf_counter() - t0) / steps
            print(f"{'none' if path is None else scan:8s} {n} sessions: step {dt * 1e3:7.2f} ms, {n / dt:7.1f} tok/s")
            for s in sessions:
                s.close()
        eng.close()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], int(sys.argv[3]) if len(sys.argv) > 3 else 2,
         int(sys.argv[4]) if len(sys.argv) > 4 else 40)
