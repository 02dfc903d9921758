"""Measure FlowGMM against every baseline on the synthetic 2-D sets and scikit-learn's digits / breast-cancer sets with
few labels, over several seeds; print the markdown table of experiments/RESULTS.md and write the per-seed numbers.

Rows "FlowGMM" and "FlowGMM, labels only" start the component means at the labeled class means in latent space, spread
to at least 4 sigma apart (:func:`flowgmm_fast.semisup.init_means_from_labeled`); "FlowGMM, reference random means"
uses the original's fixed random means (REFERENCE.md) with everything else equal.

Per seed: the labeled split (balanced), the flow's initialisation and the neural baselines change; the data set and the
train/test split stay fixed (seed 0 for the generators and the sklearn split), so the spread measures the labels and the
training, not the data.

    python experiments/tabular_results.py --seeds 0 1 2 --out outputs/tabular_results
    python experiments/tabular_results.py --datasets two_moons digits --seeds 0 --quick
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time

import numpy as np
import torch

from flowgmm_fast import baselines as B
from flowgmm_fast.data.tabular import TabularData, balanced_labeled_indices, load_sklearn, semisup_labels
from flowgmm_fast.data.toy import make_toy
from flowgmm_fast.semisup import FitConfig, accuracy, build_tabular_flowgmm, fit_flowgmm, init_means_from_labeled

# name: (number of labels, FlowGMM model kwargs, FlowGMM steps, unlabeled weight)
TOY_MODEL = dict(num_coupling_layers=5, hidden_dim=128, dropout=0.2)
SETTINGS = {
    "two_moons": (6, TOY_MODEL, 400, 1.0),
    "circles": (6, TOY_MODEL, 400, 1.0),
    "eight_gaussians": (16, TOY_MODEL, 400, 1.0),
    "pinwheel": (10, TOY_MODEL, 400, 1.0),
    "digits": (100, dict(num_coupling_layers=4, hidden_dim=128, dropout=0.5), 300, 1.0),
    "breast_cancer": (20, dict(num_coupling_layers=4, hidden_dim=128, dropout=0.5), 300, 1.0),
}
FLOWGMM_ROWS = ("FlowGMM", "FlowGMM, labels only", "FlowGMM, reference random means")


def load(name: str) -> TabularData:
    if name in ("digits", "breast_cancer"):
        return load_sklearn(name, test_fraction=0.3, seed=0)
    x, y = make_toy(name, 1000, seed=0)
    xt, yt = make_toy(name, 1000, seed=1000)
    return TabularData(x, y, xt, yt, name)


def run_flowgmm(data: TabularData, labels: np.ndarray, seed: int, model_kwargs: dict, steps: int, uw: float,
                means: str) -> float:
    x, lab = torch.from_numpy(data.x_train), torch.from_numpy(labels)
    model = build_tabular_flowgmm(data.dim, data.num_classes, seed=seed, **model_kwargs)
    if means == "labeled":
        init_means_from_labeled(model, x, lab)
    cfg = FitConfig(steps=steps, lr=1e-3, batch_size=min(5000, data.x_train.shape[0]), unlabeled_weight=uw,
                    seed=seed, log_every=50)
    fit_flowgmm(model, x, lab, cfg, progress=False)
    return accuracy(model, torch.from_numpy(data.x_test), torch.from_numpy(data.y_test))


def run_dataset(name: str, seeds, quick: bool) -> dict:
    data = load(name)
    n_labels, model_kwargs, steps, uw = SETTINGS[name]
    if quick:
        steps = 5
    means = "labeled"
    nn_cfg = B.NNConfig(steps=20 if quick else 500, hidden_dim=128)
    rows: dict[str, list[float]] = {}
    for seed in seeds:
        labels = semisup_labels(data.y_train, balanced_labeled_indices(data.y_train, n_labels, seed=seed))
        t0 = time.perf_counter()
        rows.setdefault("FlowGMM", []).append(run_flowgmm(data, labels, seed, model_kwargs, steps, uw, means))
        rows.setdefault("FlowGMM, labels only", []).append(
            run_flowgmm(data, labels, seed, model_kwargs, steps, 0.0, means))
        rows.setdefault("FlowGMM, reference random means", []).append(
            run_flowgmm(data, labels, seed, model_kwargs, steps, uw, "reference"))
        for method, acc in B.run_baselines(data.x_train, labels, data.x_test, data.y_test, seed=seed,
                                           nn_config=nn_cfg).items():
            rows.setdefault(method, []).append(acc)
        print(f"  {name} seed {seed}: {time.perf_counter() - t0:.1f} s", file=sys.stderr, flush=True)
    return {"labels": n_labels, "train": int(data.x_train.shape[0]), "test": int(data.x_test.shape[0]),
            "dim": data.dim, "classes": data.num_classes, "means_init": means, "steps": steps, "rows": rows}


def format_table(results: dict) -> str:
    names = list(results)
    methods = [m for m in (*FLOWGMM_ROWS, *B.BASELINES) if any(m in results[n]["rows"] for n in names)]
    head = "| method | " + " | ".join(f"{n} ({results[n]['labels']} labels)" for n in names) + " |"
    lines = [head, "|" + " --- |" * (len(names) + 1)]
    for m in methods:
        cells = []
        for n in names:
            v = results[n]["rows"].get(m)
            cells.append("n/a" if v is None else f"{100 * np.mean(v):.1f} ± {100 * np.std(v):.1f}")
        lines.append(f"| {m} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--datasets", nargs="+", default=list(SETTINGS), choices=list(SETTINGS))
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    p.add_argument("--out", default="outputs/tabular_results")
    p.add_argument("--quick", action="store_true", help="a few steps only (pipeline check)")
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    os.makedirs(args.out, exist_ok=True)
    try:  # the code this run loaded: taken before training, not after
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                check=False).stdout.strip() or "unknown"
    except OSError:
        commit = "unknown"
    t0 = time.perf_counter()
    results = {name: run_dataset(name, args.seeds, args.quick) for name in args.datasets}
    wall = time.perf_counter() - t0
    meta = {"seeds": args.seeds, "wall_s": round(wall, 1), "commit": commit, "torch": torch.__version__,
            "cpu": platform.processor() or platform.machine(), "threads": args.threads, "quick": args.quick}
    with open(os.path.join(args.out, "results.json"), "w") as f:
        json.dump({"meta": meta, "results": results}, f, indent=1)
    table = format_table(results)
    print(table)
    print(f"\nmean ± std of test accuracy (%) over seeds {args.seeds}; wall {wall:.0f} s; commit {commit}; "
          f"torch {torch.__version__}, {args.threads} thread(s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
