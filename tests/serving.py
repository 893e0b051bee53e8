"""The `deltamem-edge serve` test harness: the real server as a subprocess on 127.0.0.1.

Shared by tests/test_server.py (behaviour) and tests/test_server_load.py (load).  The
server picks a free port (``--port 0``) and prints it; ``serve`` waits for that line,
and on exit sends SIGTERM and checks the shutdown was clean (no traceback, the
"stopped:" line, exit code 0 or -SIGTERM).
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import openai

from deltamem_edge.server.memories import memory_file_name


class Server:
    """A running server: its process, base URL and memory directory, and the log it printed."""

    def __init__(self, proc: subprocess.Popen, url: str, memdir: Path, log: list[str]) -> None:
        self.proc, self.url, self.memdir, self.log = proc, url, memdir, log

    def client(self, key: str = "sk-no-key-required", **kw) -> openai.OpenAI:
        kw.setdefault("timeout", 60)
        return openai.OpenAI(base_url=f"{self.url}/v1", api_key=key, max_retries=0, **kw)

    def path(self, memory_id: str) -> Path:
        return self.memdir / memory_file_name(memory_id)

    def info(self, memory_id: str, **kw) -> httpx.Response:
        return httpx.get(f"{self.url}/v1/memories/{memory_id}", timeout=30, **kw)

    def memory_kib(self) -> dict[str, int]:
        """The server process's resident memory now (VmRSS) and at its peak (VmHWM), in KiB (Linux)."""
        text = Path(f"/proc/{self.proc.pid}/status").read_text()
        fields = dict(line.split(":", 1) for line in text.splitlines() if ":" in line)
        return {k: int(fields[k].split()[0]) for k in ("VmRSS", "VmHWM")}


@contextmanager
def serve(files: dict[str, Path], memdir: Path, *extra: str) -> Iterator[Server]:
    """``deltamem-edge serve`` (2 sequences of 1024 tokens, greedy unless a request says otherwise)."""
    args = [sys.executable, "-m", "deltamem_edge", "serve", "-m", str(files["model"]), "-a", str(files["adapter"]),
            "--memory-dir", str(memdir), "--port", "0", "-np", "2", "-c", "2048", "-t", "1", "--temp", "0", *extra]
    with _run(args, memdir) as srv:
        yield srv


@contextmanager
def serve_batched(files: dict[str, Path], memdir: Path, *extra: str, parallel: int = 4) -> Iterator[Server]:
    """The same app with its KV cache split per user, so users share decode steps (``bench.server serve``).

    Why not the CLI: this entry (the benchmark's) builds the same app, pool and uvicorn settings as
    ``deltamem-edge serve`` but also runs a model without an adapter, for the baseline.
    Greedy by default, 512 tokens per user.
    """
    args = [sys.executable, "-m", "deltamem_edge.bench.server", "serve", "--model", str(files["model"]),
            "--adapter", str(files["adapter"]), "--memory-dir", str(memdir), "--parallel", str(parallel),
            "--ctx-size", str(512 * parallel), "--threads", "1", *extra]
    with _run(args, memdir) as srv:
        yield srv


def decode_steps(log: list[str]) -> tuple[int, int]:
    """(generated tokens, decode steps) from a batched server's "stopped:" line."""
    line = next(line for line in log if line.startswith("stopped: "))
    m = re.search(r"(\d+) generated tokens in (\d+) decode steps", line)
    assert m, line
    return int(m.group(1)), int(m.group(2))


@contextmanager
def _run(args: list[str], memdir: Path) -> Iterator[Server]:
    proc = subprocess.Popen(args, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True,
                            env=dict(os.environ, PYTHONUNBUFFERED="1"))
    log: list[str] = []
    ready = threading.Event()

    def read() -> None:
        for line in proc.stderr:
            log.append(line)
            if line.startswith("listening on "):
                ready.set()
        ready.set()

    threading.Thread(target=read, daemon=True).start()
    try:
        assert ready.wait(120), "server did not start"
        started = [line for line in log if line.startswith("listening on ")]
        assert started, "".join(log)
        yield Server(proc, started[0].split()[-1], memdir, log)
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            code = proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            raise
    # uvicorn re-raises the SIGTERM it handled once shutdown is complete: -15 after a clean stop
    assert code in (0, -signal.SIGTERM), "".join(log)
    assert any(line.startswith("stopped: ") for line in log), "".join(log)
    assert "Traceback" not in "".join(log), "".join(log)


def chat(client: openai.OpenAI, messages: list[dict[str, str]], memory: str | None = None, **kw):
    headers = {"X-Memory-Id": memory} if memory is not None else None
    kw.setdefault("max_tokens", 12)
    return client.chat.completions.create(model="tiny-chat", messages=messages, extra_headers=headers, **kw)


def U(text: str) -> dict[str, str]:  # noqa: N802
    return {"role": "user", "content": text}


def A(text: str) -> dict[str, str]:  # noqa: N802
    return {"role": "assistant", "content": text}
