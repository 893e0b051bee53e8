"""One set of limits and architectures: the native loader, the converter, the state file and the reference agree.

The C++ loader keeps its own copies of the numbers in ``llama-dmem.cpp``; instead of a
generated header (a native rebuild), these tests read them out of the source and
compare them with ``deltamem_edge.supported``.  Then the edge cases run end to end on
a tiny random model: 20 and 64 state heads (above the state file's old 16) attach,
chat, save and load back bit-identically; 65 heads and rank 33 are refused at attach
with an AdapterError, and the converter refuses them before writing anything.
"""

from __future__ import annotations

import re
import tarfile
from pathlib import Path

import numpy as np
import pytest
from engines import exact_engine
from ggufs import write_random_adapter, write_tiny_model

from deltamem_edge import Engine, supported
from deltamem_edge import gguf_schema as S
from deltamem_edge import statefile as sf
from deltamem_edge.conversation import Conversation
from deltamem_edge.converter import adapter as conv_adapter
from deltamem_edge.converter import model as conv_model
from deltamem_edge.converter.config import config_from_dict
from deltamem_edge.errors import AdapterError, ConversionError, DeltaMemError
from deltamem_edge.native import build
from deltamem_edge.reference import ROPE_TYPE, RefAdapter, RefModel
from deltamem_edge.sampling import SamplingParams
from deltamem_edge.statefile import format as state_format

NATIVE_SRC = Path(build.NATIVE_DIR) / "src"
IDS = [int(x) for x in np.random.default_rng(12).integers(0, 256, 20)]


def _native_source() -> str:
    return "\n".join(p.read_text() for p in sorted(NATIVE_SRC.glob("*.cpp")) + sorted(NATIVE_SRC.glob("*.h")))


def _one(pattern: str, text: str) -> re.Match[str]:
    found = list(re.finditer(pattern, text))
    assert len(found) == 1, f"expected exactly one match of {pattern!r} in the native sources, got {len(found)}"
    return found[0]


# ---------------------------------------------------------------------------------------------
# the native loader's numbers, read from its source
# ---------------------------------------------------------------------------------------------


def test_native_rank_limit_is_pythons() -> None:
    src = _native_source()
    p_max = int(_one(r"constexpr\s+int64_t\s+DMEM_P_MAX\s*=\s*(\d+)\s*;", src).group(1))
    assert p_max == supported.MAX_RANK
    _one(r"A\.rank\s*<\s*1\s*\|\|\s*A\.rank\s*>\s*DMEM_P_MAX", src)  # the loader checks rank against it


def test_native_state_head_limit_is_pythons() -> None:
    src = _native_source()
    check = _one(r"A\.heads\s*<\s*1\s*\|\|\s*A\.heads\s*>\s*(\d+)", src)
    message = _one(r'"state_heads %lld is outside 1\.\.(\d+)"', src)
    assert int(check.group(1)) == int(message.group(1)) == supported.MAX_STATE_HEADS


def test_native_layer_limit_is_the_models() -> None:
    """The loader bounds an adapter's layers by the model's; llama.cpp bounds those by LLAMA_MAX_LAYERS."""
    _one(r"n\s*>\s*\(size_t\)\s*n_layer\b", _native_source())
    sdist = build.cache_root() / "sdist" / build.SDIST_NAME
    if not sdist.is_file():
        pytest.skip("the llama.cpp sdist is not in the build cache (`make build` fetches it)")
    with tarfile.open(sdist, "r:gz") as tar:
        member = tar.extractfile(build.VENDOR_PREFIX + "src/llama-hparams.h")
        assert member is not None
        header = member.read().decode()
    assert int(_one(r"#define\s+LLAMA_MAX_LAYERS\s+(\d+)", header).group(1)) == supported.MAX_LAYERS


def test_native_architectures_are_pythons() -> None:
    src = _native_source()
    body = _one(r"(?s)bool arch_supported\(const std::string & arch\) \{(.*?)\n\}", re.sub(r"//[^\n]*", "", src))
    assert tuple(re.findall(r'arch == "(\w+)"', body.group(1))) == supported.SUPPORTED_ARCHS
    listed = _one(r"is not supported by δ-mem \(supported: ([a-z0-9, ]+)\)", src).group(1)
    assert tuple(listed.split(", ")) == supported.SUPPORTED_ARCHS


def test_native_schema_names_are_pythons() -> None:
    src = _native_source()
    assert int(_one(r"DMEM_SCHEMA_VERSION\s*=\s*(\d+)\s*;", src).group(1)) == S.SCHEMA_VERSION
    assert _one(r'DMEM_MARKER\s*=\s*"([^"]+)"', src).group(1) == S.TENSOR_MARKER
    assert _one(r'\bKP\s*=\s*"([^"]+)"', src).group(1) + "version" == S.KEY_VERSION


def test_every_python_layer_reads_the_one_module() -> None:
    assert conv_adapter.SUPPORTED_ARCHS is supported.SUPPORTED_ARCHS
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
