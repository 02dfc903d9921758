"""Semi-supervised FlowGMM on feature vectors: model construction, the training loop and evaluation.

Shared by ``experiments/demo.py``, ``experiments/synthetic.py``, ``experiments/train_semisup_flowgmm_tabular.py`` and
the results runner, so every tabular number comes from the same loop. Data are tensors ``x: (N, D)`` and a
semi-supervised label vector ``labels: (N,)`` int64 with -1 for unlabeled points.

Objective (the original tabular trainer; :func:`flowgmm_fast.training.semisup_loss`, shared with the scripts built on
the Trainer): per step, with a batch of labeled points L and unlabeled points U,
    loss = label_weight * mean_{(x, y) in L} -[log N(f(x); mu_y, Sigma_y) + log|det J|]
         + unlabeled_weight * mean_{x in U} -[logsumexp_k (log N(f(x); mu_k, Sigma_k) + log pi_k) + log|det J|]
AdamW with a cosine learning-rate schedule over all steps (REFERENCE.md); labeled and unlabeled points go through one
forward pass. This is the light loop (no checkpoints / TensorBoard) for the demo and the figure scripts;
``experiments/train_semisup_flowgmm_tabular.py`` runs the same loss on :class:`flowgmm_fast.training.Trainer`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable

import torch

from .model import FlowGMM
from .nn import GaussianMixture, RealNVPTabular
from .training.losses import semisup_loss

__all__ = ["build_tabular_flowgmm", "init_means_from_labeled", "FitConfig", "fit_flowgmm", "predict", "accuracy",
           "steps_for_epochs"]


def build_tabular_flowgmm(dim: int, num_classes: int, *, num_coupling_layers: int = 10, hidden_dim: int = 256,
                          num_layers: int = 1, dropout: float = 0.5, seed: int = 0) -> FlowGMM:
    """RealNVPTabular(dim) + GaussianMixture with the tabular means init of REFERENCE.md (2 classes: mu_1 = -mu_0,
    |mu_0| = 3.75; more: N(0, 0.56^2 I)) and sigma = softplus(1); weights seeded with ``seed``."""
    gen = torch.Generator().manual_seed(seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        flow = RealNVPTabular(dim, num_coupling_layers, hidden_dim, num_layers, dropout)
    prior = GaussianMixture(num_classes, dim, means_init="tabular", std=math.log1p(math.e), generator=gen)
    return FlowGMM(flow, prior)


@torch.no_grad()
def init_means_from_labeled(model: FlowGMM, x: torch.Tensor, labels: torch.Tensor,
                            min_separation: float | None = 4.0) -> torch.Tensor:
    """Data-dependent means: mu_k = mean of f(x) over the labeled points of class k (the flow in eval mode); classes
    without labels keep their mean. Then, when ``min_separation`` is given and the closest two means are nearer than
    ``min_separation`` x the largest component std, all means are scaled about their centroid until they are not.

    Not in the original (its means are random and fixed, REFERENCE.md). Why: with the fixed sigma = softplus(1) ~ 1.31,
    components whose means lie closer than a few sigma overlap, and the unlabeled likelihood is then fitted by a blend
    of components instead of one per class; random means also ask the flow to carry every class to an arbitrary
    point. Measured effect (2-D sets, digits, breast-cancer): experiments/RESULTS.md.
    Returns the (K, D) means written into ``model.prior.means``.
    """
    _check_data(x, labels, model.prior.num_classes)
    if min_separation is not None and not min_separation > 0:
        raise ValueError(f"min_separation must be > 0 or None, got {min_separation!r}")
    was_training = model.training
    model.eval()
    z, _ = model.encode(x[labels >= 0])
    y = labels[labels >= 0]
    means = model.prior.means
    for k in range(model.prior.num_classes):
        sel = y == k
        if bool(sel.any()):
            means[k] = z[sel].mean(0).to(means.dtype)
    k = means.shape[0]
    if min_separation is not None and k > 1:
        dist = torch.cdist(means, means).fill_diagonal_(float("inf"))
        target = min_separation * float(torch.exp(model.prior.log_std).max())
        closest = float(dist.min())
        if closest < target:
            centre = means.mean(0)
            means.copy_(centre + (means - centre) * (target / max(closest, 1e-12)))
    model.train(was_training)
    return means.detach()


@dataclass
class FitConfig:
    """Training hyperparameters. ``steps``: optimizer steps in all; ``batch_size``: unlabeled points per step;
    ``labeled_batch_size``: labeled points per step (None = all labeled points every step)."""

    steps: int = 1000
    lr: float = 3e-4
    batch_size: int = 5000
    labeled_batch_size: int | None = None
    unlabeled_weight: float = 1.0
    label_weight: float = 1.0
    weight_decay: float = 1e-5
    grad_clip: float | None = 100.0
    seed: int = 0
    log_every: int = 10
    extra: dict = field(default_factory=dict)

    def __post_init__(self):
        if not isinstance(self.steps, int) or self.steps < 1:
            raise ValueError(f"steps must be a positive int, got {self.steps!r}")
        if not self.lr > 0:
            raise ValueError(f"lr must be > 0, got {self.lr!r}")
        if not isinstance(self.batch_size, int) or self.batch_size < 1:
            raise ValueError(f"batch_size must be a positive int, got {self.batch_size!r}")
        if self.labeled_batch_size is not None and self.labeled_batch_size < 1:
            raise ValueError(f"labeled_batch_size must be None or >= 1, got {self.labeled_batch_size!r}")
        if self.unlabeled_weight < 0 or self.label_weight < 0:
            raise ValueError("unlabeled_weight and label_weight must be >= 0")


def steps_for_epochs(epochs: float, num_unlabeled: int, batch_size: int) -> int:
    """Steps for ``epochs`` passes over the unlabeled points (at least one step)."""
    return max(1, int(round(epochs * max(1, math.ceil(num_unlabeled / batch_size)))))


def _check_data(x: torch.Tensor, labels: torch.Tensor, num_classes: int):
    if not isinstance(x, torch.Tensor) or x.dim() != 2 or not x.is_floating_point():
        raise ValueError(f"x must be a floating (N, D) tensor, got {getattr(x, 'shape', type(x))}")
    if not isinstance(labels, torch.Tensor) or labels.shape != (x.shape[0],) or labels.dtype != torch.int64:
        raise ValueError(f"labels must be an int64 tensor of shape ({x.shape[0]},) with -1 for unlabeled points")
    if labels.numel() and (labels.min() < -1 or labels.max() >= num_classes):
        raise ValueError(f"labels must lie in [-1, {num_classes})")


def fit_flowgmm(model: FlowGMM, x: torch.Tensor, labels: torch.Tensor, config: FitConfig, *,
                progress: bool | str = True, callback: Callable[[int, dict], None] | None = None,
                optimizer: torch.optim.Optimizer | None = None, scheduler=None, start_step: int = 0) -> list[dict]:
    """Train ``model`` in place on (x, labels); see :func:`_fit` for the arguments. Dropout draws from the global RNG
    re-seeded with ``config.seed`` inside ``torch.random.fork_rng``, so a run depends on its seed only (not on what
    ran before in the process) and the caller's RNG state is left untouched."""
    devices = [x.device.index or 0] if x.device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(config.seed)
        return _fit(model, x, labels, config, progress, callback, optimizer, scheduler, start_step)


def _fit(model, x, labels, config, progress, callback, optimizer, scheduler, start_step) -> list[dict]:
    """Train ``model`` in place on (x, labels) and return the logged history ``[{"step", "loss", "nll_labeled",
    "nll_unlabeled", "lr"}]`` (one entry every ``config.log_every`` steps and at the last step).

    Points with label -1 are unlabeled; with ``unlabeled_weight == 0`` (or no unlabeled points) the flow is trained on
    the labeled points only -- the "labels only" variant. ``progress``: a tqdm bar (a string sets its description).
    ``callback(step, entry)`` runs at each logged step (checkpoints, TensorBoard). ``optimizer``/``scheduler``/
    ``start_step`` resume a run; by default AdamW + cosine annealing over ``config.steps`` are created here.
    Losses are read back to the host only at logged steps.
    """
    _check_data(x, labels, model.prior.num_classes)
    lab_idx = torch.nonzero(labels >= 0).squeeze(1)
    unl_idx = torch.nonzero(labels < 0).squeeze(1)
    if lab_idx.numel() == 0 and (unl_idx.numel() == 0 or config.unlabeled_weight == 0):
        raise ValueError("nothing to train on: no labeled points and no (weighted) unlabeled points")
    use_unlabeled = unl_idx.numel() > 0 and config.unlabeled_weight > 0
    gen = torch.Generator(device="cpu").manual_seed(config.seed)
    params = [p for p in model.parameters() if p.requires_grad]
    if optimizer is None:
        optimizer = torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay)
    if scheduler is None:
        scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=config.steps)
    steps = range(start_step, config.steps)
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(steps, desc=progress if isinstance(progress, str) else "FlowGMM", leave=False, dynamic_ncols=True)
        steps = bar
    history: list[dict] = []
    n_lab_batch = lab_idx.numel() if config.labeled_batch_size is None else min(config.labeled_batch_size,
                                                                                 lab_idx.numel())
    perm, pos = None, 0
    model.train()
    for step in steps:
        parts = []
        if lab_idx.numel():
            if n_lab_batch == lab_idx.numel():
                parts.append(lab_idx)
            else:
                parts.append(lab_idx[torch.randperm(lab_idx.numel(), generator=gen)[:n_lab_batch]])
        if use_unlabeled:
            if perm is None or pos >= perm.numel():
                perm, pos = unl_idx[torch.randperm(unl_idx.numel(), generator=gen)], 0
            parts.append(perm[pos:pos + config.batch_size])
            pos += config.batch_size
        idx = torch.cat(parts).to(x.device)
        loss, loss_parts, _ = semisup_loss(model, x[idx], labels[idx], label_weight=config.label_weight,
                                           unlabeled_weight=config.unlabeled_weight if use_unlabeled else 0.0)
        nll_l, nll_u = loss_parts["nll_labeled"], loss_parts["nll_unlabeled"]
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if config.grad_clip is not None:
            torch.nn.utils.clip_grad_norm_(params, config.grad_clip)
        optimizer.step()
        scheduler.step()
        if (step + 1) % config.log_every == 0 or step + 1 == config.steps:
            entry = {"step": step + 1, "loss": float(loss.detach()), "nll_labeled": float(nll_l.detach()),
                     "nll_unlabeled": float(nll_u.detach()), "lr": scheduler.get_last_lr()[0]}
            if not math.isfinite(entry["loss"]):
                raise FloatingPointError(f"non-finite loss {entry['loss']} at step {step + 1} (lr {entry['lr']:.3g}); "
                                         "lower the learning rate or check the features for outliers")
            history.append(entry)
            if bar is not None:
                bar.set_postfix(loss=f"{entry['loss']:.3f}")
            if callback is not None:
                callback(step + 1, entry)
    if bar is not None:
        bar.close()
    model.eval()
    return history


@torch.no_grad()
def predict(model: FlowGMM, x: torch.Tensor, batch_size: int = 10000) -> torch.Tensor:
    """(N,) predicted classes in eval mode (dropout off), in batches."""
    was_training = model.training
    model.eval()
    out = torch.cat([model.predict(x[i:i + batch_size]) for i in range(0, x.shape[0], batch_size)])
    model.train(was_training)
    return out


def accuracy(model: FlowGMM, x: torch.Tensor, y: torch.Tensor, batch_size: int = 10000) -> float:
    """Fraction of ``x`` whose predicted class equals ``y``."""
    if y.shape != (x.shape[0],):
        raise ValueError(f"y must have shape ({x.shape[0]},), got {tuple(y.shape)}")
    return float((predict(model, x, batch_size) == y.to(x.device)).float().mean())
