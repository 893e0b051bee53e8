"""`deltamem-edge bench`: stock llama.cpp vs our patched library vs δ-mem, side by side.

Variants ("slots"), each a worker process (``bench.worker``) that loads its model once:

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

The package, one job per module (everything the CLI and the tests use is re-exported here):

    plan       the slots, metrics, `Plan` and its profiles
    runner     worker processes, rounds in rotating order, one model after another
    stats      medians, min–max, paired per-round ratios
    callgrind  instruction counts inside llama_decode
    machine    what a run was measured on
    derived    sequence state sizes (measured or extrapolated), the goals
    report     markdown and docs/benchmarks.md (latest blocks, history, rebuild)
    chart      the overhead chart's numbers (drawn by ``deltamem_edge.plot``)
    command    `deltamem-edge bench` end to end
    models     the benchmark's models: SmolLM2 and synthetic Qwen3 shapes, random adapters
    worker     the worker process (``python -m deltamem_edge.bench.worker``)
    server     `deltamem-edge bench-server`, the HTTP server under concurrent users
"""

from __future__ import annotations

from .callgrind import callgrind_available, parse_callgrind_total, run_callgrind
from .chart import plot_overhead
from .command import libraries, main
from .derived import GOALS, goals, names_of, seq_table
from .machine import machine_info
from .plan import METRICS, PROFILES, RATIOS, REPO_ROOT, SLOT_LABELS, SLOT_WORKER, Plan
from .report import DOC_TEMPLATE, HISTORY_HEAD, MARK, history_row, latest_key, rebuild_doc, render_run, update_doc
from .runner import WorkerProc, round_order, run, run_model
from .stats import metric_cpu_seconds, metric_seconds, summarize, us_stats

__all__ = [
    "DOC_TEMPLATE", "GOALS", "HISTORY_HEAD", "MARK", "METRICS", "PROFILES", "RATIOS", "REPO_ROOT", "SLOT_LABELS",
    "SLOT_WORKER", "Plan", "WorkerProc", "callgrind_available", "goals", "history_row", "latest_key", "libraries",
    "machine_info", "main", "metric_cpu_seconds", "metric_seconds", "names_of", "parse_callgrind_total",
    "plot_overhead", "rebuild_doc", "render_run", "round_order", "run", "run_callgrind", "run_model", "seq_table",
    "summarize", "update_doc", "us_stats",
]
