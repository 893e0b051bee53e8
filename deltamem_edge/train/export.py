"""Trained δ-mem weights -> an upstream adapter folder -> our converter -> ``.dmem.gguf``.

Why through the upstream format: the converter is the one path from an adapter to
the runtime (validation against the base, the llama q/k row order, the GDN row
order of the adapter GGUF).  Writing the folder upstream writes means a trained
adapter takes exactly the path a downloaded one takes, and the folder itself is
usable by upstream's PyTorch code.
"""

from __future__ import annotations

import contextlib
import json
import tempfile
from pathlib import Path

import numpy as np
from safetensors.numpy import save_file

from ..converter.adapter import convert_adapter
from ..converter.base_model import ROPE_PERMUTED_ARCHS, rope_row_permutation
from ..converter.config import CONFIG_FILENAME
from .model import DeltaMem, FrozenBase

WEIGHTS_FILENAME = "delta_mem_adapter.safetensors"  # upstream writes .pt; the converter reads both


def upstream_weights(mem: DeltaMem, base: FrozenBase) -> dict[str, np.ndarray]:
    """Upstream keys (``model.layers.N.self_attn.<param>``), upstream (HF) row order, float32."""
    hp, spec = base.hp, mem.spec
    R = spec.R
    out: dict[str, np.ndarray] = {}
    qkv = mem.memory_qkv.detach().cpu().numpy()
    for il in range(hp.n_layer):
        p = f"model.layers.{il}.self_attn."
        for j, name in enumerate(("memory_q_proj", "memory_k_proj", "memory_v_proj")):
            out[p + name] = qkv[il, j * R:(j + 1) * R]
        for h, w in mem.delta.items():
            arr = w[il].detach().cpu().numpy()
            if h in ("q", "k") and hp.arch in ROPE_PERMUTED_ARCHS:  # GGUF q/k row order -> HF order
                n_head = hp.n_head if h == "q" else hp.n_head_kv
                hf = np.empty_like(arr)
                hf[rope_row_permutation(n_head, hp.head_dim_k)] = arr
                arr = hf
            out[p + f"delta_{h}_proj"] = arr
        out[p + "beta_proj"] = mem.beta_proj[il].detach().cpu().numpy()
        out[p + "beta_bias"] = mem.beta_bias[il].detach().cpu().numpy()
    return {k: np.ascontiguousarray(v, dtype=np.float32) for k, v in out.items()}


def write_adapter_folder(mem: DeltaMem, base: FrozenBase, folder: Path) -> Path:
    """Write ``delta_mem_config.json`` + safetensors weights (upstream layout) into ``folder``."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / CONFIG_FILENAME).write_text(json.dumps(mem.spec.to_upstream_config(), indent=2) + "\n")
    save_file(upstream_weights(mem, base), str(folder / WEIGHTS_FILENAME),
              metadata={"format": "pt", "producer": "deltamem-edge train"})
    return folder


def export_gguf(mem: DeltaMem, base: FrozenBase, out: Path, *, folder: Path | None = None,
                outtype: str = "f16") -> Path:
    """The runtime adapter: upstream folder (kept in ``folder``, else a temp dir) converted for the base."""
    with contextlib.ExitStack() as stack:
        if folder is None:
            tmp = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="dmem-export-")))
            folder = tmp / out.name.removesuffix(".gguf")
        return convert_adapter(write_adapter_folder(mem, base, folder), base.path, out, outtype=outtype)
