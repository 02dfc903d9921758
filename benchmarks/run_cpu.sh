#!/usr/bin/env bash
# CPU benchmark suite: op micro-benchmarks, training steps, then the report (tables, plot, README block).
# Under 10 minutes on a 2-core machine. Run from anywhere: bash benchmarks/run_cpu.sh
# Writes benchmarks/results/ops_cpu-<N>t_*.json, train_step_cpu-<N>t_*.json, report.md, perf_cpu-<N>t.png and the
# README perf block.
# Environment: PYTHON (default .venv/bin/python, else python3); BENCH_BUDGET_S (seconds of timing per op case, 2);
# BENCH_THREADS (torch threads; default torch's choice). On a machine shared with other busy processes, multithreaded
# CPU timings are dominated by preemption at OpenMP barriers (seen here: a 0.14 ms squeeze timed at 16 ms with 2
# threads under load 6); BENCH_THREADS=1 gives per-core figures that stay meaningful. Files are tagged cpu-<N>t.
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
THREADS=(); [ -n "${BENCH_THREADS:-}" ] && THREADS=(--threads "$BENCH_THREADS")
uptime
"$PY" -m benchmarks.bench_ops --device cpu --suite cpu --budget "${BENCH_BUDGET_S:-2}" --deadline-s 300 "${THREADS[@]}"
echo "# ops done in $((SECONDS - start)) s"
"$PY" -m benchmarks.bench_train_step --device cpu --suite cpu --rounds 4 --deadline-s $((480 - (SECONDS - start))) \
    "${THREADS[@]}"
echo "# training steps done in $((SECONDS - start)) s"
"$PY" -m benchmarks.report
echo "# CPU suite finished in $((SECONDS - start)) s"
