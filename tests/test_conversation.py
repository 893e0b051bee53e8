"""Conversations on the real SmolLM2-135M-Instruct Q4_1 with a random non-zero adapter.

What is checked: memory across runs is bit-exact, every token that enters the KV
cache is written exactly once (counted independently through llama.cpp's own KV
positions), read-only recall writes nothing, the context can overflow and the
conversation goes on, and a foreign memory file is refused without harm.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from engines import kv_positions
from ggufs import write_random_adapter

from deltamem_edge import Engine
from deltamem_edge.conversation import Conversation
from deltamem_edge.errors import StateLockedError, StateMismatchError
from deltamem_edge.sampling import SamplingParams
from deltamem_edge.statefile import read_state_file

GREEDY = SamplingParams(temp=0.0)


@pytest.fixture(scope="module")
def smol(smol_model: Path, smol_random_adapter: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("smol")
    return {
        "model": smol_model,
        "adapter": smol_random_adapter,
        "other": write_random_adapter(d / "b.dmem.gguf", smol_model, rank=8, seed=5),
    }


def test_memory_across_runs_is_exact_and_counts_every_token(smol, tmp_path):
    path = tmp_path / "me.state"
    with Engine(smol["model"], smol["adapter"], n_ctx=1024, n_threads=2) as eng:
        with Conversation(eng, path, sampling=GREEDY, max_new_tokens=24) as conv:
            conv.say("Hello! My favourite colour is green.")
            conv.say("And my cat is called Tiber.")
            in_kv = kv_positions(conv)
            assert conv.tokens_written == in_kv  # nothing evicted: every KV token was written once
            live = conv.session.state()
        saved = read_state_file(path)
        np.testing.assert_array_equal(saved.state, live)
        assert saved.header.tokens_written == in_kv
        assert saved.header.turns == 2
        assert [m["role"] for m in saved.transcript] == ["user", "assistant", "user", "assistant"]

        with Conversation(eng, path, sampling=GREEDY, max_new_tokens=16) as conv2:
            np.testing.assert_array_equal(conv2.session.state(), saved.state)  # starts exactly where run 1 ended
            # fresh context: only the system prompt, fed read-only (it is in memory already)
            at_start = kv_positions(conv2)
            assert conv2.tokens_written == saved.header.tokens_written
            np.testing.assert_array_equal(conv2.session.state(), saved.state)
            conv2.say("What do you remember?")
            assert conv2.tokens_written == saved.header.tokens_written + kv_positions(conv2) - at_start
        assert read_state_file(path).header.turns == 3


def test_recall_replays_without_writing(smol, tmp_path):
    path = tmp_path / "me.state"
    with Engine(smol["model"], smol["adapter"], n_ctx=1024, n_threads=2) as eng:
        with Conversation(eng, path, sampling=GREEDY, max_new_tokens=12) as conv:
            conv.say("Remember the number 4711.")
        before = read_state_file(path)
        with Conversation(eng, path, sampling=GREEDY, max_new_tokens=12, recall_turns=1) as conv:
            assert kv_positions(conv) > 0  # the old turn is back in the context...
            np.testing.assert_array_equal(conv.session.state(), before.state)  # ...and nothing was written
            assert conv.tokens_written == before.header.tokens_written


def test_context_overflow_keeps_going_and_writes_everything(smol, tmp_path):
    written: list[int] = []
    with Engine(smol["model"], smol["adapter"], n_ctx=256, n_threads=2) as eng, \
            Conversation(eng, tmp_path / "long.state", sampling=GREEDY, max_new_tokens=40) as conv:
        feed = conv.session.feed
        before = conv.tokens_written  # the system prompt, written at start

        def counting_feed(ids, write=True, **kw):  # an independent tally of written tokens
            if write:
                written.append(len(ids))
            return feed(ids, write=write, **kw)

        conv.session.feed = counting_feed
        for i in range(8):
            conv.say(f"Turn {i}: tell me something about the number {i * 7}.")
            assert conv.session.n_past <= 256
            assert kv_positions(conv) == conv.session.n_past
        assert conv.tokens_written == before + sum(written)
        assert sum(written) > 256  # more than fits: older turns left the cache
        assert np.isfinite(conv.session.state()).all()


def test_foreign_or_busy_memory_is_refused_and_left_intact(smol, tmp_path):
    path = tmp_path / "me.state"
    with Engine(smol["model"], smol["adapter"], n_ctx=512, n_threads=2, n_seq_max=2) as eng, \
            Conversation(eng, path, sampling=GREEDY, max_new_tokens=8) as conv:
        conv.say("hi")
        with pytest.raises(StateLockedError, match="in use by pid"):
            Conversation(eng, path)  # a second writer on the same file
    original = path.read_bytes()
    with Engine(smol["model"], smol["other"], n_ctx=512, n_threads=2) as eng2:
        with pytest.raises(StateMismatchError) as info:
            Conversation(eng2, path)
        assert str(path) in str(info.value)
    assert path.read_bytes() == original


def test_interrupted_reply_keeps_the_state_consistent(smol, tmp_path):
    path = tmp_path / "me.state"
    with Engine(smol["model"], smol["adapter"], n_ctx=512, n_threads=2) as eng, \
            Conversation(eng, path, sampling=GREEDY, max_new_tokens=64) as conv:
        pieces = conv.say("Count from one to twenty.", stream=True)
        for i, _ in enumerate(pieces):
            if i == 3:
                pieces.close()  # what Ctrl-C does in the CLI
                break
        assert conv.stats.interrupted
        assert conv.messages[-1]["role"] == "assistant"
        assert conv.tokens_written == kv_positions(conv)
        np.testing.assert_array_equal(read_state_file(path).state, conv.session.state())
        conv.say("Thanks.")  # and the conversation goes on


def test_segment_adapter_conversation_sends_upstream_message_ids(smol, smol_ssw_adapter, tmp_path):
    """SSW (message_mean): the prompt is one call, user tokens carry the message index, the
    generation prompt -1; the reply's tail carries the reply's index; the system prompt is not written."""
    calls: list[tuple[int, bool, list[int] | None]] = []
    with Engine(smol["model"], smol_ssw_adapter, n_ctx=1024, n_threads=2) as eng, \
            Conversation(eng, tmp_path / "ssw.state", sampling=GREEDY, max_new_tokens=6) as conv:
        assert conv.tokens_written == 0  # the system prompt was fed read-only
        original = conv.session.feed

        def recording_feed(ids, write=True, **kw):
            calls.append((len(ids), write, None if kw.get("message_ids") is None else list(kw["message_ids"])))
            return original(ids, write=write, **kw)

        conv.session.feed = recording_feed
        conv.say("Hello there, how are you?")
        conv.say("Tell me more.")
    prompts = [c for c in calls if c[0] > 1 and c[2] is not None and -1 in c[2]]
    assert len(prompts) == 2
    for turn, (n, write, mids) in enumerate(prompts):
        assert write and len(mids) == n
        user_part = [m for m in mids if m != -1]
        assert set(user_part) == {2 * turn} and mids[-1] == -1  # user index, then the generation prompt
        assert mids == sorted(mids, key=lambda m: m == -1)  # -1 only at the end
    tails = [c for c in calls if c[2] is not None and -1 not in c[2]]
    assert [set(t[2]) for t in tails] == [{1}, {3}]  # the assistant messages' indices
