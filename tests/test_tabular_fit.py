"""flowgmm_fast.semisup: the tabular FlowGMM loop (estimator, tabular script, demo, figure scripts)."""

import pytest
import torch

from flowgmm_fast.data.tabular import balanced_labeled_indices, semisup_labels
from flowgmm_fast.data.toy import eight_gaussians, two_moons
from flowgmm_fast.semisup import (FitConfig, accuracy, build_tabular_flowgmm, fit_flowgmm, init_means_from_labeled,
                                  init_std_from_labeled, steps_for_epochs)


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
        res = fit_flowgmm(model, x, labels, FitConfig(steps=60, lr=3e-3, batch_size=300, unlabeled_weight=weight,
                                                      log_every=10), progress=False)
        hist = res.history
        assert len(hist) == 6 and hist[-1]["step"] == 60 and res.steps == 60
        assert hist[-1]["train/lr_flow"] == pytest.approx(0, abs=1e-12)
        assert hist[-1]["train/loss"] < hist[0]["train/loss"]
        assert (hist[-1]["train/nll_unlabeled"] == 0) == (weight == 0)
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


def test_init_from_labeled_takes_precomputed_latents():
    """z= (the labeled rows' latents, computed once by the caller) gives what encoding inside does."""
    x, y = eight_gaussians(200, noise=0.05, seed=1)
    labels = torch.from_numpy(semisup_labels(y, balanced_labeled_indices(y, 24, seed=0)))
    x = torch.from_numpy(x)
    model = build_tabular_flowgmm(2, 8, num_coupling_layers=2, hidden_dim=16, seed=0)
    means = init_means_from_labeled(model, x, labels, min_separation=None).clone()
    sigma = init_std_from_labeled(model, x, labels)
    model.eval()
    with torch.no_grad():
        z, _ = model.encode(x[labels >= 0])
    model.prior.means.data.zero_()
    torch.testing.assert_close(init_means_from_labeled(model, x, labels, min_separation=None, z=z), means)
    assert init_std_from_labeled(model, x, labels, z=z) == pytest.approx(sigma, rel=1e-6)
    with pytest.raises(ValueError, match="z must be the"):
        init_means_from_labeled(model, x, labels, z=z[:-1])


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
    with pytest.raises(ValueError, match="not both"):
        FitConfig(steps=3, epochs=2)
    with pytest.raises(ValueError, match="validation_fraction"):
        FitConfig(validation_fraction=1.0)
    assert steps_for_epochs(2, 1000, 300) == 8


def test_labels_only_run_never_feeds_unlabeled_rows_to_the_flow():
    x, labels, _ = _moons(200)
    model = build_tabular_flowgmm(2, 2, num_coupling_layers=2, hidden_dim=8, seed=0)
    seen = []
    handle = model.flow.register_forward_pre_hook(lambda mod, args: seen.append(args[0].shape[0]))
    fit_flowgmm(model, x, labels, FitConfig(steps=3, unlabeled_weight=0.0), progress=False)
    handle.remove()
    assert seen == [int((labels >= 0).sum())] * 3


def test_em_priors_recover_the_class_balance_of_the_unlabeled_rows():
    """Balanced labels, 85/15 unlabeled rows: the EM steps move the mixture weights from uniform to the data's."""
    gen = torch.Generator().manual_seed(0)
    n0, n1 = 850, 150
    x = torch.cat([torch.randn(n0, 2, generator=gen) * 0.5 - 2, torch.randn(n1, 2, generator=gen) * 0.5 + 2])
    labels = torch.full((n0 + n1,), -1)
    labels[:5], labels[n0:n0 + 5] = 0, 1
    model = build_tabular_flowgmm(2, 2, num_coupling_layers=1, hidden_dim=8, dropout=0.0, seed=0,
                                  identity_init=True)
    init_means_from_labeled(model, x, labels, min_separation=None)
    res = fit_flowgmm(model, x, labels, FitConfig(steps=20, lr=1e-3, batch_size=250, learn_priors=True),
                      progress=False)
    weights = torch.softmax(model.prior.weight_logits, 0)
    assert len(res.epochs) == 5 and all("weights" in e for e in res.epochs)
    torch.testing.assert_close(weights, torch.tensor([0.85, 0.15]), atol=0.02, rtol=0)


def test_early_stopping_keeps_the_best_heldout_epoch_and_stops():
    x, labels, _ = _moons(400)
    model = build_tabular_flowgmm(2, 2, num_coupling_layers=2, hidden_dim=16, dropout=0.0, seed=0)
    init_means_from_labeled(model, x, labels)
    cfg = FitConfig(epochs=400, lr=3e-2, batch_size=64, validation_fraction=0.25, patience=3, seed=1)
    res = fit_flowgmm(model, x, labels, cfg, progress=False)
    assert res.stopped_early and res.steps < 400 * 5
    vals = [e["val_nll"] for e in res.epochs]
    best = min(range(len(vals)), key=vals.__getitem__)
    assert res.best_step == res.epochs[best]["step"]
    assert all(v >= vals[best] - cfg.min_delta for v in vals[best + 1:]) and len(vals) - 1 - best == cfg.patience
    # the model kept is the best epoch's: its held-out NLL is the best one
    from flowgmm_fast.semisup import _split_validation
    _, val = _split_validation(labels, cfg)
    with torch.no_grad():
        assert float(model.nll(x[val]).mean()) == pytest.approx(vals[best], rel=1e-5)


@pytest.mark.parametrize("invertible", [False, True], ids=["standard", "invertible"])
def test_step_in_backward_fits_the_same_model(invertible):
    """FitConfig(step_in_backward=True): AdamW stepped per parameter inside the backward pass, the same weights as the
    standard step (both without clipping, which the fused step cannot do and refuses)."""
    x, labels, _ = _moons()

    def run(fused):
        model = build_tabular_flowgmm(2, 2, num_coupling_layers=3, hidden_dim=16, dropout=0.5, seed=0,
                                      means_trainable=True, invertible_backprop=invertible)
        fit_flowgmm(model, x, labels, FitConfig(steps=5, batch_size=64, grad_clip=None, step_in_backward=fused),
                    progress=False)
        return _weights(model)

    start = _weights(build_tabular_flowgmm(2, 2, num_coupling_layers=3, hidden_dim=16, dropout=0.5, seed=0))
    std, fused = run(False), run(True)
    assert not torch.equal(std[:start.numel()], start)
    torch.testing.assert_close(fused, std, rtol=1e-6, atol=1e-7)
    with pytest.raises(ValueError, match="grad_clip=None"):
        FitConfig(steps=1, step_in_backward=True)
