"""The memory evaluation on the real SmolLM2-135M-Instruct Q4_1 with a random non-zero adapter.

A random adapter remembers nothing, so the numbers themselves are not checked; what is
checked is that they are what they claim to be: every count is n, every percentage follows
from the hits, every hit from its reply, the state-only run really reads a memory the
empty-memory run does not have, the log-prob check is wired to ``score_reply``, and the base
perplexity equals one computed here from ``Session.feed`` logits.  Plus the CLI verb.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest

from deltamem_edge import Engine
from deltamem_edge.cli.main import main
from deltamem_edge.conversation import Conversation
from deltamem_edge.recall import facts
from deltamem_edge.recall.evaluate import CONDITIONS, EvalConfig, contains_value, evaluate_memory, value_token_mask
from deltamem_edge.recall.report import markdown

CFG = EvalConfig(n=2, seed=1, capacity=(1,), tell_max_tokens=12, answer_max_tokens=10,
                 perplexity_docs=2, perplexity_tokens=96)


@pytest.fixture(scope="module")
def setup(smol_model: Path, smol_random_adapter: Path, tmp_path_factory: pytest.TempPathFactory) -> dict:
    d = tmp_path_factory.mktemp("recall")
    model, adapter = smol_model, smol_random_adapter
    with Engine(model, adapter, n_ctx=2048, n_threads=1) as eng, \
            Engine(model, False, n_ctx=2048, n_threads=1) as base:
        yield {"eng": eng, "base": base, "model": model, "adapter": adapter, "dir": d,
               "result": evaluate_memory(eng, base, CFG, progress=False)}


def test_counts_percentages_and_hits_are_consistent(setup):
    r = setup["result"]
    episodes = facts.make_episodes("eval", CFG.n, CFG.seed, n_facts=1)
    for cond in CONDITIONS:
        rows = [a for a in r.answers if a.condition == cond]
        assert [(a.episode, a.kind, a.value, a.question) for a in rows] == \
            [(i, e.probe.kind, e.probe.value, e.probe.question) for i, e in enumerate(episodes)]
        total = r.score(cond)
        assert total.n == CFG.n
        assert total.hits == sum(contains_value(a.reply, a.value) for a in rows)
        assert all(a.hit == contains_value(a.reply, a.value) for a in rows)
        assert math.isclose(total.percent, 100 * total.hits / total.n)
        by_kind = [r.score(cond, 1, k) for k in facts.KIND_NAMES]
        assert sum(s.n for s in by_kind) == total.n and sum(s.hits for s in by_kind) == total.hits
        assert all(len(a.reply) > 0 for a in rows)
    assert [a.memory_tokens for a in r.answers if a.condition == "base"] == [0] * CFG.n


def test_state_only_reads_the_told_memory_and_empty_does_not(setup):
    r = setup["result"]
    mem = {c: [a.memory_tokens for a in r.answers if a.condition == c] for c in CONDITIONS}
    assert mem["state"] == mem["context"]  # run 2 starts from exactly what run 1 wrote
    assert all(s > e > 0 for s, e in zip(mem["state"], mem["empty"], strict=True))
    assert len(set(mem["empty"])) == 1  # an empty memory holds the system prompt only, every time
    lp = r.logprob
    assert lp.memory_sum != lp.empty_sum  # the restored state changes what the model expects


def test_contains_value_is_a_whole_word_match():
    assert contains_value("Your sister is called BO.", "Bo")
    assert not contains_value("It is about time.", "Bo")
    assert not contains_value("Your birthday is on May 12.", "May 1")
    assert contains_value("Your birthday is on May 1, I think.", "May 1")
    assert not contains_value("The year 2012.", "12")


def test_logprob_check_is_score_reply(setup, tmp_path):
    eng, r = setup["eng"], setup["result"]
    lp = r.logprob
    episodes = facts.make_episodes("eval", CFG.n, CFG.seed, n_facts=1)
    assert len(lp.memory_sum) == len(lp.empty_sum) == len(lp.tokens) == CFG.n
    for i, ep in enumerate(episodes):
        ids = eng.tokenize(ep.probe.answer, add_special=False, parse_special=False)
        assert lp.tokens[i] == len(ids)
        mask = value_token_mask(eng, ep.probe.answer, ep.probe.value)
        assert 0 < mask.sum() < len(ids)
        assert ep.probe.value in eng.detokenize([t for t, m in zip(ids, mask, strict=True) if m])
    with Conversation(eng, tmp_path / "new.state") as conv:  # an empty memory, independently
        again = conv.score_reply(episodes[0].probe.question, episodes[0].probe.answer)
    assert float(again.sum()) == lp.empty_sum[0]
    assert math.isclose(lp.memory_mean, sum(lp.memory_sum) / sum(lp.tokens))
    better = sum(m > e for m, e in zip(lp.memory_value, lp.empty_value, strict=True))
    assert lp.value_better.hits == better and lp.value_better.n == CFG.n


def test_base_perplexity_equals_an_independent_computation(setup):
    base, r = setup["base"], setup["result"]
    nll, count = 0.0, 0
    for doc in facts.generic_text()[:CFG.perplexity_docs]:
        ids = base.tokenize(doc, add_special=True)[:CFG.perplexity_tokens]
        assert len(ids) == CFG.perplexity_tokens
        with base.session() as s:
            x = s.feed(ids, write=True, logits="all").astype(np.float64)
        logp = x - np.logaddexp.reduce(x, axis=1, keepdims=True)
        nll -= logp[np.arange(len(ids) - 1), ids[1:]].sum()
        count += len(ids) - 1
    ppl_base, ppl_empty, ppl_written = r.perplexity
    assert ppl_base.tokens == count and ppl_base.docs == CFG.perplexity_docs
    assert math.isclose(ppl_base.value, math.exp(nll / count), rel_tol=1e-9)
    assert 1.0 < ppl_base.value < 1000.0
    assert ppl_written.value != ppl_empty.value  # the unrelated state was really set
    assert math.isclose(ppl_empty.change_vs(ppl_base), 100 * (ppl_empty.value / ppl_base.value - 1))


def test_report_and_json(setup):
    r = setup["result"]
    text = markdown(r)
    first = text.splitlines()[0]
    assert f"`{r.command}`" in first and f"seed {CFG.seed}" in first
    assert "deltamem-edge eval-memory" in r.command and "--seed 1" in r.command
    for cond in CONDITIONS:
        assert f"**{r.score(cond)}**" in text
    data = json.loads(json.dumps(r.as_dict()))
    assert data["scores"]["state@1"]["hits"] == r.score("state").hits
    assert len(data["answers"]) == len(r.answers) == 4 * CFG.n
    assert data["perplexity"][0]["perplexity"] == r.perplexity[0].value


def test_cli_runs_and_refuses_a_model_without_adapter(setup, tmp_path, capsys):
    out = tmp_path / "eval.json"
    rc = main(["eval-memory", "--model", str(setup["model"]), "--adapter", str(setup["adapter"]), "-n", "1",
               "--capacity", "1", "--tell-max-tokens", "4", "--answer-max-tokens", "4", "--no-perplexity",
               "-t", "1", "--json", str(out)])
    printed = capsys.readouterr().out
    assert rc == 0
    assert printed.startswith("Measured with `deltamem-edge eval-memory --model ")
    data = json.loads(out.read_text())
    assert data["config"]["n"] == 1 and data["perplexity"] == [] and len(data["answers"]) == 4
    assert data["command"] in printed.splitlines()[0]

    rc = main(["eval-memory", "--model", str(setup["model"]), "-n", "1", "-t", "1"])  # no adapter anywhere
    err = capsys.readouterr().err
    assert rc == 1 and "needs a δ-mem adapter" in err and "hint: pass --adapter" in err

    assert main(["eval-memory", "--capacity", "0,3"]) == 2  # a usage error, before anything is loaded
    rc = main(["eval-memory", "--json", str(tmp_path / "missing" / "x.json")])
    assert rc == 1 and "does not exist" in capsys.readouterr().err
