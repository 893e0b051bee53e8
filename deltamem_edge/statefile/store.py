"""State files on disk: bounded reads, names inside a memory directory, and the locked MemoryFile.

Why a module of its own: this is where state files are read, named and locked; the bytes
come from ``format.py``, the identity check from ``identity.py`` and the durable replace
from ``atomic.py``.  One writer per memory (advisory ``flock`` on a sidecar), any number
of unlocked readers (writers only ever rename a complete file into place).
"""

from __future__ import annotations

import contextlib
import errno
import os
import re
import stat
from pathlib import Path

from ..errors import StateFileError, StateLockedError
from .atomic import atomic_write, os_error, temp_name_pattern
from .format import MAX_FILE_BYTES, MemoryState, corrupt, decode, encode
from .identity import check_compatible

try:  # fcntl is POSIX-only; without it only read-only access is possible.
    import fcntl
except ImportError:  # pragma: no cover - exercised on Windows only
    fcntl = None  # type: ignore[assignment]

_NAME_RE = re.compile(r"[A-Za-z0-9._-]{1,128}")


def read_state_bytes(path: str | Path) -> bytes:
    """The raw bytes of one state file, read without locking and without decoding them.

    Why no lock is needed: writers only ever replace the file with a rename, so a
    reader sees either the old or the new complete file.  Non-regular files and
    files over ``MAX_FILE_BYTES`` are refused before reading (O_NONBLOCK so a FIFO
    cannot hang us).  ``read_state_file`` decodes what this returns; a server
    exporting a memory sends these bytes as they are.
    """
    p = Path(path)
    try:
        fd = os.open(p, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    except FileNotFoundError:
        raise StateFileError(
            "memory file does not exist", path=p, hint="check the path, or start a new memory"
        ) from None
    except OSError as exc:
        raise os_error(p, "open the memory file", exc) from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise StateFileError("is not a regular file", path=p, hint="point --memory at a state file")
        if st.st_size > MAX_FILE_BYTES:
            raise corrupt(p, f"file is {st.st_size} bytes, larger than any valid state file ({MAX_FILE_BYTES})")
        chunks, total = [], 0
        while total <= st.st_size:  # read one byte past the size to notice growth
            chunk = os.read(fd, st.st_size + 1 - total)
            if not chunk:
                break
            chunks.append(chunk)
            total += len(chunk)
    except OSError as exc:
        raise os_error(p, "read the memory file", exc) from None
    finally:
        os.close(fd)
    if total > st.st_size:
        raise StateFileError(
            "memory file changed while it was read", path=p, hint="another program is writing it; retry"
        )
    return b"".join(chunks)


def read_state_file(path: str | Path) -> MemoryState:
    """Read and fully validate one state file without locking (see ``read_state_bytes``)."""
    return decode(read_state_bytes(path), path=path)


def validate_state_bytes(
    data: bytes | bytearray | memoryview,
    *,
    adapter_fp: bytes,
    model_fp: bytes,
    shape: tuple[int, int, int],
    source: str = "the uploaded state file",
) -> MemoryState:
    """Decode ``data`` and check it belongs to this adapter and model: what a load checks, on bytes.

    The size bound of ``read_state_file``, every check of :func:`decode`, then
    :func:`check_compatible`.  Raises StateFileError (corrupt) or StateMismatchError
    (another adapter, model or shape); ``source`` names the data in messages.
    """
    if len(data) > MAX_FILE_BYTES:
        raise corrupt(source, f"{len(data)} bytes, larger than any valid state file ({MAX_FILE_BYTES})")
    mem = decode(data, path=source)
    check_compatible(mem, adapter_fp, model_fp, shape, path=source)
    return mem


def lock_path_for(path: str | Path) -> Path:
    """The sidecar lock file ``.<name>.lock`` next to the state file."""
    p = Path(path)
    return p.with_name(f".{p.name}.lock")


def memory_path_for(name: str, directory: str | Path) -> Path:
    """Map a user-supplied memory *name* (not a path) to a file inside ``directory``.

    Accepts only ``[A-Za-z0-9._-]{1,128}``, no leading dot (so a name can never
    collide with our ``.x.lock`` / ``.x.tmp-*`` files), no ``..``; the result must
    resolve inside the directory (a pre-existing symlink that escapes is refused).
    The file is ``directory / name``; no suffix is added.
    """
    d = Path(directory)
    valid = isinstance(name, str) and _NAME_RE.fullmatch(name) is not None
    if not valid or name.startswith(".") or ".." in name:
        raise StateFileError(
            f"invalid memory name {name!r}",
            path=d,
            hint="use 1-128 characters from A-Z a-z 0-9 . _ -, not starting with a dot and without '..'",
        )
    candidate = d / name
    base = d.resolve()
    if candidate.resolve().parent != base:
        raise StateFileError(
            f"memory name {name!r} resolves outside the memory directory",
            path=d,
            hint="remove the symlink or pick another name",
        )
    return candidate


class MemoryFile:
    """A state file opened for one conversation: single writer, any number of readers.

    ``MemoryFile(path)`` takes an exclusive, non-blocking ``flock`` on the sidecar
    ``.<name>.lock`` (which records the holder's pid; it is never deleted, since
    deleting lock files races with lockers).  A second writer, in this or another
    process, gets StateLockedError naming the pid.  ``readonly=True`` takes no lock
    (atomic renames make unlocked reads safe), never writes, and refuses save().
    The lock dies with the process, so a crash never leaves the memory stuck.
    """

    def __init__(self, path: str | Path, *, readonly: bool = False) -> None:
        self.path = Path(path)
        self.readonly = readonly
        self._lock_fd: int | None = None
        self._closed = False
        if not readonly:
            self._lock_fd = self._acquire_lock()
            self._remove_stale_temps()

    # -- lock ----------------------------------------------------------------------
    def _acquire_lock(self) -> int:
        """Open/create the lock file and flock it; report the holder's pid if busy."""
        if fcntl is None:  # pragma: no cover - non-POSIX
            raise StateFileError(
                "file locking is not available on this platform", path=self.path, hint="open it read-only"
            )
        lock_path = lock_path_for(self.path)
        flags = os.O_RDWR | os.O_CREAT | getattr(os, "O_CLOEXEC", 0) | getattr(os, "O_NOFOLLOW", 0)
        try:
            fd = os.open(lock_path, flags, 0o600)
        except OSError as exc:
            raise StateFileError(
                f"cannot create the lock file {lock_path.name}: {os.strerror(exc.errno or 0)} [errno {exc.errno}]",
                path=self.path,
                hint="the directory is not writable: open the memory read-only, or choose a writable directory",
            ) from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            holder = self._read_holder(fd)
            os.close(fd)
            if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                who = f"pid {holder}" if holder else "another process"
                if holder == os.getpid():
                    who += " (this process)"
                raise StateLockedError(
                    f"is in use by {who}",
                    path=self.path,
                    hint="close the other deltamem-edge session using this memory, or open it read-only",
                ) from None
            raise os_error(self.path, "lock the memory file", exc) from None
        try:
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        except OSError:
            pass  # the pid is informational; the flock is what protects the file
        return fd

    @staticmethod
    def _read_holder(fd: int) -> int | None:
        """Best-effort pid of the current holder, for the error message."""
        try:
            text = os.pread(fd, 32, 0).decode("ascii", "replace").strip()
            return int(text) if text.isdigit() else None
        except OSError:
            return None

    def _remove_stale_temps(self) -> None:
        """Delete temp files left by a crashed writer.

        Why this is safe: every writer holds this lock while its temp file exists,
        and we hold the lock now, so any matching temp file is provably dead.
        """
        pattern = temp_name_pattern(self.path.name)
        try:
            names = os.listdir(self.path.parent)
        except OSError:
            return
        for n in names:
            if pattern.fullmatch(n):
                with contextlib.suppress(OSError):
                    os.unlink(self.path.parent / n)

    # -- API -----------------------------------------------------------------------
    def _require_open(self) -> None:
        if self._closed:
            raise StateFileError("memory file handle is closed", path=self.path, hint="open it again")

    def exists(self) -> bool:
        """True if a state file is present (it may still be invalid: load() checks)."""
        self._require_open()
        return os.path.lexists(self.path)

    def load(
        self,
        *,
        adapter_fp: bytes | None = None,
        model_fp: bytes | None = None,
        shape: tuple[int, int, int] | None = None,
    ) -> MemoryState | None:
        """Return the saved memory, or None if there is none yet.

        Pass ``adapter_fp``, ``model_fp`` and ``shape`` together to also run
        :func:`check_compatible`.  Any problem raises; nothing is ever reset.
        """
        self._require_open()
        expect = (adapter_fp, model_fp, shape)
        if any(v is not None for v in expect) and any(v is None for v in expect):
            raise ValueError("pass adapter_fp, model_fp and shape together, or none of them")
        if not os.path.lexists(self.path):
            return None
        mem = read_state_file(self.path)
        if shape is not None:
            check_compatible(mem, adapter_fp, model_fp, shape, path=self.path)  # type: ignore[arg-type]
        return mem

    def replace_from_bytes(
        self,
        data: bytes | bytearray | memoryview,
        *,
        adapter_fp: bytes,
        model_fp: bytes,
        shape: tuple[int, int, int],
        source: str = "the uploaded state file",
    ) -> MemoryState:
        """Replace the file with ``data`` (a whole state file, e.g. an upload), if it is valid.

        Validated exactly as :meth:`load` validates the file on disk: the size bound,
        every check of :func:`decode` (format, checksum, finite payload, transcript), then
        :func:`check_compatible` against the given identity.  Only then are the bytes
        written, unchanged, with the same atomic replace as :meth:`save`; on any problem
        this raises (StateFileError, StateMismatchError) and the old file is untouched.
        Why the bytes and not a re-encoding: an export followed by an import gives back
        the identical file.  ``source`` names the data in error messages (never a path).
        """
        self._require_open()
        if self.readonly:
            raise StateFileError(
                "memory was opened read-only; not replacing it", path=self.path, hint="open it without read-only"
            )
        raw = bytes(data)
        mem = validate_state_bytes(raw, adapter_fp=adapter_fp, model_fp=model_fp, shape=shape, source=source)
        atomic_write(self.path, raw)
        return mem

    def save(self, mem: MemoryState) -> None:
        """Atomically replace the file with ``mem``; on any error the old file stays."""
        self._require_open()
        if self.readonly:
            raise StateFileError(
                "memory was opened read-only; not saving", path=self.path, hint="open it without read-only to save"
            )
        try:
            data = encode(mem)
        except ValueError as exc:
            raise StateFileError(
                f"refusing to save an invalid memory: {exc}",
                path=self.path,
                hint="the previous memory file is unchanged",
            ) from None
        atomic_write(self.path, data)

    def close(self) -> None:
        """Release the lock (idempotent).  The lock file itself stays, by design."""
        if self._lock_fd is not None:
            with contextlib.suppress(OSError):
                os.close(self._lock_fd)  # closing the last fd releases the flock
            self._lock_fd = None
        self._closed = True

    def __enter__(self) -> MemoryFile:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def __del__(self) -> None:
        with contextlib.suppress(Exception):
            self.close()

    def __repr__(self) -> str:
        mode = "readonly" if self.readonly else "locked"
        return f"MemoryFile({str(self.path)!r}, {mode}{', closed' if self._closed else ''})"
