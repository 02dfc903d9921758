"""flowgmm_fast.training: atomic checkpoints, exact resume, the non-finite guard, Ctrl-C, losses, optimiser helpers.

Small CPU models (RealNVP with 4 mid channels, 1 block, 1 scale on 8x8 images) keep every test to seconds.
"""

from __future__ import annotations

import math
import os
import signal

import pytest
import torch
import torch.nn.functional as F

import flowgmm_fast
from flowgmm_fast import training
from flowgmm_fast.training import (CheckpointError, NonFiniteGuard, NonFiniteLossError, Trainer, TrainLogger,
                                   atomic_save, flowgmm_cons_loss, linear_rampup, load_checkpoint,
                                   make_lr_scheduler, read_checkpoint, save_checkpoint, seed_everything,
                                   semisup_loss, weight_decay_param_groups)


def tiny_model(channels=1, size=8, mid=4, dequantize=True):
    flow = flowgmm_fast.nn.RealNVP(channels, 1, mid, 1, dequantize=dequantize)
    prior = flowgmm_fast.nn.GaussianMixture(3, channels * size * size)
    return flowgmm_fast.FlowGMM(flow, prior)


def tiny_batches(seed=0, n=8, size=8):
    """A pure function of the step (as SemiSupervisedLoader): x in (0, 1), half labeled (3 classes)."""
    def batches(start_step):
        step = start_step
        while True:
            step += 1
            g = torch.Generator().manual_seed(seed * 1000 + step)
            x = (torch.randint(0, 256, (n, 1, size, size), generator=g).float() + 0.5) / 256
            labels = torch.randint(0, 3, (n,), generator=g)
            labels[n // 2:] = -1
            x2 = (x + 0.01 * torch.rand(x.shape, generator=g)).clamp(0.001, 0.999)
            yield x, labels, x2
    return batches


def make_trainer(tmp_path, seed=0, **kw):
    seed_everything(seed)
    model = tiny_model()
    opt = torch.optim.Adam(weight_decay_param_groups(model.flow, 5e-5), lr=1e-3)
    sched = make_lr_scheduler(opt, "cosine", 20)
    kw.setdefault("ckpt_path", tmp_path / "last.pt")
    return Trainer(model, {"flow": opt}, schedulers={"flow": sched}, steps_per_epoch=4, max_grad_norm=100.0,
                   logger=TrainLogger(None, progress_bar=False), **kw)


def recording_loss(record, nan_at=None, nan_part="consistency"):
    def compute(batch, trainer):
        x, labels, x2 = batch
        loss, parts, _ = flowgmm_cons_loss(trainer.model, x, labels, x2, label_weight=3.0,
                                           consistency_weight=linear_rampup(trainer.epoch + 1, 2))
        if nan_at is not None and trainer.step + 1 == nan_at:
            parts = dict(parts)
            parts[nan_part] = parts[nan_part] * float("nan")
            loss = loss + parts[nan_part]
            parts["loss"] = loss
        record.append(loss.item())
        return loss, parts
    return compute


# ----------------------------------------------------------------------------------------------- checkpoints
def test_atomic_save_crash_keeps_previous_file(tmp_path, monkeypatch):
    path = tmp_path / "ckpt.pt"
    atomic_save({"v": 1}, path)

    def crashing_save(obj, f, *a, **k):
        f.write(b"partial garbage")
        raise OSError("disk full (simulated)")

    monkeypatch.setattr(torch, "save", crashing_save)
    with pytest.raises(OSError, match="disk full"):
        atomic_save({"v": 2}, path)
    monkeypatch.undo()
    assert torch.load(path)["v"] == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt.pt"], "temporary file left behind"


def test_checkpoint_roundtrip_and_mismatch(tmp_path):
    seed_everything(0)
    model = tiny_model()
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    path = save_checkpoint(tmp_path / "c.pt", model, step=7, epoch=1.75, optimizers={"flow": opt},
                           extra={"note": "x"})
    ckpt = read_checkpoint(path)
    assert {"model", "prior", "optimizers", "schedulers", "step", "epoch", "rng", "extra"} <= set(ckpt)
    expected = torch.rand(3)  # the RNG stream right after the save ...
    other = tiny_model()
    info = load_checkpoint(path, other, optimizers={"flow": torch.optim.Adam(other.parameters())})
    assert info["step"] == 7 and info["epoch"] == 1.75 and info["extra"]["note"] == "x"
    assert torch.equal(torch.rand(3), expected)  # ... is restored by the load
    for (n, a), (_, b) in zip(model.state_dict().items(), other.state_dict().items()):
        assert torch.equal(a, b), n
    with pytest.raises(CheckpointError, match="does not fit the model"):
        load_checkpoint(path, tiny_model(mid=6))
    with pytest.raises(CheckpointError, match="has no optimizer 'gmm'"):
        load_checkpoint(path, tiny_model(), optimizers={"gmm": opt})
    with pytest.raises(CheckpointError, match="does not exist"):
        load_checkpoint(tmp_path / "missing.pt", model)


# ----------------------------------------------------------------------------------------------- exact resume
def test_resume_is_bit_exact(tmp_path):
    full = []
    t_full = make_trainer(tmp_path / "a")
    t_full.fit(tiny_batches(), recording_loss(full), max_steps=6, log_every=2)

    first = []
    t1 = make_trainer(tmp_path / "b")
    t1.fit(tiny_batches(), recording_loss(first), max_steps=3, log_every=2)  # checkpoint at the end (step 3)
    torch.manual_seed(12345)  # a resumed process starts from unrelated RNG states
    rest = []
    t2 = make_trainer(tmp_path / "b", seed=99)
    t2.resume()
    assert t2.step == 3
    t2.fit(tiny_batches(), recording_loss(rest), max_steps=6, log_every=2)
    assert first + rest == full, "resumed losses differ from the uninterrupted run"
    for (n, a), (_, b) in zip(t_full.model.state_dict().items(), t2.model.state_dict().items()):
        assert torch.equal(a, b), f"parameter {n} differs after resume"


# ----------------------------------------------------------------------------------------------- failures
def test_nan_loss_stops_naming_step_and_part_and_keeps_last_good_checkpoint(tmp_path):
    trainer = make_trainer(tmp_path)
    with pytest.raises(NonFiniteLossError, match=r"step 5: loss part\(s\) 'consistency', 'loss'") as err:
        trainer.fit(tiny_batches(), recording_loss([], nan_at=5), max_steps=8, log_every=2, save_every=2)
    assert err.value.step == 5 and err.value.parts == ["consistency", "loss"]
    # the step-4 state gave the NaN loss of step 5, so its checkpoint (held until step 5's loss was known) is dropped
    assert read_checkpoint(tmp_path / "last.pt")["step"] == 2


def test_guard_checked_before_save_when_checks_are_sparse(tmp_path):
    trainer = make_trainer(tmp_path, check_every=100)  # no per-step check: the save itself must check
    with pytest.raises(NonFiniteLossError, match="step 7") as err:
        trainer.fit(tiny_batches(), recording_loss([], nan_at=7, nan_part="nll"), max_steps=10, log_every=100,
                    save_every=3)
    assert err.value.parts == ["nll", "loss"]
    assert read_checkpoint(tmp_path / "last.pt")["step"] == 3  # step 6's checkpoint waited for step 7's loss


def test_guard_records_first_bad_step_without_sync():
    guard = NonFiniteGuard()
    guard.update(1, {"a": torch.tensor(1.0), "b": torch.tensor(2.0)})
    guard.update(2, {"a": torch.tensor(1.0), "b": torch.tensor(float("inf"))})
    guard.update(3, {"a": torch.tensor(float("nan")), "b": torch.tensor(float("nan"))})
    assert guard.first_bad() == (2, ["b"])
    with pytest.raises(ValueError, match="loss parts changed"):
        guard.update(4, {"a": torch.tensor(1.0)})


def test_keyboard_interrupt_writes_checkpoint(tmp_path):
    trainer = make_trainer(tmp_path)
    inner = recording_loss([])

    def interrupting(batch, tr):
        if tr.step + 1 == 3:
            os.kill(os.getpid(), signal.SIGINT)  # Ctrl-C during step 3
        return inner(batch, tr)

    with pytest.raises(KeyboardInterrupt):
        trainer.fit(tiny_batches(), interrupting, max_steps=10, log_every=5)
    assert read_checkpoint(tmp_path / "last.pt")["step"] == 3
    assert signal.getsignal(signal.SIGINT) != trainer._on_signal  # handler restored


def test_trainer_validates_arguments(tmp_path):
    model = tiny_model()
    opt = torch.optim.Adam(model.parameters())
    with pytest.raises(ValueError, match="steps_per_epoch"):
        Trainer(model, {"flow": opt}, steps_per_epoch=0)
    with pytest.raises(ValueError, match="max_grad_norm"):
        Trainer(model, {"flow": opt}, steps_per_epoch=1, max_grad_norm=0)
    with pytest.raises(ValueError, match="optimizers"):
        Trainer(model, {}, steps_per_epoch=1)


# ----------------------------------------------------------------------------------------------- losses
def test_flowgmm_cons_loss_matches_definition():
    seed_everything(0)
    model = tiny_model(dequantize=False).eval()
    x, labels, x2 = next(iter(tiny_batches()(0)))
    loss, parts, out = flowgmm_cons_loss(model, x, labels, x2, label_weight=3.0, consistency_weight=0.5)
    lab = labels >= 0
    z, sldj = model.encode(x)
    logits = model.prior.class_logits(z)
    ce = F.cross_entropy(logits[lab], labels[lab])
    nll = (model.prior.nll(z) - sldj).mean()
    target = model.class_logits(x2).argmax(1)
    comp = -0.5 * ((z - model.prior.means[target]) ** 2).sum(1) / model.prior.log_std.exp()[target] ** 2 \
        - z.shape[1] * (model.prior.log_std[target] + 0.5 * math.log(2 * math.pi))
    cons = -(comp + sldj).mean()
    torch.testing.assert_close(parts["ce_labeled"], ce)
    torch.testing.assert_close(parts["nll"], nll)
    torch.testing.assert_close(parts["consistency"], cons)
    torch.testing.assert_close(loss, 3.0 * ce + nll + 0.5 * cons)
    loss_sup, _, _ = flowgmm_cons_loss(model, x, labels, None, label_weight=3.0, use_unlabeled=False)
    torch.testing.assert_close(loss_sup, 3.0 * ce)


def test_flowgmm_cons_loss_teacher_term_is_the_soft_cross_entropy_of_the_unlabeled_rows():
    seed_everything(0)
    model = tiny_model(dequantize=False).eval()
    x, labels, _ = next(iter(tiny_batches()(0)))
    q = torch.softmax(torch.randn(len(labels), model.prior.means.shape[0]), 1)
    base, base_parts, _ = flowgmm_cons_loss(model, x, labels, None, label_weight=2.0)
    assert "ce_teacher" not in base_parts
    loss, parts, out = flowgmm_cons_loss(model, x, labels, None, label_weight=2.0, soft_targets=q, teacher_weight=0.3)
    unl = labels < 0
    assert unl.any() and (~unl).any()
    expected = -(q[unl] * torch.log_softmax(out.logits[unl], 1)).sum(1).mean()
    torch.testing.assert_close(parts["ce_teacher"], expected)
    torch.testing.assert_close(loss, base + 0.3 * expected)
    # the labeled rows' targets are never read
    q_lab_changed = q.clone()
    q_lab_changed[~unl] = torch.roll(q[~unl], 1, dims=1)
    torch.testing.assert_close(flowgmm_cons_loss(model, x, labels, None, soft_targets=q_lab_changed,
                                                 teacher_weight=0.3)[1]["ce_teacher"], expected)
    # weight 0: the part is logged, the loss is the base loss
    loss0, parts0, _ = flowgmm_cons_loss(model, x, labels, None, label_weight=2.0, soft_targets=q)
    torch.testing.assert_close(loss0, base)
    assert "ce_teacher" in parts0
    with pytest.raises(ValueError, match="soft_targets must have shape"):
        flowgmm_cons_loss(model, x, labels, None, soft_targets=q[:, :2], teacher_weight=1.0)


def test_semisup_loss_parts():
    seed_everything(0)
    model = tiny_model(dequantize=False).eval()
    x, labels, _ = next(iter(tiny_batches()(0)))
    loss, parts, out = semisup_loss(model, x, labels, label_weight=2.0, unlabeled_weight=0.5)
    lab = labels >= 0
    torch.testing.assert_close(parts["nll_labeled"], out.nll[lab].mean())
    torch.testing.assert_close(parts["nll_unlabeled"], out.nll[~lab].mean())
    torch.testing.assert_close(loss, 2.0 * out.nll[lab].mean() + 0.5 * out.nll[~lab].mean())
    with pytest.raises(ValueError, match="labels must have shape"):
        semisup_loss(model, x, labels[:3])
    with torch.no_grad():
        model.prior.weight_logits.copy_(torch.linspace(-1, 1, model.prior.num_classes))
    loss, parts, out = semisup_loss(model, x, labels, label_weight=0.0, unlabeled_weight=1.0, ce_weight=1.5)
    log_pi = torch.log_softmax(model.prior.weight_logits, 0)
    ce = torch.nn.functional.cross_entropy(out.logits[lab] - log_pi, labels[lab])  # mixture weights left out
    torch.testing.assert_close(parts["ce_labeled"], ce)
    torch.testing.assert_close(loss, out.nll[~lab].mean() + 1.5 * ce)


# ----------------------------------------------------------------------------------------------- optimiser helpers
def test_weight_decay_only_on_weight_norm_gains():
    model = tiny_model()
    groups = weight_decay_param_groups(model.flow, 5e-5, lr=1e-3)
    gains = {id(p) for p in flowgmm_fast.nn.weight_norm_gains(model.flow)}
    assert gains, "the flow has no weight-norm gains"
    assert [g["weight_decay"] for g in groups] == [5e-5, 0.0] and all(g["lr"] == 1e-3 for g in groups)
    assert {id(p) for p in groups[0]["params"]} == gains
    all_ids = [id(p) for g in groups for p in g["params"]]
    assert sorted(all_ids) == sorted(id(p) for p in model.flow.parameters() if p.requires_grad)
    with pytest.raises(ValueError, match="weight_decay"):
        weight_decay_param_groups(model.flow, -1.0)


def test_rampup_and_schedules():
    assert [linear_rampup(e, 4) for e in (0, 1, 2, 4, 9)] == [0.0, 0.25, 0.5, 1.0, 1.0]
    assert linear_rampup(0, 0) == 1.0
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    sched = make_lr_scheduler(opt, "cosine", total_steps=4)
    lrs = []
    for _ in range(4):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert lrs == pytest.approx([1.0, 0.5 * (1 + math.cos(math.pi / 4)), 0.5, 0.5 * (1 + math.cos(3 * math.pi / 4))])
    with pytest.raises(ValueError, match="lr schedule"):
        make_lr_scheduler(opt, "step")
    # a progress callable (a time budget's share) replaces step / total_steps, clipped to [0, 1]; no total needed
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=2.0)
    share = [0.0]
    sched = make_lr_scheduler(opt, "cosine", progress=lambda: share[0])
    lrs = []
    for value in (0.5, 1.5, -1.0):
        share[0] = value
        opt.step()
        sched.step()
        lrs.append(opt.param_groups[0]["lr"])
    assert lrs == pytest.approx([1.0, 0.0, 2.0])
    with pytest.raises(TypeError, match="progress"):
        make_lr_scheduler(opt, "cosine", progress=0.5)


def test_logger_writes_events_and_one_line_summary(tmp_path, capsys):
    logger = TrainLogger(str(tmp_path / "tb"), enabled=True, progress_bar=False)
    line = logger.summary(12, 1.5, {"test_acc": 0.91234, "test_bpd": 1.2345})
    logger.scalars(12, {"loss": torch.tensor(2.0)}, prefix="train/")
    logger.close()
    assert line == "step 12 | epoch 1.50 | test_acc 0.9123 | test_bpd 1.234"
    assert capsys.readouterr().out.strip() == line
    assert any(p.name.startswith("events.out.tfevents") for p in (tmp_path / "tb").iterdir())
    silent = TrainLogger(str(tmp_path / "tb2"), enabled=False)
    silent.summary(1, 0.0, {"a": 1.0})
    assert not (tmp_path / "tb2").exists() and capsys.readouterr().out == ""


def test_public_api_exports():
    for name in training.__all__:
        assert hasattr(training, name), name


def test_bf16_autocast_steps_are_finite(tmp_path):
    """--amp: the s/t nets run in bf16 under autocast while the coupling stays float32."""
    trainer = make_trainer(tmp_path, autocast_dtype=torch.bfloat16, ckpt_path=None)
    record = []
    trainer.fit(tiny_batches(), recording_loss(record), max_steps=2, log_every=1)
    assert len(record) == 2 and all(math.isfinite(v) for v in record)
    assert all(p.dtype == torch.float32 for p in trainer.model.parameters())
