#!/usr/bin/env bash
# Fill .gpu/ (git-ignored) with what scripts/gpu_check.sh needs on an offline GPU machine:
#   .gpu/llama_cpp_python-0.3.36.src.tar.xz   the pinned sdist, repacked: llama-cpp-python's Python package plus
#                                             vendor/llama.cpp without models/docs/examples/tools and without the
#                                             ggml backends the check does not build (the sdist itself is 76 MB;
#                                             a device call carries at most 64 MiB with the repo)
#   .gpu/whl/*.whl                            pure-Python wheels missing there: gguf (tests, benchmark), diskcache
#                                             (imported by llama_cpp); numpy, pytest, jinja2, pyyaml, tqdm,
#                                             typing-extensions, requests are preinstalled (device KINDS.md)
# Run here, from the repo root, with network (pip): bash scripts/prepare_gpu_bundle.sh
# Then call the device with carry [".gpu"] and the command in docs/gpu.md.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
[ -x "$PY" ] || PY=python3
DEST=.gpu
mkdir -p "$DEST/whl"

SDIST=$("$PY" -m deltamem_edge.native.build fetch)   # cached, sha256-verified
echo "sdist: $SDIST"

"$PY" - "$SDIST" "$DEST/llama_cpp_python-0.3.36.src.tar.xz" <<'EOF'
import sys, tarfile
src, dst = sys.argv[1], sys.argv[2]
root = "llama_cpp_python-0.3.36/"
vend = root + "vendor/llama.cpp/"
# vendor/llama.cpp parts the CUDA build with tests needs: CMake files, cmake/, ggml (CPU + CUDA), src, include,
# common, vendor (json, httplib), tests (tests/CMakeLists.txt lists every test source)
skip = ("models/", "docs/", "media/", "examples/", "tools/", "benches/", "app/", "pocs/", "gguf-py/", "scripts/",
        "skills/", "ci/", "grammars/", "conversion/", "requirements/", ".git", ".devops/", ".github/")
backends = ("ggml-vulkan", "ggml-sycl", "ggml-metal", "ggml-opencl", "ggml-cann", "ggml-hexagon", "ggml-openvino",
            "ggml-webgpu", "ggml-zdnn", "ggml-musa", "ggml-hip", "ggml-blas", "ggml-rpc", "ggml-zendnn",
            "ggml-virtgpu", "ggml-et")
n = size = 0
with tarfile.open(src, "r:gz") as tin, tarfile.open(dst, "w:xz", preset=9) as tout:
    for m in tin:
        name = m.name
        if name.startswith(root + "llama_cpp/"):
            if "/server/" in name or "__pycache__" in name:
                continue
        elif name.startswith(vend):
            rel = name[len(vend):]
            if rel.startswith(skip) or any(rel.startswith("ggml/src/" + b) for b in backends):
                continue
            if rel.endswith((".gguf", ".png", ".jpg", ".mp4", ".wasm")):
                continue
        else:
            continue
        if not (m.isfile() or m.isdir()):
            continue
        tout.addfile(m, tin.extractfile(m) if m.isfile() else None)
        n += 1
        size += m.size
print(f"repacked {n} entries, {size / 2**20:.1f} MiB uncompressed")
EOF

rm -f "$DEST"/whl/*.whl
"$PY" -m pip download -q --no-deps --only-binary=:all: -d "$DEST/whl" gguf==0.19.0 diskcache==5.6.3

echo "bundle:"
find "$DEST" -type f -printf "%s %p\n" | sort -k2 | awk '{printf "  %8.1f KiB  %s\n", $1/1024, $2}'
TREE=$(git ls-files -co --exclude-standard -z | xargs -0 du -cb 2>/dev/null | tail -1 | cut -f1)
GPU=$(du -sb "$DEST" | cut -f1)
awk -v t="$TREE" -v g="$GPU" 'BEGIN { printf "travels: repo %.1f MiB + .gpu %.1f MiB = %.1f MiB of 64 MiB\n", t/2^20, g/2^20, (t+g)/2^20 }'
