"""The optional transcript section of a state file: one canonical JSON spelling, a size cap, trimming.

Why a module of its own: the transcript is the only free-form text a state file holds, and
the only part with a policy of its own (which turns to keep when the cap is hit).  The
format (``format.py``) stores the bytes this module produces and hands back the bytes it
read; the conversation and the server trim with :func:`trim_transcript`.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping

TRANSCRIPT_MAX_BYTES = 64 * 1024
"""Cap of the encoded transcript (a few dozen turns of chat); the δ-state is the memory."""

_TRANSCRIPT_KEYS = ("role", "content")


def canonical_transcript(messages: Iterable[Mapping[str, str]]) -> bytes:
    """Compact UTF-8 JSON, keys in a fixed order: the one byte form we write and accept.

    Why canonical: decode rejects any other spelling, so a file that decodes always
    re-encodes to the same bytes (byte-exact round trips, golden files stay golden).
    Raises ValueError for anything that is not a list of {role, content} strings.
    """
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, Mapping) or set(m.keys()) != set(_TRANSCRIPT_KEYS):
            raise ValueError(f"transcript message {i} must have exactly the keys 'role' and 'content'")
        role, content = m["role"], m["content"]
        if not isinstance(role, str) or not isinstance(content, str) or not role:
            raise ValueError(f"transcript message {i}: role must be a non-empty str and content a str")
        out.append({"role": role, "content": content})
    try:
        return json.dumps(out, ensure_ascii=False, separators=(",", ":"), allow_nan=False).encode("utf-8")
    except UnicodeEncodeError as exc:  # lone surrogates
        raise ValueError(f"transcript is not valid Unicode: {exc}") from None


def trim_transcript(
    messages: Iterable[Mapping[str, str]], max_turns: int, *, max_bytes: int = TRANSCRIPT_MAX_BYTES
) -> list[dict[str, str]]:
    """Keep the last ``max_turns`` turns that also fit in ``max_bytes`` of encoded JSON.

    A turn starts at each ``"user"`` message; messages before the first user
    message (e.g. the system prompt) belong to the first turn.  If the last turns
    still do not fit, whole messages are dropped from the front, so the result is
    always encodable.  Why drop rather than cut text: the δ-state already holds the
    memory; a transcript with half a message would mislead a reader.
    """
    msgs = [{"role": m["role"], "content": m["content"]} for m in messages]
    if max_turns <= 0:
        return []
    starts = [i for i, m in enumerate(msgs) if m["role"] == "user" and i > 0]
    turn_starts = [0, *starts]
    if len(turn_starts) > max_turns:
        msgs = msgs[turn_starts[-max_turns] :]
    max_bytes = min(max_bytes, TRANSCRIPT_MAX_BYTES)
    while msgs and len(canonical_transcript(msgs)) > max_bytes:
        msgs = msgs[1:]
    return msgs


def parse_transcript(raw: bytes) -> list[dict[str, str]]:
    """Parse and validate a transcript section (already bounded to the cap).

    Raises ValueError naming what is wrong; the decoder turns it into a "corrupt file"
    error.  Only the canonical spelling is accepted, so a file that decodes re-encodes
    to the same bytes.
    """
    try:
        text = raw.decode("utf-8")
        parsed = json.loads(text, parse_constant=_reject_constant)
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise ValueError(f"transcript is not valid UTF-8 JSON ({type(exc).__name__})") from None
    if not isinstance(parsed, list) or not parsed:
        raise ValueError("transcript must be a non-empty JSON list of messages")
    if canonical_transcript(parsed) != raw:
        raise ValueError("transcript is not in canonical form (compact JSON, keys role then content)")
    return [{"role": m["role"], "content": m["content"]} for m in parsed]



def _reject_constant(name: str) -> None:
    """json.loads hook: NaN / Infinity literals are not JSON and never written by us."""
    raise ValueError(f"non-standard JSON constant {name}")
