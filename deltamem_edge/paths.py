"""Where deltamem-edge keeps a user's files (memories, history, installed models).

Why one function: the chat and server memories, the trained adapters and the
registry of pulled models must agree on one folder, and tests (or a user with
several setups) must be able to move all of it with one variable.  The build
cache has its own root (``deltamem_edge.native.build.cache_root``, DELTAMEM_CACHE):
it can be deleted and rebuilt, this folder cannot.
"""

from __future__ import annotations

import os
from pathlib import Path


def data_dir() -> Path:
    """``$DELTAMEM_DATA``, else ``$XDG_DATA_HOME/deltamem-edge``, else ``~/.local/share/deltamem-edge``."""
    env = os.environ.get("DELTAMEM_DATA")
    if env:
        return Path(env).expanduser()
    base = os.environ.get("XDG_DATA_HOME") or str(Path.home() / ".local" / "share")
    return Path(base) / "deltamem-edge"
