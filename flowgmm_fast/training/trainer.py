"""A small, model-agnostic training loop shared by the FlowGMM scripts (images and tabular/text).

The script supplies the pieces that differ -- a batch source, a loss function, an evaluation -- and
:class:`Trainer` does what every run needs, once:

- backward, gradient-norm clipping, every optimizer and scheduler stepped once per step, optional bf16 autocast;
  or, with ``step_in_backward=True``, every parameter stepped inside the backward pass as soon as its gradient is
  ready and its gradient freed at once (:class:`~flowgmm_fast.training.optim.StepInBackward`: gradient memory of one
  parameter at a time; no clipping);
- loss parts accumulated on the device and logged every ``log_every`` steps (TensorBoard: each part, learning
  rate, gradient norm, step time; tqdm bar), no host sync in between;
- the non-finite guard (:class:`~flowgmm_fast.training.guards.NonFiniteGuard`): a NaN/inf loss part stops the run
  with :class:`~flowgmm_fast.training.guards.NonFiniteLossError` naming the step and the part;
- evaluation every ``eval_every`` steps with a one-line summary; checkpoints every ``save_every`` steps and at the
  end (atomic, checksummed, rank 0; :mod:`~flowgmm_fast.training.checkpoint`); exact resume with
  :meth:`Trainer.resume`; temporary files left by a writer killed mid-write are removed when training starts;
- a checkpoint never holds a state that is not finite, nor one whose parameters gave a non-finite loss: every
  checkpoint is refused (:class:`~flowgmm_fast.training.guards.NonFiniteStateError`) when a parameter, buffer or
  optimizer-state tensor is NaN/inf, and a periodic checkpoint of step s is written only once the loss of step s + 1,
  computed from its parameters, is known to be finite (it waits in memory until then). So after a NaN/inf stop the
  checkpoint on disk is the last one that evaluated to a finite loss;
- Ctrl-C (SIGINT) and SIGTERM (what schedulers and ``kill`` send) finish the current step and write a checkpoint,
  then raise ``KeyboardInterrupt`` (SIGINT) or ``SystemExit(143)`` (SIGTERM); a second signal stops at once, without
  a checkpoint;
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
from .checkpoint import (atomic_write_bytes, checkpoint_payload, load_checkpoint, remove_stale_temporaries,
                         serialize_checkpoint)
from .guards import NonFiniteGuard, NonFiniteLossError, NonFiniteStateError, non_finite_state
from .logger import TrainLogger
from .optim import StepInBackward

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

    step_in_backward: step every parameter inside the backward pass and free its gradient
    (:class:`~flowgmm_fast.training.optim.StepInBackward`): the same updates, optimizer state, schedules and
    checkpoints as the standard step (resuming across the two ways is exact), without holding every gradient at once.
    It cannot clip the global gradient norm (``max_grad_norm`` must be None) and does not work under
    torch.distributed; both are refused with a ValueError. The non-finite guard behaves as in the standard step: the
    step of a non-finite loss is applied, the run stops at the next check and no checkpoint of that state is written.
    """

    def __init__(self, model: nn.Module, optimizers: Mapping[str, torch.optim.Optimizer], *, steps_per_epoch: int,
                 schedulers: Mapping[str, object] | None = None, max_grad_norm: float | None = None,
                 ckpt_path: str | Path | None = None, logger: TrainLogger | None = None,
                 autocast_dtype: torch.dtype | None = None, check_every: int = 1,
                 extra_state: Callable[[], dict] | None = None, step_in_backward: bool = False):
        if not optimizers:
            raise ValueError("optimizers must name at least one optimizer")
        if not isinstance(step_in_backward, bool):
            raise TypeError(f"step_in_backward must be a bool, got {type(step_in_backward).__name__}")
        if steps_per_epoch < 1:
            raise ValueError(f"steps_per_epoch must be >= 1, got {steps_per_epoch}")
        if max_grad_norm is not None and not max_grad_norm > 0:
            raise ValueError(f"max_grad_norm must be > 0 or None, got {max_grad_norm!r}")
        if check_every < 1:
            raise ValueError(f"check_every must be >= 1, got {check_every}")
        self._in_backward = None
        if step_in_backward:
            if max_grad_norm is not None:
                raise ValueError(f"step_in_backward=True steps each parameter as soon as its gradient is ready, before "
                                 f"the global gradient norm is known, so it cannot clip it: max_grad_norm must be None "
                                 f"with it, got {max_grad_norm!r}")
            if dist_utils.is_distributed() or isinstance(model, nn.parallel.DistributedDataParallel):
                raise ValueError("step_in_backward=True does not work under torch.distributed: "
                                 "DistributedDataParallel averages the gradients across ranks after they are "
                                 "accumulated, and a step inside the backward pass would use this rank's own")
            self._in_backward = StepInBackward(optimizers)
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
        self._stop_signal: int | None = None
        self._finish_requested = False
        self._params = [p for opt in self.optimizers.values() for g in opt.param_groups for p in g["params"]]
        self._device = next(iter(model.parameters())).device

    @property
    def step_in_backward(self) -> bool:
        """Whether the parameters are stepped inside the backward pass (the constructor's argument)."""
        return self._in_backward is not None

    @property
    def epoch(self) -> float:
        """Epochs done (fractional): step / steps_per_epoch."""
        return self.step / self.steps_per_epoch

    # ----------------------------------------------------------------------------------------- checkpoints
    def _snapshot(self) -> bytes | None:
        """The checkpoint file bytes of the current state (collective; None on ranks other than 0), after checking
        the loss guard and that every parameter, buffer and optimizer-state tensor is finite."""
        self.guard.check()
        bad = non_finite_state(dist_utils.unwrap_model(self.model), self.optimizers)
        if dist_utils.is_distributed():  # every rank takes the same decision (only rank 0 writes)
            flag = torch.tensor([float(bool(bad))], device=self._device)
            torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
            bad = bad or (["(another rank's state)"] if flag.item() else [])
        if bad:
            raise NonFiniteStateError(self.step, bad)
        extra = {"last_metrics": self.last_metrics, **(self.extra_state() if self.extra_state else {})}
        payload = checkpoint_payload(self.model, step=self.step, epoch=self.epoch, optimizers=self.optimizers,
                                     schedulers=self.schedulers, extra=extra)
        return None if payload is None else serialize_checkpoint(payload)

    def _write(self, data: bytes | None, path: Path) -> Path | None:
        return atomic_write_bytes(data, path) if data is not None else None

    def save(self, path: str | Path | None = None) -> Path | None:
        """Write a checkpoint of the current state now (collective; rank 0 writes). Checks first that no loss was
        ever non-finite (:class:`NonFiniteLossError`) and that the state is finite (:class:`NonFiniteStateError`);
        on either the file on disk is left as it was. Returns the path on rank 0."""
        path = Path(path) if path is not None else self.ckpt_path
        if path is None:
            raise ValueError("no checkpoint path: pass ckpt_path to Trainer or a path to save()")
        return self._write(self._snapshot(), path)

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
        grad_norm = None
        if self._in_backward is not None:
            with self._in_backward:  # every parameter stepped (and its gradient freed) as its gradient arrives
                loss.backward()
        else:
            loss.backward()
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
    STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def _on_signal(self, signum, frame):
        if self._stop_signal is not None:  # a second signal stops at once, without a checkpoint
            self._raise_for(signum)
        self._stop_signal = signum

    @staticmethod
    def _raise_for(signum: int):
        if signum == signal.SIGTERM:
            raise SystemExit(128 + signal.SIGTERM)
        raise KeyboardInterrupt

    def request_stop(self) -> None:
        """End :meth:`fit` normally after the current step (from an ``on_epoch_end`` hook or ``evaluate``): the
        final checkpoint is written and ``fit`` returns. Under torch.distributed every rank must decide alike (e.g.
        from all-reduced metrics)."""
        self._finish_requested = True

    def _stop_agreed(self) -> int | None:
        """The stop signal (SIGINT or SIGTERM) if any rank received one, else None."""
        if not dist_utils.is_distributed():
            return self._stop_signal
        flag = torch.tensor([float(self._stop_signal or 0)], device=self._device)
        torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
        return int(flag.item()) or None

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
        NonFiniteLossError / NonFiniteStateError (the checkpoint on disk is the last one that evaluated to a finite
        loss), KeyboardInterrupt (SIGINT) or SystemExit(143) (SIGTERM) after writing a checkpoint when ``ckpt_path``
        is set.
        """
        if max_steps < self.step:
            raise ValueError(f"max_steps ({max_steps}) is below the resumed step ({self.step})")
        if log_every < 1:
            raise ValueError(f"log_every must be >= 1, got {log_every}")
        if self.ckpt_path is not None and dist_utils.is_main_process():
            removed = remove_stale_temporaries(self.ckpt_path)
            if removed:
                self.logger.write(f"removed {len(removed)} temporary checkpoint file(s) left by an interrupted write: "
                                  f"{', '.join(p.name for p in removed)}")
        previous_handlers = {}
        for signum in self.STOP_SIGNALS:
            with contextlib.suppress(ValueError):  # only possible in the main thread
                previous_handlers[signum] = signal.signal(signum, self._on_signal)
        self.logger.start_progress(max_steps, initial=self.step)
        sums: dict[str, torch.Tensor] = {}
        grad_sum = torch.zeros((), device=self._device)
        n_since_log, t_log = 0, time.perf_counter()
        stop_at_boundary = None  # a second signal mid-step must not checkpoint a half-updated model
        pending: bytes | None = None  # a periodic checkpoint waiting for the next step's loss to be finite
        pending_ok = True
        self._finish_requested = False
        self.max_steps = max_steps
        try:
            iterator = iter(batches(self.step))
            while self.step < max_steps:
                batch = next(iterator)
                parts, grad_norm = self.train_step(batch, compute_loss)
                if pending is not None:  # this step's loss came from the pending checkpoint's parameters
                    self.guard.check()
                    self._write(pending, self.ckpt_path)
                    pending = None
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
                    pending = self._snapshot()
                if not dist_utils.is_distributed() or n_since_log == 0:
                    stop_at_boundary = self._stop_agreed()
                    if stop_at_boundary is not None:
                        raise KeyboardInterrupt
                if self._finish_requested:
                    break
            if self.ckpt_path is not None:
                self.save()
        except KeyboardInterrupt:
            if stop_at_boundary is None:
                raise
            if self.ckpt_path is not None:
                pending = None  # superseded by the state saved now
                path = self.save()
                name = signal.Signals(stop_at_boundary).name
                self.logger.write(f"{name} at step {self.step}: checkpoint written to {path}")
            if stop_at_boundary == signal.SIGTERM:
                raise SystemExit(128 + signal.SIGTERM) from None
            raise
        except (NonFiniteLossError, NonFiniteStateError) as exc:
            pending_ok = False  # its parameters gave (or may have given) a non-finite loss
            self.logger.write(str(exc))
            raise
        finally:
            if pending is not None and pending_ok:
                # stopped by something else before the next step's loss was known (an error, a second signal): the
                # pending state and the loss that led to it were finite, so it beats the older checkpoint on disk
                self._write(pending, self.ckpt_path)
            self._stop_signal = None
            for signum, handler in previous_handlers.items():
                if handler is not None:
                    signal.signal(signum, handler)
            self.logger.close()
        return self.last_metrics
