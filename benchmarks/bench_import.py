"""Import time: ``import flowgmm_fast`` against ``import torch`` (the target: at most 1.3x).

Each sample is a fresh Python process that times one import with ``time.perf_counter`` (so interpreter start-up is
left out and module caches are cold at the Python level, warm at the OS level like any second start). The two imports
are sampled side by side: every round starts one process of each, in a shuffled order, so load from other processes
on a shared machine hits both alike. Reported: the median (and 20/80% quantiles) over ``--rounds`` rounds (default 5)
and the ratio of the medians; the flowgmm_fast processes also record which heavy modules the import pulled in
(``torch._dynamo`` must not be among them: it alone costs about as much as the rest of ``import torch``).

Usage: ``python -m benchmarks.bench_import [--rounds 5]`` from the repository root; measures the flowgmm_fast of this
tree (the root goes first on PYTHONPATH). Writes ``benchmarks/results/import_<device>_<date>_<commit>.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys

import torch

from . import common

TARGET_RATIO = 1.3
HEAVY = ("torch._dynamo", "torch._inductor", "triton", "flowgmm_fast._C", "numpy", "scipy")
_PROBE = """
import sys, time
t0 = time.perf_counter()
import {module}
dt = time.perf_counter() - t0
import json
print(json.dumps({{"seconds": dt, "heavy": [m for m in {heavy!r} if m in sys.modules]}}))
"""


def sample(module: str, env: dict[str, str]) -> dict:
    """One fresh process importing ``module``: {"seconds", "heavy"}."""
    code = _PROBE.format(module=module, heavy=HEAVY)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=common.ROOT,
                         timeout=300)
    if out.returncode != 0:
        raise RuntimeError(f"`import {module}` failed:\n{out.stderr}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--rounds", type=int, default=5, help="process starts of each import (median over them)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out-dir", default=None, help="results folder (default benchmarks/results)")
    p.add_argument("--no-write", action="store_true", help="print only, write no results file")
    args = p.parse_args(argv)
    if args.rounds < 1:
        raise SystemExit("--rounds must be at least 1")
    env = {k: v for k, v in os.environ.items() if k not in ("FLOWGMM_FAST_BACKEND",)}
    env["PYTHONPATH"] = os.pathsep.join([str(common.ROOT), *filter(None, [env.get("PYTHONPATH")])])
    meta = common.run_metadata(torch.device("cpu"), argv if argv is not None else sys.argv)
    modules = ["torch", "flowgmm_fast"]
    samples: dict[str, list[float]] = {m: [] for m in modules}
    heavy: dict[str, list[str]] = {}
    rng = random.Random(args.seed)
    for _ in range(args.rounds):
        rng.shuffle(modules)
        for module in modules:
            s = sample(module, env)
            samples[module].append(s["seconds"] * 1e3)
            heavy[module] = s["heavy"]
    records = [{"module": m, **common.summarize(v), "samples_ms": v, "heavy_modules_loaded": heavy[m]}
               for m, v in sorted(samples.items(), key=lambda kv: kv[0] != "torch")]
    ratio = records[1]["median_ms"] / records[0]["median_ms"]
    summary = {"ratio_median": ratio, "target_ratio": TARGET_RATIO, "met": ratio <= TARGET_RATIO}
    for r in records:
        print(f"import {r['module']:<13} median {common.fmt_ms(r['median_ms'])} ms "
              f"[{common.fmt_ms(r['q20_ms'])}, {common.fmt_ms(r['q80_ms'])}] over {r['n']} process starts; "
              f"heavy modules loaded: {', '.join(r['heavy_modules_loaded']) or 'none'}")
    print(f"import flowgmm_fast / import torch = {ratio:.2f}x (target <= {TARGET_RATIO}x: "
          f"{'met' if summary['met'] else 'NOT met'}); load average {meta['load_average_1m']}")
    return common.finish_summary_run("import", meta, records, summary, args.out_dir, not args.no_write)


if __name__ == "__main__":
    main()
