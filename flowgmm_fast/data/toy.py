"""2-D synthetic data sets for semi-supervised FlowGMM (the toy experiments of Izmailov et al., ICML 2020, Fig. 3).

Every generator returns ``(x, y)`` with ``x: (n, 2) float32`` and ``y: (n,) int64`` class labels, is deterministic for a
given ``seed`` (a private ``numpy.random.Generator``; the global RNG is never touched) and roughly centred at the origin
with unit-order spread, so the flow sees standardised-scale inputs.

    two_moons      2 classes, the interleaved half circles of scikit-learn's ``make_moons``
    circles        2 classes, two concentric rings (radius 1 and 0.5 by default)
    eight_gaussians 8 classes, one isotropic Gaussian per point of a circle of radius 2
    pinwheel       5 classes, the spiral "pinwheel" arms of Johnson et al. (NeurIPS 2016)
"""

from __future__ import annotations

import math

import numpy as np

__all__ = ["two_moons", "circles", "eight_gaussians", "pinwheel", "DATASETS", "make_toy"]


def _check_n(n_samples: int) -> int:
    if not isinstance(n_samples, (int, np.integer)) or isinstance(n_samples, bool) or n_samples <= 0:
        raise ValueError(f"n_samples must be a positive int, got {n_samples!r}")
    return int(n_samples)


def _check_noise(noise: float) -> float:
    if not (isinstance(noise, (int, float)) and noise >= 0 and math.isfinite(noise)):
        raise ValueError(f"noise must be a finite float >= 0, got {noise!r}")
    return float(noise)


def _finish(x: np.ndarray, y: np.ndarray, rng: np.random.Generator):
    order = rng.permutation(len(y))
    return x[order].astype(np.float32), y[order].astype(np.int64)


def _split_counts(n: int, k: int) -> list[int]:
    return [n // k + (1 if i < n % k else 0) for i in range(k)]


def two_moons(n_samples: int = 1000, noise: float = 0.1, seed: int = 0):
    """Two interleaved half circles; x is shifted/scaled to zero mean and about unit spread."""
    n, noise = _check_n(n_samples), _check_noise(noise)
    rng = np.random.default_rng(seed)
    n0, n1 = _split_counts(n, 2)
    a0, a1 = rng.uniform(0, math.pi, n0), rng.uniform(0, math.pi, n1)
    upper = np.stack([np.cos(a0), np.sin(a0)], 1)
    lower = np.stack([1 - np.cos(a1), 0.5 - np.sin(a1)], 1)
    x = np.concatenate([upper, lower]) + noise * rng.standard_normal((n, 2))
    x = (x - np.array([0.5, 0.25])) / 0.75
    y = np.concatenate([np.zeros(n0), np.ones(n1)])
    return _finish(x, y, rng)


def circles(n_samples: int = 1000, noise: float = 0.05, factor: float = 0.5, seed: int = 0):
    """Two concentric rings: class 0 the outer ring of radius 1.5, class 1 the inner one of radius 1.5 * factor."""
    n, noise = _check_n(n_samples), _check_noise(noise)
    if not 0 < factor < 1:
        raise ValueError(f"factor must be in (0, 1) (inner radius / outer radius), got {factor!r}")
    rng = np.random.default_rng(seed)
    counts = _split_counts(n, 2)
    parts = []
    for radius, m in zip((1.5, 1.5 * factor), counts):
        a = rng.uniform(0, 2 * math.pi, m)
        parts.append(radius * np.stack([np.cos(a), np.sin(a)], 1))
    x = np.concatenate(parts) + noise * 1.5 * rng.standard_normal((n, 2))
    y = np.concatenate([np.full(m, c) for c, m in enumerate(counts)])
    return _finish(x, y, rng)


def eight_gaussians(n_samples: int = 1000, noise: float = 0.2, seed: int = 0):
    """Eight Gaussians of std ``noise`` centred on a circle of radius 2; class k is the k-th centre."""
    n, noise = _check_n(n_samples), _check_noise(noise)
    rng = np.random.default_rng(seed)
    counts = _split_counts(n, 8)
    angles = 2 * math.pi * np.arange(8) / 8
    centres = 2 * np.stack([np.cos(angles), np.sin(angles)], 1)
    x = np.concatenate([c + noise * rng.standard_normal((m, 2)) for c, m in zip(centres, counts)])
    y = np.concatenate([np.full(m, k) for k, m in enumerate(counts)])
    return _finish(x, y, rng)


def pinwheel(n_samples: int = 1000, num_classes: int = 5, radial_std: float = 0.3, tangential_std: float = 0.05,
             rate: float = 0.25, seed: int = 0):
    """Spiral arms: for arm k, a point at radius r ~ N(1, radial_std) is rotated by 2 pi k / K + rate * e^r."""
    n = _check_n(n_samples)
    if not isinstance(num_classes, int) or num_classes < 2:
        raise ValueError(f"num_classes must be an int >= 2, got {num_classes!r}")
    rng = np.random.default_rng(seed)
    counts = _split_counts(n, num_classes)
    y = np.concatenate([np.full(m, k) for k, m in enumerate(counts)])
    feats = rng.standard_normal((n, 2)) * np.array([radial_std, tangential_std])
    feats[:, 0] += 1.0
    angles = 2 * math.pi * y / num_classes + rate * np.exp(feats[:, 0])
    rot = np.stack([np.cos(angles), -np.sin(angles), np.sin(angles), np.cos(angles)], 1).reshape(-1, 2, 2)
    x = 2 * np.einsum("ti,tij->tj", feats, rot)
    return _finish(x, y, rng)


DATASETS = {"two_moons": two_moons, "circles": circles, "eight_gaussians": eight_gaussians, "pinwheel": pinwheel}


def make_toy(name: str, n_samples: int = 1000, seed: int = 0, **kwargs):
    """``DATASETS[name](n_samples, seed=seed, **kwargs)`` with a clear error for an unknown name."""
    if name not in DATASETS:
        raise ValueError(f"name must be one of {sorted(DATASETS)}, got {name!r}")
    return DATASETS[name](n_samples, seed=seed, **kwargs)
