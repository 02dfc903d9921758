"""A logistic-regression student distilled from a model's class posteriors on the training rows.

:class:`~flowgmm_fast.FlowGMMClassifier` uses it as one of its two prediction steps (with
:class:`~flowgmm_fast.graph.KNNSpreading`): FlowGMM's posteriors on the unlabeled training rows become soft targets
(each unlabeled row enters once per class, weighted by its posterior for that class), the labeled rows keep their
labels with a larger weight, and a regularised multinomial logistic regression on the preprocessed features is
fitted to both. The student keeps what the flow found about the unlabeled rows' classes but draws a linear,
regularised boundary through them, where the flow's one Gaussian per class can be overconfident.

Needs scikit-learn (the ``[sklearn]`` extra).
"""

from __future__ import annotations

import numpy as np

from .graph import _check_real, check_posterior_inputs
from .nn._checks import check_int

__all__ = ["LogisticStudent"]


class LogisticStudent:
    """fit(x, start, labels): ``x`` (n_rows, n_features), ``start`` (n_rows, n_classes) the teacher's class
    posteriors, ``labels`` (n_rows,) class codes 0..K-1 for labeled rows and -1 for unlabeled ones. Fits
    ``LogisticRegression(C=C)`` to the labeled rows (weight ``labeled_weight`` each) and to every unlabeled row once
    per class with weight start[row, class]. At most ``max_rows`` (unlabeled rows x classes) enter: above that, a
    random subset of the unlabeled rows (``seed``) is used.
    predict_proba(x_new): the fitted regression's class probabilities, (n, n_classes).
    """

    def __init__(self, C: float = 0.1, labeled_weight: float = 5.0, max_rows: int = 200_000, max_iter: int = 2000,
                 seed: int = 0):
        self.C = _check_real("C", C, 0.0, lo_closed=False)
        self.labeled_weight = _check_real("labeled_weight", labeled_weight, 0.0, lo_closed=False)
        self.max_rows = check_int("max_rows", max_rows, 1)
        self.max_iter = check_int("max_iter", max_iter, 1)
        self.seed = check_int("seed", seed, 0)

    def fit(self, x, start, labels) -> LogisticStudent:
        from sklearn.linear_model import LogisticRegression

        x, start, labels = check_posterior_inputs(x, start, labels)
        k_classes = start.shape[1]
        lab = labels >= 0
        unl = np.flatnonzero(~lab)
        if unl.size * k_classes > self.max_rows:
            unl = np.sort(np.random.default_rng(self.seed).choice(unl, self.max_rows // k_classes, replace=False))
        xs = np.concatenate([x[lab]] + [x[unl]] * k_classes)
        ys = np.concatenate([labels[lab]] + [np.full(unl.size, k) for k in range(k_classes)])
        ws = np.concatenate([np.full(int(lab.sum()), self.labeled_weight)] + [start[unl, k] for k in range(k_classes)])
        keep = ws > 0
        xs, ys, ws = xs[keep], ys[keep], ws[keep]
        present = np.unique(ys)
        self.n_classes_ = k_classes
        if present.size < 2:  # one class carries all the weight: the student answers it everywhere
            self.classes_ = present
            self.coef_ = np.zeros((1, x.shape[1]))
            self.intercept_ = np.zeros(1)
            return self
        reg = LogisticRegression(C=self.C, max_iter=self.max_iter).fit(xs, ys, sample_weight=ws)
        self.classes_ = reg.classes_.astype(np.int64)
        self.coef_ = np.asarray(reg.coef_, dtype=np.float64)
        self.intercept_ = np.asarray(reg.intercept_, dtype=np.float64)
        return self

    def predict_proba(self, x) -> np.ndarray:
        x = np.ascontiguousarray(x, dtype=np.float64)
        if x.ndim != 2 or x.shape[1] != self.coef_.shape[1]:
            raise ValueError(f"x must have shape (n, {self.coef_.shape[1]}), got {x.shape}")
        out = np.zeros((x.shape[0], self.n_classes_))
        if self.classes_.size < 2:
            out[:, self.classes_] = 1.0
            return out
        from scipy.special import expit, softmax

        scores = x @ self.coef_.T + self.intercept_
        if self.classes_.size == 2:  # scikit-learn's binary form: one row of coefficients for the second class
            p1 = expit(scores[:, 0])
            probs = np.stack([1.0 - p1, p1], 1)
        else:
            probs = softmax(scores, axis=1)
        out[:, self.classes_] = probs
        return out

    def state(self) -> dict:
        return {"coef": self.coef_, "intercept": self.intercept_, "classes": self.classes_}

    @classmethod
    def from_state(cls, state: dict, n_classes: int, **params) -> LogisticStudent:
        obj = cls(**params)
        obj.coef_ = np.asarray(state["coef"], dtype=np.float64)
        obj.intercept_ = np.asarray(state["intercept"], dtype=np.float64)
        obj.classes_ = np.asarray(state["classes"], dtype=np.int64)
        obj.n_classes_ = int(n_classes)
        return obj
