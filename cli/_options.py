"""Parsers for CLI option values that typer has no type for."""

from __future__ import annotations

import ipaddress

import typer


def int_list(text: str, flag: str, *, low: int, high: int, why: str = "") -> tuple[int, ...]:
    """``"1,3,8"`` -> ``(1, 3, 8)``, each in ``low..high``; anything else is a usage error naming ``flag``."""
    try:
        values = tuple(int(v) for v in text.split(",") if v.strip())
    except ValueError:
        values = ()
    if not values:
        raise typer.BadParameter(f"{flag}: expected comma-separated numbers like 1,3,8, got {text!r}")
    if any(not low <= v <= high for v in values):
        raise typer.BadParameter(f"{flag}: each value must be in {low}..{high}{why}")
    return values


def facts_per_memory(text: str, flag: str) -> tuple[int, ...]:
    """Facts per memory (``--capacity``, ``--facts``): an episode holds at most one fact of each kind."""
    from deltamem_edge.recall.facts import KINDS

    return int_list(text, flag, low=1, high=len(KINDS), why=f" (there are {len(KINDS)} fact kinds)")


# --------------------------------------------------------------------------------------------
# where the layers run: the options chat, serve and verify share (llama.cpp's names)
# --------------------------------------------------------------------------------------------

def gpu_layers_option() -> int | None:
    return typer.Option(None, "--gpu-layers", "-ngl", "--n-gpu-layers", min=-1, max=2**31 - 1,
                        help="Layers to offload to the GPU or the RPC servers (-1: all; default 0, or all with --rpc).")


def rpc_option() -> str | None:
    return typer.Option(None, "--rpc", metavar="HOST:PORT[,HOST:PORT…]",
                        help="rpc-servers whose devices take the offloaded layers and their δ-state "
                        "(`deltamem-edge rpc-server` on each host; docs/distributed.md).")


def tensor_split_option() -> str | None:
    return typer.Option(None, "--tensor-split", "-ts", metavar="W1,W2,…",
                        help="How to divide the offloaded layers among the devices (RPC servers first), e.g. 1,1.")


def float_list(text: str | None, flag: str) -> tuple[float, ...] | None:
    """``"3,1"`` -> ``(3.0, 1.0)``; None stays None; anything else is a usage error naming ``flag``."""
    if text is None:
        return None
    try:
        values = tuple(float(v) for v in text.split(",") if v.strip())
    except ValueError:
        values = ()
    if not values or any(not 0 <= v < float("inf") for v in values) or not any(values):
        raise typer.BadParameter(f"{flag}: expected non-negative weights like 1,1 or 3,1, got {text!r}")
    return values


def is_loopback(host: str) -> bool:
    """Whether a --host reaches only this machine (serve needs no API key there, rpc-server no warning)."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False
