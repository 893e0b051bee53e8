"""`deltamem-edge memory inspect|diff|export|reset` on state files written by the statefile module."""

from __future__ import annotations

import json

import numpy as np
import pytest

from deltamem_edge import statefile as sf
from deltamem_edge.cli.main import main


def _write(path, seed: int, turns: int = 3) -> np.ndarray:
    state = np.random.default_rng(seed).normal(size=(4, 8, 8)).astype(np.float32)
    mem = sf.MemoryState.new(adapter_fp=b"a" * 32, model_fp=b"m" * 32, state=state, adapter_label="adapter-x",
                             model_label="model-y")
    import dataclasses

    mem = dataclasses.replace(mem, header=dataclasses.replace(mem.header, tokens_written=123, turns=turns),
                              transcript=[{"role": "user", "content": "hi"}, {"role": "assistant", "content": "ho"}])
    with sf.MemoryFile(path) as f:
        f.save(mem)
    return state


def test_inspect_text_json_and_plot(tmp_path, capsys):
    path = tmp_path / "me.state"
    state = _write(path, 1)
    assert main(["memory", "inspect", str(path)]) == 0
    out = capsys.readouterr().out
    assert "123 tokens in 3 turns" in out and "adapter-x" in out and "4 layers × 8 rows × 8" in out
    assert main(["memory", "inspect", str(path), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    np.testing.assert_allclose(info["layer_norms"], np.linalg.norm(state.reshape(4, -1), axis=1), rtol=1e-5)
    png = tmp_path / "norms.png"
    assert main(["memory", "inspect", str(path), "--plot", str(png)]) == 0
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_diff_and_export(tmp_path, capsys):
    a, b = tmp_path / "a.state", tmp_path / "b.state"
    sa, sb = _write(a, 1), _write(b, 2)
    assert main(["memory", "diff", str(a), str(b)]) == 0
    out = capsys.readouterr().out
    assert "same adapter and model" in out and f"{float(np.abs(sa - sb).max()):.6g}" in out
    npz = tmp_path / "a.npz"
    assert main(["memory", "export", str(a), "-o", str(npz)]) == 0
    np.testing.assert_array_equal(np.load(npz)["state"], sa)
    js = tmp_path / "a.json"
    assert main(["memory", "export", str(a), "-o", str(js)]) == 0
    np.testing.assert_allclose(np.array(json.loads(js.read_text())["state"], dtype=np.float32), sa)


def test_reset_erases_but_keeps_identity(tmp_path):
    path = tmp_path / "me.state"
    _write(path, 3)
    assert main(["memory", "reset", str(path), "--yes"]) == 0
    mem = sf.read_state_file(path)
    assert np.abs(mem.state).max() == 0 and mem.header.turns == 0 and mem.header.tokens_written == 0
    assert mem.header.adapter_fp == b"a" * 32 and mem.transcript == []


@pytest.mark.parametrize("content", [b"", b"DMEMSTAT" + b"\x00" * 300, b"not a state file at all"])
def test_bad_files_give_one_line_errors(tmp_path, capsys, content):
    path = tmp_path / "bad.state"
    path.write_bytes(content)
    assert main(["memory", "inspect", str(path)]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err[0].startswith("error: ") and str(path) in err[0] and "Traceback" not in "\n".join(err)
    assert path.read_bytes() == content
