#!/usr/bin/env bash
# One-shot CUDA check of deltamem-edge on an offline NVIDIA GPU machine, in one ~10-minute run.
#
#   bash scripts/gpu_check.sh        (from the repo root; needs .gpu/ from scripts/prepare_gpu_bundle.sh)
#
# Steps, each timed (steps.tsv) and logged to $OUT (or .gpu/out): 8 files at most
#   env+prepare+configure+build -> build.log     CUDA build of libllama (product flags) + test-backend-ops, carried sources
#   backend-ops                 -> backend-ops.log   test-backend-ops -o GATED_DELTA_NET -b CUDA0 (upstream + δ-mem cases),
#                                                    then perf of the δ-mem cases
#   parity                      -> parity.log, parity.json   tests/test_gpu_parity.py: n_gpu_layers=-1 vs CPU vs numpy
#   bench                       -> bench.log, bench.json     tokens/s vanilla vs δ-mem, Qwen3-4B-shaped Q4_K_M
#   table                       -> summary.txt               printed last
#
# Knobs (environment): GPU_CHECK_BUDGET (s, default 560: later steps get what is left), GPU_CHECK_BUILD_MAX (480 s),
# GPU_CHECK_JOBS (nproc),
# DELTAMEM_CUDA_ARCHS (90), GPU_CHECK_FA (0: no flash-attention kernels, ~1700 core-seconds less to compile, which a
# single 10-minute call needs; 1: the product's build exactly, ~1.5-2 min more on 16 cores),
# GPU_CHECK_STEPS ("build backend-ops parity bench"), GPU_CHECK_GEN (direct | quantize), GPU_CHECK_WORK (/tmp/dmem-gpu),
# GPU_CHECK_DEVICE (CUDA0: test-backend-ops -b), GPU_CHECK_BACKEND (cuda; cpu for a dry run), GPU_CHECK_BENCH_ARGS (extra bench arguments, e.g. "--reps 1"),
# PYTHON (python3).  A CPU dry run of the whole flow (no GPU): GPU_CHECK_BACKEND=cpu GPU_CHECK_DEVICE=CPU
# DELTAMEM_GPU_PARITY_FORCE=1 GPU_CHECK_BENCH_ARGS="--prefill 32 --decode 4 --reps 1" GPU_CHECK_BUDGET=3600.
set -uo pipefail
MODE=${1:-all}       # all | __build | __ops (the last two: one step, run by `step` under a timeout)
SELF=$(readlink -f "$0")
T0=$(date +%s)
REPO=$(pwd)
[ -f "$REPO/deltamem_edge/native/build.py" ] || { echo "run from the repo root" >&2; exit 2; }
BUNDLE=${GPU_BUNDLE:-$REPO/.gpu}
OUTDIR=${OUT:-$BUNDLE/out}
WORK=${GPU_CHECK_WORK:-/tmp/dmem-gpu}
BUDGET=${GPU_CHECK_BUDGET:-560}
JOBS=${GPU_CHECK_JOBS:-$(nproc)}
STEPS=${GPU_CHECK_STEPS:-build backend-ops parity bench}
PY=${PYTHON:-python3}
export DELTAMEM_CUDA_ARCHS=${DELTAMEM_CUDA_ARCHS:-90}
export PYTHONUNBUFFERED=1
mkdir -p "$OUTDIR" "$WORK"
[ "$MODE" = all ] && : > "$OUTDIR/steps.tsv"
TREE=$WORK/src/llama.cpp
BUILD=$WORK/build
export DELTAMEM_LIB_DIR=$BUILD/bin
export DELTAMEM_CACHE=$WORK/cache
export PYTHONPATH=$WORK/site:$WORK/py:$REPO${PYTHONPATH:+:$PYTHONPATH}
FAILED=0

STEP_PID=
trap '[ -n "$STEP_PID" ] && kill -- -"$STEP_PID" 2>/dev/null; exit 143' TERM INT
left() { echo $(( BUDGET - ($(date +%s) - T0) )); }
# step NAME LOG MAX_SECONDS DETAIL_FN CMD...: run CMD with a timeout of min(MAX, budget left), append to LOG
step() {
    [ "$MODE" = all ] || return 0
    local name=$1 log=$2 max=$3 detail=$4; shift 4
    local t=$(left); [ "$t" -gt "$max" ] && t=$max
    if [ "$t" -lt 10 ]; then
        printf '%s\t%s\t%s\t%s\n' "$name" "skip" "0" "no time left" >> "$OUTDIR/steps.tsv"; FAILED=1; return 1
    fi
    echo "=== $name (timeout ${t}s) $(date -u +%H:%M:%S)" | tee -a "$log"
    local s=$(date +%s)
    timeout --kill-after=5 "$t" "$@" >> "$log" 2>&1 &
    STEP_PID=$!   # timeout leads its own process group: the trap below ends the whole step
    wait "$STEP_PID"
    local rc=$?
    STEP_PID=
    local d=$(( $(date +%s) - s ))
    [ "$rc" = 124 ] && echo "=== $name: TIMEOUT after ${t}s" | tee -a "$log"
    echo "=== $name: rc=$rc in ${d}s" | tee -a "$log"
    printf '%s\t%s\t%s\t%s\n' "$name" "$rc" "$d" "$($detail "$log" "$rc")" >> "$OUTDIR/steps.tsv"
    [ "$rc" = 0 ] || FAILED=1
    return "$rc"
}

# ---------------------------------------------------------------------------------------------
# environment and toolchain (CUDA paths differ between images: find nvcc, cuBLAS and libcuda)
# ---------------------------------------------------------------------------------------------
BLOG=$OUTDIR/build.log
LOGENV=$BLOG; [ "$MODE" = all ] || LOGENV=/dev/null
{
    echo "=== env $(date -u)"; uname -a; nproc; free -g | head -2
    nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv 2>&1 | head -3
    "$PY" --version; cmake --version | head -1; ninja --version
} > "$LOGENV" 2>&1
NVCC=$(command -v nvcc || ls /usr/local/cuda/bin/nvcc /usr/local/cuda-*/bin/nvcc 2>/dev/null | head -1)
CMAKE_EXTRA=()
if [ -n "$NVCC" ]; then
    NVCC=$(readlink -f "$NVCC")
    # a wrapper script (exec /path/nvcc) hides the toolkit: ask nvcc where it lives
    CUDA_HOME=$(dirname "$(dirname "$NVCC")")
    [ -f "$CUDA_HOME/include/cuda_runtime.h" ] || CUDA_HOME=$("$NVCC" -v -x cu -E /dev/null 2>&1 | sed -n 's/^#\$ TOP=//p' | head -1)
    export CUDACXX=$NVCC
    CMAKE_EXTRA+=("-DCUDAToolkit_ROOT=$CUDA_HOME")
    "$NVCC" --version | tail -2 >> "$LOGENV"
    echo "CUDA_HOME=$CUDA_HOME" >> "$LOGENV"
    has() { ls "$CUDA_HOME"/include/$1 "$CUDA_HOME"/targets/*/include/$1 >/dev/null 2>&1; }
    haslib() { ls "$CUDA_HOME"/lib64/$1* "$CUDA_HOME"/lib/$1* "$CUDA_HOME"/targets/*/lib/$1* \
                  "$CUDA_HOME"/lib64/stubs/$1* "$CUDA_HOME"/targets/*/lib/stubs/$1* >/dev/null 2>&1; }
    if ! has cublas_v2.h || ! haslib libcublas.so; then
        # cuBLAS from the nvidia-cublas wheel of the image's Python instead
        NV=$("$PY" -c "import glob,site,os; c=[p for s in site.getsitepackages() for p in glob.glob(os.path.join(s,'nvidia','*','include','cublas_v2.h'))]; print(os.path.dirname(os.path.dirname(c[0])) if c else '')" 2>/dev/null)
        if [ -n "$NV" ]; then
            echo "cuBLAS from the Python wheel: $NV" >> "$LOGENV"
            CMAKE_EXTRA+=("-DCMAKE_CUDA_FLAGS=-I$NV/include" "-DCMAKE_CXX_FLAGS=-I$NV/include"
                          "-DCUDA_cublas_LIBRARY=$(ls "$NV"/lib/libcublas.so* | head -1)"
                          "-DCUDA_cublasLt_LIBRARY=$(ls "$NV"/lib/libcublasLt.so* | head -1)")
            export LD_LIBRARY_PATH=$NV/lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}
        fi
    fi
    if ! haslib libcuda.so; then
        DRV=$(ls /usr/local/nvidia/lib64/libcuda.so* /usr/lib/x86_64-linux-gnu/libcuda.so* /usr/lib64/libcuda.so* 2>/dev/null | head -1)
        [ -n "$DRV" ] && CMAKE_EXTRA+=("-DCUDA_cuda_driver_LIBRARY=$DRV") && echo "libcuda: $DRV" >> "$LOGENV"
    fi
else
    echo "nvcc not found" >> "$LOGENV"
fi
[ "${GPU_CHECK_FA:-0}" = 0 ] && CMAKE_EXTRA+=("-DGGML_CUDA_FA=OFF")

# ---------------------------------------------------------------------------------------------
# build: carried sources + our patches -> libllama (CUDA) + test-backend-ops
# ---------------------------------------------------------------------------------------------
build_detail() { echo "$(grep -c "Building CUDA object" "$1") CUDA objects, $(grep -o "compile took [0-9]*s" "$1" | tail -1)"; }
do_build() {
    set -e
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target "$WORK/site" "$BUNDLE"/whl/*.whl
    rm -rf "$WORK/src" "$WORK/py"
    "$PY" scripts/gpu_check.py prepare "$BUNDLE" "$WORK"
    mapfile -t FLAGS < <("$PY" scripts/gpu_check.py flags --backend "${GPU_CHECK_BACKEND:-cuda}")  # BuildConfig's
    echo "cmake flags: ${FLAGS[*]} ${CMAKE_EXTRA[*]}"
    local s=$(date +%s)
    cmake -S "$TREE" -B "$BUILD" -G Ninja "${FLAGS[@]}" "${CMAKE_EXTRA[@]}" -DGGML_CCACHE=OFF
    echo "=== configure took $(( $(date +%s) - s ))s"
    # test-backend-ops needs only ggml's headers and libraries: compiled beside ninja instead of
    # LLAMA_BUILD_TESTS=ON, which would also build llama-common and cpp-httplib (~600 core-seconds)
    c++ -O3 -DNDEBUG -std=c++17 -DGGML_SHARED -DGGML_BACKEND_SHARED -I"$TREE/ggml/include" \
        -c "$TREE/tests/test-backend-ops.cpp" -o "$WORK/test-backend-ops.o" &
    local tbo=$!
    s=$(date +%s)
    cmake --build "$BUILD" --target llama -j "$JOBS"
    echo "=== compile took $(( $(date +%s) - s ))s"
    wait "$tbo"
    c++ "$WORK/test-backend-ops.o" -o "$BUILD/bin/test-backend-ops" -L"$BUILD/bin" -lggml -lggml-base \
        -Wl,-rpath,'$ORIGIN' -pthread
    ls -la "$BUILD/bin"
}
[ "$MODE" = __build ] && { do_build; exit $?; }
case " $STEPS " in *" build "*)
    step build "$BLOG" "${GPU_CHECK_BUILD_MAX:-480}" build_detail bash "$SELF" __build || true ;;
esac
[ -f "$BUILD/bin/libllama.so" ] || { echo "no CUDA libllama: see build.log" >&2; }

# ---------------------------------------------------------------------------------------------
# test-backend-ops: GATED_DELTA_NET, upstream cases + ours (S = 32, H_k = 1/4, H_v = 8/32, β' to 5e8)
# ---------------------------------------------------------------------------------------------
ops_detail() {
    local passed; passed=$(grep -E "^ *[0-9]+/[0-9]+ tests passed" "$1" | tail -1 | sed 's/^ *//')
    local ours; ours=$(grep "GATED_DELTA_NET(rank=" "$1" | grep -vc "perf\|us/run")
    local ok; ok=$(grep "GATED_DELTA_NET(rank=" "$1" | grep -c "OK")
    echo "${passed:-no summary}; δ-mem cases OK $ok/$ours"
}
do_ops() {
    local dev=${GPU_CHECK_DEVICE:-CUDA0}
    "$BUILD/bin/test-backend-ops" -o GATED_DELTA_NET -b "$dev"
    local rc=$?
    echo "=== perf of the δ-mem cases"
    timeout 60 "$BUILD/bin/test-backend-ops" perf -o GATED_DELTA_NET -b "$dev" -p "rank=" || true
    return $rc
}
[ "$MODE" = __ops ] && { do_ops; exit $?; }
case " $STEPS " in *" backend-ops "*)
    step backend-ops "$OUTDIR/backend-ops.log" 120 ops_detail bash "$SELF" __ops || true ;;
esac

# ---------------------------------------------------------------------------------------------
# parity: GPU engine vs CPU engine vs numpy reference
# ---------------------------------------------------------------------------------------------
parity_detail() { grep -E "[0-9]+ (passed|failed|skipped|error)" "$1" | tail -1 | sed 's/=//g; s/^ *//'; }
case " $STEPS " in *" parity "*)
    step parity "$OUTDIR/parity.log" 200 parity_detail \
        env GPU_PARITY_JSON="$OUTDIR/parity.json" "$PY" -m pytest -q -p no:cacheprovider tests/test_gpu_parity.py || true ;;
esac

# ---------------------------------------------------------------------------------------------
# bench: tokens/s vanilla vs δ-mem, prefill 2048, decode 128, Qwen3-4B-shaped Q4_K_M
# ---------------------------------------------------------------------------------------------
bench_detail() { grep -E "^\[gpu_check\] (vanilla|dmem|benchmark model)" "$1" | sed 's/\[gpu_check\] //' | tr '\n' ';'; }
BENCH_WORK=$WORK
if [ -d /dev/shm ] && [ "$(df -Pk /dev/shm | awk 'NR==2 {print $4}')" -gt 6000000 ]; then BENCH_WORK=/dev/shm/dmem-gpu; fi
case " $STEPS " in *" bench "*)
    step bench "$OUTDIR/bench.log" 200 bench_detail \
        "$PY" scripts/gpu_check.py bench --work "$BENCH_WORK" --out "$OUTDIR/bench.json" --gen "${GPU_CHECK_GEN:-direct}" \
        ${GPU_CHECK_BENCH_ARGS:-} || true ;;
esac
rm -rf /dev/shm/dmem-gpu

printf '%s\t%s\t%s\t%s\n' "total" "$FAILED" "$(( $(date +%s) - T0 ))" "budget ${BUDGET}s" >> "$OUTDIR/steps.tsv"
"$PY" scripts/gpu_check.py table "$OUTDIR" | tee "$OUTDIR/summary.txt"
exit "$FAILED"
