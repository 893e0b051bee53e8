"""Remote devices over llama.cpp's RPC backend: check a server, register it, name its devices.

Why this module exists: ggml's RPC client (``ggml-rpc.cpp``) ends the whole process with
``GGML_ABORT`` when a server cannot be reached, answers with another protocol version, or
dies in the middle of a call.  So everything that can be checked beforehand is checked here
first, in Python, with a timeout and a typed :class:`RpcError` naming the server: the address,
whether something listens there, whether it answers the handshake, and its protocol version.
Only then does ggml connect.  What cannot be checked beforehand (a server that dies mid-turn)
is turned into one clear message and exit status :data:`EXIT_RPC_LOST` by an abort handler;
memory files are written atomically after each completed turn, so they keep the last one.

Registration is process-wide in ggml (``ggml_backend_register``), so this module registers
each server once and hands every ``Engine`` the devices of the servers *it* named
(:func:`model_devices`): an engine without ``rpc_servers`` never offloads to a remote host
another engine of the same process added.

The wire facts used by :func:`probe` (ggml-rpc.cpp at the pinned llama.cpp commit): a request
is ``cmd (1 byte) | size (u64 little endian) | payload``; HELLO is command 14 with a 24-byte
capability block (all zero: plain TCP), and its answer is ``size (u64) | major minor patch pad |
24 capability bytes``.  The server serves one client at a time.
"""

from __future__ import annotations

import ctypes
import os
import socket
import struct
import sys
import threading
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from .errors import DeltaMemError

DEFAULT_PORT = 50052  # rpc-server's default
PROTOCOL = (7, 0, 0)  # RPC_PROTO_{MAJOR,MINOR,PATCH}_VERSION in ggml-rpc.h at the pinned commit
_PROTOCOL_TEXT = ".".join(map(str, PROTOCOL))
HANDSHAKE_TIMEOUT_S = 5.0
EXIT_RPC_LOST = 69  # EX_UNAVAILABLE: a remote device went away mid-turn

_CMD_HELLO = 14
_CAPS = 24
_HELLO_REPLY = 4 + _CAPS


class RpcError(DeltaMemError):
    """An RPC server is unusable: a bad address, nothing listening, no handshake, another protocol
    version, or no devices.  Raised before ggml connects, so nothing was loaded or changed."""


@dataclass(frozen=True)
class Endpoint:
    """One ``host:port`` of a running rpc-server."""

    host: str
    port: int

    def __str__(self) -> str:
        return f"{self.host}:{self.port}"


def parse_endpoints(value: str | Iterable[str]) -> tuple[Endpoint, ...]:
    """``"a:50052,b:50053"`` or ``["a:50052", "b"]`` -> endpoints (the port defaults to 50052).

    Refuses an empty list, an empty host, a port outside 1..65535 and the same server twice
    (ggml would register its devices twice and split layers onto one host as if it were two).
    """
    items = value.split(",") if isinstance(value, str) else list(value)
    out: list[Endpoint] = []
    for raw in items:
        if not isinstance(raw, str):
            raise RpcError(f"an RPC server is a 'host:port' string, got {type(raw).__name__}")
        text = raw.strip()
        host, sep, port_text = text.rpartition(":")
        if not sep:
            host, port_text = text, str(DEFAULT_PORT)
        if not host or not port_text.isdigit() or not 1 <= int(port_text) <= 65535:
            raise RpcError(f"'{text}' is not an RPC server address",
                           hint="write HOST:PORT, e.g. 192.168.1.20:50052 (several: comma-separated)")
        ep = Endpoint(host, int(port_text))
        if ep in out:
            raise RpcError(f"RPC server {ep} is named twice")
        out.append(ep)
    if not out:
        raise RpcError("no RPC server named", hint="write HOST:PORT, e.g. 127.0.0.1:50052")
    return tuple(out)


def _recv_exact(sock: socket.socket, n: int) -> bytes:
    data = b""
    while len(data) < n:
        chunk = sock.recv(n - len(data))
        if not chunk:
            raise ConnectionAbortedError("closed")
        data += chunk
    return data


def probe(endpoint: Endpoint, timeout: float = HANDSHAKE_TIMEOUT_S) -> tuple[int, int, int]:
    """Connect, say HELLO as ggml does, check the protocol version, hang up; the server's version.

    Raises :class:`RpcError` with what went wrong and what to do, never hangs past ``timeout``.
    """
    hint_start = f"start it on that host: deltamem-edge rpc-server --host HOST --port {endpoint.port}"
    try:
        sock = socket.create_connection((endpoint.host, endpoint.port), timeout=timeout)
    except socket.gaierror as e:
        raise RpcError(f"RPC server {endpoint}: unknown host ({e.strerror})") from None
    except ConnectionRefusedError:
        raise RpcError(f"RPC server {endpoint}: nothing listens there (connection refused)",
                       hint=hint_start) from None
    except OSError as e:  # timeout, no route, network unreachable
        reason = "no answer" if isinstance(e, TimeoutError) else (e.strerror or str(e))
        raise RpcError(f"RPC server {endpoint}: cannot connect ({reason} within {timeout:g} s)",
                       hint=hint_start) from None
    with sock:
        try:
            sock.sendall(bytes([_CMD_HELLO]) + struct.pack("<Q", _CAPS) + bytes(_CAPS))
            (size,) = struct.unpack("<Q", _recv_exact(sock, 8))
            if size != _HELLO_REPLY:
                raise RpcError(f"RPC server {endpoint} answered the handshake with {size} bytes, not "
                               f"{_HELLO_REPLY}: it speaks another RPC protocol than ours "
                               f"({_PROTOCOL_TEXT})", hint=_SAME_BUILD)
            major, minor, patch = _recv_exact(sock, _HELLO_REPLY)[:3]
        except TimeoutError:
            raise RpcError(f"RPC server {endpoint} accepted the connection but did not answer the handshake "
                           f"within {timeout:g} s",
                           hint="an rpc-server serves one client at a time: is another program using it?") from None
        except (ConnectionAbortedError, ConnectionResetError, BrokenPipeError):
            raise RpcError(f"RPC server {endpoint} closed the connection during the handshake: it speaks "
                           f"another RPC protocol than ours ({_PROTOCOL_TEXT})",
                           hint=_SAME_BUILD) from None
    if (major, patch) != (PROTOCOL[0], PROTOCOL[2]) or minor > PROTOCOL[1]:
        raise RpcError(f"RPC server {endpoint} speaks RPC protocol {major}.{minor}.{patch}, this build "
                       f"{_PROTOCOL_TEXT}: ggml operations travel by number, so both sides "
                       "must come from the same llama.cpp commit", hint=_SAME_BUILD)
    return major, minor, patch


_SAME_BUILD = ("run the rpc-server of this deltamem-edge build on that host (`deltamem-edge rpc-server`); "
               "llama.cpp's own ggml-rpc-server works only from the same commit")


# --------------------------------------------------------------------------------------------
# ggml's registry (through libllama's handle: dlsym finds ggml's symbols among its dependencies)
# --------------------------------------------------------------------------------------------

_lock = threading.Lock()
_devices_of: dict[Endpoint, tuple[int, ...]] = {}  # registered servers -> their ggml devices
_ADD_SERVER = ctypes.CFUNCTYPE(ctypes.c_void_p, ctypes.c_char_p)
_ABORT_CALLBACK = ctypes.CFUNCTYPE(None, ctypes.c_char_p)


def _ggml() -> ctypes.CDLL:
    from ._bindings import llama_lib

    lib = llama_lib._lib
    if not getattr(lib, "_deltamem_rpc_bound", False):
        for name, args, res in (
            ("ggml_backend_reg_by_name", [ctypes.c_char_p], ctypes.c_void_p),
            ("ggml_backend_reg_get_proc_address", [ctypes.c_void_p, ctypes.c_char_p], ctypes.c_void_p),
            ("ggml_backend_register", [ctypes.c_void_p], None),
            ("ggml_backend_reg_dev_count", [ctypes.c_void_p], ctypes.c_size_t),
            ("ggml_backend_reg_dev_get", [ctypes.c_void_p, ctypes.c_size_t], ctypes.c_void_p),
            ("ggml_backend_dev_count", [], ctypes.c_size_t),
            ("ggml_backend_dev_get", [ctypes.c_size_t], ctypes.c_void_p),
            ("ggml_backend_dev_name", [ctypes.c_void_p], ctypes.c_char_p),
            ("ggml_backend_dev_type", [ctypes.c_void_p], ctypes.c_int),
            ("ggml_backend_dev_backend_reg", [ctypes.c_void_p], ctypes.c_void_p),
            ("ggml_backend_reg_name", [ctypes.c_void_p], ctypes.c_char_p),
            ("ggml_set_abort_callback", [_ABORT_CALLBACK], ctypes.c_void_p),
        ):
            fn = getattr(lib, name)
            fn.argtypes, fn.restype = args, res
        lib._deltamem_rpc_bound = True
    return lib


def connect(endpoints: Sequence[Endpoint]) -> tuple[int, ...]:
    """Check every server, then register those not yet registered; the ggml devices of all of them.

    All servers are probed before any is registered, so one bad address changes nothing.
    """
    lib = _ggml()
    rpc_reg = lib.ggml_backend_reg_by_name(b"RPC")
    if not rpc_reg:
        raise RpcError("this build of the native library has no RPC backend",
                       hint="rebuild with RPC (the default): unset DELTAMEM_RPC, then `deltamem-edge build`")
    with _lock:
        for ep in endpoints:
            if ep not in _devices_of:
                probe(ep)
        _install_abort_handler()
        add_server = _ADD_SERVER(lib.ggml_backend_reg_get_proc_address(rpc_reg, b"ggml_backend_rpc_add_server"))
        devices: list[int] = []
        for ep in endpoints:
            if ep not in _devices_of:
                reg = add_server(str(ep).encode())
                n = lib.ggml_backend_reg_dev_count(reg) if reg else 0
                if not n:
                    raise RpcError(f"RPC server {ep} offers no device",
                                   hint="start rpc-server with a device (-d CPU) on that host")
                lib.ggml_backend_register(reg)
                _devices_of[ep] = tuple(lib.ggml_backend_reg_dev_get(reg, i) for i in range(n))
            devices += _devices_of[ep]
        return tuple(devices)


def model_devices(rpc_devices: Sequence[int]) -> ctypes.Array | None:
    """The ``devices`` list for ``llama_model_params``, or None for llama.cpp's own choice.

    None while no server is registered in this process (llama.cpp then picks the local GPUs as
    always).  Otherwise a NULL-terminated array: this engine's RPC devices first (llama.cpp's order,
    fewest network transfers), then the local GPUs as llama.cpp would pick them, never the RPC
    devices of another engine.
    """
    with _lock:
        if not _devices_of:
            return None
    chosen = list(rpc_devices) + _local_gpus()
    return (ctypes.c_void_p * (len(chosen) + 1))(*chosen, None)


def _local_gpus() -> list[int]:
    """This host's GPUs as llama.cpp picks them: discrete ones, else the integrated ones of one backend."""
    lib = _ggml()
    gpu: list[int] = []
    igpu: list[int] = []
    for i in range(lib.ggml_backend_dev_count()):
        dev = lib.ggml_backend_dev_get(i)
        kind = lib.ggml_backend_dev_type(dev)  # enum ggml_backend_dev_type: 0 CPU, 1 GPU, 2 IGPU, 3 ACCEL
        reg = lib.ggml_backend_dev_backend_reg(dev)
        if lib.ggml_backend_reg_name(reg) == b"RPC":
            continue
        if kind == 1:
            gpu.append(dev)
        elif kind == 2 and (not igpu or lib.ggml_backend_dev_backend_reg(igpu[-1]) == reg):
            igpu.append(dev)
    return gpu or igpu


def local_gpus() -> list[str]:
    """Names of this host's GPUs (empty on a CPU build).  Not ``llama_supports_gpu_offload()``: that
    is also true for a CPU build with the RPC backend, which offloads only to rpc-servers."""
    return [device_name(dev) for dev in _local_gpus()]


def device_name(dev: int) -> str:
    return _ggml().ggml_backend_dev_name(dev).decode()


# --------------------------------------------------------------------------------------------
# a server that dies mid-turn: one message, a clean exit
# --------------------------------------------------------------------------------------------

_handler: ctypes._CFuncPtr | None = None  # kept alive: ggml holds the raw pointer


def _alive(ep: Endpoint) -> bool:
    try:
        socket.create_connection((ep.host, ep.port), timeout=1.0).close()
        return True
    except OSError:
        return False


def _on_abort(message: bytes | None) -> None:
    text = (message or b"").decode("utf-8", "replace").strip()
    if "ggml-rpc" not in text:  # not ours to explain: ggml prints and aborts as it always does
        sys.stderr.write(text + "\n")
        sys.stderr.flush()
        return
    with_reason = text.split(": ", 1)[-1]
    servers = list(_devices_of)
    gone: list[str] = []
    for _ in range(20):  # a dying server closes our connection a moment before its listening socket
        gone = [str(ep) for ep in servers if not _alive(ep)]
        if gone:
            break
        time.sleep(0.1)
    gone = gone or [str(ep) for ep in servers]  # a hung or unreachable host: name them all
    sys.stderr.write(
        f"error: RPC server {', '.join(gone)} stopped answering ({with_reason}); the turn in progress is lost, "
        "memory files keep their last completed turn\n"
        "hint: restart the rpc-server on that host and run the command again\n")
    sys.stderr.flush()
    os._exit(EXIT_RPC_LOST)  # ggml would abort() next: no core dump, no half-written file


def _install_abort_handler() -> None:
    global _handler
    if _handler is None:
        _handler = _ABORT_CALLBACK(_on_abort)
        _ggml().ggml_set_abort_callback(_handler)


__all__ = ["DEFAULT_PORT", "EXIT_RPC_LOST", "PROTOCOL", "Endpoint", "RpcError", "connect", "device_name",
           "local_gpus", "model_devices", "parse_endpoints", "probe"]
