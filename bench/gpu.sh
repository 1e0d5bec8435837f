#!/usr/bin/env bash
# The GPU proof in one call: install, build, test and benchmark fused_ls on one NVIDIA GPU.
#
#   bash bench/gpu.sh OUT_DIR              on the GPU machine (no package registry needed)
#   bash bench/gpu.sh OUT_DIR --dry-run    anywhere: the same steps on the CPU, tiny sizes
#
# For a machine with one NVIDIA GPU, Python 3.12, torch >= 2.11 and triton >= 3.6 already
# installed, and nothing reachable over the network. Steps, each under its own time cap so
# the whole run ends within FUSED_LS_GPU_BUDGET_S (default 450 s) even if one hangs:
#   1. environment: nvidia-smi, versions                              -> gpu.log
#   2. carried wheels (.whl/*.whl, e.g. liger-kernel) into a private site folder
#   3. pip install --no-deps --no-build-isolation --no-index of a copy of this checkout
#      into that folder: builds fused_ls._C with its CUDA kernels     -> build.log
#   4. the whole test suite on CUDA (FUSED_LS_TEST_DEVICE=cuda, Triton compiled, not
#      interpreted; GPU-only tests included)                          -> tests.log, junit.xml
#   5. python -m fused_ls bench on CUDA: bf16 16384 x {32000, 50257, 128256, 256000} and fp32
#      16384 x 128256; eager, torch.compile, triton (tuned), every Triton launch pinned
#      (triton:<launch>, the split ones included), native (CUDA), in place, Liger; the copy
#      ceiling; checked against eager                  -> bench.json, bench.md, bench.png
#   6. the fused linear head (bench/test_linear.py, its targets' table): 4096x1024x128256 and
#      8192x512x32000, fp32 and bf16, against the materialised path, torch's
#      F.linear_cross_entropy and Liger's fused linear CE            -> linear.md
# Everything lands in OUT_DIR: 8 files, flat (the device tool returns at most 8).
# Without a GPU (and without --dry-run) it says so and exits 0.
#
# Knobs (environment): PYTHON (default python3), FUSED_LS_GPU_BUDGET_S (450),
# FUSED_LS_GPU_BUILD_S (200), FUSED_LS_GPU_TEST_S (120, less if the build ran long: the two
# benchmarks keep FUSED_LS_GPU_BENCH_MIN_S, 150), FUSED_LS_GPU_LINEAR_S (90, of those 150, for
# step 6), FUSED_LS_GPU_PYTEST_ARGS (extra
# pytest arguments, e.g. "-k triton"), FUSED_LS_GPU_SKIP_TESTS=1, FUSED_LS_GPU_BENCH_ARGS
# (extra bench arguments, e.g. "--dtypes bf16").
set -uo pipefail

usage() { echo "usage: bash bench/gpu.sh OUT_DIR [--dry-run]" >&2; exit 2; }
[ $# -ge 1 ] || usage
OUT_ARG=$1
DRY=0
if [ $# -ge 2 ]; then [ "$2" = "--dry-run" ] && DRY=1 || usage; fi

PY=${PYTHON:-python3}
REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
START=$(date +%s)
BUDGET=${FUSED_LS_GPU_BUDGET_S:-450}
RESERVE=15  # kept back for the summary at the end

has_gpu() {
    command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1 &&
        "$PY" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)' >/dev/null 2>&1
}
if [ $DRY = 0 ] && ! has_gpu; then
    echo "bench/gpu.sh: no NVIDIA GPU here (nvidia-smi lists none, or torch.cuda.is_available() is False with $PY):"
    echo "nothing to run. On a GPU machine: bash bench/gpu.sh OUT_DIR; to check the script here: --dry-run."
    exit 0
fi

mkdir -p "$OUT_ARG" || exit 1
OUT=$(cd "$OUT_ARG" && pwd)
WORK=$(mktemp -d "${TMPDIR:-/tmp}/fused_ls_gpu.XXXXXX")
SITE=$WORK/site   # carried wheels and fused_ls are installed here, first on PYTHONPATH
SRC=$WORK/src     # a copy of the checkout: the build never writes into the repository
LOG=$OUT/gpu.log
: >"$LOG"
SUMMARY=()

elapsed() { echo $(($(date +%s) - START)); }
log() { echo "[gpu.sh $(printf '%4d' "$(elapsed)")s] $*" | tee -a "$LOG"; }

# step NAME WANT_S LOGFILE CMD...: run CMD with its output in LOGFILE, for at most WANT_S
# seconds or what is left of the budget. On time-out it gets SIGINT first (pytest and the
# bench then write what they have), SIGKILL 20 s later. Returns CMD's status (124: timed out).
step() {
    local name=$1 want=$2 logfile=$3
    shift 3
    local left=$((BUDGET - $(elapsed) - RESERVE))
    local cap=$((want < left ? want : left))
    if [ "$cap" -lt 10 ]; then
        log "$name: SKIPPED, the time budget is spent"
        SUMMARY+=("$name: skipped (budget)")
        return 125
    fi
    log "$name: start, cap ${cap}s: $*"
    local t0=$(date +%s) rc
    echo "### $name: $*" >>"$logfile"
    timeout -s INT -k 20 "$cap" "$@" >>"$logfile" 2>&1
    rc=$?
    local took=$(($(date +%s) - t0))
    [ $rc = 124 ] && log "$name: TIMED OUT after ${took}s" || log "$name: exit $rc after ${took}s"
    SUMMARY+=("$name: exit $rc, ${took}s$([ $rc = 124 ] && echo ' (timed out)')")
    return $rc
}

export PYTHONUNBUFFERED=1 PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_INPUT=1
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1  # nothing is reachable: fail fast
export FUSED_LS_CACHE_DIR=$WORK/cache TRITON_CACHE_DIR=$WORK/triton-cache
unset FUSED_LS_BACKEND
# the installed copy is outside the checkout: the result tables take the commit from here
FUSED_LS_GIT_COMMIT=$(git -C "$REPO" rev-parse --short HEAD 2>/dev/null) && export FUSED_LS_GIT_COMMIT

# ---------------------------------------------------------------------------- 1. environment
log "fused_ls GPU run: repo $REPO, out $OUT, work $WORK, budget ${BUDGET}s$([ $DRY = 1 ] && echo ', DRY RUN on the CPU')"
{
    echo "### date: $(date -u +%Y-%m-%dT%H:%M:%SZ)"
    echo "### git: $(git -C "$REPO" rev-parse HEAD 2>/dev/null || echo 'not a git checkout')"
    echo "### uname: $(uname -a)"
    echo "### cpus: $(nproc)"
    if command -v nvidia-smi >/dev/null 2>&1; then
        nvidia-smi 2>&1
        nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.mem,clocks.max.sm,clocks.max.mem,power.limit,temperature.gpu,compute_mode --format=csv 2>&1
    else
        echo "nvidia-smi: not found"
    fi
    "$PY" - <<'EOF' 2>&1
import importlib.metadata as md, sys, torch
print("python", sys.version.split()[0], sys.executable)
print("torch", torch.__version__, "cuda", torch.version.cuda, "available", torch.cuda.is_available())
for dist in ("triton", "pytest", "pytest-benchmark", "pytest-xdist", "pytest-timeout", "matplotlib", "tqdm",
             "transformers", "setuptools", "ninja"):
    try:
        print(dist, md.version(dist))
    except md.PackageNotFoundError:
        print(dist, "not installed")
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    print(f"device {p.name}, {p.total_memory / 2**30:.1f} GiB, {p.multi_processor_count} SMs, sm_{p.major}{p.minor}")
EOF
    command -v nvcc >/dev/null 2>&1 && nvcc --version | tail -2 || echo "nvcc: not on PATH"
} >>"$LOG" 2>&1
grep -E "^(python|torch|triton|device) " "$LOG" | sed 's/^/    /'

# ---------------------------------------------------------------------------- 2. carried wheels
mkdir -p "$SITE" "$SRC"
export PYTHONPATH=$SITE${PYTHONPATH:+:$PYTHONPATH}
if compgen -G "$REPO/.whl/*.whl" >/dev/null; then
    step wheels 60 "$OUT/build.log" "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir \
        --upgrade --target "$SITE" "$REPO"/.whl/*.whl
else
    log "wheels: none carried in .whl/ (Liger is benchmarked only when its wheel is; see bench/README.md)"
fi

# ---------------------------------------------------------------------------- 3. build and install
tar -C "$REPO" --exclude=./.git --exclude=./.whl --exclude=./build --exclude=./dist --exclude='*.so' \
    --exclude='*.egg-info' --exclude=__pycache__ --exclude=./bench/out --exclude=./bench/results -cf - . |
    tar -C "$SRC" -xf -
if [ $DRY = 0 ]; then
    # the chip's own architecture only: faster to build, and native sm_XX code
    export TORCH_CUDA_ARCH_LIST=$("$PY" -c 'import torch; print("%d.%d" % torch.cuda.get_device_capability())')
fi
export MAX_JOBS=$(nproc)
if ! step build "${FUSED_LS_GPU_BUILD_S:-200}" "$OUT/build.log" \
    "$PY" -m pip install -v --no-deps --no-build-isolation --no-index --target "$SITE" "$SRC"; then
    log "build: FAILED (see build.log); installing the pure-Python package so Triton and eager still run"
    rm -rf "$SRC/build"  # nothing half-built may slip into the fallback install
    export FUSED_LS_NO_NATIVE=1
    step build-python-only 60 "$OUT/build.log" \
        "$PY" -m pip install --no-deps --no-build-isolation --no-index --target "$SITE" --upgrade "$SRC"
    unset FUSED_LS_NO_NATIVE
fi
export FUSED_LS_NO_JIT=1  # what the install did not build must not be built again, untimed, mid-test
mv "$SRC/fused_ls" "$SRC/fused_ls.source"  # so nothing imports the unbuilt source tree instead
cd "$WORK" || exit 1
"$PY" - >>"$LOG" 2>&1 <<'EOF'
import fused_ls, torch
from fused_ls import native
device = "cuda" if torch.cuda.is_available() else "cpu"
print("fused_ls from", fused_ls.__file__)
print("native extension:", native.load(), "with CUDA:", native.has_cuda())
print("available_backends(%r):" % device, fused_ls.available_backends(device))
EOF
tail -3 "$LOG" | sed 's/^/    /'

# ---------------------------------------------------------------------------- 4. tests
if [ "${FUSED_LS_GPU_SKIP_TESTS:-0}" != 1 ]; then
    PYTEST_ARGS=(-q -ra -p no:cacheprovider --junitxml="$OUT/junit.xml")
    "$PY" -c 'import xdist' 2>/dev/null && [ $DRY = 0 ] && PYTEST_ARGS+=(-n 4)
    "$PY" -c 'import pytest_timeout' 2>/dev/null && PYTEST_ARGS+=(--timeout=150)
    if [ $DRY = 1 ]; then
        TEST_DEVICE=cpu
        TEST_PATHS=("$SRC/tests/test_bench_cli.py")
    else
        TEST_DEVICE=cuda
        TEST_PATHS=("$SRC/tests")
    fi
    # TRITON_INTERPRET=0, not unset: tests/conftest.py turns the interpreter on when it is unset.
    export TRITON_INTERPRET=0 FUSED_LS_TEST_DEVICE=$TEST_DEVICE
    # the benchmark keeps at least BENCH_MIN_S of the budget, whatever the build took
    TEST_CAP=$((BUDGET - $(elapsed) - RESERVE - ${FUSED_LS_GPU_BENCH_MIN_S:-150}))
    TEST_CAP=$((TEST_CAP < ${FUSED_LS_GPU_TEST_S:-120} ? TEST_CAP : ${FUSED_LS_GPU_TEST_S:-120}))
    step tests "$TEST_CAP" "$OUT/tests.log" \
        "$PY" -m pytest "${TEST_PATHS[@]}" "${PYTEST_ARGS[@]}" ${FUSED_LS_GPU_PYTEST_ARGS:-}
    tail -1 "$OUT/tests.log" | sed 's/^/    /'
fi

# ---------------------------------------------------------------------------- 5. benchmark
unset TRITON_INTERPRET FUSED_LS_TEST_DEVICE
BENCH_ARGS=(--out "$OUT")
if [ $DRY = 1 ]; then
    BENCH_ARGS+=(--device cpu --shapes 256x4096:fp32,64x50000:bf16 --repeats 2 --warmup 1 --providers eager,native,native-inplace)
else
    TRITON_LAUNCHES=$("$PY" -c "from fused_ls.bench.xent import TRITON_LAUNCHES as L; print(','.join('triton:' + n for n in L))")
    SHAPES=16384x32000:bf16,16384x50257:bf16,16384x128256:bf16,16384x256000:bf16,16384x128256:fp32
    BENCH_ARGS+=(--device cuda --shapes "$SHAPES" \
        --providers "eager,compile,triton,triton-inplace,triton-accuracy,$TRITON_LAUNCHES,native,native-inplace,liger")
fi
LINEAR_S=${FUSED_LS_GPU_LINEAR_S:-90}
BENCH_CAP=$((BUDGET - $(elapsed) - RESERVE - LINEAR_S))
# the bench starts no new case after --budget-s, leaving time to finish the one it is in
step bench "$BENCH_CAP" "$LOG" "$PY" -m fused_ls bench "${BENCH_ARGS[@]}" --budget-s $((BENCH_CAP - 75 > 30 ? BENCH_CAP - 75 : 30)) \
    ${FUSED_LS_GPU_BENCH_ARGS:-}

# ---------------------------------------------------------------------------- 6. linear head
# pytest prints the table when it ends, and SIGINT (the step's time-out) ends it with what it has.
if [ $DRY = 1 ]; then
    LINEAR_ENV=(FUSED_LS_BENCH_LINEAR_SHAPES=64x32x1000 FUSED_LS_BENCH_LINEAR_DTYPES=fp32)
    LINEAR_ARGS=(--bench-device cpu --bench-rounds 2)
else
    LINEAR_ENV=()
    LINEAR_ARGS=(--bench-device cuda --bench-rounds 5)
fi
step linear "$((BUDGET - $(elapsed) - RESERVE))" "$LOG" env "${LINEAR_ENV[@]}" FUSED_LS_BENCH_LINEAR_OUT="$OUT/linear.md" \
    "$PY" -m pytest "$SRC/bench/test_linear.py" -q -s -p no:cacheprovider "${LINEAR_ARGS[@]}"

# ---------------------------------------------------------------------------- summary
command -v nvidia-smi >/dev/null 2>&1 &&
    nvidia-smi --query-gpu=clocks.sm,clocks.mem,temperature.gpu,power.draw --format=csv >>"$LOG" 2>&1
GPU_NAME=$("$PY" -c 'import torch; print(torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu")' 2>/dev/null)
SLUG=$(echo "${GPU_NAME:-gpu}" | tr '[:upper:]' '[:lower:]' | sed -e 's/nvidia//g' -e 's/[^a-z0-9]\+/-/g' -e 's/^-//' -e 's/-$//')
{
    echo
    echo "==================== fused_ls GPU run summary ($(elapsed)s) ===================="
    printf '  %s\n' "${SUMMARY[@]}"
    [ -f "$OUT/tests.log" ] && echo "  tests: $(grep -E '(passed|failed|error)' "$OUT/tests.log" | tail -1)"
    echo "  outputs in $OUT: $(cd "$OUT" && ls | tr '\n' ' ')"
    echo "  commit them under bench/results/${SLUG}-$(date -u +%Y-%m-%d)/ (see bench/README.md)"
    [ -f "$OUT/bench.md" ] && sed -n '/^| case/,$p' "$OUT/bench.md"
    [ -f "$OUT/linear.md" ] && cat "$OUT/linear.md"
} | tee -a "$LOG"
rm -rf "$WORK"
exit 0
