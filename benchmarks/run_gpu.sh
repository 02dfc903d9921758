#!/usr/bin/env bash
# GPU benchmark suite: op micro-benchmarks and training steps on CUDA, then the report. Each part stops starting new
# cases at its deadline, so the whole stays inside the budget: BENCH_BUDGET_S seconds (default 300) split between ops
# (45%) and training steps (the rest, less a reserve for timing the last config and the report).
# Usage (repository root, package built): bash benchmarks/run_gpu.sh [RESULTS_DIR]   (default benchmarks/results)
# Environment: PYTHON (default python3).
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
RESULTS=${1:-benchmarks/results}
BUDGET=${BENCH_BUDGET_S:-300}
export PYTHONUNBUFFERED=1
unset TRITON_INTERPRET
mkdir -p "$RESULTS"
start=$SECONDS
ops_deadline=$((BUDGET * 45 / 100))
timeout -k 10 $((ops_deadline + 120)) "$PY" -m benchmarks.bench_ops --device cuda --suite gpu \
    --deadline-s "$ops_deadline" --out-dir "$RESULTS" || echo "# bench_ops exited with $?"
left=$((BUDGET - (SECONDS - start) - 60))
[ "$left" -lt 30 ] && left=30
timeout -k 10 $((left + 150)) "$PY" -m benchmarks.bench_train_step --device cuda --suite gpu \
    --deadline-s "$left" --out-dir "$RESULTS" || echo "# bench_train_step exited with $?"
echo "# GPU benchmarks finished in $((SECONDS - start)) s"
