"""``deltamem-edge convert adapter|model``: upstream δ-mem adapters and Hugging Face models → GGUF."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated

import typer

ADAPTER_OUTTYPES = ("f32", "f16")
_MODEL_OUTTYPES_HELP = (
    "f32, f16, bf16, q8_0 (written by llama.cpp's converter) or a llama.cpp quantization made from f16: "
    "q4_k_m, q4_k_s, q5_k_m, q5_k_s, q6_k, q4_0, q4_1, q5_0, q5_1, q3_k_s, q3_k_m, q3_k_l, q2_k, iq4_nl, iq4_xs."
)


def _size(path: Path) -> str:
    from deltamem_edge.converter.inspect import human_bytes

    return human_bytes(path.stat().st_size)


def adapter(
    src: Annotated[Path, typer.Argument(help="Upstream adapter directory (delta_mem_config.json + "
                                        "delta_mem_adapter.pt or *.safetensors), or its weights file.")],
    base: Annotated[Path, typer.Option("--base", "-b", help="Base model GGUF the adapter was trained on.")],
    out: Annotated[Path | None, typer.Option("--out", "-o", help="Output GGUF (default: <base>.dmem.gguf, or "
                                                "<base>.dmem-bundle.gguf with --bundle, next to the base model).")] = None,
    outtype: Annotated[str, typer.Option("--outtype", help="Type of the 2-D δ-mem weights: f32 or f16.")] = "f32",
    bundle: Annotated[bool, typer.Option("--bundle", help="Write the base model and the adapter as one GGUF.")] = False,
    config: Annotated[Path | None, typer.Option("--config", help="delta_mem_config.json (default: next to the weights).")] = None,
) -> None:
    """Convert an upstream δ-mem adapter to GGUF, checked against its base model."""
    from deltamem_edge.converter.adapter import convert_adapter
    from deltamem_edge.errors import ConversionError

    outtype = outtype.lower()
    if outtype not in ADAPTER_OUTTYPES:
        raise ConversionError(f"unknown adapter outtype {outtype!r}", hint="use f32 or f16 (δ-mem weights are tiny)")
    path = convert_adapter(src, base, out, outtype=outtype, bundle=bundle, config=config)
    print(f"wrote {path} ({_size(path)})")


def model(
    hf_dir: Annotated[Path, typer.Argument(help="Hugging Face model directory (config.json, tokenizer files, "
                                           "*.safetensors).")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Output GGUF file (or a folder).")],
    outtype: Annotated[str, typer.Option("--outtype", help=_MODEL_OUTTYPES_HELP)] = "f16",
) -> None:
    """Convert a Hugging Face model to a llama.cpp GGUF with llama.cpp's own converter (needs the 'convert' extra)."""
    from deltamem_edge.converter.model import convert_model

    path = convert_model(hf_dir, out, outtype, echo=sys.stderr)
    print(f"wrote {path} ({_size(path)})")


def register(app: typer.Typer, convert_app: typer.Typer) -> None:
    convert_app.command("adapter")(adapter)
    convert_app.command("model")(model)
