"""The native build cache: keys and pruning (no compiler needed)."""

from __future__ import annotations

import os
from pathlib import Path

from deltamem_edge.native import build as native


def _entry(root: Path, sub: str, name: str, mtime: float) -> Path:
    d = root / sub / name
    d.mkdir(parents=True)
    os.utime(d, (mtime, mtime))
    return d


def test_prune_keeps_the_newest_of_each_kind(tmp_path):
    # a stock library built once, long ago, and many patched rebuilds since: the stock one stays
    stock = _entry(tmp_path, "lib", "cpu-stock-aaaaaaaaaaaaaaaa", 1000.0)
    patched = [_entry(tmp_path, "lib", f"cpu-{i:016x}", 2000.0 + i) for i in range(6)]
    cuda = _entry(tmp_path, "build", "cuda-bbbbbbbbbbbbbbbb", 500.0)
    native._prune_old(tmp_path, keep=3)
    assert stock.exists() and cuda.exists()
    assert [p.exists() for p in patched] == [False, False, False, True, True, True]


def test_cache_keys_differ_by_kind_and_flags():
    keys = {native.build_key(native.BuildConfig(backend=b, patched=p)) for b in ("cpu", "cuda") for p in (True, False)}
    assert len(keys) == 4
    assert all(k.rsplit("-", 1)[0] in ("cpu", "cpu-stock", "cuda", "cuda-stock") for k in keys)
