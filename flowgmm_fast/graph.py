"""Spreading class posteriors along a k-nearest-neighbour graph of the training rows (label spreading, Zhou et al.,
"Learning with Local and Global Consistency", NIPS 2003), started from a model's class posteriors.

:class:`~flowgmm_fast.FlowGMMClassifier` uses it as its last step: FlowGMM fits one Gaussian per class in a flow's
latent space, which cannot follow a class made of several clusters (the styles of a hand-written digit); a graph of
the training rows can. Started from FlowGMM's posteriors (weighted by ``start_weight``) with the labeled rows
clamped to their labels, the spreading keeps FlowGMM's answer where the graph has nothing to add and corrects it
where the neighbours disagree. A new row gets the mean of its ``n_neighbors`` nearest training rows' spread
distributions (as scikit-learn's ``LabelSpreading(kernel="knn")`` predicts).

Needs scikit-learn and SciPy (the ``[sklearn]`` extra).
"""

from __future__ import annotations

import numbers

import numpy as np

from .nn._checks import check_int

__all__ = ["KNNSpreading", "pixel_pca", "spread_labels"]


def _check_real(name, value, lo, hi=None, lo_closed=True):
    """``value`` as a finite float in [lo, hi) (``(lo, hi)`` without ``lo_closed``; no upper bound when hi is None)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not np.isfinite(value):
        raise TypeError(f"{name} must be a finite number, got {value!r}")
    if value < lo or (value == lo and not lo_closed) or (hi is not None and value >= hi):
        raise ValueError(f"{name} must be in {'[' if lo_closed else '('}{lo}, {hi if hi is not None else 'inf'}), "
                         f"got {value!r}")
    return float(value)


def check_posterior_inputs(x, start, labels):
    """The inputs of a step fitted from a model's posteriors: ``x`` (n, d) and ``start`` (n, K) as float64,
    ``labels`` (n,) holding -1 (unlabeled) or a class code in [0, K); a clear error otherwise."""
    x = np.ascontiguousarray(x, dtype=np.float64)
    start = np.asarray(start, dtype=np.float64)
    labels = np.asarray(labels)
    if x.ndim != 2 or start.ndim != 2 or labels.ndim != 1 or not (x.shape[0] == start.shape[0] == labels.shape[0]):
        raise ValueError(f"x (n, d), start (n, K) and labels (n,) must agree in n; got {x.shape}, {start.shape}, "
                         f"{labels.shape}")
    k_classes = start.shape[1]
    if labels.min(initial=0) < -1 or labels.max(initial=-1) >= k_classes:
        raise ValueError(f"labels must be -1 (unlabeled) or a class code in [0, {k_classes}), got values in "
                         f"[{labels.min()}, {labels.max()}]")
    return x, start, labels


def _clamp(y0: np.ndarray, labels: np.ndarray, rows: np.ndarray) -> np.ndarray:
    """Y0 of the spreading: ``y0`` (n, K) with the selected ``rows`` (a mask) replaced by their labels' one-hot."""
    y0[rows] = 0.0
    y0[rows, labels[rows]] = 1.0
    return y0


class KNNSpreading:
    """Label spreading on the kNN graph of ``x`` (n_rows, n_features).

    fit(x, start, labels): ``start`` (n_rows, n_classes) the model's class posteriors, ``labels`` (n_rows,) class
    codes 0..K-1 for labeled rows and -1 for unlabeled ones. Y0 = one-hot on labeled rows, ``start_weight`` x start
    on the others; F solves F = alpha S F + (1 - alpha) Y0 with S = D^-1/2 W D^-1/2 (W: the symmetrised kNN graph),
    by iteration to ``tol``. ``distributions_`` is F with rows normalised.
    predict_proba(x_new): the mean of the distributions of each new row's ``n_neighbors`` nearest training rows.
    """

    def __init__(self, n_neighbors: int = 7, alpha: float = 0.9, start_weight: float = 0.05, max_iter: int = 1000,
                 tol: float = 1e-6):
        self.n_neighbors = check_int("n_neighbors", n_neighbors, 1)
        self.alpha = _check_real("alpha", alpha, 0.0, 1.0)
        self.start_weight = _check_real("start_weight", start_weight, 0.0)
        self.max_iter = check_int("max_iter", max_iter, 1)
        self.tol = _check_real("tol", tol, 0.0, lo_closed=False)

    def _index(self):
        from sklearn.neighbors import NearestNeighbors

        if getattr(self, "_nn", None) is None:
            self._nn = NearestNeighbors(n_neighbors=self.k_).fit(self.x_)
        return self._nn

    def fit(self, x, start, labels) -> "KNNSpreading":
        from scipy import sparse

        x, start, labels = check_posterior_inputs(x, start, labels)
        n = start.shape[0]
        if n < 2:
            raise ValueError(f"x needs at least 2 rows for a neighbour graph, got {n}")
        self.x_ = x
        self.k_ = min(self.n_neighbors, n - 1)
        self._nn = self._s = None
        _, idx = self._index().kneighbors(x, n_neighbors=self.k_ + 1)
        # drop each row itself (the first neighbour; for duplicated rows, whichever copy came first)
        own = idx == np.arange(n)[:, None]
        keep = np.where(own.any(1, keepdims=True), ~own, np.arange(self.k_ + 1)[None] < self.k_)
        cols = idx[keep].reshape(n, self.k_)
        w = sparse.csr_matrix((np.ones(n * self.k_), (np.repeat(np.arange(n), self.k_), cols.ravel())), shape=(n, n))
        w = w.maximum(w.T)
        deg = np.asarray(w.sum(1)).ravel()
        d = sparse.diags(1.0 / np.sqrt(deg))
        # the normalised graph, kept for fold_predictions until release_graph() (not in the saved state)
        self._s = (d @ w @ d).tocsr()
        f = self._spread(_clamp(self.start_weight * start, labels, labels >= 0))
        total = f.sum(1, keepdims=True)
        # a row that no labeled row and no start mass reaches (start_weight 0, a component of the graph without
        # labels) falls back to its start distribution
        self.distributions_ = np.where(total > 0, f / np.where(total > 0, total, 1.0), start)
        return self

    def _spread(self, y0: np.ndarray) -> np.ndarray:
        """F = alpha S F + (1 - alpha) Y0 on the fitted graph, iterated to ``tol`` (sets ``n_iter_``)."""
        f = y0.copy()
        self.n_iter_ = 0
        for self.n_iter_ in range(1, self.max_iter + 1):
            f_new = self.alpha * (self._s @ f) + (1.0 - self.alpha) * y0
            done = np.abs(f_new - f).max() <= self.tol * max(np.abs(f_new).max(), 1e-300)
            f = f_new
            if done:
                break
        return f

    def fold_predictions(self, labels, folds) -> np.ndarray:
        """Plain label spreading (no start distribution) on the fitted graph, asked to recover held-out labels: for
        each fold (an array of labeled row indices) the fold's labels are hidden and spread from the other labeled
        rows. Returns the predicted class of every held-out row, folds concatenated in order (-1 for a row no label
        reaches). Uses no model posterior, so a model trained on every label does not leak into it."""
        if getattr(self, "_s", None) is None:
            raise RuntimeError("fold_predictions needs the graph of fit(); a model restored from its state or after "
                               "release_graph() has none")
        labels = np.asarray(labels)
        k_classes = self.distributions_.shape[1]
        n_iter, out = self.n_iter_, []
        for fold in folds:
            fold = np.asarray(fold)
            keep = labels >= 0
            keep[fold] = False
            f = self._spread(_clamp(np.zeros((labels.size, k_classes)), labels, keep))[fold]
            out.append(np.where(f.sum(1) > 0, f.argmax(1), -1))
        self.n_iter_ = n_iter  # the fit's
        return np.concatenate(out) if out else np.zeros(0, np.int64)

    def release_graph(self) -> KNNSpreading:
        """Free the normalised graph that fit() keeps for :meth:`fold_predictions` (about 2 x n_neighbors x n_rows
        entries); predict_proba does not need it. fold_predictions raises afterwards."""
        self._s = None
        return self

    def predict_proba(self, x) -> np.ndarray:
        x = np.ascontiguousarray(x, dtype=np.float64)
        if x.ndim != 2 or x.shape[1] != self.x_.shape[1]:
            raise ValueError(f"x must have shape (n, {self.x_.shape[1]}), got {x.shape}")
        if x.shape[0] == 0:
            return np.zeros((0, self.distributions_.shape[1]))
        _, idx = self._index().kneighbors(x, n_neighbors=self.k_)
        return self.distributions_[idx].mean(1)

    def state(self) -> dict:
        return {"x": self.x_, "distributions": self.distributions_}

    @classmethod
    def from_state(cls, state: dict, **params) -> "KNNSpreading":
        obj = cls(**params)
        obj.x_ = np.ascontiguousarray(state["x"], dtype=np.float64)
        obj.distributions_ = np.asarray(state["distributions"], dtype=np.float64)
        obj.k_ = min(obj.n_neighbors, obj.x_.shape[0] - 1)
        obj._nn = obj._s = None
        return obj


def pixel_pca(train_images, other_images=(), n_components: int = 50, seed: int = 0) -> list[np.ndarray]:
    """Features of images for a neighbour graph: the pixels scaled to [0, 1] (uint8 in, any shape (N, ...)),
    flattened, projected on the first ``n_components`` principal components of ``train_images`` (fitted without
    labels; 0 keeps the pixels). Returns float32 arrays: the training images' first, then each of ``other_images``'."""
    def flat(images):
        images = np.asarray(images)
        return images.reshape(len(images), -1).astype(np.float32) / 255.0

    x_train = flat(train_images)
    rest = [flat(images) for images in other_images]
    n_components = check_int("n_components", n_components, 0)
    if n_components == 0:
        return [x_train, *rest]
    if n_components > min(x_train.shape):
        raise ValueError(f"n_components must be at most {min(x_train.shape)} for {x_train.shape[0]} training images "
                         f"of {x_train.shape[1]} values, got {n_components}")
    from sklearn.decomposition import PCA

    pca = PCA(n_components, random_state=seed).fit(x_train)
    return [pca.transform(x).astype(np.float32) for x in (x_train, *rest)]


def spread_labels(x, labels, num_classes: int, **params) -> KNNSpreading:
    """Plain label spreading on the kNN graph of ``x`` (n, d): :class:`KNNSpreading` with no start distribution
    (``start_weight`` 0), only the labeled rows' one-hot labels (``labels``: class codes, -1 for unlabeled).
    ``params``: KNNSpreading's other parameters. Its ``distributions_`` are the spread class distributions of the
    rows; ``predict_proba`` gives new rows theirs."""
    labels = np.asarray(labels)
    start = np.full((len(labels), num_classes), 1.0 / num_classes)
    return KNNSpreading(start_weight=0.0, **params).fit(x, start, labels)
