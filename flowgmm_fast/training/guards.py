"""Non-finite loss guard that names the step and the loss part, without a host-device sync per step; and the check
that a training state about to be checkpointed is finite.

:meth:`NonFiniteGuard.update` records on the device, per loss part, the first step at which the part was NaN or
infinite (a ``torch.where``, no sync). :meth:`NonFiniteGuard.check` reads that record (one sync) and raises
:class:`NonFiniteLossError`. A trainer checks every ``check_every`` steps and always before writing a checkpoint, so
a checkpoint never holds parameters updated from a non-finite loss: the last good checkpoint is kept.

A finite loss does not make the state finite: a huge learning rate can step the parameters to infinity, and batch
statistics can overflow a batch-norm running variance while the normalised output stays finite.
:func:`non_finite_state` lists the non-finite tensors of a model and its optimizers (one sync), and
:class:`NonFiniteStateError` reports them.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

__all__ = ["NonFiniteLossError", "NonFiniteStateError", "NonFiniteGuard", "non_finite_state"]


class NonFiniteLossError(FloatingPointError):
    """The loss became NaN or infinite. ``step``: the first bad step; ``parts``: the loss parts that were bad then."""

    def __init__(self, step: int, parts: list[str]):
        self.step, self.parts = step, parts
        super().__init__(f"non-finite loss at step {step}: loss part(s) {', '.join(map(repr, parts))} became NaN or "
                         f"infinite; training stopped (the last checkpoint whose parameters gave a finite loss is "
                         f"kept)")


class NonFiniteStateError(FloatingPointError):
    """The training state (parameters, buffers or optimizer state) holds NaN or infinity at ``step``; ``names``:
    the tensors (the first few). No checkpoint of it is written."""

    def __init__(self, step: int, names: list[str]):
        self.step, self.names = step, names
        shown = ", ".join(names[:5]) + (f" and {len(names) - 5} more" if len(names) > 5 else "")
        super().__init__(f"non-finite training state at step {step}: {shown} hold NaN or infinity (a learning rate "
                         f"too large?); training stopped without writing it (the previous checkpoint is kept)")


def non_finite_state(model: torch.nn.Module, optimizers: Mapping[str, torch.optim.Optimizer] | None = None
                     ) -> list[str]:
    """Names of the floating tensors of ``model.state_dict()`` (parameters and buffers, e.g. batch-norm running
    statistics) and of the optimizers' state (e.g. Adam's moments) that are not all finite. One host sync."""
    named = [(f"model.{k}", v) for k, v in model.state_dict().items()
             if isinstance(v, torch.Tensor) and v.is_floating_point()]
    for name, opt in (optimizers or {}).items():
        for i, state in enumerate(opt.state.values()):
            named += [(f"optimizer {name!r} state {i}.{k}", v) for k, v in state.items()
                      if isinstance(v, torch.Tensor) and v.is_floating_point()]
    if not named:
        return []
    flags = torch.stack([torch.isfinite(v).all().to(named[0][1].device) for _, v in named]).tolist()
    return [n for (n, _), ok in zip(named, flags) if not ok]


class NonFiniteGuard:
    """Remembers, per loss part, the first step at which it was not finite. See the module docstring."""

    def __init__(self):
        self.names: tuple[str, ...] | None = None
        self._first: torch.Tensor | None = None

    def update(self, step: int, parts: Mapping[str, torch.Tensor]) -> None:
        """Record ``parts`` (name -> scalar tensor) of step ``step``; device-side only (no sync)."""
        names = tuple(parts)
        if self.names is None:
            self.names = names
            device = next(iter(parts.values())).device
            self._first = torch.full((len(names),), -1, dtype=torch.long, device=device)
        elif names != self.names:
            raise ValueError(f"loss parts changed from {self.names} to {names}; keep the same parts every step "
                             f"(use a zero tensor for an inactive part)")
        values = torch.stack([parts[n].detach().float().reshape(()) for n in names])
        new_bad = (~torch.isfinite(values)) & (self._first < 0)
        self._first = torch.where(new_bad, torch.full_like(self._first, step), self._first)

    def first_bad(self) -> tuple[int, list[str]] | None:
        """(step, parts) of the first non-finite loss seen, or None (one host sync)."""
        if self._first is None:
            return None
        first = self._first.tolist()
        bad = [s for s in first if s >= 0]
        if not bad:
            return None
        step = min(bad)
        return step, [n for n, s in zip(self.names, first) if s == step]

    def check(self) -> None:
        """Raise :class:`NonFiniteLossError` if any part was ever non-finite (one host sync)."""
        found = self.first_bad()
        if found is not None:
            raise NonFiniteLossError(*found)
