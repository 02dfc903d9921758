"""FlowGMM / FlowGMM-cons on images (MNIST, CIFAR-10, SVHN): the original train_semisup_cons.py on flowgmm_fast.

Same flags and semantics as the original script (Izmailov et al. 2020; REFERENCE.md): Adam (lr 1e-3) with weight
decay on the weight-norm gains only, a separate Adam (lr_gmm) for trainable prior parameters, gradient-norm clipping,
batches half labeled / half unlabeled, an epoch = one pass over the labeled data, two augmentations per image,
loss = label_weight * CE(labeled) + NLL(all) + w(epoch) * consistency, w ramping linearly to consistency_weight over
consistency_rampup epochs. Extra: --backend, --device, --dtype/--amp (bf16 autocast), --seed, --max_steps,
--compile, --distributed (torchrun), model size flags, --invertible_backprop (activation memory independent of the
flow's depth), exact --resume, atomic checkpoints, a NaN guard.

--resume (flowgmm_fast.training.resume): flags not given take the checkpoint's values; the hyperparameters in
RESUME_MUTABLE may be changed (e.g. a lower --lr to rescue a diverging run; the change is applied to the restored
optimizer and schedule and logged); the flags in RESUME_ENVIRONMENT always come from the command line; any other flag
given with a value other than the checkpoint's is an error. The labeled indices must match the checkpoint's.

    python experiments/prepare_data.py --dataset MNIST --source ../shared/datasets/MNIST/raw
    python experiments/train_semisup_cons.py --dataset=MNIST --data_path=data/images/mnist \\
        --label_path=data/labels/mnist/1000_balanced_labels/10.npz --logdir=runs/mnist --ckptdir=checkpoints/mnist
    torchrun --nproc_per_node=4 experiments/train_semisup_cons.py --distributed ...   (global --batch_size)
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path

import torch

import flowgmm_fast
from flowgmm_fast.data import ImageData, SemiSupervisedLoader, eval_batches, load_image_dataset, load_label_split
from flowgmm_fast.training import (Trainer, TrainLogger, cleanup_distributed, flowgmm_cons_loss,
                                   init_distributed, is_main_process, linear_rampup, make_lr_scheduler,
                                   read_checkpoint, reconcile_resume_args, seed_everything, set_learning_rate,
                                   unwrap_model, weight_decay_param_groups, wrap_model)

FLOWS = ("RealNVP",)
# what a resumed run may change (flowgmm_fast.training.resume): hyperparameters of the optimisation and the length
# and rhythm of the run ...
RESUME_MUTABLE = ("lr", "lr_gmm", "max_grad_norm", "label_weight", "consistency_weight", "consistency_rampup",
                  "num_epochs", "max_steps", "save_freq", "eval_freq", "eval_limit", "dtype", "amp")
# ... and where and how it runs (always from the command line); every other flag defines the saved state
RESUME_ENVIRONMENT = ("data_path", "label_path", "logdir", "ckptdir", "resume", "backend", "device", "compile",
                      "num_workers", "distributed", "log_freq", "eval_batch_size", "invertible_backprop",
                      "invertible_checkpoint_every")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="FlowGMM(-cons) semi-supervised training on images",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--dataset", required=True, type=str.upper, choices=["MNIST", "CIFAR10", "SVHN"])
    p.add_argument("--data_path", default=None,
                   help="prepared folder (train.npz/test.npz) or torchvision's files; default data/images/<dataset>")
    p.add_argument("--label_path", required=True,
                   help="label split, e.g. data/labels/mnist/1000_balanced_labels/10.npz")
    p.add_argument("--logdir", default=None, help="TensorBoard directory (default runs/<dataset>)")
    p.add_argument("--ckptdir", default=None, help="checkpoint directory (default checkpoints/<dataset>)")
    p.add_argument("--save_freq", default=25, type=int, help="epochs between checkpoints")
    p.add_argument("--num_epochs", default=100, type=int, help="epochs (passes over the labeled data)")
    p.add_argument("--label_weight", default=1.0, type=float, help="weight of the cross-entropy term")
    p.add_argument("--consistency_weight", default=1.0, type=float, help="final weight of the consistency term")
    p.add_argument("--consistency_rampup", default=1, type=int, help="epochs of linear consistency ramp-up")
    p.add_argument("--lr", default=1e-3, type=float)
    p.add_argument("--eval_freq", default=1, type=int, help="epochs between evaluations")
    p.add_argument("--flow", default="RealNVP", choices=FLOWS)
    p.add_argument("--batch_size", default=64, type=int, help="global batch (half labeled, half unlabeled)")
    p.add_argument("--weight_decay", default=5e-5, type=float, help="L2 on the weight-norm gains only")
    p.add_argument("--max_grad_norm", default=100.0, type=float)
    p.add_argument("--means_r", default=1.0, type=float, help="means ~ N(0, r^2 I)")
    p.add_argument("--cov_std", default=1.0, type=float, help="initial component std")
    p.add_argument("--means_trainable", action="store_true")
    p.add_argument("--covs_trainable", action="store_true")
    p.add_argument("--weights_trainable", action="store_true")
    p.add_argument("--gmm_trainable", action="store_true", help="means, covariances and weights trainable")
    p.add_argument("--lr_gmm", default=1e-2, type=float, help="Adam lr of the trainable prior parameters")
    p.add_argument("--supervised_only", action="store_true", help="drop the unlabeled NLL term")
    p.add_argument("--resume", default=None, help="checkpoint to resume from ('auto': <ckptdir>/last.pt if present)")
    # additions
    p.add_argument("--backend", default="auto", choices=["auto", "torch", "triton", "native"])
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"],
                   help="bfloat16 = autocast (parameters stay float32)")
    p.add_argument("--amp", action="store_true", help="same as --dtype bfloat16")
    p.add_argument("--seed", default=0, type=int)
    p.add_argument("--max_steps", default=None, type=int, help="stop after this many optimizer steps in total")
    p.add_argument("--compile", action="store_true", help="torch.compile the model")
    p.add_argument("--num_workers", default=0, type=int, help="threads preparing upcoming batches")
    p.add_argument("--distributed", action="store_true", help="DDP over the torchrun processes")
    p.add_argument("--num_scales", default=2, type=int)
    p.add_argument("--mid_channels", default=64, type=int)
    p.add_argument("--num_blocks", default=8, type=int)
    p.add_argument("--invertible_backprop", action="store_true",
                   help="backprop by inversion: the flow keeps no activations, the backward pass rebuilds them "
                        "(flowgmm_fast.nn.invertible); training memory independent of the depth, each coupling's "
                        "s/t network run twice (README: measured figures)")
    p.add_argument("--invertible_checkpoint_every", default=None, type=int,
                   help="with --invertible_backprop: also keep every N-th coupling's exact input (bounds the drift "
                        "of the rebuilt inputs)")
    p.add_argument("--schedule", default="constant", choices=["constant", "cosine"], help="per-step lr schedule")
    p.add_argument("--no_augment", action="store_true",
                   help="no random crop/flip (x1, x2 then differ only in their dequantisation noise)")
    p.add_argument("--log_freq", default=50, type=int, help="steps between training-loss logs")
    p.add_argument("--eval_batch_size", default=500, type=int)
    p.add_argument("--eval_limit", default=None, type=int, help="evaluate on the first N test images only")
    return p


def parse_args(argv=None):
    p = build_parser()
    args = p.parse_args(argv)
    if args.gmm_trainable:
        args.means_trainable = args.covs_trainable = args.weights_trainable = True
    if args.amp:
        args.dtype = "bfloat16"
    for name in ("save_freq", "num_epochs", "eval_freq", "batch_size", "log_freq", "eval_batch_size"):
        if getattr(args, name) < 1:
            p.error(f"--{name} must be >= 1, got {getattr(args, name)}")
    if args.max_steps is not None and args.max_steps < 1:
        p.error(f"--max_steps must be >= 1, got {args.max_steps}")
    if args.invertible_checkpoint_every is not None and args.invertible_checkpoint_every < 1:
        p.error(f"--invertible_checkpoint_every must be >= 1, got {args.invertible_checkpoint_every}")
    ds = args.dataset.lower()
    args.data_path = args.data_path or f"data/images/{ds}"
    args.logdir = args.logdir or f"runs/{ds}"
    args.ckptdir = args.ckptdir or f"checkpoints/{ds}"
    return args


def build_model(args, in_channels: int, dim: int, num_classes: int) -> flowgmm_fast.FlowGMM:
    """RealNVP (dequantisation happens in the data pipeline) + a Gaussian mixture with means ~ N(0, r^2 I)."""
    flow = flowgmm_fast.nn.RealNVP(in_channels, args.num_scales, args.mid_channels, args.num_blocks, dequantize=False,
                                   invertible_backprop=args.invertible_backprop,
                                   checkpoint_every=args.invertible_checkpoint_every)
    prior = flowgmm_fast.nn.GaussianMixture(num_classes, dim, means_r=args.means_r, std=args.cov_std,
                                            means_trainable=args.means_trainable, std_trainable=args.covs_trainable,
                                            weights_trainable=args.weights_trainable)
    return flowgmm_fast.FlowGMM(flow, prior)


@torch.no_grad()
def evaluate(model, test, args, info, autocast_dtype):
    """Test accuracy, mean NLL (nats) and bits/dim on dequantised test images (fixed noise), reduced over ranks."""
    inner = unwrap_model(model)
    inner.eval()
    sums = torch.zeros(4, dtype=torch.float64, device=info.device)  # correct, nll, bpd, count
    autocast = torch.autocast(info.device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None)
    for x, y in eval_batches(test, args.eval_batch_size, device=info.device, seed=args.seed, rank=info.rank,
                             world_size=info.world_size):
        with autocast:
            out = inner(x)
        d = x[0].numel()
        nll = out.nll.double()
        sums += torch.stack([(out.logits.argmax(1) == y).sum().double(), nll.sum(),
                             ((nll + d * math.log(256)) / (d * math.log(2))).sum(),
                             torch.tensor(float(len(y)), dtype=torch.float64, device=info.device)])
    if info.distributed:
        torch.distributed.all_reduce(sums)
    correct, nll, bpd, n = sums.tolist()
    return {"test_acc": correct / n, "test_nll": nll / n, "test_bpd": bpd / n}


def resume_path(args) -> Path | None:
    """The checkpoint --resume names ('auto': <ckptdir>/last.pt when it exists)."""
    if args.resume == "auto":
        path = Path(args.ckptdir) / "last.pt"
        return path if path.exists() else None
    return None if args.resume is None else Path(args.resume)


def main(argv=None):
    args = parse_args(argv)
    resume = resume_path(args)
    changes = {}
    if resume is not None:  # the saved arguments, before anything is built from them
        saved = read_checkpoint(resume)["extra"].get("args")
        changes = reconcile_resume_args(args, saved, build_parser(), argv, mutable=RESUME_MUTABLE,
                                        environment=RESUME_ENVIRONMENT)
    info = init_distributed(args.device, distributed=args.distributed)
    flowgmm_fast.set_backend(args.backend)
    seed_everything(args.seed)
    autocast_dtype = torch.bfloat16 if args.dtype == "bfloat16" else None

    train = load_image_dataset(args.dataset, args.data_path, train=True)
    test = load_image_dataset(args.dataset, args.data_path, train=False)
    if args.eval_limit is not None:
        test = ImageData(test.images[:args.eval_limit], test.labels[:args.eval_limit], test.dataset)
    labeled = load_label_split(args.label_path, train)
    loader = SemiSupervisedLoader(train, labeled, args.batch_size, seed=args.seed, device=info.device,
                                  rank=info.rank, world_size=info.world_size, num_workers=args.num_workers,
                                  augment_data=not args.no_augment)
    spe = loader.steps_per_epoch
    max_steps = args.num_epochs * spe if args.max_steps is None else args.max_steps

    c, h, w = train.images.shape[1:]
    model = build_model(args, c, c * h * w, train.num_classes).to(info.device)
    flow_opt = torch.optim.Adam(weight_decay_param_groups(model.flow, args.weight_decay), lr=args.lr)
    optimizers = {"flow": flow_opt}
    prior_params = [p for p in model.prior.parameters() if p.requires_grad]
    if prior_params:
        optimizers["gmm"] = torch.optim.Adam(prior_params, lr=args.lr_gmm, weight_decay=0.0)
    schedulers = {name: make_lr_scheduler(opt, args.schedule, max_steps) for name, opt in optimizers.items()}
    net = wrap_model(model, info)
    if args.compile:
        net = torch.compile(net)

    ckpt_path = Path(args.ckptdir) / "last.pt"
    logger = TrainLogger(args.logdir)
    trainer = Trainer(net, optimizers, schedulers=schedulers, steps_per_epoch=spe, max_grad_norm=args.max_grad_norm,
                      ckpt_path=ckpt_path, logger=logger, autocast_dtype=autocast_dtype,
                      check_every=1 if info.device.type == "cpu" else args.log_freq,
                      extra_state=lambda: {"args": vars(args), "labeled_idx": [int(i) for i in labeled]})
    if resume is not None:
        extra = trainer.resume(resume)
        if "labeled_idx" in extra and extra["labeled_idx"] != [int(i) for i in labeled]:
            raise SystemExit(f"--resume: {resume} was trained on other labeled indices than --label_path "
                             f"{args.label_path} gives")
        for name, opt_name in (("lr", "flow"), ("lr_gmm", "gmm")):
            if name in changes and opt_name in optimizers:
                set_learning_rate(optimizers[opt_name], schedulers[opt_name], getattr(args, name))
    if is_main_process():
        os.makedirs(args.ckptdir, exist_ok=True)
        with open(Path(args.ckptdir) / "command.sh", "w") as f:
            f.write(" ".join(sys.argv) + "\n")
        n_params = sum(p.numel() for p in model.parameters())
        logger.write(f"{args.dataset}: {len(train)} train ({len(labeled)} labeled), {len(test)} test | "
                     f"{args.flow} {n_params} parameters | {spe} steps/epoch, steps {trainer.step} -> {max_steps} | "
                     f"device {info.device} x{info.world_size} | backend {args.backend} | dtype {args.dtype}"
                     + (" | invertible backprop" if args.invertible_backprop else "")
                     + (f" | resumed from {resume}" if resume is not None else ""))
        if args.compile and args.invertible_backprop:
            logger.write(flowgmm_fast.nn.invertible.COMPILE_NOTE)
        if changes:
            logger.write(f"resume: changed {', '.join(map(str, changes.values()))} (applied from step "
                         f"{trainer.step})")

    def compute_loss(batch, tr):
        x, labels, x2 = batch
        epoch_index = tr.step // spe  # the epoch of the step being taken (0-based), as the original's ramp
        cons_w = args.consistency_weight * linear_rampup(epoch_index + 1, args.consistency_rampup)
        loss, parts, _ = flowgmm_cons_loss(net, x, labels, x2 if args.consistency_weight else None,
                                           label_weight=args.label_weight, consistency_weight=cons_w,
                                           use_unlabeled=not args.supervised_only)
        return loss, parts

    start = time.perf_counter()
    start_step = trainer.step
    try:
        metrics = trainer.fit(loader.batches_from, compute_loss, max_steps=max_steps, log_every=args.log_freq,
                              eval_every=args.eval_freq * spe, save_every=args.save_freq * spe,
                              evaluate=lambda tr: evaluate(net, test, args, info, autocast_dtype))
    finally:
        cleanup_distributed()
    wall = time.perf_counter() - start
    if is_main_process():
        summary = {"steps": trainer.step, "steps_this_run": trainer.step - start_step, "wall_s": round(wall, 1),
                   "epoch": round(trainer.epoch, 3), **{k: round(v, 5) for k, v in metrics.items()}}
        print("final " + json.dumps(summary), flush=True)
    return metrics


if __name__ == "__main__":
    main()
