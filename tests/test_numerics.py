"""Regression tests for the numerics found by differential fuzzing (issue 12), each on the backends it concerns:
the reproducer of the report and the bound that now holds. The random search itself is tests/test_fuzz_ops.py.
"""

from __future__ import annotations

import math

import pytest
import torch

import flowgmm_fast
from flowgmm_fast import functional as F
from flowgmm_fast.ops import reference as R
from helpers import backend_devices

FAST = [b for b in ("native", "triton") if "cpu" in backend_devices(b)]
ALL = ["torch"] + FAST


def _ops(backend):
    if backend == "native":
        from flowgmm_fast.ops import native_ops as ops
    elif backend == "triton":
        from flowgmm_fast.ops import triton_ops as ops
    else:
        ops = R
    return ops


@pytest.mark.parametrize("backend", FAST)
def test_tanh_slope_vanishes_at_saturation_and_is_accurate_before(backend):
    """d tanh/ds was stuck at 1.2e-7 for every saturated s on native (3e-5 in the s-gradient at s = 12 or 50 where
    the reference has 0); as 1 - tanh^2 it was also 2% off at |s| = 6."""
    s_vals = torch.tensor([[0.3, 3.0, 6.0, -6.0, 12.0, 50.0, -50.0]])
    x, t = torch.ones_like(s_vals), torch.full_like(s_vals, 0.5)
    scale = torch.ones(s_vals.shape[1]) * 1.5
    s = s_vals.clone().requires_grad_()
    with flowgmm_fast.use_backend(backend):
        y, ldj = F.affine_coupling(x, s, t, scale=scale)
    (y.sum() + ldj.sum()).backward()
    s64 = s_vals.double().requires_grad_()
    y64, ldj64 = R.affine_coupling(x.double(), s64, t.double(), scale.double(), None, -1, False, None)
    (y64.sum() + ldj64.sum()).backward()
    g, g64 = s.grad.double()[0], s64.grad[0]
    assert abs(g[5]) < 1e-30 and abs(g[6]) < 1e-30  # 0 where e^{2|s|} overflows (a denormal under the interpreter)
    assert abs(g[4]) < 1e-8  # s = 12: sech^2 = 1.5e-10
    torch.testing.assert_close(g[:5], g64[:5], rtol=2e-6, atol=1e-12)


@pytest.mark.parametrize("backend", ALL)
def test_logit_reverse_alpha_near_half_keeps_precision(backend):
    """1 - 2 alpha formed in fp32 gave 2500.83 instead of 2500.50 at alpha = 0.4999."""
    x = torch.tensor([[0.5, 0.9, 2.0, 5.0, 9.0]])
    with flowgmm_fast.use_backend(backend):
        y, ldj = F.logit_transform(x, alpha=0.4999, reverse=True)
        u, _ = F.logit_transform(torch.tensor([[0.01, 0.5, 0.99]]), alpha=0.4999)
    y64, ldj64 = R.logit_transform(x.double(), 0.4999, True, None, None)
    u64, _ = R.logit_transform(torch.tensor([[0.01, 0.5, 0.99]]).double(), 0.4999, False, None, None)
    torch.testing.assert_close(y.double(), y64, rtol=1e-6, atol=0)
    torch.testing.assert_close(u.double(), u64, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(ldj.double(), ldj64, rtol=1e-6, atol=0)


@pytest.mark.parametrize("backend", ALL)
def test_y_requires_grad_only_when_its_inputs_do(backend):
    x = torch.rand(2, 3, 4, 4) * 0.9 + 0.05
    sldj = torch.zeros(2, requires_grad=True)
    with flowgmm_fast.use_backend(backend):
        y, ldj = F.affine_coupling(x, x, x, mask=F.checkerboard(0), sldj=sldj)
        assert not y.requires_grad and ldj.requires_grad
        y, ldj = F.logit_transform(x, sldj=sldj)
        assert not y.requires_grad and ldj.requires_grad
        y, ldj = F.logit_transform(x, sldj=sldj, noise=torch.rand(2, 3, 4, 4, requires_grad=True))
        assert y.requires_grad and ldj.requires_grad
        y, ldj = F.affine_coupling(x, x.clone().requires_grad_(), x)
        assert y.requires_grad and ldj.requires_grad
        ldj.sum().backward()  # y not used: its gradient is absent, which every backend must accept


@pytest.mark.parametrize("backend", ALL)
def test_fp16_noise_gradient_does_not_overflow(backend):
    """dL/dnoise was formed as dL/dx / 255 from an fp16 dL/dx that overflows (x = 0, noise = 0.00165, alpha = 0)."""
    x = torch.zeros(1, 4, dtype=torch.float16, requires_grad=True)
    noise = torch.full((1, 4), 0.00165, dtype=torch.float16, requires_grad=True)
    with flowgmm_fast.use_backend(backend):
        y, _ = F.logit_transform(x, alpha=0.0, noise=noise)
    y.float().sum().backward()
    u = 0.00165 / 256
    expected = (1 / u + 1 / (1 - u)) / 256  # ~606
    assert torch.isfinite(noise.grad).all()
    torch.testing.assert_close(noise.grad.float(), torch.full((1, 4), expected), rtol=2e-3, atol=0)


@pytest.mark.parametrize("op", ["coupling", "logit"])
def test_native_log_det_over_a_very_large_sample(op):
    """A single float accumulator per SIMD lane over a 2048 x 2048 sample drifted by 1e-4 relative (coupling) and 5e-4
    (logit); blocked partials added in double keep it at float rounding."""
    if "native" not in FAST:
        pytest.skip("native backend not built")
    g = torch.Generator().manual_seed(0)
    shape = (1, 1, 2048, 2048)
    if op == "coupling":
        x = torch.randn(shape, generator=g)
        s = torch.randn(shape, generator=g) + 0.3
        scale = torch.tensor([1.3])
        with flowgmm_fast.use_backend("native"):
            _, ldj = F.affine_coupling(x, s.requires_grad_(), x, scale=scale.requires_grad_())
        _, ref = R.affine_coupling(x.double(), s.detach().double(), x.double(), scale.detach().double(), None, -1,
                                   False, None)
        ldj.sum().backward()
        gscale_ref = torch.tanh(s.detach().double()).sum()  # d ldj / d scale
        assert abs(scale.grad.double().item() - gscale_ref.item()) <= 2e-7 * abs(gscale_ref.item())
    else:
        x = torch.rand(shape, generator=g)
        with flowgmm_fast.use_backend("native"):
            _, ldj = F.logit_transform(x)
        _, ref = R.logit_transform(x.double(), 0.05, False, None, None)
    assert abs(ldj.double().item() - ref.item()) <= 2e-7 * abs(ref.item())


@pytest.mark.parametrize("backend", ALL)
def test_gmm_row_of_all_minus_inf_logits(backend):
    """Triton gave NaN where the reference gives +inf: every component infinitely far (sigma underflows)."""
    z = torch.randn(3, 5, generator=torch.Generator().manual_seed(0))
    means = z[:2] + 0.5
    log_std = torch.tensor([-60.0, -60.0])  # 1/sigma^2 = e^120 overflows fp32: log N = -inf unless z == mu
    with flowgmm_fast.use_backend(backend):
        nll, logits = F.gmm_nll(z, means, log_std, return_logits=True)
    assert torch.isinf(logits).all() and (logits < 0).all()
    assert torch.equal(nll, torch.full((3,), math.inf))


@pytest.mark.parametrize("backend", ALL)
def test_labels_outside_range_are_poisoned_not_read(backend):
    """Labels >= K (or < -1) are not range-checked on CUDA outside debug mode; native read out of bounds and triton
    returned nll = 0. Every backend's op now gives NaN for that sample (and its gradients), the others unchanged."""
    g = torch.Generator().manual_seed(1)
    z = torch.randn(5, 7, generator=g, requires_grad=True)
    means, log_std, wl = torch.randn(3, 7, generator=g), torch.zeros(3), torch.randn(3, generator=g)
    bad = torch.tensor([0, 3, -1, 17, -2])
    good = torch.tensor([0, 0, -1, 2, -1])
    ops = _ops(backend)
    nll_bad = ops.gmm_nll(z, means, log_std, wl, bad, 2.0)
    nll_good = ops.gmm_nll(z, means, log_std, wl, good, 2.0)
    ok = torch.tensor([True, False, True, False, False])
    assert torch.isnan(nll_bad[~ok]).all()
    torch.testing.assert_close(nll_bad[ok], nll_good[ok])
    (gz,) = torch.autograd.grad(nll_bad.sum(), z)
    assert torch.isnan(gz[~ok]).all() and torch.isfinite(gz[ok]).all()


@pytest.mark.parametrize("backend", ALL)
@pytest.mark.parametrize("diag", [False, True])
def test_gmm_closed_form_centred_on_the_means(backend, diag):
    """|z|^2 - 2 z.mu + |mu|^2 lost ~0.05 of logit at D = 3072 with means ~5 per dimension (fp32)."""
    g = torch.Generator().manual_seed(0)
    d = 3072
    means = 5 + 0.5 * torch.randn(10, d, generator=g, dtype=torch.float64)
    z = means[torch.arange(8) % 10] + torch.randn(8, d, generator=g, dtype=torch.float64)
    log_std = 0.1 * torch.randn((10, d) if diag else (10,), generator=g, dtype=torch.float64)
    z32, m32, ls32 = z.float(), means.float(), log_std.float()
    with flowgmm_fast.use_backend(backend):
        got = F.gmm_log_prob(z32, m32, ls32)
    ref = R.gmm_log_prob(z32.double(), m32.double(), ls32.double(), None)
    assert (got.double() - ref).abs().max() < 5e-3
