"""DDP on 2 CPU processes (gloo): the same global batch gives the same loss and gradients as one process.

The flow's batch-norms are converted to GlobalBatchNorm (statistics over both ranks), so the two-rank run computes
exactly the single-process function; float64 makes the comparison tight. The workers also run two Trainer steps to
check the collective checkpoint (rank 0 writes; every rank's RNG state is saved). With ``invertible_backprop`` the
flow's backward pass rebuilds its inputs and recomputes the global batch-norms (collectives inside the backward
pass, interleaved with DDP's gradient all-reduce): the gradients must still be the single-process standard ones.
"""

from __future__ import annotations

import os
import socket

import pytest
import torch
import torch.multiprocessing as mp

import flowgmm_fast
from flowgmm_fast.training import (GlobalBatchNorm, Trainer, TrainLogger, flowgmm_cons_loss, init_distributed,
                                   cleanup_distributed, read_checkpoint, unwrap_model, wrap_model)

GLOBAL_BATCH = 8


def build_model(invertible=False):
    torch.manual_seed(0)
    flow = flowgmm_fast.nn.RealNVP(1, 1, 4, 1, dequantize=False, invertible_backprop=invertible)
    model = flowgmm_fast.FlowGMM(flow, flowgmm_fast.nn.GaussianMixture(3, 64))
    return model.double()


def global_batch():
    g = torch.Generator().manual_seed(1)
    x = ((torch.randint(0, 256, (GLOBAL_BATCH, 1, 8, 8), generator=g) + 0.5) / 256).double()
    x2 = (x + 0.01 * torch.rand(x.shape, generator=g, dtype=torch.float64)).clamp(1e-3, 1 - 1e-3)
    labels = torch.tensor([0, 1, 2, 1, -1, -1, -1, -1])
    return x, labels, x2


def rank_rows(rank, world):
    """Rows of rank r: its share of the labeled half, then of the unlabeled half (SemiSupervisedLoader's layout)."""
    half, per = GLOBAL_BATCH // 2, GLOBAL_BATCH // 2 // world
    return torch.cat([torch.arange(rank * per, (rank + 1) * per), half + torch.arange(rank * per, (rank + 1) * per)])


def loss_and_grads(net, x, labels, x2):
    loss, parts, _ = flowgmm_cons_loss(net, x, labels, x2, label_weight=2.0, consistency_weight=0.7)
    loss.backward()
    grads = {n: p.grad.detach().clone() for n, p in unwrap_model(net).named_parameters() if p.grad is not None}
    return loss.detach(), grads


def _worker(rank, world, port, out_dir, invertible):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    flowgmm_fast.set_backend("torch")
    info = init_distributed("cpu")
    try:
        net = wrap_model(build_model(invertible), info)
        n_global_bn = sum(isinstance(m, GlobalBatchNorm) for m in net.modules())
        rows = rank_rows(rank, world)
        x, labels, x2 = (t[rows] for t in global_batch())
        loss, grads = loss_and_grads(net, x, labels, x2)
        torch.distributed.all_reduce(loss)
        torch.save({"loss": loss / world, "grads": grads, "n_global_bn": n_global_bn},
                   os.path.join(out_dir, f"rank{rank}.pt"))

        opt = torch.optim.Adam(unwrap_model(net).parameters(), lr=1e-3)
        trainer = Trainer(net, {"flow": opt}, steps_per_epoch=2, max_grad_norm=100.0,
                          ckpt_path=os.path.join(out_dir, "ckpt.pt"), logger=TrainLogger(None, progress_bar=False))

        def batches(start):
            while True:
                yield x, labels, x2

        trainer.fit(batches, lambda b, t: flowgmm_cons_loss(t.model, *b)[:2], max_steps=2, log_every=1)
    finally:
        cleanup_distributed()


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
@pytest.mark.parametrize("invertible", [False, True], ids=["standard", "invertible_backprop"])
def test_ddp_two_cpu_ranks_match_one_process(tmp_path, invertible):
    if not torch.distributed.is_available() or not torch.distributed.is_gloo_available():
        pytest.skip("torch.distributed with gloo is not available")
    flowgmm_fast.set_backend("torch")
    ref_loss, ref_grads = loss_and_grads(build_model(), *global_batch())

    mp.spawn(_worker, args=(2, _free_port(), str(tmp_path), invertible), nprocs=2, join=True)

    for rank in range(2):
        got = torch.load(tmp_path / f"rank{rank}.pt")
        assert got["n_global_bn"] > 0, "batch-norms were not converted"
        torch.testing.assert_close(got["loss"], ref_loss, rtol=1e-10, atol=1e-9)
        assert got["grads"].keys() == ref_grads.keys()
        for name, g in ref_grads.items():
            torch.testing.assert_close(got["grads"][name], g, rtol=1e-8, atol=1e-10, msg=lambda m: f"{name}: {m}")
    ckpt = read_checkpoint(tmp_path / "ckpt.pt")
    assert ckpt["step"] == 2 and len(ckpt["rng"]) == 2
    assert not any(n.startswith(".") for n in os.listdir(tmp_path)), "temporary checkpoint file left behind"


def test_without_global_batchnorm_the_ranks_would_differ():
    """Control: per-rank batch statistics change the loss, so the DDP test above does test the synchronisation."""
    flowgmm_fast.set_backend("torch")
    model = build_model()
    x, labels, x2 = global_batch()
    whole, _, _ = flowgmm_cons_loss(model, x, labels, x2, label_weight=2.0, consistency_weight=0.7)
    halves = [flowgmm_cons_loss(model, *(t[rank_rows(r, 2)] for t in (x, labels, x2)), label_weight=2.0,
                                consistency_weight=0.7)[0] for r in range(2)]
    assert not torch.allclose((halves[0] + halves[1]) / 2, whole, rtol=1e-6)
