"""``deltamem-edge memory inspect|reset|diff|export``: work on state files without a model."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import typer

from ._words import count


def _when(us: int) -> str:
    import datetime

    if not us:
        return "-"
    return datetime.datetime.fromtimestamp(us / 1e6).isoformat(sep=" ", timespec="seconds")


def inspect(
    path: Path = typer.Argument(..., help="Memory state file."),
    plot: Path = typer.Option(None, "--plot", help="Write a PNG bar chart of the per-layer norms."),
    as_json: bool = typer.Option(False, "--json", help="Machine-readable output."),
) -> None:
    """Header, fingerprints, counters and per-layer norms of a memory file."""
    from deltamem_edge.state_norms import layer_norms
    from deltamem_edge.statefile import read_state_file

    mem = read_state_file(path)
    h = mem.header
    norms = layer_norms(mem.state)
    info = {
        "file": str(path), "bytes": path.stat().st_size, "format_version": 1,
        "model": h.model_label, "model_fingerprint": h.model_fp.hex(),
        "adapter": h.adapter_label, "adapter_fingerprint": h.adapter_fp.hex(),
        "layers": h.n_layers, "rows": h.rows, "rank": h.rank, "state_heads": h.state_heads,
        "tokens_written": h.tokens_written, "turns": h.turns,
        "created": _when(h.created_us), "updated": _when(h.updated_us),
        "transcript_messages": len(mem.transcript), "layer_norms": [round(float(n), 6) for n in norms],
    }
    if as_json:
        print(json.dumps(info, indent=2))
    else:
        print(f"{path}  ({info['bytes']} bytes, format v1)")
        print(f"  model:    {h.model_label or '-'}  [{h.model_fp.hex()[:16]}]")
        print(f"  adapter:  {h.adapter_label or '-'}  [{h.adapter_fp.hex()[:16]}]")
        print(f"  shape:    {h.n_layers} layers × {h.rows} rows × {h.rank} (state heads {h.state_heads})")
        print(f"  written:  {count(h.tokens_written, 'token')} in {count(h.turns, 'turn')}")
        print(f"  created:  {info['created']}   updated: {info['updated']}")
        print(f"  transcript: {len(mem.transcript)} recent messages")
        print("  per-layer state norm:")
        top = float(norms.max()) or 1.0
        for i, n in enumerate(norms):
            print(f"    {i:3d} {n:10.4f} {'█' * int(round(30 * n / top))}")
    if plot is not None:
        from deltamem_edge.plot import bar_chart_png

        bar_chart_png(plot, [float(n) for n in norms], title=f"δ-state norm per layer: {path.name}",
                      xlabel="layer", ylabel="Frobenius norm")
        print(f"plot written: {plot}")


def reset(
    path: Path = typer.Argument(..., help="Memory state file."),
    yes: bool = typer.Option(False, "--yes", "-y", help="Do not ask."),
) -> None:
    """Erase a memory: zero state, counters and transcript (identity kept)."""
    import dataclasses

    from deltamem_edge.statefile import MemoryFile, MemoryState, now_us

    if not yes and not typer.confirm(f"erase the memory in {path}?", default=False):
        raise typer.Exit(1)
    with MemoryFile(path) as mf:
        mem = mf.load()
        if mem is None:
            raise typer.BadParameter(f"{path} does not exist")
        header = dataclasses.replace(mem.header, tokens_written=0, turns=0, created_us=now_us(), updated_us=now_us())
        mf.save(MemoryState(header=header, state=np.zeros_like(mem.state), transcript=[]))
    print(f"erased {path}")


def diff(
    a: Path = typer.Argument(..., help="First memory file."),
    b: Path = typer.Argument(..., help="Second memory file."),
) -> None:
    """Compare two memory files: identity, counters, per-layer distance."""
    from deltamem_edge.state_norms import layer_change, layer_norms
    from deltamem_edge.statefile import read_state_file

    ma, mb = read_state_file(a), read_state_file(b)
    ha, hb = ma.header, mb.header
    same_id = ha.adapter_fp == hb.adapter_fp and ha.model_fp == hb.model_fp
    print(f"identity: {'same adapter and model' if same_id else 'DIFFERENT adapter or model'}")
    print(f"tokens written: {ha.tokens_written} vs {hb.tokens_written}; turns: {ha.turns} vs {hb.turns}")
    if ma.state.shape != mb.state.shape:
        print(f"shapes differ: {ma.state.shape} vs {mb.state.shape}")
        raise typer.Exit(1)
    d = layer_change(mb.state, ma.state)
    na = layer_norms(ma.state)
    print("layer  ‖a−b‖      ‖a‖")
    for i, (x, y) in enumerate(zip(d, na, strict=True)):
        print(f"{i:5d} {x:9.4f} {y:9.4f}")
    print(f"max |a−b| = {float(np.abs(ma.state - mb.state).max()):.6g}")


def export(
    path: Path = typer.Argument(..., help="Memory state file."),
    out: Path = typer.Option(..., "--out", "-o", help="Output .npz (state + header) or .json."),
) -> None:
    """Export the state and header to .npz (numpy) or .json."""
    from deltamem_edge.statefile import read_state_file

    mem = read_state_file(path)
    h = mem.header
    header = {"model": h.model_label, "model_fingerprint": h.model_fp.hex(), "adapter": h.adapter_label,
              "adapter_fingerprint": h.adapter_fp.hex(), "tokens_written": h.tokens_written, "turns": h.turns,
              "state_heads": h.state_heads, "created_us": h.created_us, "updated_us": h.updated_us}
    if out.suffix == ".json":
        out.write_text(json.dumps({**header, "state": mem.state.tolist(), "transcript": mem.transcript}, indent=1))
    elif out.suffix == ".npz":
        np.savez(out, state=mem.state, header=json.dumps(header), transcript=json.dumps(mem.transcript))
    else:
        raise typer.BadParameter("--out must end in .npz or .json")
    print(f"exported {path} -> {out}")


def register(memory_app: typer.Typer) -> None:
    memory_app.command("inspect")(inspect)
    memory_app.command("reset")(reset)
    memory_app.command("diff")(diff)
    memory_app.command("export")(export)
