#!/usr/bin/env bash
# CPU benchmark suite: op micro-benchmarks, training steps, then the report (tables, plot, README block).
# Under 10 minutes on a 2-core machine. Run from anywhere: bash benchmarks/run_cpu.sh
# Writes benchmarks/results/ops_cpu_*.json, train_step_cpu_*.json, report.md, perf_cpu.png and README's perf block.
# Environment: PYTHON (default .venv/bin/python, else python3); BENCH_BUDGET_S (seconds of timing per op case, 2).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
[ -x "$PY" ] || PY=python3
# The Triton CPU interpreter is a test vehicle: it must not be switched on for timing.
unset TRITON_INTERPRET
export PYTHONUNBUFFERED=1
start=$SECONDS
"$PY" -c "import flowgmm_fast as f; print('backends available:', f.available_backends())"
# deadlines (seconds from each script's start) keep a loaded machine inside 10 minutes: the targets run first
"$PY" -m benchmarks.bench_ops --device cpu --suite cpu --budget "${BENCH_BUDGET_S:-2}" --deadline-s 300
echo "# ops done in $((SECONDS - start)) s"
"$PY" -m benchmarks.bench_train_step --device cpu --suite cpu --rounds 4 --deadline-s $((480 - (SECONDS - start)))
echo "# training steps done in $((SECONDS - start)) s"
"$PY" -m benchmarks.report
echo "# CPU suite finished in $((SECONDS - start)) s"
