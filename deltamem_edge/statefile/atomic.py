"""Replace a file so that a crash leaves the old or the new bytes, never a mix; OSErrors with hints.

Why a module of its own: the write protocol (temp file, fsync, rename, fsync of the
directory) and the names of its temp files are what the crash tests pin down; the
store (``store.py``) uses it for every save and cleans up the temp files it names.
"""

from __future__ import annotations

import contextlib
import errno
import os
import re
import secrets
from pathlib import Path

from ..errors import StateFileError


def os_error(path: Path, action: str, exc: OSError) -> StateFileError:
    """Wrap an OSError with the errno text and a hint that fits the errno."""
    code = exc.errno
    text = os.strerror(code) if code else str(exc)
    if code == errno.ENOSPC or code == errno.EDQUOT:
        hint = "free some disk space and save again; the previous memory file is unchanged"
    elif code in (errno.EROFS, errno.EACCES, errno.EPERM):
        hint = "the location is not writable: choose a writable directory, or open the memory read-only"
    elif code == errno.ENOENT:
        hint = "the directory does not exist; create it first"
    else:
        hint = "the previous memory file (if any) is unchanged"
    return StateFileError(f"could not {action}: {text} [errno {code}]", path=path, hint=hint)


def temp_name_pattern(target_name: str) -> re.Pattern[str]:
    """Names of temp files for ``target_name``: ``.<name>.tmp-<pid>-<8 hex>``.

    Why documented and matched exactly: a crashed writer can leave one behind; a
    new writer holding the lock removes exactly these names and nothing else, and
    readers never look at them (they start with a dot and are never the target).
    """
    return re.compile(re.escape(f".{target_name}.tmp-") + r"[0-9]+-[0-9a-f]{8}")


def _write_all(fd: int, data: bytes) -> None:
    """os.write may write less than asked (signals, quotas): loop until done."""
    view = memoryview(data)
    while view:
        written = os.write(fd, view)
        if written <= 0:  # pragma: no cover - defensive
            raise OSError(errno.EIO, "short write")
        view = view[written:]


def _fsync_dir(directory: Path) -> None:
    """Make the rename durable.  Filesystems that cannot fsync a directory say EINVAL."""
    try:
        dfd = os.open(directory, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0) | getattr(os, "O_CLOEXEC", 0))
    except OSError:
        return  # cannot open the directory for reading: the rename is done, durability best effort
    try:
        os.fsync(dfd)
    except OSError as exc:
        if exc.errno not in (errno.EINVAL, errno.ENOTSUP, errno.EBADF):
            raise
    finally:
        os.close(dfd)


def atomic_write(path: Path, data: bytes) -> None:
    """Replace ``path`` with ``data`` so that a crash leaves the old or the new file, never a mix.

    Protocol: create ``.<name>.tmp-<pid>-<rand>`` in the same directory with
    O_EXCL and mode 0600 -> write all -> fsync -> close -> os.replace onto the
    target -> fsync the directory.  On any failure before the replace the temp
    file is removed and the target is untouched.
    """
    directory = path.parent
    tmp = directory / f".{path.name}.tmp-{os.getpid()}-{secrets.token_hex(4)}"
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0) | getattr(os, "O_NOFOLLOW", 0)
    try:
        fd = os.open(tmp, flags, 0o600)
    except OSError as exc:
        raise os_error(path, "create a temporary file to save the memory", exc) from None
    try:
        try:
            _write_all(fd, data)
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except OSError as exc:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise os_error(path, "save the memory", exc) from None
    try:
        _fsync_dir(directory)
    except OSError as exc:
        raise os_error(path, "flush the directory after saving (the new file is in place)", exc) from None
