#!/usr/bin/env bash
# Compile-only check, without a GPU, of the ggml-cuda sources the δ-mem graph runs on: nvcc for sm_90
# with the flags ggml-cuda's CMake uses, on the patched tree (pinned sdist + our sources + patches).
#
#   scripts/cuda_compile_check.sh                # the δ-mem set (below), ~8 min on 2 cores
#   scripts/cuda_compile_check.sh --all          # every ggml-cuda source (145 files: hours on 2 cores)
#   scripts/cuda_compile_check.sh pad.cu ...     # chosen files (relative to ggml/src/ggml-cuda)
#
# Environment: CUDA_ARCH (90), NVCC (nvcc on PATH), JOBS (nproc), CUBLAS_INCLUDE (a folder with
# cublas_v2.h; otherwise the toolkit's, a Python nvidia-cublas wheel's, or headers cached under
# $DELTAMEM_CACHE/cublas-include from a one-off `pip download nvidia-cublas==13.0.2.14`, ~440 MB),
# CUDA_CHECK_WORK (/tmp/dmem-cuda-check).  ccache is used when present (CCACHE_DISABLE=1: real compiles).
# Not in .ci/run: nvcc needs ~15-200 s per file here; see docs/gpu.md for the measured times.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
[ -x "$PY" ] || PY=python3
case "$PY" in /*) ;; */*) PY=$PWD/$PY ;; *) PY=$(command -v "$PY") ;; esac  # absolute (used after cd), venv kept
ARCH=${CUDA_ARCH:-90}
NVCC=${NVCC:-$(command -v nvcc || true)}
JOBS=${JOBS:-$(nproc)}
WORK=${CUDA_CHECK_WORK:-${TMPDIR:-/tmp}/dmem-cuda-check}
[ -n "$NVCC" ] || { echo "nvcc not found (set NVCC=/path/to/nvcc)" >&2; exit 2; }

# the kernels of every op in the δ-mem graph (llama-dmem.cpp), plus the backend itself
DMEM_SET=(
    gated_delta_net.cu   # GATED_DELTA_NET, the scan
    pad.cu               # ggml_pad_ext (no-op step, zero padding to P = 16 or 32)
    getrows.cu           # state rows of the ubatch's sequences
    set-rows.cu          # state write-back
    unary.cu             # tanh, softplus, exp, neg, sigmoid
    norm.cu              # l2_norm (q/k), rms_norm (δ_o norm)
    scale.cu             # scale (reads, zero gates in read-only mode)
    clamp.cu             # gate clamp
    binbcast.cu          # add, sub, mul
    cpy.cu               # cont
    mmvf.cu              # F32/F16/BF16 mat-vec (decode projections)
    mmf.cu               # F32/F16/BF16 small-batch mat-mat (TF32/FP16 mma)
    convert.cu           # F16/BF16 -> F32 for cuBLAS
    out-prod.cu          # OUT_PROD (cuBLAS sgemm), the δ corrections
    ggml-cuda.cu         # dispatch, supports_op, fusion, CUDA graphs
)

FILES=()
if [ "${1:-}" = "--all" ]; then
    ALL=1
elif [ $# -gt 0 ]; then
    FILES=("$@")
else
    FILES=("${DMEM_SET[@]}")
fi

echo "[cuda-check] preparing the patched tree in $WORK"
TREE=$("$PY" - "$WORK" <<'EOF'
import shutil, sys
from pathlib import Path
from deltamem_edge.native import build as B
work = Path(sys.argv[1])
shutil.rmtree(work / "llama.cpp", ignore_errors=True)
work.mkdir(parents=True, exist_ok=True)
tree = B._extract_vendor(B.fetch_sdist(), work)
B._apply_ours(tree)
print(tree)
EOF
)
CU=$TREE/ggml/src/ggml-cuda
[ "${ALL:-0}" = 1 ] && mapfile -t FILES < <(cd "$CU" && ls *.cu template-instances/fattn-tile*.cu template-instances/fattn-mma*.cu \
    template-instances/mmq*.cu template-instances/mmf*.cu \
    template-instances/fattn-vec-instance-{f16-f16,q4_0-q4_0,q8_0-q8_0,bf16-bf16}.cu 2>/dev/null)

# cuBLAS headers: every ggml-cuda file includes vendors/cuda.h -> cublas_v2.h
CUDA_HOME=$(dirname "$(dirname "$(readlink -f "$NVCC")")")
[ -f "$CUDA_HOME/include/cuda_runtime.h" ] || CUDA_HOME=$("$NVCC" -v -x cu -E /dev/null 2>&1 | sed -n 's/^#\$ TOP=//p' | head -1)
CACHE=${DELTAMEM_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/deltamem-edge}
find_cublas() {
    [ -n "${CUBLAS_INCLUDE:-}" ] && [ -f "$CUBLAS_INCLUDE/cublas_v2.h" ] && { echo "$CUBLAS_INCLUDE"; return; }
    [ -f "$CUDA_HOME/include/cublas_v2.h" ] && { echo "$CUDA_HOME/include"; return; }
    local w; w=$("$PY" -c "import glob,site,os; c=[p for s in site.getsitepackages() for p in glob.glob(os.path.join(s,'nvidia','*','include','cublas_v2.h'))]; print(os.path.dirname(c[0]) if c else '')" 2>/dev/null || true)
    [ -n "$w" ] && { echo "$w"; return; }
    [ -f "$CACHE/cublas-include/cublas_v2.h" ] && { echo "$CACHE/cublas-include"; return; }
    echo "[cuda-check] cuBLAS headers missing: pip download nvidia-cublas==13.0.2.14 (headers only are kept)" >&2
    local tmp; tmp=$(mktemp -d)
    "$PY" -m pip download -q --no-deps --only-binary=:all: -d "$tmp" nvidia-cublas==13.0.2.14 >&2
    mkdir -p "$CACHE/cublas-include"
    (cd "$tmp" && "$PY" -c "import zipfile,glob,os,sys
z=zipfile.ZipFile(glob.glob('*.whl')[0])
for n in z.namelist():
    if '/include/' in n and n.endswith('.h'):
        open(os.path.join(sys.argv[1], os.path.basename(n)),'wb').write(z.read(n))" "$CACHE/cublas-include")
    rm -rf "$tmp"
    echo "$CACHE/cublas-include"
}
CUBLAS=$(find_cublas)
[ -f "$CUBLAS/cublas_v2.h" ] || { echo "[cuda-check] no cublas_v2.h (set CUBLAS_INCLUDE)" >&2; exit 2; }
echo "[cuda-check] nvcc $("$NVCC" --version | sed -n 's/.*release \([0-9.]*\).*/\1/p'), sm_$ARCH, cuBLAS headers: $CUBLAS"

# ggml-cuda's flags (ggml/src/ggml-cuda/CMakeLists.txt, Release, GGML_NATIVE=OFF, default FA quants)
FA=()
for k in F16 Q4_0 Q4_1 Q5_0 Q5_1 Q8_0 BF16; do for v in F16 Q4_0 Q4_1 Q5_0 Q5_1 Q8_0 BF16; do
    case "$k-$v" in F16-F16|Q4_0-Q4_0|Q8_0-Q8_0|BF16-BF16) FA+=("-DGGML_CUDA_FA_${k}_${v}=1");; *) FA+=("-DGGML_CUDA_FA_${k}_${v}=0");; esac
done; done
FLAGS=(-forward-unknown-to-host-compiler -DGGML_BACKEND_BUILD -DGGML_BACKEND_SHARED "${FA[@]}"
       '-DGGML_CUDA_FA_QUANTS="q4_0-q4_0,q8_0-q8_0,f16-f16,bf16-bf16"' -DGGML_CUDA_USE_GRAPHS -DGGML_SCHED_MAX_COPIES=4
       -DGGML_SHARED -D_GNU_SOURCE -D_XOPEN_SOURCE=600 -Dggml_cuda_EXPORTS
       "-I$TREE/ggml/src" "-I$TREE/ggml/include" "-isystem=$CUDA_HOME/include" "-I$CUBLAS"
       -O3 -DNDEBUG "--generate-code=arch=compute_$ARCH,code=[compute_$ARCH,sm_$ARCH]" -Xcompiler=-fPIC
       -use_fast_math -extended-lambda -compress-mode=size
       -Xcompiler "-Wmissing-declarations -Wmissing-noreturn -Wall -Wextra -Wpedantic -Wcast-qual -Wno-unused-function -Wno-array-bounds -Wextra-semi -Wno-pedantic"
       -std=c++17)
LAUNCH=()
command -v ccache >/dev/null && [ "${CCACHE_DISABLE:-0}" != 1 ] && LAUNCH=(ccache)
OBJ=$WORK/obj
mkdir -p "$OBJ/template-instances"
compile_one() {  # runs in a background subshell: sees FLAGS/LAUNCH as they are
    local f=$1 s rc=0
    s=$(date +%s%N)
    "${LAUNCH[@]}" "$NVCC" "${FLAGS[@]}" -x cu -c "$CU/$f" -o "$OBJ/$f.o" > "$OBJ/$(echo "$f" | tr / _).log" 2>&1 || rc=$?
    awk -v a="$s" -v b="$(date +%s%N)" -v rc="$rc" -v f="$f" 'BEGIN { printf "%7.1f\t%s\t%s\n", (b - a) / 1e9, rc, f }'
}
T0=$(date +%s)
echo "[cuda-check] compiling ${#FILES[@]} files with $JOBS jobs"
RES=$WORK/results.tsv
: > "$RES"
running=0
for f in "${FILES[@]}"; do
    compile_one "$f" | tee -a "$RES" &
    running=$((running + 1))
    if [ "$running" -ge "$JOBS" ]; then wait -n; running=$((running - 1)); fi
done
wait
WALL=$(( $(date +%s) - T0 ))
FAILS=$(awk -F'\t' '$2 != 0' "$RES" | wc -l)
echo
echo "file                                   seconds  result"
sort -t$'\t' -k3 "$RES" | awk -F'\t' '{printf "%-38s %7s  %s\n", $3, $1, ($2 == 0 ? "ok" : "FAILED")}'
awk -F'\t' -v w="$WALL" -v j="$JOBS" '{s += $1} END {printf "%d files, %.0f s of compile, %d s wall with %d jobs\n", NR, s, w, j}' "$RES"
if [ "$FAILS" -gt 0 ]; then
    for f in $(awk -F'\t' '$2 != 0 {print $3}' "$RES"); do echo "--- $f"; tail -30 "$OBJ/$(echo "$f" | tr / _).log"; done
    exit 1
fi
