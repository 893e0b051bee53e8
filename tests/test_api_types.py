"""Exact types at the public API: nothing is silently cast, and a refused call changes nothing.

Each case is one that used to be coerced: a float64 state rounded to float32 (and
a finite 1e39 refused as "NaN or Inf"), float token ids truncated, ``write="no"``
taken as True, message ids wrapped to int32, a seed of 2**32 truncated by ctypes,
a NaN top-p that switched the stage off.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from ggufs import write_random_adapter, write_tiny_model
from typer.testing import CliRunner

from deltamem_edge import Engine
from deltamem_edge.args import check_bool, check_float, check_int, int_array
from deltamem_edge.errors import ArgumentError, DeltaMemError, EngineError
from deltamem_edge.sampling import SamplingParams

IDS = [int(x) for x in np.random.default_rng(5).integers(0, 256, 12)]

# ------------------------------------------------------------------------------------------------
# the checkers (no engine)
# ------------------------------------------------------------------------------------------------


def test_check_int_refuses_what_int() -> None:
    assert check_int("n", 3) == 3 and check_int("n", np.int16(3)) == 3
    for bad in (True, 3.0, "3", None, np.float32(3)):
        with pytest.raises(ArgumentError, match="n must be an int"):
            check_int("n", bad)
    with pytest.raises(ArgumentError, match=r"in 0\.\.5, got 6"):
        check_int("n", 6, low=0, high=5)


def test_check_float_and_bool() -> None:
    assert check_float("t", 0) == 0.0 and check_float("t", np.float32(0.5)) == 0.5
    for bad in (float("nan"), float("inf"), "0.5", True):
        with pytest.raises(ArgumentError, match="t must be"):
            check_float("t", bad)
    assert check_bool("w", np.bool_(True)) is True
    for bad in ("no", 0, 1, None):
        with pytest.raises(ArgumentError, match="w must be True or False"):
            check_bool("w", bad)


def test_int_array_casts_nothing() -> None:
    assert int_array("ids", []).dtype == np.int64 and int_array("ids", []).size == 0
    np.testing.assert_array_equal(int_array("ids", np.array([1, 2], np.uint8)), [1, 2])
    np.testing.assert_array_equal(int_array("ids", range(3)), [0, 1, 2])
    cases = {
        "floats": [1.0, 2.0],
        "a float among ints": [1, 2.5],
        "bools": [True, False],
        "strings": ["5"],
        "a str": "12",
        "a scalar": 7,
        "2-D": [[1, 2]],
        "beyond int64": [2**70],
        "uint64 beyond int64": np.array([2**63], np.uint64),
    }
    for what, bad in cases.items():
        with pytest.raises(ArgumentError):
            int_array("ids", bad)
            pytest.fail(what)


def test_sampling_params_are_checked() -> None:
    assert SamplingParams(temp=0, seed=2**32 - 1).temp == 0.0
    for kw in ({"temp": float("nan")}, {"top_p": float("nan")}, {"top_p": 1.5}, {"min_p": -0.1},
               {"top_k": 40.0}, {"top_k": -1}, {"seed": 2**32}, {"seed": -2}, {"seed": 1.0}, {"temp": "0.8"}):
        with pytest.raises(ArgumentError):
            SamplingParams(**kw)


def test_cli_chat_numeric_flags_are_range_checked() -> None:
    """typer ranges: a usage error (exit 2) before any model is loaded."""
    from deltamem_edge.cli.main import app

    runner = CliRunner()
    for argv in (["--top-p", "2"], ["--seed", str(2**32)], ["--ctx-size", "8"], ["--predict", "-1"],
                 ["--threads", "0"], ["--recall-turns", "-1"], ["--top-k", "1.5"], ["--min-p", "-0.5"]):
        res = runner.invoke(app, ["chat", "--model", "/nonexistent.gguf", *argv])
        assert res.exit_code == 2, (argv, res.output)


# ------------------------------------------------------------------------------------------------
# Session and Conversation on a tiny random model
# ------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def eng(tmp_path_factory: pytest.TempPathFactory):
    d = tmp_path_factory.mktemp("types")
    model = write_tiny_model(d / "qwen3.gguf", "qwen3", chat_tokenizer=True)
    adapter = write_random_adapter(d / "qwen3.dmem.gguf", model, rank=4, state_heads=2, seed=3)
    with Engine(model, adapter, n_ctx=128, exact=True) as e:
        yield e


def test_set_state_takes_float32_of_the_exact_shape_only(eng: Engine) -> None:
    with eng.session() as s:
        s.feed(IDS)
        before = s.state()
        shape = eng.adapter.state_shape
        rng = np.random.default_rng(0)
        wide = rng.normal(size=shape)  # float64
        huge = np.full(shape, 1e39)  # finite in float64, inf in float32
        cases = {
            "float64": (wide, "dtype float64"),
            "finite 1e39 float64": (huge, "dtype float64"),
            "int64": (np.zeros(shape, np.int64), "dtype int64"),
            "float16": (wide.astype(np.float16), "dtype float16"),
            "big-endian float32": (wide.astype(">f4"), "dtype >f4"),
            "nested list": (wide.astype(np.float32).tolist(), "got list"),
            "wrong shape": (wide.astype(np.float32)[:, :1], "shape"),
        }
        for what, (bad, match) in cases.items():
            with pytest.raises(EngineError, match=match) as ei:
                s.set_state(bad)
            assert isinstance(ei.value, ArgumentError), what
            assert "NaN" not in str(ei.value), what
            np.testing.assert_array_equal(s.state(), before, err_msg=what)  # unchanged, bit for bit
        exact = rng.normal(size=shape).astype(np.float32)
        s.set_state(np.asfortranarray(exact))  # float32 but not C-contiguous: stored exactly
        np.testing.assert_array_equal(s.state(), exact)


def test_feed_refuses_coercible_ids_and_flags_and_changes_nothing(eng: Engine) -> None:
    with eng.session() as s:
        s.feed(IDS[:4])
        state, n_past = s.state(), s.n_past
        for bad in ([1.0, 2.0], [1, 2.7], [True, False], ["5"], [[1, 2]], np.array([1, 2], np.float32)):
            with pytest.raises(ArgumentError, match="token ids"):
                s.feed(bad)
        with pytest.raises(ArgumentError, match="write must be True or False"):
            s.feed(IDS[:2], write="no")
        with pytest.raises(ArgumentError, match="logits must be"):
            s.feed(IDS[:2], logits=1)
        for mids in ([2**40, 0], [-2, 0], [0.0, 1.0], [0]):
            with pytest.raises(ArgumentError, match="message ids"):
                s.feed(IDS[:2], message_ids=mids)
        with pytest.raises(ArgumentError, match="p0 must be an int"):
            s.drop_positions(0.0, 2)
        with pytest.warns(DeprecationWarning, match="drop_positions"), pytest.raises(ArgumentError, match="p0 must"):
            s.forget(0.0, 2)  # the old name still works, and says what it does
        with pytest.raises(ArgumentError, match="n_keep must be an int"):
            s.truncate(1.5)
        assert s.n_past == n_past
        np.testing.assert_array_equal(s.state(), state)
        logits = s.feed(np.array(IDS[4:6], np.int32), write=np.bool_(True))  # integer arrays and numpy bools are fine
        assert logits.shape == (2, eng.n_vocab)


def test_engine_sizes_are_checked_before_loading(tmp_path: Path, eng: Engine) -> None:
    for kw in ({"n_ctx": 512.0}, {"n_ctx": 2**32}, {"n_batch": 0}, {"n_gpu_layers": "all"}, {"f32_kv": 1},
               {"exact": 1}, {"exact": True, "flash_attn": True}):
        with pytest.raises(ArgumentError):
            Engine(eng.model_path, False, **kw)


def test_conversation_arguments_are_checked_before_anything_is_opened(eng: Engine, tmp_path: Path) -> None:
    from deltamem_edge.conversation import Conversation

    mem = tmp_path / "m.state"
    for kw in ({"max_new_tokens": 5.5}, {"readonly": "false"}, {"recall_turns": -1}, {"transcript_turns": 2.0},
               {"sampling": {"temp": 0}}, {"system": 3}, {"context_limit": 1.5}):
        with pytest.raises(ArgumentError):
            Conversation(eng, mem, **kw)
        assert not mem.exists() and not any(tmp_path.iterdir()), kw  # no memory or lock file was created
    with Conversation(eng, None, sampling=SamplingParams(temp=0), max_new_tokens=2) as conv:
        with pytest.raises(ArgumentError, match="text must be a str"):
            conv.say(b"hello")
        with pytest.raises(ArgumentError, match="params must be a SamplingParams"):
            conv.set_sampling({"temp": 0})
        with pytest.raises(DeltaMemError):
            conv.recall(1.0)
