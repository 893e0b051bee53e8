"""Training episodes have exactly the token layout that ``Conversation`` produces across two runs.

If they did not, what ``eval-memory`` measures through the runtime would not be what
was trained.  Checked on the real SmolLM2 template and tokenizer, against the tokens
the runtime actually put into its KV cache and the tokens it actually wrote.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from deltamem_edge import Engine
from deltamem_edge.conversation import Conversation
from deltamem_edge.defaults import default_adapter_path, default_model_path
from deltamem_edge.recall.facts import make_episodes
from deltamem_edge.sampling import SamplingParams

pytest.importorskip("torch")
from deltamem_edge.train.episodes import EpisodeTokenizer  # noqa: E402


@pytest.fixture(scope="module")
def engine() -> Engine:
    with Engine(default_model_path(), default_adapter_path(), n_ctx=1024, n_threads=1) as eng:
        yield eng


def test_two_runs_match_the_runtime(engine: Engine, tmp_path: Path) -> None:
    tok = EpisodeTokenizer(engine)
    ep = make_episodes("train", 1, 5, n_facts=3, chit_chat=1.0)[0]
    memory = tmp_path / "m.state"
    greedy = SamplingParams(temp=0.0)
    # run 1: the user tells the facts; with no reply tokens the assistant message is empty
    with Conversation(engine, memory, sampling=greedy, max_new_tokens=0) as conv:
        for message in ep.tell:
            conv.say(message)
        run1_kv, run1_written = list(conv._kv), conv.tokens_written
    expected = tok.run1(ep.tell, ("",) * len(ep.tell))
    assert run1_kv == expected
    assert run1_written == len(expected)  # every run-1 token is written, the system prompt included

    # run 2: a new run on the memory file; the question (and the empty reply's tail) is written
    with Conversation(engine, memory, sampling=greedy, max_new_tokens=0) as conv:
        conv.say(ep.probe.question)
        run2_kv, run2_written = list(conv._kv), conv.tokens_written - run1_written
    ids, writes, targets = tok.run2(ep.probe.question, ep.probe.answer)
    n_prompt = len(ids) - (len(targets) - 1)  # ids = system + question + answer tokens
    assert run2_kv[:n_prompt] == ids[:n_prompt]
    assert run2_kv[n_prompt] == targets[-1]  # the tail after the (empty) reply starts with the end of turn
    assert not any(writes[:len(tok._system_ids)]), "the system prompt must be read-only in run 2"
    tail = len(run2_kv) - n_prompt
    assert run2_written == sum(writes[:n_prompt]) + tail
    assert engine.is_eog(targets[-1])


def test_question_in_the_told_run_matches_one_conversation(engine: Engine) -> None:
    """An in-context episode's run 2 is what ``Conversation`` feeds and writes for the next turn."""
    tok = EpisodeTokenizer(engine)
    ep = make_episodes("train", 1, 6, n_facts=2, chit_chat=1.0)[0]
    with Conversation(engine, sampling=SamplingParams(temp=0.0), max_new_tokens=0) as conv:
        for message in ep.tell:
            conv.say(message)
        written_before = conv.tokens_written
        conv.say(ep.probe.question)
        kv, written = list(conv._kv), conv.tokens_written - written_before
    te = tok.episode(ep, replies=("",) * len(ep.tell), in_context=True)
    assert te.in_context and te.asked == ep.facts.index(ep.probe)
    n_prompt = len(te.read_ids) - (len(te.targets) - 1)  # question + answer tokens
    assert kv[:len(te.write_ids)] == list(te.write_ids)
    assert kv[len(te.write_ids):len(te.write_ids) + n_prompt] == list(te.read_ids[:n_prompt])
    assert kv[len(te.write_ids) + n_prompt] == te.targets[-1]
    assert all(te.read_writes) and written == len(kv) - len(te.write_ids)


def test_value_positions_spell_every_told_value(engine: Engine) -> None:
    """The run-1 tokens the write-gate loss opens on are the value's tokens, at every place it is said."""
    tok = EpisodeTokenizer(engine)
    checked = 0
    for ep in make_episodes("train", 40, 11, n_facts=(1, 2, 3), chit_chat=1.0):
        te = tok.episode(ep)
        assert te.asked == ep.facts.index(ep.probe)
        assert len(te.value_positions) == len(ep.facts)
        text = "".join(f"{m} {a}" for m, a in zip(ep.tell, ep.acks, strict=True))
        for fact, where in zip(ep.facts, te.value_positions, strict=True):
            assert where, fact
            runs: list[list[int]] = []
            for i in where:  # contiguous runs of positions: one per occurrence
                if runs and i == runs[-1][-1] + 1:
                    runs[-1].append(i)
                else:
                    runs.append([i])
            assert len(runs) <= text.count(fact.value)
            for run in runs:
                spelled = engine.detokenize([te.write_ids[i] for i in run]).strip()
                assert fact.value in spelled and len(spelled) <= len(fact.value) + 2, (fact.value, spelled)
                checked += 1
    assert checked >= 40


def test_prose_examples_are_plain_documents_with_nothing_to_remember(engine: Engine) -> None:
    """Prose is written as the perplexity check feeds it (BOS, no template); no value to open the gate on."""
    from deltamem_edge.recall.facts import training_text
    from deltamem_edge.train.data import PROSE_MAX_TOKENS, prose_examples

    tok = EpisodeTokenizer(engine)
    answers = {"Say hello.": "Hello!", "Name a colour.": "Blue."}
    starts = {tuple(engine.tokenize(d, add_special=True)[:6]) for d in training_text()}
    examples = prose_examples(tok, 12, 3, answers)
    assert len(examples) == 12
    for ex in examples:
        ep = ex.ep
        assert ep.value_positions == () and ep.asked == -1 and ex.value == (0, 0)
        assert 2 <= len(ep.write_ids) <= PROSE_MAX_TOKENS
        assert not any(engine.is_eog(t) for t in ep.write_ids)  # plain text, not a chat turn
        question = next(q for q in answers if tok.run2(q, answers[q])[0] == list(ep.read_ids))
        assert list(ep.targets) == tok.run2(question, answers[question])[2]
    from_start = [ex for ex in examples if tuple(ex.ep.write_ids[:6]) in starts]
    assert from_start, "no window starts at the beginning of a training document"


def test_dev_text_windows_are_plain_dev_prose(engine: Engine) -> None:
    """The dev probe's windows are plain documents cut from ``dev_text``, never from the training prose."""
    from deltamem_edge.recall.facts import dev_text, training_text
    from deltamem_edge.train.data import PROSE_MAX_TOKENS, text_examples

    tok = EpisodeTokenizer(engine)
    dev, train = dev_text(), training_text()
    examples = text_examples(tok, dev, 16, 5)
    assert len(examples) == 16
    for ex in examples:
        ids = ex.ep.write_ids
        assert 2 <= len(ids) <= PROSE_MAX_TOKENS
        assert not any(engine.is_eog(t) for t in ids)  # plain text, not a chat turn
        text = engine.detokenize(list(ids)).strip()  # a window from a document's start begins with BOS (not shown)
        piece = text[:40]
        assert any(piece in d for d in dev) and not any(piece in d for d in train), piece
    assert text_examples(tok, [], 4, 5) == []
