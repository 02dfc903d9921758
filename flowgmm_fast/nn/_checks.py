"""Argument checks shared by the layers, flows and the model: a wrong argument raises ``TypeError`` / ``ValueError``
naming it, before it reaches a PyTorch op with a message about something else (``randn`` for a float class count,
"mixed dtype (CPU)" for a float64 input to a float32 model, ``check_uniform_bounds`` for uint8 images)."""

from __future__ import annotations

import numbers

import torch
from torch import nn


def check_int(name: str, value, minimum: int | None = None) -> int:
    """``value`` as an int (a Python / NumPy integer, not a bool), at least ``minimum`` when given."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an int, got {type(value).__name__} {value!r}")
    value = int(value)
    if minimum is not None and value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    return value


def check_flow_input(x, module: nn.Module, name: str = "x") -> None:
    """``x`` is a floating tensor with the dtype of ``module``'s floating parameters (if it has any)."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if not x.is_floating_point():
        hint = (" (8-bit images: dequantise them first, e.g. flowgmm_fast.data.dequantize(x), or x.float() / 255)"
                if x.dtype == torch.uint8 else "")
        raise TypeError(f"{name} must be a floating tensor, got {x.dtype}{hint}")
    dtype = next((p.dtype for p in module.parameters() if p.is_floating_point()), None)
    if dtype is not None and x.dtype != dtype and not torch.is_autocast_enabled(x.device.type):
        raise TypeError(f"{name} has dtype {x.dtype} but {type(module).__name__}'s parameters are {dtype}: convert "
                        f"one to the other ({name}.to({dtype}) or module.to({x.dtype}))")
