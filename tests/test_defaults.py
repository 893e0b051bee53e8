"""The embedded default model is found, and the committed placeholder adapter is reproducible."""

from __future__ import annotations

import hashlib

from deltamem_edge import defaults
from deltamem_edge.fingerprint import adapter_fingerprint

PLACEHOLDER_SHA256 = "df2cf9c232e49993cde5352a01a45ed7d7c49b34cd661ecb7ccd7c549949023a"  # models/README.md


def test_default_model_is_the_smollm2_wheel():
    path = defaults.default_model_path()
    assert path.name == "SmolLM2-135M-Instruct.Q4_1.gguf" and path.stat().st_size > 90_000_000


def test_placeholder_adapter_is_rebuilt_bit_for_bit(tmp_path):
    committed = defaults.REPO_MODELS / defaults.PLACEHOLDER_NAME
    assert hashlib.sha256(committed.read_bytes()).hexdigest() == PLACEHOLDER_SHA256
    rebuilt = defaults.make_placeholder_adapter(defaults.default_model_path(), tmp_path / "p.dmem.gguf")
    assert rebuilt.read_bytes() == committed.read_bytes()
    assert adapter_fingerprint(rebuilt) == adapter_fingerprint(committed)
