"""Statistics of the rounds: tokens/s per slot and time ratios paired per round (median, min–max).

Ratios are taken within each round, not of the medians, because on these 2-core VMs two
identical processes differ by ±10-20 % in wall time; ``of_medians`` is kept next to them.
"""

from __future__ import annotations

import statistics
from typing import Any

from .plan import RATIOS


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
