"""What batching can give on this machine: one llama_decode of 1 token, of 8 tokens (logits of the
last or of all), and of 8 sessions x 1 token (``Engine.step``, the server's batched step).

Why: the server's target "aggregate tokens/s at 8 users >= 3x one user" is bounded by how much
cheaper per token an 8-row decode is than a 1-row one.  If the 8-session step costs what
llama.cpp's own 8-token batch with logits costs, our batching adds nothing and the rest is the
hardware.  Run it alone on the machine:

    python scripts/batch_bound.py MODEL.gguf [ADAPTER.gguf]
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable

from deltamem_edge import Engine

PROMPT = list(range(10, 42))


def per_call_ms(f: Callable[[], None], n: int = 10) -> float:
    f()  # warm-up (graph build)
    t0 = time.perf_counter()
    for _ in range(n):
        f()
    return 1e3 * (time.perf_counter() - t0) / n


def main(model: str, adapter: str | None) -> None:
    eng = Engine(model, adapter or False, n_ctx=4096, n_seq_max=8, kv_unified=False, n_threads=2)
    sessions = [eng.session() for _ in range(8)]
    for s in sessions:
        s.feed(PROMPT, logits="last")
    s0 = sessions[0]

    def one() -> None:
        s0.feed([50], write=False, logits="last")
        s0.truncate(len(PROMPT))

    def eight(logits: str) -> Callable[[], None]:
        def f() -> None:
            s0.feed(list(range(50, 58)), write=False, logits=logits)
            s0.truncate(len(PROMPT))
        return f

    def step() -> None:
        eng.step({s: 50 for s in sessions}, write=False)
        for s in sessions:
            s.truncate(len(PROMPT))

    rows = [("1 token", 1, one), ("8 tokens of one sequence, logits of the last", 8, eight("last")),
            ("8 tokens of one sequence, logits of every token", 8, eight("all")),
            ("8 sessions x 1 token (Engine.step)", 8, step)]
    for label, n, f in rows:
        ms = per_call_ms(f)
        print(f"{label:50s} {ms:7.1f} ms {n / ms * 1e3:7.1f} tok/s")


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2] if len(sys.argv) > 2 else None)
