"""Parsers for CLI option values that typer has no type for."""

from __future__ import annotations

import typer


def int_list(text: str, flag: str, *, low: int, high: int, why: str = "") -> tuple[int, ...]:
    """``"1,3,8"`` -> ``(1, 3, 8)``, each in ``low..high``; anything else is a usage error naming ``flag``."""
    try:
        values = tuple(int(v) for v in text.split(",") if v.strip())
    except ValueError:
        values = ()
    if not values:
        raise typer.BadParameter(f"{flag}: expected comma-separated numbers like 1,3,8, got {text!r}")
    if any(not low <= v <= high for v in values):
        raise typer.BadParameter(f"{flag}: each value must be in {low}..{high}{why}")
    return values


def facts_per_memory(text: str, flag: str) -> tuple[int, ...]:
    """Facts per memory (``--capacity``, ``--facts``): an episode holds at most one fact of each kind."""
    from deltamem_edge.recall.facts import KINDS

    return int_list(text, flag, low=1, high=len(KINDS), why=f" (there are {len(KINDS)} fact kinds)")
