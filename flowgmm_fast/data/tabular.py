"""Feature-vector data for semi-supervised FlowGMM: labeled splits, standardisation, file readers and UCI loaders.

Arrays are numpy: features ``x: (N, D) float32``, labels ``y: (N,) int64`` in ``[0, K)``; in a semi-supervised label
vector ``-1`` marks an unlabeled point. Nothing here downloads anything: the UCI loaders read the standard files from a
local folder and raise ``FileNotFoundError`` naming the file and where it comes from.

- :func:`balanced_labeled_indices`: N labels spread evenly over the classes (the "N_balanced_labels" splits).
- :class:`Standardizer`: per-feature mean / std fitted on training data (constant features get std 1).
- :func:`load_features` / :func:`save_features`: ``.npz`` (``x``, ``y`` and optionally ``x_test``, ``y_test``) or CSV.
- :func:`load_split` / :func:`save_split`: a labeled-index file (``.npz`` with ``labeled_idx`` or one index a line).
- :func:`load_miniboone`, :func:`load_hepmass`: UCI MiniBooNE / HEPMASS with the preprocessing of MAF
  (Papamakarios et al., NeurIPS 2017), keeping the class labels that MAF drops.
- :func:`load_sklearn`: scikit-learn's bundled ``digits`` (64 features, 10 classes) and ``breast_cancer`` (30, 2).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np

from ._files import open_npz

__all__ = ["balanced_labeled_indices", "labels_per_class", "semisup_labels", "Standardizer", "TabularData",
           "load_features", "save_features", "load_split", "save_split", "maf_discrete_columns", "load_miniboone",
           "load_hepmass", "load_sklearn", "train_test_split_stratified", "MINIBOONE_FILE", "HEPMASS_FILES"]

MINIBOONE_FILE = "MiniBooNE_PID.txt"
HEPMASS_FILES = ("1000_train.csv", "1000_test.csv")


def _as_labels(y, name: str = "y") -> np.ndarray:
    y = np.asarray(y)
    if y.ndim != 1:
        raise ValueError(f"{name} must be a 1-D label array, got shape {y.shape}")
    if y.size and not np.issubdtype(y.dtype, np.integer):
        if not np.all(np.equal(np.mod(y, 1), 0)):
            raise ValueError(f"{name} must hold integer class labels, got non-integer values ({y.dtype})")
    return y.astype(np.int64)


def balanced_labeled_indices(y, num_labeled: int, seed: int = 0) -> np.ndarray:
    """Indices of ``num_labeled`` points, ``num_labeled / K`` from each of the K classes present in ``y``, drawn
    without replacement with ``numpy.random.default_rng(seed)``; sorted (int64)."""
    y = _as_labels(y)
    classes = np.unique(y)
    if classes.size == 0:
        raise ValueError("y must not be empty")
    if np.any(classes < 0):
        raise ValueError("y must hold the true class labels (>= 0), not a semi-supervised vector with -1")
    if not isinstance(num_labeled, (int, np.integer)) or num_labeled <= 0 or num_labeled % classes.size:
        raise ValueError(f"num_labeled must be a positive multiple of the number of classes ({classes.size}), "
                         f"got {num_labeled!r}")
    per_class = int(num_labeled) // classes.size
    rng = np.random.default_rng(seed)
    picked = []
    for c in classes:
        members = np.flatnonzero(y == c)
        if members.size < per_class:
            raise ValueError(f"class {c} has {members.size} points, fewer than the {per_class} labels per class "
                             f"asked for by num_labeled={num_labeled}")
        picked.append(rng.choice(members, per_class, replace=False))
    return np.sort(np.concatenate(picked)).astype(np.int64)


def labels_per_class(y, per_class: int, seed: int = 0) -> np.ndarray:
    """Indices of up to ``per_class`` points of every class of ``y`` (all of a class's points when it has fewer),
    drawn without replacement with ``numpy.random.default_rng(seed)``; sorted (int64). Unlike
    :func:`balanced_labeled_indices` it never fails on a small class: the usual way to draw a few-label split of a
    real, possibly imbalanced table."""
    y = _as_labels(y)
    if y.size == 0:
        raise ValueError("y must not be empty")
    if np.any(y < 0):
        raise ValueError("y must hold the true class labels (>= 0), not a semi-supervised vector with -1")
    if not isinstance(per_class, (int, np.integer)) or isinstance(per_class, bool) or per_class < 1:
        raise ValueError(f"per_class must be a positive int, got {per_class!r}")
    rng = np.random.default_rng(seed)
    picked = [rng.choice(members, min(int(per_class), members.size), replace=False)
              for members in (np.flatnonzero(y == c) for c in np.unique(y))]
    return np.sort(np.concatenate(picked)).astype(np.int64)


def semisup_labels(y, labeled_idx) -> np.ndarray:
    """(N,) int64 copy of ``y`` with -1 everywhere except at ``labeled_idx``, which must select examples of at least
    two classes (with one, every labeled point pulls towards one component and nothing tells the classes apart)."""
    y = _as_labels(y)
    idx = np.asarray(labeled_idx, dtype=np.int64)
    if idx.ndim != 1 or (idx.size and (idx.min() < 0 or idx.max() >= y.size)):
        raise ValueError(f"labeled_idx must be a 1-D array of indices into y (0..{y.size - 1})")
    classes = np.unique(y[idx])
    if classes.size < 2:
        raise ValueError(f"labeled_idx must label examples of at least 2 classes, got {idx.size} labeled example(s) "
                         f"of {'no class' if classes.size == 0 else f'class {int(classes[0])} only'}")
    out = np.full_like(y, -1)
    out[idx] = y[idx]
    return out


@dataclass
class Standardizer:
    """x -> (x - mean) / std per feature; constant features (std < eps) keep std 1 so they map to 0."""

    mean: np.ndarray
    std: np.ndarray

    @classmethod
    def fit(cls, x, eps: float = 1e-8) -> "Standardizer":
        x = _as_features(x)
        std = x.std(0, dtype=np.float64)
        std[std < eps] = 1.0
        return cls(x.mean(0, dtype=np.float64), std)

    def transform(self, x) -> np.ndarray:
        x = _as_features(x)
        if x.shape[1] != self.mean.shape[0]:
            raise ValueError(f"x must have {self.mean.shape[0]} features (as fitted), got {x.shape[1]}")
        return ((x - self.mean) / self.std).astype(np.float32)

    def inverse(self, x) -> np.ndarray:
        return (np.asarray(x, np.float64) * self.std + self.mean).astype(np.float32)


def _as_features(x, name: str = "x") -> np.ndarray:
    x = np.asarray(x)
    if x.ndim != 2:
        raise ValueError(f"{name} must be a 2-D (N, D) feature array, got shape {x.shape}")
    if not np.issubdtype(x.dtype, np.number):
        raise TypeError(f"{name} must be numeric, got {x.dtype}")
    return x


@dataclass
class TabularData:
    """A train / test set of feature vectors. ``x_*: (N, D) float32``, ``y_*: (N,) int64`` true labels."""

    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    name: str = "data"
    scaler: Standardizer | None = None  # set by :meth:`standardized`; maps features back with ``scaler.inverse``

    def __post_init__(self):
        self.x_train = _as_features(self.x_train, "x_train").astype(np.float32)
        self.x_test = _as_features(self.x_test, "x_test").astype(np.float32)
        self.y_train = _as_labels(self.y_train, "y_train")
        self.y_test = _as_labels(self.y_test, "y_test")
        if self.x_train.shape[0] != self.y_train.shape[0] or self.x_test.shape[0] != self.y_test.shape[0]:
            raise ValueError("x_train / y_train and x_test / y_test must have the same number of rows")
        if self.x_train.shape[1] != self.x_test.shape[1]:
            raise ValueError(f"x_train and x_test must have the same number of features, got "
                             f"{self.x_train.shape[1]} and {self.x_test.shape[1]}")

    @property
    def num_classes(self) -> int:
        return int(max(self.y_train.max(initial=-1), self.y_test.max(initial=-1)) + 1)

    @property
    def dim(self) -> int:
        return self.x_train.shape[1]

    def standardized(self) -> "TabularData":
        """A copy standardised with the mean / std of ``x_train``."""
        st = Standardizer.fit(self.x_train)
        return TabularData(st.transform(self.x_train), self.y_train, st.transform(self.x_test), self.y_test, self.name,
                           st)


def train_test_split_stratified(x, y, test_fraction: float, seed: int = 0):
    """Stratified random split -> (x_train, y_train, x_test, y_test); each class contributes round(frac * n_c)."""
    x, y = _as_features(x), _as_labels(y)
    if not 0 < test_fraction < 1:
        raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction!r}")
    rng = np.random.default_rng(seed)
    test = []
    for c in np.unique(y):
        members = rng.permutation(np.flatnonzero(y == c))
        test.append(members[: int(round(test_fraction * members.size))])
    test_mask = np.zeros(y.size, bool)
    test_mask[np.concatenate(test)] = True
    return x[~test_mask], y[~test_mask], x[test_mask], y[test_mask]


def save_features(path: str, x, y, x_test=None, y_test=None) -> None:
    """Write ``x``, ``y`` (and a test set) to an ``.npz`` file."""
    arrays = {"x": np.asarray(x, np.float32), "y": _as_labels(y)}
    if x_test is not None:
        arrays.update(x_test=np.asarray(x_test, np.float32), y_test=_as_labels(y_test, "y_test"))
    np.savez_compressed(path, **arrays)


def load_features(path: str, label_column: int | str = -1):
    """Read features and labels -> ``(x, y, x_test, y_test)`` (the test pair is None when the file has none).

    ``.npz``: arrays ``x`` and ``y`` (``X`` / ``features`` / ``labels`` also accepted), optionally ``x_test``,
    ``y_test``. ``.csv``: comma-separated numbers with an optional header line; ``label_column`` (index, or a header
    name) holds the integer class, every other column is a feature.
    """
    if not os.path.exists(path):
        raise FileNotFoundError(f"features file not found: {path}")
    if path.endswith(".npz"):
        with open_npz(path, "features file") as f:
            keys = set(f.files)
            xk = next((k for k in ("x", "X", "features") if k in keys), None)
            yk = next((k for k in ("y", "labels") if k in keys), None)
            if xk is None or yk is None:
                raise ValueError(f"{path} must hold arrays 'x' and 'y' (found {sorted(keys)})")
            x, y = _as_features(f[xk], f"{path}:{xk}"), _as_labels(f[yk], f"{path}:{yk}")
            xt = _as_features(f["x_test"], f"{path}:x_test") if "x_test" in keys else None
            yt = _as_labels(f["y_test"], f"{path}:y_test") if "y_test" in keys else None
        if (xt is None) != (yt is None):
            raise ValueError(f"{path} must hold both 'x_test' and 'y_test' or neither")
        if x.shape[0] != y.shape[0]:
            raise ValueError(f"{path}: x has {x.shape[0]} rows but y has {y.shape[0]}")
        return x.astype(np.float32), y, (None if xt is None else xt.astype(np.float32)), yt
    if path.endswith(".csv"):
        with open(path) as f:
            first = f.readline().strip()
        try:
            [float(v) for v in first.split(",")]
            header = None
        except ValueError:
            header = [h.strip().lstrip("#").strip() for h in first.split(",")]
        data = np.loadtxt(path, delimiter=",", skiprows=0 if header is None else 1, ndmin=2)
        if isinstance(label_column, str):
            if header is None or label_column not in header:
                raise ValueError(f"label_column {label_column!r} is not a header name of {path} (header: {header})")
            label_column = header.index(label_column)
        col = label_column % data.shape[1]
        y = _as_labels(data[:, col], f"{path} label column {col}")
        return np.delete(data, col, axis=1).astype(np.float32), y, None, None
    raise ValueError(f"path must end in .npz or .csv, got {path!r}")


def save_split(path: str, labeled_idx) -> None:
    """Write a labeled-index split (``.npz`` with ``labeled_idx``, or text with one index a line)."""
    idx = np.asarray(labeled_idx, np.int64)
    if path.endswith(".npz"):
        np.savez(path, labeled_idx=idx)
    else:
        np.savetxt(path, idx, fmt="%d")


def load_split(path: str, num_train: int | None = None) -> np.ndarray:
    """Read labeled indices (int64, sorted) from ``.npz`` (``labeled_idx``) or a text file of integers."""
    if not os.path.exists(path):
        raise FileNotFoundError(f"split file not found: {path}")
    if path.endswith(".npz"):
        with open_npz(path, "split file") as f:
            if "labeled_idx" not in f.files:
                raise ValueError(f"{path} must hold an array 'labeled_idx' (found {f.files})")
            idx = np.asarray(f["labeled_idx"])
    else:
        idx = np.loadtxt(path, ndmin=1)
    if idx.ndim != 1 or (idx.size and not np.all(np.mod(idx, 1) == 0)):
        raise ValueError(f"{path} must hold a 1-D list of integer indices")
    idx = np.sort(idx.astype(np.int64))
    if idx.size and (idx[0] < 0 or (num_train is not None and idx[-1] >= num_train)):
        raise ValueError(f"{path}: indices must lie in [0, {num_train}), got {idx[0]}..{idx[-1]}")
    if np.unique(idx).size != idx.size:
        raise ValueError(f"{path}: labeled indices must be distinct")
    return idx


def maf_discrete_columns(x: np.ndarray, max_count: int = 5) -> np.ndarray:
    """Columns MAF drops as "too many re-occurring values": the count of the column's SMALLEST value exceeds
    ``max_count`` (MAF's exact rule, which catches the -999-style fill values and discrete columns)."""
    drop = []
    for j, col in enumerate(np.asarray(x).T):
        lowest = col.min()
        if np.count_nonzero(col == lowest) > max_count:
            drop.append(j)
    return np.asarray(drop, dtype=np.int64)


def _need(path: str, source: str) -> str:
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path} not found: put the standard file there ({source}); nothing is downloaded")
    return path


def load_miniboone(root: str, test_fraction: float = 0.1, seed: int = 0) -> TabularData:
    """UCI MiniBooNE particle identification from ``root/MiniBooNE_PID.txt``.

    File: a first line ``n_signal n_background``, then 50 whitespace-separated features per row, the signal rows
    first (label 1 = electron neutrino signal, 0 = background). MAF preprocessing: rows whose first feature is below
    -100 (the -999 fill value) are removed, then the columns of :func:`maf_discrete_columns`; features are
    standardised with the training mean / std. Unlike MAF (density estimation, labels dropped) both classes and
    their labels are kept, and the test set is a stratified random ``test_fraction`` (MAF: the last 10% of rows of a
    file sorted by class, which would be all background).
    """
    path = _need(os.path.join(root, MINIBOONE_FILE),
                 "https://archive.ics.uci.edu/dataset/199/miniboone+particle+identification")
    with open(path) as f:
        counts = f.readline().split()
    if len(counts) != 2:
        raise ValueError(f"{path}: first line must be 'n_signal n_background', got {counts}")
    n_signal, n_background = int(counts[0]), int(counts[1])
    data = np.loadtxt(path, skiprows=1, ndmin=2)
    if data.shape[0] != n_signal + n_background:
        raise ValueError(f"{path}: header announces {n_signal + n_background} rows, file has {data.shape[0]}")
    y = np.concatenate([np.ones(n_signal, np.int64), np.zeros(n_background, np.int64)])
    keep = data[:, 0] >= -100
    data, y = data[keep], y[keep]
    drop = maf_discrete_columns(data)
    data = np.delete(data, drop, axis=1)
    x_tr, y_tr, x_te, y_te = train_test_split_stratified(data, y, test_fraction, seed)
    return TabularData(x_tr, y_tr, x_te, y_te, "miniboone").standardized()


def _read_hepmass_csv(path: str, max_rows: int | None = None):
    """(header names, (N, len(header)) array); fields past the header's count (a trailing comma) are ignored."""
    with open(path) as f:
        header = [h.strip().lstrip("#").strip() for h in f.readline().split(",")]
    header = [h for h in header if h]
    try:
        data = np.loadtxt(path, delimiter=",", skiprows=1, usecols=range(len(header)), ndmin=2, max_rows=max_rows)
    except ValueError as exc:
        raise ValueError(f"{path}: expected {len(header)} numeric comma-separated fields per row ({exc})") from None
    return header, data


def load_hepmass(root: str, max_train: int | None = None, max_test: int | None = None) -> TabularData:
    """UCI HEPMASS from ``root/1000_train.csv`` and ``root/1000_test.csv`` (the mass-1000 files).

    File: a header ``# label, f0, ..., f26, mass``, then comma-separated rows with the class (1 signal, 0 background)
    first. MAF preprocessing: the ``mass`` column and the columns of :func:`maf_discrete_columns` (fitted on the
    training file) are removed; features standardised with the training mean / std. MAF keeps only the signal class;
    here both classes and their labels are kept. ``max_train`` / ``max_test`` read the first rows only (the full
training file has 7 million rows).
    """
    source = "https://archive.ics.uci.edu/dataset/347/hepmass"
    h_tr, tr = _read_hepmass_csv(_need(os.path.join(root, HEPMASS_FILES[0]), source), max_train)
    _, te = _read_hepmass_csv(_need(os.path.join(root, HEPMASS_FILES[1]), source), max_test)
    if tr.shape[1] != te.shape[1]:
        raise ValueError(f"{HEPMASS_FILES[0]} has {tr.shape[1]} columns but {HEPMASS_FILES[1]} has {te.shape[1]}")
    y_tr, x_tr = tr[:, 0], tr[:, 1:]
    y_te, x_te = te[:, 0], te[:, 1:]
    drop = set(maf_discrete_columns(x_tr).tolist())
    names = h_tr[1:]
    if "mass" in names and names.index("mass") < x_tr.shape[1]:
        drop.add(names.index("mass"))
    drop = np.asarray(sorted(drop), np.int64)
    x_tr, x_te = np.delete(x_tr, drop, axis=1), np.delete(x_te, drop, axis=1)
    return TabularData(x_tr, y_tr, x_te, y_te, "hepmass").standardized()


def load_sklearn(name: str, test_fraction: float = 0.3, seed: int = 0, dequantize_seed: int | None = None
                 ) -> TabularData:
    """scikit-learn's bundled ``digits`` (8x8 images, values 0..16 -> 64 features, 10 classes) or ``breast_cancer``
    (30 features, 2 classes), split stratified with ``seed`` and standardised with the training statistics.

    digits are integers, so a density model could put unbounded density on them: they are dequantised, x + u with
    u ~ U(0, 1) (``dequantize_seed``; None uses ``seed``), before standardising.
    """
    from sklearn import datasets

    if name == "digits":
        x, y = datasets.load_digits(return_X_y=True)
        rng = np.random.default_rng(seed if dequantize_seed is None else dequantize_seed)
        x = x + rng.uniform(0, 1, x.shape)
    elif name == "breast_cancer":
        x, y = datasets.load_breast_cancer(return_X_y=True)
    else:
        raise ValueError(f"name must be 'digits' or 'breast_cancer', got {name!r}")
    x_tr, y_tr, x_te, y_te = train_test_split_stratified(x, y, test_fraction, seed)
    return TabularData(x_tr, y_tr, x_te, y_te, name).standardized()
