"""Image data for semi-supervised FlowGMM: readers, balanced label splits, the two-stream loader, dequantisation.

Images are kept as uint8 tensors ``(N, C, H, W)`` with int64 labels ``(N,)``; the whole training set lives on the
training device (MNIST 47 MB, CIFAR-10 150 MB) and batches are cropped, flipped and dequantised there.

Readers (no download here; ``experiments/prepare_data.py`` downloads with torchvision where there is internet):
- :func:`load_image_dataset` reads a prepared folder (``<data_path>/train.npz``, ``test.npz``: ``images``,
  ``labels``) or torchvision's on-disk formats: MNIST IDX files (``raw/`` or ``MNIST/raw/``, optionally .gz),
  CIFAR-10 ``cifar-10-batches-py`` pickles, SVHN ``train_32x32.mat`` / ``test_32x32.mat``. Nothing here unpickles
  arbitrary objects: ``.npz`` files are read with ``allow_pickle=False``, and the CIFAR-10 batches with a restricted
  unpickler (:func:`read_cifar_batch`) that rebuilds only the dict of strings, bytes, integer lists and numeric
  arrays the format holds.
- Any other dataset name (e.g. ``fashion_mnist``, ``kmnist``) is a dataset in MNIST's on-disk format: the four IDX
  files ``train-images-idx3-ubyte``, ``train-labels-idx1-ubyte``, ``t10k-...`` (optionally .gz; in the folder,
  its ``raw/`` or a ``<Name>/raw/`` below it, torchvision's layout), any image size, grayscale, classes 0..K-1 with
  K = the largest training label + 1. The name labels the prepared files and label splits, so a split made for one
  dataset is refused for another.

Label splits, in the original repository's layout ``data/labels/<dataset>/<N>_balanced_labels/<seed>.<ext>``:
- MNIST and SVHN ``.npz`` with ``labeled_indices`` and ``unlabeled_indices`` as the original reads them (plus
  ``labels``, ``dataset``, ``seed`` for validation);
- CIFAR-10 ``.txt``, one ``<index>_<class>.png <class>`` line per labeled image (the mean-teacher naming; the index
  is the row of the training set).
:func:`balanced_split` draws N/K indices per class from ``numpy.random.RandomState(seed)``;
:func:`load_label_split` rejects indices out of range, duplicates, unknown classes, classes that disagree with
the dataset (a split made for another dataset), splits labelling a single class, and ``.npz`` files that are not zip
archives.

:class:`SemiSupervisedLoader`: each batch is half labeled, half unlabeled; an epoch is one pass over the labeled
data (labeled rows first, as the original); two augmentations of every row (RandomCrop with 4-pixel zero padding,
+ horizontal flip for CIFAR-10 / SVHN); every random choice of step s comes from generators seeded by (seed, s) or
(seed, epoch), so the batches are a pure function of the step (exact resume) and each rank of a DDP run takes its
slice of the same global batch. Note: ``dequantize`` is applied here, so build RealNVP with ``dequantize=False``.
"""

from __future__ import annotations

import gzip
import importlib
import pickle
import re
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from ._files import open_npz

__all__ = ["DATASETS", "ImageData", "canonical_dataset_name", "load_image_dataset", "balanced_split",
           "label_split_path", "save_label_split", "load_label_split", "LabelSplitError", "dequantize", "augment",
           "SemiSupervisedLoader", "eval_batches", "read_cifar_batch"]

CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
DIGITS = tuple(str(i) for i in range(10))


@dataclass(frozen=True)
class _Spec:
    name: str               # canonical lower-case name (label folder)
    shape: tuple | None     # (C, H, W); None: any (an MNIST-format dataset)
    classes: tuple | None   # class names, index = label; None: 0..K-1 from the labels (an MNIST-format dataset)
    split_ext: str          # label split file extension
    flip: bool              # horizontal flip in the augmentation


DATASETS = {
    "mnist": _Spec("mnist", (1, 28, 28), DIGITS, ".npz", False),
    "cifar10": _Spec("cifar10", (3, 32, 32), CIFAR10_CLASSES, ".txt", True),
    "svhn": _Spec("svhn", (3, 32, 32), DIGITS, ".npz", True),
}


_IDX_NAME = re.compile(r"[a-z0-9][a-z0-9_.]*")


def canonical_dataset_name(dataset: str) -> str:
    """The lower-case name that labels a dataset's files: "mnist", "cifar10", "svhn", or the name of a dataset in
    MNIST's IDX format (letters, digits, '_' and '.'; '-' is dropped, so "Fashion-MNIST" -> "fashionmnist").
    Raises ValueError for anything else."""
    key = str(dataset).lower().replace("-", "")
    if key not in DATASETS and not _IDX_NAME.fullmatch(key):
        raise ValueError(f"dataset must be MNIST, CIFAR10, SVHN or the name of a dataset in MNIST's IDX format "
                         f"(letters, digits, '_', '.'), got {dataset!r}")
    return key


def _spec(dataset: str) -> _Spec:
    key = canonical_dataset_name(dataset)
    return DATASETS.get(key) or _Spec(key, None, None, ".npz", False)


@dataclass
class ImageData:
    """One split of a dataset: ``images`` (N, C, H, W) uint8, ``labels`` (N,) int64, and the dataset name."""

    images: torch.Tensor
    labels: torch.Tensor
    dataset: str

    def __post_init__(self):
        spec = _spec(self.dataset)
        self.dataset = spec.name
        shape = "C, H, W" if spec.shape is None else ", ".join(map(str, spec.shape))
        if (self.images.dtype != torch.uint8 or self.images.dim() != 4
                or (spec.shape is not None and tuple(self.images.shape[1:]) != spec.shape)):
            raise ValueError(f"{spec.name} images must be uint8 of shape (N, {shape}), got "
                             f"{self.images.dtype} {tuple(self.images.shape)}")
        if self.labels.shape != (self.images.shape[0],):
            raise ValueError(f"labels must have shape ({self.images.shape[0]},), got {tuple(self.labels.shape)}")
        top = len(spec.classes) if spec.classes is not None else None
        if len(self.labels) and (int(self.labels.min()) < 0 or (top is not None and int(self.labels.max()) >= top)):
            raise ValueError(f"{spec.name} labels must be in [0, {top if top is not None else 'K'}), got range "
                             f"[{int(self.labels.min())}, {int(self.labels.max())}]")
        self.labels = self.labels.long()

    def __len__(self) -> int:
        return self.images.shape[0]

    @property
    def num_classes(self) -> int:
        """K: the dataset's classes (an MNIST-format dataset: the largest label + 1)."""
        classes = _spec(self.dataset).classes
        if classes is not None:
            return len(classes)
        return int(self.labels.max()) + 1 if len(self.labels) else 0


# ------------------------------------------------------------------------------------------------- readers
def _open_maybe_gz(path: Path):
    if path.exists():
        return open(path, "rb")
    gz = path.with_name(path.name + ".gz")
    if gz.exists():
        return gzip.open(gz, "rb")
    return None


def _read_idx(path: Path) -> np.ndarray:
    f = _open_maybe_gz(path)
    if f is None:
        raise FileNotFoundError(f"MNIST file {path} (or {path}.gz) not found")
    with f:
        data = f.read()
    magic = int.from_bytes(data[:4], "big")
    if magic >> 8 != 0x08:  # 0x08: unsigned byte
        raise ValueError(f"{path} is not an unsigned-byte IDX file (magic {magic:#x})")
    ndim = magic & 0xFF
    dims = [int.from_bytes(data[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim)]
    arr = np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim).copy()
    if arr.size != int(np.prod(dims)):
        raise ValueError(f"{path}: header says shape {dims} but holds {arr.size} bytes of data")
    return arr.reshape(dims)


def _mnist_dir(root: Path) -> Path | None:
    """The folder with the IDX files: ``root``, ``root/raw``, ``root/MNIST/raw`` or another ``root/<Name>/raw``
    (torchvision's FashionMNIST/raw, KMNIST/raw)."""
    candidates = [root, root / "raw", root / "MNIST" / "raw"]
    if root.is_dir():
        candidates += sorted(d / "raw" for d in root.iterdir() if d.is_dir())
    for d in candidates:
        if _open_maybe_gz(d / "train-images-idx3-ubyte") is not None:
            return d
    return None


def _read_mnist(root: Path, train: bool):
    d = _mnist_dir(root)
    prefix = "train" if train else "t10k"
    images = _read_idx(d / f"{prefix}-images-idx3-ubyte")
    labels = _read_idx(d / f"{prefix}-labels-idx1-ubyte")
    if images.ndim != 3 or labels.ndim != 1 or len(images) != len(labels):
        raise ValueError(f"{d}: expected {prefix} images (N, H, W) and labels (N,), got shapes {images.shape} and "
                         f"{labels.shape}")
    return images[:, None], labels


def _cifar_dir(root: Path) -> Path | None:
    for d in (root / "cifar-10-batches-py", root):
        if (d / "data_batch_1").exists():
            return d
    return None


# The globals a CIFAR batch pickle may name: numpy's array reconstruction (pickle protocols 0-4 and 5, numpy 1 and 2
# module names) and, for protocol <= 2 bytes, codecs.encode. Everything else -- the builtins eval/exec, os.system,
# any class with side effects -- is refused before it is looked up.
_CIFAR_GLOBALS = {
    ("numpy.core.multiarray", "_reconstruct"): ("multiarray", "_reconstruct"),
    ("numpy._core.multiarray", "_reconstruct"): ("multiarray", "_reconstruct"),
    ("numpy.core.numeric", "_frombuffer"): ("numeric", "_frombuffer"),
    ("numpy._core.numeric", "_frombuffer"): ("numeric", "_frombuffer"),
    ("numpy", "ndarray"): None,
    ("numpy", "dtype"): None,
    ("_codecs", "encode"): None,
}


class _CifarUnpickler(pickle.Unpickler):
    """Unpickles CIFAR-10 / -100 python batches only (see _CIFAR_GLOBALS)."""

    def find_class(self, module, name):
        if (module, name) not in _CIFAR_GLOBALS:
            raise pickle.UnpicklingError(f"global {module}.{name} is not allowed in a CIFAR batch")
        target = _CIFAR_GLOBALS[(module, name)]
        if target is None:
            return getattr(np, name) if module == "numpy" else getattr(importlib.import_module(module), name)
        core = getattr(np, "_core", None) or importlib.import_module("numpy.core")
        return getattr(getattr(core, target[0]), target[1])


def _cifar_value_ok(value) -> bool:
    if isinstance(value, (str, bytes, int)):
        return True
    if isinstance(value, np.ndarray):
        return value.dtype.kind in "biuf"
    if isinstance(value, list):
        return all(isinstance(v, (str, bytes, int)) for v in value)
    return False


def read_cifar_batch(path: str | Path) -> dict:
    """One CIFAR python batch (``data_batch_1`` ...) as a dict with str keys, read by a restricted unpickler that
    rebuilds only strings, bytes, ints, lists of them and numeric numpy arrays: a crafted file cannot run code.
    Raises ValueError naming the file when it holds anything else."""
    path = Path(path)
    try:
        with open(path, "rb") as f:
            entry = _CifarUnpickler(f, encoding="latin1").load()
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError, IndexError) as exc:
        raise ValueError(f"CIFAR batch {str(path)!r} cannot be read safely: {exc}") from exc
    if not isinstance(entry, dict):
        raise ValueError(f"CIFAR batch {str(path)!r} must hold a dict, got {type(entry).__name__}")
    out = {}
    for key, value in entry.items():
        key = key.decode("latin1") if isinstance(key, bytes) else key
        if not isinstance(key, str) or not _cifar_value_ok(value):
            raise ValueError(f"CIFAR batch {str(path)!r}: entry {key!r} holds a {type(value).__name__}, not the "
                             f"strings, integer lists and numeric arrays of the format")
        out[key] = value
    if "data" not in out or not ("labels" in out or "fine_labels" in out):
        raise ValueError(f"CIFAR batch {str(path)!r} has no 'data' and 'labels' entries (it holds {sorted(out)})")
    return out


def _read_cifar10(root: Path, train: bool):
    d = _cifar_dir(root)
    names = [f"data_batch_{i}" for i in range(1, 6)] if train else ["test_batch"]
    images, labels = [], []
    for name in names:
        entry = read_cifar_batch(d / name)
        images.append(np.asarray(entry["data"], dtype=np.uint8).reshape(-1, 3, 32, 32))
        labels.append(np.asarray(entry["labels"] if "labels" in entry else entry["fine_labels"]))
    return np.concatenate(images), np.concatenate(labels)


def _read_svhn(root: Path, train: bool):
    import scipy.io

    path = root / ("train_32x32.mat" if train else "test_32x32.mat")
    mat = scipy.io.loadmat(path)
    images = np.transpose(mat["X"], (3, 2, 0, 1))  # (H, W, C, N) -> (N, C, H, W), as torchvision
    labels = mat["y"].astype(np.int64).squeeze(1)
    labels[labels == 10] = 0  # SVHN stores digit 0 as class 10
    return np.ascontiguousarray(images), labels


def load_image_dataset(dataset: str, data_path: str | Path, train: bool = True) -> ImageData:
    """The train (or test) split of ``dataset`` ("MNIST", "CIFAR10", "SVHN", or the name of a dataset in MNIST's
    IDX format) from ``data_path``.

    ``data_path`` is a prepared folder (``train.npz`` / ``test.npz``) or a folder in torchvision's on-disk format
    (see the module docstring). Raises FileNotFoundError naming what was looked for.
    """
    spec = _spec(dataset)
    root = Path(data_path)
    split = "train" if train else "test"
    prepared = root / f"{split}.npz"
    if prepared.exists():
        with open_npz(prepared, "prepared dataset file") as z:
            if "dataset" in z and str(z["dataset"]) != spec.name:
                raise ValueError(f"{prepared} holds {str(z['dataset'])!r} data, not {spec.name!r}")
            images, labels = z["images"], z["labels"]
    elif spec.name not in ("cifar10", "svhn") and _mnist_dir(root) is not None:
        images, labels = _read_mnist(root, train)
    elif spec.name == "cifar10" and _cifar_dir(root) is not None:
        images, labels = _read_cifar10(root, train)
    elif spec.name == "svhn" and (root / f"{split}_32x32.mat").exists():
        images, labels = _read_svhn(root, train)
    else:
        expected = {"cifar10": "cifar-10-batches-py/data_batch_1..5, test_batch",
                    "svhn": "train_32x32.mat, test_32x32.mat"}.get(
            spec.name, "raw/train-images-idx3-ubyte[.gz] (torchvision MNIST/raw; MNIST's IDX format)")
        raise FileNotFoundError(f"no {spec.name} data under {str(root)!r}: expected {split}.npz (written by "
                                f"experiments/prepare_data.py) or {expected}")
    return ImageData(torch.from_numpy(np.ascontiguousarray(images, dtype=np.uint8)),
                     torch.from_numpy(np.asarray(labels, dtype=np.int64)), spec.name)


# ------------------------------------------------------------------------------------------------- label splits
class LabelSplitError(ValueError):
    """A label split file is malformed or does not belong to the dataset it is used with."""


def balanced_split(labels, num_labels: int, seed: int, num_classes: int | None = None) -> np.ndarray:
    """Sorted indices of ``num_labels`` labeled examples, ``num_labels / K`` from each of the K classes, drawn
    without replacement by ``numpy.random.RandomState(seed)`` (the same seed gives the same split)."""
    labels = np.asarray(labels)
    k = int(labels.max()) + 1 if num_classes is None else num_classes
    if num_labels < k or num_labels % k:
        raise ValueError(f"num_labels must be a positive multiple of the number of classes ({k}), got {num_labels}")
    per_class = num_labels // k
    rng = np.random.RandomState(seed)
    chosen = []
    for c in range(k):
        idx = np.flatnonzero(labels == c)
        if len(idx) < per_class:
            raise ValueError(f"class {c} has only {len(idx)} examples, fewer than {per_class} per class")
        chosen.append(rng.choice(idx, per_class, replace=False))
    return np.sort(np.concatenate(chosen)).astype(np.int64)


def label_split_path(root: str | Path, dataset: str, num_labels: int, seed: int) -> Path:
    """``<root>/<dataset>/<num_labels>_balanced_labels/<seed>.<npz|txt>`` (the original layout)."""
    spec = _spec(dataset)
    return Path(root) / spec.name / f"{num_labels}_balanced_labels" / f"{seed}{spec.split_ext}"


def save_label_split(path: str | Path, dataset: str, indices, labels, seed: int | None = None,
                     num_train: int | None = None) -> Path:
    """Write labeled ``indices`` of ``dataset`` (with ``labels``, the dataset's labels at those indices) in the
    format chosen by the file extension (.npz, which also lists the other ``num_train`` rows as
    ``unlabeled_indices``, or .txt)."""
    spec = _spec(dataset)
    path = Path(path)
    indices, labels = np.asarray(indices, dtype=np.int64), np.asarray(labels, dtype=np.int64)
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix == ".npz":
        if num_train is None:
            raise ValueError("num_train (the training-set size) is needed to write unlabeled_indices")
        unlabeled = np.setdiff1d(np.arange(num_train), indices)
        np.savez(path, labeled_indices=indices, unlabeled_indices=unlabeled, labels=labels,
                 dataset=np.array(spec.name), seed=np.array(-1 if seed is None else seed))
    elif path.suffix == ".txt":
        names = [spec.classes[y] if spec.classes is not None else str(y) for y in labels]
        lines = [f"{i}_{name}.png {name}" for i, name in zip(indices, names)]
        path.write_text("\n".join(lines) + "\n")
    else:
        raise ValueError(f"label split files end in .npz or .txt, got {str(path)!r}")
    return path


_TXT_LINE = re.compile(r"^(\d+)(?:_[^\s]*)?\s+(\S+)$")


def load_label_split(path: str | Path, data: ImageData) -> np.ndarray:
    """Labeled indices from a split file, validated against ``data`` (the training split it indexes).

    Raises :class:`LabelSplitError` naming the file and the problem: unreadable, no ``labeled_indices``, a split
    for another dataset, an index out of range, duplicates, an unknown class name or a class that disagrees with
    the dataset's label at that index.
    """
    path = Path(path)
    spec = _spec(data.dataset)
    n = len(data)
    if not path.is_file():
        raise LabelSplitError(f"label split file {str(path)!r} does not exist")
    claimed = unlabeled = None
    if path.suffix == ".npz":
        try:
            with open_npz(path, "label split", LabelSplitError) as z:
                if "labeled_indices" not in z:
                    raise LabelSplitError(f"label split {str(path)!r} has no 'labeled_indices' array "
                                          f"(it holds {sorted(z.files)})")
                indices = np.asarray(z["labeled_indices"])
                if "dataset" in z and str(z["dataset"]) != spec.name:
                    raise LabelSplitError(f"label split {str(path)!r} was made for {str(z['dataset'])!r}, "
                                          f"not {spec.name!r}")
                claimed = np.asarray(z["labels"]) if "labels" in z else None
                unlabeled = np.asarray(z["unlabeled_indices"]) if "unlabeled_indices" in z else None
        except LabelSplitError:
            raise
        except Exception as exc:
            raise LabelSplitError(f"label split {str(path)!r} cannot be read as .npz ({exc})") from exc
        if indices.ndim != 1 or not np.issubdtype(indices.dtype, np.integer):
            raise LabelSplitError(f"label split {str(path)!r}: labeled_indices must be a 1-d integer array, got "
                                  f"{indices.dtype} of shape {indices.shape}")
    elif path.suffix == ".txt":
        idx, names = [], []
        for lineno, line in enumerate(path.read_text().splitlines(), 1):
            if not line.strip():
                continue
            m = _TXT_LINE.match(line.strip())
            if m is None:
                raise LabelSplitError(f"label split {str(path)!r} line {lineno}: expected '<index>_<class>.png "
                                      f"<class>', got {line.strip()!r}")
            classes = spec.classes if spec.classes is not None else tuple(map(str, range(data.num_classes)))
            if m.group(2) not in classes:
                raise LabelSplitError(f"label split {str(path)!r} line {lineno}: class {m.group(2)!r} is not a "
                                      f"{spec.name} class {classes} (a split for another dataset?)")
            idx.append(int(m.group(1)))
            names.append(classes.index(m.group(2)))
        indices, claimed = np.asarray(idx, dtype=np.int64), np.asarray(names, dtype=np.int64)
    else:
        raise LabelSplitError(f"label split file must end in .npz or .txt, got {str(path)!r}")
    if indices.size == 0:
        raise LabelSplitError(f"label split {str(path)!r} is empty")
    if indices.min() < 0 or indices.max() >= n:
        raise LabelSplitError(f"label split {str(path)!r}: indices must be in [0, {n}) for the {spec.name} training "
                              f"set, got range [{indices.min()}, {indices.max()}] (a split for another dataset?)")
    if len(np.unique(indices)) != len(indices):
        raise LabelSplitError(f"label split {str(path)!r} lists {len(indices) - len(np.unique(indices))} "
                              f"duplicate index(es)")
    if path.suffix == ".npz" and unlabeled is not None and np.intersect1d(indices, unlabeled).size:
        raise LabelSplitError(f"label split {str(path)!r}: {np.intersect1d(indices, unlabeled).size} index(es) are "
                              f"listed as both labeled and unlabeled")
    actual = data.labels.numpy()[indices]
    if claimed is not None:
        bad = np.flatnonzero(actual != claimed)
        if bad.size:
            i = indices[bad[0]]
            raise LabelSplitError(f"label split {str(path)!r} disagrees with the {spec.name} labels at {bad.size} "
                                  f"index(es), e.g. index {i}: file says {claimed[bad[0]]}, dataset says "
                                  f"{actual[bad[0]]} (a split for another dataset or ordering?)")
    classes = np.unique(actual)
    if classes.size < 2:
        raise LabelSplitError(f"label split {str(path)!r} labels only class {spec.classes[int(classes[0])]!r} "
                              f"({indices.size} example(s)): semi-supervised FlowGMM needs labeled examples of at "
                              f"least 2 classes to tell them apart")
    return indices.astype(np.int64)


# ------------------------------------------------------------------------------------------------- augmentation
def dequantize(images: torch.Tensor, generator: torch.Generator | None = None, noise: bool = True) -> torch.Tensor:
    """x' = (x_uint8 + u) / 256 with u ~ U(0, 1) (u = 0.5 when ``noise=False``): 8-bit images (B, C, H, W) ->
    float32 in (0, 1). Equals (255 x + u) / 256 for x = x_uint8 / 255; bits/dim of these inputs are comparable with
    the literature."""
    x = images.float()
    u = torch.rand(x.shape, generator=generator, device=x.device) if noise else torch.full_like(x, 0.5)
    return (x + u) / 256.0


def augment(images: torch.Tensor, generator: torch.Generator | None, padding: int = 4,
            flip: bool = False) -> torch.Tensor:
    """Random crop of each image after zero-padding by ``padding`` (+ horizontal flip with probability 1/2 when
    ``flip``), batched in one gather: (B, C, H, W) -> (B, C, H, W), any dtype."""
    b, _, h, w = images.shape
    dev = images.device
    oy = torch.randint(0, 2 * padding + 1, (b,), generator=generator, device=dev)
    ox = torch.randint(0, 2 * padding + 1, (b,), generator=generator, device=dev)
    padded = F.pad(images, (padding,) * 4) if padding else images
    rows = (oy[:, None] + torch.arange(h, device=dev))[:, None, :, None]
    cols = ox[:, None] + torch.arange(w, device=dev)
    if flip:
        flipped = torch.rand(b, generator=generator, device=dev) < 0.5
        cols = torch.where(flipped[:, None], cols.flip(1), cols)
    cols = cols[:, None, None, :]
    bidx = torch.arange(b, device=dev)[:, None, None, None]
    cidx = torch.arange(images.shape[1], device=dev)[None, :, None, None]
    return padded[bidx, cidx, rows, cols]


# ------------------------------------------------------------------------------------------------- the loader
def _seed(*parts: int) -> int:
    """A 63-bit seed mixing integers (SplitMix64-style), so (seed, step) streams don't overlap."""
    h = 0x9E3779B97F4A7C15
    for p in parts:
        h = (h ^ (int(p) & 0xFFFFFFFFFFFFFFFF)) * 0xBF58476D1CE4E5B9 & 0xFFFFFFFFFFFFFFFF
        h ^= h >> 31
    return h & 0x7FFFFFFFFFFFFFFF


class SemiSupervisedLoader:
    """Two-stream batches for FlowGMM(-cons): ``(x, labels, x2)`` per step, on ``device``.

    data: the training split; labeled_idx: the labeled indices (the rest is the unlabeled pool).
    batch_size: the GLOBAL batch: half labeled, half unlabeled (all labeled with ``supervised_only``); each of
    ``world_size`` ranks gets its 1/world_size slice of each half. x: (b, C, H, W) float32 dequantised first
    augmentation of the rank's rows (labeled first, then unlabeled); labels: (b,) int64, -1 for the unlabeled rows;
    x2: a second, independent augmentation of the same rows (the consistency target of FlowGMM-cons).
    steps_per_epoch = len(labeled) // (labeled rows per global batch): one pass over the labeled data.
    num_workers > 0 prepares that many upcoming batches in background threads (same batches, same order).
    crop_padding: the zero padding of the random crop (the original's 4; 0 = no shift).
    soft_targets: optional (len(data), K) float class distributions of every training example (a teacher's, e.g.
    label spreading's); the batches are then ``(x, labels, x2, q)`` with q: (b, K) the rows' distributions.
    """

    def __init__(self, data: ImageData, labeled_idx, batch_size: int, *, seed: int = 0, device="cpu",
                 rank: int = 0, world_size: int = 1, supervised_only: bool = False, augment_data: bool = True,
                 num_workers: int = 0, crop_padding: int = 4, soft_targets: torch.Tensor | None = None):
        spec = _spec(data.dataset)
        if soft_targets is not None:
            soft_targets = torch.as_tensor(soft_targets, dtype=torch.float32)
            if soft_targets.dim() != 2 or soft_targets.shape[0] != len(data):
                raise ValueError(f"soft_targets must have shape ({len(data)}, num_classes), got "
                                 f"{tuple(soft_targets.shape)}")
        if not isinstance(crop_padding, int) or crop_padding < 0:
            raise ValueError(f"crop_padding must be an int >= 0, got {crop_padding!r}")
        labeled_idx = torch.as_tensor(np.asarray(labeled_idx), dtype=torch.long)
        if batch_size < 2 or batch_size % (2 * world_size):
            raise ValueError(f"batch_size must be a positive multiple of 2 x world size ({2 * world_size}), "
                             f"got {batch_size}")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank must be in [0, {world_size}), got {rank}")
        if num_workers < 0:
            raise ValueError(f"num_workers must be >= 0, got {num_workers}")
        n = len(data)
        is_labeled = torch.zeros(n, dtype=torch.bool)
        is_labeled[labeled_idx] = True
        self.device = torch.device(device)
        self.images = data.images.to(self.device)
        self.labels = data.labels.to(self.device)
        self.labeled_idx = labeled_idx.to(self.device)
        self.unlabeled_idx = torch.nonzero(~is_labeled).squeeze(1).to(self.device)
        self.supervised_only = supervised_only
        self.n_lab_rows = batch_size if supervised_only else batch_size // 2
        self.n_unl_rows = 0 if supervised_only else batch_size // 2
        if len(self.labeled_idx) < self.n_lab_rows:
            raise ValueError(f"{len(self.labeled_idx)} labeled examples cannot fill {self.n_lab_rows} labeled rows "
                             f"per batch; lower batch_size")
        if self.n_unl_rows and len(self.unlabeled_idx) == 0:
            raise ValueError("every training example is labeled: there is no unlabeled data (use supervised_only)")
        self.steps_per_epoch = len(self.labeled_idx) // self.n_lab_rows
        self.seed, self.rank, self.world_size = int(seed), rank, world_size
        self.flip = spec.flip
        self.augment_data = augment_data
        self.crop_padding = crop_padding
        self.num_workers = num_workers
        self.soft_targets = None if soft_targets is None else soft_targets.to(self.device)

    def _perm(self, n: int, *key: int) -> torch.Tensor:
        g = torch.Generator(device=self.device).manual_seed(_seed(self.seed, *key))
        return torch.randperm(n, generator=g, device=self.device)

    def _stream(self, pool: torch.Tensor, start: int, count: int, tag: int) -> torch.Tensor:
        """Entries [start, start+count) of the endless stream of per-pass permutations of ``pool``."""
        n = len(pool)
        out, pos = [], start
        while pos < start + count:
            p, off = divmod(pos, n)
            take = min(n - off, start + count - pos)
            out.append(pool[self._perm(n, tag, p)[off: off + take]])
            pos += take
        return torch.cat(out)

    def batch(self, step: int):
        """The batch of (1-based) optimizer step ``step``: a pure function of (seed, step, rank, world_size)."""
        if step < 1:
            raise ValueError(f"step counts from 1, got {step}")
        s = step - 1
        epoch, pos = divmod(s, self.steps_per_epoch)
        lab = self.labeled_idx[self._perm(len(self.labeled_idx), 0, epoch)[pos * self.n_lab_rows:
                                                                            (pos + 1) * self.n_lab_rows]]
        idx = lab
        if self.n_unl_rows:
            unl = self._stream(self.unlabeled_idx, s * self.n_unl_rows, self.n_unl_rows, 1)
            idx = torch.cat([lab, unl])
        g = torch.Generator(device=self.device).manual_seed(_seed(self.seed, 2, step))
        imgs = self.images[idx]
        x = dequantize(augment(imgs, g, self.crop_padding, flip=self.flip) if self.augment_data else imgs, g)
        labels = self.labels[idx].clone()
        labels[self.n_lab_rows:] = -1
        x2 = dequantize(augment(imgs, g, self.crop_padding, flip=self.flip) if self.augment_data else imgs, g)
        out = (x, labels, x2) if self.soft_targets is None else (x, labels, x2, self.soft_targets[idx])
        if self.world_size == 1:
            return out
        # this rank's slice of each half (so every rank's batch is half labeled, half unlabeled too)
        lab_rows, unl_rows, r = self.n_lab_rows // self.world_size, self.n_unl_rows // self.world_size, self.rank
        rows = torch.cat([torch.arange(r * lab_rows, (r + 1) * lab_rows),
                          torch.arange(self.n_lab_rows + r * unl_rows, self.n_lab_rows + (r + 1) * unl_rows)])
        rows = rows.to(self.device)
        return tuple(t[rows] for t in out)

    def batches_from(self, start_step: int) -> Iterator:
        """Batches of steps start_step+1, start_step+2, ... (endless; the :class:`Trainer` batch source)."""
        step = start_step
        if self.num_workers == 0:
            while True:
                step += 1
                yield self.batch(step)
        with ThreadPoolExecutor(self.num_workers) as pool:  # batch() shares no mutable state: thread-safe
            pending = [pool.submit(self.batch, step + i + 1) for i in range(self.num_workers)]
            step += self.num_workers
            while True:
                future = pending.pop(0)
                step += 1
                pending.append(pool.submit(self.batch, step))
                yield future.result()


def eval_batches(data: ImageData, batch_size: int, *, device="cpu", seed: int = 0, rank: int = 0,
                 world_size: int = 1) -> Iterator:
    """Dequantised ``(x, labels)`` batches of ``data`` (no augmentation) for evaluation; the noise is drawn from a
    generator seeded by ``seed`` per batch, so bits/dim are reproducible. Rank r of ``world_size`` gets batches
    r, r + world_size, ... (reduce the sums over ranks)."""
    device = torch.device(device)
    g = torch.Generator(device=device)
    for i, start in enumerate(range(0, len(data), batch_size)):
        if i % world_size != rank:
            continue
        g.manual_seed(_seed(seed, 3, i))
        imgs = data.images[start:start + batch_size].to(device, non_blocking=True)
        yield dequantize(imgs, g), data.labels[start:start + batch_size].to(device, non_blocking=True)
