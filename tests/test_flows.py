"""Every flow layer and whole flows: inverse(forward(x)) == x in float64 and sldj == log|det J| of the brute-force
Jacobian (torch.autograd.functional.jacobian), forward and reverse. The original code summed s over identity
positions for a year; these tests catch exactly that."""

import pytest
import torch
from torch import nn

from flowgmm_fast.nn import (AffineCoupling, FlowSequential, Logit, RealNVP, RealNVPTabular, Squeeze,
                             weight_norm_gains)
from helpers import use

f64 = torch.float64


@pytest.fixture(autouse=True)
def _torch_backend():
    with use("torch"):
        yield


def _perturb(module: nn.Module, seed: int = 0) -> nn.Module:
    """Randomise every parameter and BN statistic so no layer is accidentally the identity."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(0.3 * torch.randn(p.shape, generator=g, dtype=p.dtype))
        for m in module.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.normal_(0, 0.2, generator=g)
                m.running_var.uniform_(0.5, 1.5, generator=g)
    return module


def _layers():
    return {
        "checkerboard0": (lambda: AffineCoupling(2, "checkerboard", False, mid_channels=4, num_blocks=1), (2, 4, 4)),
        "checkerboard1": (lambda: AffineCoupling(2, "checkerboard", True, mid_channels=4, num_blocks=1), (2, 4, 4)),
        "channel0": (lambda: AffineCoupling(4, "channel", False, mid_channels=4, num_blocks=1), (4, 2, 2)),
        "channel1": (lambda: AffineCoupling(4, "channel", True, mid_channels=4, num_blocks=2), (4, 2, 2)),
        "half0": (lambda: AffineCoupling(5, "half", False, hidden_dim=8, num_layers=2, dropout=0.5), (5,)),
        "half1": (lambda: AffineCoupling(5, "half", True, hidden_dim=8), (5,)),
        "squeeze": (lambda: Squeeze(), (2, 4, 4)),
        "squeeze_alt": (lambda: Squeeze(alt_order=True), (2, 4, 4)),
        "logit": (lambda: Logit(0.05, dequantize=True), (2, 2, 2)),
        "sequential": (lambda: FlowSequential(AffineCoupling(3, "half", hidden_dim=6),
                                              AffineCoupling(3, "half", True, hidden_dim=6)), (3,)),
        "realnvp_1scale": (lambda: RealNVP(1, num_scales=1, mid_channels=3, num_blocks=1), (1, 2, 2)),
        "realnvp_2scales": (lambda: RealNVP(1, num_scales=2, mid_channels=3, num_blocks=1), (1, 4, 4)),
        "realnvp_3scales_rgb": (lambda: RealNVP(3, num_scales=3, mid_channels=2, num_blocks=1), (3, 4, 4)),
        "realnvp_tabular": (lambda: RealNVPTabular(4, num_coupling_layers=3, hidden_dim=8, num_layers=1), (4,)),
    }


LAYERS = _layers()


def _input(name, shape, batch=2, seed=1):
    g = torch.Generator().manual_seed(seed)
    if name.startswith(("logit", "realnvp_1", "realnvp_2", "realnvp_3")):
        return 0.05 + 0.9 * torch.rand(batch, *shape, generator=g, dtype=f64)  # data in (0, 1)
    return torch.randn(batch, *shape, generator=g, dtype=f64)


@pytest.mark.parametrize("name", list(LAYERS))
def test_inverse_recovers_input_float64(name):
    make, shape = LAYERS[name]
    layer = _perturb(make().double()).eval()
    x = _input(name, shape, batch=3)
    z, sldj = layer(x)
    assert z.shape[0] == 3 and sldj.shape == (3,) and sldj.dtype == f64
    x_back, sldj_back = layer(z, sldj, reverse=True)
    rel = ((x_back - x).abs().max() / x.abs().max()).item()
    assert rel <= 1e-10, f"{name}: inverse relative error {rel:.3g}"
    assert sldj_back.abs().max().item() <= 1e-9 * (1 + sldj.abs().max().item())
    torch.testing.assert_close(layer.inverse(z), x_back, rtol=0, atol=0)


def _jacobian_logdet(fn, x):
    jac = torch.autograd.functional.jacobian(lambda v: fn(v.view(1, *x.shape)).reshape(-1), x.reshape(-1))
    sign, logabsdet = torch.linalg.slogdet(jac)
    assert sign != 0
    return logabsdet


@pytest.mark.parametrize("name", list(LAYERS))
def test_log_det_equals_brute_force_jacobian(name):
    make, shape = LAYERS[name]
    layer = _perturb(make().double()).eval()
    x = _input(name, shape, batch=2)
    z, sldj = layer(x)
    for i in range(2):
        expected = _jacobian_logdet(lambda v: layer(v)[0], x[i])
        torch.testing.assert_close(sldj[i], expected, rtol=1e-9, atol=1e-9, msg=f"{name} forward, sample {i}")
        # reverse: log|det d f^{-1}(z)/dz| = -(forward log-det)
        _, sldj_rev = layer(z[i:i + 1], reverse=True)
        expected_rev = _jacobian_logdet(lambda v: layer(v, reverse=True)[0], z[i])
        torch.testing.assert_close(sldj_rev[0], expected_rev, rtol=1e-9, atol=1e-9, msg=f"{name} reverse")


def test_eval_mode_is_deterministic_and_training_mode_dequantises():
    flow = RealNVP(1, num_scales=2, mid_channels=4, num_blocks=1)
    x = torch.randint(0, 256, (4, 1, 4, 4)).float() / 255
    flow.eval()
    z1, s1 = flow(x)
    z2, s2 = flow(x)
    assert torch.equal(z1, z2) and torch.equal(s1, s2)
    flow.train()
    za, _ = flow(x)
    zb, _ = flow(x)
    assert not torch.equal(za, zb), "training mode must draw fresh dequantisation noise"
    no_dq = RealNVP(1, num_scales=2, mid_channels=4, num_blocks=1, dequantize=False).train()
    torch.manual_seed(0)
    za, _ = no_dq(x)
    torch.manual_seed(1)
    zb, _ = no_dq(x)
    torch.testing.assert_close(za, zb)


def test_user_supplied_st_net_drops_into_the_coupling():
    class TinyST(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 6, 3, padding=1)

        def forward(self, x):
            return self.conv(x)

    layer = AffineCoupling(3, "checkerboard", st_net=TinyST()).double()
    x = torch.randn(2, 3, 4, 4, dtype=f64)
    z, sldj = layer(x)
    torch.testing.assert_close(layer.inverse(z), x)
    torch.testing.assert_close(sldj[0], _jacobian_logdet(lambda v: layer(v)[0], x[0]))
    bad = AffineCoupling(3, "checkerboard", st_net=nn.Conv2d(3, 4, 1))
    with pytest.raises(ValueError, match="st_net must return 6 channels"):
        bad(torch.randn(1, 3, 4, 4))


def test_flow_constructors_and_inputs_are_validated():
    with pytest.raises(ValueError, match="mask_type must be one of"):
        AffineCoupling(2, "diagonal")
    with pytest.raises(ValueError, match="even number of channels"):
        AffineCoupling(3, "channel")
    with pytest.raises(ValueError, match=r"expects x of shape \(B, 1, H, W\)"):
        RealNVP(1, 2, 4, 1)(torch.rand(2, 3, 4, 4))
    with pytest.raises(ValueError, match="divisible by 2"):
        RealNVP(1, 2, 4, 1)(torch.rand(2, 1, 6, 5))
    with pytest.raises(ValueError, match=r"expects x of shape \(B, 4\)"):
        RealNVPTabular(4, 2, 8)(torch.rand(2, 5))
    with pytest.raises(ValueError, match="dim >= 2"):
        RealNVPTabular(1)
    with pytest.raises(TypeError, match="layer 0 must be a flowgmm_fast.nn.Flow"):
        FlowSequential(nn.Linear(2, 2))


def test_weight_norm_gains_are_the_wn_gains_only():
    flow = RealNVP(1, num_scales=2, mid_channels=4, num_blocks=1)
    gains = weight_norm_gains(flow)
    names = {id(p): n for n, p in flow.named_parameters()}
    assert gains and all(names[id(p)].endswith("parametrizations.weight.original0") for p in gains)
    # every coupling's rescale and every conv contributes exactly one gain
    n_wn = sum(1 for m in flow.modules() if hasattr(m, "parametrizations"))
    assert len(gains) == n_wn
