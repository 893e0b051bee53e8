"""The examples in docs/embedding.md run as written (they would rot otherwise)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

DOC = Path(__file__).resolve().parent.parent / "docs" / "embedding.md"
BLOCKS = re.findall(r"```python\n(.*?)```", DOC.read_text(), flags=re.S)


@pytest.mark.parametrize("index", range(len(BLOCKS)))
def test_embedding_example_runs(index, capsys):
    assert len(BLOCKS) >= 2
    exec(compile(BLOCKS[index], f"{DOC.name}[{index}]", "exec"), {"__name__": "__doc_example__"})
    out = capsys.readouterr().out
    if index == 0:
        assert "assistant 1 " in out  # role, turns, tokens written after the first run
