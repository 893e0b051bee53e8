"""`deltamem-edge bench-server` end to end on the tiny test model, and its arithmetic on known numbers.

The real run (SmolLM2, 1/4/8 users) takes minutes and needs a quiet machine; here the
same code path runs with 1 and 2 users, 2 requests each, one round: both server
processes start, every phase is measured, the memories hold exactly the turns sent, the
JSON and the markdown table are written, and a second run replaces the table instead of
adding one.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from deltamem_edge.bench import server as BS

# ``chat_files`` (tests/conftest.py): the tiny chat model and adapter the server tests serve


def test_bench_server_runs_end_to_end(chat_files, tmp_path):
    out = tmp_path / "out"
    doc = out / "benchmarks.md"
    out.mkdir()
    doc.write_text("# Benchmarks\n\nWritten by hand, kept.\n")
    cmd = [sys.executable, "-m", "deltamem_edge", "bench-server", "-m", str(chat_files["model"]), "-a",
           str(chat_files["adapter"]), "--users", "1,2", "-r", "2", "--max-tokens", "6", "-n", "1", "-t", "1",
           "--ctx-per-user", "256", "--out", str(out)]
    for _ in range(2):
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr[-3000:]
    runs = sorted(out.glob("server-*.json"))
    assert runs
    result = json.loads(runs[-1].read_text())
    assert result["plan"]["users"] == [1, 2] and len(result["rounds"]) == 1
    for v in ("dmem", "vanilla"):
        for n in ("1", "2"):
            phase = result["rounds"][0][v][n]
            assert phase["requests"] == int(n) * 2  # the warm-up requests are not timed
            assert 0 <= phase["tokens"] <= phase["requests"] * 6
            assert phase["tok_s"] == pytest.approx(phase["tokens"] / phase["wall_s"])
            assert 0 < phase["ttft_ms_median"] <= phase["ttft_ms_p90"] < phase["wall_s"] * 1000
    # user 0 talks in both phases, user 1 only with 2 users: (1 warm-up + 2 timed) requests per phase
    assert result["memory_turns"] == {"bench-user-0": 6, "bench-user-1": 3}
    text = doc.read_text()
    assert text.startswith("# Benchmarks\n\nWritten by hand, kept.\n")
    assert text.count(BS.DOC_BEGIN) == text.count(BS.DOC_END) == 1  # the second run replaced the table
    table = text[text.index(BS.DOC_BEGIN):text.index(BS.DOC_END)]
    assert table.count("| δ-mem, a memory per user |") == 2 and table.count("| no adapter, stateless |") == 2
    assert f"]({runs[-1].name})" in table


def test_summary_pairs_ratios_per_round():
    """Ratios are taken per round, then summarised (not a ratio of medians)."""
    def phase(tok_s: float) -> dict[str, float]:
        return {"tok_s": tok_s, "req_s": tok_s / 10, "ttft_ms_median": 5.0, "ttft_ms_p90": 9.0,
                "decode_tok_s_per_request": tok_s}

    rounds = [{"dmem": {"1": phase(90), "8": phase(270)}, "vanilla": {"1": phase(100), "8": phase(300)}},
              {"dmem": {"1": phase(50), "8": phase(200)}, "vanilla": {"1": phase(40), "8": phase(250)}}]
    plan = BS.ServerPlan(model=Path("m"), adapter=Path("a"), label="x", users=(1, 8), rounds=2)
    s = BS.summarize(rounds, plan)
    assert s["1"]["dmem_over_vanilla_tok_s"] == {"median": pytest.approx(1.075), "min": 0.9, "max": 1.25, "n": 2}
    assert s["8"]["dmem_over_vanilla_tok_s"]["min"] == pytest.approx(0.8)
    assert s["8"]["dmem"]["scaling"]["max"] == pytest.approx(4.0)  # 200 / 50 in round 2
    assert s["8"]["vanilla"]["tok_s"]["median"] == pytest.approx(275)
