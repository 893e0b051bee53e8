"""The benchmark's behaviour (never its timings): workers, variants, ratios, rendering.

The worker tests run a tiny synthetic Qwen3 (2 layers, width 256, Q4_K_M) through
every variant.  Variant (a) needs the stock library; `make test` builds it next to
the patched one (`python -m deltamem_edge.native.build build --stock`), and the
tests fail with that hint when it is missing.
"""

from __future__ import annotations

import json
import struct
import zlib
from pathlib import Path

import pytest

from deltamem_edge import bench as B
from deltamem_edge.bench import models as BM
from deltamem_edge.native import build as native
from deltamem_edge.random_gguf import base_shapes

TINY = BM.Shape(n_layer=2, n_embd=256, n_head=4, n_head_kv=2, head_dim=64, n_ff=512, n_vocab=512)


def _lib(patched: bool) -> Path:
    d = native.installed_library_dir() if patched else native.library_dir(
        native.BuildConfig(native.default_backend(), patched=False))
    assert any(d.glob("libllama.*")), f"{d}: not built; run `python -m deltamem_edge.native.build build --stock`"
    return d


@pytest.fixture(scope="module")
def libs() -> dict[str, Path]:
    return {"patched": _lib(True), "stock": _lib(False)}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory, libs: dict[str, Path]) -> BM.BenchModel:
    cache = tmp_path_factory.mktemp("benchcache")
    return BM.synthetic_model("tiny", TINY, libs["stock"], threads=2, cache=cache)


# ---------------------------------------------------------------------------------------------
# pure functions
# ---------------------------------------------------------------------------------------------


def test_round_order_alternates_and_covers_every_slot():
    slots = ("a", "b", "b2", "c", "d")
    orders = [B.round_order(slots, rep, t, 2) for rep in range(5) for t in range(2)]
    for o in orders:
        assert sorted(o) == sorted(slots)
    assert len({o[0] for o in orders}) == len(slots)  # nobody is always first
    assert orders[1] != orders[0] and orders[1][::-1] != orders[0]


def test_summarize_computes_paired_ratios_and_rates():
    rounds = [
        {"a": {"m": 1.0}, "b": {"m": 2.0}, "c": {"m": 2.2}},
        {"a": {"m": 1.0}, "b": {"m": 4.0}, "c": {"m": 4.0}},
        {"a": {"m": 1.0}, "b": {"m": 3.0}, "c": {"m": 3.6}},
    ]
    s = B.summarize(rounds, {"m": 100})
    assert s["tps"]["a"]["m"] == {"median": 100.0, "min": 100.0, "max": 100.0, "n": 3}
    assert s["tps"]["b"]["m"]["median"] == pytest.approx(100 / 3)
    cb = s["ratios"]["c/b"]["m"]
    assert cb["median"] == pytest.approx(1.1) and cb["min"] == pytest.approx(1.0) and cb["max"] == pytest.approx(1.2)
    assert cb["of_medians"] == pytest.approx(3.6 / 3.0)
    assert s["ratios"]["b/a"]["m"]["median"] == pytest.approx(3.0)
    assert "b2/b" not in s["ratios"] and "d/b" not in s["ratios"]


def test_parse_callgrind_total(tmp_path):
    f = tmp_path / "cg.1"
    f.write_text("# callgrind format\nversion: 1\nevents: Ir\nfn=foo\n1 5\nsummary: 123456\ntotals: 123456\n")
    assert B.parse_callgrind_total(f) == 123456
    assert B.parse_callgrind_total(tmp_path / "missing") is None


def _fake_result(commit: str = "abc1234") -> dict:
    rounds = [{s: {m: t * (1.0 + 0.01 * i) for m, t in (("prefill_128", 1.0), ("prefill_512", 4.0),
                                                        ("prefill_2048", 17.0), ("decode_128", 6.0))}
               for s in ("a", "b", "b2", "c", "d")} for i in range(5)]
    for r in rounds:
        for m in r["c"]:
            r["c"][m] *= 1.02
    tokens = {"prefill_128": 128, "prefill_512": 512, "prefill_2048": 2048, "decode_128": 128}
    mres = {
        "model": {"label": "fake model", "path": "/x/fake.gguf", "adapter": "/x/fake.dmem.gguf", "model_bytes": 2**20,
                  "adapter_bytes": 2**19, "shape": {"n_layer": 2}, "synthetic": True, "gen_seconds": 3.0,
                  "gen_peak_disk_bytes": 2**30},
        "rounds": rounds, "rounds_done": 5, "summary": B.summarize(rounds, tokens),
        "summary_cpu": B.summarize(rounds, tokens),
        "rss": {"a": {"VmHWM": 2**28}, "cd": {"VmHWM": 2**28 + 2**20}},
        "statecost": {"us": {k: [10.0, 12.0, 11.0] for k in ("get", "encode", "file_save", "file_load", "decode", "set",
                                                             "save_total", "load_total", "save_mem", "load_mem")},
                      "state_floats": 2304, "state_bytes": 9216, "encoded_bytes": 9520, "file_bytes": 9520,
                      "shape": [36, 8, 8], "roundtrip_exact": True},
        "seq": {"probe_c": {"512": 512 * 1000 + 100, "2048": 2048 * 1000 + 100}},
        "callgrind": {"b": {"prefill_tokens": 512, "prefill_ir": 2e9, "decode_step_ir": 1e7},
                      "c": {"prefill_tokens": 512, "prefill_ir": 2.04e9, "decode_step_ir": 1.01e7},
                      "ratio_c_b": {"decode_step": 1.01, "prefill": 1.02}, "prefill_tokens": 512},
        "seconds": 60.0,
    }
    return {"schema": 1, "profile": "quick", "command": "deltamem-edge bench --quick",
            "machine": {"cpu": "Test CPU", "cores": 2, "mem_bytes": 2**34, "kernel": "6.x", "python": "3.11",
                        "threads": 2, "commit": commit, "dirty": False, "date": "2026-11-28T22:00:00+00:00",
                        "loadavg_start": [1.0, 1.0, 1.0], "loadavg_end": [1.0, 1.0, 1.0]},
            "libs": {"llama_cpp_commit": "0c1e57098bba43ac29e6e3b677cdceebdd22334f"},
            "metric_names": B.Plan(models=[]).metric_names(), "models": {"fake": mres}, "total_s": 60.0}


def test_seq_table_measures_and_extrapolates():
    rows = {r["tokens"]: r for r in B.seq_table(_fake_result()["models"]["fake"])}
    assert rows[512]["how"] == "measured" and rows[512]["ratio"] == pytest.approx((512 * 1000 + 100) / 9520)
    assert rows[8192]["how"].startswith("extrapolated") and rows[8192]["seq_state_bytes"] == 8192 * 1000 + 100


def test_goals_report_met_and_missed():
    g = {x["goal"]: x for x in B.goals(_fake_result()["models"]["fake"])}
    assert g["decode overhead c/b ≤ 3 %"]["met"]  # +2 %
    assert g["state file ≤ 16 KiB"]["met"]
    assert not g["≥ 1000× smaller than llama.cpp's sequence state at 2048 tokens"]["met"]  # only ~215×
    assert g["state save + load ≤ 1 ms"]["met"]


def test_render_and_doc_history_append(tmp_path):
    doc = tmp_path / "benchmarks.md"
    doc.write_text("# Benchmarks\n\nhand-written notes stay\n")
    B.update_doc(doc, _fake_result("aaaaaaa"), "bench/one.json", "bench/one.png")
    B.update_doc(doc, _fake_result("bbbbbbb"), "bench/two.json", "bench/two.png")
    text = doc.read_text()
    assert "hand-written notes stay" in text
    assert text.count("<!-- profile:quick:begin -->") == 1  # latest replaced, not duplicated
    assert "commit bbbbbbb" in text and "commit aaaaaaa" not in text.split(B.MARK["history"][0])[0]
    hist = text.split(B.MARK["history"][0])[1]
    assert "| aaaaaaa |" in hist and "| bbbbbbb |" in hist  # history keeps both runs
    assert "| decode 128 |" in text and "1.020 (1.020–1.020)" in text  # the c/b column
    assert "Test CPU" in text and "`deltamem-edge bench --quick`" in text


def test_custom_runs_of_different_models_keep_their_own_latest_block(tmp_path):
    doc = tmp_path / "benchmarks.md"
    one, two = _fake_result("aaaaaaa"), _fake_result("bbbbbbb")
    one["profile"] = two["profile"] = "custom"
    two["models"] = {"other-" + k: v for k, v in two["models"].items()}
    B.update_doc(doc, one, "bench/one.json", None)
    B.update_doc(doc, two, "bench/two.json", None)
    latest = doc.read_text().split(B.MARK["history"][0])[0]
    assert "commit aaaaaaa" in latest and "commit bbbbbbb" in latest
    B.update_doc(doc, _fake_result("ccccccc") | {"profile": "custom"}, "bench/three.json", None)
    latest = doc.read_text().split(B.MARK["history"][0])[0]
    assert "commit aaaaaaa" not in latest and "commit ccccccc" in latest and "commit bbbbbbb" in latest
    B.update_doc(doc, _fake_result("ddddddd") | {"profile": "custom", "plan": {"threads": 1}}, "bench/4.json", None)
    latest = doc.read_text().split(B.MARK["history"][0])[0]
    assert "commit ccccccc" in latest and "commit ddddddd" in latest  # another thread count: its own block


def test_plot_writes_a_png(tmp_path):
    p = B.plot_overhead(_fake_result(), tmp_path / "x.png")
    data = p.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    w, h = struct.unpack(">II", data[16:24])
    assert (w, h) == (960, 600)
    # the IDAT chunks decompress to h rows of 1 + (3 or 4)w bytes (8-bit RGB or RGBA; matplotlib writes RGBA
    # and may put text chunks before the image data or split it over several IDATs)
    assert data[24] == 8 and data[25] in (2, 6)
    idat, pos = b"", 8
    while pos < len(data):
        n, kind = struct.unpack(">I4s", data[pos:pos + 8])
        if kind == b"IDAT":
            idat += data[pos + 8:pos + 8 + n]
        pos += 12 + n
    assert len(zlib.decompress(idat)) == h * (1 + (3 if data[25] == 2 else 4) * w)


# ---------------------------------------------------------------------------------------------
# workers on a tiny model
# ---------------------------------------------------------------------------------------------


def test_synthetic_model_files(tiny):
    assert tiny.path.is_file() and tiny.adapter.is_file()
    assert not list(tiny.path.parent.glob("*.f16*")), "the f16 intermediate must be deleted"
    d = base_shapes(tiny.path)
    assert (d["n_layer"], d["n_embd"], d["n_head"], d["n_head_kv"], d["head_dim"], d["n_ff"]) == (2, 256, 4, 2, 64, 512)
    again = BM.synthetic_model("tiny", TINY, _lib(False), cache=tiny.path.parent)  # cached: same files
    assert again.path == tiny.path and again.path.stat().st_mtime == tiny.path.stat().st_mtime


def _worker(tmp_path: Path, lib: Path, name: str) -> B.WorkerProc:
    return B.WorkerProc(name, lib, tmp_path / f"{name}.log")


def test_patched_worker_with_adapter_returns_wellformed_numbers(tiny, libs, tmp_path):
    w = _worker(tmp_path, libs["patched"], "cd")
    try:
        info = w.call("load", model=str(tiny.path), adapter=str(tiny.adapter), threads=1, n_ctx=512, n_batch=64)
        assert info["dmem_symbols"] and info["adapter"] == {"rank": 8, "layers": 2, "state_heads": 1,
                                                            "state_floats": 2 * 8 * 8}
        assert "deltamem_edge._bindings" not in info["python_modules_ours"]
        for write in (True, False):
            d = w.call("decode", prompt=16, n=4, seed=1, write=write)
            assert d["prefill_wall_s"] > 0 and d["decode_wall_s"] > 0 and d["n"] == 4
            p = w.call("prefill", n=128, chunk=64, seed=1, write=write, probe=True)
            assert [m["tokens"] for m in p["marks"]] == [64, 128]
            assert p["marks"][1]["wall_s"] >= p["marks"][0]["wall_s"] > 0
            assert 0 < p["seq_state_bytes"]["64"] < p["seq_state_bytes"]["128"]
        sc = w.call("statecost", reps=3, dir=str(tmp_path))
        assert sc["state_bytes"] == 4 * 128 and sc["file_bytes"] > sc["state_bytes"] and sc["roundtrip_exact"]
        assert all(len(v) == 3 and min(v) >= 0 for v in sc["us"].values())
        seq = w.call("seqsize", lengths=[64, 600])  # 600 > n_ctx: a second, longer context
        assert seq["64"]["seq_state_bytes"] < seq["600"]["seq_state_bytes"]
        assert seq["64"]["seq_get_data_bytes"] == seq["64"]["seq_state_bytes"]
        rss = w.call("rss")
        assert rss["maxrss_bytes"] > 0
        with pytest.raises(Exception, match="unknown command"):
            w.call("nonsense")
    finally:
        w.close()
    assert w.proc.returncode == 0


def test_stock_worker_has_no_dmem_symbols(tiny, libs, tmp_path):
    w = _worker(tmp_path, libs["stock"], "a")
    try:
        info = w.call("load", model=str(tiny.path), adapter=None, threads=1, n_ctx=256, n_batch=64)
        assert info["dmem_symbols"] is False
        assert info["lib"] and Path(info["lib"]).resolve().parent == libs["stock"].resolve()
        assert not any(m in info["python_modules_ours"] for m in ("deltamem_edge._bindings", "deltamem_edge.engine"))
        d = w.call("decode", prompt=16, n=4, seed=1, write=True)
        assert d["decode_wall_s"] > 0
        with pytest.raises(Exception, match="no δ-mem API"):
            w2 = _worker(tmp_path, libs["stock"], "a2")
            try:
                w2.call("load", model=str(tiny.path), adapter=str(tiny.adapter), threads=1, n_ctx=256, n_batch=64)
            finally:
                w2.close()
    finally:
        w.close()


def test_run_end_to_end_tiny(tiny, libs, tmp_path):
    plan = B.Plan(models=["tiny"], reps=2, threads=1, prompt=8, decode=4, prefill=64, chunk=32,
                  seq_lengths=(32, 64, 300), statecost_reps=3, callgrind=False, profile="test")
    res = B.run(plan, out_dir=tmp_path, command="test", stock_lib=libs["stock"], patched_lib=libs["patched"], models={"tiny": tiny})
    mr = res["models"]["tiny"]
    assert mr["rounds_done"] == 2 and set(mr["rounds"][0]) == {"a", "b", "b2", "c", "d"}
    for key in ("c/b", "d/b", "b/a", "b2/b"):
        for met in B.METRICS:
            r = mr["summary"]["ratios"][key][met]
            assert r["n"] == 2 and r["min"] <= r["median"] <= r["max"] and r["min"] > 0
    assert mr["load"]["a"]["dmem_symbols"] is False and mr["load"]["cd"]["dmem_symbols"] is True
    rows = {r["tokens"]: r for r in B.seq_table(mr, (32, 64, 300))}
    assert rows[300]["how"] == "measured" and rows[300]["ratio"] > 1
    # the stock and patched libraries agree on the sequence state size
    assert mr["seq"]["probe_a"] == mr["seq"]["probe_c"]
    json.dumps(res, default=str)
    doc = tmp_path / "benchmarks.md"
    B.update_doc(doc, res, "r.json", "r.png")
    assert "| prefill 8 |" in doc.read_text() and "| decode 4 |" in doc.read_text()


def test_rebuild_doc_from_json(tmp_path):
    for i, commit in enumerate(("aaaaaaa", "bbbbbbb")):
        (tmp_path / f"2026112{i}-{commit}-quick.json").write_text(json.dumps(_fake_result(commit)))
    (tmp_path / "server-20261122-ccccccc.json").write_text(json.dumps({"variants": {}}))  # bench-server's own
    doc = tmp_path / "benchmarks.md"
    assert B.rebuild_doc(doc, tmp_path) == 2
    assert B.rebuild_doc(doc, tmp_path) == 2  # idempotent: history is re-rendered, not appended twice
    hist = doc.read_text().split(B.MARK["history"][0])[1]
    assert hist.count("| aaaaaaa |") == 1 and hist.count("| bbbbbbb |") == 1
    assert "(2026112" in doc.read_text() or "20261121-bbbbbbb-quick.json" in doc.read_text()
