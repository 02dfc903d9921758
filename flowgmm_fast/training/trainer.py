"""A small, model-agnostic training loop shared by the FlowGMM scripts (images and tabular/text).

The script supplies the pieces that differ -- a batch source, a loss function, an evaluation -- and
:class:`Trainer` does what every run needs, once:

- backward, gradient-norm clipping, every optimizer and scheduler stepped once per step, optional bf16 autocast;
- loss parts accumulated on the device and logged every ``log_every`` steps (TensorBoard: each part, learning
  rate, gradient norm, step time; tqdm bar), no host sync in between;
- the non-finite guard (:class:`~flowgmm_fast.training.guards.NonFiniteGuard`): a NaN/inf loss part stops the run
  with :class:`~flowgmm_fast.training.guards.NonFiniteLossError` naming the step and the part; no checkpoint is
  written after a bad step, so the last good one is kept;
- evaluation every ``eval_every`` steps with a one-line summary; checkpoints every ``save_every`` steps and at the
  end (atomic, rank 0; :mod:`~flowgmm_fast.training.checkpoint`); exact resume with :meth:`Trainer.resume`;
- Ctrl-C (SIGINT) finishes the current step, writes a checkpoint and raises ``KeyboardInterrupt`` (a second
  Ctrl-C stops at once, without a checkpoint);
- an ``on_epoch_end(trainer)`` hook after every epoch (and after the last step), which may call
  :meth:`Trainer.request_stop` to end the run early and normally (final checkpoint written, no exception): early
  stopping and EM updates of the mixture weights live there (:func:`flowgmm_fast.semisup.fit_flowgmm`).

Exact resume needs a batch source that is a pure function of the step: ``batches(start_step)`` must yield the
batches of steps ``start_step + 1, start_step + 2, ...`` (steps are counted from 1) exactly as an uninterrupted run
would (e.g. orders and augmentations drawn from generators seeded by (seed, epoch) / (seed, step), as
:class:`flowgmm_fast.data.SemiSupervisedLoader` does). Global RNG states are saved and restored as well.
"""

from __future__ import annotations

import contextlib
import signal
import time
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path

import torch
from torch import nn

from . import distributed as dist_utils
from .checkpoint import load_checkpoint, save_checkpoint
from .guards import NonFiniteGuard, NonFiniteLossError
from .logger import TrainLogger

__all__ = ["Trainer"]

LossFn = Callable[[object, "Trainer"], tuple[torch.Tensor, Mapping[str, torch.Tensor]]]


class Trainer:
    """Runs optimisation steps of ``model`` with ``optimizers`` (name -> optimizer; see the module docstring).

    steps_per_epoch: optimizer steps in one epoch (for FlowGMM: one pass over the labeled data); ``epoch`` is
    ``step / steps_per_epoch``. max_grad_norm: clip the global gradient norm of all optimised parameters (None: no
    clipping). ckpt_path: the checkpoint file (None: no checkpoints). autocast_dtype: e.g. torch.bfloat16 to run
    ``compute_loss`` under autocast. check_every: steps between non-finite checks (each is one host sync; every
    step on the CPU costs nothing, on CUDA choose the log interval). extra_state: returns a dict saved in every
    checkpoint (e.g. the script's arguments); it comes back from :meth:`resume`.
    """

    def __init__(self, model: nn.Module, optimizers: Mapping[str, torch.optim.Optimizer], *, steps_per_epoch: int,
                 schedulers: Mapping[str, object] | None = None, max_grad_norm: float | None = None,
                 ckpt_path: str | Path | None = None, logger: TrainLogger | None = None,
                 autocast_dtype: torch.dtype | None = None, check_every: int = 1,
                 extra_state: Callable[[], dict] | None = None):
        if not optimizers:
            raise ValueError("optimizers must name at least one optimizer")
        if steps_per_epoch < 1:
            raise ValueError(f"steps_per_epoch must be >= 1, got {steps_per_epoch}")
        if max_grad_norm is not None and not max_grad_norm > 0:
            raise ValueError(f"max_grad_norm must be > 0 or None, got {max_grad_norm!r}")
        if check_every < 1:
            raise ValueError(f"check_every must be >= 1, got {check_every}")
        self.model = model
        self.optimizers = dict(optimizers)
        self.schedulers = {k: v for k, v in (schedulers or {}).items() if v is not None}
        self.steps_per_epoch = int(steps_per_epoch)
        self.max_grad_norm = max_grad_norm
        self.ckpt_path = Path(ckpt_path) if ckpt_path is not None else None
        self.logger = logger if logger is not None else TrainLogger(None, progress_bar=False)
        self.autocast_dtype = autocast_dtype
        self.check_every = int(check_every)
        self.extra_state = extra_state
        self.guard = NonFiniteGuard()
        self.step = 0
        self.max_steps: int | None = None  # the max_steps of the current (or last) fit
        self.last_metrics: dict[str, float] = {}
        self._stop_requested = False
        self._finish_requested = False
        self._params = [p for opt in self.optimizers.values() for g in opt.param_groups for p in g["params"]]
        self._device = next(iter(model.parameters())).device

    @property
    def epoch(self) -> float:
        """Epochs done (fractional): step / steps_per_epoch."""
        return self.step / self.steps_per_epoch

    # ----------------------------------------------------------------------------------------- checkpoints
    def save(self, path: str | Path | None = None) -> Path | None:
        """Check the guard (never save after a non-finite loss), then write a checkpoint (collective; rank 0
        writes). Returns the path on rank 0."""
        path = Path(path) if path is not None else self.ckpt_path
        if path is None:
            raise ValueError("no checkpoint path: pass ckpt_path to Trainer or a path to save()")
        self.guard.check()
        extra = {"last_metrics": self.last_metrics, **(self.extra_state() if self.extra_state else {})}
        return save_checkpoint(path, self.model, step=self.step, epoch=self.epoch, optimizers=self.optimizers,
                               schedulers=self.schedulers, extra=extra)

    def resume(self, path: str | Path | None = None) -> dict:
        """Load model, prior, optimizers, schedulers, step and RNG states; returns the checkpoint's ``extra``."""
        path = Path(path) if path is not None else self.ckpt_path
        if path is None:
            raise ValueError("no checkpoint path: pass ckpt_path to Trainer or a path to resume()")
        info = load_checkpoint(path, self.model, optimizers=self.optimizers, schedulers=self.schedulers,
                               map_location=self._device)
        self.step = int(info["step"])
        self.last_metrics = dict(info["extra"].get("last_metrics", {}))
        return info["extra"]

    # ----------------------------------------------------------------------------------------- one step
    def train_step(self, batch, compute_loss: LossFn) -> tuple[dict[str, torch.Tensor], torch.Tensor | None]:
        """One optimisation step on ``batch``; returns (detached loss parts, gradient norm or None). No host sync."""
        if not self.model.training:  # a recursive module walk: skipped when the model is in training mode already
            self.model.train()
        autocast = (torch.autocast(self._device.type, dtype=self.autocast_dtype) if self.autocast_dtype is not None
                    else contextlib.nullcontext())
        with autocast:
            loss, parts = compute_loss(batch, self)
        for opt in self.optimizers.values():
            opt.zero_grad(set_to_none=True)
        loss.backward()
        grad_norm = None
        if self.max_grad_norm is not None:
            grad_norm = torch.nn.utils.clip_grad_norm_(self._params, self.max_grad_norm)
        for opt in self.optimizers.values():
            opt.step()
        for sched in self.schedulers.values():
            sched.step()
        self.step += 1
        parts = {k: v.detach() for k, v in parts.items()}
        self.guard.update(self.step, parts)
        return parts, grad_norm

    # ----------------------------------------------------------------------------------------- the loop
    def _on_sigint(self, signum, frame):
        if self._stop_requested:  # a second Ctrl-C stops at once
            raise KeyboardInterrupt
        self._stop_requested = True

    def request_stop(self) -> None:
        """End :meth:`fit` normally after the current step (from an ``on_epoch_end`` hook or ``evaluate``): the
        final checkpoint is written and ``fit`` returns. Under torch.distributed every rank must decide alike (e.g.
        from all-reduced metrics)."""
        self._finish_requested = True

    def _stop_agreed(self) -> bool:
        if not dist_utils.is_distributed():
            return self._stop_requested
        flag = torch.tensor([float(self._stop_requested)], device=self._device)
        torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
        return bool(flag.item())

    def fit(self, batches: Callable[[int], Iterable], compute_loss: LossFn, *, max_steps: int,
            log_every: int = 50, eval_every: int | None = None, save_every: int | None = None,
            evaluate: Callable[["Trainer"], Mapping[str, float]] | None = None,
            on_epoch_end: Callable[["Trainer"], None] | None = None) -> dict[str, float]:
        """Train from ``self.step`` up to ``max_steps``; returns the last evaluation's metrics.

        batches(start_step) -> iterable of batches for steps start_step+1, ...; compute_loss(batch, trainer) ->
        (loss, parts) with parts a dict of scalar tensors (same names every step); evaluate(trainer) -> metrics
        (it may switch the model to eval mode; the next step switches it back). eval_every / save_every in steps
        (None: only at the end). on_epoch_end(trainer) runs every ``steps_per_epoch`` steps and after the last
        step, before evaluation and saving; it may change the model (e.g. the mixture weights) and call
        :meth:`request_stop` (the run then ends after this step, as if it were the last). Raises
        NonFiniteLossError (no checkpoint written after the bad step) or KeyboardInterrupt (after writing a
        checkpoint when ``ckpt_path`` is set).
        """
        if max_steps < self.step:
            raise ValueError(f"max_steps ({max_steps}) is below the resumed step ({self.step})")
        if log_every < 1:
            raise ValueError(f"log_every must be >= 1, got {log_every}")
        previous_handler = None
        with contextlib.suppress(ValueError):  # only possible in the main thread
            previous_handler = signal.signal(signal.SIGINT, self._on_sigint)
        self.logger.start_progress(max_steps, initial=self.step)
        sums: dict[str, torch.Tensor] = {}
        grad_sum = torch.zeros((), device=self._device)
        n_since_log, t_log = 0, time.perf_counter()
        at_step_boundary = False  # a second Ctrl-C mid-step must not checkpoint a half-updated model
        self._finish_requested = False
        self.max_steps = max_steps
        try:
            iterator = iter(batches(self.step))
            while self.step < max_steps:
                batch = next(iterator)
                parts, grad_norm = self.train_step(batch, compute_loss)
                if on_epoch_end is not None and (self.step % self.steps_per_epoch == 0 or self.step == max_steps):
                    self.guard.check()  # never run a hook on a model a non-finite step has updated
                    on_epoch_end(self)
                for k, v in parts.items():
                    sums[k] = sums[k] + v.float() if k in sums else v.float().clone()
                if grad_norm is not None:
                    grad_sum = grad_sum + grad_norm.float()
                n_since_log += 1
                last = self.step == max_steps or self._finish_requested
                if self.step % self.check_every == 0 or last:
                    self.guard.check()
                if self.step % log_every == 0 or last:
                    self.guard.check()
                    now = time.perf_counter()
                    means = {k: dist_utils.all_reduce_mean(v / n_since_log) for k, v in sums.items()}
                    scalars = dict(means)
                    if self.max_grad_norm is not None:
                        scalars["grad_norm"] = grad_sum / n_since_log
                    for name, opt in self.optimizers.items():
                        scalars[f"lr_{name}"] = opt.param_groups[0]["lr"]
                    scalars["step_time_s"] = (now - t_log) / n_since_log
                    scalars["epoch"] = self.epoch
                    self.logger.scalars(self.step, scalars, prefix="train/")
                    self.logger.advance(n_since_log, {"loss": means["loss"]} if "loss" in means else None)
                    sums, n_since_log, t_log = {}, 0, now
                    grad_sum = torch.zeros((), device=self._device)
                if evaluate is not None and ((eval_every and self.step % eval_every == 0) or last):
                    self.last_metrics = {k: float(v) for k, v in evaluate(self).items()}
                    self.logger.summary(self.step, self.epoch, self.last_metrics)
                if self.ckpt_path is not None and save_every and self.step % save_every == 0 and not last:
                    self.save()
                if (not dist_utils.is_distributed() or n_since_log == 0) and self._stop_agreed():
                    at_step_boundary = True
                    raise KeyboardInterrupt
                if self._finish_requested:
                    break
            if self.ckpt_path is not None:
                self.save()
        except KeyboardInterrupt:
            if self.ckpt_path is not None and at_step_boundary:
                path = self.save()
                self.logger.write(f"interrupted at step {self.step}: checkpoint written to {path}")
            raise
        except NonFiniteLossError as exc:
            self.logger.write(str(exc))
            raise
        finally:
            self._stop_requested = False
            if previous_handler is not None:
                signal.signal(signal.SIGINT, previous_handler)
            self.logger.close()
        return self.last_metrics
