"""Rank-0 logging: TensorBoard event files, a tqdm progress bar, and a one-line summary per evaluation.

On ranks other than 0 (and with ``enabled=False``) every method is a no-op, so scripts call them unconditionally.
Scalars may be Python numbers or tensors; tensors are read with ``.item()`` (a host sync), so log at a frequency,
not every step (:class:`flowgmm_fast.training.Trainer` accumulates on the device between log points).
"""

from __future__ import annotations

import sys
from collections.abc import Mapping

import torch

from .distributed import is_main_process

__all__ = ["TrainLogger", "format_summary"]


def _value(v) -> float:
    return float(v.item()) if isinstance(v, torch.Tensor) else float(v)


def format_summary(step: int, epoch: float, metrics: Mapping[str, float]) -> str:
    """``"step 1200 | epoch 3.75 | test_acc 0.9712 | test_bpd 1.234 | ..."`` (4 significant digits)."""
    items = " | ".join(f"{k} {_value(v):.4g}" for k, v in metrics.items())
    return f"step {step} | epoch {epoch:.2f}" + (f" | {items}" if items else "")


class TrainLogger:
    """TensorBoard + tqdm + summary lines, active on rank 0 only.

    ``logdir``: where TensorBoard event files go (None: no event files). ``stream``: where summary lines are
    printed (via ``tqdm.write`` so they don't break the bar); ``desc`` names the bar. ``keep_history``: also keep
    every logged scalar in :attr:`history` (one dict per :meth:`scalars` call: ``{"step": ..., name: float}``), e.g.
    for a caller that returns the training curve.
    """

    def __init__(self, logdir: str | None = None, *, enabled: bool | None = None, stream=None,
                 progress_bar: bool = True, keep_history: bool = False, desc: str = "train"):
        self.enabled = is_main_process() if enabled is None else bool(enabled)
        self.stream = stream if stream is not None else sys.stdout
        self.progress_bar = progress_bar
        self.desc = desc
        self.history: list[dict] | None = [] if keep_history else None
        self.writer = None
        self._bar = None
        if self.enabled and logdir is not None:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(log_dir=logdir)

    def start_progress(self, total: int, initial: int = 0, desc: str | None = None) -> None:
        """Open the tqdm bar over optimizer steps (``initial`` > 0 when resuming)."""
        if self.enabled and self.progress_bar:
            from tqdm.auto import tqdm

            self._bar = tqdm(total=total, initial=initial, desc=desc or self.desc, dynamic_ncols=True,
                             file=self.stream)

    def advance(self, n: int = 1, postfix: Mapping[str, float] | None = None) -> None:
        if self._bar is not None:
            self._bar.update(n)
            if postfix:
                self._bar.set_postfix({k: f"{_value(v):.4g}" for k, v in postfix.items()}, refresh=False)

    def scalars(self, step: int, values: Mapping[str, float | torch.Tensor], prefix: str = "") -> None:
        """Write each value as TensorBoard scalar ``prefix + name`` at ``step`` (and keep it in ``history``)."""
        if self.history is not None and self.enabled:
            self.history.append({"step": int(step), **{prefix + k: _value(v) for k, v in values.items()}})
        if self.writer is None:
            return
        for name, v in values.items():
            self.writer.add_scalar(prefix + name, _value(v), step)

    def write(self, line: str) -> None:
        """Print one line (rank 0 only)."""
        if not self.enabled:
            return
        if self._bar is not None:
            self._bar.write(line, file=self.stream)
        else:
            print(line, file=self.stream, flush=True)

    def summary(self, step: int, epoch: float, metrics: Mapping[str, float], prefix: str = "eval/") -> str:
        """Log ``metrics`` to TensorBoard under ``prefix`` and print the one-line summary; returns the line."""
        line = format_summary(step, epoch, metrics)
        self.scalars(step, metrics, prefix)
        self.write(line)
        if self.writer is not None:
            self.writer.flush()
        return line

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None
        if self.writer is not None:
            self.writer.close()
            self.writer = None
