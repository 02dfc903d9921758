"""Training utilities shared by every FlowGMM training script (images, tabular, text); model-agnostic.

- :class:`Trainer` -- the loop: steps, clipping, bf16 autocast, logging, evaluation, non-finite guard,
  checkpoints that are never written from a non-finite state, exact resume, Ctrl-C / SIGTERM -> checkpoint
  (:mod:`.trainer`).
- :func:`semisup_loss` (general FlowGMM) and :func:`flowgmm_cons_loss` (the image FlowGMM-cons objective) as
  named loss parts (:mod:`.losses`).
- :func:`save_checkpoint` / :func:`load_checkpoint` / :func:`read_checkpoint` (checksummed, loaded weights-only),
  :func:`atomic_save`, RNG capture/restore, :func:`seed_everything` (:mod:`.checkpoint`).
- what a resumed run may change: :func:`reconcile_resume_args`, :func:`set_learning_rate` (:mod:`.resume`).
- :class:`TrainLogger` -- rank-0 TensorBoard + tqdm + one-line summaries (:mod:`.logger`).
- :class:`NonFiniteGuard` / :class:`NonFiniteLossError`, :func:`non_finite_state` / :class:`NonFiniteStateError`
  (:mod:`.guards`).
- :func:`weight_decay_param_groups` (decay on weight-norm gains only), :func:`linear_rampup`,
  :func:`make_lr_scheduler`, :class:`StepInBackward` (the optimizer step fused into the backward pass; the Trainer's
  ``step_in_backward=True``) (:mod:`.optim`).
- torch.distributed: :func:`init_distributed`, :func:`wrap_model` (DDP + global batch-norm), :func:`rank_slice`,
  :func:`all_reduce_mean`, :func:`is_main_process`, ... (:mod:`.distributed`).

Typical use (a FlowGMM ``model``, batches of ``(x, labels)`` with -1 for unlabeled)::

    info = init_distributed(args.device, distributed=args.distributed)
    model = wrap_model(model.to(info.device), info)
    opt = torch.optim.Adam(weight_decay_param_groups(unwrap_model(model).flow, 5e-5), lr=1e-3)
    trainer = Trainer(model, {"flow": opt}, steps_per_epoch=n, max_grad_norm=100., ckpt_path="ckpt/last.pt",
                      logger=TrainLogger("runs/x"))
    if args.resume: trainer.resume()
    trainer.fit(loader.batches_from, lambda b, t: semisup_loss(model, *b)[:2], max_steps=..., evaluate=...)
"""

from .checkpoint import (CheckpointError, atomic_save, capture_rng_state, load_checkpoint, read_checkpoint,
                         remove_stale_temporaries, restore_rng_state, save_checkpoint, seed_everything)
from .distributed import (DistInfo, GlobalBatchNorm, all_gather_object, all_reduce_mean, barrier, broadcast_object,
                          cleanup_distributed, convert_sync_batchnorm, get_rank, get_world_size, init_distributed,
                          is_distributed, is_main_process, rank_slice, unwrap_model, wrap_model)
from .guards import NonFiniteGuard, NonFiniteLossError, NonFiniteStateError, non_finite_state
from .logger import TrainLogger, format_summary
from .losses import flowgmm_cons_loss, semisup_loss
from .optim import (PER_PARAMETER_OPTIMIZERS, StepInBackward, linear_rampup, make_lr_scheduler,
                    weight_decay_param_groups)
from .resume import ResumeArgumentError, explicit_dests, reconcile_resume_args, set_learning_rate
from .trainer import Trainer

__all__ = ["Trainer", "semisup_loss", "flowgmm_cons_loss", "save_checkpoint", "load_checkpoint", "read_checkpoint",
           "atomic_save", "remove_stale_temporaries", "capture_rng_state",
           "restore_rng_state", "seed_everything", "CheckpointError", "TrainLogger", "format_summary",
           "NonFiniteGuard", "NonFiniteLossError", "NonFiniteStateError", "non_finite_state",
           "reconcile_resume_args", "explicit_dests", "set_learning_rate", "ResumeArgumentError",
           "weight_decay_param_groups", "linear_rampup", "make_lr_scheduler", "StepInBackward",
           "PER_PARAMETER_OPTIMIZERS",
           "DistInfo", "init_distributed", "cleanup_distributed", "is_distributed", "get_rank", "get_world_size",
           "is_main_process", "barrier", "all_gather_object", "broadcast_object", "all_reduce_mean", "unwrap_model",
           "wrap_model", "convert_sync_batchnorm", "GlobalBatchNorm", "rank_slice"]
