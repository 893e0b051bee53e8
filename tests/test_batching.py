"""Continuous batching (deltamem_edge/batching.py): concurrent conversations share decode steps.

Several Conversations of one non-unified Engine generate in their own threads, as the
server's users do.  Each must give exactly the reply and memory it gives alone, while the
engine's llama_decode calls for generated tokens hold several sessions at once (counted
by wrapping llama_decode).  A session registered as generating that never feeds must not
hold the others for more than ``max_wait_s`` per step; a bad token fails only its own
session.  On a unified engine nothing is batched and nothing waits.
"""

from __future__ import annotations

import threading
from collections.abc import Mapping
from pathlib import Path

import numpy as np
from engines import count_decodes

from deltamem_edge import Engine
from deltamem_edge.conversation import Conversation
from deltamem_edge.errors import EngineError
from deltamem_edge.sampling import SamplingParams
from deltamem_edge.statefile import read_state_file

PROMPTS = ("Hello, I am Ada.", "What is the weather like?", "Tell me about bees and honey.")
MAX_NEW = 24


# ``talkative_files`` (tests/conftest.py): a tiny chat model and adapter with long greedy replies


def make_engine(files: Mapping[str, Path], *, unified: bool) -> Engine:
    return Engine(files["model"], files["adapter"], n_ctx=1024, n_threads=1, n_seq_max=4, kv_unified=unified,
                  exact=True)


def talk(engine: Engine, memory: Path, prompt: str) -> str:
    with Conversation(engine, memory, system="", max_new_tokens=MAX_NEW, sampling=SamplingParams(temp=0.0)) as c:
        return c.say(prompt)


def run_together(engine: Engine, memdir: Path) -> dict[str, str]:
    replies: dict[str, str] = {}
    errors: list[BaseException] = []
    start = threading.Barrier(len(PROMPTS))

    def user(i: int) -> None:
        try:
            start.wait()
            replies[PROMPTS[i]] = talk(engine, memdir / f"u{i}.state", PROMPTS[i])
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=user, args=(i,)) for i in range(len(PROMPTS))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not errors, repr(errors[0])
    return replies


def test_concurrent_conversations_share_steps_and_reply_as_alone(talkative_files, tmp_path, monkeypatch):
    alone_dir, together_dir = tmp_path / "alone", tmp_path / "together"
    alone_dir.mkdir()
    together_dir.mkdir()
    with make_engine(talkative_files, unified=False) as eng:
        alone = {p: talk(eng, alone_dir / f"u{i}.state", p) for i, p in enumerate(PROMPTS)}
        assert eng.batcher.steps == eng.batcher.tokens > 0  # one conversation at a time: one session per step
        eng.batcher.steps = eng.batcher.tokens = 0
        calls = count_decodes(monkeypatch)
        together = run_together(eng, together_dir)
        stats = (eng.batcher.steps, eng.batcher.tokens)
    assert together == alone
    for i in range(len(PROMPTS)):
        a, b = read_state_file(alone_dir / f"u{i}.state"), read_state_file(together_dir / f"u{i}.state")
        assert a.header.tokens_written == b.header.tokens_written and a.header.turns == b.header.turns == 1
        np.testing.assert_allclose(b.state, a.state, rtol=0, atol=1e-5 * np.abs(a.state).max())
    generated = sum(len(r) > 0 for r in alone.values())
    assert generated == len(PROMPTS)
    shared = [n for n in calls if n > 1 and n <= len(PROMPTS)]  # one-token-per-session steps of several sessions
    assert stats[0] > 0 and stats[1] / stats[0] > 1.5, stats  # most steps held more than one session
    assert len(shared) >= MAX_NEW // 2, calls


def test_a_session_that_never_feeds_holds_the_others_only_briefly(talkative_files, tmp_path):
    with make_engine(talkative_files, unified=False) as eng:
        expected = talk(eng, tmp_path / "a.state", PROMPTS[0])
        eng.batcher.max_wait_s = 0.005
        with eng.batcher.generating():  # a "user" that registered and then went silent
            assert talk(eng, tmp_path / "b.state", PROMPTS[0]) == expected
        # a bad token in a shared step fails its own session only
        good, bad = eng.session(), eng.session()
        good.feed([1, 2, 3])
        bad.feed([1, 2, 3])
        outcome: dict[str, object] = {}
        start = threading.Barrier(2)

        def feed(name: str, session, token: int) -> None:
            start.wait()
            try:
                outcome[name] = eng.batcher.feed_one(session, token)
            except EngineError as exc:
                outcome[name] = exc

        with eng.batcher.generating(), eng.batcher.generating():
            threads = [threading.Thread(target=feed, args=("good", good, 5)),
                       threading.Thread(target=feed, args=("bad", bad, eng.n_vocab + 7))]
            for t in threads:
                t.start()
            for t in threads:
                t.join(30)
        assert isinstance(outcome["bad"], EngineError) and bad.n_past == 3
        assert isinstance(outcome["good"], np.ndarray) and good.n_past == 4


def test_unified_engine_does_not_batch_or_wait(talkative_files, tmp_path):
    with make_engine(talkative_files, unified=True) as eng:
        assert not eng.batches_sessions
        replies = run_together(eng, tmp_path)
        assert eng.batcher.steps == 0 and len(replies) == len(PROMPTS)
