"""QuantileGaussianizer: the tabular preprocessing of FlowGMMClassifier."""

import numpy as np
import pytest
import torch

from flowgmm_fast.preprocessing import QuantileGaussianizer


def _table(n=4000, seed=0):
    rng = np.random.default_rng(seed)
    return np.c_[rng.standard_cauchy(n),                      # heavy tails
                 (rng.random(n) < 0.3).astype(float),         # binary flag: 70% zeros
                 np.full(n, 7.0),                             # constant
                 rng.integers(0, 5, n).astype(float),         # codes
                 rng.normal(size=n)]


def test_continuous_columns_become_standard_normal_and_outliers_are_clipped():
    x = _table()
    q = QuantileGaussianizer().fit(x)
    assert q.n_features_in == 5 and q.n_features_out == 4 and q.keep.tolist() == [True, True, False, True, True]
    z = q.transform(x)
    assert z.dtype == np.float32 and z.shape == (len(x), 4)
    for j in (0, 3):  # the Cauchy and the normal column (outputs 0 and 3): N(0, 1) whatever their scale
        assert abs(z[:, j].mean()) < 0.05 and abs(z[:, j].std() - 1) < 0.05
    bound = -float(torch.special.ndtri(torch.tensor(0.5 / 1000, dtype=torch.float64)))
    far = q.transform(np.array([[1e12, 0, 7, 0, -1e12]]))
    np.testing.assert_allclose(np.abs(far[0, [0, 3]]), bound, rtol=1e-5)
    assert np.abs(z).max() <= bound + 1e-5


def test_tied_values_cover_their_cdf_interval_and_dequantise_to_a_normal():
    x = _table()
    q = QuantileGaussianizer().fit(x)
    lo, hi = q.intervals(x)
    zeros = x[:, 1] == 0
    # the binary column's zeros cover [0, P(0)] and its ones [P(0), 1] (up to the clip and the quantile grid)
    assert np.allclose(lo[zeros, 1], q.eps) and abs(hi[zeros, 1].max() - zeros.mean()) < 2e-3
    assert abs(lo[~zeros, 1].min() - zeros.mean()) < 2e-3 and np.allclose(hi[~zeros, 1], 1 - q.eps)
    assert np.all(lo[:, 3] == hi[:, 3])                     # continuous values: a point
    z = QuantileGaussianizer.sample(torch.from_numpy(lo), torch.from_numpy(hi), torch.Generator().manual_seed(0))
    for j in (1, 2):                                        # the flag and the codes, dequantised: N(0, 1)
        assert abs(float(z[:, j].mean())) < 0.05 and abs(float(z[:, j].std()) - 1) < 0.05
    mid = q.transform(x)
    np.testing.assert_allclose(mid, QuantileGaussianizer.midpoint(lo, hi))
    assert len(np.unique(mid[:, 1])) == 2                   # prediction uses the interval midpoints


def test_inverse_transform_state_round_trip_and_errors():
    x = _table(2000, seed=1)
    q = QuantileGaussianizer(n_quantiles=500).fit(x)
    back = q.inverse_transform(q.transform(x))
    assert back.shape == x.shape and np.all(back[:, 2] == 7.0)
    np.testing.assert_array_equal(back[:, 1], x[:, 1])      # discrete values come back exactly
    inner = np.abs(x[:, 4]) < 2
    np.testing.assert_allclose(back[inner, 4], x[inner, 4], atol=0.05)
    r = QuantileGaussianizer.from_state(q.state())
    np.testing.assert_array_equal(r.transform(x), q.transform(x))
    with pytest.raises(ValueError, match="NaN or infinite"):
        q.transform(np.where(np.arange(x.size).reshape(x.shape) == 3, np.nan, x))
    with pytest.raises(ValueError, match="features"):
        q.transform(x[:, :4])
    with pytest.raises(ValueError, match="no varying column"):
        QuantileGaussianizer().fit(np.ones((10, 3)))
    with pytest.raises(ValueError, match="n_quantiles"):
        QuantileGaussianizer(n_quantiles=1)
    with pytest.raises(RuntimeError, match="not fitted"):
        QuantileGaussianizer().transform(x)
    bad = q.state()
    bad["quantiles"] = bad["quantiles"][:, ::-1]
    with pytest.raises(ValueError, match="non-decreasing"):
        QuantileGaussianizer.from_state(bad)
