"""torch.distributed helpers: launch detection (torchrun), DDP wrapping, batch-norm over the global batch, rank 0.

Launch with ``torchrun --nproc_per_node=N script.py --distributed ...``; :func:`init_distributed` reads the torchrun
environment (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR/PORT), picks NCCL for CUDA and gloo otherwise, and binds each
rank to ``cuda:LOCAL_RANK``. Without torch.distributed initialised every helper here degrades to the single-process
answer (rank 0, world size 1, no communication), so scripts call them unconditionally.

Batch-norm: the s/t networks of RealNVP normalise with batch statistics in training mode, so a flow split over ranks
computes a different function than on the whole batch unless the statistics are synchronised.
:func:`convert_sync_batchnorm` swaps every BatchNorm for :class:`torch.nn.SyncBatchNorm` on CUDA and for
:class:`GlobalBatchNorm` elsewhere (torch's SyncBatchNorm refuses CPU tensors); both normalise with the statistics of
the global batch, so N ranks give the loss and gradients of one process on the concatenated batch.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

__all__ = ["DistInfo", "init_distributed", "cleanup_distributed", "is_distributed", "get_rank", "get_world_size",
           "is_main_process", "barrier", "all_gather_object", "broadcast_object", "all_reduce_mean", "unwrap_model",
           "wrap_model", "convert_sync_batchnorm", "GlobalBatchNorm", "rank_slice"]


@dataclass(frozen=True)
class DistInfo:
    """Where this process sits: ``rank`` of ``world_size`` processes, ``local_rank`` on its node, its ``device``."""

    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    distributed: bool

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def get_rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def get_world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def is_main_process() -> bool:
    """True on rank 0 (and in a single-process run): the process that logs and writes checkpoints."""
    return get_rank() == 0


def barrier() -> None:
    if is_distributed():
        dist.barrier()


def init_distributed(device: str | torch.device | None = None, *, distributed: bool = True,
                     backend: str | None = None) -> DistInfo:
    """Initialise torch.distributed from the torchrun environment and return this process's :class:`DistInfo`.

    ``device``: "cpu", "cuda" or a full device; default "cuda" when available. With ``distributed=False`` this is
    a single-process run and nothing is initialised; with ``distributed=True`` outside torchrun it raises. On CUDA
    rank r uses ``cuda:LOCAL_RANK``. ``backend`` defaults to "nccl" for CUDA and "gloo" otherwise.
    """
    device = torch.device(device if device is not None else ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("device is 'cuda' but no CUDA device is available (use --device cpu)")
    if not distributed:
        return DistInfo(0, 1, 0, device, False)
    if "WORLD_SIZE" not in os.environ or "RANK" not in os.environ:
        raise RuntimeError("distributed training needs the torchrun environment (RANK, WORLD_SIZE, LOCAL_RANK, "
                           "MASTER_ADDR, MASTER_PORT); launch with `torchrun --nproc_per_node=N ...`")
    world_size = int(os.environ["WORLD_SIZE"])
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    if device.type == "cuda":
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    if not is_distributed():
        dist.init_process_group(backend or ("nccl" if device.type == "cuda" else "gloo"), rank=rank,
                                world_size=world_size)
    return DistInfo(rank, world_size, local_rank, device, True)


def cleanup_distributed() -> None:
    if is_distributed():
        dist.destroy_process_group()


def all_gather_object(obj) -> list:
    """Every rank's ``obj`` (picklable) as a list indexed by rank; ``[obj]`` without torch.distributed."""
    if not is_distributed():
        return [obj]
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def broadcast_object(obj, src: int = 0):
    """Rank ``src``'s ``obj`` on every rank."""
    if not is_distributed():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def all_reduce_mean(tensor: torch.Tensor) -> torch.Tensor:
    """Mean of ``tensor`` over ranks (a new tensor, no autograd); the tensor itself without torch.distributed."""
    if not is_distributed():
        return tensor
    out = tensor.detach().clone()
    dist.all_reduce(out)
    return out / dist.get_world_size()


def rank_slice(global_batch: int, rank: int | None = None, world_size: int | None = None) -> slice:
    """The rows of a global batch that ``rank`` processes; ``global_batch`` must divide evenly."""
    rank = get_rank() if rank is None else rank
    world_size = get_world_size() if world_size is None else world_size
    if global_batch % world_size:
        raise ValueError(f"global batch size {global_batch} must be divisible by the world size {world_size}")
    per = global_batch // world_size
    return slice(rank * per, (rank + 1) * per)


def unwrap_model(model: nn.Module) -> nn.Module:
    """The user's module inside DDP and/or ``torch.compile`` wrappers."""
    while True:
        if isinstance(model, nn.parallel.DistributedDataParallel):
            model = model.module
        elif hasattr(model, "_orig_mod") and isinstance(model._orig_mod, nn.Module):
            model = model._orig_mod
        else:
            return model


class _AllReduceSum(torch.autograd.Function):
    """Differentiable sum over ranks: the gradient of every rank's copy is the sum of the ranks' gradients."""

    @staticmethod
    def forward(ctx, tensor):
        out = tensor.clone()
        dist.all_reduce(out)
        return out

    @staticmethod
    def backward(ctx, grad):
        grad = grad.clone()
        dist.all_reduce(grad)
        return grad


class GlobalBatchNorm(_BatchNorm):
    """Batch-norm with statistics over the batch of ALL ranks, on any device (torch's SyncBatchNorm is CUDA-only).

    x: (B, C, *). Training mode under torch.distributed: two differentiable all-reduces (sum and count for the mean,
    then the sum of squared deviations), so the result and the gradients equal plain batch-norm on the concatenated
    batch. Otherwise it is :func:`torch.nn.functional.batch_norm`.
    """

    def _check_input_dim(self, input):
        if input.dim() < 2:
            raise ValueError(f"GlobalBatchNorm expects input of shape (B, C, *), got {tuple(input.shape)}")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self._check_input_dim(x)
        if not (self.training and is_distributed() and dist.get_world_size() > 1):
            return super().forward(x)
        all_reduce = _AllReduceSum.apply
        dims = [0] + list(range(2, x.dim()))
        shape = [1, -1] + [1] * (x.dim() - 2)
        xf = x if x.dtype == torch.float64 else x.float()  # statistics in at least float32
        local_n = xf.new_full((1,), x.numel() // max(x.shape[1], 1))
        sums = all_reduce(torch.cat([xf.sum(dims), local_n]))
        n = sums[-1]
        mean = sums[:-1] / n
        centered = xf - mean.view(shape)
        var = all_reduce(centered.pow(2).sum(dims)) / n
        y = centered * torch.rsqrt(var + self.eps).view(shape)
        if self.affine:
            y = y * self.weight.view(shape) + self.bias.view(shape)
        if self.track_running_stats:
            with torch.no_grad():
                self.num_batches_tracked.add_(1)
                momentum = 0.0 if self.momentum is None else self.momentum
                if self.momentum is None:
                    momentum = 1.0 / self.num_batches_tracked.float()
                unbiased = var * n / (n - 1).clamp_min(1)
                self.running_mean.lerp_(mean.to(self.running_mean.dtype), momentum)
                self.running_var.lerp_(unbiased.to(self.running_var.dtype), momentum)
        return y.to(x.dtype)


def convert_sync_batchnorm(module: nn.Module, device_type: str) -> nn.Module:
    """Replace every BatchNorm in ``module`` by one that normalises over the global batch (in place; returns it).

    CUDA: :class:`torch.nn.SyncBatchNorm`. Other devices: :class:`GlobalBatchNorm`.
    """
    if device_type == "cuda":
        return nn.SyncBatchNorm.convert_sync_batchnorm(module)
    return _convert_global(module)


def _convert_global(module: nn.Module) -> nn.Module:
    out = module
    if isinstance(module, _BatchNorm) and not isinstance(module, GlobalBatchNorm):
        out = GlobalBatchNorm(module.num_features, module.eps, module.momentum, module.affine,
                              module.track_running_stats)
        if module.affine:  # share the original parameters and buffers (already on their device)
            out.weight = module.weight
            out.bias = module.bias
        if module.track_running_stats:
            out.running_mean = module.running_mean
            out.running_var = module.running_var
            out.num_batches_tracked = module.num_batches_tracked
        out.training = module.training
    for name, child in module.named_children():
        out.add_module(name, _convert_global(child))
    return out


def wrap_model(model: nn.Module, info: DistInfo, *, sync_batchnorm: bool = True, **ddp_kwargs) -> nn.Module:
    """Wrap ``model`` (already on ``info.device``) in DistributedDataParallel when ``info.distributed``.

    With ``sync_batchnorm`` the batch-norms are first converted (:func:`convert_sync_batchnorm`). Returns the model
    unchanged in a single-process run. Parameters are broadcast from rank 0 by DDP, so every rank starts equal.
    """
    if not info.distributed:
        return model
    if sync_batchnorm:
        model = convert_sync_batchnorm(model, info.device.type)
    if info.device.type == "cuda":
        ddp_kwargs.setdefault("device_ids", [info.device.index])
        ddp_kwargs.setdefault("output_device", info.device.index)
    return nn.parallel.DistributedDataParallel(model, **ddp_kwargs)
