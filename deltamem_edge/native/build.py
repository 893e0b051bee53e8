"""Fetch, verify, patch and build the δ-mem libllama, with a cache.

Why this module exists: llama-cpp-python 0.3.36 ships only an sdist, and we
must not commit llama.cpp.  So the build downloads the pinned sdist with
``pip download``, checks its sha256, adds our own source files and the
insert-only hook patch, and compiles ``libllama`` + ggml with CMake.  The
result lands in a cache keyed by (sdist hash, our native sources, build
flags): a rerun with nothing changed finds it and takes well under a second;
ccache (when installed) makes a rebuild after a small change take seconds.

Usable before the package is installed (standard library only):

    python -m deltamem_edge.native.build fetch      # sdist into the cache, verified
    python -m deltamem_edge.native.build bindings   # pip-install llama-cpp-python's Python code only
    python -m deltamem_edge.native.build build      # patched native build (cached)
    python -m deltamem_edge.native.build path       # print the library folder

Environment:
    DELTAMEM_CACHE      cache root (default: $XDG_CACHE_HOME/deltamem-edge or ~/.cache/deltamem-edge)
    DELTAMEM_BACKEND    cpu | cuda | metal | vulkan (default: metal on macOS, cpu elsewhere)
    DELTAMEM_CUDA_ARCHS CMAKE_CUDA_ARCHITECTURES for cuda (default "75;80;86;89;90")
    DELTAMEM_LIB_DIR    use this prebuilt library folder instead of the cache
    DELTAMEM_JOBS       parallel compile jobs (default: number of CPUs)
    DELTAMEM_RPC        0 leaves out ggml's RPC backend and the rpc-server (default: built)
"""

from __future__ import annotations

import argparse
import hashlib
import os
import platform
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from deltamem_edge.errors import BuildError, NativeLibraryError

LLAMA_CPP_PYTHON_VERSION = "0.3.36"
SDIST_NAME = f"llama_cpp_python-{LLAMA_CPP_PYTHON_VERSION}.tar.gz"
SDIST_SHA256 = "832db0699007f1be95a7e41ef12e88926b02ba836461e36a36372db2760c1a2e"
LLAMA_CPP_COMMIT = "0c1e57098bba43ac29e6e3b677cdceebdd22334f"
VENDOR_PREFIX = f"llama_cpp_python-{LLAMA_CPP_PYTHON_VERSION}/vendor/llama.cpp/"

NATIVE_DIR = Path(__file__).resolve().parent
OUR_SOURCES = {  # our files -> where they go in the llama.cpp tree
    "src/llama-dmem.h": "src/llama-dmem.h",  # the hooks the patch calls
    "src/llama-dmem-impl.h": "src/llama-dmem-impl.h",  # what the files below share
    "src/llama-dmem-fused.cpp": "src/llama-dmem-fused.cpp",
    "src/llama-dmem-graph.cpp": "src/llama-dmem-graph.cpp",
    "src/llama-dmem-loader.cpp": "src/llama-dmem-loader.cpp",
    "src/llama-dmem-state.cpp": "src/llama-dmem-state.cpp",
    "src/llama-dmem-backend.cpp": "src/llama-dmem-backend.cpp",
    "src/llama-dmem-api.cpp": "src/llama-dmem-api.cpp",
    "include/llama-deltamem.h": "include/llama-deltamem.h",
}
PATCH_DIR = NATIVE_DIR / "patches"
# Parts of the vendored tree the build does not need (the vocab GGUFs alone are 75 MB).
SKIP_PREFIXES = ("models/", "docs/", "media/", "examples/", "tools/server/webui/", ".git")
BACKENDS = ("cpu", "cuda", "metal", "vulkan")
LIB_NAMES = ("libllama", "libggml", "libggml-base", "libggml-cpu", "libggml-cuda", "libggml-metal",
             "libggml-vulkan", "libggml-blas", "libggml-rpc")
RPC_SERVER = "ggml-rpc-server"  # llama.cpp's tools/rpc target, installed next to the libraries


def cache_root() -> Path:
    """Cache folder shared by every checkout of the project on this machine."""
    env = os.environ.get("DELTAMEM_CACHE")
    if env:
        return Path(env).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "deltamem-edge"


def default_rpc() -> bool:
    """Whether builds include the RPC backend (on unless DELTAMEM_RPC=0): a user who adds ``--rpc`` later
    should not need another build, and the backend costs nothing until a server is named."""
    return os.environ.get("DELTAMEM_RPC", "1") not in ("0", "off", "OFF", "")


def default_backend() -> str:
    backend = os.environ.get("DELTAMEM_BACKEND") or ("metal" if sys.platform == "darwin" else "cpu")
    if backend not in BACKENDS:
        raise BuildError(f"unknown DELTAMEM_BACKEND '{backend}'", hint=f"use one of: {', '.join(BACKENDS)}")
    return backend


@dataclass(frozen=True)
class BuildConfig:
    """Everything that changes the compiled library; hashed into the cache key."""

    backend: str
    patched: bool = True  # False: stock llama.cpp at the same commit and flags (the benchmark's baseline)
    rpc: bool = field(default_factory=lambda: default_rpc())  # ggml's RPC backend and llama.cpp's rpc-server (DELTAMEM_RPC=0 leaves both out)

    def targets(self) -> list[str]:
        return ["llama", RPC_SERVER] if self.rpc else ["llama"]

    def cmake_flags(self) -> list[str]:
        flags = [
            "-DCMAKE_BUILD_TYPE=Release",
            "-DBUILD_SHARED_LIBS=ON",
            # portable: -march=native compiles AMX kernels that die with SIGILL on some VMs
            "-DGGML_NATIVE=OFF",
            "-DLLAMA_BUILD_TESTS=OFF",
            "-DLLAMA_BUILD_EXAMPLES=OFF",
            # tools and common are configured only so that tools/rpc (the rpc-server) exists as a target;
            # the build compiles nothing but the targets in BuildConfig.targets()
            "-DLLAMA_BUILD_TOOLS=ON" if self.rpc else "-DLLAMA_BUILD_TOOLS=OFF",
            "-DLLAMA_BUILD_SERVER=OFF",
            "-DLLAMA_BUILD_APP=OFF",
            "-DLLAMA_BUILD_COMMON=ON" if self.rpc else "-DLLAMA_BUILD_COMMON=OFF",
            "-DLLAMA_CURL=OFF",
            "-DLLAMA_OPENSSL=OFF",
            # llama.cpp's RPC backend: layers (and their δ-state) on other hosts (docs/distributed.md)
            "-DGGML_RPC=ON" if self.rpc else "-DGGML_RPC=OFF",
            # $ORIGIN rpaths: a copied lib folder never loads ggml from the build tree
            "-DCMAKE_BUILD_RPATH_USE_ORIGIN=ON",
            "-DCMAKE_INSTALL_RPATH=$ORIGIN" if sys.platform != "darwin" else "-DCMAKE_INSTALL_RPATH=@loader_path",
        ]
        if self.backend == "cuda":
            archs = os.environ.get("DELTAMEM_CUDA_ARCHS", "75;80;86;89;90")
            flags += ["-DGGML_CUDA=ON", f"-DCMAKE_CUDA_ARCHITECTURES={archs}"]
        elif self.backend == "metal":
            flags += ["-DGGML_METAL=ON", "-DGGML_METAL_EMBED_LIBRARY=ON"]
        elif self.backend == "vulkan":
            flags += ["-DGGML_VULKAN=ON"]
        else:
            flags += ["-DGGML_METAL=OFF"] if sys.platform == "darwin" else []
        return flags


def sources_digest() -> str:
    """sha256 over our native sources and patches, in a fixed order."""
    h = hashlib.sha256()
    files = [NATIVE_DIR / rel for rel in sorted(OUR_SOURCES)] + sorted(PATCH_DIR.glob("*.patch"))
    for path in files:
        h.update(path.relative_to(NATIVE_DIR).as_posix().encode())
        h.update(b"\0")
        h.update(path.read_bytes())
        h.update(b"\0")
    return h.hexdigest()


def build_key(config: BuildConfig) -> str:
    h = hashlib.sha256()
    h.update(SDIST_SHA256.encode())
    h.update(sources_digest().encode() if config.patched else b"stock")
    h.update("\0".join(config.cmake_flags()).encode())
    h.update(platform.machine().encode())
    return f"{config.backend}{'' if config.patched else '-stock'}-{h.hexdigest()[:16]}"


def library_dir(config: BuildConfig | None = None) -> Path:
    """Folder that holds (or will hold) the patched libraries for this configuration."""
    env = os.environ.get("DELTAMEM_LIB_DIR")
    if env and (config is None or config.patched):
        return Path(env).expanduser()
    config = config or BuildConfig(default_backend())
    return cache_root() / "lib" / build_key(config)


def _lib_file(folder: Path) -> Path:
    suffix = ".dylib" if sys.platform == "darwin" else ".dll" if os.name == "nt" else ".so"
    return folder / f"libllama{suffix}"


def installed_library_dir() -> Path:
    """The built library folder, or a NativeLibraryError that says how to build it."""
    folder = library_dir()
    if not _lib_file(folder).exists():
        raise NativeLibraryError(
            "the patched δ-mem libllama is not built for this checkout",
            path=folder,
            hint="run `deltamem-edge build` (or `make setup`); it takes a few minutes once, then it is cached",
        )
    return folder


# --------------------------------------------------------------------------------------------
# steps
# --------------------------------------------------------------------------------------------


def _say(msg: str) -> None:
    print(f"[deltamem build] {msg}", file=sys.stderr, flush=True)


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _need(tool: str, hint: str) -> str:
    found = shutil.which(tool)
    if not found:
        raise BuildError(f"'{tool}' was not found on PATH", hint=hint)
    return found


def fetch_sdist() -> Path:
    """Download the pinned llama-cpp-python sdist (once) and verify its sha256."""
    folder = cache_root() / "sdist"
    target = folder / SDIST_NAME
    if target.exists() and _sha256(target) == SDIST_SHA256:
        return target
    folder.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=folder) as tmp:
        _say(f"downloading llama-cpp-python=={LLAMA_CPP_PYTHON_VERSION} sdist (76 MB) with pip")
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
               "--no-build-isolation", f"llama-cpp-python=={LLAMA_CPP_PYTHON_VERSION}", "-d", tmp]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        got = Path(tmp) / SDIST_NAME
        if not got.exists():
            # --no-build-isolation can fail where scikit-build-core is absent; retry the plain way
            cmd.remove("--no-build-isolation")
            proc = subprocess.run(cmd, capture_output=True, text=True)
        if not got.exists():
            raise BuildError(f"pip download failed:\n{proc.stderr[-2000:]}",
                             hint="check that PyPI is reachable (pip config, proxy)")
        digest = _sha256(got)
        if digest != SDIST_SHA256:
            raise BuildError(f"sha256 of the downloaded sdist is {digest}, expected {SDIST_SHA256}",
                             path=got, hint="the package index served a different file; do not build from it")
        os.replace(got, target)
    return target


def install_bindings() -> None:
    """pip-install llama-cpp-python's Python code only (no native build: ours replaces it)."""
    sdist = fetch_sdist()
    env = dict(os.environ, CMAKE_ARGS="-DLLAMA_BUILD=OFF -DLLAVA_BUILD=OFF")
    _say("installing llama-cpp-python bindings (Python code only)")
    proc = subprocess.run([sys.executable, "-m", "pip", "install", "-q", str(sdist)], env=env)
    if proc.returncode != 0:
        raise BuildError("pip could not install the llama-cpp-python bindings", path=sdist)


def _extract_vendor(sdist: Path, dest: Path) -> Path:
    """Unpack vendor/llama.cpp from the sdist into dest (skipping what the build never reads)."""
    root = dest / "llama.cpp"
    with tarfile.open(sdist, "r:gz") as tar:
        members = []
        for m in tar.getmembers():
            if not m.name.startswith(VENDOR_PREFIX):
                continue
            rel = m.name[len(VENDOR_PREFIX):]
            if not rel or rel.startswith(SKIP_PREFIXES) or not (m.isfile() or m.isdir()):
                continue
            m.name = rel
            members.append(m)
        kwargs = {"filter": "data"} if hasattr(tarfile, "data_filter") else {}
        tar.extractall(root, members=members, **kwargs)
    return root


def _apply_ours(tree: Path) -> None:
    """Copy our sources in and apply the insert-only hook patches."""
    git = _need("git", "install git (used only to apply our zero-context patch: git apply --unidiff-zero)")
    for rel, dst in OUR_SOURCES.items():
        shutil.copyfile(NATIVE_DIR / rel, tree / dst)
    for patch in sorted(PATCH_DIR.glob("*.patch")):
        proc = subprocess.run([git, "apply", "--unidiff-zero", "-p1", str(patch)], cwd=tree,
                              capture_output=True, text=True)
        if proc.returncode != 0:
            raise BuildError(f"our patch did not apply:\n{proc.stderr[-2000:]}", path=patch,
                             hint=f"the patch targets llama.cpp {LLAMA_CPP_COMMIT[:9]} from the pinned sdist")


def _cmake_env(root: Path) -> dict[str, str]:
    env = dict(os.environ)
    if shutil.which("ccache"):
        # same relative paths in every build folder -> ccache hits across cache keys
        env.setdefault("CCACHE_BASEDIR", str(root))
        env.setdefault("CCACHE_NOHASHDIR", "1")
    return env


def build(config: BuildConfig | None = None, *, force: bool = False) -> Path:
    """Return the library folder for `config`, building it first if the cache lacks it."""
    config = config or BuildConfig(default_backend())
    out = library_dir(config)
    if not force and _lib_file(out).exists():
        os.utime(out)  # most recently used: pruning keeps it
        return out
    if os.environ.get("DELTAMEM_LIB_DIR") and config.patched:
        raise BuildError("DELTAMEM_LIB_DIR points at a folder without libllama", path=out)
    cmake = _need("cmake", "install CMake >= 3.21 (Debian/Ubuntu: apt install cmake; macOS: brew install cmake)")
    compiler = shutil.which("c++") or shutil.which("g++") or shutil.which("clang++")
    if not compiler:
        raise BuildError("no C++ compiler found", hint="install g++ or clang (Debian/Ubuntu: apt install build-essential)")
    generator = ["-G", "Ninja"] if shutil.which("ninja") else []
    root = cache_root()
    key = build_key(config)
    t0 = time.time()
    sdist = fetch_sdist()
    work = root / "build" / key
    if work.exists():
        shutil.rmtree(work)
    work.mkdir(parents=True)
    _say(f"preparing sources in {work}")
    tree = _extract_vendor(sdist, work)
    if config.patched:
        _apply_ours(tree)
    bdir = work / "build"
    env = _cmake_env(root)
    flags = config.cmake_flags() + (["-DGGML_CCACHE=ON"] if shutil.which("ccache") else ["-DGGML_CCACHE=OFF"])
    _say(f"configuring ({config.backend}; {'ccache' if shutil.which('ccache') else 'no ccache'})")
    _run([cmake, "-S", str(tree), "-B", str(bdir), *generator, *flags], env, work / "configure.log")
    jobs = os.environ.get("DELTAMEM_JOBS") or str(os.cpu_count() or 2)
    _say(f"compiling libllama + ggml with {jobs} jobs (a few minutes the first time)")
    _run([cmake, "--build", str(bdir), "--target", *config.targets(), "-j", jobs], env, work / "build.log")
    _install_libs(bdir / "bin", out)
    shutil.rmtree(tree, ignore_errors=True)  # keep logs and objects' ccache, drop 100 MB of sources
    _prune_old(root)
    _say(f"built {out} in {time.time() - t0:.0f} s")
    return out


def _run(cmd: list[str], env: dict[str, str], log: Path) -> None:
    with open(log, "w") as f:
        proc = subprocess.run(cmd, env=env, stdout=f, stderr=subprocess.STDOUT)
    if proc.returncode != 0:
        tail = log.read_text(errors="replace")[-3000:]
        raise BuildError(f"command failed ({proc.returncode}): {' '.join(cmd[:3])} …\n{tail}", path=log,
                         hint="see the full log; a missing toolkit (e.g. CUDA) or compiler is the usual cause")


def _install_libs(bin_dir: Path, out: Path) -> None:
    """Copy the shared libraries into `out` atomically (a half-copied folder never looks built)."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".tmp-", dir=out.parent))
    for item in sorted(bin_dir.iterdir()):
        is_lib = item.name.startswith(LIB_NAMES) and (item.suffix in (".so", ".dylib", ".dll") or ".so." in item.name)
        if is_lib or item.name in (RPC_SERVER, RPC_SERVER + ".exe"):
            if item.is_symlink():
                os.symlink(os.readlink(item), tmp / item.name)
            else:
                shutil.copy2(item, tmp / item.name)
    if not _lib_file(tmp).exists():
        shutil.rmtree(tmp, ignore_errors=True)
        raise BuildError("the build finished but produced no libllama", path=bin_dir)
    if out.exists():
        shutil.rmtree(out)
    os.replace(tmp, out)


def _prune_old(root: Path, keep: int = 3) -> None:
    """Keep the newest `keep` build folders and libraries of each kind; old keys only waste disk.

    Kinds (``cpu``, ``cpu-stock``, ``cuda``, …) are pruned separately: the stock library is rebuilt
    rarely, and evicting it because the patched one was rebuilt often would cost a cold build.
    """
    for sub in ("build", "lib"):
        folder = root / sub
        if not folder.is_dir():
            continue
        kinds: dict[str, list[Path]] = {}
        for entry in folder.iterdir():
            if not entry.name.startswith("."):
                kinds.setdefault(entry.name.rsplit("-", 1)[0], []).append(entry)
        for entries in kinds.values():
            entries.sort(key=lambda p: p.stat().st_mtime, reverse=True)
            for old in entries[keep:]:
                shutil.rmtree(old, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m deltamem_edge.native.build", description=__doc__.split("\n")[0])
    parser.add_argument("step", choices=["fetch", "bindings", "build", "path"], nargs="?", default="build")
    parser.add_argument("--force", action="store_true", help="rebuild even if the cache has this build")
    parser.add_argument("--stock", action="store_true", help="also build stock llama.cpp (the benchmark baseline)")
    args = parser.parse_args(argv)
    try:
        if args.step == "fetch":
            print(fetch_sdist())
        elif args.step == "bindings":
            install_bindings()
        elif args.step == "build":
            print(build(force=args.force))
            if args.stock:
                print(build(BuildConfig(default_backend(), patched=False), force=args.force))
        else:
            print(library_dir())
    except NativeLibraryError as e:
        print(f"error: {e}", file=sys.stderr)
        if e.hint:
            print(f"hint: {e.hint}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
