"""Every PNG chart of the project (per-layer state norms, benchmark overheads), drawn with matplotlib.

matplotlib is an optional extra (``pip install 'deltamem-edge[plot]'``); chatting never needs it.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from .errors import DeltaMemError


def _pyplot():
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as e:
        raise DeltaMemError("plotting needs matplotlib", hint="pip install 'deltamem-edge[plot]'") from e
    return plt


def bar_chart_png(path: str | Path, values: Sequence[float], *, title: str, xlabel: str, ylabel: str) -> Path:
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(max(4.0, 0.22 * len(values) + 2), 3.2), dpi=120)
    ax.bar(range(len(values)), values, color="#3b6ea5")
    ax.set_title(title, fontsize=9)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return Path(path)


def line_chart_png(path: str | Path, x: Sequence[float], series: dict[str, Sequence[float]], *, title: str,
                   xlabel: str, ylabel: str, logx: bool = False) -> Path:
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 3.6), dpi=120)
    for name, ys in series.items():
        ax.plot(list(x), list(ys), marker="o", label=name)
    if logx:
        ax.set_xscale("log", base=2)
    ax.set_title(title, fontsize=9)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return Path(path)


# the benchmark's colours (matplotlib's tab10, in the order its first charts used)
_RATIO_COLORS = ("tab:blue", "tab:red", "tab:green", "tab:purple", "tab:orange", "tab:cyan", "tab:brown", "tab:pink")


def ratio_chart_png(path: str | Path, series: Sequence[tuple[str, Sequence[tuple[float, float, float, float]], bool]],
                    band: dict[float, tuple[float, float]], *, title: str, xlabel: str, ylabel: str,
                    band_label: str, ref: float = 1.0, size: tuple[int, int] = (960, 600)) -> Path:
    """Ratios against a log2 x axis: per series (label, [(x, median, min, max)], dashed) a line through the
    medians with min–max bars, a grey range per x (``band``: x -> (lo, hi)) and a dashed line at ``ref``.

    The PNG is exactly ``size`` pixels; the series are nudged apart along x so their bars do not overlap.
    """
    import math

    plt = _pyplot()
    dpi = 100
    fig, ax = plt.subplots(figsize=(size[0] / dpi, size[1] / dpi), dpi=dpi)
    fig.subplots_adjust(left=0.09, right=0.74, top=0.9, bottom=0.12)
    allx = sorted({p[0] for _label, pts, _dashed in series for p in pts}) or [128, 2048]
    ally = [v for _label, pts, _dashed in series for p in pts for v in p[1:]] + \
        [v for lo_hi in band.values() for v in lo_hi] + [ref]
    lx0, lx1 = math.log2(min(allx)) - 0.3, math.log2(max(allx)) + 0.3
    y0, y1 = min(ally), max(ally)
    pad = max(0.02, (y1 - y0) * 0.08)
    px = (lx1 - lx0) / (size[0] * 0.65)  # log2 units per pixel of the plot area
    for i, (x, (lo, hi)) in enumerate(sorted(band.items())):
        ax.fill_between([x * 2 ** (-18 * px), x * 2 ** (18 * px)], lo, hi, color="0.88", linewidth=0,
                        label=band_label if i == 0 else None, zorder=1)
    ax.axhline(ref, color="0.47", linestyle=(0, (6, 6)), linewidth=1, zorder=2)
    for i, (label, pts, dashed) in enumerate(series):
        color = _RATIO_COLORS[i % len(_RATIO_COLORS)]
        style = "--" if dashed else "-"
        if not pts:
            ax.plot([], [], color=color, linestyle=style, linewidth=2, label=label)
            continue
        nudge = 2 ** ((4 * (i + 1) - 2 * len(series)) * px)
        ax.errorbar([p[0] * nudge for p in pts], [p[1] for p in pts],
                    yerr=[[p[1] - p[2] for p in pts], [p[3] - p[1] for p in pts]], color=color, linestyle=style,
                    linewidth=2, marker="s", markersize=5, elinewidth=1, capsize=0, label=label, zorder=3)
    ax.set_xscale("log", base=2)
    ax.set_xlim(2 ** lx0, 2 ** lx1)
    ax.set_ylim(y0 - pad, y1 + pad)
    ax.set_xticks(allx, labels=[f"{x:g}" for x in allx])
    ax.minorticks_off()
    ax.grid(axis="y", color="0.92", zorder=0)
    ax.set_title(title, fontsize=11)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.legend(loc="upper left", bbox_to_anchor=(1.02, 1.0), fontsize=8, frameon=False)
    fig.savefig(path, dpi=dpi)
    plt.close(fig)
    return Path(path)
