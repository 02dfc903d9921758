"""A whole FlowGMM training step on the "triton" backend gives the loss and gradients of the "torch" backend."""

from __future__ import annotations

import pytest
import torch

import flowgmm_fast as ff
from flowgmm_fast.nn import GaussianMixture, RealNVP, RealNVPTabular
from helpers import backend_devices, requires_triton, use

pytestmark = requires_triton

DEVICES = backend_devices("triton")


def _step(model, x, labels, backend, seed):
    """Loss and parameter gradients of one training step (train mode: dequantisation noise, dropout, batch norm);
    the same seed draws the same noise and dropout masks on both backends."""
    model.zero_grad(set_to_none=True)
    torch.manual_seed(seed)
    with use(backend):
        out = model(x, labels, label_weight=3.0)
        loss = out.nll.mean()
        loss.backward()
    grads = {name: p.grad.detach().clone() for name, p in model.named_parameters() if p.grad is not None}
    return loss.detach(), out.logits.detach(), out.sldj.detach(), grads


def _compare(model, x, labels):
    loss_t, logits_t, sldj_t, grads_t = _step(model, x, labels, "torch", 0)
    loss_k, logits_k, sldj_k, grads_k = _step(model, x, labels, "triton", 0)
    torch.testing.assert_close(loss_k, loss_t, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(logits_k, logits_t, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(sldj_k, sldj_t, rtol=1e-5, atol=1e-4)
    assert grads_k.keys() == grads_t.keys() and len(grads_t) > 0
    for name in grads_t:
        torch.testing.assert_close(grads_k[name], grads_t[name], rtol=1e-4, atol=1e-4, msg=lambda m: f"{name}: {m}")


@pytest.mark.parametrize("device", DEVICES)
def test_realnvp_flowgmm_step_matches_torch_backend(device):
    torch.manual_seed(0)
    model = ff.FlowGMM(RealNVP(1, num_scales=2, mid_channels=4, num_blocks=1), GaussianMixture(3, 16),
                       event_shape=(1, 4, 4)).to(device).train()
    x = torch.rand(3, 1, 4, 4, device=device)
    _compare(model, x, torch.tensor([-1, 2, 0], device=device))


@pytest.mark.parametrize("device", DEVICES)
def test_tabular_flowgmm_step_matches_torch_backend(device):
    torch.manual_seed(1)
    model = ff.FlowGMM(RealNVPTabular(6, num_coupling_layers=3, hidden_dim=8), GaussianMixture(2, 6)).to(device)
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
