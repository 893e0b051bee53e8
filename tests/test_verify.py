"""`deltamem-edge verify`: it passes where engine and reference agree, and it can fail.

On the real SmolLM2-135M Q4_1 the reference works from dequantized weights while
llama.cpp also rounds activations, so the base model alone already differs (the
quantization floor); verify judges the adapter's extra error against that floor.
"""

from __future__ import annotations

import numpy as np
import pytest
from ggufs import write_random_adapter, write_tiny_model

from deltamem_edge import reference
from deltamem_edge.cli.main import main
from deltamem_edge.defaults import default_model_path
from deltamem_edge.verify import verify


@pytest.fixture(scope="module")
def smol_adapter(tmp_path_factory: pytest.TempPathFactory):
    d = tmp_path_factory.mktemp("verify")
    return write_random_adapter(d / "a.dmem.gguf", default_model_path(), rank=8, seed=1)


def test_verify_passes_on_smollm2_q4_1(smol_adapter):
    r = verify(default_model_path(), smol_adapter, n_tokens=64, n_threads=2)
    assert r.quantized and r.conclusive  # the adapter's effect is well above the quantization floor
    assert r.effect_rel > 3 * r.base_rel_err
    assert r.passed, r


def test_verify_fails_when_the_memory_math_differs(smol_adapter, monkeypatch):
    """Scale the reference's δ corrections by 1.5: the same check must now fail."""
    original = reference.delta_outputs

    def skewed(reads, w, cfg):
        return {h: 1.5 * d for h, d in original(reads, w, cfg).items()}

    monkeypatch.setattr(reference, "delta_outputs", skewed)
    r = verify(default_model_path(), smol_adapter, n_tokens=64, n_threads=2)
    assert r.conclusive and not r.passed


def test_verify_cli_on_a_float_model(tmp_path, capsys):
    model = write_tiny_model(tmp_path / "m.gguf", "qwen3")
    write_random_adapter(tmp_path / "m.dmem.gguf", model, rank=8)  # found next to the model
    assert main(["verify", "-m", str(model), "--tokens", "32", "--json"]) == 0
    out = capsys.readouterr().out
    assert '"passed": true' in out
    import json

    report = json.loads(out)
    assert report["adapter_rel_err"] < 1e-4 and not report["quantized"]
    assert np.isfinite(report["state_rel_err"])
