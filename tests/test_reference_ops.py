"""The reference ops (the "torch" backend) against independent formulations: torch.distributions, the literal
formulas of the functional API, real-nvp's softplus log-det, and gradcheck. Plus input validation of every public op."""

import math

import pytest
import torch
from torch.distributions import Independent, MultivariateNormal, Normal

import flowgmm_fast.functional as F
from flowgmm_fast import debug
from helpers import use

f64 = torch.float64


@pytest.fixture(autouse=True)
def _torch_backend():
    with use("torch"):
        yield


def _gmm_inputs(b=6, k=4, d=5, diagonal=False, seed=0):
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(b, d, generator=g, dtype=f64) * 2
    means = torch.randn(k, d, generator=g, dtype=f64)
    log_std = 0.3 * torch.randn(*((k, d) if diagonal else (k,)), generator=g, dtype=f64)
    w = torch.randn(k, generator=g, dtype=f64)
    return z, means, log_std, w


def _distributions_logits(z, means, log_std, w):
    k, d = means.shape
    cols = []
    for i in range(k):
        if log_std.dim() == 1:
            dist = MultivariateNormal(means[i], torch.eye(d, dtype=f64) * torch.exp(2 * log_std[i]))
        else:
            dist = Independent(Normal(means[i], torch.exp(log_std[i])), 1)
        cols.append(dist.log_prob(z))
    log_n = torch.stack(cols, 1)
    log_pi = torch.log_softmax(w, 0) if w is not None else torch.full((k,), -math.log(k), dtype=f64)
    return log_n, log_n + log_pi


@pytest.mark.parametrize("diagonal", [False, True])
@pytest.mark.parametrize("weights", [False, True])
def test_gmm_log_prob_equals_torch_distributions(diagonal, weights):
    z, means, log_std, w = _gmm_inputs(diagonal=diagonal)
    w = w if weights else None
    _, expected = _distributions_logits(z, means, log_std, w)
    torch.testing.assert_close(F.gmm_log_prob(z, means, log_std, w), expected, rtol=0, atol=1e-10)


@pytest.mark.parametrize("diagonal", [False, True])
def test_gmm_nll_unlabeled_and_labeled_conventions(diagonal):
    z, means, log_std, w = _gmm_inputs(b=7, diagonal=diagonal)
    labels = torch.tensor([-1, 0, 3, -1, 2, 1, -1])
    log_n, logits = _distributions_logits(z, means, log_std, w)
    expected = torch.where(labels < 0, -torch.logsumexp(logits, 1),
                           -2.5 * log_n.gather(1, labels.clamp(min=0)[:, None]).squeeze(1))
    nll, got_logits = F.gmm_nll(z, means, log_std, w, labels, label_weight=2.5, return_logits=True)
    torch.testing.assert_close(nll, expected, rtol=0, atol=1e-10)
    torch.testing.assert_close(got_logits, logits, rtol=0, atol=1e-10)
    torch.testing.assert_close(F.gmm_nll(z, means, log_std, w), -torch.logsumexp(logits, 1), rtol=0, atol=1e-10)


def test_gmm_large_dimension_closed_form_is_accurate():
    # D = 3072 (CIFAR-sized latents) with |z| far from the means: the closed form must still match to 1e-10 relative
    z, means, log_std, w = _gmm_inputs(b=3, k=10, d=3072)
    _, expected = _distributions_logits(z, means, log_std, w)
    torch.testing.assert_close(F.gmm_log_prob(z, means, log_std, w), expected, rtol=1e-10, atol=0)


def _coupling_literal(x, s, t, scale, b, reverse, sldj):
    """The functional API's docstring formula, literally."""
    s_eff = s if scale is None else scale.view(1, -1, *([1] * (x.dim() - 2))) * torch.tanh(s)
    b = torch.zeros_like(x[0]) if b is None else b
    if reverse:
        y = b * x + (1 - b) * (x * torch.exp(-s_eff) - t)
    else:
        y = b * x + (1 - b) * ((x + t) * torch.exp(s_eff))
    ldj = ((1 - b) * s_eff).reshape(x.shape[0], -1).sum(1)
    return y, sldj + (-ldj if reverse else ldj)


MASKS = ["none", "checker0", "checker1", "channel_tensor", "spatial_tensor"]


def _mask_args(kind, c, h, w):
    if kind == "none":
        return None, None
    if kind.startswith("checker"):
        p = int(kind[-1])
        hh, ww = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
        return F.checkerboard(p), ((hh + ww + p) % 2).to(f64)
    if kind == "channel_tensor":
        m = (torch.arange(c) % 2).to(f64).view(c, 1, 1)
        return m, m
    m = (torch.rand(1, h, w, generator=torch.Generator().manual_seed(1)) > 0.5).to(f64)
    return m, m


@pytest.mark.parametrize("mask", MASKS)
@pytest.mark.parametrize("with_scale", [False, True])
@pytest.mark.parametrize("reverse", [False, True])
def test_affine_coupling_matches_formula(mask, with_scale, reverse):
    b_, c, h, w = 3, 4, 5, 6
    g = torch.Generator().manual_seed(2)
    x, s, t = (torch.randn(b_, c, h, w, generator=g, dtype=f64) for _ in range(3))
    scale = torch.rand(c, 1, 1, generator=g, dtype=f64) + 0.5 if with_scale else None
    sldj = torch.randn(b_, generator=g, dtype=f64)
    mask_arg, b = _mask_args(mask, c, h, w)
    y, out = F.affine_coupling(x, s, t, scale, mask_arg, reverse, sldj)
    y_ref, out_ref = _coupling_literal(x, s, t, scale, b, reverse, sldj)
    torch.testing.assert_close(y, y_ref, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(out, out_ref, rtol=1e-12, atol=1e-12)
    x_back, back = F.affine_coupling(y, s, t, scale, mask_arg, not reverse, out)
    torch.testing.assert_close(x_back, x, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(back, sldj, rtol=1e-10, atol=1e-10)


def test_affine_coupling_vectors_and_masked_positions_never_overflow():
    x = torch.randn(4, 6, dtype=f64)
    s = torch.full_like(x, 1e4)  # exp(1e4) = inf: masked positions must never see it
    t = torch.randn_like(x)
    b = torch.tensor([1.0, 1, 1, 0, 0, 0], dtype=f64)
    s[:, 3:] = 0.1
    y, ldj = F.affine_coupling(x, s, t, None, b)
    assert torch.isfinite(y).all() and torch.isfinite(ldj).all()
    torch.testing.assert_close(y[:, :3], x[:, :3])
    torch.testing.assert_close(ldj, torch.full((4,), 0.3, dtype=f64))


def test_squeeze_orders_explicitly():
    x = torch.arange(2 * 3 * 4 * 6, dtype=torch.float32).view(2, 3, 4, 6)
    y = F.squeeze2x2(x)
    for c in range(3):
        for i in range(2):
            for j in range(2):
                assert torch.equal(y[:, 4 * c + 2 * i + j], x[:, c, i::2, j::2])
    y = F.squeeze2x2(x, alt_order=True)
    for k, (i, j) in enumerate([(0, 0), (1, 1), (0, 1), (1, 0)]):
        assert torch.equal(y[:, 3 * k:3 * (k + 1)], x[:, :, i::2, j::2])
    for alt in (False, True):
        assert torch.equal(F.squeeze2x2(F.squeeze2x2(x, alt_order=alt), reverse=True, alt_order=alt), x)


def test_squeeze_matches_pixel_unshuffle():
    # default order equals torch's space-to-depth
    x = torch.randn(2, 3, 6, 8)
    assert torch.equal(F.squeeze2x2(x), torch.nn.functional.pixel_unshuffle(x, 2))


@pytest.mark.parametrize("alpha", [0.05, 0.0, 0.2])
def test_logit_transform_matches_realnvp_preprocessing(alpha):
    g = torch.Generator().manual_seed(3)
    x = torch.rand(3, 2, 4, 4, generator=g, dtype=f64)
    noise = torch.rand(x.shape, generator=g, dtype=f64)
    y, ldj = F.logit_transform(x, alpha, noise=noise)
    u = (255 * x + noise) / 256
    p = alpha + (1 - 2 * alpha) * u
    torch.testing.assert_close(y, torch.log(p / (1 - p)))
    # real-nvp's formula: softplus(y) + softplus(-y) - softplus(log(1 - c) - log c), c = 1 - 2 alpha
    c = torch.tensor(1 - 2 * alpha, dtype=f64)
    sp = torch.nn.functional.softplus
    expected = (sp(y) + sp(-y) - sp(torch.log(1 - c) - torch.log(c))).reshape(3, -1).sum(1)
    torch.testing.assert_close(ldj, expected, rtol=1e-12, atol=1e-10)
    x_back, zero = F.logit_transform(y, alpha, reverse=True, sldj=ldj)
    torch.testing.assert_close(x_back, u, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(zero, torch.zeros(3, dtype=f64), rtol=0, atol=1e-9)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_low_precision_dtypes_keep_float32_log_dets(dtype):
    x = torch.rand(2, 2, 4, 4).to(dtype)
    y, ldj = F.affine_coupling(x, torch.randn_like(x), torch.randn_like(x), torch.ones(2), F.checkerboard(0))
    assert y.dtype == dtype and ldj.dtype == torch.float32
    y, ldj = F.logit_transform(x.clamp(0.01, 0.99))
    assert y.dtype == dtype and ldj.dtype == torch.float32
    nll, logits = F.gmm_nll(x.reshape(2, -1), torch.zeros(3, 32, dtype=dtype), torch.zeros(3, dtype=dtype),
                            return_logits=True)
    assert nll.dtype == torch.float32 and logits.dtype == torch.float32


def test_gradcheck_every_functional_op():
    g = torch.Generator().manual_seed(4)

    def r(*shape, lo=None):
        v = torch.randn(*shape, generator=g, dtype=f64) if lo is None else lo + 0.8 * torch.rand(*shape, generator=g, dtype=f64)
        return v.requires_grad_()

    x, s, t, scale, sldj = r(2, 3, 4, 4), r(2, 3, 4, 4), r(2, 3, 4, 4), r(3, 1, 1), r(2)
    for mask in (None, F.checkerboard(1), (torch.arange(3) % 2).to(f64).view(3, 1, 1)):
        for reverse in (False, True):
            assert torch.autograd.gradcheck(lambda *a: F.affine_coupling(*a, mask, reverse, sldj),
                                            (x, s, t, scale))
    assert torch.autograd.gradcheck(lambda a: F.squeeze2x2(a, alt_order=True), (x,))
    u = r(2, 3, 4, 4, lo=0.1)
    noise = torch.rand(2, 3, 4, 4, generator=g, dtype=f64)
    assert torch.autograd.gradcheck(lambda a, b: F.logit_transform(a, 0.05, sldj=b, noise=noise), (u, sldj))
    assert torch.autograd.gradcheck(lambda a, b: F.logit_transform(a, 0.05, reverse=True, sldj=b), (x, sldj))
    z, means, w = r(5, 6), r(3, 6), r(3)
    labels = torch.tensor([-1, 0, 2, -1, 1])
    for log_std in (r(3), r(3, 6)):
        assert torch.autograd.gradcheck(lambda *a: F.gmm_nll(*a, labels, 1.7), (z, means, log_std, w))
        assert torch.autograd.gradcheck(F.gmm_log_prob, (z, means, log_std, w))


# ----------------------------------------------------------------------------------------------- input validation

def test_bad_inputs_name_the_argument():
    x = torch.randn(2, 3, 4, 4)
    cases = [
        (lambda: F.affine_coupling(x, x[:, :2], x), ValueError, "s must have the shape of x"),
        (lambda: F.affine_coupling(x, x, x.double()), TypeError, "t must have the dtype of x"),
        (lambda: F.affine_coupling(x.long(), x, x), TypeError, "x must be a floating tensor"),
        (lambda: F.affine_coupling(x, x, x, scale=torch.ones(4)), ValueError, "scale must be per-channel"),
        (lambda: F.affine_coupling(x, x, x, mask=torch.ones(5, 4)), ValueError, "mask must be broadcastable"),
        (lambda: F.affine_coupling(x[:, :, 0, 0], x[:, :, 0, 0], x[:, :, 0, 0], mask=F.checkerboard(0)), ValueError,
         "checkerboard(...) needs 4-D x"),
        (lambda: F.affine_coupling(x, x, x, sldj=torch.zeros(3)), ValueError, "sldj must have shape (2,)"),
        (lambda: F.affine_coupling(x, x, x, sldj=torch.zeros(2, dtype=torch.float16)), TypeError, "sldj must be"),
        (lambda: F.affine_coupling([1.0], x, x), TypeError, "x must be a torch.Tensor"),
        (lambda: F.checkerboard(2), ValueError, "parity must be 0 or 1"),
        (lambda: F.squeeze2x2(torch.randn(1, 1, 3, 4)), ValueError, "even height and width"),
        (lambda: F.squeeze2x2(torch.randn(1, 3, 2, 2), reverse=True), ValueError, "divisible by 4"),
        (lambda: F.squeeze2x2(torch.randn(3, 4)), ValueError, "x must have 4 dims"),
        (lambda: F.logit_transform(x, alpha=0.5), ValueError, "alpha must be"),
        (lambda: F.logit_transform(x, noise=torch.rand(2, 3)), ValueError, "noise must have the shape of x"),
        (lambda: F.logit_transform(x, reverse=True, noise=x), ValueError, "noise is only used"),
    ]
    z, means, log_std = torch.randn(4, 5), torch.randn(3, 5), torch.zeros(3)
    cases += [
        (lambda: F.gmm_nll(z, torch.randn(3, 4), log_std), ValueError, "means must have shape (K, 5)"),
        (lambda: F.gmm_nll(z, means, torch.zeros(3, 4)), ValueError, "log_std must have shape (3,)"),
        (lambda: F.gmm_nll(z, means, log_std, torch.zeros(2)), ValueError, "weight_logits must have shape (3,)"),
        (lambda: F.gmm_nll(z[0], means, log_std), ValueError, "z must have 2 dims"),
        (lambda: F.gmm_nll(z, means, log_std, labels=torch.tensor([0, 1, 3, -1])), ValueError,
         "labels must be in [-1, 3)"),
        (lambda: F.gmm_nll(z, means, log_std, labels=torch.tensor([0, 1, -2, -1])), ValueError, "labels must be in"),
        (lambda: F.gmm_nll(z, means, log_std, labels=torch.zeros(4)), TypeError, "labels must be an int64"),
        (lambda: F.gmm_nll(z, means, log_std, labels=torch.zeros(3, dtype=torch.long)), ValueError,
         "labels must have shape (4,)"),
        (lambda: F.gmm_log_prob(z, means.double(), log_std), None, None),
    ]
    for fn, exc, msg in cases:
        if exc is None:
            fn()
            continue
        with pytest.raises(exc) as info:
            fn()
        assert msg in str(info.value), f"expected {msg!r} in {info.value!r}"


def test_debug_mode_reports_non_finite_values():
    x = torch.randn(2, 2, 4, 4)
    x[0, 0, 0, 0] = float("nan")
    F.affine_coupling(x, x, x)  # off by default: no check, no sync
    debug.enable()
    try:
        with pytest.raises(debug.NonFiniteError, match="x has 1 non-finite"):
            F.affine_coupling(x, x, x)
    finally:
        debug.enable(False)
