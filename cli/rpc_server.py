"""``deltamem-edge rpc-server``: lend this machine's CPU (or GPU) to a chat or server on another host.

It runs llama.cpp's own ``ggml-rpc-server``, built by our native build from the same patched tree
as the library (ggml operations travel by number, so both ends must come from one commit).  It
binds to loopback unless told otherwise and says loudly what another address means: the RPC
protocol has no authentication and no encryption (docs/distributed.md).
"""

from __future__ import annotations

import os
import socket
import sys

import typer

from . import _options

WARNING = """\
!!  rpc-server on {addr}: anyone who can reach this port can use it.
!!  llama.cpp's RPC protocol has no authentication and no encryption; a client allocates memory,
!!  runs graphs and reads and writes tensors in this process.  Use it only on a network you
!!  trust, or keep --host 127.0.0.1 and reach it through an SSH tunnel (docs/distributed.md)."""


def _check_port_free(host: str, port: int) -> None:
    """A clear error for a port in use or an address this host does not have (the server's own is terse)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError as e:
            raise typer.BadParameter(f"cannot listen on {host}:{port}: {e.strerror}") from None


def rpc_server(
    host: str = typer.Option("127.0.0.1", "--host", "-H", help="Address to listen on (default: loopback only)."),
    port: int = typer.Option(50052, "--port", "-p", min=1, max=65535, help="TCP port."),
    threads: int = typer.Option(None, "--threads", "-t", min=1, max=4096, help="CPU threads (default: half the cores, as llama.cpp)."),
    device: str = typer.Option(None, "--device", "-d", help="Devices to offer, comma-separated (default: all of this build's)."),
    cache: bool = typer.Option(False, "--cache", "-c", help="Cache received tensors on disk (llama.cpp's -c): faster reloads."),
) -> None:
    """Run an RPC server that a `chat`/`serve` on another host uses with --rpc HOST:PORT."""
    from deltamem_edge.errors import NativeLibraryError
    from deltamem_edge.native.build import RPC_SERVER, installed_library_dir

    exe = installed_library_dir() / RPC_SERVER
    if not exe.is_file():
        raise NativeLibraryError("this native build has no rpc-server", path=exe.parent,
                                 hint="unset DELTAMEM_RPC (RPC is built by default) and run `deltamem-edge build`")
    _check_port_free(host, port)
    if not _options.is_loopback(host):
        print(WARNING.format(addr=f"{host}:{port}"), file=sys.stderr)
    args = [str(exe), "--host", host, "--port", str(port)]
    args += ["--threads", str(threads)] if threads else []
    args += ["--device", device] if device else []
    args += ["--cache"] if cache else []
    print(f"deltamem-edge rpc-server: clients connect with --rpc {host}:{port} (Ctrl-C stops it)", flush=True)
    sys.stderr.flush()
    os.execv(exe, args)  # the server's own process from here: its signals, its exit status


def register(app: typer.Typer, convert_app: typer.Typer) -> None:
    app.command("rpc-server")(rpc_server)
