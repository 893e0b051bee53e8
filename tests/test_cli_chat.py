"""The real `deltamem-edge chat` in a pseudo-terminal, twice on one memory file.

SmolLM2-135M-Instruct Q4_1 with a random non-zero adapter, greedy sampling.  The
second run must start from exactly the state the first one saved, and the
tokens-written counter must equal what entered the KV cache (checked through
/stats, whose context count comes from llama.cpp's KV positions in the engine).
"""

from __future__ import annotations

import os
import re
import signal
import sys
from pathlib import Path

import numpy as np
import pexpect
import pytest
from ggufs import write_random_adapter

from deltamem_edge.defaults import default_model_path, placeholder_adapter_path
from deltamem_edge.statefile import read_state_file

PROMPT = "> "


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("cli")
    model = default_model_path()
    return {"model": model, "adapter": write_random_adapter(d / "a.dmem.gguf", model, rank=8, seed=8), "dir": d}


def spawn(setup: dict[str, Path], memory: Path, *extra: str, adapter: Path | None = None) -> pexpect.spawn:
    env = dict(os.environ, XDG_DATA_HOME=str(setup["dir"] / "xdg"), PYTHONUNBUFFERED="1")
    args = ["-m", "deltamem_edge", "chat", "-m", str(setup["model"]), "--adapter", str(adapter or setup["adapter"]),
            "--memory", str(memory), "--temp", "0", "-n", "16", "-c", "1024", "-t", "2", *extra]
    # SIGINT back to its default in the child: a process that starts with it ignored (inherited from a test
    # that ignored it, or a backgrounded CI shell) never gets Python's KeyboardInterrupt handler
    child = pexpect.spawn(sys.executable, args, env=env, encoding="utf-8", timeout=240, dimensions=(40, 200),
                          preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    child.expect_exact("type /help for commands")
    return child


def stats(child: pexpect.spawn) -> tuple[int, int, int]:
    child.sendline("/stats")
    child.expect(r"turns: (\d+)\s+tokens written: (\d+)\s+context: (\d+)/")
    return int(child.match.group(1)), int(child.match.group(2)), int(child.match.group(3))


def test_two_runs_on_one_memory_file(setup):
    memory = setup["dir"] / "me.state"

    child = spawn(setup, memory)
    child.expect_exact(PROMPT)
    child.sendline("Hi! I am Ada and I keep bees.")
    child.expect_exact(PROMPT)
    turns, written, context_tokens = stats(child)
    assert (turns, written) == (1, context_tokens)  # every token in the KV cache was written, once
    child.sendline("/quit")
    child.expect(r"memory saved: .*\((\d+) turns?, (\d+) tokens? written\)")
    child.expect(pexpect.EOF)
    first = read_state_file(memory)
    assert first.header.turns == 1 and first.header.tokens_written == written
    assert np.abs(first.state).max() > 0

    child = spawn(setup, memory)
    out = child.before
    child.expect_exact(PROMPT)
    assert re.search(r"1 turn, \d+ tokens written", out + child.before)
    turns, written2, context_tokens2 = stats(child)
    assert turns == 1 and written2 == written  # nothing written yet (the system prompt is fed read-only)
    child.sendline("/quit")
    child.expect(pexpect.EOF)
    resumed = read_state_file(memory)
    np.testing.assert_array_equal(resumed.state, first.state)  # bit-identical: loaded, not recomputed

    child = spawn(setup, memory)
    child.expect_exact(PROMPT)
    _, _, before = stats(child)
    child.sendline("What do I keep?")
    child.expect_exact(PROMPT)
    turns, written3, after = stats(child)
    assert turns == 2 and written3 == written + (after - before)
    child.sendline("/quit")
    child.expect(pexpect.EOF)
    assert read_state_file(memory).header.tokens_written == written3


def test_ctrl_c_stops_a_reply_and_keeps_memory(setup):
    memory = setup["dir"] / "interrupt.state"
    # the gentle placeholder adapter (random, small) keeps SmolLM2 talkative enough to be interrupted; 900 tokens
    # (the most that fits the 1024-token context without eviction) so a loaded CI machine still interrupts it
    child = spawn(setup, memory, "-n", "900", "--temp", "0.8", "--seed", "3", adapter=placeholder_adapter_path())
    child.expect_exact(PROMPT)
    child.sendline("Write a very long story about the sea.")
    child.expect_exact("sea.\r\n")  # our own line, echoed by the terminal
    child.expect(r"\w")  # the reply has started
    child.sendintr()
    child.expect_exact("[stopped]")
    child.expect_exact(PROMPT)
    turns, written, context_tokens = stats(child)
    assert turns == 1 and written == context_tokens
    child.sendline("Thanks.")  # the conversation goes on
    child.expect_exact(PROMPT)
    turns, written, context_tokens = stats(child)
    assert turns == 2 and written == context_tokens
    child.sendline("/quit")
    child.expect(pexpect.EOF)
    assert read_state_file(memory).header.tokens_written == written


def test_errors_are_one_line_with_a_hint(setup, tmp_path):
    bad = tmp_path / "corrupt.state"
    bad.write_bytes(b"DMEMSTAT" + b"\0" * 40)
    env = dict(os.environ, XDG_DATA_HOME=str(tmp_path / "xdg"))
    child = pexpect.spawn(sys.executable, ["-m", "deltamem_edge", "chat", "-m", str(setup["model"]), "--adapter",
                                           str(setup["adapter"]), "--memory", str(bad)],
                          env=env, encoding="utf-8", timeout=120)
    child.expect(pexpect.EOF)
    child.close()
    text = child.before
    assert child.exitstatus == 1
    assert "Traceback" not in text
    lines = [ln for ln in text.splitlines() if ln.strip()]
    assert lines[-2].startswith("error: ") and str(bad) in lines[-2]
    assert lines[-1].startswith("hint: ")
    assert bad.read_bytes() == b"DMEMSTAT" + b"\0" * 40  # untouched


def test_banner_names_the_adapter_in_use_with_the_embedded_model(setup, tmp_path):
    """No --model: the banner names our default adapter by its label, and a user's own --adapter by its path."""
    from deltamem_edge import defaults

    env = dict(os.environ, XDG_DATA_HOME=str(tmp_path / "xdg"), PYTHONUNBUFFERED="1")
    banners = {}
    for name, extra in (("default", []), ("own", ["--adapter", str(setup["adapter"])])):
        child = pexpect.spawn(sys.executable, ["-m", "deltamem_edge", "chat", "--memory", "none", *extra],
                              env=env, encoding="utf-8", timeout=240, dimensions=(40, 400))
        child.expect_exact("type /help for commands")
        banners[name] = child.before
        child.expect_exact(PROMPT)
        child.sendline("/quit")
        child.expect(pexpect.EOF)
    default_label = defaults.default_adapter_label(defaults.default_adapter_path())
    assert "embedded default model" in banners["default"] and f"adapter: {default_label}" in banners["default"]
    assert "embedded default model" in banners["own"] and f"adapter: {setup['adapter']}" in banners["own"]
    assert default_label not in banners["own"]
