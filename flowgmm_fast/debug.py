"""Opt-in debug checks (off by default: each check is a host-device sync).

The original FlowGMM ran anomaly detection and an ``isnan().any()`` in every coupling layer on every step, a host
sync per layer. Here nothing on the hot path syncs; turn the checks on while hunting a NaN:

    flowgmm_fast.debug.enable()            # or FLOWGMM_FAST_DEBUG=1 in the environment

Then every op of :mod:`flowgmm_fast.functional` (affine_coupling, squeeze2x2, logit_transform, gmm_log_prob,
gmm_nll) checks that its floating inputs and outputs are finite, naming the op and the tensor; GMM labels are
range-checked on CUDA too (on the CPU they always are), and masks are checked for 0/1 values on every call rather
than once per mask tensor. Not inside torch.compile (a data-dependent check would break the graph).
"""

from __future__ import annotations

import os

import torch

_enabled = os.environ.get("FLOWGMM_FAST_DEBUG", "0") == "1"


def enable(flag: bool = True) -> None:
    """Turn the debug checks on (or off with ``flag=False``)."""
    global _enabled
    _enabled = bool(flag)


def enabled() -> bool:
    return _enabled


class NonFiniteError(FloatingPointError):
    """A debug check found NaN or infinity; the message names the tensor."""


def check_finite(name: str, tensor: torch.Tensor) -> None:
    """Raise :class:`NonFiniteError` naming ``name`` if ``tensor`` holds NaN or infinity (a host sync)."""
    if not bool(torch.isfinite(tensor).all()):
        bad = int((~torch.isfinite(tensor)).sum())
        raise NonFiniteError(f"{name} has {bad} non-finite value(s) (shape {tuple(tensor.shape)})")
