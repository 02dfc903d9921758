"""flowgmm_fast.semisup: the light FlowGMM loop for vectors (demo, synthetic figures, results runner)."""

import pytest
import torch

from flowgmm_fast.data.tabular import balanced_labeled_indices, semisup_labels
from flowgmm_fast.data.toy import eight_gaussians, two_moons
from flowgmm_fast.semisup import (FitConfig, accuracy, build_tabular_flowgmm, fit_flowgmm, init_means_from_labeled,
                                  steps_for_epochs)


def _moons(n=200):
    x, y = two_moons(n, seed=0)
    return torch.from_numpy(x), torch.from_numpy(semisup_labels(y, balanced_labeled_indices(y, 6, seed=0))), y


def _weights(model):
    return torch.cat([p.detach().flatten() for p in model.parameters()])


def test_fit_depends_on_seed_only_and_leaves_caller_rng():
    x, labels, _ = _moons()

    def run(seed):
        model = build_tabular_flowgmm(2, 2, num_coupling_layers=2, hidden_dim=16, dropout=0.5, seed=0)
        fit_flowgmm(model, x, labels, FitConfig(steps=4, batch_size=64, seed=seed), progress=False)
        return _weights(model)

    a = run(0)
    torch.rand(11)  # consume global RNG between runs: must not matter
    state = torch.get_rng_state()
    b = run(0)
    assert torch.equal(torch.get_rng_state(), state)
    assert torch.equal(a, b) and not torch.equal(a, run(1))


def test_fit_trains_semi_supervised_and_labels_only():
    x, labels, y = _moons(300)
    for weight in (1.0, 0.0):
        model = build_tabular_flowgmm(2, 2, num_coupling_layers=3, hidden_dim=32, dropout=0.0, seed=0)
        init_means_from_labeled(model, x, labels)  # the random +-3.75 direction can oppose the classes (RESULTS.md)
        hist = fit_flowgmm(model, x, labels, FitConfig(steps=60, lr=3e-3, batch_size=300, unlabeled_weight=weight,
                                                       log_every=10), progress=False)
        assert len(hist) == 6 and hist[-1]["step"] == 60 and hist[-1]["lr"] == pytest.approx(0, abs=1e-12)
        assert hist[-1]["loss"] < hist[0]["loss"]
        assert (hist[-1]["nll_unlabeled"] == 0) == (weight == 0)
        assert not model.training
        assert accuracy(model, x, torch.from_numpy(y)) > 0.75


def test_init_means_from_labeled_puts_means_at_class_latents():
    x, y = eight_gaussians(400, noise=0.05, seed=0)
    labels = torch.from_numpy(semisup_labels(y, balanced_labeled_indices(y, 16, seed=0)))
    x = torch.from_numpy(x)
    model = build_tabular_flowgmm(2, 8, num_coupling_layers=2, hidden_dim=16, seed=0)
    means = init_means_from_labeled(model, x, labels, min_separation=None).clone()
    model.eval()
    with torch.no_grad():
        z, _ = model.encode(x[labels >= 0])
    for k in range(8):
        torch.testing.assert_close(means[k], z[labels[labels >= 0] == k].mean(0))
    assert accuracy(model, x, torch.from_numpy(y)) > 0.95   # nearest class-mean already separates 8 tight blobs
    sigma = float(torch.exp(model.prior.log_std).max())
    assert float(torch.pdist(means).min()) < 4 * sigma         # blobs 1.5 apart: closer than 4 sigma = 5.25
    spread = init_means_from_labeled(model, x, labels)         # default: scaled about the centroid to 4 sigma
    assert abs(float(torch.pdist(spread).min()) - 4 * sigma) < 1e-4
    ratio = (spread - spread.mean(0)).norm(dim=1) / (means - means.mean(0)).norm(dim=1)
    torch.testing.assert_close(ratio, torch.full_like(ratio, float(ratio[0])))
    with pytest.raises(ValueError, match="min_separation"):
        init_means_from_labeled(model, x, labels, min_separation=0.0)


def test_fit_rejects_bad_input():
    x, labels, _ = _moons(50)
    model = build_tabular_flowgmm(2, 2, num_coupling_layers=2, hidden_dim=8, seed=0)
    with pytest.raises(ValueError, match="labels must be an int64"):
        fit_flowgmm(model, x, labels.int(), FitConfig(steps=1), progress=False)
    with pytest.raises(ValueError, match="labels must lie in"):
        fit_flowgmm(model, x, labels.clamp(max=0) + 2 * (labels == 1), FitConfig(steps=1), progress=False)
    with pytest.raises(ValueError, match="nothing to train on"):
        fit_flowgmm(model, x, torch.full_like(labels, -1), FitConfig(steps=1, unlabeled_weight=0.0), progress=False)
    with pytest.raises(ValueError, match="steps"):
        FitConfig(steps=0)
    assert steps_for_epochs(2, 1000, 300) == 8
