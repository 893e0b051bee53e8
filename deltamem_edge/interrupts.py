"""Ctrl-C held back while a decode and its bookkeeping run.

Why a module of its own: the conversation's context window, its turn loop and the training
loop all need a KV-cache update and the Python lists that mirror it to happen together or
not at all, and none of them should import the others for it.
"""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Iterator


@contextlib.contextmanager
def deferred_interrupts() -> Iterator[None]:
    """Hold Ctrl-C until the block is done, so a decode and its bookkeeping stay together."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    caught: list[object] = []
    previous = signal.signal(signal.SIGINT, lambda *a: caught.append(a))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
        if caught:
            raise KeyboardInterrupt
