"""Optimiser helpers shared by the training scripts: weight decay on weight-norm gains only, ramp-ups, schedules."""

from __future__ import annotations

import math

import torch
from torch import nn

from ..nn import weight_norm_gains

__all__ = ["weight_decay_param_groups", "linear_rampup", "make_lr_scheduler"]


def weight_decay_param_groups(module: nn.Module, weight_decay: float, **group_options) -> list[dict]:
    """Two parameter groups of ``module``'s trainable parameters: the weight-norm gains
    (:func:`flowgmm_fast.nn.weight_norm_gains`) with ``weight_decay``, everything else with none (the original's
    scheme). Extra ``group_options`` (e.g. ``lr``) go into both groups; empty groups are left out."""
    if not weight_decay >= 0:
        raise ValueError(f"weight_decay must be >= 0, got {weight_decay!r}")
    gain_ids = {id(p) for p in weight_norm_gains(module)}
    params = [p for p in module.parameters() if p.requires_grad]
    gains = [p for p in params if id(p) in gain_ids]
    others = [p for p in params if id(p) not in gain_ids]
    groups = [{"params": gains, "weight_decay": weight_decay, **group_options},
              {"params": others, "weight_decay": 0.0, **group_options}]
    return [g for g in groups if g["params"]]


def linear_rampup(current: float, rampup_length: float) -> float:
    """min(current / rampup_length, 1) clamped at 0: the consistency-weight ramp of FlowGMM-cons (1 when
    ``rampup_length`` <= 0). ``current`` is in the same unit as ``rampup_length`` (epochs in the original)."""
    if rampup_length <= 0:
        return 1.0
    return float(min(max(current / rampup_length, 0.0), 1.0))


def make_lr_scheduler(optimizer: torch.optim.Optimizer, kind: str = "constant", total_steps: int | None = None,
                      warmup_steps: int = 0) -> torch.optim.lr_scheduler.LambdaLR:
    """A per-step learning-rate schedule: ``"constant"`` (the image script's default) or ``"cosine"`` (to 0 at
    ``total_steps``, the tabular default), both after an optional linear warm-up of ``warmup_steps``."""
    if kind not in ("constant", "cosine"):
        raise ValueError(f"kind (the lr schedule) must be 'constant' or 'cosine', got {kind!r}")
    if kind == "cosine" and (total_steps is None or total_steps < 1):
        raise ValueError(f"the cosine schedule needs total_steps >= 1, got {total_steps!r}")
    if warmup_steps < 0:
        raise ValueError(f"warmup_steps must be >= 0, got {warmup_steps}")

    def factor(step: int) -> float:
        warm = min(1.0, (step + 1) / warmup_steps) if warmup_steps else 1.0
        if kind == "constant":
            return warm
        progress = min(step / total_steps, 1.0)
        return warm * 0.5 * (1.0 + math.cos(math.pi * progress))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
