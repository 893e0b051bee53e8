"""`deltamem-edge serve` as a real subprocess on 127.0.0.1, driven by the official `openai` client.

The model is a tiny random qwen3 with a byte-level ChatML tokenizer and a random non-zero
δ-mem adapter (tests/ggufs.py), so every request takes milliseconds.  What is checked:
streaming and non-streaming replies and their usage counts (against an independent
tokenization), the memory-write rule (each user turn and reply written exactly once, also
when the whole history is resent; retries write nothing), one memory's fact changes only
its own file, a restarted server continues a memory bit-identically, hostile memory ids
stay harmless, the API key guards every route but /health, and bad numbers are 400s in
OpenAI's error shape.
"""

from __future__ import annotations

import json
import re
import shutil
import signal
import threading
import time
from collections.abc import Iterator

import httpx
import numpy as np
import openai
import pytest
from ggufs import write_random_adapter
from serving import A, U, chat, serve

from deltamem_edge import Engine
from deltamem_edge.conversation import Conversation
from deltamem_edge.server.memories import memory_file_name
from deltamem_edge.statefile import decode, read_state_file

FILE_RE = re.compile(r"\.?[0-9a-f]{64}\.state(\.lock)?")


# ``chat_files`` (tests/conftest.py): the tiny chat model and adapter served here


@pytest.fixture(scope="module")
def tok(chat_files) -> Iterator[Engine]:
    """The same model in the test process, vocabulary only: an independent count of tokens."""
    with Engine(chat_files["model"], False, n_ctx=64, n_threads=1) as eng:
        yield eng


def ntok(eng: Engine, text: str) -> int:
    return len(eng.tokenize(text, add_special=False, parse_special=True))


def user_block(text: str) -> str:
    """What one new user turn adds to the cache under ChatML (the tiny model's template)."""
    return f"<|im_start|>user\n{text}<|im_end|>\n<|im_start|>assistant\n"


REPLY_TAIL_TOKENS = 2  # "<|im_end|>" "\n" close every reply


def test_streaming_and_non_streaming_with_usage(chat_files, tok, tmp_path):
    with serve(chat_files, tmp_path / "mem") as srv:
        client = srv.client()
        assert client.models.list().data[0].id == "tiny-chat"
        r = chat(client, [U("Hello there")], max_tokens=10)
        text = r.choices[0].message.content
        assert r.choices[0].finish_reason in ("stop", "length")
        assert r.usage.prompt_tokens == ntok(tok, user_block("Hello there"))  # stateless: the whole prompt
        assert 1 <= r.usage.completion_tokens <= 10
        assert (r.usage.completion_tokens == 10) == (r.choices[0].finish_reason == "length")
        assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens

        chunks = list(chat(client, [U("Hello there")], max_tokens=10, stream=True,
                           stream_options={"include_usage": True}))
        streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        assert streamed == text  # greedy, stateless: the same reply either way
        assert chunks[-1].choices == [] and chunks[-1].usage.model_dump() == r.usage.model_dump()
        assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == r.choices[0].finish_reason

        plain = list(chat(client, [U("Hello there")], max_tokens=10, stream=True))
        assert all(c.usage is None for c in plain)  # usage only when asked for, as OpenAI does

        # a stop sequence cuts the reply where it first appears (and is not returned)
        long = chat(client, [U("Tell me more")], max_tokens=24).choices[0].message.content
        stop = long[len(long) // 2]
        cut = chat(client, [U("Tell me more")], max_tokens=24, stop=[stop])
        assert cut.choices[0].message.content == long[:long.find(stop)]
        assert cut.choices[0].finish_reason == "stop"
        assert list(srv.memdir.iterdir()) == []  # stateless requests write no file


def test_each_turn_is_written_exactly_once(chat_files, tok, tmp_path):
    """The memory-write rule: only the last user message and the reply are new, once."""
    with serve(chat_files, tmp_path / "mem") as srv:
        client = srv.client()
        r1 = chat(client, [U("My name is Ada.")], memory="ada")
        a1 = r1.choices[0].message.content
        h1 = read_state_file(srv.path("ada")).header
        expected1 = ntok(tok, user_block("My name is Ada.")) + r1.usage.completion_tokens + REPLY_TAIL_TOKENS
        assert (h1.turns, h1.tokens_written) == (1, expected1)
        assert r1.model_extra["memory"] == {"id": "ada", "turns": 1, "tokens_written": expected1, "written": True,
                                            "retry": False}

        # the app resends the whole history: only the new user turn and the reply are written
        history = [{"role": "system", "content": "Be brief."}, U("My name is Ada."), A(a1)]
        r2 = chat(client, [*history, U("I keep bees.")], memory="ada")
        h2 = read_state_file(srv.path("ada")).header
        assert h2.turns == 2
        assert h2.tokens_written - h1.tokens_written == (
            ntok(tok, user_block("I keep bees.")) + r2.usage.completion_tokens + REPLY_TAIL_TOKENS)

        # a retry of the same request (regenerate, client timeout) changes nothing on disk
        before = srv.path("ada").read_bytes()
        r3 = chat(client, [*history, U("I keep bees.")], memory="ada")
        assert r3.model_extra["memory"]["retry"] is True and r3.model_extra["memory"]["written"] is False
        assert srv.path("ada").read_bytes() == before

        # an edited history is context only: still exactly the new turn is written
        edited = [U("My name is Ada."), A("(edited by the app)"), U("I keep bees."), A("Nice.")]
        r4 = chat(client, [*edited, U("What do I keep?")], memory="ada")
        h4 = read_state_file(srv.path("ada")).header
        assert h4.turns == 3
        assert h4.tokens_written - h2.tokens_written == (
            ntok(tok, user_block("What do I keep?")) + r4.usage.completion_tokens + REPLY_TAIL_TOKENS)
        assert r4.usage.prompt_tokens > ntok(tok, user_block("What do I keep?"))  # the history was read
        transcript = read_state_file(srv.path("ada")).transcript
        assert [m["content"] for m in transcript if m["role"] == "user"] == [
            "My name is Ada.", "I keep bees.", "What do I keep?"]


def test_a_fact_changes_only_its_own_memory(chat_files, tmp_path):
    with serve(chat_files, tmp_path / "mem") as srv:
        client = srv.client()
        chat(client, [U("Hi, I am Bob.")], memory="bob")
        chat(client, [U("Hi, I am Eve.")], memory="eve")
        bob_before, eve_before = srv.path("bob").read_bytes(), srv.path("eve").read_bytes()
        eve_state = read_state_file(srv.path("eve")).state

        chat(client, [U("Hi, I am Eve."), A("hello"), U("My locker code is 4711.")], memory="eve")
        assert srv.path("bob").read_bytes() == bob_before  # untouched, byte for byte
        assert srv.path("eve").read_bytes() != eve_before
        assert not np.array_equal(read_state_file(srv.path("eve")).state, eve_state)

        bob, eve = srv.info("bob").json(), srv.info("eve").json()
        assert (bob["turns"], eve["turns"]) == (1, 2)
        assert bob["adapter_fingerprint"] == eve["adapter_fingerprint"] and len(bob["adapter_fingerprint"]) == 64
        assert bob["file"] == memory_file_name("bob") and bob["bytes"] == srv.path("bob").stat().st_size
        assert "state" not in bob  # header facts only
        assert all(FILE_RE.fullmatch(p.name) for p in srv.memdir.iterdir())

        # two users at once: each memory ends exactly as if it had been alone
        results: dict[str, object] = {}

        def talk(who: str) -> None:
            results[who] = chat(srv.client(), [U(f"{who} here, in parallel")], memory=f"par-{who}", max_tokens=20)

        threads = [threading.Thread(target=talk, args=(w,)) for w in ("x", "y")]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        for who in ("x", "y"):
            alone = chat(client, [U(f"{who} here, in parallel")], max_tokens=20)  # stateless = a fresh memory
            assert results[who].choices[0].message.content == alone.choices[0].message.content

        assert httpx.delete(f"{srv.url}/v1/memories/eve", timeout=30).json()["deleted"] is True
        assert not srv.path("eve").exists() and srv.info("eve").status_code == 404
        assert srv.path("bob").read_bytes() == bob_before


def test_restart_continues_a_memory_bit_identically(chat_files, tmp_path):
    first = [U("Remember: the blue key opens the shed.")]
    with serve(chat_files, tmp_path / "a") as srv:
        a1 = chat(srv.client(), first, memory="carol").choices[0].message.content
    shutil.copytree(tmp_path / "a", tmp_path / "b")
    follow = [*first, A(a1), U("Which key opens the shed?")]

    replies, states = [], []
    for d in ("a", "b"):  # the restarted server, and a second restart from a copy of the same file
        with serve(chat_files, tmp_path / d) as srv:
            assert srv.info("carol").json()["turns"] == 1
            replies.append(chat(srv.client(), follow, memory="carol", max_tokens=16).choices[0].message.content)
        states.append(read_state_file(tmp_path / d / memory_file_name("carol")))
    assert replies[0] == replies[1]
    np.testing.assert_array_equal(states[0].state, states[1].state)
    assert states[0].header.tokens_written == states[1].header.tokens_written
    assert states[0].header.turns == states[1].header.turns == 2
    assert states[0].transcript == states[1].transcript

    # an idle memory evicted from its sequence (-np 1) comes back from its file, as after a restart
    shutil.rmtree(tmp_path / "b")
    shutil.copytree(tmp_path / "a", tmp_path / "c")
    with serve(chat_files, tmp_path / "c", "-np", "1") as srv:
        client = srv.client()
        chat(client, [U("first")], memory="dave")
        chat(client, [U("second")], memory="carol")
        assert srv.info("dave").json()["resident"] is False  # dave left the only sequence
        dave = srv.path("dave").read_bytes()
        chat(client, [U("first"), A("x"), U("third")], memory="dave")
        assert srv.path("dave").read_bytes() != dave and srv.info("dave").json()["turns"] == 2


def test_memory_export_and_import(chat_files, tmp_path):
    """A memory's file goes out byte for byte and comes back only if a load would accept it."""
    other = write_random_adapter(tmp_path / "other.dmem.gguf", chat_files["model"], rank=4, seed=99)  # same shape
    with Engine(chat_files["model"], other, n_ctx=256, n_threads=1) as eng, \
            Conversation(eng, tmp_path / "foreign.state", system="", max_new_tokens=4) as conv:
        conv.say("hello")  # a genuine memory of another adapter
    foreign = (tmp_path / "foreign.state").read_bytes()
    with serve(chat_files, tmp_path / "mem") as srv:
        client = srv.client()
        r1 = chat(client, [U("My name is Ana.")], memory="ana")
        chat(client, [U("My name is Ana."), A(r1.choices[0].message.content), U("I live in Porto.")], memory="ana")
        url = f"{srv.url}/v1/memories"
        out = httpx.get(f"{url}/ana/state", timeout=30)
        assert out.status_code == 200 and out.headers["content-type"] == "application/octet-stream"
        assert out.content == srv.path("ana").read_bytes()
        assert decode(out.content, path="export").header.turns == 2
        assert httpx.get(f"{url}/nobody/state", timeout=30).status_code == 404

        # refused uploads: nothing replaced (bytes identical), nothing created, the resident memory stays
        ana = srv.path("ana").read_bytes()
        flipped = bytearray(out.content)
        flipped[len(flipped) // 2] ^= 0x01
        for body, code in ((foreign, "memory_mismatch"), (bytes(flipped), "invalid_state_file"),
                           (out.content[:-7], "invalid_state_file"), (b"", "invalid_state_file"),
                           (b"DMEMSTAT" + b"\xff" * 400, "invalid_state_file")):
            for target in ("ana", "nobody"):
                r = httpx.put(f"{url}/{target}/state", content=body, timeout=30)
                assert r.status_code == 400, (code, r.text)
                err = r.json()["error"]
                assert set(err) == {"message", "type", "param", "code"} and err["code"] == code, err
                assert str(srv.memdir) not in err["message"]  # no server path in the answer
        assert "adapter fingerprint" in httpx.put(f"{url}/ana/state", content=foreign, timeout=30).text
        assert srv.path("ana").read_bytes() == ana
        assert not srv.path("nobody").exists() and srv.info("nobody").status_code == 404
        assert srv.info("ana").json()["resident"] is True
        big = httpx.put(f"{url}/ana/state", content=b"\0" * (2 * 1024 * 1024), timeout=30)
        assert big.status_code == 413 and big.json()["error"]["code"] == "body_too_large"
        for bad in ("..%2Fx", "x" * 300, "a%00b"):
            assert httpx.put(f"{url}/{bad}/state", content=out.content, timeout=30).status_code in (400, 404)
            assert httpx.get(f"{url}/{bad}/state", timeout=30).status_code in (400, 404)

        # a valid file: a new memory (201) gets exactly those bytes; ana moves on a turn, then importing the
        # export into ana (200) takes her back: her resident conversation is closed, not saved over the file,
        # so ana and ben continue from the same file and must stay bit-identical
        r = httpx.put(f"{url}/ben/state", content=out.content, timeout=30)
        assert r.status_code == 201 and r.json()["turns"] == 2 and r.json()["resident"] is False
        assert srv.path("ben").read_bytes() == out.content
        chat(client, [U("I like figs.")], memory="ana")
        assert srv.info("ana").json()["turns"] == 3
        r = httpx.put(f"{url}/ana/state", content=out.content, timeout=30)
        assert r.status_code == 200 and r.json()["turns"] == 2 and r.json()["resident"] is False
        assert srv.path("ana").read_bytes() == out.content
        ask = [U("My name is Ana."), A(r1.choices[0].message.content), U("I live in Porto."), A("Nice."),
               U("Where do I live?")]
        replies = [chat(client, ask, memory=who, max_tokens=16).choices[0].message.content for who in ("ana", "ben")]
        assert replies[0] == replies[1]
        ana_mem, ben_mem = read_state_file(srv.path("ana")), read_state_file(srv.path("ben"))
        np.testing.assert_array_equal(ana_mem.state, ben_mem.state)
        assert ana_mem.header.turns == ben_mem.header.turns == 3
        assert ana_mem.header.tokens_written == ben_mem.header.tokens_written
        assert not np.array_equal(ana_mem.state, decode(out.content, path="export").state)
    assert not [p for p in srv.memdir.iterdir() if ".tmp-" in p.name]


def frobenius_per_layer(state: np.ndarray) -> np.ndarray:
    """The test's own per-layer Frobenius norm, in float64 (not the server's helper)."""
    x = state.astype(np.float64)
    return np.sqrt((x * x).sum(axis=(1, 2)))


def test_memory_info_has_layer_norms_and_the_last_turns_change(chat_files, tmp_path):
    """What the chat page's panel shows, against numpy on the state files themselves: the norm of each
    layer of the saved state, and ‖S_after − S_before‖_F per layer of the last turn, where S_before is
    the file before the turn (the resent history is context, fed with writes off)."""
    with serve(chat_files, tmp_path / "mem") as srv:
        client = srv.client()
        r1 = chat(client, [U("My name is Ada.")], memory="ada")
        s1 = read_state_file(srv.path("ada")).state
        info = srv.info("ada").json()
        assert info["layers"] == s1.shape[0] == len(info["layer_norms"])
        np.testing.assert_allclose(info["layer_norms"], frobenius_per_layer(s1), rtol=1e-12)
        assert info["last_turn"]["turn"] == 1  # the first turn starts from the zero state
        np.testing.assert_allclose(info["last_turn"]["layer_change"], frobenius_per_layer(s1), rtol=1e-12)

        history = [U("My name is Ada."), A(r1.choices[0].message.content), U("I keep bees.")]
        chat(client, history, memory="ada")
        s2 = read_state_file(srv.path("ada")).state
        info = srv.info("ada").json()
        expected = frobenius_per_layer(s2.astype(np.float64) - s1)
        assert info["last_turn"]["turn"] == 2 and (expected > 0).all()
        np.testing.assert_allclose(info["last_turn"]["layer_change"], expected, rtol=1e-12)
        np.testing.assert_allclose(info["layer_norms"], frobenius_per_layer(s2), rtol=1e-12)
        assert not np.allclose(expected, frobenius_per_layer(s2), rtol=1e-3)  # a change, not the norm again

        # a retry writes nothing and keeps turn 2's record; another memory's turn leaves it alone
        assert chat(client, history, memory="ada").model_extra["memory"]["retry"] is True
        chat(client, [U("I am Ben.")], memory="ben")
        assert srv.info("ada").json()["last_turn"] == info["last_turn"]
        np.testing.assert_allclose(srv.info("ben").json()["last_turn"]["layer_change"],
                                   frobenius_per_layer(read_state_file(srv.path("ben")).state), rtol=1e-12)

        # an imported file's last turn was not measured here: unknown, not a stale number
        r = httpx.put(f"{srv.url}/v1/memories/ben/state", content=srv.path("ada").read_bytes(), timeout=30)
        assert r.status_code == 200 and r.json()["last_turn"] is None and r.json()["turns"] == 2
        np.testing.assert_allclose(r.json()["layer_norms"], frobenius_per_layer(s2), rtol=1e-12)
    with serve(chat_files, tmp_path / "mem") as srv:  # nor was a turn that ran before this server started
        info = srv.info("ada").json()
        assert info["turns"] == 2 and info["last_turn"] is None
        np.testing.assert_allclose(info["layer_norms"], frobenius_per_layer(s2), rtol=1e-12)


HOSTILE = ["../x", "/etc/passwd", "a\x00b", "x" * 10240, "ünïcödé", "a/b", "..\\..\\x", "", " ", "a\nb"]


def test_hostile_memory_ids_are_harmless(chat_files, tmp_path):
    mem = tmp_path / "mem"
    with serve(chat_files, mem) as srv:
        client = srv.client()
        for bad in HOSTILE:
            with pytest.raises(openai.BadRequestError) as info:
                chat(client, [U("hi")], user=bad)
            assert info.value.body["code"] == "invalid_memory_id" and info.value.body["param"] == "user"
        for bad in ("../x", "/etc/passwd", "x" * 10240, "a b"):
            with pytest.raises(openai.BadRequestError):
                chat(client, [U("hi")], memory=bad)
        for weird_but_valid in ("..", ".", "CON", "user@example.com", "a:b+c"):
            r = chat(client, [U("hi")], user=weird_but_valid)
            assert r.model_extra["memory"]["id"] == weird_but_valid
            assert srv.path(weird_but_valid).is_file()
        for raw in ("..%2Fx", "%2Fetc%2Fpasswd", "a%00b", "x" * 300):
            assert srv.info(raw).status_code in (400, 404)
        assert srv.info("%2e%2e").json()["file"] == memory_file_name("..")  # the id "..", hashed like any other
        # a corrupt file under a valid id is refused and left as it is
        srv.path("zoe").write_bytes(b"not a state file")
        with pytest.raises(openai.ConflictError) as conflict:
            chat(client, [U("hi")], user="zoe")
        assert conflict.value.body["code"] == "memory_unreadable"
        assert srv.path("zoe").read_bytes() == b"not a state file"
        assert srv.info("zoe").status_code == 409
        assert httpx.get(f"{srv.url}/health").json() == {"status": "ok"}
    assert sorted({p.name for p in tmp_path.iterdir()}) == ["mem"]  # nothing written beside the directory
    names = [p.name for p in mem.iterdir()]
    assert len(names) == 12 and all(FILE_RE.fullmatch(n) for n in names)


def test_api_key_guards_every_route_but_health(chat_files, tmp_path):
    keyfile = tmp_path / "keys"
    keyfile.write_text("# local key\nsecret-1\n")
    with serve(chat_files, tmp_path / "mem", "--api-key-file", str(keyfile)) as srv:
        body = {"model": "m", "messages": [U("hi")], "max_tokens": 2}
        routes = [("POST", "/v1/chat/completions", body), ("GET", "/v1/models", None),
                  ("GET", "/v1/memories/zed", None), ("DELETE", "/v1/memories/zed", None), ("GET", "/nowhere", None),
                  ("GET", "/v1/memories/zed/state", None), ("PUT", "/v1/memories/zed/state", None)]
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"x-api-key": "secret-"}, {"Authorization": "secret-1"}):
            for method, path, payload in routes:
                r = httpx.request(method, srv.url + path, json=payload, headers=headers, timeout=30)
                assert r.status_code == 401, (method, path, headers)
                assert set(r.json()["error"]) == {"message", "type", "param", "code"}
        assert httpx.get(f"{srv.url}/health").status_code == 200
        with pytest.raises(openai.AuthenticationError):
            chat(srv.client("wrong"), [U("hi")])
        assert chat(srv.client("secret-1"), [U("hi")]).choices[0].message.content is not None
        r = httpx.get(f"{srv.url}/v1/models", headers={"x-api-key": "secret-1"})
        assert r.status_code == 200
        assert httpx.get(f"{srv.url}/v1/memories/zed", headers={"x-api-key": "secret-1"}).status_code == 404
        # no CORS unless asked for: a browser preflight gets no allow-origin header
        pre = httpx.options(f"{srv.url}/v1/models", headers={"Origin": "https://evil.example",
                                                             "Access-Control-Request-Method": "GET"})
        assert "access-control-allow-origin" not in pre.headers


def test_cors_only_for_named_origins(chat_files, tmp_path):
    with serve(chat_files, tmp_path / "mem", "--cors-origin", "http://localhost:3000") as srv:
        ok = httpx.options(f"{srv.url}/v1/chat/completions", headers={
            "Origin": "http://localhost:3000", "Access-Control-Request-Method": "POST"})
        assert ok.headers.get("access-control-allow-origin") == "http://localhost:3000"
        other = httpx.get(f"{srv.url}/v1/models", headers={"Origin": "https://evil.example"})
        assert "access-control-allow-origin" not in other.headers


BAD_FIELDS = [
    ("max_tokens", -1), ("max_tokens", 0), ("max_tokens", 10**12), ("max_tokens", 1.5), ("max_tokens", "8"),
    ("max_tokens", True), ("max_completion_tokens", -5), ("temperature", -0.1), ("temperature", 2.5),
    ("temperature", "hot"), ("top_p", 0), ("top_p", 1.5), ("seed", -1), ("seed", 2**40), ("seed", 1.0),
    ("n", 2), ("n", 0), ("presence_penalty", 3), ("frequency_penalty", -9), ("stop", ["a", "b", "c", "d", "e"]),
    ("stop", [""]), ("stream", "yes"), ("messages", []), ("messages", [{"role": "tool", "content": "x"}]),
    ("messages", [U("hi"), A("ho")]), ("model", ""),
]


def test_bad_fields_are_400_in_openai_shape(chat_files, tmp_path):
    with serve(chat_files, tmp_path / "mem") as srv:
        url = f"{srv.url}/v1/chat/completions"
        for field, value in BAD_FIELDS:
            body = {"model": "m", "messages": [U("hi")], field: value}
            r = httpx.post(url, json=body, timeout=30)
            assert r.status_code == 400, (field, value, r.text)
            err = r.json()["error"]
            assert set(err) == {"message", "type", "param", "code"} and err["type"] == "invalid_request_error"
            assert err["param"].split("[")[0].split(".")[0] == field, (field, err)
        for raw in ('{"model":"m","messages":[{"role":"user","content":"hi"}],"temperature":NaN}',
                    '{"model":"m","messages":[{"role":"user","content":"hi"}],"temperature":Infinity}',
                    '{"model":"m","messages":[{"role":"user","content":"hi"}],"max_tokens":-1e309}',
                    '{"model":"m","messages":[{"role":"user","content":"\\ud800"}]}',
                    '{"model":', "[1, 2]"):
            r = httpx.post(url, content=raw, headers={"content-type": "application/json"}, timeout=30)
            assert r.status_code == 400, (raw, r.text)
            assert set(r.json()["error"]) == {"message", "type", "param", "code"}
        big = httpx.post(url, content=b"{" + b" " * (2 * 1024 * 1024) + b"}", timeout=30)
        assert big.status_code == 413 and big.json()["error"]["code"] == "body_too_large"
        with pytest.raises(openai.BadRequestError) as info:
            chat(srv.client(), [U("hi")], max_tokens=-3)
        assert info.value.body["param"] == "max_tokens"
        assert chat(srv.client(), [U("still fine")]).choices  # and the server is unharmed


def turn_tokens(eng: Engine, user: str, completion_tokens: int) -> int:
    """Tokens one turn writes: its user block, the reply and the reply's closing tail."""
    return ntok(eng, user_block(user)) + completion_tokens + REPLY_TAIL_TOKENS


# ``talkative_files`` (tests/conftest.py): a tiny model whose greedy replies to LONG_PROMPTS run on for
# thousands of tokens (found by search; the model of ``chat_files`` ends every reply within a few hundred)


LONG_PROMPTS = ("Tell me a very long story", "One more long story", "And then?")


def test_a_client_that_leaves_stops_its_generation(talkative_files, tok, tmp_path):
    """Closing the connection mid-stream (or mid non-streaming reply) ends generation, far short of max_tokens."""
    n = 3000
    with serve(talkative_files, tmp_path / "mem", "-np", "1", "-c", "4096") as srv:
        client = srv.client()
        for prompt in LONG_PROMPTS:  # stateless = a fresh memory: what an uncut reply to it would be
            full = chat(client, [U(prompt)], max_tokens=n)
            if full.choices[0].finish_reason == "length":
                break
        assert full.usage.completion_tokens == n, "no prompt makes this model talk long enough for the test"

        stream = chat(client, [U(prompt)], memory="hal", max_tokens=n, stream=True)
        seen = "".join(c.choices[0].delta.content or "" for _, c in zip(range(4), stream, strict=False))
        stream.close()
        # requests for one memory are served one after another: this one starts when the cut reply has ended
        r = chat(client, [U("The end?")], memory="hal", max_tokens=1)
        mem = read_state_file(srv.path("hal"))
        assert mem.header.turns == 2
        generated = (mem.header.tokens_written - turn_tokens(tok, "The end?", r.usage.completion_tokens)
                     - turn_tokens(tok, prompt, 0))
        assert 3 <= generated < n // 10, generated
        reply = mem.transcript[1]["content"]  # what was generated and written: the start of the uncut reply
        # this byte-level model emits any bytes: a cut inside a UTF-8 character leaves its first bytes, which
        # decode to one U+FFFD at the end of the written reply (in the uncut reply they complete a character)
        assert reply.startswith(seen) and full.choices[0].message.content.startswith(reply.removesuffix("\ufffd"))

        # a non-streaming client that gives up (read timeout) stops its reply too
        with pytest.raises(openai.APITimeoutError):
            chat(srv.client(timeout=0.3), [U(prompt)], memory="ivy", max_tokens=n)
        r = chat(client, [U("The end?")], memory="ivy", max_tokens=1)
        mem = read_state_file(srv.path("ivy"))
        assert mem.header.turns == 2
        generated = (mem.header.tokens_written - turn_tokens(tok, "The end?", r.usage.completion_tokens)
                     - turn_tokens(tok, prompt, 0))
        assert 1 <= generated < n // 2, generated
        assert full.choices[0].message.content.startswith(mem.transcript[1]["content"])


def test_disconnect_mid_stream_and_sigterm_leave_memories_consistent(chat_files, tmp_path):
    with serve(chat_files, tmp_path / "mem") as srv:
        stream = chat(srv.client(), [U("Tell me a long story")], memory="fay", max_tokens=400, stream=True)
        for _ in zip(range(3), stream, strict=False):
            pass
        stream.close()  # the client goes away mid-reply
        deadline = time.monotonic() + 30
        while not (srv.path("fay").exists() and srv.info("fay").json()["turns"] == 1):
            assert time.monotonic() < deadline, "the interrupted turn was not saved"
            time.sleep(0.05)
        r = chat(srv.client(), [U("Tell me a long story"), A("..."), U("Go on")], memory="fay")
        assert r.model_extra["memory"]["turns"] == 2

        # SIGTERM while a reply streams: the server stops it, saves, and exits cleanly (checked by serve())
        stream = chat(srv.client(), [U("Another one")], memory="gus", max_tokens=400, stream=True)
        next(iter(stream))
        srv.proc.send_signal(signal.SIGTERM)
        for _ in stream:
            pass
    mem = read_state_file(srv.path("gus"))
    assert mem.header.turns == 1 and np.isfinite(mem.state).all()
    assert not [p for p in srv.memdir.iterdir() if ".tmp-" in p.name]  # no stray temp files
    assert json.loads(json.dumps(mem.transcript))[0]["content"] == "Another one"
