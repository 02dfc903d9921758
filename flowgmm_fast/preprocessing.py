"""Feature preprocessing for FlowGMM on tables: a per-column Gaussianising quantile transform with dequantisation.

Real tables have heavy tails (counts, frequencies), outliers, constant columns and discrete columns (binary flags,
binned codes, integers). A flow fitted to such columns directly either spends its capacity on the tails or, on a
discrete column, can raise the likelihood without bound by piling density onto the few values the column takes.
:class:`QuantileGaussianizer` maps every column to (close to) a standard normal before the flow sees it:

    u = F_j(x)           the column's empirical CDF, read from ``n_quantiles`` reference quantiles of the data
    z = Phi^{-1}(u)      clipped to u in [eps, 1 - eps], eps = 0.5 / n_quantiles (|z| <= 3.29 for 1000 quantiles)

A value that several reference quantiles share (a tie: a discrete value, a fill value, the zeros of a sparse count)
covers the CDF interval [u_lo, u_hi] instead of a point. For training, :meth:`QuantileGaussianizer.sample` draws u
uniformly in that interval anew for every batch (dequantisation: the jittered column is continuous and its marginal is
exactly uniform in u, i.e. standard normal in z); for prediction, :meth:`QuantileGaussianizer.transform` takes the
interval's midpoint (:meth:`QuantileGaussianizer.inverse_transform` maps z back to the original units). Continuous
values interpolate linearly between the reference quantiles (ties averaged forward and
backward). Values outside the fitted range clip to the end quantiles, so an outlier cannot push the flow's input beyond
|z| <= Phi^{-1}(1 - eps). Columns that are constant on the fitted rows are dropped (``keep``; their value is kept in
``constants`` for the inverse).

Everything fitted is a few numpy arrays (:meth:`state`, :meth:`from_state`), saved with a model without pickle.
"""

from __future__ import annotations

import numpy as np
import torch

__all__ = ["QuantileGaussianizer"]


def _ndtri(u: np.ndarray) -> np.ndarray:
    """Phi^{-1}(u) (float64), through torch.special (scipy is not a dependency)."""
    return torch.special.ndtri(torch.from_numpy(np.ascontiguousarray(u, dtype=np.float64))).numpy()


class QuantileGaussianizer:
    """Per-column empirical-CDF -> standard-normal transform with interval dequantisation of tied values.

    n_quantiles: reference quantiles stored per column (fewer when there are fewer rows). Fit it on every row that
    is available without labels too (the transform needs no labels). After :meth:`fit`: ``n_features_in`` (columns
    of the input), ``keep`` (bool mask of the non-constant columns the output keeps), ``constants`` (the values of
    the dropped columns), ``quantiles`` ((n_kept, n_quantiles) float64 reference values), ``n_features_out``.
    """

    def __init__(self, n_quantiles: int = 1000):
        if not isinstance(n_quantiles, (int, np.integer)) or isinstance(n_quantiles, bool) or n_quantiles < 2:
            raise ValueError(f"n_quantiles must be an int >= 2, got {n_quantiles!r}")
        self.n_quantiles = int(n_quantiles)
        self.keep: np.ndarray | None = None
        self.constants: np.ndarray | None = None
        self.quantiles: np.ndarray | None = None

    # ------------------------------------------------------------------------------------------------ fitting
    def fit(self, x) -> "QuantileGaussianizer":
        x = self._as_2d(x, "x")
        if x.shape[0] < 2:
            raise ValueError(f"x must have at least 2 rows to fit the quantile transform, got {x.shape[0]}")
        self.keep = np.ptp(x, axis=0) > 0
        if not self.keep.any():
            raise ValueError("x has no varying column: every feature is constant over the rows given")
        self.constants = x[0, ~self.keep].copy()
        q = min(self.n_quantiles, x.shape[0])
        grid = np.linspace(0.0, 1.0, q)
        self.quantiles = np.ascontiguousarray(np.quantile(x[:, self.keep], grid, axis=0).T)
        return self

    @property
    def n_features_in(self) -> int:
        self._check_fitted()
        return int(self.keep.size)

    @property
    def n_features_out(self) -> int:
        self._check_fitted()
        return int(self.keep.sum())

    @property
    def eps(self) -> float:
        """Clip bound of u: half a quantile step."""
        self._check_fitted()
        return 0.5 / self.quantiles.shape[1]

    # ------------------------------------------------------------------------------------------------ mapping
    def intervals(self, x) -> tuple[np.ndarray, np.ndarray]:
        """(u_lo, u_hi), each (N, n_features_out) float64 in [eps, 1 - eps]: the CDF interval each value covers
        (u_lo == u_hi for a value no two reference quantiles share)."""
        self._check_fitted()
        x = self._as_2d(x, "x")
        if x.shape[1] != self.keep.size:
            raise ValueError(f"x has {x.shape[1]} features, but the transform was fitted on {self.keep.size}")
        x = x[:, self.keep]
        q = self.quantiles.shape[1]
        grid = np.linspace(0.0, 1.0, q)
        lo = np.empty(x.shape, np.float64)
        hi = np.empty(x.shape, np.float64)
        for j in range(x.shape[1]):
            ref, col = self.quantiles[j], x[:, j]
            # forward and backward interpolation averaged: the midpoint of a run of equal references (sklearn's rule)
            mid = 0.5 * (np.interp(col, ref, grid) - np.interp(-col, -ref[::-1], -grid[::-1]))
            left = np.searchsorted(ref, col, side="left")
            right = np.searchsorted(ref, col, side="right") - 1
            tied = right > left  # the value is shared by two or more reference quantiles
            lo[:, j] = np.where(tied, grid[np.clip(left, 0, q - 1)], mid)
            hi[:, j] = np.where(tied, grid[np.clip(right, 0, q - 1)], mid)
        eps = self.eps
        return np.clip(lo, eps, 1 - eps), np.clip(hi, eps, 1 - eps)

    def transform(self, x) -> np.ndarray:
        """(N, n_features_out) float32: z = Phi^{-1} of each value's CDF midpoint (deterministic; for prediction)."""
        return self.midpoint(*self.intervals(x))

    @staticmethod
    def midpoint(u_lo: np.ndarray, u_hi: np.ndarray) -> np.ndarray:
        """float32 z = Phi^{-1}((u_lo + u_hi) / 2): :meth:`transform` from precomputed :meth:`intervals`."""
        return _ndtri(0.5 * (u_lo + u_hi)).astype(np.float32)

    def inverse_transform(self, z) -> np.ndarray:
        """(N, n_features_in) float64: features in the original units for (N, n_features_out) z (u = Phi(z), then
        the column's quantile function, interpolated; dropped constant columns take their value)."""
        self._check_fitted()
        z = self._as_2d(z, "z")
        if z.shape[1] != self.n_features_out:
            raise ValueError(f"z must have {self.n_features_out} columns, got {z.shape[1]}")
        u = torch.special.ndtr(torch.from_numpy(z)).numpy()
        grid = np.linspace(0.0, 1.0, self.quantiles.shape[1])
        out = np.empty((z.shape[0], self.keep.size))
        out[:, ~self.keep] = self.constants
        out[:, self.keep] = np.stack([np.interp(u[:, j], grid, self.quantiles[j]) for j in range(z.shape[1])], 1)
        return out

    @staticmethod
    def sample(u_lo: torch.Tensor, u_hi: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """z = Phi^{-1}(u), u ~ U(u_lo, u_hi) per element (dequantised training features; float32 out)."""
        r = torch.rand(u_lo.shape, generator=generator, dtype=u_lo.dtype, device=u_lo.device)
        return torch.special.ndtri(u_lo + (u_hi - u_lo) * r).float()

    # ------------------------------------------------------------------------------------------------ state
    def state(self) -> dict[str, np.ndarray]:
        """The fitted arrays (``keep`` bool, ``constants`` and ``quantiles`` float64); :meth:`from_state` rebuilds
        the transform."""
        self._check_fitted()
        return {"keep": self.keep.copy(), "constants": self.constants.copy(), "quantiles": self.quantiles.copy()}

    @classmethod
    def from_state(cls, state: dict) -> "QuantileGaussianizer":
        keep = np.asarray(state["keep"]).astype(bool)
        quantiles = np.asarray(state["quantiles"], np.float64)
        constants = np.asarray(state["constants"], np.float64)
        if (keep.ndim != 1 or quantiles.ndim != 2 or quantiles.shape[0] != keep.sum() or quantiles.shape[1] < 2
                or constants.shape != ((~keep).sum(),)):
            raise ValueError(f"inconsistent QuantileGaussianizer state: keep {keep.shape} with {int(keep.sum())} "
                             f"kept columns, quantiles {quantiles.shape}, constants {constants.shape}")
        if not np.all(np.diff(quantiles, axis=1) >= 0):
            raise ValueError("inconsistent QuantileGaussianizer state: quantiles must be non-decreasing per column")
        out = cls(n_quantiles=quantiles.shape[1])
        out.keep, out.quantiles, out.constants = keep, quantiles, constants
        return out

    # ------------------------------------------------------------------------------------------------ helpers
    def _check_fitted(self):
        if self.quantiles is None:
            raise RuntimeError("QuantileGaussianizer is not fitted: call fit(x) first")

    @staticmethod
    def _as_2d(x, name: str) -> np.ndarray:
        x = np.asarray(x, dtype=np.float64)
        if x.ndim != 2:
            raise ValueError(f"{name} must be a 2-D (N, D) array, got shape {x.shape}")
        if not np.isfinite(x).all():
            raise ValueError(f"{name} contains NaN or infinite values")
        return x

    def __repr__(self) -> str:
        fitted = "" if self.quantiles is None else f", fitted on {self.keep.size} columns ({self.n_features_out} kept)"
        return f"QuantileGaussianizer(n_quantiles={self.n_quantiles}{fitted})"

