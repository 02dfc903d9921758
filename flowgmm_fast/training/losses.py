"""The semi-supervised FlowGMM objectives, split into named parts (for logging and the non-finite guard).

:func:`semisup_loss` -- the general FlowGMM objective (tabular / text scripts). With ``out = model(x, labels)``
(labels: -1 = unlabeled) and per-sample NLLs in nats:
    nll_unlabeled = mean over unlabeled rows of -(logsumexp_k [log N(f(x); mu_k) + log pi_k] + log|det J|)
    nll_labeled   = mean over labeled rows   of -(log N(f(x); mu_y) + log|det J|)
    consistency   = mean over the chosen rows of -(log N(f(x1); mu_y2) + log|det J|), y2 = argmax_k logits(x2)
    ce_labeled    = mean over labeled rows of -log softmax_k(log N(f(x); mu_k))_y   (the class posterior of a
                    balanced labeled sample: the mixture weights are left out, as the labels' class balance is the
                    labeller's, not the data's)
    loss = unlabeled_weight * nll_unlabeled + label_weight * nll_labeled + consistency_weight * consistency
           + ce_weight * ce_labeled

:func:`flowgmm_cons_loss` -- the image objective of the original ``train_semisup_cons.py`` (FlowGMM-cons):
    ce_labeled  = cross-entropy of the class logits on the labeled rows
    nll         = mean over ALL rows of -(logsumexp_k [log N(f(x1); mu_k) + log pi_k] + log|det J|)
    consistency = mean over ALL rows of -(log N(f(x1); mu_y2) + log|det J|), y2 = argmax_k logits(x2) (no grad)
    ce_teacher  = mean over the unlabeled rows of -sum_k q_k log p(k | x1), q: soft class targets given per row
                  (e.g. label spreading's; only with ``soft_targets``)
    loss = label_weight * ce_labeled + nll + consistency_weight * consistency + teacher_weight * ce_teacher
           (nll dropped when supervised only)

Row means use masks (no boolean indexing), so nothing here syncs with the host. NLLs are in nats per example,
without the dequantisation constant D ln 256 (bits/dim = (nll + D ln 256) / (D ln 2)).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .distributed import unwrap_model

__all__ = ["semisup_loss", "flowgmm_cons_loss"]


def _f32(t: torch.Tensor) -> torch.Tensor:
    """At least float32 (float64 stays float64)."""
    return t if t.dtype == torch.float64 else t.float()


def _masked_mean(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    mask = mask.to(values.dtype)
    return (values * mask).sum() / mask.sum().clamp_min(1)


def semisup_loss(model: nn.Module, x: torch.Tensor, labels: torch.Tensor, *, label_weight: float = 1.0,
                 unlabeled_weight: float = 1.0, consistency_weight: float = 0.0,
                 x_consistency: torch.Tensor | None = None, consistency_rows: slice | None = None,
                 ce_weight: float = 0.0):
    """The FlowGMM(-cons) loss of one batch; returns ``(loss, parts, out)``.

    model: a FlowGMM (possibly DDP/compile-wrapped); x: (B, ...); labels: (B,) long, -1 for unlabeled.
    x_consistency: a second augmentation of rows ``consistency_rows`` of the batch (default: all rows), (B', ...);
    its predicted classes (no gradient) define the consistency target of those rows of x. Without it the
    consistency part is 0. ce_weight: weight of the labeled rows' cross-entropy (the hybrid generative /
    discriminative objective; the original's image objective uses it for its labeled rows). parts:
    {"nll_unlabeled", "nll_labeled", "consistency", "loss"} scalar tensors (always all four, so the guard and the
    logs see the same parts each step; "ce_labeled" too when ce_weight > 0). out: the model's FlowGMMOutput for x.
    """
    if labels.dim() != 1 or labels.shape[0] != x.shape[0]:
        raise ValueError(f"labels must have shape ({x.shape[0]},), got {tuple(labels.shape)}")
    out = model(x, labels)
    nll = _f32(out.nll)
    labeled = labels >= 0
    parts = {"nll_unlabeled": _masked_mean(nll, ~labeled), "nll_labeled": _masked_mean(nll, labeled)}
    if x_consistency is not None:
        rows = consistency_rows if consistency_rows is not None else slice(None)
        with torch.no_grad():
            target = unwrap_model(model).class_logits(x_consistency).argmax(dim=1)
        z, sldj = out.z[rows], out.sldj[rows]
        if target.shape[0] != z.shape[0]:
            raise ValueError(f"x_consistency has {target.shape[0]} rows but consistency_rows selects {z.shape[0]}")
        prior = unwrap_model(model).prior
        parts["consistency"] = (_f32(prior.nll(z, target)) - _f32(sldj)).mean()
    else:
        parts["consistency"] = nll.new_zeros(())
    loss = unlabeled_weight * parts["nll_unlabeled"] + label_weight * parts["nll_labeled"]
    if consistency_weight:
        loss = loss + consistency_weight * parts["consistency"]
    if ce_weight:
        prior = unwrap_model(model).prior
        conditional = _f32(out.logits) - torch.log_softmax(_f32(prior.weight_logits), 0)
        ce = F.cross_entropy(conditional, labels.clamp_min(0), reduction="none")
        parts["ce_labeled"] = _masked_mean(ce, labeled)
        loss = loss + ce_weight * parts["ce_labeled"]
    parts["loss"] = loss
    return loss, parts, out


def flowgmm_cons_loss(model: nn.Module, x: torch.Tensor, labels: torch.Tensor, x2: torch.Tensor | None = None, *,
                      label_weight: float = 1.0, consistency_weight: float = 0.0, use_unlabeled: bool = True,
                      soft_targets: torch.Tensor | None = None, teacher_weight: float = 0.0):
    """The FlowGMM-cons image loss (module docstring); returns ``(loss, parts, out)``.

    model: a FlowGMM (possibly DDP/compile-wrapped); x: (B, C, H, W) first augmentation; labels: (B,) long, -1 for
    unlabeled; x2: (B, C, H, W) second augmentation of the same rows (None: no consistency term, the part is 0).
    soft_targets: (B, K) class distributions of the rows (read on the unlabeled rows only), for the ce_teacher part.
    parts: {"ce_labeled", "nll", "consistency", "loss", "acc_labeled"} scalar tensors, plus "ce_teacher" when
    soft_targets is given (the same names every step of a run).
    """
    if labels.dim() != 1 or labels.shape[0] != x.shape[0]:
        raise ValueError(f"labels must have shape ({x.shape[0]},), got {tuple(labels.shape)}")
    if x2 is not None and x2.shape != x.shape:
        raise ValueError(f"x2 must have the shape of x {tuple(x.shape)}, got {tuple(x2.shape)}")
    out = model(x)
    logits = _f32(out.logits)
    if soft_targets is not None and soft_targets.shape != logits.shape:
        raise ValueError(f"soft_targets must have shape {tuple(logits.shape)} (rows, classes), got "
                         f"{tuple(soft_targets.shape)}")
    labeled = labels >= 0
    ce = F.cross_entropy(logits, labels.clamp_min(0), reduction="none")
    parts = {"ce_labeled": _masked_mean(ce, labeled), "nll": _f32(out.nll).mean()}
    parts["acc_labeled"] = _masked_mean((logits.argmax(1) == labels).to(logits.dtype), labeled)
    if x2 is not None:
        inner = unwrap_model(model)
        with torch.no_grad():
            target = inner.class_logits(x2).argmax(dim=1)
        parts["consistency"] = (_f32(inner.prior.nll(out.z, target)) - _f32(out.sldj)).mean()
    else:
        parts["consistency"] = logits.new_zeros(())
    loss = label_weight * parts["ce_labeled"]
    if use_unlabeled:
        loss = loss + parts["nll"]
    if consistency_weight:
        loss = loss + consistency_weight * parts["consistency"]
    if soft_targets is not None:
        soft_ce = -(_f32(soft_targets) * torch.log_softmax(logits, 1)).sum(1)
        parts["ce_teacher"] = _masked_mean(soft_ce, ~labeled)
        if teacher_weight:
            loss = loss + teacher_weight * parts["ce_teacher"]
    parts["loss"] = loss
    return loss, parts, out
