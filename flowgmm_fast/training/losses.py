"""The semi-supervised FlowGMM objective, split into named parts (for logging and the non-finite guard).

With ``out = model(x, labels)`` (labels: -1 = unlabeled) and per-sample NLLs in nats:
    nll_unlabeled = mean over unlabeled rows of -(logsumexp_k [log N(f(x); mu_k) + log pi_k] + log|det J|)
    nll_labeled   = mean over labeled rows   of -(log N(f(x); mu_y) + log|det J|)
    consistency   = mean over the chosen rows of -(log N(f(x1); mu_y2) + log|det J|), y2 = argmax_k logits(x2)
    loss = unlabeled_weight * nll_unlabeled + label_weight * nll_labeled + consistency_weight * consistency
The row means use masks (no boolean indexing), so nothing here syncs with the host.
"""

from __future__ import annotations

import torch
from torch import nn

from .distributed import unwrap_model

__all__ = ["semisup_loss"]


def _masked_mean(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    mask = mask.to(values.dtype)
    return (values * mask).sum() / mask.sum().clamp_min(1)


def semisup_loss(model: nn.Module, x: torch.Tensor, labels: torch.Tensor, *, label_weight: float = 1.0,
                 unlabeled_weight: float = 1.0, consistency_weight: float = 0.0,
                 x_consistency: torch.Tensor | None = None, consistency_rows: slice | None = None):
    """The FlowGMM(-cons) loss of one batch; returns ``(loss, parts, out)``.

    model: a FlowGMM (possibly DDP/compile-wrapped); x: (B, ...); labels: (B,) long, -1 for unlabeled.
    x_consistency: a second augmentation of rows ``consistency_rows`` of the batch (default: all rows), (B', ...);
    its predicted classes (no gradient) define the consistency target of those rows of x. Without it the
    consistency part is 0. parts: {"nll_unlabeled", "nll_labeled", "consistency", "loss"} scalar tensors (always all
    four, so the guard and the logs see the same parts each step). out: the model's FlowGMMOutput for x.
    """
    if labels.dim() != 1 or labels.shape[0] != x.shape[0]:
        raise ValueError(f"labels must have shape ({x.shape[0]},), got {tuple(labels.shape)}")
    out = model(x, labels)
    nll = out.nll.float()
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
        parts["consistency"] = (prior.nll(z, target).float() - sldj.float()).mean()
    else:
        parts["consistency"] = nll.new_zeros(())
    loss = unlabeled_weight * parts["nll_unlabeled"] + label_weight * parts["nll_labeled"]
    if consistency_weight:
        loss = loss + consistency_weight * parts["consistency"]
    parts["loss"] = loss
    return loss, parts, out
