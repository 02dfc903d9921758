"""Backprop by inversion (flowgmm_fast.nn.invertible): the same loss, gradients and batch-norm statistics as standard
autograd, for whole models in training mode (batch-norm with batch statistics, dropout, dequantisation noise), on
every backend, under autocast, torch.compile and for a flow of the user's own; the activations kept for the backward
pass do not grow with depth.

Gradient comparison: per parameter tensor, max |g_inv - g_std| / max |g_std|. Most conv biases of the s/t ResNets
have a gradient of exactly 0 in exact arithmetic (every path from them ends in a batch-norm, which removes a constant
shift), so both modes compute rounding noise there: a tensor whose reference gradient is below ``zero`` x the
largest gradient G of the model is held to max |g_inv - g_std| / G instead."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import flowgmm_fast as ff
from flowgmm_fast import _backend
from flowgmm_fast.nn import (AffineCoupling, FlowSequential, GaussianMixture, Logit, RealNVP, RealNVPTabular,
                             Squeeze)
from flowgmm_fast.nn.base import Flow, zero_sldj
from flowgmm_fast.nn import invertible
from flowgmm_fast.nn.invertible import COMPILE_NOTE, DriftProbe, invertible_forward
from flowgmm_fast.training import Trainer, TrainLogger, semisup_loss
from helpers import backend_devices, devices, use

f64 = torch.float64


def _image_model(num_scales=2, dequantize=True, dtype=f64):
    torch.manual_seed(0)
    flow = RealNVP(1, num_scales, mid_channels=4, num_blocks=2, dequantize=dequantize)
    return ff.FlowGMM(flow, GaussianMixture(3, 64, means_trainable=True, std_trainable=True)).to(dtype).train()


def _tabular_model(depth=5, dtype=f64, dropout=0.5):
    torch.manual_seed(0)
    flow = RealNVPTabular(6, depth, hidden_dim=16, num_layers=2, dropout=dropout)
    return ff.FlowGMM(flow, GaussianMixture(3, 6, means_trainable=True)).to(dtype).train()


def _data(kind, dtype=f64, batch=6):
    g = torch.Generator().manual_seed(1)
    if kind == "image":
        x = (torch.randint(0, 256, (batch, 1, 8, 8), generator=g) + 0.5) / 256
    else:
        x = torch.randn(batch, 6, generator=g)
    labels = torch.tensor([0, 1, 2, -1, -1, 1, -1, 0][:batch])
    return x.to(dtype), labels


def _step(model, x, labels, invertible, checkpoint_every=None, x_grad=False, seed=5):
    """Loss, outputs and gradients (parameters and, with x_grad, the input) of one loss evaluation."""
    model.flow.invertible_backprop = invertible
    model.flow.checkpoint_every = checkpoint_every
    model.zero_grad(set_to_none=True)
    x = x.clone().requires_grad_(x_grad)
    torch.manual_seed(seed)  # dropout masks and dequantisation noise
    out = model(x, labels, label_weight=2.0)
    loss = out.nll.mean() + 0.1 * out.z.pow(2).mean()  # a gradient for z besides the prior's
    loss.backward()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}
    if x_grad:
        grads["input"] = x.grad.detach().clone()
    return loss.detach(), out, grads


def _grad_rel_errors(got, ref, zero):
    assert got.keys() == ref.keys()
    big = max(g.abs().max().item() for g in ref.values())
    errors = {}
    for n, g in ref.items():
        scale = g.abs().max().item()
        errors[n] = (got[n] - g).abs().max().item() / (scale if scale >= zero * big else big)
    return errors


def _assert_grads(got, ref, rel, what="", zero=None):
    errors = _grad_rel_errors(got, ref, rel if zero is None else zero)
    name = max(errors, key=errors.get)
    assert errors[name] <= rel, f"{what}: gradient of {name} off by {errors[name]:.3g} (relative) > {rel:g}"


@pytest.fixture(autouse=True)
def _torch_backend():
    with use("torch"):
        yield


# ------------------------------------------------------------------------------------------------- float64 parity
@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("kind,num_scales", [("image", 2), ("image", 3), ("tabular", None)])
def test_gradients_equal_standard_autograd_float64(kind, num_scales, device):
    """Whole models in training mode: batch-norm on batch statistics, dropout 0.5 (tabular), dequantisation noise
    (image), trainable prior; gradients of every parameter and of the input within 1e-10 relative."""
    model = (_image_model(num_scales) if kind == "image" else _tabular_model()).to(device)
    x, labels = (t.to(device) for t in _data(kind))
    ref_loss, ref_out, ref = _step(copy.deepcopy(model), x, labels, False, x_grad=True)
    loss, out, got = _step(model, x, labels, True, x_grad=True)
    # the forward pass is the standard one (bit for bit on the CPU; GPU reductions may use atomics)
    exact = dict(rtol=0, atol=0) if device == "cpu" else dict(rtol=1e-12, atol=1e-12)
    for a, b in ((loss, ref_loss), (out.z, ref_out.z), (out.sldj, ref_out.sldj)):
        torch.testing.assert_close(a, b, **exact)
    _assert_grads(got, ref, 1e-10, f"{kind} {num_scales}")


def test_running_statistics_equal_after_steps_and_updated_once_per_step():
    # SGD, not Adam: Adam scales the rounding noise of the zero-in-exact-arithmetic bias gradients (module docstring)
    # to full-size steps, which move the batch means (not the outputs) differently in any two runs
    steps = 3
    models = {inv: _image_model() for inv in (False, True)}
    for inv, model in models.items():
        opt = torch.optim.SGD(model.parameters(), lr=1e-3)
        for i in range(steps):
            x, labels = _data("image")
            _step(model, x + 0.001 * i, labels, inv, seed=i)
            opt.step()
    std, inv = (dict(m.named_buffers()) for m in (models[False], models[True]))
    n_norms = 0
    for name, buf in std.items():
        if name.endswith("num_batches_tracked"):
            n_norms += 1
            assert int(buf) == steps and int(inv[name]) == steps, f"{name}: {int(inv[name])} updates, not {steps}"
        else:
            torch.testing.assert_close(inv[name], buf, rtol=1e-10, atol=1e-12, msg=lambda m: f"{name}: {m}")
    assert n_norms > 10


def test_gradients_of_a_users_own_flow_float64():
    """A FlowSequential of the user's layers: checkerboard, squeeze, channel couplings, Flows the library does not
    know (inverted through their own reverse pass, then recomputed), and a Logit with dequantisation noise in the
    middle (its input is kept: it cannot be inverted)."""

    class ChannelAffine(Flow):
        def __init__(self, c):
            super().__init__()
            self.log_a = nn.Parameter(0.3 * torch.randn(c, 1, 1))
            self.b = nn.Parameter(torch.randn(c, 1, 1))

        def forward(self, x, sldj=None, reverse=False):
            sldj = zero_sldj(x, sldj)
            ldj = self.log_a.sum() * x.shape[2] * x.shape[3]
            if reverse:
                return (x - self.b) * torch.exp(-self.log_a), sldj - ldj
            return x * torch.exp(self.log_a) + self.b, sldj + ldj

    class Sigmoid(Flow):
        def forward(self, x, sldj=None, reverse=False):
            sldj = zero_sldj(x, sldj)
            if reverse:
                y = torch.logit(x)
                return y, sldj + (torch.nn.functional.logsigmoid(y) + torch.nn.functional.logsigmoid(-y)).sum((1, 2, 3))
            ldj = (torch.nn.functional.logsigmoid(x) + torch.nn.functional.logsigmoid(-x)).sum((1, 2, 3))
            return torch.sigmoid(x), sldj + ldj

    torch.manual_seed(0)
    flow = FlowSequential(
        AffineCoupling(2, "checkerboard", mid_channels=4, num_blocks=1),
        ChannelAffine(2),
        AffineCoupling(2, "checkerboard", reverse_mask=True, mid_channels=4, num_blocks=1),
        Squeeze(),
        AffineCoupling(8, "channel", mid_channels=4, num_blocks=1),
        Sigmoid(),
        Logit(0.05, dequantize=True),
        AffineCoupling(8, "channel", reverse_mask=True, mid_channels=4, num_blocks=1),
        invertible_backprop=True).double().train()
    x = torch.rand(5, 2, 4, 4, dtype=f64) * 0.8 + 0.1
    x.requires_grad_(True)

    def run(invertible):
        flow.invertible_backprop = invertible
        flow.zero_grad(set_to_none=True)
        x.grad = None
        torch.manual_seed(3)
        z, sldj = flow(x)
        ((z.sigmoid() * torch.linspace(-1, 1, z.numel(), dtype=f64).view_as(z)).sum() + sldj.sum()).backward()
        return {"input": x.grad.clone(), **{n: p.grad.clone() for n, p in flow.named_parameters()}}

    _assert_grads(run(True), run(False), 1e-10, "user flow")
    # the same through the function, on a plain list of layers
    flow.invertible_backprop = False
    torch.manual_seed(3)
    z_ref, s_ref = flow(x)
    torch.manual_seed(3)
    z, s = invertible_forward(list(flow.layers), x)
    assert torch.equal(z, z_ref) and torch.equal(s, s_ref)


# ------------------------------------------------------------------------------------------- float32, drift, bounds
def test_every_input_kept_is_standard_autograd_and_drift_shrinks_with_checkpoints():
    model = _tabular_model(depth=16, dtype=torch.float32, dropout=0.0)
    x, labels = _data("tabular", torch.float32, batch=8)
    _, _, std = _step(copy.deepcopy(model), x, labels, False)
    # checkpoint_every=1 keeps every coupling's exact input: nothing is rebuilt, the computation is autograd's own
    _, _, exact = _step(copy.deepcopy(model), x, labels, True, checkpoint_every=1)
    _assert_grads(exact, std, 1e-6, "checkpoint_every=1")
    worst = {}
    for every in (None, 4):
        with DriftProbe() as probe:
            _step(copy.deepcopy(model), x, labels, True, checkpoint_every=every)
        errors = probe.errors()
        assert errors and all(e["kind"] == "AffineCoupling" for e in errors)
        worst[every] = max(e["rel"] for e in errors)
    assert 0 < worst[None] < 1e-4, worst
    assert worst[4] < worst[None], worst


def test_short_training_run_gives_the_standard_losses_float32():
    """20 Trainer steps (Adam, clipping) of the tabular FlowGMM with dropout, and 6 of the image one with batch-norm
    and dequantisation noise: the same loss curve as standard autograd within float32 tolerance."""
    def train(make, data, invertible, steps):
        torch.manual_seed(0)
        model = make()
        model.flow.invertible_backprop = invertible
        opt = torch.optim.Adam(model.parameters(), lr=1e-3)
        trainer = Trainer(model, {"flow": opt}, steps_per_epoch=steps, max_grad_norm=100.0,
                          logger=TrainLogger(None, progress_bar=False))
        losses = []

        def loss_fn(batch, tr):
            loss, parts, _ = semisup_loss(tr.model, *batch, label_weight=2.0)
            losses.append(loss.item())
            return loss, parts

        def batches(start):
            while True:
                yield data
        trainer.fit(batches, loss_fn, max_steps=steps, log_every=steps)
        return torch.tensor(losses)

    cases = [(lambda: _tabular_model(4, torch.float32), _data("tabular", torch.float32, 8), 20),
             (lambda: _image_model(1, True, torch.float32), _data("image", torch.float32, 8), 6)]
    for make, data, steps in cases:
        std, inv = (train(make, data, inv, steps) for inv in (False, True))
        assert inv[0] == std[0]
        torch.testing.assert_close(inv, std, rtol=1e-4, atol=1e-3)


# ------------------------------------------------------------------------------------ backends, autocast, state
@pytest.mark.parametrize("backend", [b for b in ("native", "triton") if "cpu" in backend_devices(b)])
def test_each_backend_matches_its_standard_mode(backend):
    """float32 (the triton kernels' dtype); both modes on the backend, compared with the torch float64 step."""
    model = _image_model(2, True, torch.float32)
    x, labels = _data("image", torch.float32, batch=4)
    _, _, ref64 = _step(copy.deepcopy(model).double(), x.double(), labels[:4], False)
    with use(backend):
        loss_s, _, std = _step(copy.deepcopy(model), x, labels[:4], False)
        loss_i, _, inv = _step(model, x, labels[:4], True)
    assert torch.equal(loss_i, loss_s)
    # the torch GMM leaves None where a fused GMM op writes zeros (uniform mixture weights): compare as zeros
    ref32 = {n: ref64[n].float() if n in ref64 else torch.zeros_like(g) for n, g in std.items()}
    err_std, err_inv = _grad_rel_errors(std, ref32, 1e-4), _grad_rel_errors(inv, ref32, 1e-4)
    for name in ref32:  # the rebuilt inputs add at most a few float32 rounding errors
        assert err_inv[name] <= 4 * err_std[name] + 1e-4, (name, err_inv[name], err_std[name])


def test_backward_runs_on_the_backend_and_autocast_of_the_forward_pass(monkeypatch):
    """The backward pass replays the forward pass's backend and autocast state, even when it runs outside both."""
    model = _image_model(2, False, torch.float32)
    x, labels = _data("image", torch.float32, batch=4)
    seen = []
    get_op = _backend.get_op
    monkeypatch.setattr(_backend, "get_op", lambda op, device: (seen.append(_backend.get_backend()),
                                                                get_op(op, device))[1])
    fast = [b for b in ("native", "triton") if "cpu" in backend_devices(b)]
    if not fast:
        pytest.skip("needs a backend besides torch on the CPU")
    with DriftProbe() as probe:
        with use(fast[0]), torch.autocast("cpu", dtype=torch.bfloat16):
            model.flow.invertible_backprop = True
            out = model(x, labels[:4])
        n_forward = len(seen)
        with use("torch"):
            out.nll.mean().backward()
    assert len(seen) > n_forward and set(seen) == {fast[0]}
    # s/t recomputed in bf16 like the forward pass: the coupling inverts with the same (s, t); computed in fp32 they
    # would differ by bf16 rounding (~1e-2) and so would the rebuilt inputs
    assert max(e["rel"] for e in probe.errors()) < 1e-3


def test_autocast_bf16_matches_standard_mode():
    model = _tabular_model(6, torch.float32, dropout=0.5)
    x, labels = _data("tabular", torch.float32, batch=8)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss_s, _, std = _step(copy.deepcopy(model), x, labels, False)
        loss_i, _, inv = _step(model, x, labels, True)
    assert torch.equal(loss_i, loss_s)
    num = sum(((inv[n] - g).double().norm() ** 2).item() for n, g in std.items()) ** 0.5
    den = sum((g.double().norm() ** 2).item() for g in std.values()) ** 0.5
    assert num / den < 1e-3, num / den


def test_torch_compile_runs_the_flow_eagerly_and_says_so(monkeypatch):
    model = _tabular_model(3, torch.float32, dropout=0.0)
    x, labels = _data("tabular", torch.float32, batch=8)
    _, _, ref = _step(copy.deepcopy(model), x, labels, False)
    model.flow.invertible_backprop = True

    def loss_fn(x, labels):
        return model(x, labels, 2.0).nll.mean() + 0.1 * model.encode(x)[0].pow(2).mean()

    torch._dynamo.reset()
    monkeypatch.setattr(invertible, "_run_disabled", None)  # as in a fresh process: the compiled call comes first
    compiled = torch.compile(loss_fn, backend="aot_eager")
    torch.manual_seed(5)
    model.zero_grad(set_to_none=True)
    compiled(x, labels).backward()
    got = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    _assert_grads(got, ref, 1e-4, "compiled")
    torch._dynamo.reset()
    # the refusal names the reason also before the lazily made torch.compiler.disable wrapper exists
    monkeypatch.setattr(invertible, "_run_disabled", None)
    with pytest.raises(Exception, match="invertible_backprop"):
        torch.compile(loss_fn, backend="aot_eager", fullgraph=True)(x, labels)
    assert "runs eagerly" in COMPILE_NOTE or "run eagerly" in COMPILE_NOTE


# ------------------------------------------------------------------------------------------- memory, validation
def _saved_bytes(model, x, labels):
    """Bytes autograd keeps for the backward pass of the flow (storages counted once)."""
    storages = {}

    def pack(t):
        storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model.flow(x)
    return sum(storages.values())


def test_kept_activations_do_not_grow_with_depth():
    x, _ = _data("tabular", torch.float32, batch=64)
    saved = {}
    for inv in (False, True):
        for depth in (2, 8):
            model = _tabular_model(depth, torch.float32)
            model.flow.invertible_backprop = inv
            saved[inv, depth] = _saved_bytes(model, x, None)
    assert saved[False, 8] > 3 * saved[False, 2]
    assert saved[True, 8] == saved[True, 2] <= 2 * x.numel() * 4  # the input and the output


def test_options_are_validated_and_double_backward_refused():
    with pytest.raises(TypeError, match="invertible_backprop must be a bool"):
        RealNVPTabular(4, 2, 8, invertible_backprop=1)
    with pytest.raises(ValueError, match="checkpoint_every must be None or an int >= 1"):
        RealNVP(1, 1, 4, 1, invertible_backprop=True, checkpoint_every=0)
    model = _tabular_model(2)
    model.flow.invertible_backprop = True
    x, labels = _data("tabular")
    loss = model(x, labels).nll.mean()
    (g,) = torch.autograd.grad(loss, [model.prior.means], create_graph=False, retain_graph=True)
    with pytest.raises(RuntimeError, match="double backward"):
        torch.autograd.grad(loss, [next(model.flow.parameters())], create_graph=True)


def test_no_grad_and_reverse_are_the_plain_flow():
    model = _image_model(2, False)
    x, _ = _data("image")
    model.eval()
    z_std, s_std = model.flow(x)
    model.flow.invertible_backprop = True
    with torch.no_grad():
        z, s = model.flow(x)
    assert torch.equal(z, z_std) and torch.equal(s, s_std)
    torch.testing.assert_close(model.flow.inverse(z), x)
