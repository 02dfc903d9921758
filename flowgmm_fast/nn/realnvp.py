"""RealNVP flows: the multi-scale image flow and the tabular flow of FlowGMM (REFERENCE.md)."""

from __future__ import annotations

import torch
from torch import nn

from .. import functional as F
from ._checks import check_flow_input, check_int
from .base import Flow, FlowSequential, zero_sldj
from .coupling import AffineCoupling
from .invertible import (CouplingStep, FactorOutStep, MergeStep, SqueezeStep, check_options, invertible_forward,
                         steps_of)
from .layers import Logit


class _Scale(Flow):
    """One scale: 3 checkerboard couplings; then, except at the last scale (which has 4 checkerboard couplings),
    squeeze -> 3 channel-wise couplings (4C channels, 2x mid channels) -> unsqueeze, and a squeeze in the alternate
    order whose first half of channels goes on to the next scale (C doubles) while the other half is factored out."""

    def __init__(self, scale_idx: int, num_scales: int, channels: int, mid_channels: int, num_blocks: int):
        super().__init__()
        self.is_last = scale_idx == num_scales - 1
        n_in = 4 if self.is_last else 3
        self.in_couplings = nn.ModuleList(
            AffineCoupling(channels, "checkerboard", reverse_mask=bool(i % 2), mid_channels=mid_channels,
                           num_blocks=num_blocks) for i in range(n_in))
        if not self.is_last:
            self.out_couplings = nn.ModuleList(
                AffineCoupling(4 * channels, "channel", reverse_mask=bool(i % 2), mid_channels=2 * mid_channels,
                               num_blocks=num_blocks) for i in range(3))
            self.next = _Scale(scale_idx + 1, num_scales, 2 * channels, 2 * mid_channels, num_blocks)

    def forward(self, x, sldj=None, reverse=False):
        sldj = zero_sldj(x, sldj)
        if not reverse:
            for coupling in self.in_couplings:
                x, sldj = coupling(x, sldj)
            if self.is_last:
                return x, sldj
            x = F.squeeze2x2(x)
            for coupling in self.out_couplings:
                x, sldj = coupling(x, sldj)
            x = F.squeeze2x2(x, reverse=True)
            x = F.squeeze2x2(x, alt_order=True)
            x_next, x_out = x.chunk(2, dim=1)
            x_next, sldj = self.next(x_next, sldj)
            x = F.squeeze2x2(torch.cat((x_next, x_out), dim=1), reverse=True, alt_order=True)
            return x, sldj
        if not self.is_last:
            x = F.squeeze2x2(x, alt_order=True)
            x_next, x_out = x.chunk(2, dim=1)
            x_next, sldj = self.next(x_next, sldj, reverse=True)
            x = F.squeeze2x2(torch.cat((x_next, x_out), dim=1), reverse=True, alt_order=True)
            x = F.squeeze2x2(x)
            for coupling in reversed(self.out_couplings):
                x, sldj = coupling(x, sldj, reverse=True)
            x = F.squeeze2x2(x, reverse=True)
        for coupling in reversed(self.in_couplings):
            x, sldj = coupling(x, sldj, reverse=True)
        return x, sldj

    def invertible_steps(self):
        """forward() as a flat list of steps for backprop by inversion (:mod:`flowgmm_fast.nn.invertible`)."""
        steps = [CouplingStep(c) for c in self.in_couplings]
        if self.is_last:
            return steps
        steps += [SqueezeStep(), *(CouplingStep(c) for c in self.out_couplings), SqueezeStep(reverse=True)]
        return steps + [FactorOutStep(), *self.next.invertible_steps(), MergeStep()]


class RealNVP(Flow):
    """Multi-scale RealNVP for images (Dinh et al. 2017; the FlowGMM image flow).

    x: (B, C, H, W) in [0, 1] -> z: (B, C, H, W) (flatten for the prior: D = C H W); H and W divisible by
    2^(num_scales - 1). A :class:`Logit` preprocessing layer (``alpha``; dequantisation noise in training mode when
    ``dequantize``) comes first unless ``logit=False``. Defaults are the paper's: num_scales 2, mid 64, 8 blocks.
    ``invertible_backprop=True``: backprop by inversion, activation memory independent of the depth
    (:mod:`flowgmm_fast.nn.invertible`; ``checkpoint_every=N`` also keeps every N-th coupling's exact input).
    """

    def __init__(self, in_channels: int = 1, num_scales: int = 2, mid_channels: int = 64, num_blocks: int = 8, *,
                 alpha: float = 0.05, dequantize: bool = True, logit: bool = True, invertible_backprop: bool = False,
                 checkpoint_every: int | None = None):
        super().__init__()
        self.invertible_backprop, self.checkpoint_every = check_options(invertible_backprop, checkpoint_every)
        in_channels, num_scales = check_int("in_channels", in_channels, 1), check_int("num_scales", num_scales, 1)
        mid_channels, num_blocks = check_int("mid_channels", mid_channels, 1), check_int("num_blocks", num_blocks, 0)
        self.in_channels = in_channels
        self.num_scales = num_scales
        self.preprocess = Logit(alpha, dequantize) if logit else None
        self.body = _Scale(0, num_scales, in_channels, mid_channels, num_blocks)

    def forward(self, x, sldj=None, reverse=False):
        check_flow_input(x, self)
        if x.dim() != 4 or x.shape[1] != self.in_channels:
            raise ValueError(f"RealNVP expects x of shape (B, {self.in_channels}, H, W), got {tuple(x.shape)}")
        side = 2 ** (self.num_scales - 1)
        if x.shape[2] % side or x.shape[3] % side:
            raise ValueError(f"RealNVP with num_scales={self.num_scales} needs x with H and W divisible by {side}, "
                             f"got {tuple(x.shape[2:])}")
        if reverse:
            x, sldj = self.body(x, sldj, reverse=True)
            if self.preprocess is not None:
                x, sldj = self.preprocess(x, sldj, reverse=True)
            return x, sldj
        if self.invertible_backprop and torch.is_grad_enabled():
            return invertible_forward(self, x, sldj, checkpoint_every=self.checkpoint_every)
        if self.preprocess is not None:
            x, sldj = self.preprocess(x, sldj)
        return self.body(x, sldj)

    def invertible_steps(self):
        """forward() as a flat list of steps for backprop by inversion: the logit layer, then the scales."""
        return (steps_of(self.preprocess) if self.preprocess is not None else []) + self.body.invertible_steps()


class RealNVPTabular(FlowSequential):
    """RealNVP for feature vectors: ``num_coupling_layers`` couplings with alternating half/half masks, each s/t net
    an MLP Linear(D, k) - ReLU - Dropout - [Linear(k, k) - ReLU] x num_layers - Linear(k, 2D).

    x: (B, dim) -> z: (B, dim). REFERENCE.md settings: text k=1024 with 7 couplings, UCI k=256 with 10, 2-D k=512 with 5.
    ``invertible_backprop`` / ``checkpoint_every``: as in :class:`FlowSequential` (backprop by inversion).
    """

    def __init__(self, dim: int, num_coupling_layers: int = 6, hidden_dim: int = 256, num_layers: int = 1,
                 dropout: float = 0.5, *, invertible_backprop: bool = False, checkpoint_every: int | None = None):
        if check_int("dim", dim) < 2:
            raise ValueError(f"RealNVPTabular needs dim >= 2 (half of the features condition the rest), got {dim}")
        check_int("num_coupling_layers", num_coupling_layers, 1)
        check_int("hidden_dim", hidden_dim, 1)
        check_int("num_layers", num_layers, 0)
        super().__init__(*[
            AffineCoupling(dim, "half", reverse_mask=bool(i % 2), hidden_dim=hidden_dim, num_layers=num_layers,
                           dropout=dropout) for i in range(num_coupling_layers)],
            invertible_backprop=invertible_backprop, checkpoint_every=checkpoint_every)
        self.dim = dim
        self.event_shape = (dim,)

    def forward(self, x, sldj=None, reverse=False):
        check_flow_input(x, self)
        if x.dim() != 2 or x.shape[1] != self.dim:
            raise ValueError(f"RealNVPTabular expects x of shape (B, {self.dim}), got {tuple(x.shape)}")
        return super().forward(x, sldj, reverse)
