"""The synthetic facts: the train/eval split is clean, draws are reproducible, episodes are sound.

The split is what makes ``eval-memory`` honest, so it is checked on what is actually drawn
(thousands of episodes of every size), not only on the rule: no value and no statement or
question phrasing of an evaluation episode ever occurs in a training episode.
"""

from __future__ import annotations

import re

import pytest

from deltamem_edge.recall import facts

SIZES = tuple(range(1, len(facts.KINDS) + 1))
KIND = {k.name: k for k in facts.KINDS}


def _phrasing(fact: facts.Fact) -> str:
    """The statement with its value (and the job's article) put back as placeholders."""
    text = fact.statement.replace(fact.value, "{v}")
    return re.sub(r"\ban? \{v\}", "{a} {v}", text) if fact.kind == "job" else text


def _drawn(split: str, n: int = 2000, seed: int = 11) -> list[facts.Episode]:
    return facts.make_episodes(split, n, seed, n_facts=SIZES)


@pytest.fixture(scope="module")
def drawn() -> dict[str, list[facts.Episode]]:
    return {split: _drawn(split) for split in facts.SPLITS}


def _values(episodes: list[facts.Episode]) -> set[str]:
    return {f.value for ep in episodes for f in ep.facts}


def test_splits_share_no_value(drawn):
    values = {split: _values(eps) for split, eps in drawn.items()}
    assert not values["train"] & values["eval"]
    assert not values["dev"] & values["eval"]
    assert not values["train"] & values["dev"]
    # enough drawn to mean something: most of each pool's eval part occurs
    for kind in facts.KINDS:
        if kind.pool:
            eval_pool = {v for v in kind.pool if facts.in_split(v, "eval")}
            seen = {f.value for ep in drawn["eval"] for f in ep.facts if f.kind == kind.name}
            assert seen == eval_pool, kind.name


def test_splits_share_no_statement_or_question_phrasing(drawn):
    def phrasings(episodes: list[facts.Episode]) -> tuple[set[str], set[str]]:
        facts_ = [f for ep in episodes for f in ep.facts]
        for f in facts_:
            assert _phrasing(f) in KIND[f.kind].statements, f.statement  # the placeholder recovery is right
        return {_phrasing(f) for f in facts_}, {f.question for f in facts_}

    train_s, train_q = phrasings(drawn["train"] + drawn["dev"])
    eval_s, eval_q = phrasings(drawn["eval"])
    assert not train_s & eval_s
    assert not train_q & eval_q
    assert len(eval_s) == len(eval_q) == len(facts.KINDS)  # every kind's held-out phrasing occurs
    told_train = " ".join(m for ep in drawn["train"] for m in ep.tell)
    for phrasing in eval_s:  # and no eval wording hides inside a training message either
        head = phrasing.split("{")[0].strip()
        assert head and head not in told_train, phrasing


def test_draws_are_reproducible_from_the_seed():
    a = facts.make_episodes("eval", 200, 5, n_facts=(1, 3, 8))
    assert a == facts.make_episodes("eval", 200, 5, n_facts=(1, 3, 8))
    assert a != facts.make_episodes("eval", 200, 6, n_facts=(1, 3, 8))
    assert facts.make_episodes("eval", 3, 5, n_facts=1) == facts.make_episodes("eval", 3, 5, n_facts=1)
    assert facts.make_episodes("train", 50, 5) != facts.make_episodes("eval", 50, 5)


def test_every_probe_is_told_and_every_statement_holds_its_value(drawn):
    for split, episodes in drawn.items():
        for ep in episodes:
            assert ep.probe in ep.facts
            assert len(ep.facts) in SIZES and len({f.kind for f in ep.facts}) == len(ep.facts)
            assert len(ep.acks) == len(ep.tell)
            told = " ".join(ep.tell)
            for f in ep.facts:
                assert f.value in f.statement, (split, f)
                assert f.value in f.answer, (split, f)
                assert f.statement in told, (split, f)
                assert facts.in_split(f.value, split)


def test_each_value_is_in_exactly_one_split():
    for kind in facts.KINDS:
        for value in kind.pool:
            assert sum(facts.in_split(value, s) for s in facts.SPLITS) == 1
    with pytest.raises(ValueError):
        facts.in_split("Ines", "test")
    with pytest.raises(ValueError):
        facts.make_episodes("eval", 1, 1, n_facts=len(facts.KINDS) + 1)


def test_generic_text_is_prose():
    docs = facts.generic_text()
    assert len(docs) >= 5
    assert all(len(d) >= 400 and "  " not in d for d in docs)


def test_small_value_sets_for_the_curriculum_stay_in_their_split() -> None:
    """value_limit=4 gives at most 4 values per kind, all from the training split."""
    from collections import defaultdict

    seen: dict[str, set[str]] = defaultdict(set)
    for ep in facts.make_episodes("train", 600, 3, n_facts=(1, 3), value_limit=4):
        for f in ep.facts:
            seen[f.kind].add(f.value)
            assert facts.in_split(f.value, "train")
    assert set(seen) == set(facts.KIND_NAMES)
    assert all(1 <= len(v) <= 4 for v in seen.values()), {k: len(v) for k, v in seen.items()}


def test_no_value_repeats_or_contains_another_in_one_episode() -> None:
    for ep in facts.make_episodes("eval", 1500, 4, n_facts=8):
        values = [f.value.lower() for f in ep.facts]
        for i, a in enumerate(values):
            for b in values[i + 1:]:
                assert a not in b and b not in a, (a, b)


def test_training_prose_never_contains_the_perplexity_check_text() -> None:
    """The prose the trainer writes into the state is not the held-out prose perplexity is measured on."""
    assert not set(facts.TRAINING_TEXT_MODULES) & set(facts.GENERIC_TEXT_MODULES)
    train, held_out = facts.training_text(), facts.generic_text()
    assert len(train) >= 50 and all(len(chunk) >= 300 for chunk in train)
    for doc in held_out:
        for i in range(0, len(doc) - 60, 60):  # no 60-character piece of a held-out document in training
            assert not any(doc[i:i + 60] in chunk for chunk in train), doc[i:i + 60]


def test_dev_prose_is_neither_training_nor_held_out_prose() -> None:
    """The dev probe's prose shares no module and no 60-character piece with the training or the check text."""
    assert not set(facts.DEV_TEXT_MODULES) & (set(facts.TRAINING_TEXT_MODULES) | set(facts.GENERIC_TEXT_MODULES))
    dev, train, held_out = facts.dev_text(), facts.training_text(), facts.generic_text()
    assert len(dev) >= 20 and all(len(chunk) >= 300 for chunk in dev)
    for doc in dev:
        for i in range(0, len(doc) - 60, 60):
            piece = doc[i:i + 60]
            assert not any(piece in chunk for chunk in train), piece
            assert not any(piece in other for other in held_out), piece
