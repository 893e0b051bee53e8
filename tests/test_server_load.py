"""A bounded load test of `deltamem-edge serve`: concurrent users, mixed requests, clients that leave.

8 clients, each with its own memory, send 25 requests each at once to a server with 4
sequences (so idle memories are evicted and reloaded under load): non-streaming, streaming
with usage, and streams the client closes after a chunk or three; one request per client
is stateless, half the clients resend their whole history as apps do.  Afterwards (the
server stopped, so every cut reply has been closed and saved) each memory must hold
exactly the turns its client started, in order (``turns`` and the transcript's user
messages), no temp or stray file may remain, and the server's peak RSS (VmHWM) must stay
under ``RSS_BOUND_MIB`` and grow by less than ``GROWTH_BOUND_MIB`` over its idle RSS.
Every request writes at most a few dozen tokens: the test is about bookkeeping under
concurrency, not speed (``deltamem-edge bench-server`` measures speed).  It runs on
``deltamem-edge serve`` (one decode per user) and on the same app with users batched into
shared decode steps (``Engine.step``); a last test checks that batched users get exactly
the replies and memories they get alone.
"""

from __future__ import annotations

import random
import re
import threading

import numpy as np
import pytest
from serving import A, U, chat, decode_steps, serve, serve_batched

from deltamem_edge.server.memories import memory_file_name
from deltamem_edge.statefile import read_state_file

CLIENTS = 8
REQUESTS = 25
STATELESS_REQUEST = 3  # each client's 4th request carries no memory id
# Resident memory of the whole server process (Python, numpy, starlette, uvicorn, the tiny model and its
# 2048-cell KV cache), read from /proc/<pid>/status.  Measured here: 76 MiB idle after one request, a peak
# (VmHWM) of 85 MiB after the load.  The bounds leave room for allocator differences, not for a leak of a
# conversation, a thread or a response per request (200 requests).
RSS_BOUND_MIB = 192
GROWTH_BOUND_MIB = 48  # peak under load minus the idle RSS before it
FILE_RE = re.compile(r"\.?[0-9a-f]{64}\.state(\.lock)?")


# ``chat_files`` and ``talkative_files`` (tests/conftest.py): tiny chat models and their adapters


def _client(srv, i: int, start: threading.Barrier, written: list[str]) -> None:
    """One app: REQUESTS requests in a row; ``written`` gets each user message that started a turn in its memory."""
    rng = random.Random(1000 + i)
    client = srv.client()
    history: list[dict[str, str]] = []
    start.wait()
    for j in range(REQUESTS):
        text = f"client {i} request {j} ({rng.randrange(10**6)})"
        memory = None if j == STATELESS_REQUEST else f"load-{i}"
        messages = [*history, U(text)] if i % 2 == 0 else [U(text)]
        kw: dict = {"max_tokens": rng.randint(2, 24)}
        if rng.random() < 0.3:
            kw |= {"temperature": 0.9, "seed": rng.randrange(2**31)}
        mode = rng.choice(("plain", "stream", "cut"))
        if mode == "plain":
            r = chat(client, messages, memory, **kw)
            reply = r.choices[0].message.content
            assert (r.model_extra.get("memory") is None) == (memory is None)
        elif mode == "stream":
            chunks = list(chat(client, messages, memory, stream=True, stream_options={"include_usage": True}, **kw))
            reply = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
            assert chunks[-1].usage.completion_tokens <= kw["max_tokens"]
        else:  # the user closes the app mid-reply: the response had begun, so the turn was started
            stream = chat(client, messages, memory, stream=True, max_tokens=200)
            reply = "".join(c.choices[0].delta.content or "" for _, c in zip(range(rng.randint(1, 3)), stream,
                                                                               strict=False))
            stream.close()
        if memory is not None:
            written.append(text)
        history += [U(text), A(reply)]


@pytest.mark.parametrize("batched", [False, True], ids=["serve", "batched"])
def test_concurrent_users_lose_no_update_and_stay_bounded(chat_files, tmp_path, batched):
    """``serve``: one decode per user; ``batched``: users share decode steps (Engine.step)."""
    memdir = tmp_path / "mem"
    written: dict[int, list[str]] = {i: [] for i in range(CLIENTS)}
    errors: list[BaseException] = []
    keep = str(REQUESTS + 8)  # the transcript keeps every turn, so it can be checked whole
    server = serve_batched(chat_files, memdir, "--transcript-turns", keep) if batched else \
        serve(chat_files, memdir, "-np", "4", "--transcript-turns", keep)
    with server as srv:
        chat(srv.client(), [U("warm up")], max_tokens=2)  # stateless: the first request's imports are done
        idle_kib = srv.memory_kib()
        start = threading.Barrier(CLIENTS)

        def run(i: int) -> None:
            try:
                _client(srv, i, start, written[i])
            except BaseException as exc:  # noqa: BLE001 - reported by the main thread
                errors.append(exc)
                start.abort()

        threads = [threading.Thread(target=run, args=(i,)) for i in range(CLIENTS)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
        assert not any(t.is_alive() for t in threads), "a client hung"
        assert not errors, repr(errors[0])
        resident = sum(srv.info(f"load-{i}").json()["resident"] for i in range(CLIENTS))
        assert resident <= 4  # at most one memory per sequence
        mem_kib = srv.memory_kib()
        # the server is still healthy after the load
        assert chat(srv.client(), [U("still there?")], max_tokens=2).choices[0].finish_reason in ("stop", "length")
    if batched:
        tokens, steps = decode_steps(srv.log)
        assert tokens > steps > 0, (tokens, steps)  # users did share decode steps
    assert mem_kib["VmHWM"] < RSS_BOUND_MIB * 1024, f"peak RSS {mem_kib['VmHWM'] / 1024:.0f} MiB"
    growth = (mem_kib["VmHWM"] - idle_kib["VmRSS"]) / 1024
    assert growth < GROWTH_BOUND_MIB, f"RSS grew by {growth:.0f} MiB under load"

    for i in range(CLIENTS):  # the server has stopped: every reply, cut or not, was closed and saved
        mem = read_state_file(memdir / memory_file_name(f"load-{i}"))
        assert len(written[i]) == REQUESTS - 1
        assert mem.header.turns == len(written[i]), i
        assert [m["content"] for m in mem.transcript if m["role"] == "user"] == written[i]
        assert np.isfinite(mem.state).all() and np.abs(mem.state).max() > 0
    names = sorted(p.name for p in memdir.iterdir())
    expected = sorted(n for i in range(CLIENTS) for n in (memory_file_name(f"load-{i}"),
                                                          f".{memory_file_name(f'load-{i}')}.lock"))
    assert names == expected  # no temp file, nothing for the stateless requests
    assert all(FILE_RE.fullmatch(n) for n in names)


def test_batched_users_share_steps_and_get_the_replies_they_get_alone(talkative_files, tmp_path):
    """4 users generating at once on the batched server: each reply and memory is what that user gets alone."""
    prompts = [f"User {i} asks for a very long story" for i in range(4)]
    together: dict[int, str] = {}
    with serve_batched(talkative_files, tmp_path / "mem") as srv:
        start = threading.Barrier(len(prompts))

        def user(i: int) -> None:
            start.wait()
            together[i] = chat(srv.client(), [U(prompts[i])], f"b-{i}", max_tokens=48).choices[0].message.content

        threads = [threading.Thread(target=user, args=(i,)) for i in range(len(prompts))]
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
        # one at a time, stateless (= a fresh memory): what each user gets alone
        alone = {i: chat(srv.client(), [U(p)], max_tokens=48).choices[0].message.content for i, p in enumerate(prompts)}
    assert together == alone
    tokens, steps = decode_steps(srv.log)
    # the parallel replies shared decode steps (how many depends on scheduling: a busy CPU lets the
    # batcher's 10 ms wait expire before every thread has its token, so only sharing itself is asserted)
    assert tokens >= 4 * 40 and tokens > steps, (tokens, steps)
    for i in range(len(prompts)):
        mem = read_state_file(srv.path(f"b-{i}"))
        assert mem.header.turns == 1 and mem.transcript[1]["content"] == together[i]
