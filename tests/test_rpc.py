"""δ-mem over llama.cpp's RPC backend, on two rpc-servers this test starts on 127.0.0.1.

The servers are started with our own command (``deltamem-edge rpc-server``), one thread each.
A tiny random model with a random non-zero adapter is split three ways: the first layers on the
local CPU, the rest on the two servers' devices; the δ-state of a layer lives on its device.

* logits and state equal the all-local engine and the float64 numpy reference;
* the state read from the remote devices, reset, and written back continues as if never interrupted;
* a server killed mid-turn ends the program with one clear message and exit status 69, and the
  memory file keeps the last completed turn (another engine opens it and continues);
* an unreachable server, a server that does not answer the handshake and one that speaks another
  protocol version are refused with a typed error before anything loads, and a bad address too;
* an engine without ``rpc_servers`` in the same process never uses another engine's remote devices.
"""

from __future__ import annotations

import contextlib
import json
import signal
import socket
import struct
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from engines import close, exact_engine
from ggufs import write_tiny_model

from deltamem_edge import rpc
from deltamem_edge.errors import AdapterError
from deltamem_edge.random_gguf import write_random_adapter
from deltamem_edge.reference import RefAdapter, RefModel
from deltamem_edge.rpc import Endpoint, RpcError

REPO = Path(__file__).resolve().parents[1]
N_LAYER = 6
LOCAL_LAYERS = 2  # -ngl 5 on 6 layers: llama.cpp keeps layers 0-1 here and offloads 2-5 (and the output)
IDS = [int(t) for t in np.random.default_rng(5).integers(0, 256, 40)]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start_server(port: int, log: Path, *extra: str) -> subprocess.Popen:
    with open(log, "w") as out:  # the child keeps its own copy of the descriptor
        return subprocess.Popen([sys.executable, "-m", "deltamem_edge", "rpc-server", "--port", str(port), "-t", "1",
                                 *extra], stdout=out, stderr=subprocess.STDOUT, start_new_session=True)


def _wait_ready(ep: Endpoint, proc: subprocess.Popen, log: Path) -> None:
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        assert proc.poll() is None, f"rpc-server exited ({proc.returncode}): {log.read_text()[-500:]}"
        with contextlib.suppress(RpcError):
            rpc.probe(ep, timeout=2)
            return
        time.sleep(0.1)
    raise AssertionError(f"rpc-server on {ep} never answered: {log.read_text()[-500:]}")


LOGS: dict[Endpoint, Path] = {}  # each started server's stdout ("Accepted client connection" per client)


def _clients_served(ep: Endpoint) -> int:
    return LOGS[ep].read_text().count("Accepted client connection")


@contextlib.contextmanager
def _servers(tmp: Path, n: int = 2) -> Iterator[list[tuple[Endpoint, subprocess.Popen]]]:
    started = []
    try:
        for i in range(n):
            ep = Endpoint("127.0.0.1", _free_port())
            log = LOGS[ep] = tmp / f"rpc-{i}.log"
            started.append((ep, _start_server(ep.port, log)))
            _wait_ready(ep, started[-1][1], log)
        yield started
    finally:
        for _, proc in started:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            proc.wait(timeout=30)


@pytest.fixture(scope="module")
def servers(tmp_path_factory: pytest.TempPathFactory) -> Iterator[list[tuple[Endpoint, subprocess.Popen]]]:
    with _servers(tmp_path_factory.mktemp("rpc")) as started:
        yield started


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("rpc-model")
    model = write_tiny_model(d / "split.gguf", "qwen3", n_layer=N_LAYER, seed=3)
    adapter = write_random_adapter(d / "split.dmem.gguf", model, rank=4, state_heads=2, seed=4)
    return {"model": model, "adapter": adapter}


def _addresses(servers) -> str:
    return ",".join(str(ep) for ep, _ in servers)


def test_a_split_model_matches_the_local_engine_and_the_reference(servers, files):
    ref = RefModel(files["model"])
    rs = ref.session(RefAdapter(files["adapter"], ref))
    ref_logits = rs.feed(IDS)
    base = ref.session(None).feed(IDS)
    assert np.abs(ref_logits - base).max() > 0.1 * np.abs(base).max()  # the adapter matters

    with exact_engine(files["model"], files["adapter"]) as local, \
            exact_engine(files["model"], files["adapter"], rpc_servers=_addresses(servers), n_gpu_layers=5) as remote:
        # three devices: two layers here, the others on both servers (names RPC<n> are process-wide)
        devices = remote.adapter.devices
        assert devices[:LOCAL_LAYERS] == ("CPU",) * LOCAL_LAYERS
        remote_names = set(devices[LOCAL_LAYERS:])
        assert len(remote_names) == 2 and all(name.startswith("RPC") for name in remote_names), devices
        assert set(local.adapter.devices) == {"CPU"}
        assert remote.scan == "standard" and local.scan == "fused"  # a custom op cannot run remotely

        ls, rs_ = local.session(), remote.session()
        remote_logits = rs_.feed(IDS)
        close(remote_logits, ref_logits, what="split vs reference")
        close(remote_logits, ls.feed(IDS), 1e-5, what="split vs local")
        close(rs_.state(), rs.state(), what="state vs reference")
        close(rs_.state(), ls.state(), 1e-5, what="state vs local")


def test_state_get_set_continue_across_the_remote_devices(servers, files):
    a, b = IDS[:25], IDS[25:]
    with exact_engine(files["model"], files["adapter"]) as local, \
            exact_engine(files["model"], files["adapter"], rpc_servers=_addresses(servers), n_gpu_layers=5) as remote:
        ls = local.session()
        ls.feed(a)
        straight = ls.feed(b)
        straight_state = ls.state()

        s = remote.session()
        s.feed(a)
        saved = s.state()
        s.reset_state()
        assert np.abs(s.state()).max() == 0.0  # really read back from the servers, not a cached copy
        s.set_state(saved)
        close(s.feed(b), straight, 1e-5, what="continued after set")
        close(s.state(), straight_state, 1e-5, what="state after set")


def test_batched_sessions_over_rpc_equal_the_local_engine(servers, files):
    """Two conversations in one decode step (the server's path), their states on the remote devices."""
    kw = dict(n_seq_max=2, kv_unified=False, n_ctx=512)
    with exact_engine(files["model"], files["adapter"], **kw) as local, \
            exact_engine(files["model"], files["adapter"], rpc_servers=_addresses(servers), n_gpu_layers=5,
                         **kw) as remote:
        assert remote.batches_sessions
        got = []
        for eng in (local, remote):
            a, b = eng.session(), eng.session()
            a.feed(IDS[:12])
            b.feed(IDS[12:30])
            out = eng.step({a: IDS[30], b: IDS[31]})
            got.append((out[a], out[b], a.state(), b.state()))
        for x, y in zip(*got, strict=True):
            close(y, x, 1e-5)


def test_verify_runs_split_from_the_cli(servers, files):
    proc = subprocess.run([sys.executable, "-m", "deltamem_edge", "verify", "-m", str(files["model"]),
                           "-a", str(files["adapter"]), "--rpc", _addresses(servers), "-ngl", "5",
                           "--tokens", "32", "--json"], capture_output=True, text=True, timeout=300, cwd=REPO)
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)
    assert report["passed"] and report["conclusive"] and report["adapter_rel_err"] < 1e-4


def test_the_server_over_rpc_answers_and_remembers_as_the_local_one(servers, chat_files, tmp_path):
    """`serve --rpc`: two users' greedy replies and memory states equal a server without RPC."""
    from serving import U, chat, serve

    from deltamem_edge.statefile import read_state_file

    got = {}
    before = [_clients_served(ep) for ep, _ in servers]
    for where, extra in (("local", ()), ("rpc", ("--rpc", _addresses(servers)))):
        with serve(chat_files, tmp_path / where, *extra) as srv:
            client = srv.client()
            replies = [chat(client, [U(text)], memory=user, max_tokens=32).choices[0].message.content
                       for user, text in (("ada", "My name is Ada."), ("bob", "I live in Lyon."))]
            got[where] = (replies, [read_state_file(srv.path(u)) for u in ("ada", "bob")])
    assert all(_clients_served(ep) > n for (ep, _), n in zip(servers, before, strict=True))  # both were used
    assert got["rpc"][0] == got["local"][0] and all(got["local"][0])
    for remote, local in zip(got["rpc"][1], got["local"][1], strict=True):
        assert (remote.header.turns, remote.header.tokens_written) == (local.header.turns, local.header.tokens_written)
        close(remote.state, local.state, 1e-4, what="memory state over RPC")


def test_fused_scan_is_refused_with_remote_layers(servers, files):
    with pytest.raises(AdapterError, match="standard"):
        exact_engine(files["model"], files["adapter"], rpc_servers=_addresses(servers), scan="fused")


def test_an_engine_without_rpc_never_uses_another_engines_servers(servers, files):
    with exact_engine(files["model"], files["adapter"], rpc_servers=_addresses(servers)) as remote, \
            exact_engine(files["model"], files["adapter"], n_gpu_layers=-1) as local:
        assert all(d.startswith("RPC") for d in remote.adapter.devices)  # -ngl defaults to all with servers
        assert set(local.adapter.devices) == {"CPU"} and local.scan == "fused"


# a turn that a dying server interrupts: the program ends with one message, the memory file stays
_TURNS = textwrap.dedent("""
    import sys
    from deltamem_edge import Engine
    from deltamem_edge.conversation import Conversation
    from deltamem_edge.sampling import SamplingParams

    model, adapter, memory, servers = sys.argv[1:5]
    engine = Engine(model, adapter, n_ctx=8192, rpc_servers=servers, tensor_split=[1, 1])
    conv = Conversation(engine, memory, sampling=SamplingParams(temp=0.0), max_new_tokens=16)
    conv.say("Hello there.")
    print("SAVED", conv.turns, flush=True)
    sys.stdin.readline()  # the test copies the memory file now
    conv.max_new_tokens = 6000
    for piece in conv.say("Tell me everything.", stream=True):
        print("PIECE", flush=True)
    print("FINISHED", flush=True)
""")


def test_a_server_killed_mid_turn_ends_with_one_message_and_keeps_the_memory(tmp_path, talkative_files):
    with _servers(tmp_path) as started:
        memory = tmp_path / "me.state"
        proc = subprocess.Popen(
            [sys.executable, "-c", _TURNS, str(talkative_files["model"]), str(talkative_files["adapter"]),
             str(memory), _addresses(started)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO)
        try:
            first = proc.stdout.readline()
            assert first.split() == ["SAVED", "1"], first + proc.stderr.read()
            saved = memory.read_bytes()
            proc.stdin.write("\n")
            proc.stdin.flush()
            assert proc.stdout.readline().strip() == "PIECE"  # the second turn is under way
            victim, victim_proc = started[0]  # the first server: it holds δ-mem layers and their state
            victim_proc.send_signal(signal.SIGKILL)
            victim_proc.wait(timeout=30)
            out, err = proc.communicate(timeout=120)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        assert "FINISHED" not in out
        assert proc.returncode == rpc.EXIT_RPC_LOST, err
        lines = [line for line in err.splitlines() if line.strip()]
        assert len(lines) == 2 and lines[0].startswith(f"error: RPC server {victim} stopped answering"), err
        assert lines[1].startswith("hint: restart the rpc-server"), err
        assert "GGML_ABORT" not in err and "Aborted" not in err

    # the file is the one written after turn 1, and another (local) engine goes on from it
    assert memory.read_bytes() == saved
    from deltamem_edge import Engine
    from deltamem_edge.conversation import Conversation

    with Engine(talkative_files["model"], talkative_files["adapter"], n_ctx=1024) as engine:
        conv = Conversation(engine, memory, max_new_tokens=4)
        assert conv.turns == 1
        conv.say("Still there?")
        assert conv.turns == 2
        conv.close()


# -- refused before anything loads ------------------------------------------------------------------------


def test_nothing_listening_is_a_clear_error_naming_the_server(files):
    ep = Endpoint("127.0.0.1", _free_port())
    with pytest.raises(RpcError, match=f"{ep}: nothing listens there") as info:
        exact_engine(files["model"], files["adapter"], rpc_servers=[str(ep)])
    assert "rpc-server" in info.value.hint


def test_the_cli_says_it_in_one_line(files):
    ep = Endpoint("127.0.0.1", _free_port())
    proc = subprocess.run([sys.executable, "-m", "deltamem_edge", "chat", "-m", str(files["model"]),
                           "-a", str(files["adapter"]), "--memory", "none", "--rpc", str(ep)],
                          input="", capture_output=True, text=True, timeout=120, cwd=REPO)
    assert proc.returncode == 1
    assert proc.stderr.splitlines()[0] == f"error: RPC server {ep}: nothing listens there (connection refused)"


@contextlib.contextmanager
def _fake_server(answer) -> Iterator[Endpoint]:  # noqa: ANN001
    """A TCP server on 127.0.0.1 that reads one HELLO and then does what ``answer(conn)`` does."""
    srv = socket.create_server(("127.0.0.1", 0))
    ep = Endpoint("127.0.0.1", srv.getsockname()[1])

    def run() -> None:
        with contextlib.suppress(OSError):
            conn, _ = srv.accept()
            with conn:
                conn.recv(1 + 8 + 24)
                answer(conn)

    t = threading.Thread(target=run, daemon=True)
    t.start()
    try:
        yield ep
    finally:
        srv.close()
        t.join(timeout=10)


def _hello_reply(major: int, minor: int, patch: int):  # noqa: ANN202
    return lambda conn: conn.sendall(struct.pack("<Q", 28) + bytes([major, minor, patch, 0]) + bytes(24))


@pytest.mark.parametrize("version", [(6, 0, 0), (8, 0, 0), (7, 1, 0), (7, 0, 1)])
def test_another_protocol_version_is_refused(version):
    with _fake_server(_hello_reply(*version)) as ep, \
            pytest.raises(RpcError, match=rf"{ep} speaks RPC protocol {'.'.join(map(str, version))}"):
        rpc.probe(ep)


def test_our_own_version_passes_the_probe():
    with _fake_server(_hello_reply(*rpc.PROTOCOL)) as ep:
        assert rpc.probe(ep) == rpc.PROTOCOL


def test_a_server_that_hangs_up_or_stays_silent_is_refused():
    with _fake_server(lambda conn: None) as ep, pytest.raises(RpcError, match="closed the connection during the handshake"):
        rpc.probe(ep)
    with _fake_server(lambda conn: conn.sendall(struct.pack("<Q", 3) + b"\x03\x00\x00")) as ep, \
            pytest.raises(RpcError, match="answered the handshake with 3 bytes"):
        rpc.probe(ep)
    release = threading.Event()
    with _fake_server(lambda conn: release.wait(10)) as ep, pytest.raises(RpcError, match="did not answer the handshake"):
        try:
            rpc.probe(ep, timeout=0.5)
        finally:
            release.set()


@pytest.mark.parametrize("bad", ["", "host:", ":50052", "h:0", "h:70000", "h:port", "a:1,a:1"])
def test_bad_addresses_are_refused(bad):
    with pytest.raises(RpcError):
        rpc.parse_endpoints(bad)


def test_addresses_parse():
    assert rpc.parse_endpoints("10.0.0.2:50052, box") == (Endpoint("10.0.0.2", 50052), Endpoint("box", 50052))
    assert rpc.parse_endpoints(["127.0.0.1:1"]) == (Endpoint("127.0.0.1", 1),)


# -- the rpc-server command ---------------------------------------------------------------------------------


def test_rpc_server_warns_loudly_off_loopback_and_refuses_a_busy_port(tmp_path):
    port = _free_port()
    log = tmp_path / "open.log"
    proc = _start_server(port, log, "--host", "0.0.0.0")
    try:
        _wait_ready(Endpoint("127.0.0.1", port), proc, log)
        text = log.read_text()
        assert "no authentication and no encryption" in text and "0.0.0.0" in text
        busy = subprocess.run([sys.executable, "-m", "deltamem_edge", "rpc-server", "--port", str(port)],
                              capture_output=True, text=True, timeout=60)
        assert busy.returncode == 2 and f"cannot listen on 127.0.0.1:{port}" in busy.stderr
    finally:
        proc.kill()
        proc.wait(timeout=30)
    with _servers(tmp_path, 1):  # on loopback: no warning
        pass
    assert "authentication" not in (tmp_path / "rpc-0.log").read_text()


@pytest.mark.parametrize("bad", [[], [0, 0], [-1, 1], [float("nan")], "1,1", [True, 1]])
def test_bad_tensor_splits_are_refused(files, bad):
    from deltamem_edge.errors import ArgumentError

    with pytest.raises(ArgumentError, match="tensor_split"):
        exact_engine(files["model"], files["adapter"], tensor_split=bad)
