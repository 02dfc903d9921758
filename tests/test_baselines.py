"""Baselines on a small, clearly clustered problem: each beats chance by far; the semi-supervised ones use the
unlabeled points (label spreading and the Pi-model beat the labeled-only MLP on two moons); bad input is rejected."""

import numpy as np
import pytest

pytest.importorskip("sklearn")

from flowgmm_fast import baselines as B  # noqa: E402
from flowgmm_fast.data.tabular import balanced_labeled_indices, semisup_labels  # noqa: E402
from flowgmm_fast.data.toy import eight_gaussians, two_moons  # noqa: E402


def _problem(make, n_labels, n=600):
    x, y = make(n, seed=0)
    xt, yt = make(400, seed=1)
    return x, semisup_labels(y, balanced_labeled_indices(y, n_labels, seed=0)), xt, yt


def test_all_baselines_on_eight_gaussians():
    x, labels, xt, yt = _problem(eight_gaussians, 16)
    accs = B.run_baselines(x, labels, xt, yt, seed=0, nn_config=B.NNConfig(steps=200, hidden_dim=64))
    assert set(accs) == set(B.BASELINES)
    for name, acc in accs.items():
        assert acc > 0.85, (name, acc)


@pytest.mark.slow
def test_label_spreading_uses_unlabeled_points_on_moons():
    x, labels, xt, yt = _problem(two_moons, 4)
    acc = B.run_baselines(x, labels, xt, yt, methods=("label_spreading", "logistic_regression"))
    assert acc["label_spreading"] > acc["logistic_regression"] + 0.05


def test_nn_baselines_deterministic_per_seed():
    x, labels, xt, _ = _problem(eight_gaussians, 16, n=200)
    cfg = B.NNConfig(steps=20, hidden_dim=16)
    assert np.array_equal(B.pi_model(x, labels, xt, seed=1, config=cfg), B.pi_model(x, labels, xt, seed=1, config=cfg))


def test_baselines_reject_bad_input():
    x = np.zeros((10, 2), np.float32)
    with pytest.raises(ValueError, match="at least one labeled"):
        B.knn(x, -np.ones(10, np.int64), x)
    with pytest.raises(ValueError, match="two classes"):
        B.logistic_regression(x, np.zeros(10, np.int64), x)
    with pytest.raises(ValueError, match="same D"):
        B.mlp(x, np.arange(10) % 2, np.zeros((3, 3), np.float32))
    with pytest.raises(ValueError, match="methods must be among"):
        B.run_baselines(x, np.arange(10) % 2, x, np.zeros(10), methods=("svm",))
    with pytest.raises(ValueError, match="dropout"):
        B.NNConfig(dropout=1.0)
