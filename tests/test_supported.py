"""One set of limits and architectures: the native loader, the converter, the state file and the reference agree.

The C++ loader keeps its own copies of the numbers (``llama-dmem-impl.h``) and reports
the limits through its C API (``llama_dmem_max_*``): these tests ask the loaded library
and compare with ``deltamem_edge.supported``.  What the API does not report (the
architectures, the schema names, that the layer bound is the model's) is read out of the
source.  Then the edge cases run end to end on a tiny random model: 20 and 64 state heads
(above the state file's old 16) attach, chat, save and load back bit-identically; 65 heads
and rank 33 are refused at attach with an AdapterError, and the converter refuses them
before writing anything.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
from engines import exact_engine
from ggufs import write_random_adapter, write_tiny_model

from deltamem_edge import Engine, supported
from deltamem_edge import gguf_schema as S
from deltamem_edge import statefile as sf
from deltamem_edge.conversation import Conversation
from deltamem_edge.converter import base_model as conv_base_model
from deltamem_edge.converter import model as conv_model
from deltamem_edge.converter.config import config_from_dict
from deltamem_edge.errors import AdapterError, ConversionError, DeltaMemError
from deltamem_edge.native import build
from deltamem_edge.reference import ROPE_TYPE, RefAdapter, RefModel
from deltamem_edge.sampling import SamplingParams
from deltamem_edge.statefile import format as state_format

NATIVE_SRC = Path(build.NATIVE_DIR) / "src"
IMPL_H = NATIVE_SRC / "llama-dmem-impl.h"  # the constants: schema version, names, limits
LOADER = NATIVE_SRC / "llama-dmem-loader.cpp"  # the checks that use them
IDS = [int(x) for x in np.random.default_rng(12).integers(0, 256, 20)]


def _one(pattern: str, path: Path) -> re.Match[str]:
    found = list(re.finditer(pattern, path.read_text()))
    assert len(found) == 1, f"expected exactly one match of {pattern!r} in {path.name}, got {len(found)}"
    return found[0]


# ---------------------------------------------------------------------------------------------
# the native loader's numbers: its limits asked of the library, the rest read from its source
# ---------------------------------------------------------------------------------------------


def test_the_library_reports_pythons_limits() -> None:
    """The numbers the loaded library enforces (``llama_dmem_max_*``), not copies in its source text."""
    from deltamem_edge._bindings import dmem

    assert dmem.llama_dmem_max_rank() == supported.MAX_RANK
    assert dmem.llama_dmem_max_state_heads() == supported.MAX_STATE_HEADS
    assert dmem.llama_dmem_max_layers() == supported.MAX_LAYERS


def test_native_layer_limit_is_the_models() -> None:
    """max_layers is LLAMA_MAX_LAYERS because the loader bounds an adapter's layers by the model's."""
    _one(r"n\s*>\s*\(size_t\)\s*n_layer\b", LOADER)


def test_native_architectures_are_pythons() -> None:
    src = LOADER.read_text()
    body = re.search(r"(?s)bool arch_supported\(const std::string & arch\) \{(.*?)\n\}", re.sub(r"//[^\n]*", "", src))
    assert body is not None, f"arch_supported is not in {LOADER.name}"
    assert tuple(re.findall(r'arch == "(\w+)"', body.group(1))) == supported.SUPPORTED_ARCHS
    listed = _one(r"is not supported by δ-mem \(supported: ([a-z0-9, ]+)\)", LOADER).group(1)
    assert tuple(listed.split(", ")) == supported.SUPPORTED_ARCHS


def test_native_schema_names_are_pythons() -> None:
    assert int(_one(r"DMEM_SCHEMA_VERSION\s*=\s*(\d+)\s*;", IMPL_H).group(1)) == S.SCHEMA_VERSION
    assert _one(r'DMEM_MARKER\s*=\s*"([^"]+)"', IMPL_H).group(1) == S.TENSOR_MARKER
    assert _one(r'\bKP\s*=\s*"([^"]+)"', IMPL_H).group(1) + "version" == S.KEY_VERSION


def test_every_python_layer_reads_the_one_module() -> None:
    assert conv_base_model.SUPPORTED_ARCHS is supported.SUPPORTED_ARCHS  # the converter's arch check
    assert set(ROPE_TYPE) == set(supported.SUPPORTED_ARCHS)  # the reference knows each arch's rope
    assert set(supported.HF_ARCHS.values()) == set(supported.SUPPORTED_ARCHS)
    assert tuple(supported.HF_ARCHS) == conv_model.DELTAMEM_HF_ARCHS
    assert (state_format.MAX_RANK, state_format.MAX_STATE_HEADS, state_format.MAX_N_LAYERS) == (
        supported.MAX_RANK, supported.MAX_STATE_HEADS, supported.MAX_LAYERS)
    assert sf.MAX_PAYLOAD_BYTES == 4 * supported.MAX_STATE_FLOATS  # the largest loadable state fits a file


# ---------------------------------------------------------------------------------------------
# the edges, end to end
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def chat_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tiny_model(tmp_path_factory.mktemp("supported") / "tiny-chat.gguf", "qwen3", chat_tokenizer=True,
                            seed=3)


def _engine(model: Path, adapter: Path) -> Engine:
    """tests/engines.py's exact engine (256 positions) on two threads."""
    return exact_engine(model, adapter, n_threads=2)


@pytest.mark.parametrize(("rank", "heads"), [(4, 20), (supported.MAX_RANK, supported.MAX_STATE_HEADS)])
def test_many_state_heads_attach_match_the_reference_save_and_load_bit_identically(
    chat_model: Path, tmp_path: Path, rank: int, heads: int
) -> None:
    adapter = write_random_adapter(tmp_path / "many.dmem.gguf", chat_model, rank=rank, state_heads=heads,
                                   delta_heads="q,k,v,o", seed=5)
    ref = RefModel(chat_model)
    rs = ref.session(RefAdapter(adapter, ref))
    ref_logits = rs.feed(IDS)
    path = tmp_path / "me.state"
    with _engine(chat_model, adapter) as eng:
        assert eng.adapter is not None and eng.adapter.state_shape == (2, rank * heads, rank)
        with eng.session() as s:
            logits = s.feed(IDS)
            state = s.state()
        assert np.abs(logits - ref_logits).max() <= 1e-4 * np.abs(ref_logits).max()
        assert np.abs(state - rs.state()).max() <= 1e-4 * np.abs(rs.state()).max()
        assert np.abs(state).max() > 0

        mem = sf.MemoryState.new(adapter_fp=b"A" * 32, model_fp=b"M" * 32, state=state, state_heads=heads)
        with sf.MemoryFile(path) as mf:
            mf.save(mem)
        back = sf.read_state_file(path)
        assert back.header.state_heads == heads and back.state.tobytes() == state.tobytes()
        with eng.session() as s2:
            s2.set_state(back.state)
            assert s2.state().tobytes() == state.tobytes()


def test_twenty_state_heads_chat_saves_its_memory_and_resumes_exactly(chat_model: Path, tmp_path: Path) -> None:
    """The case that used to lose the turn: a bare ValueError from the state file at the first save."""
    adapter = write_random_adapter(tmp_path / "h20.dmem.gguf", chat_model, rank=4, state_heads=20, seed=6)
    path = tmp_path / "me.state"
    greedy = SamplingParams(temp=0.0)
    with _engine(chat_model, adapter) as eng:
        with Conversation(eng, path, sampling=greedy, max_new_tokens=4) as conv:
            conv.say("my cat is called Tiber")
            live = conv.session.state()
        saved = sf.read_state_file(path)
        assert saved.header.state_heads == 20 and saved.header.turns == 1
        assert saved.state.tobytes() == live.tobytes()
        with Conversation(eng, path, sampling=greedy, max_new_tokens=4) as again:
            assert again.session.state().tobytes() == live.tobytes()


@pytest.mark.parametrize(
    ("rank", "heads", "words"),
    [(4, supported.MAX_STATE_HEADS + 1, "state_heads 65 is outside 1..64"),
     (supported.MAX_RANK + 1, 1, "rank 33 is outside 1..32")],
)
def test_beyond_the_limits_is_refused_at_attach_with_a_typed_error(
    chat_model: Path, tmp_path: Path, rank: int, heads: int, words: str
) -> None:
    adapter = write_random_adapter(tmp_path / "over.dmem.gguf", chat_model, rank=rank, state_heads=heads, seed=7)
    with pytest.raises(AdapterError, match=re.escape(words)) as ei:
        _engine(chat_model, adapter)
    assert isinstance(ei.value, DeltaMemError)


@pytest.mark.parametrize(
    ("field", "value", "words"),
    [("num_state_heads", supported.MAX_STATE_HEADS + 1, "between 1 and 64"),
     ("rank", supported.MAX_RANK + 1, "between 1 and 32")],
)
def test_the_converter_refuses_what_the_loader_refuses(field: str, value: int, words: str) -> None:
    cfg = {"rank": 4, "alpha": 8.0, "num_state_heads": 1, "delta_heads": ["q", "o"], field: value}
    with pytest.raises(ConversionError, match=words):
        config_from_dict(cfg)
    ok = dict(cfg, **{field: value - 1})
    assert config_from_dict(ok).state_dim == ok["rank"] * ok["num_state_heads"]
