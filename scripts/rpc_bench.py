"""Loopback cost of llama.cpp's RPC backend, with and without δ-mem: the numbers in docs/distributed.md.

    python scripts/rpc_bench.py [--rounds 5] [--threads 2] [--prompt 128] [--decode 64] [--model M --adapter A]

It starts two rpc-servers on 127.0.0.1 with our own command (``deltamem-edge rpc-server -t THREADS``),
then runs four configurations per round in rotating order: the model all local, and all its layers
split over the two servers (``-ngl -1``, llama.cpp's split), each without an adapter and with δ-mem.
Every measurement is a fresh Python process (an rpc-server serves one client at a time), which
loads, prefills PROMPT tokens in one call, then decodes DECODE tokens one at a time.  The table
gives medians over the rounds and the ratios.  Default model: the embedded SmolLM2-135M with the
shipped adapter.  Run it on a quiet machine: both cores are used.

Why not ``deltamem-edge bench --rpc``: the bench keeps one worker process per variant alive side by
side for its interleaved rounds, and an rpc-server would serve only the first of them.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

CONFIGS = ("local", "local+δ", "rpc", "rpc+δ")


def child(spec: dict) -> dict:
    import numpy as np

    from deltamem_edge import Engine

    t0 = time.perf_counter()
    eng = Engine(spec["model"], spec["adapter"] if spec["delta"] else False, n_ctx=1024,
                 n_threads=spec["threads"], rpc_servers=spec["servers"] or None)
    load_s = time.perf_counter() - t0
    rng = np.random.default_rng(7)
    ids = [int(t) for t in rng.integers(100, eng.n_vocab - 100, spec["prompt"] + spec["decode"])]
    s = eng.session()
    s.feed(ids[:2], logits="last")  # warm-up: first graph allocations
    s.reset()
    t0 = time.perf_counter()
    s.feed(ids[:spec["prompt"]], logits="last")
    prefill_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    for tok in ids[spec["prompt"]:]:
        s.feed([tok], logits="last")
    decode_s = time.perf_counter() - t0
    devices = sorted(set(eng.adapter.devices)) if eng.adapter else []
    eng.close()
    return {"load_s": load_s, "prefill_tps": spec["prompt"] / prefill_s, "decode_tps": spec["decode"] / decode_s,
            "devices": devices}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--prompt", type=int, default=128)
    ap.add_argument("--decode", type=int, default=64)
    ap.add_argument("--model")
    ap.add_argument("--adapter")
    ap.add_argument("--child")
    args = ap.parse_args()
    if args.child:
        print(json.dumps(child(json.loads(args.child))))
        return 0

    from deltamem_edge import defaults, rpc

    model = args.model or str(defaults.default_model_path())
    adapter = args.adapter or str(defaults.default_adapter_path())
    servers, procs = [], []
    try:
        for port in (50352, 50353):
            procs.append(subprocess.Popen([sys.executable, "-m", "deltamem_edge", "rpc-server", "--port", str(port),
                                           "-t", str(args.threads)], stdout=subprocess.DEVNULL,
                                          stderr=subprocess.DEVNULL))
            ep = rpc.Endpoint("127.0.0.1", port)
            for _ in range(300):
                try:
                    rpc.probe(ep)
                    break
                except rpc.RpcError:
                    time.sleep(0.1)
            servers.append(str(ep))
        results: dict[str, list[dict]] = {c: [] for c in CONFIGS}
        for r in range(args.rounds):
            order = CONFIGS[r % 4:] + CONFIGS[:r % 4]
            for name in order:
                spec = {"model": model, "adapter": adapter, "delta": name.endswith("δ"), "threads": args.threads,
                        "servers": ",".join(servers) if name.startswith("rpc") else "", "prompt": args.prompt,
                        "decode": args.decode}
                out = subprocess.run([sys.executable, __file__, "--child", json.dumps(spec)], capture_output=True,
                                     text=True, check=True)
                results[name].append(json.loads(out.stdout.splitlines()[-1]))
            print(f"round {r + 1}/{args.rounds} done", file=sys.stderr, flush=True)
    finally:
        for p in procs:
            p.kill()
            p.wait()

    def med(name: str, key: str) -> float:
        return statistics.median(x[key] for x in results[name])

    print(f"model {Path(model).name}, adapter {Path(adapter).name}, {args.rounds} rounds, {args.threads} threads "
          f"(client and each server), prompt {args.prompt}, decode {args.decode}; devices with δ-mem: "
          f"local {results['local+δ'][0]['devices']}, rpc {results['rpc+δ'][0]['devices']}\n")
    print("| configuration | prefill tok/s | decode tok/s | load s |")
    print("|---|---|---|---|")
    for name in CONFIGS:
        print(f"| {name} | {med(name, 'prefill_tps'):.1f} | {med(name, 'decode_tps'):.1f} | {med(name, 'load_s'):.2f} |")
    print()
    for what in ("prefill_tps", "decode_tps"):
        print(f"{what.split('_')[0]}: rpc/local {med('rpc', what) / med('local', what):.3f}, "
              f"rpc+δ/local+δ {med('rpc+δ', what) / med('local+δ', what):.3f}, "
              f"δ/none local {med('local+δ', what) / med('local', what):.3f}, "
              f"δ/none rpc {med('rpc+δ', what) / med('rpc', what):.3f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
