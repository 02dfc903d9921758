"""Checks that need a CUDA device (skipped without one): the fast backends run on their input's device even when
another is current, their reductions are bitwise repeatable (no float atomics), and the native GMM backward takes a
batch past one grid of row chunks (grid-stride; it used to refuse with "batch too large")."""

from __future__ import annotations

import pytest
import torch

from flowgmm_fast import functional as F
from helpers import backend_devices, use

CUDA_BACKENDS = [b for b in ("native", "triton") if "cuda" in backend_devices(b)]
pytestmark = pytest.mark.skipif(not CUDA_BACKENDS, reason="needs a CUDA device and a fast backend that runs on it")


def _chain(backend: str, device, seed: int = 0):
    """Loss and gradients through every op with a reduction: coupling (per-channel scale, checkerboard) -> logit ->
    squeeze -> GMM (diagonal, weight logits, mixed labels)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(16, 3, 8, 8, generator=g).mul(0.9).add(0.05).to(device).requires_grad_()
    s = torch.randn(16, 3, 8, 8, generator=g).to(device).requires_grad_()
    t = torch.randn(16, 3, 8, 8, generator=g).to(device).requires_grad_()
    scale = torch.rand(3, generator=g).add(0.5).to(device).requires_grad_()
    means = torch.randn(5, 192, generator=g).to(device).requires_grad_()
    log_std = (0.1 * torch.randn(5, 192, generator=g)).to(device).requires_grad_()
    w = torch.randn(5, generator=g).to(device).requires_grad_()
    labels = torch.randint(-1, 5, (16,), generator=g).to(device)
    with use(backend):
        y, ldj = F.logit_transform(x, 0.05)
        y, ldj = F.affine_coupling(y, s, t, scale, F.checkerboard(0), sldj=ldj)
        z = F.squeeze2x2(y).flatten(1)
        loss = (F.gmm_nll(z, means, log_std, w, labels, 0.5) - ldj).sum()
    leaves = [x, s, t, scale, means, log_std, w]
    return [loss.detach(), *torch.autograd.grad(loss, leaves)]


@pytest.mark.parametrize("backend", CUDA_BACKENDS)
def test_two_identical_runs_are_bitwise_equal(backend):
    first, second = _chain(backend, "cuda"), _chain(backend, "cuda")
    for a, b in zip(first, second):
        assert torch.equal(a, b)


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA devices")
@pytest.mark.parametrize("backend", CUDA_BACKENDS)
def test_runs_on_the_inputs_device_while_another_is_current(backend):
    with torch.cuda.device(0):
        got = _chain(backend, "cuda:1")
        want = _chain(backend, "cuda:0")
    for a, b in zip(got, want):
        assert a.device == torch.device("cuda", 1)
        torch.testing.assert_close(a.to(b.device), b)


@pytest.mark.skipif("native" not in CUDA_BACKENDS, reason="needs the native CUDA kernels")
def test_native_gmm_backward_past_one_grid_of_row_chunks():
    # K = 128 fp32 leaves 48 rows per chunk in 48 KB of shared memory: 65535 x 48 rows was the old limit; now each
    # block walks ~65536 / (8 x SMs) chunks. Every row's dL/dz is independent (a skipped chunk leaves garbage there,
    # so the tight bound); the parameter gradients sum 3.1M fp32 terms that cancel, so theirs is loose.
    k, d = 128, 2
    b = 65535 * 48 + 7
    g = torch.Generator().manual_seed(0)
    inputs = [torch.randn(b, d, generator=g), torch.randn(k, d, generator=g), torch.zeros(k)]
    grads = {}
    for backend, dtype in (("native", torch.float32), ("torch", torch.float64)):
        leaves = [v.to("cuda", dtype).requires_grad_() for v in inputs]
        with use(backend):
            nll = F.gmm_nll(*leaves)
        grads[backend] = torch.autograd.grad(nll.sum(), leaves)
    for name, got, want, tol in zip(["z", "means", "log_std"], grads["native"], grads["torch"], [1e-5, 1e-2, 1e-2]):
        err = (got.double() - want).abs().max().item()
        assert err <= tol * want.abs().max().item(), (name, err)
