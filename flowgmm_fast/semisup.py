"""Semi-supervised FlowGMM on feature vectors: model construction and THE training loop for tabular data.

Every tabular number comes from :func:`fit_flowgmm`: the scikit-learn estimator
(:class:`flowgmm_fast.FlowGMMClassifier`), ``experiments/train_semisup_flowgmm_tabular.py`` (the paper's presets, with
checkpoints, TensorBoard and exact resume), the demo and the figure scripts. It is a recipe on top of the shared
:class:`flowgmm_fast.training.Trainer` (steps, clipping, the non-finite guard, checkpoints, resume). Data are tensors
``x: (N, D)`` and a semi-supervised label vector ``labels: (N,)`` int64 with -1 for unlabeled rows.

Objective per step (:func:`flowgmm_fast.training.semisup_loss`), with a batch of labeled rows L and unlabeled rows U:
    loss = label_weight * mean_{(x, y) in L} -[log N(f(x); mu_y, Sigma_y) + log|det J|]
         + unlabeled_weight * mean_{x in U} -[logsumexp_k (log N(f(x); mu_k, Sigma_k) + log pi_k) + log|det J|]
         + ce_weight * D * mean_{(x, y) in L} -log p(y | x)        (optional; D = number of features)
The last term is the discriminative half of a hybrid objective (the original's image objective puts a cross-entropy
on its labeled rows): the NLLs grow with D, hence the weight per feature.
AdamW with a cosine learning-rate schedule over all steps (REFERENCE.md). An epoch is one pass over the unlabeled
training rows (labeled rows only when none are used). At the end of every epoch (:class:`EpochEnd`):
- ``learn_priors``: one EM step for the mixture weights, pi_k = (sum_i r_ik + a) / (n + K a) over the unlabeled rows
  (a fixed random subset of 4096 when there are more) with the responsibilities r_ik = p(k | x_i) of the current
  model and a pseudo-count a (not in the original, whose weights stay uniform). Labeled rows are left out: their
  class balance is the labeller's choice, not the data's.
- ``validation_fraction`` / ``patience``: early stopping on the NLL of a held-out slice of the unlabeled rows (no
  labels needed); the model of the best epoch is restored at the end.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from .model import FlowGMM
from .nn import GaussianMixture, RealNVPTabular
from .nn.base import FlowSequential
from .training.logger import TrainLogger
from .training.losses import semisup_loss
from .training.optim import make_lr_scheduler
from .training.trainer import Trainer

__all__ = ["build_tabular_flowgmm", "init_means_from_labeled", "init_std_from_labeled", "FitConfig", "FitResult",
           "TabularBatches", "EpochEnd", "update_mixture_weights", "fit_flowgmm", "predict", "accuracy",
           "steps_for_epochs"]

Sampler = Callable[[torch.Tensor, torch.Generator], torch.Tensor]
EM_ROWS = 4096  # unlabeled rows read by each EM step of the mixture weights (a fixed random subset when more)


def build_tabular_flowgmm(dim: int, num_classes: int, *, num_coupling_layers: int = 10, hidden_dim: int = 256,
                          num_layers: int = 1, dropout: float = 0.5, seed: int = 0, identity_init: bool = False,
                          means_trainable: bool = False, invertible_backprop: bool = False,
                          checkpoint_every: int | None = None) -> FlowGMM:
    """RealNVPTabular(dim) + GaussianMixture with the tabular means init of REFERENCE.md (2 classes: mu_1 = -mu_0,
    |mu_0| = 3.75; more: N(0, 0.56^2 I)) and sigma = softplus(1); weights seeded with ``seed``.

    ``num_coupling_layers=0``: no coupling (the flow is the identity; the model is a Gaussian mixture on x, and
    ``dim`` may be 1). ``identity_init``: the last layer of every s/t net starts at zero, so the flow starts as the
    identity and moves away from it only as far as training takes it. ``means_trainable``: the component means are
    optimised with the flow. ``invertible_backprop`` / ``checkpoint_every``: backprop by inversion in the
    RealNVPTabular flow (:mod:`flowgmm_fast.nn.invertible`: training memory independent of the number of couplings).
    """
    if not isinstance(num_coupling_layers, int) or num_coupling_layers < 0:
        raise ValueError(f"num_coupling_layers must be an int >= 0, got {num_coupling_layers!r}")
    gen = torch.Generator().manual_seed(seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        if num_coupling_layers == 0:
            flow = FlowSequential()
            flow.event_shape = (dim,)
        else:
            flow = RealNVPTabular(dim, num_coupling_layers, hidden_dim, num_layers, dropout,
                                  invertible_backprop=invertible_backprop, checkpoint_every=checkpoint_every)
            if identity_init:
                for layer in flow.layers:
                    last = layer.st_net.net[-1]
                    torch.nn.init.zeros_(last.weight)
                    torch.nn.init.zeros_(last.bias)
    prior = GaussianMixture(num_classes, dim, means_init="tabular", std=math.log1p(math.e), generator=gen,
                            means_trainable=means_trainable)
    return FlowGMM(flow, prior)


def _labeled_latents(model: FlowGMM, x: torch.Tensor, labels: torch.Tensor, z: torch.Tensor | None) -> torch.Tensor:
    """f(x) of the labeled rows (the model in eval mode), or the given ``z`` after a shape check."""
    n = int((labels >= 0).sum())
    if z is None:
        return model.encode(x[labels >= 0])[0]
    if z.dim() != 2 or z.shape[0] != n or z.shape[1] != model.prior.means.shape[1]:
        raise ValueError(f"z must be the ({n}, {model.prior.means.shape[1]}) latents of the labeled rows, got "
                         f"{tuple(z.shape)}")
    return z


@torch.no_grad()
def init_means_from_labeled(model: FlowGMM, x: torch.Tensor, labels: torch.Tensor,
                            min_separation: float | None = 4.0, *, z: torch.Tensor | None = None) -> torch.Tensor:
    """Data-dependent means: mu_k = mean of f(x) over the labeled points of class k (the flow in eval mode); classes
    without labels keep their mean. Then, when ``min_separation`` is given and the closest two means are nearer than
    ``min_separation`` x the largest component std, all means are scaled about their centroid until they are not.

    Not in the original (its means are random and fixed, REFERENCE.md). Why: with the fixed sigma = softplus(1) ~ 1.31,
    components whose means lie closer than a few sigma overlap, and the unlabeled likelihood is then fitted by a blend
    of components instead of one per class; random means also ask the flow to carry every class to an arbitrary
    point. Measured effect (2-D sets, digits, breast-cancer): experiments/RESULTS.md.
    ``z``: the latents of the labeled rows ``x[labels >= 0]`` under the flow in eval mode, when the caller already
    has them (they are not recomputed). Returns the (K, D) means written into ``model.prior.means``.
    """
    _check_data(x, labels, model.prior.num_classes)
    if min_separation is not None and not min_separation > 0:
        raise ValueError(f"min_separation must be > 0 or None, got {min_separation!r}")
    was_training = model.training
    model.eval()
    z = _labeled_latents(model, x, labels, z)
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


@torch.no_grad()
def init_std_from_labeled(model: FlowGMM, x: torch.Tensor, labels: torch.Tensor,
                          floor: float = 0.05, *, z: torch.Tensor | None = None) -> float | None:
    """Set every component's (isotropic) std to the pooled within-class spread of the labeled points in latent
    space, sigma^2 = sum_i |f(x_i) - mu_{y_i}|^2 / (D (n - K')) over the n labeled points of the K' classes that have
    any (the unbiased pooled variance), at least ``floor``. Call it after :func:`init_means_from_labeled` (without
    spreading), so the model starts as the nearest-class-mean Gaussian classifier the labels imply. Returns sigma,
    or None (std unchanged) when no class has two labeled points. ``z``: as in :func:`init_means_from_labeled`."""
    _check_data(x, labels, model.prior.num_classes)
    lab = labels >= 0
    y = labels[lab]
    n, k_seen = int(y.numel()), int(torch.unique(y).numel())
    if n - k_seen < 1:
        return None
    was_training = model.training
    model.eval()
    z = _labeled_latents(model, x, labels, z)
    model.train(was_training)
    resid = z.double() - model.prior.means.double()[y]
    sigma = max(floor, math.sqrt(float((resid ** 2).sum()) / (z.shape[1] * (n - k_seen))))
    model.prior.std_raw.fill_(sigma + math.log(-math.expm1(-sigma)))  # softplus^{-1}(sigma)
    return sigma


@dataclass
class FitConfig:
    """Training hyperparameters of :func:`fit_flowgmm`.

    Length: ``steps`` optimizer steps, or ``epochs`` passes over the unlabeled training rows (exactly one of them;
    an early stop can end sooner). ``batch_size``: unlabeled rows per step; ``labeled_batch_size``: labeled rows per
    step (None = all labeled rows every step). ``learn_priors``: EM updates of the mixture weights at every epoch end
    (``prior_pseudocount`` a per class); ``validation_fraction``: unlabeled rows held out for early stopping, which
    stops after ``patience`` epochs without a held-out NLL improvement larger than ``min_delta`` (nats per row).
    ``ce_weight``: the labeled rows' cross-entropy, per feature (module docstring). ``step_in_backward``: AdamW steps
    each parameter inside the backward pass and frees its gradient (the Trainer's ``step_in_backward``; the same
    updates, a step's gradient memory of one parameter at a time); it cannot clip, so it needs ``grad_clip=None``.
    """

    steps: int | None = None
    epochs: float | None = None
    lr: float = 3e-4
    batch_size: int = 5000
    labeled_batch_size: int | None = None
    unlabeled_weight: float = 1.0
    label_weight: float = 1.0
    weight_decay: float = 1e-5
    grad_clip: float | None = 100.0
    seed: int = 0
    log_every: int = 10
    learn_priors: bool = False
    prior_pseudocount: float = 1.0
    validation_fraction: float = 0.0
    patience: int | None = None
    min_delta: float = 1e-3
    ce_weight: float = 0.0
    step_in_backward: bool = False

    def __post_init__(self):
        if (self.steps is None) == (self.epochs is None):
            if self.steps is None and self.epochs is None:
                self.steps = 1000
            else:
                raise ValueError("give steps or epochs, not both")
        if self.steps is not None and (not isinstance(self.steps, int) or self.steps < 1):
            raise ValueError(f"steps must be a positive int, got {self.steps!r}")
        if self.epochs is not None and not self.epochs > 0:
            raise ValueError(f"epochs must be > 0, got {self.epochs!r}")
        if not self.lr > 0:
            raise ValueError(f"lr must be > 0, got {self.lr!r}")
        if not isinstance(self.batch_size, int) or self.batch_size < 1:
            raise ValueError(f"batch_size must be a positive int, got {self.batch_size!r}")
        if self.labeled_batch_size is not None and self.labeled_batch_size < 1:
            raise ValueError(f"labeled_batch_size must be None or >= 1, got {self.labeled_batch_size!r}")
        if not (self.unlabeled_weight >= 0 and self.label_weight >= 0):
            raise ValueError("unlabeled_weight and label_weight must be >= 0")
        if not 0 <= self.validation_fraction < 1:
            raise ValueError(f"validation_fraction must be in [0, 1), got {self.validation_fraction!r}")
        if self.patience is not None and (not isinstance(self.patience, int) or self.patience < 1):
            raise ValueError(f"patience must be None or a positive int, got {self.patience!r}")
        if not self.ce_weight >= 0:
            raise ValueError(f"ce_weight must be >= 0, got {self.ce_weight!r}")
        if not self.prior_pseudocount >= 0:
            raise ValueError(f"prior_pseudocount must be >= 0, got {self.prior_pseudocount!r}")
        if not isinstance(self.log_every, int) or self.log_every < 1:
            raise ValueError(f"log_every must be a positive int, got {self.log_every!r}")
        if not isinstance(self.step_in_backward, bool):
            raise ValueError(f"step_in_backward must be a bool, got {self.step_in_backward!r}")
        if self.step_in_backward and self.grad_clip is not None:
            raise ValueError(f"step_in_backward=True steps each parameter before the global gradient norm is known and "
                             f"cannot clip it: set grad_clip=None (got grad_clip={self.grad_clip!r})")


def steps_for_epochs(epochs: float, num_unlabeled: int, batch_size: int) -> int:
    """Steps for ``epochs`` passes over the unlabeled points (at least one step)."""
    return max(1, int(round(epochs * max(1, math.ceil(num_unlabeled / batch_size)))))


def _check_data(x: torch.Tensor, labels: torch.Tensor, num_classes: int):
    if not isinstance(x, torch.Tensor) or x.dim() < 2 or not x.is_floating_point():
        raise ValueError(f"x must be a floating (N, D) or (N, C, H, W) tensor, got {getattr(x, 'shape', type(x))}")
    if not isinstance(labels, torch.Tensor) or labels.shape != (x.shape[0],) or labels.dtype != torch.int64:
        raise ValueError(f"labels must be an int64 tensor of shape ({x.shape[0]},) with -1 for unlabeled points")
    if labels.numel() and (labels.min() < -1 or labels.max() >= num_classes):
        raise ValueError(f"labels must lie in [-1, {num_classes})")


class TabularBatches:
    """The batch source: every step, the labeled rows (all, or ``labeled_batch_size`` of them drawn per step) and
    the next ``batch_size`` rows of ``unlabeled`` (indices of the unlabeled rows to train on) in an order drawn anew
    every epoch. A pure function of the step (generators seeded by (seed, epoch) and (seed, step)), so
    ``batches(start_step)`` replays an uninterrupted run exactly (:class:`~flowgmm_fast.training.Trainer`).

    sampler(idx, generator) -> (len(idx), D) features of rows ``idx`` (default ``x[idx]``); e.g. dequantised
    features drawn anew every step (:meth:`flowgmm_fast.preprocessing.QuantileGaussianizer.sample`).
    """

    def __init__(self, x: torch.Tensor, labels: torch.Tensor, unlabeled: torch.Tensor, batch_size: int, seed: int,
                 *, labeled_batch_size: int | None = None, sampler: Sampler | None = None):
        self.x, self.labels = x, labels
        self.lab = torch.nonzero(labels >= 0).squeeze(1).cpu()
        self.unl = unlabeled.cpu()
        self.batch_size, self.seed, self.sampler = batch_size, seed, sampler
        self.n_lab = self.lab.numel() if labeled_batch_size is None else min(labeled_batch_size, self.lab.numel())
        if self.unl.numel():
            self.steps_per_epoch = max(1, math.ceil(self.unl.numel() / batch_size))
        else:
            self.steps_per_epoch = max(1, math.ceil(self.lab.numel() / max(1, self.n_lab)))

    def indices(self, step: int) -> torch.Tensor:
        """Row indices of the batch of step ``step + 1`` (0-based ``step``)."""
        epoch, pos = divmod(step, self.steps_per_epoch)
        parts = []
        if self.lab.numel():
            if self.n_lab == self.lab.numel():
                parts.append(self.lab)
            else:
                gen = torch.Generator().manual_seed(self.seed * 1_000_003 + step + 7)
                parts.append(self.lab[torch.randperm(self.lab.numel(), generator=gen)[:self.n_lab]])
        if self.unl.numel():
            gen = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            perm = self.unl[torch.randperm(self.unl.numel(), generator=gen)]
            parts.append(perm[pos * self.batch_size:(pos + 1) * self.batch_size])
        return torch.cat(parts)

    def __call__(self, start_step: int):
        step = start_step
        while True:
            idx = self.indices(step).to(self.x.device)
            if self.sampler is None:
                xb = self.x[idx]
            else:
                xb = self.sampler(idx, torch.Generator(device=self.x.device).manual_seed(self.seed * 7919 + step))
            step += 1
            yield xb, self.labels[idx]


@torch.no_grad()
def _eval_rows(model: FlowGMM, x: torch.Tensor, batch_size: int = 8192):
    """(class logits (N, K), log p(x) (N,)) in eval mode, in batches."""
    logits, logp = [], []
    for i in range(0, x.shape[0], batch_size):
        out = model(x[i:i + batch_size])
        logits.append(out.logits.float())
        logp.append(-out.nll.float())
    return torch.cat(logits), torch.cat(logp)


@torch.no_grad()
def update_mixture_weights(model: FlowGMM, logits: torch.Tensor, pseudocount: float = 1.0) -> torch.Tensor:
    """One EM step for the mixture weights from the class logits (N, K) of unlabeled rows under the current
    weights: pi_k = (sum_i softmax(logits_i)_k + a) / (N + K a). Writes log pi into ``model.prior.weight_logits``
    and returns pi."""
    k = logits.shape[1]
    resp = torch.softmax(logits.float(), dim=1).sum(0)
    pi = (resp + pseudocount) / (logits.shape[0] + k * pseudocount)
    model.prior.weight_logits.copy_(pi.log().to(model.prior.weight_logits.dtype))
    return pi


class EpochEnd:
    """The epoch-end hook of :func:`fit_flowgmm`: EM step of the mixture weights and early stopping on held-out
    unlabeled rows. Its state (best NLL and step, the best model's weights, epochs without improvement) goes into
    checkpoints through :meth:`state_dict`, so a resumed run stops where the uninterrupted one would have."""

    def __init__(self, model: FlowGMM, x_unlabeled: torch.Tensor, x_val: torch.Tensor, config: FitConfig,
                 total_steps: int):
        self.model, self.config, self.total_steps = model, config, total_steps
        self.x_unlabeled, self.x_val = x_unlabeled, x_val
        self.best_nll, self.best_step, self.bad_epochs = math.inf, 0, 0
        self.best_state: dict | None = None
        self.history: list[dict] = []

    @property
    def early_stopping(self) -> bool:
        return self.config.patience is not None and self.x_val.shape[0] > 0

    def __call__(self, trainer: Trainer) -> None:
        model, cfg = self.model, self.config
        was_training = model.training
        model.eval()
        entry: dict = {"step": trainer.step, "epoch": trainer.epoch}
        if cfg.learn_priors and self.x_unlabeled.shape[0]:
            logits, _ = _eval_rows(model, self.x_unlabeled)
            entry["weights"] = update_mixture_weights(model, logits, cfg.prior_pseudocount).tolist()
        if self.early_stopping:
            _, logp = _eval_rows(model, self.x_val)
            val_nll = float(-logp.mean())
            entry["val_nll"] = val_nll
            if not math.isfinite(val_nll):
                pass  # never the best; counts as an epoch without improvement
            elif val_nll < self.best_nll - cfg.min_delta or self.best_state is None:
                self.best_nll, self.best_step, self.bad_epochs = val_nll, trainer.step, 0
                self.best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
                entry["best"] = True
            if not entry.get("best"):
                self.bad_epochs += 1
                if self.bad_epochs >= cfg.patience:
                    trainer.request_stop()
                    entry["stop"] = True
            if entry.get("stop") or trainer.step >= self.total_steps:
                self.restore_best()
        self.history.append(entry)
        model.train(was_training)

    def restore_best(self) -> None:
        if self.best_state is not None:
            self.model.load_state_dict(self.best_state)

    def state_dict(self) -> dict:
        return {"best_nll": self.best_nll, "best_step": self.best_step, "bad_epochs": self.bad_epochs,
                "best_state": self.best_state, "history": self.history}

    def load_state_dict(self, state: dict) -> None:
        self.best_nll, self.best_step = float(state["best_nll"]), int(state["best_step"])
        self.bad_epochs, self.best_state = int(state["bad_epochs"]), state["best_state"]
        self.history = list(state.get("history", []))


@dataclass
class FitResult:
    """What :func:`fit_flowgmm` did. ``history``: the training scalars logged every ``log_every`` steps (``step``,
    ``train/loss``, ``train/nll_labeled``, ``train/nll_unlabeled``, ``train/lr_flow``, ...); ``epochs``: per epoch
    ``step``, ``epoch`` and, as configured, ``weights`` (the EM mixture weights) and ``val_nll``; ``steps``: steps
    taken; ``best_step``: the step whose model was kept (early stopping; None without it); ``stopped_early``."""

    history: list[dict] = field(default_factory=list)
    epochs: list[dict] = field(default_factory=list)
    steps: int = 0
    best_step: int | None = None
    stopped_early: bool = False
    metrics: dict = field(default_factory=dict)


def _split_validation(labels: torch.Tensor, config: FitConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """(unlabeled rows to train on, held-out unlabeled rows) as CPU index tensors, drawn with the config's seed."""
    unl = torch.nonzero(labels.cpu() < 0).squeeze(1)
    if not (config.patience is not None and config.validation_fraction > 0) or unl.numel() < 2:
        return unl, unl[:0]
    gen = torch.Generator().manual_seed(config.seed * 104_729 + 17)
    perm = unl[torch.randperm(unl.numel(), generator=gen)]
    n_val = min(unl.numel() - 1, max(1, int(round(config.validation_fraction * unl.numel()))))
    return perm[n_val:].sort().values, perm[:n_val].sort().values


def fit_flowgmm(model: FlowGMM, x: torch.Tensor, labels: torch.Tensor, config: FitConfig, *,
                sampler: Sampler | None = None, progress: bool | str = True,
                evaluate: Callable[[Trainer], dict] | None = None, eval_every: int | None = None,
                ckpt_path=None, save_every: int | None = None, logger: TrainLogger | None = None,
                resume: bool = False, extra_state: Callable[[], dict] | None = None,
                check_resume: Callable[[dict], None] | None = None,
                on_resume: Callable[[Trainer, dict], None] | None = None, stop_at: int | None = None) -> FitResult:
    """Train ``model`` in place on (x, labels) with the recipe of the module docstring; returns a :class:`FitResult`.
    The model is left in eval mode (the best epoch's weights with early stopping).

    Rows with label -1 are unlabeled; with ``unlabeled_weight == 0`` (or no unlabeled rows) the flow is trained on
    the labeled rows only (no unlabeled row goes through it) -- the "labels only" variant. ``sampler`` draws the
    training features of a batch (e.g. dequantisation; ``x`` itself is used for the EM step and the held-out NLL).
    ``progress``: a tqdm bar over steps (a string names it). ``evaluate`` / ``eval_every``: the caller's metrics
    (e.g. test accuracy), every ``eval_every`` steps and at the end. ``ckpt_path`` / ``save_every`` / ``resume`` /
    ``extra_state``: checkpoints through the Trainer (``check_resume(extra)`` may reject a checkpoint;
    ``on_resume(trainer, extra)`` runs once the state is restored, e.g. to apply a new learning rate to the restored
    optimizer and schedule with :func:`flowgmm_fast.training.set_learning_rate`); ``stop_at``:
    end (with a checkpoint) at this step, the schedule unchanged, to continue later with ``resume``. ``logger``:
    a :class:`TrainLogger` (TensorBoard); by default an in-memory one. Dropout and the batch order depend on
    ``config.seed`` only: the global RNG is re-seeded inside ``torch.random.fork_rng``, so the caller's RNG state is
    left untouched.
    """
    _check_data(x, labels, model.prior.num_classes)
    lab_idx = torch.nonzero(labels >= 0).squeeze(1)
    use_unlabeled = config.unlabeled_weight > 0 and bool((labels < 0).any())
    if lab_idx.numel() == 0 and not use_unlabeled:
        raise ValueError("nothing to train on: no labeled points and no (weighted) unlabeled points")
    train_unl, val_unl = _split_validation(labels, config)
    all_unl = torch.cat([train_unl, val_unl]).sort().values
    if all_unl.numel() > EM_ROWS:  # the EM step reads a fixed random subset: pi to about +-1% at a fraction of the cost
        gen = torch.Generator().manual_seed(config.seed * 31 + 5)
        all_unl = all_unl[torch.randperm(all_unl.numel(), generator=gen)[:EM_ROWS]].sort().values
    batches = TabularBatches(x, labels, train_unl if use_unlabeled else train_unl[:0], config.batch_size,
                             config.seed, labeled_batch_size=config.labeled_batch_size, sampler=sampler)
    max_steps = config.steps if config.steps is not None else max(1, round(config.epochs * batches.steps_per_epoch))
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay)
    scheduler = make_lr_scheduler(optimizer, "cosine", total_steps=max_steps)
    if logger is None:
        logger = TrainLogger(None, progress_bar=bool(progress), keep_history=True,
                             desc=progress if isinstance(progress, str) else "FlowGMM")
    hook = EpochEnd(model, x[all_unl.to(x.device)], x[val_unl.to(x.device)], config, max_steps)

    def state() -> dict:
        return {**(extra_state() if extra_state else {}), "epoch_end": hook.state_dict()}

    trainer = Trainer(model, {"flow": optimizer}, schedulers={"flow": scheduler},
                      steps_per_epoch=batches.steps_per_epoch, max_grad_norm=config.grad_clip, ckpt_path=ckpt_path,
                      logger=logger, extra_state=state, step_in_backward=config.step_in_backward)
    devices = [x.device.index or 0] if x.device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(config.seed)
        if resume:
            extra = trainer.resume()
            if check_resume is not None:
                check_resume(extra)
            if "epoch_end" in extra:
                hook.load_state_dict(extra["epoch_end"])
            if on_resume is not None:
                on_resume(trainer, extra)

        def compute_loss(batch, _trainer):
            xb, lb = batch
            loss, parts, _ = semisup_loss(model, xb, lb, label_weight=config.label_weight,
                                          unlabeled_weight=config.unlabeled_weight if use_unlabeled else 0.0,
                                          ce_weight=config.ce_weight * x.shape[1])
            return loss, parts

        end = max_steps if stop_at is None else min(stop_at, max_steps)
        metrics = trainer.fit(batches, compute_loss, max_steps=end, log_every=config.log_every,
                              eval_every=eval_every, evaluate=evaluate, on_epoch_end=hook)
    model.eval()
    stopped = bool(hook.history and hook.history[-1].get("stop"))
    return FitResult(history=list(logger.history or []), epochs=hook.history, steps=trainer.step,
                     best_step=hook.best_step if hook.early_stopping else None, stopped_early=stopped,
                     metrics=dict(metrics))


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
