"""Classical baselines on the image datasets of experiments/train_semisup_cons.py, on the same label split.

What a FlowGMM image run has to beat: the same training images, the same labeled indices (``--label_path``), scored
on the full test split. The features are the pixels scaled to [0, 1], flattened, then (``--pca K``, default 50)
projected on the first K principal components fitted on every training image (no labels used):

    knn                    k-nearest neighbours on the labeled images only
    logistic_regression    L2 logistic regression on the labeled images only
    label_spreading        scikit-learn LabelSpreading on the kNN graph of all training images (labeled + unlabeled)

(``flowgmm_fast.baselines``: the same functions the tabular and text experiments use.)

    python experiments/image_baselines.py --dataset MNIST --data_path data/images/mnist \\
        --label_path data/labels/mnist/1000_balanced_labels/0.npz --out outputs/image_baselines/mnist_1000_0.json

Prints a Markdown table (test accuracy, wall seconds per method) and writes the same numbers as JSON to ``--out``.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import numpy as np
import torch

from flowgmm_fast.baselines import knn, label_spreading, logistic_regression
from flowgmm_fast.data import load_image_dataset, load_label_split
from flowgmm_fast.graph import pixel_pca
from flowgmm_fast.training.checkpoint import atomic_write_bytes

METHODS = {"knn": knn, "logistic_regression": logistic_regression, "label_spreading": label_spreading}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--dataset", required=True, help="MNIST, CIFAR10, SVHN or an IDX dataset's name (as prepared)")
    p.add_argument("--data_path", required=True, help="the prepared folder (train.npz / test.npz) or the raw files")
    p.add_argument("--label_path", required=True, help="a label split written by experiments/prepare_data.py")
    p.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    p.add_argument("--pca", type=int, default=50,
                   help="principal components kept (fitted on all training images, no labels); 0 = raw pixels")
    p.add_argument("--seed", type=int, default=0, help="seed of the PCA's randomised solver and of the methods")
    p.add_argument("--out", default=None, help="JSON file for the results (written atomically)")
    return p


def features(train_images: torch.Tensor, test_images: torch.Tensor, n_components: int, seed: int):
    """(train, test) float32 features: pixels / 255 flattened, then the first ``n_components`` principal components
    of the training images (0 keeps the pixels)."""
    try:
        x_tr, x_te = pixel_pca(train_images.numpy(), [test_images.numpy()], n_components, seed)
    except ValueError as exc:
        raise SystemExit(f"--pca: {exc}") from None
    return x_tr, x_te


def main(argv=None) -> dict:
    args = build_parser().parse_args(argv)
    if args.pca < 0:
        raise SystemExit(f"--pca must be >= 0, got {args.pca}")
    train = load_image_dataset(args.dataset, args.data_path, train=True)
    test = load_image_dataset(args.dataset, args.data_path, train=False)
    labeled = load_label_split(args.label_path, train)
    labels = np.full(len(train), -1, np.int64)
    labels[labeled] = train.labels.numpy()[labeled]
    t0 = time.perf_counter()
    x_tr, x_te = features(train.images, test.images, args.pca, args.seed)
    feature_s = time.perf_counter() - t0
    y_te = test.labels.numpy()
    results = {}
    for name in args.methods:
        t0 = time.perf_counter()
        pred = METHODS[name](x_tr, labels, x_te, seed=args.seed)
        results[name] = {"test_acc": float(np.mean(pred == y_te)), "wall_s": round(time.perf_counter() - t0, 2)}
    feats = f"PCA-{args.pca} of the pixels" if args.pca else "raw pixels"
    print(f"{train.dataset}: {len(train)} train ({labeled.size} labeled), {len(test)} test | features: {feats} "
          f"({feature_s:.1f} s)")
    print("| method | test acc | wall s |\n| --- | --- | --- |")
    for name, r in results.items():
        print(f"| {name} | {100 * r['test_acc']:.2f}% | {r['wall_s']:.1f} |")
    if args.out:
        payload = {"dataset": train.dataset, "label_path": str(args.label_path), "num_labeled": int(labeled.size),
                   "n_train": len(train), "n_test": len(test), "pca": args.pca, "seed": args.seed,
                   "feature_s": round(feature_s, 2), "results": results, "torch_threads": torch.get_num_threads(),
                   "python": platform.python_version(), "machine": platform.machine()}
        atomic_write_bytes(json.dumps(payload, indent=1).encode(), Path(args.out))
    return results


if __name__ == "__main__":
    main()
