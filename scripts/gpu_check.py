"""Helpers of scripts/gpu_check.sh: unpack the carried sources, benchmark, print the summary table.

Runs on the GPU machine under its own python3 (3.12, numpy, pytest preinstalled; gguf and
diskcache from carried wheels; llama-cpp-python's Python package straight from the bundle).
Standard library + numpy + gguf, plus the repository's own pure-Python deltamem_edge modules
(REPO is put on sys.path: native.build, bench.models, random_gguf; libllama only for the benchmark
itself); nothing here downloads anything.

    python3 scripts/gpu_check.py prepare BUNDLE WORK      unpack llama.cpp + llama_cpp, add our sources/patches
    python3 scripts/gpu_check.py flags                    CMake flags of the product CUDA build (BuildConfig('cuda'))
    python3 scripts/gpu_check.py bench --work W --out J   tokens/s vanilla vs δ-mem, Qwen3-4B-shaped Q4_K_M
    python3 scripts/gpu_check.py table OUTDIR             the final short table (from steps.tsv and the JSONs)

The benchmark model is written directly in Q4_K_M's tensor types (Q4_K, Q6_K for the tied
embedding and for attn_v/ffn_down of llama.cpp's use_more_bits layers, F32 norms) with random
but well-formed blocks: speed depends only on shapes and types, and this takes seconds where
f16 generation plus llama_model_quantize of 4 B parameters takes minutes
(``--gen quantize`` does that instead, through deltamem_edge.bench.models).  Only the quantized
bytes are made here; the tensor plan, the header and the adapter come from
deltamem_edge.random_gguf, the one writer of random models and adapters.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tarfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

SDIST_ROOT = "llama_cpp_python-0.3.36/"


def _say(msg: str) -> None:
    print(f"[gpu_check] {msg}", file=sys.stderr, flush=True)


# --------------------------------------------------------------------------------------------
# prepare: sources from the bundle
# --------------------------------------------------------------------------------------------


def prepare(bundle: Path, work: Path) -> None:
    """Unpack vendor/llama.cpp (-> WORK/src/llama.cpp, with our sources and patches) and llama_cpp (-> WORK/py)."""
    from deltamem_edge.native import build as B

    tars = sorted(bundle.glob("llama_cpp_python-*.tar*"))
    if not tars:
        raise SystemExit(f"no llama_cpp_python-*.tar.* in {bundle}: run scripts/prepare_gpu_bundle.sh first")
    src, py = work / "src", work / "py"
    tree = src / "llama.cpp"
    vprefix = SDIST_ROOT + "vendor/llama.cpp/"
    pprefix = SDIST_ROOT + "llama_cpp/"
    kwargs = {"filter": "data"} if hasattr(tarfile, "data_filter") else {}
    with tarfile.open(tars[0], "r:*") as tar:
        vend, pyp = [], []
        for m in tar.getmembers():
            if not (m.isfile() or m.isdir()):
                continue
            if m.name.startswith(vprefix) and len(m.name) > len(vprefix):
                m.name = m.name[len(vprefix):]
                vend.append(m)
            elif m.name.startswith(pprefix):
                m.name = "llama_cpp/" + m.name[len(pprefix):]
                pyp.append(m)
        tar.extractall(tree, members=vend, **kwargs)
        tar.extractall(py, members=pyp, **kwargs)
    if shutil.which("git"):
        B._apply_ours(tree)  # exactly what the product build adds: our files + every patches/*.patch
    else:
        apply_insert_only(tree)
    _say(f"sources in {tree} ({len(vend)} entries), llama_cpp in {py}")


def apply_insert_only(tree: Path) -> None:
    """What build._apply_ours does, without git (not every GPU image has it): our files, then the
    insert-only zero-context hunks of every patches/*.patch in order ("@@ -a,0 +b,n @@" = insert after
    line a of the original file).  Any other kind of hunk is refused."""
    import re

    from deltamem_edge.native import build as B

    for rel, dst in B.OUR_SOURCES.items():
        shutil.copyfile(B.NATIVE_DIR / rel, tree / dst)
    for patch in sorted(B.PATCH_DIR.glob("*.patch")):
        files: dict[str, list[tuple[int, list[str]]]] = {}
        cur: list[str] | None = None
        target = None
        for line in patch.read_text().splitlines():
            if line.startswith("+++ b/"):
                target = line[6:]
                files.setdefault(target, [])
            elif line.startswith("@@"):
                m = re.match(r"@@ -(\d+)(?:,(\d+))? \+\d+(?:,\d+)? @@", line)
                if not m or (m.group(2) or "1") != "0":
                    raise SystemExit(f"{patch.name}: not an insert-only hunk: {line}")
                cur = []
                files[target].append((int(m.group(1)), cur))
            elif line.startswith("+") and cur is not None:
                cur.append(line[1:])
            elif line.startswith("-") and not line.startswith("---"):
                raise SystemExit(f"{patch.name}: removes lines; only insert-only patches are supported")
        for rel, hunks in files.items():
            path = tree / rel
            lines = path.read_text().split("\n")
            for after, new in sorted(hunks, key=lambda h: -h[0]):  # bottom-up: original numbers stay valid
                lines[after:after] = new
            path.write_text("\n".join(lines))
        _say(f"applied {patch.name} without git ({sum(len(h) for h in files.values())} hunks)")


def cuda_flags(backend: str = "cuda") -> list[str]:
    """The product build's flags, exactly (DELTAMEM_CUDA_ARCHS applies); backend "cpu" for a dry run."""
    from deltamem_edge.native import build as B

    return B.BuildConfig(backend).cmake_flags()


# --------------------------------------------------------------------------------------------
# bench: Qwen3-4B-shaped model, Q4_K_M tensor types, random well-formed blocks
# --------------------------------------------------------------------------------------------

def _use_more_bits(i: int, n: int) -> bool:  # llama-quant.cpp
    return i < n // 8 or i >= 7 * n // 8 or (i - n // 8) % 3 == 2


def _f16_bytes(x: float) -> np.ndarray:
    return np.array([x], np.float16).view(np.uint8)


def _q4k(rows: int, cols: int, rng: np.random.Generator) -> np.ndarray:
    """[rows, cols/256*144] bytes of Q4_K blocks: random 4-bit quants and 6-bit scales/mins,
    d = 8e-5, dmin = 7.5*d (zero-mean weights of std ~0.02)."""
    blk = rng.integers(0, 256, (rows, cols // 256, 144), dtype=np.uint8)
    blk[..., 0:2] = _f16_bytes(8e-5)
    blk[..., 2:4] = _f16_bytes(6e-4)
    return blk.reshape(rows, -1)


def _q6k(rows: int, cols: int, rng: np.random.Generator) -> np.ndarray:
    """[rows, cols/256*210] bytes of Q6_K blocks: random 6-bit quants and int8 scales, d = 1.5e-5 at the end."""
    blk = rng.integers(0, 256, (rows, cols // 256, 210), dtype=np.uint8)
    blk[..., 208:210] = _f16_bytes(1.5e-5)
    return blk.reshape(rows, -1)


def write_qwen3_q4km(path: Path, s, seed: int = 0) -> Path:  # noqa: ANN001 - a bench.models.Shape
    """A Qwen3 GGUF of shape ``s`` (tied) with Q4_K_M's per-tensor types; one random array per (type, shape),
    reused by every layer.  Tensor plan and header are deltamem_edge.random_gguf's, as for every random model."""
    import gguf
    from gguf import GGMLQuantizationType as QT

    from deltamem_edge import random_gguf as RG

    rng = np.random.default_rng(seed)
    cache: dict[tuple, np.ndarray] = {}

    def mat(kind: str, rows: int, cols: int) -> tuple[np.ndarray, QT]:
        key = (kind, rows, cols)
        if key not in cache:
            cache[key] = (_q6k if kind == "q6" else _q4k)(rows, cols, rng)
        return cache[key], (QT.Q6_K if kind == "q6" else QT.Q4_K)

    def kind(name: str) -> str:  # Q6_K: the tied embedding, attn_v/ffn_down of the use_more_bits layers
        if name == "token_embd.weight":
            return "q6"
        more = name.endswith(("attn_v.weight", "ffn_down.weight")) and _use_more_bits(int(name.split(".")[1]), n)
        return "q6" if more else "q4"

    n = s.n_layer
    tensors: list[tuple[str, np.ndarray, QT | None]] = []
    for name, shape, what in RG.model_tensor_plan("qwen3", n_layer=n, n_embd=s.n_embd, n_head=s.n_head,
                                                  n_head_kv=s.n_head_kv, head_dim=s.head_dim, n_ff=s.n_ff,
                                                  n_vocab=s.n_vocab, tied=True):
        if what == "mat":
            tensors.append((name, *mat(kind(name), *shape)))
        else:
            tensors.append((name, (1.0 + 0.05 * rng.standard_normal(shape[0])).astype(np.float32), None))
    return RG.write_model(path, "qwen3", tensors, name="gpu-check-random-qwen3-4b-q4km",
                          file_type=gguf.LlamaFileType.MOSTLY_Q4_K_M, n_ctx=40960, n_embd=s.n_embd, n_layer=n,
                          n_ff=s.n_ff, n_head=s.n_head, n_head_kv=s.n_head_kv, head_dim=s.head_dim, rope_base=1e6,
                          norm_eps=1e-6, n_vocab=s.n_vocab)


def make_models(work: Path, gen: str) -> tuple[Path, Path, dict]:
    from deltamem_edge.bench import models as BM

    d = work / "bench"
    d.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    if gen == "quantize":  # llama.cpp's own quantizer, through the project's benchmark helpers
        lib = Path(os.environ["DELTAMEM_LIB_DIR"])
        m = BM.synthetic_model("qwen3-4b", BM.SHAPES["qwen3-4b"], lib, threads=os.cpu_count() or 16, cache=d)
        model, adapter = m.path, m.adapter
    else:
        model = write_qwen3_q4km(d / "qwen3-4b-shape.q4km-direct.gguf", BM.SHAPES["qwen3-4b"])
        adapter = BM.write_random_adapter(d / "qwen3-4b-shape.dmem-r8-qo.gguf", model)
    info = {"gen": gen, "gen_seconds": round(time.time() - t0, 1), "model_gib": round(model.stat().st_size / 2**30, 2)}
    _say(f"benchmark model {model.name}: {info['model_gib']} GiB, made in {info['gen_seconds']} s ({gen})")
    return model, adapter, info


def _timed_run(eng, prompt: list[int], decode: list[int]) -> tuple[float, float]:  # noqa: ANN001
    s = eng.session()
    try:
        t0 = time.perf_counter()
        s.feed(prompt, logits="last")
        t1 = time.perf_counter()
        for t in decode:
            s.feed([t], logits="last")
        t2 = time.perf_counter()
    finally:
        s.close()
    return len(prompt) / (t1 - t0), len(decode) / (t2 - t1)


def bench(work: Path, out: Path, *, gen: str, prefill: int, decode: int, reps: int, ngl: int) -> dict:
    model, adapter, info = make_models(work, gen)
    from deltamem_edge.engine import Engine

    rng = np.random.default_rng(1)
    prompt = [int(x) for x in rng.integers(100, 150000, prefill)]
    dec = [int(x) for x in rng.integers(100, 150000, decode)]
    res: dict = {"model": str(model.name), "prefill": prefill, "decode": decode, "reps": reps, "n_gpu_layers": ngl,
                 **info, "variants": {}}
    t0 = time.time()
    eng = Engine(model, False, n_ctx=prefill + decode + 64, n_batch=prefill, n_ubatch=512, n_gpu_layers=ngl,
                 n_threads=os.cpu_count() or 16)
    res["load_seconds"] = round(time.time() - t0, 1)
    try:
        for variant in ("vanilla", "dmem"):
            if variant == "dmem":
                t1 = time.time()
                eng.attach(adapter)
                res["attach_seconds"] = round(time.time() - t1, 2)
            _timed_run(eng, prompt[:256], dec[:4])  # warm-up: graph reserve, cuBLAS, CUDA graphs
            pp, tg = [], []
            for _ in range(reps):
                a, b = _timed_run(eng, prompt, dec)
                pp.append(a)
                tg.append(b)
            res["variants"][variant] = {"prefill_tps": round(statistics.median(pp), 1),
                                        "decode_tps": round(statistics.median(tg), 1),
                                        "prefill_all": [round(x, 1) for x in pp], "decode_all": [round(x, 1) for x in tg]}
            _say(f"{variant}: prefill {res['variants'][variant]['prefill_tps']} tok/s, "
                 f"decode {res['variants'][variant]['decode_tps']} tok/s")
    finally:
        eng.close()
    v, m = res["variants"]["vanilla"], res["variants"]["dmem"]
    res["dmem_overhead_pct"] = {"prefill": round(100 * (v["prefill_tps"] / m["prefill_tps"] - 1), 1),
                                "decode": round(100 * (v["decode_tps"] / m["decode_tps"] - 1), 1)}
    out.write_text(json.dumps(res, indent=1))
    return res


# --------------------------------------------------------------------------------------------
# table
# --------------------------------------------------------------------------------------------


def _load(p: Path):  # noqa: ANN202
    try:
        return json.loads(p.read_text())
    except (OSError, ValueError):
        return None


def table(outdir: Path) -> str:
    rows = []
    steps = outdir / "steps.tsv"
    if steps.is_file():
        for line in steps.read_text().splitlines():
            parts = line.split("\t")
            if len(parts) >= 4:
                rows.append(parts[:4])
    lines = ["", "=" * 78, "GPU check summary", "-" * 78, f"{'step':<22}{'result':<8}{'seconds':>8}  detail", "-" * 78]
    for name, rc, secs, detail in rows:
        lines.append(f"{name:<22}{'ok' if rc == '0' else 'FAIL(' + rc + ')':<8}{secs:>8}  {detail}")
    b = _load(outdir / "bench.json")
    if b:
        lines += ["-" * 78, f"tokens/s, {b['model']} (n_gpu_layers={b['n_gpu_layers']}, median of {b['reps']}):",
                  f"{'':<12}{'prefill ' + str(b['prefill']):>16}{'decode ' + str(b['decode']):>16}"]
        for k in ("vanilla", "dmem"):
            v = b["variants"].get(k)
            if v:
                lines.append(f"{k:<12}{v['prefill_tps']:>16}{v['decode_tps']:>16}")
        o = b.get("dmem_overhead_pct", {})
        lines.append(f"{'δ-mem cost':<12}{str(o.get('prefill')) + ' %':>16}{str(o.get('decode')) + ' %':>16}")
    p = _load(outdir / "parity.json")
    if p:
        worst = {}
        for r in p:
            for k, val in r.items():
                if isinstance(val, float):
                    worst[k] = max(worst.get(k, 0.0), val)
        lines += ["-" * 78, "parity, worst relative error over cases: " +
                  ", ".join(f"{k} {v:.1e}" for k, v in sorted(worst.items()))]
        sp = [r for r in p if str(r.get("case", "")).startswith("splits")]
        for r in sp:
            lines.append(f"graph splits {r['case'][7:]}: vanilla {r['vanilla']}, δ-mem {r['dmem']}")
    lines.append("=" * 78)
    text = "\n".join(lines)
    print(text)
    return text


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("prepare")
    p.add_argument("bundle", type=Path)
    p.add_argument("work", type=Path)
    p = sub.add_parser("flags")
    p.add_argument("--backend", default="cuda", choices=["cuda", "cpu", "vulkan", "metal"])
    p = sub.add_parser("bench")
    p.add_argument("--work", type=Path, required=True)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--gen", choices=["direct", "quantize"], default="direct")
    p.add_argument("--prefill", type=int, default=2048)
    p.add_argument("--decode", type=int, default=128)
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--ngl", type=int, default=-1)
    p = sub.add_parser("table")
    p.add_argument("outdir", type=Path)
    a = ap.parse_args(argv)
    if a.cmd == "prepare":
        prepare(a.bundle, a.work)
    elif a.cmd == "flags":
        print("\n".join(cuda_flags(a.backend)))
    elif a.cmd == "bench":
        bench(a.work, a.out, gen=a.gen, prefill=a.prefill, decode=a.decode, reps=a.reps, ngl=a.ngl)
    else:
        table(a.outdir)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
