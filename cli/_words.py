"""Small wording helpers for CLI messages."""

from __future__ import annotations


def count(n: int, noun: str, plural: str | None = None) -> str:
    """``count(1, "turn")`` -> "1 turn", ``count(3, "turn")`` -> "3 turns"."""
    return f"{n} {noun if n == 1 else (plural or noun + 's')}"
