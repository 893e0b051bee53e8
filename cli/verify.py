"""``deltamem-edge verify``: engine vs the numpy reference, for a converted model and adapter."""

from __future__ import annotations

import json
from pathlib import Path

import typer

from . import _options


def verify(
    model: Path = typer.Option(..., "--model", "-m", help="Model GGUF (base or bundle)."),
    adapter: Path = typer.Option(None, "--adapter", "-a", help="δ-mem adapter GGUF (default: bundled or next to the model)."),
    tokens: int = typer.Option(256, "--tokens", help="How many tokens to compare."),
    threads: int = typer.Option(None, "--threads", "-t"),
    gpu_layers: int = _options.gpu_layers_option(),
    rpc: str = _options.rpc_option(),
    tensor_split: str = _options.tensor_split_option(),
    float32: bool = typer.Option(False, "--float32", help="Reference in float32 (for models too big for float64 in RAM)."),
    as_json: bool = typer.Option(False, "--json"),
) -> None:
    """Run the engine and the numpy reference on the same tokens and compare logits and state."""
    import numpy as np

    from deltamem_edge.verify import verify as run

    r = run(model, adapter, n_tokens=tokens, n_threads=threads, dtype=np.float32 if float32 else np.float64,
            n_gpu_layers=gpu_layers, rpc_servers=rpc,
            tensor_split=_options.float_list(tensor_split, "--tensor-split"))
    if as_json:
        print(json.dumps(r.as_dict(), indent=2))
    else:
        kind = "quantized (the reference dequantizes; llama.cpp also rounds activations)" if r.quantized else "float"
        print(f"{model}: {kind}, {r.tokens} tokens, logit scale {r.logit_scale:.2f}")
        print(f"  max |Δlogit| engine vs reference, with adapter:    {r.adapter_rel_err:.2e} of the scale")
        print(f"  max |Δlogit| engine vs reference, base model only: {r.base_rel_err:.2e} (quantization floor)")
        print(f"  size of the δ-mem effect itself:                   {r.effect_rel:.2e}")
        print(f"  top-1 agreement: {100 * r.top1_agree:.1f} %   state: {r.state_rel_err:.2e} relative")
        if not r.passed:
            print("  FAIL: the engine and the reference disagree beyond the tolerance")
        elif not r.conclusive:
            print("  INCONCLUSIVE: the δ-mem effect is smaller than the quantization noise on this model;"
                  " verify on an f16/f32 conversion of it")
        else:
            print("  PASS")
    if not r.passed:
        raise typer.Exit(1)
    if not r.conclusive:
        raise typer.Exit(2)
