"""The chart next to every run's JSON: time ratios against prompt length, drawn by ``deltamem_edge.plot``.

This module only picks the numbers out of a result (which ratios, which lengths, the A/A band);
the drawing is matplotlib's, in the one plotting module.
"""

from __future__ import annotations

from pathlib import Path

from .plan import METRICS


def plot_overhead(result: dict, path: Path) -> Path:
    """Time ratio (c/b, d/b, b/a) against prompt length per model, with min–max bars and the A/A band."""
    from ..plot import ratio_chart_png

    names = result.get("metric_names") or {}
    pre = [m for m in METRICS if m.startswith("prefill")]
    xs_tokens = {m: int(names.get(m, m).split()[-1]) if names.get(m, m).split()[-1].isdigit() else 0 for m in pre}
    series = []  # (label, points [(x, med, lo, hi)], dashed)
    band = []
    for model, mr in result["models"].items():
        rat = mr["summary"]["ratios"]
        for key in ("c/b", "d/b", "b/a"):
            if key in rat:
                pts = [(xs_tokens[m], rat[key][m]["median"], rat[key][m]["min"], rat[key][m]["max"])
                       for m in pre if m in rat[key] and xs_tokens[m]]
                series.append((f"{model} {key}", pts, key != "c/b"))
        if "b2/b" in rat:
            band += [(xs_tokens[m], rat["b2/b"][m]["min"], rat["b2/b"][m]["max"]) for m in pre
                     if m in rat["b2/b"] and xs_tokens[m]]
    # A/A band: grey, the envelope of all models' b2/b min–max per length
    env: dict[int, list[float]] = {}
    for x, lo, hi in band:
        e = env.setdefault(x, [lo, hi])
        e[0], e[1] = min(e[0], lo), max(e[1], hi)
    return ratio_chart_png(path, series, {x: (lo, hi) for x, (lo, hi) in env.items()},
                           title="Time ratio vs prompt length (> 1 = slower)", xlabel="prompt tokens",
                           ylabel="time ratio", band_label="A/A b2/b range")
