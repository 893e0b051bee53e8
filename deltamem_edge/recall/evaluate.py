"""Does the δ-state remember?  Held-out facts told in one run, asked about in the next.

Why through the runtime: the claim users care about is what ``deltamem-edge chat``
does with a memory file, so every condition below is an ordinary ``Conversation`` on
an ``Engine`` (greedy decoding), never a training-time forward pass.

Conditions (``CONDITIONS``), each on episodes from ``facts.make_episodes("eval", ...)``:

* ``base``    no history (base): the model without adapter, fresh conversation, asked the question.
  The chance level: how often the value is guessed.
* ``empty``   empty memory: the δ-mem model with a new, empty memory file, asked the question.
* ``context`` history in context: the tell messages are said (the model writes its own replies),
  then the question in the same run: the facts are in the KV cache.  The ceiling.
* ``state``   state only: run 1 says the tell messages and ends; run 2 is a new Conversation on
  the same memory file (empty context) and is asked the question.  What δ-mem is for.

Capacity repeats ``context`` and ``state`` with k facts per memory (a separate episode set for
each k).  An answer counts when it contains the value as a whole word, case-insensitive (see
``contains_value``).  A statistical check that needs no luck with greedy decoding: the
log-probability of the reference answer (``Conversation.score_reply``) with the restored memory
against an empty one.  Perplexity on held-out prose checks that the memory does not cost the
model its language (``perplexity``).
"""

from __future__ import annotations

import re
import shlex
import shutil
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from ..conversation import Conversation
from ..engine import Engine
from ..errors import EngineError
from ..sampling import SamplingParams
from . import facts
from .perplexity import MAX_DOC_TOKENS, Perplexity, document_ids, perplexity

CONDITIONS = {
    "base": "no history (base)",
    "empty": "empty memory",
    "context": "history in context",
    "state": "state only",
}
GREEDY = SamplingParams(temp=0.0)
UNRELATED_SEED_OFFSET = 1_000_003  # the perplexity's "unrelated conversation": never one of the scored episodes
UNRELATED_FACTS = 3


@dataclass(frozen=True)
class EvalConfig:
    """What to measure.  The defaults are what models/README.md reports."""

    n: int = 60  # episodes per condition (and per capacity)
    seed: int = 1
    capacity: tuple[int, ...] = (1, 3, 8)  # facts per memory for the capacity runs
    tell_max_tokens: int = 48  # cap on the model's own replies to the tell messages
    answer_max_tokens: int = 24
    perplexity: bool = True
    perplexity_docs: int | None = None  # None: every document of facts.generic_text()
    perplexity_tokens: int = MAX_DOC_TOKENS  # each document is truncated to this many tokens

    def __post_init__(self) -> None:
        if self.n < 1:
            raise ValueError("n must be at least 1")
        if not self.capacity or any(not 1 <= k <= len(facts.KINDS) for k in self.capacity):
            raise ValueError(f"capacity values must be in 1..{len(facts.KINDS)}")
        if self.tell_max_tokens < 1 or self.answer_max_tokens < 1 or self.perplexity_tokens < 2:
            raise ValueError("token caps must be at least 1 (2 for perplexity_tokens)")

    def command(self, model: str | Path | None = None, adapter: str | Path | None = None) -> str:
        """The CLI command that reproduces these numbers (no --model: the embedded default)."""
        parts = ["deltamem-edge", "eval-memory"]
        if model is not None:
            parts += ["--model", str(model)]
        if adapter is not None:
            parts += ["--adapter", str(adapter)]
        parts += ["-n", str(self.n), "--seed", str(self.seed), "--capacity", ",".join(map(str, self.capacity)),
                  "--tell-max-tokens", str(self.tell_max_tokens), "--answer-max-tokens", str(self.answer_max_tokens)]
        if not self.perplexity:
            parts.append("--no-perplexity")
        return shlex.join(parts)


@dataclass(frozen=True)
class Answer:
    """One question under one condition: what was asked, what came back, whether it counts."""

    condition: str  # a key of CONDITIONS
    n_facts: int  # facts told in the episode
    episode: int  # index in its episode set
    kind: str
    value: str
    question: str
    reply: str
    hit: bool
    memory_tokens: int  # tokens in the δ-state when the question was asked (0 for the base model)


@dataclass(frozen=True)
class Score:
    """hits out of n."""

    hits: int
    n: int

    @property
    def percent(self) -> float:
        return 100.0 * self.hits / self.n if self.n else 0.0

    def __str__(self) -> str:
        return f"{self.hits}/{self.n} ({self.percent:.1f} %)"


@dataclass(frozen=True)
class LogProbCheck:
    """``score_reply`` of the reference answer, restored memory vs empty memory (1 fact per memory).

    Why: greedy hits are all-or-nothing; a memory that moved the answer's probability but not
    yet its argmax shows up here.  Per episode: summed log-prob and token count of the whole
    answer, and summed log-prob of the tokens that spell the value.
    """

    memory_sum: tuple[float, ...]
    empty_sum: tuple[float, ...]
    tokens: tuple[int, ...]
    memory_value: tuple[float, ...]
    empty_value: tuple[float, ...]

    @property
    def memory_mean(self) -> float:
        """Mean log-prob per answer token with the restored memory (pooled over episodes)."""
        return sum(self.memory_sum) / sum(self.tokens)

    @property
    def empty_mean(self) -> float:
        return sum(self.empty_sum) / sum(self.tokens)

    @property
    def value_better(self) -> Score:
        """Episodes where the memory gives the value's tokens a higher log-prob than an empty memory."""
        return Score(sum(m > e for m, e in zip(self.memory_value, self.empty_value, strict=True)), len(self.memory_value))


@dataclass
class MemoryEval:
    """Every answer, the log-prob check and the perplexities of one evaluation run."""

    config: EvalConfig
    command: str
    model: str
    adapter: str
    answers: list[Answer]
    logprob: LogProbCheck
    perplexity: list[Perplexity] = field(default_factory=list)  # base, empty state, unrelated state
    seconds: float = 0.0

    def score(self, condition: str, n_facts: int = 1, kind: str | None = None) -> Score:
        """Hits of one condition at ``n_facts`` facts per memory, overall or for one fact kind."""
        rows = [a for a in self.answers if a.condition == condition and a.n_facts == n_facts
                and (kind is None or a.kind == kind)]
        return Score(sum(a.hit for a in rows), len(rows))

    def kinds(self) -> list[str]:
        """The fact kinds that occur, in facts.KINDS order."""
        seen = {a.kind for a in self.answers}
        return [k for k in facts.KIND_NAMES if k in seen]

    def as_dict(self) -> dict:
        """Everything, JSON-ready: summary scores plus every answer."""
        summary = {}
        for cond in CONDITIONS:
            for k in sorted({a.n_facts for a in self.answers if a.condition == cond}):
                key = f"{cond}@{k}"
                summary[key] = {"label": CONDITIONS[cond], "n_facts": k, **_score_dict(self.score(cond, k)),
                                "by_kind": {kind: _score_dict(self.score(cond, k, kind)) for kind in self.kinds()
                                            if self.score(cond, k, kind).n}}
        lp = self.logprob
        return {
            "command": self.command, "seed": self.config.seed, "config": asdict(self.config),
            "model": self.model, "adapter": self.adapter, "seconds": self.seconds, "scores": summary,
            "logprob": {"memory_mean_per_token": lp.memory_mean, "empty_mean_per_token": lp.empty_mean,
                        "value_better": _score_dict(lp.value_better), **asdict(lp)},
            "perplexity": [{"label": p.label, "perplexity": p.value, "nll": p.nll, "tokens": p.tokens, "docs": p.docs,
                            "change_vs_base_percent": p.change_vs(self.perplexity[0])} for p in self.perplexity],
            "answers": [asdict(a) for a in self.answers],
        }


def _score_dict(s: Score) -> dict:
    return {"hits": s.hits, "n": s.n, "percent": s.percent}


# -- scoring helpers -------------------------------------------------------------------------


def contains_value(reply: str, value: str) -> bool:
    """Whether ``reply`` names ``value``: case-insensitive, as a whole word.

    Why whole words: several values are short ("Bo", "Ren", "pho", "12", "May 1") and would
    otherwise be found inside "about", "parent", "phone", "2012" or "May 12".
    """
    return re.search(rf"(?<!\w){re.escape(value)}(?!\w)", reply, flags=re.IGNORECASE) is not None


def value_token_mask(engine: Engine, text: str, value: str) -> np.ndarray:
    """Which tokens of ``text`` (tokenized like ``score_reply`` does) overlap the value's bytes."""
    ids = engine.tokenize(text, add_special=False, parse_special=False)
    pieces = [engine.token_bytes(t) for t in ids]
    joined = b"".join(pieces)
    start = joined.lower().find(value.encode().lower())
    mask = np.zeros(len(ids), dtype=bool)
    if start < 0:
        return mask
    end, pos = start + len(value.encode()), 0
    for i, piece in enumerate(pieces):
        mask[i] = pos < end and pos + len(piece) > start
        pos += len(piece)
    return mask


# -- the conditions ----------------------------------------------------------------------------


def _answer(conv: Conversation, condition: str, ep: facts.Episode, index: int, max_tokens: int) -> Answer:
    """Ask the probe's question in ``conv`` and record the reply."""
    probe = ep.probe
    before = conv.tokens_written
    conv.max_new_tokens = max_tokens
    reply = conv.say(probe.question)
    return Answer(condition=condition, n_facts=len(ep.facts), episode=index, kind=probe.kind, value=probe.value,
                  question=probe.question, reply=reply, hit=contains_value(reply, probe.value), memory_tokens=before)


def ask_base(base: Engine, ep: facts.Episode, index: int, cfg: EvalConfig) -> Answer:
    """(i) no history: the model without adapter, fresh conversation."""
    with Conversation(base, sampling=GREEDY) as conv:
        return _answer(conv, "base", ep, index, cfg.answer_max_tokens)


def ask_empty(engine: Engine, ep: facts.Episode, index: int, cfg: EvalConfig, memory: Path,
              score: bool = False) -> tuple[Answer, np.ndarray | None]:
    """(i-b) empty memory: a new memory file; with ``score``, also the answer's log-probs."""
    with Conversation(engine, memory, sampling=GREEDY) as conv:
        lp = conv.score_reply(ep.probe.question, ep.probe.answer) if score else None
        return _answer(conv, "empty", ep, index, cfg.answer_max_tokens), lp


def ask_after_telling(engine: Engine, ep: facts.Episode, index: int, cfg: EvalConfig, memory: Path,
                      score: bool = False) -> tuple[Answer, Answer, np.ndarray | None]:
    """(ii) and (iii) from one run 1: the tell messages are said once, with the model's own replies.

    The memory file as run 1 left it is copied before the question is asked in run 1 (history
    in context); run 2 opens the copy in a new Conversation (state only).  Both conditions thus
    see exactly the same told run.  With ``score``, run 2 also scores the reference answer.
    """
    run2 = memory.with_name(memory.stem + ".run2.state")
    with Conversation(engine, memory, sampling=GREEDY, max_new_tokens=cfg.tell_max_tokens) as conv:
        for message in ep.tell:
            conv.say(message)
        shutil.copyfile(memory, run2)
        in_context = _answer(conv, "context", ep, index, cfg.answer_max_tokens)
    with Conversation(engine, run2, sampling=GREEDY) as conv:
        lp = conv.score_reply(ep.probe.question, ep.probe.answer) if score else None
        state_only = _answer(conv, "state", ep, index, cfg.answer_max_tokens)
    return in_context, state_only, lp


def unrelated_state(engine: Engine, cfg: EvalConfig, memory: Path) -> np.ndarray:
    """The δ-state after the tell messages of an eval episode that is never scored."""
    ep = facts.make_episodes("eval", 1, cfg.seed + UNRELATED_SEED_OFFSET, n_facts=UNRELATED_FACTS)[0]
    with Conversation(engine, memory, sampling=GREEDY, max_new_tokens=cfg.tell_max_tokens) as conv:
        for message in ep.tell:
            conv.say(message)
        return conv.session.state()


# -- the whole run -----------------------------------------------------------------------------


class _Progress:
    """A tqdm bar on stderr, or nothing."""

    def __init__(self, total: int, enabled: bool) -> None:
        self._bar = None
        if enabled:
            from tqdm import tqdm

            self._bar = tqdm(total=total, desc="eval-memory", unit="step", file=sys.stderr, dynamic_ncols=True)

    def step(self, what: str) -> None:
        if self._bar is not None:
            self._bar.set_postfix_str(what, refresh=False)
            self._bar.update(1)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()


def _check_engines(engine: Engine, base: Engine) -> None:
    if engine.adapter is None:
        raise EngineError("eval-memory needs a δ-mem adapter, and this model has none", path=engine.model_path,
                          hint="pass --adapter ADAPTER.dmem.gguf, or a bundled model")
    if base.adapter is not None:
        raise EngineError("the base engine must run without adapter", path=base.model_path,
                          hint="create it with Engine(model, adapter_path=False)")


def _steps(cfg: EvalConfig, n_docs: int) -> int:
    per_capacity = sum(2 for k in cfg.capacity if k != 1)
    return cfg.n * (4 + per_capacity) + (3 * n_docs + 1 if cfg.perplexity else 0)


def evaluate_memory(engine: Engine, base: Engine, config: EvalConfig | None = None, *,
                    command: str | None = None, progress: bool = True) -> MemoryEval:
    """Run every condition on ``engine`` (with δ-mem) and ``base`` (the same model, no adapter).

    Each Conversation lives for one episode; memory files live in a temporary folder that is
    removed afterwards.  ``command`` is what the report's first line shows (default: the CLI
    command rebuilt from ``config``).
    """
    cfg = config or EvalConfig()
    _check_engines(engine, base)
    t0 = time.perf_counter()
    docs = facts.generic_text()[:cfg.perplexity_docs] if cfg.perplexity else []
    bar = _Progress(_steps(cfg, len(docs)), progress)
    answers: list[Answer] = []
    scores: dict[str, list] = {"mem": [], "empty": [], "n": [], "mem_v": [], "empty_v": []}
    try:
        with tempfile.TemporaryDirectory(prefix="eval-memory-") as tmp:
            folder = Path(tmp)
            main = facts.make_episodes("eval", cfg.n, cfg.seed, n_facts=1)
            for i, ep in enumerate(main):
                answers.append(ask_base(base, ep, i, cfg))
                bar.step("base")
                empty, lp_empty = ask_empty(engine, ep, i, cfg, folder / f"empty-{i}.state", score=True)
                answers.append(empty)
                bar.step("empty memory")
                ctx, state, lp_mem = ask_after_telling(engine, ep, i, cfg, folder / f"k1-{i}.state", score=True)
                answers += [ctx, state]
                bar.step("history in context")
                bar.step("state only")
                mask = value_token_mask(engine, ep.probe.answer, ep.probe.value)
                for key, lp in (("mem", lp_mem), ("empty", lp_empty)):
                    scores[key].append(float(lp.sum()))
                    scores[key + "_v"].append(float(lp[mask].sum()))
                scores["n"].append(len(lp_mem))
            for k in (k for k in cfg.capacity if k != 1):
                for i, ep in enumerate(facts.make_episodes("eval", cfg.n, cfg.seed, n_facts=k)):
                    ctx, state, _ = ask_after_telling(engine, ep, i, cfg, folder / f"k{k}-{i}.state")
                    answers += [ctx, state]
                    bar.step(f"{k} facts")
                    bar.step(f"{k} facts")
            ppl = _perplexities(engine, base, cfg, docs, folder, bar) if cfg.perplexity else []
    finally:
        bar.close()
    logprob = LogProbCheck(memory_sum=tuple(scores["mem"]), empty_sum=tuple(scores["empty"]),
                           tokens=tuple(scores["n"]), memory_value=tuple(scores["mem_v"]),
                           empty_value=tuple(scores["empty_v"]))
    return MemoryEval(config=cfg, command=command or cfg.command(engine.model_path, engine.adapter.path),
                      model=str(engine.model_path), adapter=str(engine.adapter.path), answers=answers,
                      logprob=logprob, perplexity=ppl, seconds=time.perf_counter() - t0)


def _perplexities(engine: Engine, base: Engine, cfg: EvalConfig, docs: list[str], folder: Path,
                  bar: _Progress) -> list[Perplexity]:
    """Base, δ-mem with an empty state, δ-mem on top of an unrelated conversation's state."""
    state = unrelated_state(engine, cfg, folder / "unrelated.state")
    bar.step("unrelated conversation")
    ids = document_ids(engine, docs, cfg.perplexity_tokens)
    if document_ids(base, docs, cfg.perplexity_tokens) != ids:  # same model file: only a broken setup gets here
        raise EngineError("the base engine tokenizes differently from the δ-mem engine", path=base.model_path,
                          hint="evaluate a δ-mem model against its own base model")

    out = []
    for label, eng, st in (("base (no adapter)", base, None), ("δ-mem, empty state", engine, None),
                           ("δ-mem, state from an unrelated conversation", engine, state)):
        out.append(perplexity(eng, ids, label=label, state=st, on_doc=lambda label=label: bar.step(label)))
    return out
