"""Optimiser helpers shared by the training scripts: weight decay on weight-norm gains only, ramp-ups, schedules, and
the optimizer step fused into the backward pass (:class:`StepInBackward`)."""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence

import torch
from torch import nn

from ..nn import weight_norm_gains

__all__ = ["weight_decay_param_groups", "linear_rampup", "make_lr_scheduler", "StepInBackward",
           "PER_PARAMETER_OPTIMIZERS"]


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
                      warmup_steps: int = 0, progress: Callable[[], float] | None = None
                      ) -> torch.optim.lr_scheduler.LambdaLR:
    """A per-step learning-rate schedule: ``"constant"`` (the image script's default) or ``"cosine"`` (to 0 at
    ``total_steps``, the tabular default), both after an optional linear warm-up of ``warmup_steps``.

    progress: for ``"cosine"``, a callable giving the run's progress in [0, 1] (clipped) that replaces
    ``step / total_steps`` -- e.g. the fraction of a wall-time budget spent (the image script's ``--time_limit``);
    it is read at every ``scheduler.step()``."""
    if kind not in ("constant", "cosine"):
        raise ValueError(f"kind (the lr schedule) must be 'constant' or 'cosine', got {kind!r}")
    if kind == "cosine" and progress is None and (total_steps is None or total_steps < 1):
        raise ValueError(f"the cosine schedule needs total_steps >= 1, got {total_steps!r}")
    if progress is not None and not callable(progress):
        raise TypeError(f"progress must be a callable returning a float in [0, 1], got {type(progress).__name__}")
    if warmup_steps < 0:
        raise ValueError(f"warmup_steps must be >= 0, got {warmup_steps}")

    def factor(step: int) -> float:
        warm = min(1.0, (step + 1) / warmup_steps) if warmup_steps else 1.0
        if kind == "constant":
            return warm
        done = min(max(float(progress()), 0.0), 1.0) if progress is not None else min(step / total_steps, 1.0)
        return warm * 0.5 * (1.0 + math.cos(math.pi * done))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


# torch.optim's optimizers whose update of a parameter reads only that parameter's gradient and state and its group's
# hyperparameters: stepping them one parameter at a time is the same update as one step over all parameters
PER_PARAMETER_OPTIMIZERS = (torch.optim.SGD, torch.optim.Adam, torch.optim.AdamW, torch.optim.Adamax, torch.optim.NAdam,
                            torch.optim.RAdam, torch.optim.RMSprop, torch.optim.Adagrad, torch.optim.Adadelta,
                            torch.optim.ASGD, torch.optim.Rprop, torch.optim.Adafactor)


class StepInBackward:
    """The optimizer step fused into the backward pass: inside ``with StepInBackward(optimizers): loss.backward()``
    each parameter is stepped as soon as its gradient is accumulated, and its gradient is freed at once
    (``Tensor.register_post_accumulate_grad_hook``). The step's gradient memory is then one parameter's gradient at
    a time instead of all of them -- with backprop by inversion (:mod:`flowgmm_fast.nn.invertible`) the last part of
    a training step's memory that grew with the flow's depth.

    optimizers: an optimizer, a sequence of them or a mapping name -> optimizer (the Trainer's). Each is an instance
    of one of :data:`PER_PARAMETER_OPTIMIZERS` (an update of one parameter that reads the other parameters' gradients
    -- LBFGS -- cannot be made one parameter at a time). They are used as they are: a parameter is stepped by calling
    its optimizer's ``step()`` with the parameter's group temporarily narrowed to that one parameter, so the
    optimizer's state, parameter groups (learning rates set by a scheduler, weight decay per group) and
    ``state_dict()`` are exactly those of the standard ``backward(); step()``, and the update is the same (the same
    per-parameter arithmetic; equal in float64 in tests/test_step_in_backward.py). Checkpoints of the two ways are
    interchangeable. Step hooks registered on an optimizer run once per parameter. Schedulers step after the backward
    pass as usual. A parameter in several optimizers is stepped by each, in order.

    What it cannot do, and refuses: clip the global gradient norm (no gradient is left to clip once the backward pass
    ends; the Trainer refuses ``max_grad_norm`` with it); accumulate gradients over several backward passes (every
    parameter's ``grad`` must be None on entering, and a parameter whose gradient arrives twice inside one ``with``
    raises); DistributedDataParallel (its all-reduce writes the averaged gradients after the local ones are
    accumulated; the Trainer refuses it). An error raised inside the backward pass leaves the parameters stepped so
    far updated (in standard mode none would be).
    """

    def __init__(self, optimizers: Mapping[str, torch.optim.Optimizer] | Sequence[torch.optim.Optimizer]
                 | torch.optim.Optimizer):
        if isinstance(optimizers, torch.optim.Optimizer):
            named = {"0": optimizers}
        elif isinstance(optimizers, Mapping):
            named = dict(optimizers)
        else:
            named = {str(i): opt for i, opt in enumerate(optimizers)}
        if not named:
            raise ValueError("optimizers must hold at least one optimizer")
        for name, opt in named.items():
            if not isinstance(opt, PER_PARAMETER_OPTIMIZERS):
                raise ValueError(f"optimizers[{name!r}] is a {type(opt).__name__}: a step in the backward pass updates "
                                 f"one parameter at a time, which needs an optimizer whose update of a parameter reads "
                                 f"only that parameter's gradient (one of "
                                 f"{', '.join(c.__name__ for c in PER_PARAMETER_OPTIMIZERS)})")
        self.optimizers = named
        self._owners: dict[int, tuple[torch.Tensor, list[tuple[torch.optim.Optimizer, int]]]] = {}
        self._handles: list = []
        self._stepped: set[int] = set()

    def _map_owners(self) -> None:
        """parameter -> the (optimizer, group index) pairs that step it, in the optimizers' order; read anew at every
        ``with`` (``load_state_dict`` replaces the group dicts, ``add_param_group`` adds some)."""
        self._owners = {}
        for opt in self.optimizers.values():
            for gi, group in enumerate(opt.param_groups):
                for p in group["params"]:
                    self._owners.setdefault(id(p), (p, []))[1].append((opt, gi))

    @property
    def params(self) -> list[torch.Tensor]:
        """The optimizers' parameters (each once)."""
        self._map_owners()
        return [p for p, _ in self._owners.values()]

    def __enter__(self) -> StepInBackward:
        if self._handles:
            raise RuntimeError("StepInBackward is already active (it does not nest)")
        params = self.params  # maps the owners
        held = [i for i, p in enumerate(params) if p.grad is not None]
        if held:
            raise ValueError(f"StepInBackward: {len(held)} parameter(s) already hold a gradient (the first: parameter "
                             f"{held[0]} of the optimizers); set them to None first (zero_grad(set_to_none=True)): "
                             f"gradients cannot be accumulated over several backward passes when every parameter is "
                             f"stepped inside the backward pass")
        self._stepped = set()
        self._handles = [p.register_post_accumulate_grad_hook(self._hook) for p in params if p.requires_grad]
        return self

    def __exit__(self, *exc) -> bool:
        for handle in self._handles:
            handle.remove()
        self._handles = []
        return False

    @property
    def stepped(self) -> int:
        """How many parameters the last (or current) backward pass stepped."""
        return len(self._stepped)

    def _hook(self, p: torch.Tensor) -> None:
        if id(p) in self._stepped:
            raise RuntimeError("StepInBackward: a parameter received a second gradient inside one step (a second "
                               "backward pass, or retain_graph=True and backward twice): it was already stepped with "
                               "the first; gradients cannot be accumulated when the step runs inside the backward pass")
        self._stepped.add(id(p))
        for opt, gi in self._owners[id(p)][1]:
            groups = opt.param_groups
            group = groups[gi]
            params = group["params"]
            opt.param_groups, group["params"] = [group], [p]  # the real group dict: the scheduler's lr, its options
            try:
                opt.step()
            finally:
                opt.param_groups, group["params"] = groups, params
        p.grad = None
