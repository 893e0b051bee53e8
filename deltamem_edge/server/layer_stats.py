"""The change of each memory's last turn, per layer, for the chat page's panel (the norms: ``state_norms``).

Why the server keeps the change: a state file holds the state *after* its last turn, not the
one before it, so "how much did each layer move in this turn" cannot be read back from the
file.  The server has both states in hand while it runs the turn, so it measures there:

    change[l] = ‖S_after[l] − S_before[l]‖_F   (Frobenius norm over the layer's rows × rank, in float64)

``S_before`` is the δ-state the turn started from (the state saved after the memory's previous
turn: the resent history is fed with writes off, so it does not move the state), ``S_after``
the state saved when the turn ended (also a turn cut short by Stop or a client that left).
A retry writes nothing, so it keeps the previous turn's record.

The record lives in RAM, at most ``capacity`` memories (least recently recorded leave
first), tagged with the ``(turns, tokens_written)`` of the file it describes: a memory whose
last turn ran before this server started, or whose file was since replaced (import, another
program), gets ``None`` rather than a number for another turn.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from dataclasses import dataclass


@dataclass(frozen=True)
class TurnChange:
    """The per-layer change of one completed turn, and which file state it led to."""

    turns: int  # the memory's turn count after this turn
    tokens_written: int  # and its tokens written
    change: tuple[float, ...]


class TurnChanges:
    """memory file name -> the change of its last turn measured by this server (bounded, thread-safe)."""

    def __init__(self, capacity: int = 4096) -> None:
        self.capacity = capacity
        self._lock = threading.Lock()
        self._by_key: OrderedDict[str, TurnChange] = OrderedDict()

    def record(self, key: str, record: TurnChange) -> None:
        with self._lock:
            self._by_key[key] = record
            self._by_key.move_to_end(key)
            while len(self._by_key) > self.capacity:
                self._by_key.popitem(last=False)

    def get(self, key: str, turns: int, tokens_written: int) -> TurnChange | None:
        """The record if it describes the file state ``(turns, tokens_written)``, else None."""
        with self._lock:
            record = self._by_key.get(key)
        if record is None or (record.turns, record.tokens_written) != (turns, tokens_written):
            return None
        return record

    def forget(self, key: str) -> None:
        with self._lock:
            self._by_key.pop(key, None)
