"""One persistent memory per user: id -> file, residency in the context's sequences, locking.

Why a pool: the Engine's context has ``n_seq_max`` sequences; each live Conversation holds
one.  A memory that served a request stays *resident* (its KV cache and δ-state in a
sequence) so the user's next request reuses the cache; when a sequence is needed and none
is free, the least recently used idle memory is closed (its file was saved after its last
turn, so nothing is lost) and comes back from its file on its next request.  Requests for
one memory are serialized (one lease at a time); different memories run at once, their
decodes interleaved by the Engine's lock.

Ids never become paths: an id is checked (1-128 characters of ``A-Z a-z 0-9 . _ - : @ +``)
and the file name is the hex sha256 of it, inside the memory directory.

Export/import: ``export_state`` gives a memory's file bytes; ``import_state`` replaces a
memory by a whole state file after the checks a load makes (format, checksum, this
server's adapter and model fingerprints, shape), once the memory's running request is
done and its conversation has left its sequence, so nothing saves over the import.

Threads: ``acquire``/``release`` (and export/import/delete) are called from request
worker threads, never from the event loop (they block).
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..conversation import Conversation
from ..engine import Engine
from ..errors import EngineError, StateFileError
from ..fingerprint import adapter_fingerprint
from ..state_norms import layer_norms
from ..statefile import (
    MemoryFile,
    decode,
    memory_path_for,
    read_state_bytes,
    read_state_file,
    validate_state_bytes,
)
from .layer_stats import TurnChanges
from .protocol import ApiError

MEMORY_ID_RE = re.compile(r"[A-Za-z0-9._\-:@+]{1,128}")
FILE_SUFFIX = ".state"
_HASH_DOMAIN = b"deltamem-edge server memory id v1\x00"


def check_memory_id(memory_id: Any, param: str = "X-Memory-Id") -> str:
    """The id if it is acceptable, else ApiError(400) (the id is not echoed: it may be huge or binary)."""
    if not isinstance(memory_id, str) or MEMORY_ID_RE.fullmatch(memory_id) is None:
        raise ApiError(400, f"{param}: a memory id is 1 to 128 characters from A-Z a-z 0-9 . _ - : @ +",
                       param=param, code="invalid_memory_id")
    return memory_id


def memory_file_name(memory_id: str) -> str:
    """``<sha256 hex>.state``: what the client sends never reaches the file system."""
    return hashlib.sha256(_HASH_DOMAIN + memory_id.encode("utf-8")).hexdigest() + FILE_SUFFIX


@dataclass(frozen=True)
class MemoryIdentity:
    """What a memory file must match to be used by this server (what ``Conversation`` checks on load)."""

    adapter_fp: bytes
    model_fp: bytes
    shape: tuple[int, int, int]

    @classmethod
    def of(cls, engine: Engine) -> MemoryIdentity:
        """The identity of the engine's model and attached adapter (hashes the adapter and the vocabulary)."""
        if engine.adapter is None:
            raise EngineError("a memory needs a δ-mem adapter, and this engine has none")
        return cls(adapter_fingerprint(engine.adapter.path), engine.model_fingerprint(), engine.adapter.state_shape)


@dataclass
class _Slot:
    key: str  # the file name
    path: Path | None  # None: a stateless scratch conversation
    conv: Conversation | None = None
    busy: bool = False


@dataclass
class Lease:
    """A conversation lent to one request; give it back with ``MemoryPool.release``."""

    conv: Conversation
    slot: _Slot
    fresh: bool  # True when the conversation was (re)opened for this request

    @property
    def stateless(self) -> bool:
        return self.slot.path is None


class PoolClosed(Exception):
    """The server is shutting down."""


class MemoryPool:
    """Conversations for memory files in ``directory``, at most ``n_seq`` alive at once.

    ``open_conversation(path_or_None)`` builds a Conversation (the server fixes the sampling,
    context share and transcript length); ``None`` is a stateless request.
    """

    def __init__(self, directory: Path, n_seq: int, open_conversation: Callable[[Path | None], Conversation],
                 wait_s: float = 600.0) -> None:
        self.directory = directory
        self.n_seq = n_seq
        self._open = open_conversation
        self._wait_s = wait_s
        self._cond = threading.Condition()
        self._slots: OrderedDict[str, _Slot] = OrderedDict()  # resident or busy memories, LRU first
        self._live = 0  # conversations alive (each holds one sequence)
        self._leases = 0  # conversations lent out right now
        self._closed = False
        self.evictions = 0
        self.changes = TurnChanges()  # per-layer change of each memory's last turn, measured as it ran

    def path_for(self, memory_id: str) -> Path:
        return memory_path_for(memory_file_name(memory_id), self.directory)

    # -- leases -----------------------------------------------------------------------------

    def _wait(self, deadline: float) -> None:
        if self._closed:
            raise PoolClosed
        left = deadline - time.monotonic()
        if left <= 0:
            raise ApiError(503, "the server is busy: every sequence is in use; retry later", type="server_error",
                           code="server_busy")
        self._cond.wait(left)
        if self._closed:
            raise PoolClosed

    def _reserve_sequence(self, deadline: float) -> None:
        """Count one more live conversation, closing the LRU idle memory if every sequence is taken."""
        while self._live >= self.n_seq:
            victim = next((s for s in self._slots.values() if not s.busy and s.conv is not None), None)
            if victim is None:
                self._wait(deadline)
                continue
            self._drop(victim)
            self.evictions += 1
        self._live += 1

    def _drop(self, slot: _Slot) -> None:
        """Close an idle slot's conversation (saved after its last turn) and forget the slot."""
        if slot.conv is not None:
            try:
                slot.conv.close()
            finally:
                slot.conv = None
                self._live -= 1
        self._slots.pop(slot.key, None)

    def acquire(self, memory_id: str | None) -> Lease:
        """Wait until the memory is free (and a sequence), then lend its conversation."""
        deadline = time.monotonic() + self._wait_s
        with self._cond:
            if self._closed:
                raise PoolClosed
            if memory_id is None:
                slot = _Slot(key="", path=None)
            else:
                path = self.path_for(memory_id)
                while True:  # the slot may be dropped (deleted, evicted) while we wait: look it up again
                    slot = self._slots.get(path.name)
                    if slot is None:
                        slot = self._slots[path.name] = _Slot(key=path.name, path=path)
                    if not slot.busy:
                        break
                    self._wait(deadline)
                self._slots.move_to_end(slot.key)
            slot.busy = True
            if slot.conv is not None:
                self._leases += 1
                return Lease(slot.conv, slot, fresh=False)
            try:
                self._reserve_sequence(deadline)
            except BaseException:
                self._unbusy(slot)
                raise
        try:
            conv = self._open(slot.path)
        except BaseException:
            with self._cond:
                self._live -= 1
                self._unbusy(slot)
            raise
        with self._cond:
            slot.conv = conv
            self._leases += 1
        return Lease(conv, slot, fresh=True)

    def _unbusy(self, slot: _Slot) -> None:
        slot.busy = False
        if slot.conv is None:
            self._slots.pop(slot.key, None)
        self._cond.notify_all()

    def release(self, lease: Lease, *, broken: bool = False) -> None:
        """Give a conversation back.  Stateless ones, and ``broken`` ones (an error mid-turn), are closed."""
        with self._cond:
            self._leases -= 1
            slot = lease.slot
            if (lease.stateless or broken or self._closed) and slot.conv is not None:
                with contextlib.suppress(Exception):
                    slot.conv.close()
                slot.conv = None
                self._live -= 1
            self._unbusy(slot)

    # -- memory files -----------------------------------------------------------------------

    def info(self, memory_id: str) -> dict[str, Any] | None:
        """Header facts of a memory file and its per-layer numbers (never the state), or None if there is none.

        ``layer_norms``: the Frobenius norm of each layer of the saved state; ``last_turn``: how much
        each layer changed in the last turn (``layer_stats``), or None when this server did not run it.
        """
        path = self.path_for(memory_id)
        if not os.path.lexists(path):
            return None
        mem = read_state_file(path)
        h = mem.header
        with self._cond:
            slot = self._slots.get(path.name)
            resident = slot is not None and slot.conv is not None
        last = self.changes.get(path.name, h.turns, h.tokens_written)
        return {
            "object": "memory", "id": memory_id, "file": path.name, "bytes": path.stat().st_size,
            "turns": h.turns, "tokens_written": h.tokens_written,
            "adapter_fingerprint": h.adapter_fp.hex(), "model_fingerprint": h.model_fp.hex(),
            "adapter": h.adapter_label, "model": h.model_label,
            "layers": h.n_layers, "rows": h.rows, "rank": h.rank, "state_heads": h.state_heads,
            "created_us": h.created_us, "updated_us": h.updated_us,
            "transcript_messages": len(mem.transcript), "resident": resident,
            "layer_norms": [float(n) for n in layer_norms(mem.state)],
            "last_turn": None if last is None else {"turn": last.turns, "layer_change": list(last.change)},
        }

    @contextlib.contextmanager
    def _exclusive(self, path: Path) -> Iterator[None]:
        """Hold a memory for a file operation: after its running request, with no conversation open on it.

        The slot is marked busy (a request for this memory waits until the block ends) and a
        resident conversation is closed (it was saved after its last turn), so the block is the
        only writer of the file in this process; the file's flock guards against other processes.
        """
        deadline = time.monotonic() + self._wait_s
        with self._cond:
            if self._closed:
                raise PoolClosed
            while True:  # as in acquire: the slot may be dropped while we wait
                slot = self._slots.get(path.name)
                if slot is None:
                    slot = self._slots[path.name] = _Slot(key=path.name, path=path)
                if not slot.busy:
                    break
                self._wait(deadline)
            slot.busy = True
            if slot.conv is not None:
                with contextlib.suppress(Exception):  # as in release: the slot must not stay busy
                    slot.conv.close()
                slot.conv = None
                self._live -= 1
                self._cond.notify_all()  # a sequence is free
        try:
            yield
        finally:
            with self._cond:
                self._unbusy(slot)

    def delete(self, memory_id: str) -> bool:
        """Close the memory if resident (after its running request) and remove its file."""
        path = self.path_for(memory_id)
        with self._exclusive(path):
            self.changes.forget(path.name)
            if not os.path.lexists(path):
                return False
            try:
                with MemoryFile(path):  # holds the lock while unlinking: no other program is mid-save
                    path.unlink()
            except OSError as exc:
                raise StateFileError(f"could not delete the memory file: {exc}", path=path) from None
        return True

    def export_state(self, memory_id: str) -> bytes | None:
        """The memory's state file, byte for byte (None if there is none).

        Why no wait for a running request: saves are atomic renames, so this is the file as
        of the memory's last completed turn.  The bytes are decoded once before they are
        handed out: a corrupt file raises StateFileError instead of travelling on.
        """
        path = self.path_for(memory_id)
        if not os.path.lexists(path):
            return None
        data = read_state_bytes(path)
        decode(data, path=path)
        return data

    def import_state(self, memory_id: str, data: bytes, identity: MemoryIdentity) -> bool:
        """Replace the memory by ``data``, a whole state file; True if the memory existed before.

        ``data`` is checked as a load checks a file (``statefile.validate_state_bytes``) before
        anything else happens: a corrupt file raises StateFileError, one of another adapter,
        model or shape StateMismatchError, and the memory (file, resident conversation) is
        left as it was.  A valid one is written atomically, unchanged, after the memory's
        running request; the memory's next request opens it from the new file.
        """
        source = "the uploaded state file"
        check = {"adapter_fp": identity.adapter_fp, "model_fp": identity.model_fp, "shape": identity.shape}
        validate_state_bytes(data, **check, source=source)
        path = self.path_for(memory_id)
        with self._exclusive(path):
            self.changes.forget(path.name)  # the imported file's last turn was not measured here
            existed = os.path.lexists(path)
            with MemoryFile(path) as mf:
                mf.replace_from_bytes(data, **check, source=source)
        return existed

    # -- shutdown ---------------------------------------------------------------------------

    def close(self, wait_s: float = 30.0) -> None:
        """Wait (bounded) for running requests, then close every conversation.

        Each memory was saved after its last completed turn; a turn still running when the
        wait ends is closed by its own request thread (its generator saves on close).
        """
        deadline = time.monotonic() + wait_s
        with self._cond:
            while self._leases and time.monotonic() < deadline:
                self._cond.wait(max(0.0, deadline - time.monotonic()))
            self._closed = True
            for slot in list(self._slots.values()):
                if not slot.busy:
                    self._drop(slot)
            self._cond.notify_all()

    def stats(self) -> dict[str, int]:
        with self._cond:
            return {"sequences": self.n_seq, "live": self._live,
                    "resident": sum(1 for s in self._slots.values() if s.conv is not None),
                    "busy": self._leases, "evictions": self.evictions}
