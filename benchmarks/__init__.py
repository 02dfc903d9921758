"""Benchmarks of flowgmm_fast: op micro-benchmarks (:mod:`benchmarks.bench_ops`), training steps
(:mod:`benchmarks.bench_train_step`), the original code's formulation as a baseline (:mod:`benchmarks.baseline_original`)
and the report (:mod:`benchmarks.report`). Run from the repository root, e.g. ``python -m benchmarks.bench_ops``;
``benchmarks/run_cpu.sh`` and ``benchmarks/gpu_check.sh`` run whole suites. See benchmarks/README.md.
"""
