"""Baselines of the FlowGMM paper's tabular / text experiments, on the same features and label splits as FlowGMM.

Every baseline takes ``x: (N, D) float32`` training features, a semi-supervised label vector ``labels: (N,) int64``
(-1 = unlabeled) and test features, and returns the (N_test,) predicted classes:

    knn                    k-nearest neighbours on the labeled points (k = min(5, labels per class))
    logistic_regression    L2 logistic regression on the labeled points
    label_spreading        scikit-learn LabelSpreading (kNN graph over labeled + unlabeled points)
    mlp                    3-layer MLP with dropout, trained on the labeled points only (the paper's "3-layer NN")
    pi_model               the same MLP with the Pi-model consistency term (Laine & Aila, ICLR 2017): squared
                           difference of the softmax outputs for two Gaussian input-noise draws, on all points, its
                           weight ramped up as exp(-5 (1 - t)^2) over the first 40% of steps

``run_baselines`` runs a chosen set and returns test accuracies.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch
from torch import nn

__all__ = ["knn", "logistic_regression", "label_spreading", "mlp", "pi_model", "BASELINES", "NNConfig",
           "run_baselines", "MLP"]


def _check(x, labels, x_test):
    x, x_test, labels = np.asarray(x), np.asarray(x_test), np.asarray(labels)
    if x.ndim != 2 or x_test.ndim != 2 or x.shape[1] != x_test.shape[1]:
        raise ValueError(f"x and x_test must be (N, D) arrays with the same D, got {x.shape} and {x_test.shape}")
    if labels.shape != (x.shape[0],) or not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(f"labels must be an integer array of shape ({x.shape[0]},) with -1 for unlabeled points")
    lab = labels >= 0
    if lab.sum() == 0:
        raise ValueError("labels must contain at least one labeled point (label >= 0)")
    if np.unique(labels[lab]).size < 2:
        raise ValueError("labels must contain at least two classes among the labeled points")
    return x.astype(np.float32), labels.astype(np.int64), x_test.astype(np.float32), lab


def knn(x, labels, x_test, seed: int = 0, k: int | None = None) -> np.ndarray:
    from sklearn.neighbors import KNeighborsClassifier

    x, labels, x_test, lab = _check(x, labels, x_test)
    per_class = np.bincount(labels[lab]).max()
    k = min(5, int(per_class)) if k is None else k
    return KNeighborsClassifier(n_neighbors=k).fit(x[lab], labels[lab]).predict(x_test)


def logistic_regression(x, labels, x_test, seed: int = 0, c: float = 1.0) -> np.ndarray:
    from sklearn.linear_model import LogisticRegression

    x, labels, x_test, lab = _check(x, labels, x_test)
    return LogisticRegression(C=c, max_iter=5000, random_state=seed).fit(x[lab], labels[lab]).predict(x_test)


def label_spreading(x, labels, x_test, seed: int = 0, n_neighbors: int = 10, alpha: float = 0.99) -> np.ndarray:
    """Transductive on the training points; test points take the class of the spread label distribution of their
    nearest training neighbours (sklearn's ``predict``)."""
    from sklearn.semi_supervised import LabelSpreading

    x, labels, x_test, lab = _check(x, labels, x_test)
    model = LabelSpreading(kernel="knn", n_neighbors=n_neighbors, alpha=alpha, max_iter=2000)
    return model.fit(x, labels).predict(x_test)


class MLP(nn.Module):
    """Linear(D, k) - ReLU - Dropout - Linear(k, k) - ReLU - Dropout - Linear(k, K): the paper's 3-layer NN."""

    def __init__(self, dim: int, num_classes: int, hidden_dim: int = 256, dropout: float = 0.5):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(dim, hidden_dim), nn.ReLU(), nn.Dropout(dropout),
                                 nn.Linear(hidden_dim, hidden_dim), nn.ReLU(), nn.Dropout(dropout),
                                 nn.Linear(hidden_dim, num_classes))

    def forward(self, x):
        return self.net(x)


@dataclass
class NNConfig:
    """MLP / Pi-model training: AdamW with a cosine schedule, full labeled batch + ``batch_size`` unlabeled points."""

    steps: int = 1000
    lr: float = 1e-3
    weight_decay: float = 1e-4
    hidden_dim: int = 256
    dropout: float = 0.5
    batch_size: int = 512
    noise_std: float = 0.3
    consistency_weight: float = 10.0
    rampup_fraction: float = 0.4

    def __post_init__(self):
        if self.steps < 1 or self.lr <= 0 or self.batch_size < 1:
            raise ValueError("steps and batch_size must be >= 1 and lr > 0")
        if not 0 <= self.dropout < 1:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout!r}")


def _train_nn(x, labels, x_test, seed: int, config: NNConfig, consistency: bool) -> np.ndarray:
    x, labels, x_test, lab = _check(x, labels, x_test)
    num_classes = int(labels.max()) + 1
    gen = torch.Generator().manual_seed(seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = MLP(x.shape[1], num_classes, config.hidden_dim, config.dropout)
        xt, yt = torch.from_numpy(x), torch.from_numpy(labels)
        x_lab, y_lab = xt[torch.from_numpy(lab)], yt[torch.from_numpy(lab)]
        opt = torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=config.steps)
        ramp = max(1, int(config.rampup_fraction * config.steps))
        model.train()
        for step in range(config.steps):
            loss = nn.functional.cross_entropy(model(x_lab), y_lab)
            if consistency:
                idx = torch.randint(0, xt.shape[0], (min(config.batch_size, xt.shape[0]),), generator=gen)
                xb = xt[idx]
                n1 = torch.randn(xb.shape, generator=gen) * config.noise_std
                n2 = torch.randn(xb.shape, generator=gen) * config.noise_std
                p1 = torch.softmax(model(xb + n1), 1)
                p2 = torch.softmax(model(xb + n2), 1)
                w = config.consistency_weight * math.exp(-5 * (1 - min(1.0, (step + 1) / ramp)) ** 2)
                loss = loss + w * ((p1 - p2) ** 2).sum(1).mean()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
        model.eval()
        with torch.no_grad():
            return model(torch.from_numpy(x_test)).argmax(1).numpy()


def mlp(x, labels, x_test, seed: int = 0, config: NNConfig | None = None) -> np.ndarray:
    return _train_nn(x, labels, x_test, seed, config or NNConfig(), consistency=False)


def pi_model(x, labels, x_test, seed: int = 0, config: NNConfig | None = None) -> np.ndarray:
    return _train_nn(x, labels, x_test, seed, config or NNConfig(), consistency=True)


BASELINES: dict[str, Callable] = {"knn": knn, "logistic_regression": logistic_regression,
                                  "label_spreading": label_spreading, "mlp": mlp, "pi_model": pi_model}


def run_baselines(x, labels, x_test, y_test, methods=tuple(BASELINES), seed: int = 0,
                  nn_config: NNConfig | None = None) -> dict[str, float]:
    """{method: test accuracy} for each of ``methods`` (names of :data:`BASELINES`)."""
    y_test = np.asarray(y_test)
    unknown = [m for m in methods if m not in BASELINES]
    if unknown:
        raise ValueError(f"methods must be among {sorted(BASELINES)}, got unknown {unknown}")
    out = {}
    for m in methods:
        kwargs = {"config": nn_config} if m in ("mlp", "pi_model") and nn_config is not None else {}
        pred = BASELINES[m](x, labels, x_test, seed=seed, **kwargs)
        out[m] = float((pred == y_test).mean())
    return out
