"""The baselines of FlowGMM's tabular / text experiments on exactly FlowGMM's features and label splits, one table.

kNN, logistic regression, label spreading, a 3-layer MLP with dropout (labels only) and the Pi-model
(:mod:`flowgmm_fast.baselines`). Data and labels are chosen with the same flags as
``experiments/train_semisup_flowgmm_tabular.py`` (same loaders, same standardisation, same balanced split for a
seed or the same --split file), so the numbers compare with its test accuracy.

    python experiments/train_semisup_text_baselines.py --dataset ag_news --features data/ag_news.npz --seeds 0 1 2
    python experiments/train_semisup_text_baselines.py --dataset digits --seeds 0 1 2 --methods knn label_spreading
"""

from __future__ import annotations

import argparse
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from train_semisup_flowgmm_tabular import PRESETS, load_data  # noqa: E402

from flowgmm_fast import baselines as B  # noqa: E402
from flowgmm_fast.data import tabular as T  # noqa: E402


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--dataset", required=True, choices=list(PRESETS))
    p.add_argument("--data-root")
    p.add_argument("--features")
    p.add_argument("--label-column", default="-1")
    p.add_argument("--test-fraction", type=float)
    p.add_argument("--split", help="labeled-index file (then one seed: the split is fixed)")
    p.add_argument("--num-labeled", type=int, help="default: the dataset's preset")
    p.add_argument("--max-train", type=int)
    p.add_argument("--seeds", nargs="+", type=int, default=[0])
    p.add_argument("--methods", nargs="+", default=list(B.BASELINES), choices=list(B.BASELINES))
    p.add_argument("--nn-steps", type=int, default=500, help="training steps of the MLP and the Pi-model")
    p.add_argument("--no-progress", action="store_true")
    args = p.parse_args(argv)
    if args.num_labeled is None:
        args.num_labeled = PRESETS[args.dataset]["num_labeled"]
    if args.split is None and args.num_labeled is None:
        p.error("give --split FILE or --num-labeled N")
    if args.dataset == "custom" and args.features is None:
        p.error("--dataset custom needs --features FILE")
    return args


def main(argv=None) -> dict:
    args = parse_args(argv)
    data = load_data(args)
    if args.max_train is not None:
        data = T.TabularData(data.x_train[:args.max_train], data.y_train[:args.max_train], data.x_test, data.y_test,
                             data.name)
    results: dict[str, list[float]] = {m: [] for m in args.methods}
    for seed in args.seeds:
        if args.split is not None:
            idx = T.load_split(args.split, num_train=data.x_train.shape[0])
        else:
            idx = T.balanced_labeled_indices(data.y_train, args.num_labeled, seed=seed)
        labels = T.semisup_labels(data.y_train, idx)
        accs = B.run_baselines(data.x_train, labels, data.x_test, data.y_test, methods=args.methods, seed=seed,
                               nn_config=B.NNConfig(steps=args.nn_steps))
        for m, a in accs.items():
            results[m].append(a)
    n_labels = int(idx.size)
    print(f"| method | {args.dataset} ({n_labels} labels), test accuracy % (mean ± std over seeds {args.seeds}) |")
    print("| --- | --- |")
    for m, v in results.items():
        print(f"| {m} | {100 * np.mean(v):.1f} ± {100 * np.std(v):.1f} |")
    return results


if __name__ == "__main__":
    main()
    sys.exit(0)
