"""``Conversation.score_reply`` and the shared undo, on the real SmolLM2-135M-Instruct Q4_1.

What is checked: the probe's log-probs equal an independent computation (ids built from the
chat template here, fed through ``Session.feed`` in the same pieces), the probe leaves state,
KV cache, counters, history and the memory file exactly as they were, and a greedy reply after
probes is bit-identical (text and δ-state) to one from a conversation that never probed.  The
Ctrl-C undo of a prompt, which shares the code, is checked the same way.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
from engines import kv_positions

from deltamem_edge import Engine
from deltamem_edge.conversation import Conversation
from deltamem_edge.sampling import SamplingParams
from deltamem_edge.statefile import read_state_file

GREEDY = SamplingParams(temp=0.0)
QUESTION = "What is my sister's name?"
ANSWER = "Your sister is called Ines."


@pytest.fixture(scope="module")
def eng(smol_model: Path, smol_random_adapter: Path) -> Engine:
    with Engine(smol_model, smol_random_adapter, n_ctx=1024, n_threads=1, n_seq_max=2) as engine:
        yield engine


@pytest.fixture
def told(eng: Engine, tmp_path: Path) -> Path:
    """A memory file after one told turn (what run 2 of the evaluation opens)."""
    path = tmp_path / "told.state"
    with Conversation(eng, path, sampling=GREEDY, max_new_tokens=12) as conv:
        conv.say("Hello! My sister is called Ines.")
    return path


def snapshot(conv: Conversation) -> dict:
    """Everything a probe must leave as it was."""
    return {"state": conv.session.state(), "n_past": conv.session.n_past, "kv": kv_positions(conv),
            "ids": list(conv._kv), "written": conv.tokens_written, "messages": [dict(m) for m in conv.messages],
            "history": [dict(m) for m in conv.history], "rendered": conv._rendered, "turns": conv.turns,
            "file": conv.memory_path.read_bytes() if conv.memory_path and conv.memory_path.exists() else None}


def assert_same(a: dict, b: dict) -> None:
    np.testing.assert_array_equal(a["state"], b["state"])
    assert {k: v for k, v in a.items() if k != "state"} == {k: v for k, v in b.items() if k != "state"}


def log_softmax_rows(logits: np.ndarray) -> np.ndarray:
    x = logits.astype(np.float64)
    return x - np.logaddexp.reduce(x, axis=1, keepdims=True)


def test_score_reply_equals_an_independent_feed(eng, told):
    from llama_cpp.llama_chat_format import Jinja2ChatFormatter  # after deltamem_edge located our libllama

    fmt = Jinja2ChatFormatter(eng.meta("tokenizer.chat_template"), "", "", add_generation_prompt=True)
    plain = Jinja2ChatFormatter(eng.meta("tokenizer.chat_template"), "", "", add_generation_prompt=False)
    with Conversation(eng, told, sampling=GREEDY) as conv:
        got = conv.score_reply(QUESTION, ANSWER)
        system = conv.messages[0]
    assert system["role"] == "system" and got.dtype == np.float64

    def tok(text: str) -> list[int]:
        return eng.tokenize(text, add_special=False, parse_special=True)

    sys_ids = tok(plain(messages=[system]).prompt)
    full = tok(fmt(messages=[system, {"role": "user", "content": QUESTION}]).prompt)
    assert full[:len(sys_ids)] == sys_ids
    reply = eng.tokenize(ANSWER, add_special=False, parse_special=False)
    assert len(got) == len(reply) > 3

    # run 2 of a conversation by hand: saved state, system read-only, turn written; the reply one token at
    # a time as generation feeds it (one batched call differs by up to ~0.4 nats per token on this
    # model with this strong random adapter: float rounding, amplified over 30 layers)
    with eng.session() as s:
        s.set_state(read_state_file(told).state)
        s.feed(sys_ids, write=False, logits="none")
        rows = [s.feed(full[len(sys_ids):], write=True, logits="last")[-1]]
        rows += [s.feed([t], write=True, logits="last")[-1] for t in reply[:-1]]
    want = log_softmax_rows(np.stack(rows))[np.arange(len(reply)), reply]
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-9)
    assert np.all(got < 0) and np.isfinite(got).all()


def test_probe_changes_nothing_and_say_afterwards_is_identical(eng, told, tmp_path):
    control_path = tmp_path / "control.state"
    shutil.copyfile(told, control_path)
    questions = ["What is my sister's name?", "And what did I tell you first?"]
    with Conversation(eng, told, sampling=GREEDY, max_new_tokens=16) as conv:
        replies = []
        for q in questions:
            before = snapshot(conv)
            first = conv.score_reply(q, ANSWER)
            assert_same(snapshot(conv), before)
            np.testing.assert_array_equal(conv.score_reply(q, ANSWER), first)  # a probe sees what the first saw
            replies.append(conv.say(q))
        probed = conv.session.state()
        probed_written = conv.tokens_written
    with Conversation(eng, control_path, sampling=GREEDY, max_new_tokens=16) as control:
        assert [control.say(q) for q in questions] == replies
        np.testing.assert_array_equal(control.session.state(), probed)
        assert control.tokens_written == probed_written
    saved, want = read_state_file(told), read_state_file(control_path)  # and the same memory on disk
    np.testing.assert_array_equal(saved.state, want.state)
    assert saved.transcript == want.transcript and saved.header.tokens_written == want.header.tokens_written


def test_probe_through_the_re_rendering_path_is_undone(eng, tmp_path):
    """With the template text unknown (after an eviction, or a template that is not prefix-stable)
    the prompt is re-rendered and older messages are fed again read-only; all of it is undone."""
    control_path = tmp_path / "control.state"
    with Conversation(eng, control_path, sampling=GREEDY, max_new_tokens=10) as control, \
            Conversation(eng, tmp_path / "probed.state", sampling=GREEDY, max_new_tokens=10) as conv:
        for c in (control, conv):
            c.say("I play the violin.")
            c._rendered = None  # what an eviction leaves
        before = snapshot(conv)
        conv.score_reply(QUESTION, ANSWER)
        assert_same(snapshot(conv), before)
        assert conv.say(QUESTION) == control.say(QUESTION)
        np.testing.assert_array_equal(conv.session.state(), control.session.state())


def test_rollback_restores_replaced_cache_tokens(eng, tmp_path):
    with Conversation(eng, tmp_path / "m.state", sampling=GREEDY, max_new_tokens=8) as conv:
        conv.say("Good morning.")
        cp = conv._checkpoint()
        before = snapshot(conv)
        cut = len(conv._kv) - 5  # a detour: the tail of the cache replaced, the state written on
        conv.session.truncate(cut)
        del conv._kv[cut:]
        conv._feed(eng.tokenize(" something else entirely"), write=True)
        assert conv.tokens_written != before["written"]
        conv._rollback(cp)
        assert_same(snapshot(conv), before)


def test_interrupted_prompt_is_undone_by_the_shared_rollback(eng, told, tmp_path):
    control_path = tmp_path / "control.state"
    shutil.copyfile(told, control_path)
    with Conversation(eng, told, sampling=GREEDY, max_new_tokens=12) as conv:
        before = snapshot(conv)
        feed = conv.session.feed

        def interrupted_feed(ids, write=True, **kw):
            feed(ids, write=write, **kw)  # the tokens go in, then Ctrl-C arrives
            raise KeyboardInterrupt

        conv.session.feed = interrupted_feed
        with pytest.raises(KeyboardInterrupt):
            conv.say(QUESTION)
        conv.session.feed = feed
        assert conv.stats.interrupted
        assert_same(snapshot(conv), before)
        reply = conv.say(QUESTION)
        state = conv.session.state()
    with Conversation(eng, control_path, sampling=GREEDY, max_new_tokens=12) as control:
        assert control.say(QUESTION) == reply
        np.testing.assert_array_equal(control.session.state(), state)


def test_segment_adapter_probe_sends_the_turns_message_ids_and_changes_nothing(smol_model, smol_ssw_adapter, tmp_path):
    """SSW (message_mean): the probe's prompt goes in as one call with say()'s message ids."""
    with Engine(smol_model, smol_ssw_adapter, n_ctx=512, n_threads=1, n_seq_max=2) as eng, \
            Conversation(eng, tmp_path / "a.state", sampling=GREEDY, max_new_tokens=6) as conv, \
            Conversation(eng, tmp_path / "b.state", sampling=GREEDY, max_new_tokens=6) as control:
        for c in (conv, control):
            c.say("Hello there.")
        calls: list[list[int] | None] = []
        feed = conv.session.feed

        def recording_feed(ids, write=True, **kw):
            calls.append(None if kw.get("message_ids") is None else list(kw["message_ids"]))
            return feed(ids, write=write, **kw)

        conv.session.feed = recording_feed
        before = snapshot(conv)
        conv.score_reply(QUESTION, ANSWER)
        assert_same(snapshot(conv), before)
        probe_ids = calls[0]
        assert probe_ids is not None and set(probe_ids) == {2, -1} and probe_ids[-1] == -1  # user index 2
        assert all(c is None for c in calls[1:])  # reply tokens one at a time, like generated ones
        calls.clear()
        assert conv.say(QUESTION) == control.say(QUESTION)
        assert calls[0] == probe_ids
        np.testing.assert_array_equal(conv.session.state(), control.session.state())
