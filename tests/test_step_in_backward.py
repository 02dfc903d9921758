"""The optimizer step fused into the backward pass (flowgmm_fast.training.StepInBackward, Trainer(step_in_backward=
True)): the same parameters and optimizer state as the standard step (float64; Adam and SGD with momentum and weight
decay groups, a schedule, standard and invertible-backprop RealNVPTabular with the prior trained), every parameter
stepped exactly once per step (tied layers included), gradients freed inside the backward pass, exact resume, the
non-finite guard as in the standard step, and the clear refusals. Tiny models: every test takes seconds."""

from __future__ import annotations

import pytest
import torch

from flowgmm_fast import FlowGMM
from flowgmm_fast.nn import AffineCoupling, FlowSequential, GaussianMixture, RealNVPTabular
from flowgmm_fast.training import (NonFiniteLossError, StepInBackward, Trainer, TrainLogger, make_lr_scheduler,
                                   read_checkpoint, semisup_loss)

DIM, CLASSES, BATCH = 6, 3, 24


def tabular_model(invertible: bool, couplings: int = 3) -> FlowGMM:
    torch.manual_seed(0)
    flow = RealNVPTabular(DIM, couplings, 16, dropout=0.5, invertible_backprop=invertible)
    prior = GaussianMixture(CLASSES, DIM, means_trainable=True)
    return FlowGMM(flow, prior).double()


def batches(start_step):
    """A pure function of the step: float64 rows, a third unlabeled."""
    step = start_step
    while True:
        step += 1
        g = torch.Generator().manual_seed(1000 + step)
        x = torch.randn(BATCH, DIM, generator=g, dtype=torch.float64)
        labels = torch.randint(0, CLASSES, (BATCH,), generator=g)
        labels[BATCH // 3:] = -1
        yield x, labels


def compute_loss(batch, trainer):
    loss, parts, _ = semisup_loss(trainer.model, *batch)
    return loss, parts


def optimizers_for(model: FlowGMM, kind: str) -> dict:
    """Two weight-decay groups for the flow (decay on the first half of its tensors only), the prior's means with
    their own optimizer and learning rate."""
    flow_params = list(model.flow.parameters())
    half = len(flow_params) // 2
    groups = [{"params": flow_params[:half], "weight_decay": 1e-2}, {"params": flow_params[half:], "weight_decay": 0.0}]
    prior = [p for p in model.prior.parameters() if p.requires_grad]
    if kind == "adam":
        return {"flow": torch.optim.AdamW(groups, lr=3e-3), "gmm": torch.optim.Adam(prior, lr=1e-2)}
    return {"flow": torch.optim.SGD(groups, lr=3e-3, momentum=0.9, nesterov=True),
            "gmm": torch.optim.SGD(prior, lr=1e-2, momentum=0.5, weight_decay=1e-3)}


def make_trainer(model, kind, step_in_backward, total=6, **kw):
    opts = optimizers_for(model, kind)
    scheds = {name: make_lr_scheduler(opt, "cosine", total, warmup_steps=2) for name, opt in opts.items()}
    return Trainer(model, opts, schedulers=scheds, steps_per_epoch=3, max_grad_norm=None,
                   logger=TrainLogger(None, progress_bar=False), step_in_backward=step_in_backward, **kw)


def flat(model):
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()])


def optimizer_tensors(trainer):
    """The optimizers' state tensors in parameter order (state_dict's indices; the fused step creates the state in
    the order of the backward pass)."""
    out = []
    for opt in trainer.optimizers.values():
        state = opt.state_dict()["state"]
        out += [state[i][k] for i in sorted(state) for k in sorted(state[i])
                if isinstance(state[i][k], torch.Tensor)]
    return out


@pytest.mark.parametrize("kind", ["adam", "sgd"])
@pytest.mark.parametrize("invertible", [False, True], ids=["standard", "invertible"])
def test_same_parameters_and_state_as_the_standard_step(kind, invertible):
    results = []
    for fused in (False, True):
        model = tabular_model(invertible)
        start = flat(model).clone()
        trainer = make_trainer(model, kind, fused)
        torch.manual_seed(5)  # dropout masks
        trainer.fit(batches, compute_loss, max_steps=6, log_every=3)
        assert trainer.step == 6 and trainer.step_in_backward is fused
        if fused:
            assert all(p.grad is None for p in model.parameters()), "the fused step frees every gradient"
        results.append((flat(model), optimizer_tensors(trainer), start,
                        [g["lr"] for opt in trainer.optimizers.values() for g in opt.param_groups],
                        trainer.optimizers["flow"].state_dict()["param_groups"]))
    (p0, s0, start, lr0, g0), (p1, s1, _, lr1, g1) = results
    assert (p0 - start).abs().max() > 1e-3, "the steps moved the parameters"
    torch.testing.assert_close(p1, p0, rtol=1e-12, atol=0)
    assert len(s0) == len(s1) and all(torch.allclose(a, b, rtol=1e-12, atol=0) for a, b in zip(s0, s1))
    assert lr0 == lr1 and g0 == g1  # the schedule and the groups as saved in a checkpoint


def test_every_parameter_is_stepped_once_with_tied_layers_and_the_prior():
    """A flow whose first coupling is used twice (tied), invertible backprop, the prior's means trained: each
    parameter's gradient arrives once per step (the tied layer's two uses summed by autograd) and is stepped once,
    with the same result as the standard step."""
    outs = []
    for fused in (False, True):
        torch.manual_seed(0)  # the same weights and dropout masks in both ways
        a = AffineCoupling(DIM, "half", hidden_dim=16, dropout=0.5)
        b = AffineCoupling(DIM, "half", reverse_mask=True, hidden_dim=16, dropout=0.5)
        flow = FlowSequential(a, b, a, invertible_backprop=True)
        model = FlowGMM(flow, GaussianMixture(CLASSES, DIM, means_trainable=True)).double()
        opt = torch.optim.Adam(model.parameters(), lr=1e-2)
        calls = []
        opt.register_step_post_hook(lambda o, args, kwargs: calls.append(1))
        params = [p for p in model.parameters() if p.requires_grad]
        in_backward = StepInBackward({"all": opt})
        for step, (x, labels) in zip(range(3), batches(0)):
            opt.zero_grad(set_to_none=True)
            loss = model(x, labels).nll.mean()
            if fused:
                calls.clear()
                with in_backward:
                    loss.backward()
                assert in_backward.stepped == len(params) == len(calls), (in_backward.stepped, len(params), calls)
            else:
                loss.backward()
                opt.step()
        outs.append(flat(model))
    torch.testing.assert_close(outs[1], outs[0], rtol=1e-12, atol=0)


class _CountLiveGrads(torch.autograd.Function):
    """Identity whose backward (reached after every layer's) records how many parameters hold a gradient then."""

    @staticmethod
    def forward(ctx, x, params, record):
        ctx.params, ctx.record = params, record
        return x.view_as(x)

    @staticmethod
    def backward(ctx, g):
        ctx.record.append(sum(p.grad is not None for p in ctx.params))
        return g, None, None


@pytest.mark.parametrize("invertible", [False, True], ids=["standard", "invertible"])
def test_gradients_are_freed_during_the_backward_pass(invertible):
    model = tabular_model(invertible, couplings=4)
    params = [p for p in model.parameters() if p.requires_grad]
    per_coupling = len(list(model.flow.layers[0].parameters()))
    opt = torch.optim.Adam(params, lr=1e-3)
    x, labels = next(batches(0))
    seen = {}
    for fused in (False, True):
        record = []
        opt.zero_grad(set_to_none=True)
        loss = model(_CountLiveGrads.apply(x.requires_grad_(), params, record), labels).nll.mean()
        if fused:
            with StepInBackward(opt):
                loss.backward()
        else:
            loss.backward()
        seen[fused] = record[0]
        x = x.detach()
    assert seen[False] >= len(params) - per_coupling  # standard: (nearly) every gradient alive at the input
    assert seen[True] <= per_coupling  # fused: at most the first coupling's, not yet stepped


def test_resume_equals_an_uninterrupted_run_and_checkpoints_are_interchangeable(tmp_path):
    def run(fused, steps, ckpt, resume_from=None):
        model = tabular_model(True)
        trainer = make_trainer(model, "adam", fused, ckpt_path=ckpt)
        if resume_from is not None:
            trainer.resume(resume_from)
        else:
            torch.manual_seed(5)
        trainer.fit(batches, compute_loss, max_steps=steps, log_every=2)
        return trainer

    whole = run(True, 6, tmp_path / "whole.pt")
    run(True, 3, tmp_path / "half.pt")
    resumed = run(True, 6, tmp_path / "resumed.pt", resume_from=tmp_path / "half.pt")
    assert resumed.step == 6
    assert torch.equal(flat(resumed.model), flat(whole.model))
    assert all(torch.equal(a, b) for a, b in zip(optimizer_tensors(resumed), optimizer_tensors(whole)))
    # a standard run's checkpoint resumed with the fused step (and back) continues the same run
    run(False, 3, tmp_path / "std_half.pt")
    crossed = run(True, 6, tmp_path / "crossed.pt", resume_from=tmp_path / "std_half.pt")
    std_whole = run(False, 6, tmp_path / "std_whole.pt")
    torch.testing.assert_close(flat(crossed.model), flat(std_whole.model), rtol=1e-12, atol=0)
    back = run(False, 6, tmp_path / "back.pt", resume_from=tmp_path / "half.pt")
    torch.testing.assert_close(flat(back.model), flat(whole.model), rtol=1e-12, atol=0)
    assert read_checkpoint(tmp_path / "whole.pt")["optimizers"].keys() == {"flow", "gmm"}


def test_non_finite_loss_stops_the_run_as_the_standard_step_does(tmp_path):
    """The fused step applies the step of a NaN loss like the standard one (it cannot be undone once parameters are
    stepped); the run stops naming the step, and the checkpoint on disk is the same last good one in both ways."""
    def loss_nan_at(bad_step):
        def compute(batch, trainer):
            loss, parts = compute_loss(batch, trainer)
            if trainer.step + 1 == bad_step:
                parts = {**parts, "loss": loss * float("nan")}
                loss = parts["loss"]
            return loss, parts
        return compute

    saved = []
    for fused in (False, True):
        model = tabular_model(True)
        trainer = make_trainer(model, "adam", fused, ckpt_path=tmp_path / f"{fused}.pt")
        torch.manual_seed(5)
        with pytest.raises(NonFiniteLossError) as err:
            trainer.fit(batches, loss_nan_at(4), max_steps=6, save_every=2, log_every=1)
        assert err.value.step == 4 and err.value.parts == ["loss"]
        assert not torch.isfinite(flat(model)).all(), "the NaN step was applied (as in the standard step)"
        saved.append(read_checkpoint(tmp_path / f"{fused}.pt"))
    assert saved[0]["step"] == saved[1]["step"] == 2
    for k, v in saved[0]["model"].items():
        torch.testing.assert_close(saved[1]["model"][k], v, rtol=1e-12, atol=0)


def test_refusals_name_the_arguments():
    model = tabular_model(False)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    with pytest.raises(ValueError, match="max_grad_norm.*None"):
        Trainer(model, {"flow": opt}, steps_per_epoch=1, max_grad_norm=100.0, step_in_backward=True)
    with pytest.raises(TypeError, match="step_in_backward must be a bool"):
        Trainer(model, {"flow": opt}, steps_per_epoch=1, step_in_backward=1)
    lbfgs = torch.optim.LBFGS(model.parameters())
    with pytest.raises(ValueError, match=r"optimizers\['flow'\] is a LBFGS"):
        Trainer(model, {"flow": lbfgs}, steps_per_epoch=1, step_in_backward=True)
    # gradients accumulated over several backward passes: refused on entry, and a second gradient inside one step
    x, labels = next(batches(0))
    model(x, labels).nll.mean().backward()
    with pytest.raises(ValueError, match="already hold a gradient.*set_to_none"):
        with StepInBackward(opt):
            pass
    w = torch.nn.Parameter(torch.ones(3, dtype=torch.float64))  # (2 w).sum() saves nothing of w: autograd's own
    loss = (2.0 * w).sum()                                          # version check cannot catch a second backward
    with pytest.raises(RuntimeError, match="second gradient"):
        with StepInBackward(torch.optim.SGD([w], lr=0.1)):
            loss.backward(retain_graph=True)
            loss.backward()
    # outside the with block the hooks are gone: a backward accumulates gradients as usual
    opt.zero_grad(set_to_none=True)
    model(x, labels).nll.mean().backward()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)
