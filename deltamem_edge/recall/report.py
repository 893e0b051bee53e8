"""The markdown report of a memory evaluation (what goes into models/README.md).

Why a module of its own: the numbers come from ``evaluate``; how they are laid out for
people changes more often and should not touch the measurement.
"""

from __future__ import annotations

from .evaluate import CONDITIONS, MemoryEval, Score


def _cell(score: Score, bold: bool = False) -> str:
    text = str(score) if score.n else "—"
    return f"**{text}**" if bold else text


def _row(cells: list[str]) -> str:
    return "| " + " | ".join(cells) + " |"


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    return [_row(header), _row(["---"] * len(header)), *(_row(r) for r in rows)]


def markdown(result: MemoryEval) -> str:
    """Tables: recall per fact kind at 1 fact, capacity, the log-prob check and perplexity.

    The first line is the command that reproduces the numbers, and its seed.
    """
    cfg = result.config
    kinds = result.kinds()
    lines = [f"Measured with `{result.command}` (seed {cfg.seed}).", "",
             f"Model `{result.model}`, adapter `{result.adapter}`; greedy decoding, {cfg.n} held-out episodes per "
             f"condition, replies to the told facts capped at {cfg.tell_max_tokens} tokens, answers at "
             f"{cfg.answer_max_tokens}; an answer counts when it names the value (whole word, any case).", ""]

    lines += ["**Recall, 1 fact per memory**", ""]
    header = ["fact kind", *CONDITIONS.values()]
    rows = [[kind, *(_cell(result.score(c, 1, kind)) for c in CONDITIONS)] for kind in kinds
            if result.score("state", 1, kind).n]
    rows.append(["**all**", *(_cell(result.score(c, 1), bold=True) for c in CONDITIONS)])
    lines += _table(header, rows) + [""]

    ks = sorted({a.n_facts for a in result.answers if a.condition == "state"})
    lines += ["**Capacity: facts per memory** (state only, and history in context as the ceiling)", ""]
    header = ["fact kind", *(f"state only, {k}" for k in ks), *(f"in context, {k}" for k in ks)]
    rows = [[kind, *(_cell(result.score("state", k, kind)) for k in ks),
             *(_cell(result.score("context", k, kind)) for k in ks)] for kind in kinds]
    rows.append(["**all**", *(_cell(result.score("state", k), bold=True) for k in ks),
                 *(_cell(result.score("context", k), bold=True) for k in ks)])
    lines += _table(header, rows) + [""]

    lp = result.logprob
    lines += ["**Log-probability of the reference answer** (1 fact, `Conversation.score_reply`)", ""]
    lines += _table(["", "restored memory", "empty memory"],
                    [["mean log-prob per answer token", f"{lp.memory_mean:.3f}", f"{lp.empty_mean:.3f}"]])
    lines += ["", f"The value's tokens are more likely with the restored memory in {lp.value_better} of the "
              "episodes.", ""]

    if result.perplexity:
        base = result.perplexity[0]
        lines += [f"**Perplexity on held-out prose** ({base.docs} standard-library docstrings, {base.tokens} "
                  "predicted tokens; every document from a fresh session, writes on)", ""]
        rows = [[p.label, f"{p.value:.3f}", "—" if i == 0 else f"{p.change_vs(base):+.2f} %"]
                for i, p in enumerate(result.perplexity)]
        lines += _table(["model", "perplexity", "vs base"], rows) + [""]
    return "\n".join(lines)
