"""Atomic, checksummed checkpoints with everything needed for an exact resume, loaded without unpickling code.

A checkpoint file is a one-line header, ``FLOWGMM-CKPT 2 sha256=<64 hex digits>\n``, followed by a ``torch.save``
payload::

    {"format": 2,
     "model":  state dict of the flow (the whole model when it has no ``.flow``),
     "prior":  state dict of the Gaussian-mixture prior (``model.prior``; absent when there is none),
     "optimizers": {name: state dict}, "schedulers": {name: state dict},
     "step": optimizer steps taken, "epoch": epochs finished (float allowed),
     "rng": [per-rank RNG states (python, numpy, torch CPU, every CUDA device), as tensors and plain types],
     "extra": anything else the script needs (arguments, labeled split, best metric, ...): plain types only}

Loading (:func:`read_checkpoint`, :func:`load_checkpoint`) checks the SHA-256 of the payload against the header and
then reads it with ``torch.load(..., weights_only=True)``, which rebuilds tensors and plain containers only: a crafted
file cannot run code, and flipped bytes anywhere in the payload raise :class:`CheckpointError` instead of loading
(64 flipped bytes in Adam's ``exp_avg`` once resumed a run to a test NLL of 2.8e25). The payload may hold tensors,
None, bool, int, float, str, bytes and lists / tuples / dicts of them; :func:`save_checkpoint` rejects anything else
up front, naming where it is. Format-1 files (an unframed ``torch.save``, no checksum) are still read, weights-only,
with numpy's array reconstruction allow-listed for their RNG states.

Writes are atomic: the file is written to a temporary file ``.<name>.<random>.tmp`` in the same directory, flushed
and fsync'ed, then renamed over the target (``os.replace``), so a crash mid-write leaves the previous checkpoint intact;
:func:`remove_stale_temporaries` deletes the temporary files a killed writer left behind. Only rank 0 writes; with
``torch.distributed`` initialised the RNG states of all ranks are gathered first so every rank resumes its own random
stream.
"""

from __future__ import annotations

import hashlib
import io
import os
import random
import re
import tempfile
from collections import OrderedDict
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch

from . import distributed as dist_utils

__all__ = ["atomic_save", "atomic_write_bytes", "save_checkpoint", "load_checkpoint", "read_checkpoint",
           "checkpoint_payload", "serialize_checkpoint", "remove_stale_temporaries", "capture_rng_state",
           "restore_rng_state", "seed_everything", "CheckpointError"]

FORMAT_VERSION = 2
_MAGIC = b"FLOWGMM-CKPT "
_HEADER = re.compile(rb"FLOWGMM-CKPT (\d+) sha256=([0-9a-f]{64})\n")
_HEADER_MAX = 128


class CheckpointError(RuntimeError):
    """A checkpoint cannot be read, fails its integrity check, or does not fit the model/optimizers it is loaded
    into."""


def _temporary(path: Path) -> tuple[int, str]:
    return tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)


def _replace_durably(fd: int, tmp: str, path: Path, write) -> Path:
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
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


def atomic_save(obj: Any, path: str | os.PathLike) -> Path:
    """``torch.save(obj)`` to ``path`` atomically: temporary file in the same directory, fsync, ``os.replace``.

    On any failure the temporary file is removed and an existing file at ``path`` is left untouched.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = _temporary(path)
    return _replace_durably(fd, tmp, path, lambda f: torch.save(obj, f))


def atomic_write_bytes(data: bytes, path: str | os.PathLike) -> Path:
    """Write ``data`` to ``path`` atomically (as :func:`atomic_save`)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = _temporary(path)
    return _replace_durably(fd, tmp, path, lambda f: f.write(data))


def remove_stale_temporaries(path: str | os.PathLike) -> list[Path]:
    """Delete the temporary files ``.<name>.*.tmp`` that writers of ``path`` killed mid-write left in its folder
    (a finished write renames its file). Call it before writing, when no other process writes ``path``. Returns the
    files removed."""
    path = Path(path)
    if not path.parent.is_dir():
        return []
    prefix = f".{path.name}."
    removed = []
    for entry in path.parent.iterdir():
        if entry.name.startswith(prefix) and entry.name.endswith(".tmp") and entry.is_file() \
                and not entry.is_symlink():
            try:
                entry.unlink()
                removed.append(entry)
            except FileNotFoundError:
                pass
    return removed


def seed_everything(seed: int) -> None:
    """Seed python's ``random``, numpy's global RNG and torch (CPU and every CUDA device)."""
    if not isinstance(seed, int) or isinstance(seed, bool):
        raise TypeError(f"seed must be an int, got {type(seed).__name__}")
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def capture_rng_state() -> dict:
    """The global RNG states of this process -- python, numpy, torch CPU and (if initialised) every CUDA device -- as
    tensors and plain types (loadable with ``weights_only=True``)."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state = {"python": random.getstate(),
             "numpy": {"kind": str(kind), "keys": torch.from_numpy(np.asarray(keys, dtype=np.int64)), "pos": int(pos),
                       "has_gauss": int(has_gauss), "cached_gaussian": float(cached)},
             "torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _as_python_state(value):
    """random.setstate needs tuples; a payload may hold lists."""
    return tuple(_as_python_state(v) for v in value) if isinstance(value, (list, tuple)) else value


def restore_rng_state(state: Mapping) -> None:
    """Inverse of :func:`capture_rng_state` (also accepts the format-1 layout: numpy's own state tuple)."""
    random.setstate(_as_python_state(state["python"]))
    np_state = state["numpy"]
    if isinstance(np_state, Mapping):
        np_state = (np_state["kind"], np.asarray(np_state["keys"].cpu().numpy(), dtype=np.uint32), np_state["pos"],
                    np_state["has_gauss"], np_state["cached_gaussian"])
    np.random.set_state(np_state)
    torch.set_rng_state(state["torch"].cpu())
    if "cuda" in state and torch.cuda.is_available():
        cuda_states = state["cuda"]
        if len(cuda_states) != torch.cuda.device_count():
            raise CheckpointError(f"checkpoint holds RNG states of {len(cuda_states)} CUDA devices, "
                                  f"this process sees {torch.cuda.device_count()}")
        torch.cuda.set_rng_state_all([s.cpu() for s in cuda_states])


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


_PLAIN = (type(None), bool, int, float, str, bytes, torch.Tensor)


def _check_plain(obj, where: str) -> None:
    """Raise TypeError naming ``where`` if ``obj`` holds something ``torch.load(weights_only=True)`` cannot rebuild."""
    if isinstance(obj, _PLAIN):
        return
    if isinstance(obj, (list, tuple)):
        for i, v in enumerate(obj):
            _check_plain(v, f"{where}[{i}]")
        return
    if isinstance(obj, (dict, OrderedDict)):
        for k, v in obj.items():
            if not isinstance(k, (str, int)):
                raise TypeError(f"checkpoint content {where} has a key of type {type(k).__name__}; keys must be str "
                                f"or int")
            _check_plain(v, f"{where}[{k!r}]")
        return
    raise TypeError(f"checkpoint content {where} is a {type(obj).__name__}; a checkpoint holds only tensors, None, "
                    f"bool, int, float, str, bytes and lists / tuples / dicts of them (convert it, e.g. str(path))")


def checkpoint_payload(model: torch.nn.Module, *, step: int, epoch: float,
                       optimizers: Mapping[str, Any] | None = None, schedulers: Mapping[str, Any] | None = None,
                       extra: Mapping[str, Any] | None = None) -> dict | None:
    """The checkpoint dict of the module docstring for the current state (collective under ``torch.distributed``:
    the RNG states are gathered; None on ranks other than 0). Raises TypeError when ``extra`` (or a state dict)
    holds something a weights-only load cannot rebuild."""
    rng = dist_utils.all_gather_object(capture_rng_state())
    if not dist_utils.is_main_process():
        return None
    flow, prior = _parts(model)
    ckpt = {"format": FORMAT_VERSION, "model": flow.state_dict(), "step": int(step), "epoch": epoch,
            "optimizers": _state_dicts(optimizers, "optimizers"), "schedulers": _state_dicts(schedulers, "schedulers"),
            "rng": rng, "extra": dict(extra or {})}
    if prior is not None:
        ckpt["prior"] = prior.state_dict()
    _check_plain(ckpt, "checkpoint")
    return ckpt


def serialize_checkpoint(payload: Mapping) -> bytes:
    """The file bytes of a checkpoint: the header with the payload's SHA-256, then the ``torch.save`` payload."""
    buf = io.BytesIO()
    torch.save(dict(payload), buf)
    data = buf.getvalue()
    header = _MAGIC + f"{FORMAT_VERSION} sha256={hashlib.sha256(data).hexdigest()}\n".encode()
    return header + data


def save_checkpoint(path: str | os.PathLike, model: torch.nn.Module, *, step: int, epoch: float,
                    optimizers: Mapping[str, Any] | None = None, schedulers: Mapping[str, Any] | None = None,
                    extra: Mapping[str, Any] | None = None) -> Path | None:
    """Write a checkpoint atomically (see the module docstring for its content).

    Collective under ``torch.distributed``: every rank must call it (the RNG states are gathered); only rank 0
    writes. Returns the path written on rank 0, None on the other ranks.
    ``model`` may be wrapped in DDP / ``torch.compile``; ``optimizers``/``schedulers`` map names to objects with
    ``state_dict()`` (e.g. ``{"flow": adam, "gmm": adam_means}``; ``None`` values are skipped).
    """
    payload = checkpoint_payload(model, step=step, epoch=epoch, optimizers=optimizers, schedulers=schedulers,
                                 extra=extra)
    if payload is None:
        return None
    return atomic_write_bytes(serialize_checkpoint(payload), path)


def _numpy_state_globals() -> list:
    """What a format-1 checkpoint's numpy RNG state needs from numpy under ``weights_only`` (arrays, dtypes)."""
    core = getattr(np, "_core", None) or np.core
    return [core.multiarray._reconstruct, np.ndarray, np.dtype, type(np.dtype(np.uint32))]


def read_checkpoint(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> dict:
    """The payload dict of the checkpoint file ``path``, integrity-checked and loaded weights-only.

    Raises :class:`CheckpointError` when the file is missing, truncated, fails its SHA-256 check, or is not a
    flowgmm_fast checkpoint.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {str(path)!r} does not exist")
    data = path.read_bytes()
    if data.startswith(_MAGIC):
        m = _HEADER.match(data[:_HEADER_MAX])
        if m is None or int(m.group(1)) != FORMAT_VERSION:
            raise CheckpointError(f"checkpoint {str(path)!r} has a malformed header or an unknown format version "
                                  f"(this version reads format {FORMAT_VERSION})")
        payload = data[m.end():]
        if hashlib.sha256(payload).hexdigest() != m.group(2).decode():
            raise CheckpointError(f"checkpoint {str(path)!r} is corrupt: its content does not match the SHA-256 "
                                  f"written with it (a damaged or truncated file); resume from another checkpoint")
        globals_ = []
    else:  # format 1: a bare torch.save (no checksum)
        payload, globals_ = data, _numpy_state_globals()
    try:
        with torch.serialization.safe_globals(globals_):
            ckpt = torch.load(io.BytesIO(payload), map_location=map_location, weights_only=True)
    except Exception as exc:
        raise CheckpointError(f"checkpoint {str(path)!r} cannot be read as a weights-only checkpoint "
                              f"({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''})") from exc
    if not isinstance(ckpt, dict) or ckpt.get("format") not in (1, FORMAT_VERSION):
        raise CheckpointError(f"{str(path)!r} is not a flowgmm_fast checkpoint (format {FORMAT_VERSION})")
    return ckpt


def load_checkpoint(path: str | os.PathLike, model: torch.nn.Module, *,
                    optimizers: Mapping[str, Any] | None = None, schedulers: Mapping[str, Any] | None = None,
                    restore_rng: bool = True, map_location: str | torch.device = "cpu") -> dict:
    """Load a checkpoint written by :func:`save_checkpoint` into ``model``, ``optimizers`` and ``schedulers``.

    Restores this rank's RNG state when ``restore_rng`` (rank r takes entry r of the gathered states; a run resumed
    on a different number of ranks takes entry r modulo the saved count). Every rank calls it and reads the file.
    Returns ``{"step", "epoch", "extra"}``. Raises :class:`CheckpointError` naming what does not fit, and when the
    file fails its integrity check (see :func:`read_checkpoint`).
    """
    ckpt = read_checkpoint(path, map_location)
    path = Path(path)
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
            try:
                obj.load_state_dict(saved[name])
            except (ValueError, KeyError, RuntimeError) as exc:
                raise CheckpointError(f"checkpoint {str(path)!r}: {kind[:-1]} {name!r} does not fit ({exc})") from exc
    if restore_rng:
        states = ckpt["rng"]
        restore_rng_state(states[dist_utils.get_rank() % len(states)])
    return {"step": ckpt["step"], "epoch": ckpt["epoch"], "extra": ckpt["extra"]}
