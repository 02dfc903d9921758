"""2-D synthetic data sets: shapes, dtypes, class counts, determinism and argument checks."""

import numpy as np
import pytest

from flowgmm_fast.data import toy


@pytest.mark.parametrize("name,k", [("two_moons", 2), ("circles", 2), ("eight_gaussians", 8), ("pinwheel", 5)])
@pytest.mark.parametrize("n", [1, 7, 203])
def test_toy_shapes_classes_determinism(name, k, n):
    x, y = toy.make_toy(name, n, seed=5)
    assert x.shape == (n, 2) and x.dtype == np.float32 and y.shape == (n,) and y.dtype == np.int64
    assert np.isfinite(x).all() and y.min() >= 0 and y.max() < k
    counts = np.bincount(y, minlength=k)
    assert counts.max() - counts.min() <= 1       # balanced
    x2, y2 = toy.make_toy(name, n, seed=5)
    assert np.array_equal(x, x2) and np.array_equal(y, y2)
    if n > 10:
        x3, _ = toy.make_toy(name, n, seed=6)
        assert not np.allclose(x, x3)
        assert np.abs(x).max() < 6                 # unit-order scale


def test_toy_geometry():
    x, y = toy.circles(2000, noise=0.0, seed=0)
    r = np.linalg.norm(x, axis=1)
    assert np.allclose(r[y == 0], 1.5, atol=1e-5) and np.allclose(r[y == 1], 0.75, atol=1e-5)
    x, y = toy.eight_gaussians(800, noise=0.0, seed=0)
    centres = {k: x[y == k].mean(0) for k in range(8)}
    assert all(np.isclose(np.linalg.norm(c), 2, atol=1e-5) for c in centres.values())


def test_toy_bad_arguments():
    with pytest.raises(ValueError, match="name must be one of"):
        toy.make_toy("spirals")
    with pytest.raises(ValueError, match="n_samples"):
        toy.two_moons(0)
    with pytest.raises(ValueError, match="noise"):
        toy.two_moons(10, noise=-1.0)
    with pytest.raises(ValueError, match="factor"):
        toy.circles(10, factor=1.5)
    with pytest.raises(ValueError, match="num_classes"):
        toy.pinwheel(10, num_classes=1)
