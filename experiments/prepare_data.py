"""Prepare MNIST / CIFAR-10 / SVHN, or any dataset in MNIST's IDX format, for experiments/train_semisup_cons.py:
images and balanced label splits.

Writes, in the original repository's layout (paths relative to --out, default data/):
    images/<dataset>/train.npz, test.npz          uint8 images (N, C, H, W), int64 labels, the dataset name
    labels/<dataset>/<N>_balanced_labels/<seed>.npz   (MNIST, SVHN: labeled_indices, unlabeled_indices)
    labels/cifar10/<N>_balanced_labels/<seed>.txt     (one '<index>_<class>.png <class>' line per labeled image)
Each split has N/10 examples of every class, drawn by numpy.random.RandomState(seed): the same seed gives the same
split on every machine.

Sources: --source DIR with torchvision's on-disk files (MNIST IDX files, cifar-10-batches-py, SVHN *_32x32.mat),
or --download to fetch them with torchvision (needs internet) into <out>/downloads/<dataset>.

Any other --dataset name is read from --source as a dataset in MNIST's IDX format (train-images-idx3-ubyte,
train-labels-idx1-ubyte, t10k-images-idx3-ubyte, t10k-labels-idx1-ubyte, optionally .gz: Fashion-MNIST, KMNIST,
...); the name labels its folders and files, so its splits are never mistaken for MNIST's.

    python experiments/prepare_data.py --dataset MNIST --source ../shared/datasets/MNIST/raw
    python experiments/prepare_data.py --dataset CIFAR10 --download --num_labels 4000 --seeds 10
    python experiments/prepare_data.py --dataset fashion_mnist --source ~/data/FashionMNIST/raw --num_labels 1000
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from flowgmm_fast.data import (DATASETS, balanced_split, canonical_dataset_name, label_split_path, load_image_dataset,
                               save_label_split)

DEFAULT_LABELS = {"mnist": [100, 1000], "cifar10": [1000, 4000], "svhn": [1000]}  # other (IDX) datasets: 1000


def download(dataset: str, root: Path) -> Path:
    """Fetch the dataset with torchvision into ``root`` (its own on-disk format); returns the folder to read."""
    import torchvision

    root.mkdir(parents=True, exist_ok=True)
    if dataset == "mnist":
        for train in (True, False):
            torchvision.datasets.MNIST(str(root), train=train, download=True)
    elif dataset == "cifar10":
        # download and check the archive only: building torchvision's CIFAR10 dataset would unpickle the batches
        # with pickle.load; flowgmm_fast reads them with its restricted unpickler
        from torchvision.datasets.utils import download_and_extract_archive

        spec = torchvision.datasets.CIFAR10
        download_and_extract_archive(spec.url, str(root), filename=spec.filename, md5=spec.tgz_md5)
    else:
        for split in ("train", "test"):
            torchvision.datasets.SVHN(str(root), split=split, download=True)
    return root


def prepare(dataset: str, source: Path, out: Path, num_labels: list[int], seeds: list[int]) -> list[Path]:
    """Write the images and every (num_labels, seed) split; returns the paths written."""
    written = []
    train = load_image_dataset(dataset, source, train=True)
    test = load_image_dataset(dataset, source, train=False)
    name = train.dataset
    img_dir = out / "images" / name
    img_dir.mkdir(parents=True, exist_ok=True)
    for split, data in (("train", train), ("test", test)):
        path = img_dir / f"{split}.npz"
        np.savez(path, images=data.images.numpy(), labels=data.labels.numpy(), dataset=np.array(name))
        written.append(path)
    labels = train.labels.numpy()
    for n in num_labels:
        for seed in seeds:
            idx = balanced_split(labels, n, seed, num_classes=train.num_classes)
            path = label_split_path(out / "labels", name, n, seed)
            written.append(save_label_split(path, name, idx, labels[idx], seed=seed, num_train=len(train)))
    return written


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--dataset", required=True,
                   help="MNIST, CIFAR10, SVHN, or a name for a dataset in MNIST's IDX format (e.g. fashion_mnist)")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--source", type=Path, help="folder with torchvision's on-disk files (or the IDX files)")
    src.add_argument("--download", action="store_true",
                     help="download MNIST, CIFAR10 or SVHN with torchvision (needs internet)")
    p.add_argument("--out", type=Path, default=Path("data"))
    p.add_argument("--num_labels", type=int, nargs="+", default=None,
                   help="label counts (default: MNIST 100 1000, CIFAR10 1000 4000, SVHN 1000, other datasets 1000)")
    p.add_argument("--seeds", type=int, nargs="+", default=list(range(20)))
    args = p.parse_args(argv)
    try:
        dataset = canonical_dataset_name(args.dataset)
    except ValueError as exc:
        p.error(str(exc))
    if args.download and dataset not in DATASETS:
        p.error(f"--download fetches MNIST, CIFAR10 or SVHN only; give the folder of {args.dataset!r} with --source")
    source = download(dataset, args.out / "downloads" / dataset) if args.download else args.source
    paths = prepare(dataset, source, args.out, args.num_labels or DEFAULT_LABELS.get(dataset, [1000]), args.seeds)
    print(f"wrote {len(paths)} files under {args.out}: {paths[0]} ... {paths[-1]}")


if __name__ == "__main__":
    main()
