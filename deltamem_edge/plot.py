"""Small PNG charts (per-layer state norms, benchmark overheads) with matplotlib.

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
