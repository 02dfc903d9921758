"""A whole FlowGMM training step on the "triton" backend gives the loss and gradients of the "torch" backend."""

from __future__ import annotations

import copy

import pytest
import torch

import flowgmm_fast as ff
from flowgmm_fast.nn import GaussianMixture, RealNVP, RealNVPTabular
from helpers import assert_close_3way, backend_devices, requires_triton, use

pytestmark = requires_triton

DEVICES = backend_devices("triton")


def _step(model, x, labels, backend):
    """Loss, class logits, sldj and parameter gradients of one training step (train mode: batch statistics)."""
    model.zero_grad(set_to_none=True)
    with use(backend):
        out = model(x, labels, label_weight=3.0)
        loss = out.nll.mean()
        loss.backward()
    grads = {name: p.grad.detach().clone() for name, p in model.named_parameters() if p.grad is not None}
    return {"loss": loss.detach(), "logits": out.logits.detach(), "sldj": out.sldj.detach()}, grads


def _compare(model, x, labels):
    """Three-way: the triton step (fp32) is as close to the float64 torch step as the fp32 torch step is.

    Through train-mode batch norm on a batch of 3 and weight norm, fp32 round-off of any implementation is amplified
    to ~1e-4 in single gradient elements, so a fixed elementwise tolerance between two fp32 runs is a coin toss; the
    bound is relative to PyTorch's own fp32 error instead (per parameter tensor, in norm, for gradients), with a
    floor of 1e-4 relative / 1e-5 absolute: some gradients are ~0 in exact arithmetic."""
    out64, grads64 = _step(copy.deepcopy(model).double(), x.double(), labels, "torch")
    out_t, grads_t = _step(model, x, labels, "torch")
    out_k, grads_k = _step(model, x, labels, "triton")
    for key in out64:
        assert_close_3way(out_k[key], out_t[key], out64[key], torch.float32, name=key, atol=1e-5, rtol=1e-6)
    assert grads_k.keys() == grads_t.keys() == grads64.keys() and len(grads_t) > 0
    for name, g64 in grads64.items():
        err_k = (grads_k[name].double() - g64).norm().item()
        err_t = (grads_t[name].double() - g64).norm().item()
        bound = 2 * err_t + 1e-4 * g64.norm().item() + 1e-5  # a wrong gradient is off by orders more
        assert err_k <= bound, f"{name}: |triton - fp64| = {err_k:.3g} > 2 |torch fp32 - fp64| + tol = {bound:.3g}"


@pytest.mark.parametrize("device", DEVICES)
def test_realnvp_flowgmm_step_matches_torch_backend(device):
    # dequantize=False: the step is deterministic, so a float64 run is its ground truth (the noise path of the
    # logit kernel is covered by the op tests)
    torch.manual_seed(0)
    model = ff.FlowGMM(RealNVP(1, num_scales=2, mid_channels=4, num_blocks=1, dequantize=False),
                       GaussianMixture(3, 16), event_shape=(1, 4, 4)).to(device).train()
    x = torch.rand(3, 1, 4, 4, device=device)
    _compare(model, x, torch.tensor([-1, 2, 0], device=device))


@pytest.mark.parametrize("device", DEVICES)
def test_tabular_flowgmm_step_matches_torch_backend(device):
    torch.manual_seed(1)
    model = ff.FlowGMM(RealNVPTabular(6, num_coupling_layers=3, hidden_dim=8, dropout=0.0),
                       GaussianMixture(2, 6)).to(device)
    x = torch.randn(5, 6, device=device)
    _compare(model.train(), x, torch.tensor([0, -1, 1, -1, 1], device=device))


@pytest.mark.parametrize("device", DEVICES)
def test_realnvp_inverse_on_triton_reconstructs_the_input(device):
    torch.manual_seed(2)
    flow = RealNVP(1, num_scales=2, mid_channels=4, num_blocks=1).to(device).eval()
    x = torch.rand(2, 1, 4, 4, device=device) * 0.9 + 0.05
    with use("triton"):
        z, sldj = flow(x)
        x_back, sldj_back = flow(z, sldj, reverse=True)
    torch.testing.assert_close(x_back, x, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(sldj_back, torch.zeros_like(sldj_back), rtol=0, atol=1e-3)
