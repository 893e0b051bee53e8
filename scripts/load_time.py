"""Load time without an adapter: ``Engine(model, False)`` against stock llama-cpp-python's low-level load.

Each load runs in a fresh process (nothing cached in Python), the two alternating, timed from
before ``llama_model_load_from_file`` to after the context exists, same ``n_ctx`` and threads.
The stock side loads llama-cpp-python against the stock library of our build cache.  Run it
alone on the machine:

    python scripts/load_time.py MODEL.gguf N_PAIRS N_CTX STOCK_LIB_DIR
"""

from __future__ import annotations

import os
import statistics
import subprocess
import sys


def timed_load(code: str, env: dict[str, str]) -> float:
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True)
    return float(out.stdout.strip().splitlines()[-1])


def main(model: str, pairs: int, n_ctx: int, stock_lib: str) -> None:
    ours = (f"import time\nfrom deltamem_edge import Engine\nt0 = time.perf_counter()\n"
            f"e = Engine({model!r}, False, n_ctx={n_ctx}, n_threads=2)\nprint(time.perf_counter() - t0)\n")
    stock = (f"import time\nimport llama_cpp as L\nL.llama_backend_init()\nt0 = time.perf_counter()\n"
             f"m = L.llama_model_load_from_file({model!r}.encode(), L.llama_model_default_params())\n"
             f"cp = L.llama_context_default_params(); cp.n_ctx = {n_ctx}; cp.n_batch = 512\n"
             f"cp.n_threads = cp.n_threads_batch = 2; cp.no_perf = True\n"
             f"c = L.llama_init_from_model(m, cp)\nprint(time.perf_counter() - t0)\n")
    envs = {"ours": dict(os.environ), "stock": dict(os.environ, LLAMA_CPP_LIB_PATH=stock_lib)}
    codes = {"ours": ours, "stock": stock}
    times: dict[str, list[float]] = {"ours": [], "stock": []}
    for i in range(pairs):
        for name in ("ours", "stock") if i % 2 == 0 else ("stock", "ours"):
            times[name].append(timed_load(codes[name], envs[name]))
    for name, xs in times.items():
        print(f"{name:5s} median {statistics.median(xs):.3f} s  " + " ".join(f"{x:.3f}" for x in xs))


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4])
