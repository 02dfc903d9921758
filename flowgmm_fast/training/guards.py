"""Non-finite loss guard that names the step and the loss part, without a host-device sync per step.

:meth:`NonFiniteGuard.update` records on the device, per loss part, the first step at which the part was NaN or
infinite (a ``torch.where``, no sync). :meth:`NonFiniteGuard.check` reads that record (one sync) and raises
:class:`NonFiniteLossError`. A trainer checks every ``check_every`` steps and always before writing a checkpoint, so
a checkpoint never holds parameters updated from a non-finite loss: the last good checkpoint is kept.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

__all__ = ["NonFiniteLossError", "NonFiniteGuard"]


class NonFiniteLossError(FloatingPointError):
    """The loss became NaN or infinite. ``step``: the first bad step; ``parts``: the loss parts that were bad then."""

    def __init__(self, step: int, parts: list[str]):
        self.step, self.parts = step, parts
        super().__init__(f"non-finite loss at step {step}: loss part(s) {', '.join(map(repr, parts))} became NaN or "
                         f"infinite; training stopped (the last checkpoint written before that step is kept)")


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
