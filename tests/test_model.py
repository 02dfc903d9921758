"""FlowGMM model: its outputs agree with each other and with the prior/flow, and a tiny model learns."""

import math

import pytest
import torch

import flowgmm_fast as ff
from flowgmm_fast.nn import GaussianMixture, RealNVP, RealNVPTabular, init_means
from helpers import use

f64 = torch.float64


@pytest.fixture(autouse=True)
def _torch_backend():
    with use("torch"):
        yield


def _image_model():
    torch.manual_seed(0)
    return ff.FlowGMM(RealNVP(1, 2, 4, 1), GaussianMixture(3, 16), event_shape=(1, 4, 4)).double().eval()


def test_forward_log_prob_nll_and_bits_per_dim_agree():
    model = _image_model()
    x = torch.rand(5, 1, 4, 4, dtype=f64)
    labels = torch.tensor([-1, 0, 2, -1, 1])
    out = model(x, labels, label_weight=3.0)
    torch.testing.assert_close(out.nll, model.nll(x, labels, 3.0))
    torch.testing.assert_close(-out.nll, model.log_prob(x, labels, 3.0))
    z, sldj = model.flow(x)
    torch.testing.assert_close(out.z, z.reshape(5, -1))
    prior = model.prior
    log_n = torch.stack([torch.distributions.MultivariateNormal(
        prior.means[k], torch.eye(16, dtype=f64) * torch.exp(2 * prior.log_std[k])).log_prob(out.z) for k in range(3)], 1)
    unl = torch.logsumexp(log_n + math.log(1 / 3), 1) + sldj
    lab = 3.0 * log_n.gather(1, labels.clamp(min=0)[:, None]).squeeze(1) + sldj
    torch.testing.assert_close(-out.nll, torch.where(labels < 0, unl, lab))
    bpd = model.bits_per_dim(x)
    torch.testing.assert_close(bpd, (model.nll(x) + 16 * math.log(256)) / (16 * math.log(2)))


def test_predictions_are_the_argmax_of_the_class_posterior():
    model = _image_model()
    x = torch.rand(6, 1, 4, 4, dtype=f64)
    logits = model.class_logits(x)
    torch.testing.assert_close(logits, model(x).logits)
    proba = model.predict_proba(x)
    torch.testing.assert_close(proba.sum(1), torch.ones(6, dtype=f64))
    assert torch.equal(model.predict(x), proba.argmax(1))


def test_sampling_inverts_the_flow_and_needs_a_shape():
    model = _image_model()
    x = model.sample(4, class_id=1, generator=torch.Generator().manual_seed(0))
    assert x.shape == (4, 1, 4, 4)
    z, _ = model.encode(x)
    direct = model.prior.sample(4, 1, torch.Generator().manual_seed(0))
    torch.testing.assert_close(z, direct, rtol=1e-8, atol=1e-8)
    no_shape = ff.FlowGMM(RealNVP(1, 2, 4, 1), GaussianMixture(3, 16))
    with pytest.raises(ValueError, match="event_shape"):
        no_shape.sample(2)
    tab = ff.FlowGMM(RealNVPTabular(3, 2, 8), GaussianMixture(2, 3))
    assert tab.sample(5).shape == (5, 3)
    with pytest.raises(ValueError, match="class_id must be in"):
        tab.sample(1, class_id=2)


def test_prior_parametrisation_and_initialisations():
    prior = GaussianMixture(4, 6, std=1.0)
    torch.testing.assert_close(prior.log_std.exp(), torch.ones(4))
    tab = GaussianMixture(2, 6, means_init="tabular", std=math.log1p(math.e))
    torch.testing.assert_close(tab.means[0], -tab.means[1])
    torch.testing.assert_close(tab.means[0].norm(), torch.tensor(3.75))
    torch.testing.assert_close(tab.log_std.exp(), torch.full((2,), math.log1p(math.e)))
    assert not tab.means.requires_grad and GaussianMixture(2, 3, means_trainable=True).means.requires_grad
    diag = GaussianMixture(3, 5, covariance="diagonal", std_trainable=True)
    assert diag.log_std.shape == (3, 5) and diag.std_raw.requires_grad
    g = torch.Generator().manual_seed(0)
    m = init_means(10, 5000, "random", r=2.0, generator=g)
    assert abs(m.std().item() - 2.0) < 0.05
    with pytest.raises(ValueError, match="covariance must be one of"):
        GaussianMixture(2, 2, covariance="full")
    with pytest.raises(ValueError, match=r"means must have shape \(2, 3\)"):
        GaussianMixture(2, 3, means=torch.zeros(3, 2))
    with pytest.raises(ValueError, match="latent has 4 dims but the prior has dim=3"):
        ff.FlowGMM(RealNVPTabular(4, 2, 8), GaussianMixture(2, 3))(torch.randn(2, 4))


def test_tiny_semi_supervised_model_learns_two_blobs():
    # convergence check: labeled + unlabeled NLL training separates two well-separated blobs
    g = torch.Generator().manual_seed(0)
    n = 256
    y = torch.randint(0, 2, (n,), generator=g)
    x = torch.randn(n, 2, generator=g) * 0.5 + torch.stack([y * 4.0 - 2.0, torch.zeros(n)], 1)
    labels = torch.full((n,), -1)
    labels[:4] = y[:4]
    torch.manual_seed(0)
    model = ff.FlowGMM(RealNVPTabular(2, 3, 32, dropout=0.0), GaussianMixture(2, 2, means_init="tabular"))
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    first = None
    for _ in range(150):
        loss = model(x, labels).nll.mean()
        first = loss.item() if first is None else first
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < first - 0.5
    acc = (model.eval().predict(x) == y).float().mean().item()
    assert acc > 0.95, acc
