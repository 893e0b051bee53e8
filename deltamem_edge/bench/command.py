"""`deltamem-edge bench` end to end: find (or build) both libraries, run the plan, write JSON, chart and doc."""

from __future__ import annotations

import datetime as _dt
import json
import os
import shlex
import sys
from pathlib import Path

from ..errors import DeltaMemError
from .chart import plot_overhead
from .plan import REPO_ROOT, Plan
from .report import update_doc
from .runner import _say, run


def libraries(build_stock: bool = True) -> tuple[Path, Path]:
    """(stock, patched) library folders, building the stock one on first use (a few minutes, cached)."""
    from ..native import build as native

    backend = native.default_backend()
    patched = native.installed_library_dir()
    stock_cfg = native.BuildConfig(backend, patched=False)
    stock = native.library_dir(stock_cfg)
    if not (stock / "libllama.so").exists() and not any(stock.glob("libllama.*")):
        if not build_stock:
            raise DeltaMemError("the stock llama.cpp library is not built", path=stock)
        _say("building stock llama.cpp (same commit and flags, no patch) for variant a; cached afterwards")
        stock = native.build(stock_cfg)
    return stock, patched


def main(plan: Plan, *, out_dir: Path | None = None, doc: Path | None = None, command: str | None = None) -> dict:
    out_dir = out_dir or REPO_ROOT / "docs" / "bench"
    if doc is None:
        doc = REPO_ROOT / "docs" / "benchmarks.md" if out_dir.resolve() == (REPO_ROOT / "docs" / "bench").resolve() \
            else out_dir / "benchmarks.md"
    out_dir.mkdir(parents=True, exist_ok=True)
    command = command or "deltamem-edge " + " ".join(shlex.quote(a) for a in sys.argv[1:])
    stock, patched = libraries()
    result = run(plan, out_dir=out_dir, command=command, stock_lib=stock, patched_lib=patched)
    m = result["machine"]
    stamp = _dt.datetime.now().strftime("%Y%m%d-%H%M")
    base = f"{stamp}-{m['commit'] or 'nocommit'}-{plan.profile}"
    json_path = out_dir / f"{base}.json"
    json_path.write_text(json.dumps(result, indent=1, default=str))
    try:
        png: Path | None = plot_overhead(result, out_dir / f"{base}.png")
    except DeltaMemError as e:  # no matplotlib (the `plot` extra): keep the numbers and the tables, skip the chart
        _say(f"no chart: {e}")
        png = None
    prefix = os.path.relpath(out_dir.resolve(), doc.parent.resolve())
    prefix = "" if prefix == "." else prefix + "/"
    update_doc(doc, result, prefix + json_path.name, prefix + png.name if png else None)
    _say(f"wrote {json_path}, {png or 'no chart'} and {doc} ({result['total_s'] / 60:.1f} min)")
    return result
