"""Parameter-free flow layers: the 2x2 squeeze and the logit preprocessing."""

from __future__ import annotations

import torch

from .. import functional as F
from ._checks import check_flow_input
from .base import Flow, zero_sldj


class Squeeze(Flow):
    """2x2 space-to-depth, (B, C, H, W) -> (B, 4C, H/2, W/2); a permutation, log-det 0.

    ``alt_order=True`` uses real-nvp's alternate channel order (see :func:`flowgmm_fast.functional.squeeze2x2`).
    """

    def __init__(self, alt_order: bool = False):
        super().__init__()
        self.alt_order = bool(alt_order)

    def forward(self, x, sldj=None, reverse=False):
        return F.squeeze2x2(x, reverse=reverse, alt_order=self.alt_order), zero_sldj(x, sldj)

    def extra_repr(self) -> str:
        return f"alt_order={self.alt_order}"


class Logit(Flow):
    """RealNVP's preprocessing y = logit(alpha + (1 - 2 alpha) u) with its exact log-det (fused in one pass).

    Dequantisation: with ``dequantize=True`` and the module in training mode, u = (255 x + noise) / 256 with fresh
    noise ~ U[0, 1) drawn here (x holds 8-bit values scaled to [0, 1]); otherwise u = x. So in eval mode the layer is
    a deterministic function of its input with sldj = log|det dy/dx| exactly; to evaluate bits/dim on dequantised data
    in eval mode, dequantise the inputs first (``flowgmm_fast.data.dequantize``). The log-det is taken w.r.t. u
    (the dequantised value), as in the original; bits/dim adds D log 256 for the 256 bins.
    """

    def __init__(self, alpha: float = 0.05, dequantize: bool = False):
        super().__init__()
        if isinstance(alpha, bool) or not isinstance(alpha, (int, float)):
            raise TypeError(f"alpha must be a number in [0, 0.5), got {type(alpha).__name__} {alpha!r}")
        if not 0 <= alpha < 0.5:
            raise ValueError(f"alpha must be in [0, 0.5), got {alpha!r}")
        self.alpha = float(alpha)
        self.dequantize = bool(dequantize)

    def forward(self, x, sldj=None, reverse=False):
        check_flow_input(x, self)  # before rand_like: uint8 images would fail inside it
        if reverse:
            return F.logit_transform(x, self.alpha, reverse=True, sldj=sldj)
        noise = torch.rand_like(x) if (self.dequantize and self.training) else None
        return F.logit_transform(x, self.alpha, reverse=False, sldj=sldj, noise=noise)

    def extra_repr(self) -> str:
        return f"alpha={self.alpha}, dequantize={self.dequantize}"
