#!/usr/bin/env bash
# ONE script for a lent GPU machine (H100 / H200): build the extension, run benchmarks/gpu_check.py (parity against
# float64 at the real sizes, edge cases, compiled and CUDA-graph training steps, bitwise repeats), the test suite on
# CUDA, the op and training-step benchmarks, and write the results files. Budget: under 9 minutes in all
# (GPU_CHECK_BUDGET_S, default 500 s of work after the build starts; the build itself is capped at 240 s; the checks
# take at most 35% of what is left after the build, 60-180 s, and the test and benchmark caps shrink accordingly).
#
#   device tool:  run(command="bash benchmarks/gpu_check.sh", timeout_s=600)
#   here (no GPU): bash benchmarks/gpu_check.sh --cpu-dry-run    # gpu_check.py's same code paths on the CPU at tiny
#                  shapes (Triton under its interpreter); no build, no tests, no benchmarks; about a minute on 2 cores
#
# Writes into $OUT (the device tool's folder; benchmarks/results/gpu_run when OUT is unset; with --cpu-dry-run a new
# temporary folder), at most 8 files:
#   build.log  tests.log (gpu_check.py's log, then pytest's)  bench.log  gpu_check_cuda-*.json  ops_cuda-*.json
#   train_step_cuda-*.json  report.md  perf_cuda-*.png
# and the JSON files into benchmarks/results/ too. The device machine keeps nothing: copy the three JSON files from
# the tool's files_at folder into benchmarks/results/, run `python -m benchmarks.report` here, and commit them.
# Uses the machine's python3 (its own torch/triton; nothing is installed from outside: it has no network).
# Where the copied tree has no .git, pass the commit: FLOWGMM_BENCH_COMMIT=$(git rev-parse HEAD) bash benchmarks/gpu_check.sh
# Exit status: gpu_check.py's (1 when a check failed); the tests and benchmarks report in their logs.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
DRY=0
for arg in "$@"; do
    case "$arg" in
        --cpu-dry-run) DRY=1 ;;
        -h|--help) sed -n '2,22p' "$0"; exit 0 ;;
        *) echo "gpu_check.sh: unknown argument $arg (expected --cpu-dry-run)" >&2; exit 2 ;;
    esac
done
export PYTHONUNBUFFERED=1
if [ "$DRY" = 1 ]; then
    OUT=${OUT:-$(mktemp -d "${TMPDIR:-/tmp}/gpu_check_dry.XXXXXX")}
    mkdir -p "$OUT"
    export TRITON_INTERPRET=1
    t0=$SECONDS
    timeout -k 10 170 "$PY" -m benchmarks.gpu_check --cpu-dry-run --out "$OUT" --deadline-s 150 2>&1 \
        | tee "$OUT/tests.log"
    status=${PIPESTATUS[0]}
    echo "# gpu_check.sh --cpu-dry-run: gpu_check.py exited with $status after $((SECONDS - t0)) s; files in $OUT"
    exit "$status"
fi
OUT=${OUT:-$PWD/benchmarks/results/gpu_run}
mkdir -p "$OUT"
BUDGET=${GPU_CHECK_BUDGET_S:-500}
unset TRITON_INTERPRET
start=$SECONDS
left() { echo $((BUDGET - (SECONDS - start))); }

# 1. environment + build (CUDA kernels for the GPU's own architecture only, all cores)
{
    date -u; nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.mem --format=csv
    nvcc --version | tail -2
    "$PY" -c "import torch, triton; print('torch', torch.__version__, 'CUDA', torch.version.cuda, 'triton', triton.__version__, torch.cuda.get_device_name())"
    git log -1 --format='commit %H %s' 2>/dev/null || echo "no .git here; FLOWGMM_BENCH_COMMIT=${FLOWGMM_BENCH_COMMIT:-unset}"
} > "$OUT/build.log" 2>&1
NVCC=$(command -v nvcc || true)
export CUDA_HOME=${CUDA_HOME:-${NVCC:+$(dirname "$(dirname "$NVCC")")}}
CC_ARCH=$("$PY" -c "import torch; print('%d.%d' % torch.cuda.get_device_capability())" 2>/dev/null || echo 9.0)
export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-$CC_ARCH} FLOWGMM_FAST_BUILD_CUDA=1 MAX_JOBS=${MAX_JOBS:-$(nproc)}
echo "# build: CUDA_HOME=$CUDA_HOME TORCH_CUDA_ARCH_LIST=$TORCH_CUDA_ARCH_LIST MAX_JOBS=$MAX_JOBS" >> "$OUT/build.log"
b0=$SECONDS
timeout -k 10 240 "$PY" -m pip install --no-build-isolation --no-deps --no-index -e . >> "$OUT/build.log" 2>&1
status=$?
echo "# build exited with $status after $((SECONDS - b0)) s" | tee -a "$OUT/build.log"
"$PY" -c "import flowgmm_fast as f; from flowgmm_fast import _backend as b; print('backends', f.available_backends(), {n: b.unavailable_reason(n) for n in ('triton', 'native')})" 2>&1 | tee -a "$OUT/build.log"

# 2. the checks pytest does not give (benchmarks/gpu_check.py): at most 35% of what is left, 60-180 s; checks not
#    started by the deadline are recorded as skipped, and the results file is rewritten after every check
cap=$(( $(left) * 35 / 100 )); [ "$cap" -gt 180 ] && cap=180; [ "$cap" -lt 60 ] && cap=60
echo "# gpu_check.py for at most $cap s" | tee "$OUT/tests.log"
timeout -k 10 "$cap" "$PY" -m benchmarks.gpu_check --out "$OUT" --deadline-s $((cap - 25)) >> "$OUT/tests.log" 2>&1
check_status=$?
echo "# gpu_check.py exited with $check_status" | tee -a "$OUT/tests.log"
grep -E "^\[fail\]|^gpu_check: " "$OUT/tests.log" || true
cp "$OUT"/gpu_check_*.json benchmarks/results/ 2>/dev/null

# 3. tests on CUDA: the op suites first (verbose, so a cut-off log still says which tests passed), then the rest
OPS_TESTS=$(ls tests/test_*ops*.py tests/test_triton_model.py 2>/dev/null | tr '\n' ' ')
IGNORES=$(for f in $OPS_TESTS; do printf -- '--ignore=%s ' "$f"; done)
cap=$(( $(left) * 25 / 100 )); [ "$cap" -gt 100 ] && cap=100
echo "# tests: op suites ($OPS_TESTS) for at most $cap s" | tee -a "$OUT/tests.log"
# shellcheck disable=SC2086
timeout -k 10 "$cap" "$PY" -m pytest $OPS_TESTS -v -rfEs -p no:cacheprovider --durations=10 >> "$OUT/tests.log" 2>&1
echo "# op tests exited with $?" | tee -a "$OUT/tests.log"
cap=$(( $(left) * 12 / 100 )); [ "$cap" -gt 45 ] && cap=45
echo "# tests: the rest of tests/ for at most $cap s" | tee -a "$OUT/tests.log"
# shellcheck disable=SC2086
timeout -k 10 "$cap" "$PY" -m pytest tests $IGNORES -v -rfEs -p no:cacheprovider --durations=10 >> "$OUT/tests.log" 2>&1
echo "# other tests exited with $?" | tee -a "$OUT/tests.log"
grep -E "passed|failed|error" "$OUT/tests.log" | grep -E "^=+ " || true

# 4. benchmarks into $OUT, then copies into benchmarks/results/
bench=$(( $(left) - 30 )); [ "$bench" -lt 90 ] && bench=90
BENCH_BUDGET_S=$bench bash benchmarks/run_gpu.sh "$OUT" > "$OUT/bench.log" 2>&1
tail -n 60 "$OUT/bench.log"
cp "$OUT"/ops_cuda-*.json "$OUT"/train_step_cuda-*.json benchmarks/results/ 2>/dev/null

# 5. report of this run only (the README is regenerated where the results are committed)
"$PY" -m benchmarks.report --results-dir "$OUT" --no-readme
sed -n '/Targets of the issues/,/^Ops/p' "$OUT/report.md"
echo "# gpu_check finished in $((SECONDS - start)) s; files in $OUT"
exit "$check_status"
