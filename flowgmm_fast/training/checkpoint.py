"""Atomic checkpoints with everything needed for an exact resume.

A checkpoint is one ``torch.save`` file holding::

    {"format": 1,
     "model":  state dict of the flow (the whole model when it has no ``.flow``),
     "prior":  state dict of the Gaussian-mixture prior (``model.prior``; absent when there is none),
     "optimizers": {name: state dict}, "schedulers": {name: state dict},
     "step": optimizer steps taken, "epoch": epochs finished (float allowed),
     "rng": [per-rank RNG states (python, numpy, torch CPU, every CUDA device)],
     "extra": anything else the script needs (sampler position, arguments, best metric, ...)}

Writes are atomic: the file is written to a temporary file in the same directory, flushed and fsync'ed, then renamed
over the target (``os.replace``), so a crash mid-write leaves the previous checkpoint intact. Only rank 0 writes;
with ``torch.distributed`` initialised the RNG states of all ranks are gathered first so every rank resumes its own
random stream.
"""

from __future__ import annotations

import os
import random
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch

from . import distributed as dist_utils

__all__ = ["atomic_save", "save_checkpoint", "load_checkpoint", "capture_rng_state", "restore_rng_state",
           "seed_everything", "CheckpointError"]

FORMAT_VERSION = 1


class CheckpointError(RuntimeError):
    """A checkpoint cannot be read or does not fit the model/optimizers it is loaded into."""


def atomic_save(obj: Any, path: str | os.PathLike) -> Path:
    """``torch.save(obj)`` to ``path`` atomically: temporary file in the same directory, fsync, ``os.replace``.

    On any failure the temporary file is removed and an existing file at ``path`` is left untouched.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    try:  # make the rename itself durable; not possible on every platform
        dir_fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    except OSError:
        pass
    return path


def seed_everything(seed: int) -> None:
    """Seed python's ``random``, numpy's global RNG and torch (CPU and every CUDA device)."""
    if not isinstance(seed, int) or isinstance(seed, bool):
        raise TypeError(f"seed must be an int, got {type(seed).__name__}")
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def capture_rng_state() -> dict:
    """The global RNG states of this process: python, numpy, torch CPU and (if initialised) every CUDA device."""
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: Mapping) -> None:
    """Inverse of :func:`capture_rng_state`."""
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"].cpu())
    if "cuda" in state and torch.cuda.is_available():
        cuda_states = state["cuda"]
        if len(cuda_states) != torch.cuda.device_count():
            raise CheckpointError(f"checkpoint holds RNG states of {len(cuda_states)} CUDA devices, "
                                  f"this process sees {torch.cuda.device_count()}")
        torch.cuda.set_rng_state_all(cuda_states)


def _parts(model: torch.nn.Module) -> tuple[torch.nn.Module, torch.nn.Module | None]:
    model = dist_utils.unwrap_model(model)
    flow = getattr(model, "flow", None)
    prior = getattr(model, "prior", None)
    if isinstance(flow, torch.nn.Module) and isinstance(prior, torch.nn.Module):
        return flow, prior
    return model, None


def _state_dicts(objs: Mapping[str, Any] | None, kind: str) -> dict:
    out = {}
    for name, obj in (objs or {}).items():
        if obj is None:
            continue
        if not hasattr(obj, "state_dict"):
            raise TypeError(f"{kind}[{name!r}] must have state_dict()/load_state_dict(), got {type(obj).__name__}")
        out[name] = obj.state_dict()
    return out


def save_checkpoint(path: str | os.PathLike, model: torch.nn.Module, *, step: int, epoch: float,
                    optimizers: Mapping[str, Any] | None = None, schedulers: Mapping[str, Any] | None = None,
                    extra: Mapping[str, Any] | None = None) -> Path | None:
    """Write a checkpoint atomically (see the module docstring for its content).

    Collective under ``torch.distributed``: every rank must call it (the RNG states are gathered); only rank 0
    writes. Returns the path written on rank 0, None on the other ranks.
    ``model`` may be wrapped in DDP / ``torch.compile``; ``optimizers``/``schedulers`` map names to objects with
    ``state_dict()`` (e.g. ``{"flow": adam, "gmm": adam_means}``; ``None`` values are skipped).
    """
    rng = dist_utils.all_gather_object(capture_rng_state())
    if not dist_utils.is_main_process():
        return None
    flow, prior = _parts(model)
    ckpt = {"format": FORMAT_VERSION, "model": flow.state_dict(), "step": int(step), "epoch": epoch,
            "optimizers": _state_dicts(optimizers, "optimizers"), "schedulers": _state_dicts(schedulers, "schedulers"),
            "rng": rng, "extra": dict(extra or {})}
    if prior is not None:
        ckpt["prior"] = prior.state_dict()
    return atomic_save(ckpt, path)


def load_checkpoint(path: str | os.PathLike, model: torch.nn.Module, *,
                    optimizers: Mapping[str, Any] | None = None, schedulers: Mapping[str, Any] | None = None,
                    restore_rng: bool = True, map_location: str | torch.device = "cpu") -> dict:
    """Load a checkpoint written by :func:`save_checkpoint` into ``model``, ``optimizers`` and ``schedulers``.

    Restores this rank's RNG state when ``restore_rng`` (rank r takes entry r of the gathered states; a run resumed
    on a different number of ranks takes entry r modulo the saved count). Every rank calls it and reads the file.
    Returns ``{"step", "epoch", "extra"}``. Raises :class:`CheckpointError` naming what does not fit.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {str(path)!r} does not exist")
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=False)
    except Exception as exc:
        raise CheckpointError(f"checkpoint {str(path)!r} cannot be read ({type(exc).__name__}: {exc})") from exc
    if not isinstance(ckpt, dict) or ckpt.get("format") != FORMAT_VERSION:
        raise CheckpointError(f"{str(path)!r} is not a flowgmm_fast checkpoint (format {FORMAT_VERSION})")
    flow, prior = _parts(model)
    try:
        flow.load_state_dict(ckpt["model"])
        if prior is not None:
            if "prior" not in ckpt:
                raise CheckpointError(f"checkpoint {str(path)!r} has no prior state but the model has a prior")
            prior.load_state_dict(ckpt["prior"])
    except RuntimeError as exc:
        if isinstance(exc, CheckpointError):
            raise
        raise CheckpointError(f"checkpoint {str(path)!r} does not fit the model: {exc}") from exc
    for kind, objs in (("optimizers", optimizers), ("schedulers", schedulers)):
        saved = ckpt[kind]
        for name, obj in (objs or {}).items():
            if obj is None:
                continue
            if name not in saved:
                raise CheckpointError(f"checkpoint {str(path)!r} has no {kind[:-1]} {name!r} "
                                      f"(it holds {sorted(saved)})")
            obj.load_state_dict(saved[name])
    if restore_rng:
        states = ckpt["rng"]
        restore_rng_state(states[dist_utils.get_rank() % len(states)])
    return {"step": ckpt["step"], "epoch": ckpt["epoch"], "extra": ckpt["extra"]}
