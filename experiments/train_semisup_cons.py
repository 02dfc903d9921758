"""FlowGMM / FlowGMM-cons on images (MNIST, CIFAR-10, SVHN): the original train_semisup_cons.py on flowgmm_fast.

Same flags and semantics as the original script (Izmailov et al. 2020; REFERENCE.md): Adam (lr 1e-3) with weight
decay on the weight-norm gains only, a separate Adam (lr_gmm) for trainable prior parameters, gradient-norm clipping,
batches half labeled / half unlabeled, an epoch = one pass over the labeled data, two augmentations per image,
loss = label_weight * CE(labeled) + NLL(all) + w(epoch) * consistency, w ramping linearly to consistency_weight over
consistency_rampup epochs. Extra: --backend, --device, --dtype/--amp (bf16 autocast), --seed, --max_steps,
--compile, --distributed (torchrun), model size flags, --invertible_backprop (activation memory independent of the
flow's depth), exact --resume, atomic checkpoints, a NaN guard, --threads, --warmup_steps, --time_limit, means and
std of the prior from the labeled points (--means_init/--std_init labeled), an identity flow init (--flow_init), and
--preset: a named set of defaults (PRESETS; flags given on the command line win). Without --preset every default is
the original's. Any dataset in MNIST's IDX format works by name (prepare_data.py --dataset <name> --source DIR).

    --preset mnist-cpu: FlowGMM on a 28x28 grayscale dataset (MNIST-format) with ~1000 labels on a small CPU, with
    --time_limit (experiments/RESULTS.md: its curve on MNIST, the probes behind it, the wall time per epoch of the
    paper's model on a 2-core CPU)

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

import numpy as np
import torch

import flowgmm_fast
from flowgmm_fast.data import (ImageData, SemiSupervisedLoader, canonical_dataset_name, dequantize, eval_batches,
                               load_image_dataset, load_label_split)
from flowgmm_fast.semisup import init_means_from_labeled, init_std_from_labeled
from flowgmm_fast.training import (Trainer, TrainLogger, cleanup_distributed, explicit_dests, flowgmm_cons_loss,
                                   init_distributed, is_main_process, linear_rampup, make_lr_scheduler,
                                   read_checkpoint, reconcile_resume_args, seed_everything, set_learning_rate,
                                   unwrap_model, weight_decay_param_groups, wrap_model)

FLOWS = ("RealNVP",)
# what a resumed run may change (flowgmm_fast.training.resume): hyperparameters of the optimisation and the length
# and rhythm of the run ...
RESUME_MUTABLE = ("lr", "lr_gmm", "max_grad_norm", "label_weight", "consistency_weight", "consistency_rampup",
                  "num_epochs", "max_steps", "save_freq", "eval_freq", "eval_limit", "dtype", "amp", "time_limit",
                  "curve_eval_limit")
# ... and where and how it runs (always from the command line); every other flag defines the saved state
RESUME_ENVIRONMENT = ("data_path", "label_path", "logdir", "ckptdir", "resume", "backend", "device", "compile",
                      "num_workers", "distributed", "log_freq", "eval_batch_size", "invertible_backprop",
                      "invertible_checkpoint_every", "threads", "step_in_backward")

# Named defaults (--preset); flags given on the command line override them. Measured in experiments/RESULTS.md.
PRESETS = {
    # FlowGMM (no consistency term) on a 28x28 grayscale dataset with ~1000 labels on a small CPU, with --time_limit
    "mnist-cpu": {"mid_channels": 16, "num_blocks": 1, "batch_size": 32, "flow_init": "identity",
                  "means_init": "labeled", "std_init": "labeled", "means_trainable": True,
                  "weights_trainable": True, "lr": 3e-4, "schedule": "cosine",
                  "warmup_steps": 100, "label_weight": 10.0, "consistency_weight": 0.0, "crop_padding": 2,
                  "threads": 1},
}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="FlowGMM(-cons) semi-supervised training on images",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--preset", default=None, choices=sorted(PRESETS),
                   help="named defaults (PRESETS); flags given on the command line win")
    p.add_argument("--dataset", required=True, type=str.upper,
                   help="MNIST, CIFAR10, SVHN, or the name of a dataset in MNIST's IDX format (prepare_data.py)")
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
    p.add_argument("--means_r", default=1.0, type=float, help="means ~ N(0, r^2 I) (--means_init random)")
    p.add_argument("--cov_std", default=1.0, type=float, help="initial component std (--std_init fixed)")
    p.add_argument("--means_trainable", action="store_true")
    p.add_argument("--covs_trainable", action="store_true")
    p.add_argument("--weights_trainable", action="store_true")
    p.add_argument("--gmm_trainable", action="store_true", help="means, covariances and weights trainable")
    p.add_argument("--lr_gmm", default=1e-2, type=float, help="Adam lr of the trainable prior parameters")
    p.add_argument("--supervised_only", action="store_true",
                   help="labeled images only: whole batches of them, no unlabeled NLL term")
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
    p.add_argument("--step_in_backward", action="store_true",
                   help="Adam steps each parameter inside the backward pass and frees its gradient (the same updates; "
                        "a step holds one gradient at a time). No gradient clipping (--max_grad_norm cannot be given "
                        "with it); not with --distributed")
    p.add_argument("--schedule", default="constant", choices=["constant", "cosine"],
                   help="per-step lr schedule; cosine decays to 0 over the run's steps, or with --time_limit over "
                        "its time budget (the share spent, updated at each epoch end)")
    p.add_argument("--no_augment", action="store_true",
                   help="no random crop/flip (x1, x2 then differ only in their dequantisation noise)")
    p.add_argument("--crop_padding", default=4, type=int, help="zero padding of the random crop (pixels)")
    p.add_argument("--log_freq", default=50, type=int, help="steps between training-loss logs")
    p.add_argument("--eval_batch_size", default=500, type=int)
    p.add_argument("--eval_limit", default=None, type=int, help="evaluate on the first N test images only")
    p.add_argument("--curve_eval_limit", default=None, type=int,
                   help="the periodic evaluations (not the final one) use the first N test images only: a cheaper "
                        "curve")
    p.add_argument("--threads", default=None, type=int, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--warmup_steps", default=0, type=int, help="linear learning-rate warm-up (steps)")
    p.add_argument("--time_limit", default=None, type=float,
                   help="minutes of training wall time for this run (from the start of the script, setup included, "
                        "periodic evaluations excluded): training ends at the first epoch end after which one more "
                        "epoch would pass it; then the final evaluation")
    p.add_argument("--flow_init", default="random", choices=["random", "identity"],
                   help="random: the original's initialisation; identity: every coupling starts as the identity "
                        "(last layer of its s/t network zeroed)")
    p.add_argument("--means_init", default="random", choices=["random", "labeled"],
                   help="random: N(0, means_r^2 I) (the original); labeled: the mean latent of each class's labeled "
                        "images under the initial flow")
    p.add_argument("--std_init", default="fixed", choices=["fixed", "labeled"],
                   help="fixed: --cov_std; labeled: the pooled within-class std of the labeled latents")
    p.add_argument("--teacher", default="none", choices=["none", "graph"],
                   help="graph: before training, spread the labels over the kNN graph of every training image "
                        "(PCA of the pixels, flowgmm_fast.graph.spread_labels); the unlabeled rows then add "
                        "--teacher_weight x the cross-entropy of the flow's class posterior against the spread "
                        "distribution of the row")
    p.add_argument("--teacher_weight", default=1.0, type=float, help="weight of the teacher's cross-entropy")
    p.add_argument("--teacher_pca", default=50, type=int, help="principal components of the teacher's graph")
    p.add_argument("--teacher_neighbors", default=7, type=int, help="neighbours per image in the teacher's graph")
    return p


def parse_args(argv=None):
    p = build_parser()
    preset = p.parse_known_args(argv)[0].preset
    if preset is not None:
        p.set_defaults(**PRESETS[preset])
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
    given = explicit_dests(p, argv)
    if args.step_in_backward:  # nothing left to clip once every parameter is stepped inside the backward pass
        if "max_grad_norm" in given:
            p.error("--step_in_backward steps each parameter before the global gradient norm is known: it cannot "
                    "clip it, drop --max_grad_norm")
        if args.distributed:
            p.error("--step_in_backward does not work with --distributed (DDP averages the gradients after they are "
                    "accumulated)")
        args.max_grad_norm = None
    if args.threads is not None and args.threads < 1:
        p.error(f"--threads must be >= 1, got {args.threads}")
    if args.time_limit is not None and not args.time_limit > 0:
        p.error(f"--time_limit must be > 0 minutes, got {args.time_limit}")
    if args.warmup_steps < 0:
        p.error(f"--warmup_steps must be >= 0, got {args.warmup_steps}")
    if args.teacher_weight < 0:
        p.error(f"--teacher_weight must be >= 0, got {args.teacher_weight}")
    if args.teacher_pca < 0 or args.teacher_neighbors < 1:
        p.error(f"--teacher_pca must be >= 0 and --teacher_neighbors >= 1, got {args.teacher_pca} and "
                f"{args.teacher_neighbors}")
    teacher_flags = sorted(f"--{name}" for name in ("teacher_weight", "teacher_pca", "teacher_neighbors")
                           if name in given)
    if args.teacher == "none" and teacher_flags:
        p.error(f"{', '.join(teacher_flags)} configure the graph teacher, which is off: add --teacher graph")
    if args.std_init == "labeled" and args.means_init != "labeled":
        p.error("--std_init labeled measures the spread about the labeled class means: it needs --means_init labeled")
    try:
        ds = canonical_dataset_name(args.dataset)
    except ValueError as exc:
        p.error(str(exc))
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
    if args.flow_init == "identity":
        identity_init(flow)
    return flowgmm_fast.FlowGMM(flow, prior)


@torch.no_grad()
def identity_init(flow: torch.nn.Module) -> int:
    """--flow_init identity: zero the last convolution (weight-norm gain and bias) of every coupling's s/t network,
    so s = t = 0 and the flow starts as its logit layer followed by a fixed rearrangement of the pixels (Glow's
    zero-initialised last layer; the original initialises it at random). The gains still receive gradients, so
    training moves every network off zero. Returns the number of couplings changed."""
    n = 0
    for m in flow.modules():
        out = getattr(getattr(m, "st_net", None), "out_conv", None)
        if isinstance(m, flowgmm_fast.nn.AffineCoupling) and out is not None:
            out.parametrizations.weight.original0.zero_()
            out.bias.zero_()
            n += 1
    return n


@torch.no_grad()
def calibrate_batch_norm(flow: torch.nn.Module, x: torch.Tensor, batch_size: int) -> None:
    """Set the running statistics of every batch-norm layer of ``flow`` to their averages over ``x`` (training-mode
    forward passes in chunks of ``batch_size``), so that the flow in eval mode computes what training computes."""
    norms = [m for m in flow.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    momenta = [m.momentum for m in norms]
    was_training = flow.training
    for m in norms:
        m.reset_running_stats()
        m.momentum = None  # a cumulative average over the chunks
    flow.train()
    for chunk in x.split(batch_size):
        flow(chunk)
    for m, momentum in zip(norms, momenta):
        m.momentum = momentum
    flow.train(was_training)


CALIBRATION_IMAGES = 256  # labeled images whose batch statistics set the flow's batch norms before the prior's init


@torch.no_grad()
def init_prior_from_labeled(model: flowgmm_fast.FlowGMM, images: torch.Tensor, labels: torch.Tensor, args) -> str:
    """--means_init labeled (and --std_init labeled): each class's mean and the pooled within-class std of the
    latents of its labeled images (dequantised, not augmented) under the initial flow, whose batch-norm statistics
    are first set from the first CALIBRATION_IMAGES of them; the tabular path's flowgmm_fast.semisup initialisation.
    Not in the original, whose means are random: the prior then starts as the nearest-class-mean classifier the
    labels imply in the initial latent space, rather than asking the flow to carry every class to an arbitrary
    point. Returns a log line."""
    was_training = model.training
    x = dequantize(images, torch.Generator(device=images.device).manual_seed(args.seed))
    calibrate_batch_norm(model.flow, x[:CALIBRATION_IMAGES], args.eval_batch_size)
    model.eval()
    z = torch.cat([model.encode(chunk)[0] for chunk in x.split(args.eval_batch_size)])  # once, for both
    means = init_means_from_labeled(model, x, labels, min_separation=None, z=z)
    line = "prior from the labeled points: means"
    if args.std_init == "labeled":
        sigma = init_std_from_labeled(model, x, labels, z=z)
        line += ", std" + ("" if sigma is None else f" {sigma:.3f}")
    model.train(was_training)
    dist = torch.cdist(means, means).fill_diagonal_(float("inf"))
    return line + f" (closest two {float(dist.min()):.2f} apart)"


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


def graph_teacher(train: ImageData, test: ImageData, labeled, args) -> tuple[torch.Tensor, str]:
    """--teacher graph: label spreading (flowgmm_fast.graph.spread_labels) over the --teacher_neighbors-nearest-
    neighbour graph of the training images' first --teacher_pca principal components (no test image in it). Returns
    the (N, K) spread class distributions of the training images and a log line with the spreading's own test
    accuracy (each test image: the mean distribution of its nearest training images), what the flow is taught."""
    from flowgmm_fast.graph import pixel_pca, spread_labels

    t0 = time.perf_counter()
    x_train, x_test = pixel_pca(train.images.numpy(), [test.images.numpy()], args.teacher_pca, args.seed)
    labels = np.full(len(train), -1, np.int64)
    labels[labeled] = train.labels.numpy()[labeled]
    spreading = spread_labels(x_train, labels, train.num_classes, n_neighbors=args.teacher_neighbors)
    test_acc = float(np.mean(spreading.predict_proba(x_test).argmax(1) == test.labels.numpy()))
    unl = labels < 0
    train_acc = float(np.mean(spreading.distributions_[unl].argmax(1) == train.labels.numpy()[unl]))
    line = (f"teacher: label spreading on the {args.teacher_neighbors}-NN graph of PCA-{args.teacher_pca} pixels, "
            f"{time.perf_counter() - t0:.0f} s; its accuracy on the unlabeled training images {100 * train_acc:.2f}%, "
            f"on the {len(test)} test images {100 * test_acc:.2f}%")
    return torch.as_tensor(spreading.distributions_, dtype=torch.float32), line


def resume_path(args) -> Path | None:
    """The checkpoint --resume names ('auto': <ckptdir>/last.pt when it exists)."""
    if args.resume == "auto":
        path = Path(args.ckptdir) / "last.pt"
        return path if path.exists() else None
    return None if args.resume is None else Path(args.resume)


def main(argv=None):
    start = time.perf_counter()
    args = parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    resume = resume_path(args)
    changes = {}
    if resume is not None:  # the saved arguments, before anything is built from them
        saved = read_checkpoint(resume)["extra"].get("args")
        changes = reconcile_resume_args(args, saved, build_parser(), argv, mutable=RESUME_MUTABLE,
                                        environment=RESUME_ENVIRONMENT)
        if args.step_in_backward and args.max_grad_norm is not None:
            raise SystemExit(f"--step_in_backward: the checkpoint's run clips the gradient norm (--max_grad_norm "
                             f"{args.max_grad_norm}), which a step inside the backward pass cannot do; resume it "
                             f"without --step_in_backward")
    info = init_distributed(args.device, distributed=args.distributed)
    flowgmm_fast.set_backend(args.backend)
    seed_everything(args.seed)
    autocast_dtype = torch.bfloat16 if args.dtype == "bfloat16" else None

    train = load_image_dataset(args.dataset, args.data_path, train=True)
    test = load_image_dataset(args.dataset, args.data_path, train=False)
    if args.eval_limit is not None:
        test = ImageData(test.images[:args.eval_limit], test.labels[:args.eval_limit], test.dataset)
    curve_test = test
    if args.curve_eval_limit is not None:
        curve_test = ImageData(test.images[:args.curve_eval_limit], test.labels[:args.curve_eval_limit], test.dataset)
    labeled = load_label_split(args.label_path, train)
    soft_targets, teacher_line = None, None
    if args.teacher == "graph":  # recomputed on resume: a pure function of the data, the split and the flags
        soft_targets, teacher_line = graph_teacher(train, test, labeled, args)
    loader = SemiSupervisedLoader(train, labeled, args.batch_size, seed=args.seed, device=info.device,
                                  rank=info.rank, world_size=info.world_size, num_workers=args.num_workers,
                                  augment_data=not args.no_augment, crop_padding=args.crop_padding,
                                  supervised_only=args.supervised_only, soft_targets=soft_targets)
    spe = loader.steps_per_epoch
    max_steps = args.num_epochs * spe if args.max_steps is None else args.max_steps

    c, h, w = train.images.shape[1:]
    model = build_model(args, c, c * h * w, train.num_classes).to(info.device)
    prior_line = None
    if args.means_init == "labeled" and resume is None:  # a resumed run loads its prior
        lab = torch.as_tensor(labeled, dtype=torch.long)
        prior_line = init_prior_from_labeled(model, train.images[lab].to(info.device),
                                             train.labels[lab].to(info.device), args)
    flow_opt = torch.optim.Adam(weight_decay_param_groups(model.flow, args.weight_decay), lr=args.lr)
    optimizers = {"flow": flow_opt}
    prior_params = [p for p in model.prior.parameters() if p.requires_grad]
    if prior_params:
        optimizers["gmm"] = torch.optim.Adam(prior_params, lr=args.lr_gmm, weight_decay=0.0)
    # --schedule cosine with --time_limit: the cosine follows the share of the time budget spent (updated at each
    # epoch end; a resumed run starts from the checkpoint's share and spends the rest over its own budget)
    time_progress = [0.0, 0.0]  # [share spent, share at the start of this run]
    by_time = args.schedule == "cosine" and args.time_limit is not None
    schedulers = {name: make_lr_scheduler(opt, args.schedule, max_steps, warmup_steps=args.warmup_steps,
                                          progress=(lambda: time_progress[0]) if by_time else None)
                  for name, opt in optimizers.items()}
    net = wrap_model(model, info)
    if args.compile:
        net = torch.compile(net)

    ckpt_path = Path(args.ckptdir) / "last.pt"
    logger = TrainLogger(args.logdir)
    trainer = Trainer(net, optimizers, schedulers=schedulers, steps_per_epoch=spe, max_grad_norm=args.max_grad_norm,
                      ckpt_path=ckpt_path, logger=logger, autocast_dtype=autocast_dtype,
                      check_every=1 if info.device.type == "cpu" else args.log_freq,
                      extra_state=lambda: {"args": vars(args), "labeled_idx": [int(i) for i in labeled],
                                           "time_progress": time_progress[0]},
                      step_in_backward=args.step_in_backward)
    if resume is not None:
        extra = trainer.resume(resume)
        if "labeled_idx" in extra and extra["labeled_idx"] != [int(i) for i in labeled]:
            raise SystemExit(f"--resume: {resume} was trained on other labeled indices than --label_path "
                             f"{args.label_path} gives")
        if by_time:
            time_progress[:] = [float(extra.get("time_progress", 0.0))] * 2
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
                     + (" | step in backward (no clipping)" if args.step_in_backward else "")
                     + (f" | resumed from {resume}" if resume is not None else "")
                     + (f" | threads {torch.get_num_threads()}" if info.device.type == "cpu" else ""))
        if args.compile and args.invertible_backprop:
            logger.write(flowgmm_fast.nn.invertible.COMPILE_NOTE)
        if prior_line is not None and resume is None:
            logger.write(prior_line)
        if teacher_line is not None:
            logger.write(teacher_line)
        if changes:
            logger.write(f"resume: changed {', '.join(map(str, changes.values()))} (applied from step "
                         f"{trainer.step})")

    def compute_loss(batch, tr):
        x, labels, x2, *soft = batch
        epoch_index = tr.step // spe  # the epoch of the step being taken (0-based), as the original's ramp
        cons_w = args.consistency_weight * linear_rampup(epoch_index + 1, args.consistency_rampup)
        loss, parts, _ = flowgmm_cons_loss(net, x, labels, x2 if args.consistency_weight else None,
                                           label_weight=args.label_weight, consistency_weight=cons_w,
                                           use_unlabeled=not args.supervised_only,
                                           soft_targets=soft[0] if soft else None,
                                           teacher_weight=args.teacher_weight)
        return loss, parts

    start_step = trainer.step
    eval_time = [0.0]
    stopping = [False]  # set by --time_limit: the coming evaluation is the final one

    def timed_evaluate(tr):
        """evaluate(), plus the wall time since the script started without (train_s) and with (wall_s) the
        evaluations (setup, i.e. data loading and the prior's initialisation, is in both)."""
        t0 = time.perf_counter()
        train_s = t0 - start - eval_time[0]
        final = tr.step == tr.max_steps or stopping[0]
        data = test if final or args.curve_eval_limit is None else curve_test
        metrics = evaluate(net, data, args, info, autocast_dtype)
        eval_time[0] += time.perf_counter() - t0
        return {**metrics, "test_n": float(len(data)), "train_s": round(train_s, 1),
                "wall_s": round(time.perf_counter() - start, 1)}

    epoch_started = [time.perf_counter(), 0.0]  # when the current epoch began, the evaluation time then

    def stop_on_time(tr):
        """--time_limit: stop at this epoch end when one more epoch would pass the limit on the training time (wall
        time less the evaluations; the decision is rank 0's, broadcast, so that every rank stops at the same
        step)."""
        now = time.perf_counter()
        epoch_s = now - epoch_started[0] - (eval_time[0] - epoch_started[1])
        epoch_started[:] = [now, eval_time[0]]
        train_s = now - start - eval_time[0]
        stop = torch.tensor([float(train_s + epoch_s > 60 * args.time_limit),
                             min(train_s / (60 * args.time_limit), 1.0)], device=info.device)
        if info.distributed:
            torch.distributed.broadcast(stop, 0)
        time_progress[0] = time_progress[1] + (1.0 - time_progress[1]) * float(stop[1])
        if bool(stop[0]):
            stopping[0] = True
            tr.request_stop()

    try:
        metrics = trainer.fit(loader.batches_from, compute_loss, max_steps=max_steps, log_every=args.log_freq,
                              eval_every=args.eval_freq * spe, save_every=args.save_freq * spe,
                              evaluate=timed_evaluate,
                              on_epoch_end=stop_on_time if args.time_limit is not None else None)
    finally:
        cleanup_distributed()
    wall = time.perf_counter() - start
    if is_main_process():
        metrics = {k: v for k, v in metrics.items() if k not in ("train_s", "wall_s")}
        summary = {"steps": trainer.step, "steps_this_run": trainer.step - start_step, "wall_s": round(wall, 1),
                   "train_s": round(wall - eval_time[0], 1), "epoch": round(trainer.epoch, 3),
                   **{k: round(v, 5) for k, v in metrics.items()}}
        print("final " + json.dumps(summary), flush=True)
    return metrics


if __name__ == "__main__":
    main()
