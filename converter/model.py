"""Hugging Face model directory → llama.cpp GGUF, with llama.cpp's own converter and quantizer.

Why not a converter of our own: the base model must be exactly what stock
llama.cpp makes of it (tensor names, q/k row permutation of llama-family models,
tokenizer metadata, pre-tokenizer detection), so we run the very
``convert_hf_to_gguf.py`` that ships with the pinned llama.cpp, taken from the
llama-cpp-python sdist that the native build already downloads.  It runs in a
subprocess (it needs torch and transformers, and must import the sdist's own
``gguf-py``, which is newer than the ``gguf`` package we install).

Output types: ``f32``, ``f16``, ``bf16`` and ``q8_0`` are written by the script
itself; the k-quants and other llama.cpp types (``q4_k_m``, ``q4_0``, ``q5_k_m``,
``q6_k``, ...) go through an f16 temp file and ``llama_model_quantize`` of our
libllama.  The output appears atomically (temp name in the target folder, then
``os.replace``); a failure leaves nothing behind.
"""

from __future__ import annotations

import codecs
import contextlib
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import threading
import time
from collections import deque
from pathlib import Path
from typing import TextIO

from deltamem_edge.errors import ConversionError, DeltaMemError
from deltamem_edge.limits import MAX_HF_CONFIG_BYTES
from deltamem_edge.supported import HF_ARCHS

SCRIPT_NAME = "convert_hf_to_gguf.py"
# Output types convert_hf_to_gguf.py writes directly.
DIRECT_OUTTYPES = ("f32", "f16", "bf16", "q8_0")
# llama.cpp ftypes reached by quantizing an f16 conversion: name -> LLAMA_FTYPE_MOSTLY_* value
# (llama.h; checked against llama_cpp's constants before use).  Types that need an importance
# matrix (iq1/iq2/iq3, q2_k_s) are left out: llama.cpp refuses them without one.
QUANT_OUTTYPES: dict[str, int] = {
    "q4_0": 2,
    "q4_1": 3,
    "q5_0": 8,
    "q5_1": 9,
    "q2_k": 10,
    "q3_k_s": 11,
    "q3_k_m": 12,
    "q3_k_l": 13,
    "q4_k_s": 14,
    "q4_k_m": 15,
    "q5_k_s": 16,
    "q5_k_m": 17,
    "q6_k": 18,
    "iq4_nl": 25,
    "iq4_xs": 30,
}
OUTTYPES = DIRECT_OUTTYPES + tuple(QUANT_OUTTYPES)
# Modules the conversion subprocess imports (numpy, tqdm, yaml and requests come with our gguf dependency).
REQUIRED_MODULES = ("torch", "transformers", "sentencepiece", "safetensors")
INSTALL_HINT = "pip install 'deltamem-edge[convert]'"
# HF architectures δ-mem adapters exist for (others convert fine but can only run without δ-mem).
DELTAMEM_HF_ARCHS = tuple(HF_ARCHS)

STDERR = object()  # convert_model's default echo: whatever sys.stderr is at call time
_TAIL_CHARS = 16384
_SPINNER = "|/-\\"


# --------------------------------------------------------------------------------------------
# The converter script, out of the pinned sdist
# --------------------------------------------------------------------------------------------


def _wanted(rel: str) -> bool:
    """Files of vendor/llama.cpp the conversion needs."""
    return rel in (SCRIPT_NAME, "LICENSE") or rel.startswith(("conversion/", "gguf-py/gguf/"))


def _safe_rel(rel: str) -> bool:
    parts = rel.split("/")
    return bool(rel) and not rel.startswith("/") and "\\" not in rel and all(p not in ("", ".", "..") for p in parts)


def converter_dir() -> Path:
    """Folder holding llama.cpp's ``convert_hf_to_gguf.py``, ``conversion/`` and ``gguf-py/`` (extracted once).

    It lives in the build cache, keyed by the sdist hash: ``<cache>/convert/<sha256[:16]>/``.
    The sdist is fetched (and verified) by the native build's ``fetch_sdist`` if it is not
    cached yet.
    """
    from deltamem_edge.native import build

    root = build.cache_root() / "convert" / build.SDIST_SHA256[:16]
    if (root / ".complete").is_file():
        return root
    sdist = build.fetch_sdist()
    root.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".extract-", dir=root.parent))
    try:
        found = 0
        with tarfile.open(sdist, "r:gz") as tar:
            for member in tar:
                if not member.name.startswith(build.VENDOR_PREFIX) or not member.isfile():
                    continue
                rel = member.name[len(build.VENDOR_PREFIX) :]
                if not _wanted(rel) or not _safe_rel(rel):
                    continue
                src = tar.extractfile(member)
                if src is None:
                    continue
                dest = tmp / rel
                dest.parent.mkdir(parents=True, exist_ok=True)
                with src, open(dest, "wb") as f:
                    shutil.copyfileobj(src, f)
                found += 1
        if not (tmp / SCRIPT_NAME).is_file() or not (tmp / "gguf-py" / "gguf" / "__init__.py").is_file():
            raise ConversionError(
                f"the llama-cpp-python sdist has no vendor/llama.cpp/{SCRIPT_NAME} or gguf-py ({found} files taken)",
                path=sdist,
                hint="delete the cached sdist so that it is downloaded again",
            )
        (tmp / ".complete").write_text(f"{sdist.name}\n{found} files\n")
        if root.exists():  # an interrupted earlier extraction (no .complete)
            shutil.rmtree(root, ignore_errors=True)
        try:
            os.replace(tmp, root)
        except OSError:
            if not (root / ".complete").is_file():  # not a concurrent extraction that won the race
                raise
    except (OSError, tarfile.TarError) as e:
        raise ConversionError(f"cannot extract the llama.cpp converter ({e})", path=sdist) from e
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return root


# --------------------------------------------------------------------------------------------
# Checks
# --------------------------------------------------------------------------------------------


def missing_modules() -> list[str]:
    """Which of the conversion's Python dependencies are not importable here."""
    missing = []
    for name in REQUIRED_MODULES:
        try:
            found = importlib.util.find_spec(name) is not None
        except (ImportError, ValueError):
            found = False
        if not found:
            missing.append(name)
    return missing


def check_dependencies() -> None:
    """One ConversionError naming every missing module, with the install command as the hint."""
    missing = missing_modules()
    if missing:
        raise ConversionError(
            f"converting a Hugging Face model needs {', '.join(REQUIRED_MODULES)}; missing: {', '.join(missing)}",
            hint=INSTALL_HINT,
        )


def _read_hf_config(hf_dir: Path) -> dict:
    if not hf_dir.exists():
        raise ConversionError("model directory not found", path=hf_dir)
    if not hf_dir.is_dir():
        raise ConversionError(
            "not a directory", path=hf_dir, hint="pass the Hugging Face model folder (config.json, *.safetensors)"
        )
    cfg_path = hf_dir / "config.json"
    try:
        size = cfg_path.stat().st_size
        if size > MAX_HF_CONFIG_BYTES:
            raise ConversionError(
                f"config.json is {size} bytes (limit {MAX_HF_CONFIG_BYTES}); a model config is a few KB",
                path=cfg_path,
                hint="is this a Hugging Face model directory?",
            )
        cfg = json.loads(cfg_path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConversionError(
            "no config.json: not a Hugging Face model directory",
            path=hf_dir,
            hint="download the whole model repository (huggingface-cli download <repo> --local-dir <dir>)",
        ) from None
    except (OSError, UnicodeDecodeError, ValueError, RecursionError) as e:
        raise ConversionError(f"cannot read config.json ({type(e).__name__}: {e})", path=cfg_path) from None
    if not isinstance(cfg, dict):
        raise ConversionError("config.json is not a JSON object", path=cfg_path)
    return cfg


def _resolve_out(hf_dir: Path, out: Path, outtype: str) -> Path:
    if out.is_dir():
        out = out / f"{hf_dir.name}-{outtype}.gguf"
    if out.suffix.lower() != ".gguf":
        raise ConversionError("the output file name must end in .gguf", path=out)
    return out


# --------------------------------------------------------------------------------------------
# Running the script
# --------------------------------------------------------------------------------------------


def _script_env(tools: Path) -> dict[str, str]:
    env = dict(os.environ)
    env.pop("NO_LOCAL_GGUF", None)  # the script must take the sdist's gguf-py, never the installed one
    gguf_py = str(tools / "gguf-py")
    env["PYTHONPATH"] = gguf_py + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    env["HF_HUB_OFFLINE"] = "1"
    env["PYTHONUNBUFFERED"] = "1"
    env.setdefault("PYTHONIOENCODING", "utf-8")
    return env


def _failure_line(tail: str) -> str:
    """The most telling line of the script's output: its last ERROR line, else the last line."""
    lines = [seg.strip() for line in tail.splitlines() for seg in line.split("\r")]
    lines = [ln for ln in lines if ln]
    errors = [ln for ln in lines if ln.startswith("ERROR:")]
    line = errors[-1] if errors else (lines[-1] if lines else "no output")
    return line if len(line) <= 300 else line[:297] + "..."


def run_convert_script(
    hf_dir: Path, outfile: Path, outtype: str, *, echo: TextIO | None = None, tools: Path | None = None
) -> None:
    """Run llama.cpp's converter on ``hf_dir`` → ``outfile``; its output is copied to ``echo`` as it comes."""
    tools = tools or converter_dir()
    cmd = [sys.executable, str(tools / SCRIPT_NAME), str(hf_dir), "--outtype", outtype, "--outfile", str(outfile)]
    tail: deque[str] = deque()
    size = 0
    decoder = codecs.getincrementaldecoder("utf-8")("replace")
    try:
        proc = subprocess.Popen(
            cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=_script_env(tools)
        )
    except OSError as e:
        raise ConversionError(f"cannot start {SCRIPT_NAME} ({e})") from e
    assert proc.stdout is not None
    try:
        while True:
            chunk = os.read(proc.stdout.fileno(), 8192)
            if not chunk:
                break
            text = decoder.decode(chunk)
            if echo is not None and text:
                echo.write(text)
                echo.flush()
            tail.append(text)
            size += len(text)
            while size > _TAIL_CHARS and len(tail) > 1:
                size -= len(tail.popleft())
        rc = proc.wait()
    except BaseException:
        proc.kill()
        proc.wait()
        raise
    finally:
        proc.stdout.close()
    if rc != 0:
        raise ConversionError(
            f"{SCRIPT_NAME} failed (exit code {rc}): {_failure_line(''.join(tail))}",
            path=hf_dir,
            hint="see its log above; the model must be a Hugging Face checkpoint of an architecture llama.cpp supports",
        )


# --------------------------------------------------------------------------------------------
# Quantization
# --------------------------------------------------------------------------------------------


def quantize(src: Path, dst: Path, outtype: str, *, echo: TextIO | None = None, n_threads: int = 0) -> None:
    """``llama_model_quantize`` of our libllama: ``src`` (f16/f32 GGUF) → ``dst`` as ``outtype``.

    llama.cpp reports no progress through the API, so a spinner with the elapsed time
    is drawn on ``echo`` while it runs in a worker thread.
    """
    from deltamem_edge import _bindings

    lib = _bindings.llama_lib
    ftype = QUANT_OUTTYPES[outtype]
    const = getattr(lib, f"LLAMA_FTYPE_MOSTLY_{outtype.upper()}", None)
    if const is not None and const != ftype:  # the enum moved: trust the bindings of this llama.cpp
        ftype = const
    params = lib.llama_model_quantize_default_params()
    params.ftype = ftype
    params.nthread = n_threads
    result: dict[str, int | BaseException] = {}

    def work() -> None:
        try:
            result["rc"] = lib.llama_model_quantize(str(src).encode(), str(dst).encode(), params)
        except BaseException as e:  # noqa: BLE001 - handed to the caller's thread
            result["error"] = e

    _bindings.take_recent_errors()
    worker = threading.Thread(target=work, name="llama-quantize", daemon=True)
    t0 = time.monotonic()
    worker.start()
    i = 0
    tty = echo is not None and getattr(echo, "isatty", lambda: False)()
    if echo is not None and not tty:
        echo.write(f"quantizing to {outtype} with llama.cpp ...\n")
        echo.flush()
    while worker.is_alive():
        worker.join(0.2)
        if tty:
            echo.write(f"\rquantizing to {outtype} {_SPINNER[i % 4]} {time.monotonic() - t0:5.1f} s")
            echo.flush()
            i += 1
    elapsed = time.monotonic() - t0
    if echo is not None:
        echo.write(("\r" if tty else "") + f"quantized to {outtype} in {elapsed:.1f} s\n")
        echo.flush()
    if "error" in result:
        raise ConversionError(f"quantization failed ({result['error']})", path=src)
    if result.get("rc") != 0:
        errors = _bindings.take_recent_errors()
        why = errors[-1] if errors else f"llama_model_quantize returned {result.get('rc')}"
        raise ConversionError(
            f"quantization to {outtype} failed: {why}",
            path=src,
            hint="rerun with --debug to see llama.cpp's log; or convert with --outtype f16 or q8_0",
        )


# --------------------------------------------------------------------------------------------
# The entry point
# --------------------------------------------------------------------------------------------


def _temp_in(folder: Path, name: str, tag: str) -> Path:
    fd, tmp = tempfile.mkstemp(prefix=f".{name}.", suffix=f".{tag}.part", dir=folder)
    os.close(fd)
    return Path(tmp)


def convert_model(
    hf_dir: str | os.PathLike[str],
    out: str | os.PathLike[str],
    outtype: str = "f16",
    *,
    echo: TextIO | None | object = STDERR,
) -> Path:
    """Convert a Hugging Face model directory to a llama.cpp GGUF; return the written path.

    ``outtype``: one of ``OUTTYPES`` (f32, f16, bf16, q8_0 directly; q4_k_m, q4_0,
    q5_k_m, q6_k, ... via an f16 temp file and llama.cpp's quantizer).  ``out`` may be
    a folder (the file is then ``<model dir name>-<outtype>.gguf``).  Progress goes to
    ``echo`` (default: the current ``sys.stderr``; None: silent).  Raises
    ``ConversionError`` for a missing ``[convert]`` extra, a bad input, or a failed
    conversion; nothing is left behind then.
    """
    stream: TextIO | None = sys.stderr if echo is STDERR else echo  # type: ignore[assignment]
    hf_dir, out = Path(hf_dir), Path(out)
    outtype = outtype.lower()
    if outtype not in OUTTYPES:
        raise ConversionError(f"unknown outtype {outtype!r}", hint=f"use one of {', '.join(OUTTYPES)}")
    check_dependencies()
    cfg = _read_hf_config(hf_dir)
    out = _resolve_out(hf_dir, out, outtype)
    archs = cfg.get("architectures") or []
    if stream is not None and not any(a in DELTAMEM_HF_ARCHS for a in archs):
        stream.write(
            f"note: {', '.join(map(str, archs)) or 'this model'} converts, but δ-mem adapters exist only for "
            f"{', '.join(DELTAMEM_HF_ARCHS)}\n"
        )
    tools = converter_dir()
    out.parent.mkdir(parents=True, exist_ok=True)

    temps: list[Path] = []
    try:
        final = _temp_in(out.parent, out.name, outtype)
        temps.append(final)
        if outtype in DIRECT_OUTTYPES:
            run_convert_script(hf_dir, final, outtype, echo=stream, tools=tools)
        else:
            f16 = _temp_in(out.parent, out.name, "f16")
            temps.append(f16)
            run_convert_script(hf_dir, f16, "f16", echo=stream, tools=tools)
            quantize(f16, final, outtype, echo=stream)
            f16.unlink()
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(final, 0o666 & ~umask)  # mkstemp makes 0600; give the file the mode a plain open() would
        os.replace(final, out)
    except BaseException as e:
        for tmp in temps:
            with contextlib.suppress(OSError):
                tmp.unlink()
        if isinstance(e, OSError) and not isinstance(e, DeltaMemError):
            raise ConversionError(f"writing failed ({e})", path=out) from e
        raise
    return out
