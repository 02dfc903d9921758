"""The affine coupling layer (RealNVP), built on the fused :func:`flowgmm_fast.functional.affine_coupling`."""

from __future__ import annotations

import torch
from torch import nn
from torch.nn.utils.parametrizations import weight_norm

from .. import functional as F
from ..ops.reference import checkerboard_mask
from .base import Flow
from .st_nets import MLPST, ResNetST

MASK_TYPES = ("checkerboard", "channel", "half")


class Rescale(nn.Module):
    """Per-channel learnable scale (initialised to 1); weight-normalised by :class:`AffineCoupling`.

    The weight is stored as (C, 1), not (C,): Inductor (torch 2.14) normalises a 1-D weight-norm parameter over the
    whole vector instead of per element, so a compiled model would compute a different scale. ``scale`` is (C,).
    """

    def __init__(self, channels: int):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(channels, 1))

    @property
    def scale(self) -> torch.Tensor:
        return self.weight.reshape(-1)

    def forward(self, x):
        return self.scale * x


class AffineCoupling(Flow):
    """Affine coupling: y = b x + (1 - b)(x + t) exp(scale * tanh(s)), with (s, t) = st_net(conditioning part).

    mask_type:
      ``"checkerboard"``  x: (B, C, H, W); b is a checkerboard of parity ``int(reverse_mask)`` computed from indices;
                          the s/t net sees x * b and returns 2C channels.
      ``"channel"``       x: (B, C, H, W), C even; one half of the channels conditions the other (which half
                          alternates with ``reverse_mask``); the s/t net returns 2 * (C/2) channels.
      ``"half"``          x: (B, D) vectors; b = 1 on the first D//2 features (the last ones with ``reverse_mask``);
                          the s/t net sees x * b and returns 2D features.
    st_net: None for the default (``ResNetST`` for images, ``MLPST`` for vectors) or any module mapping the
    conditioning input to 2x the transformed channels on dim 1 (s first, then t), so the fast layer drops into a
    flow of the user's own. The per-channel scale is weight-normalised (its gain gets weight decay in training).
    The coupling itself (tanh, scale, mask, exp, log-det) is one fused op on the triton and native backends.
    """

    def __init__(self, channels: int, mask_type: str = "checkerboard", reverse_mask: bool = False,
                 st_net: nn.Module | None = None, *, mid_channels: int = 64, num_blocks: int = 8,
                 hidden_dim: int = 256, num_layers: int = 1, dropout: float = 0.0):
        super().__init__()
        if mask_type not in MASK_TYPES:
            raise ValueError(f"mask_type must be one of {MASK_TYPES}, got {mask_type!r}")
        if not isinstance(channels, int) or channels < 1:
            raise ValueError(f"channels must be a positive int, got {channels!r}")
        if mask_type == "channel" and channels % 2:
            raise ValueError(f"mask_type='channel' needs an even number of channels, got {channels}")
        self.channels = channels
        self.mask_type = mask_type
        self.reverse_mask = bool(reverse_mask)
        n_cond = channels // 2 if mask_type == "channel" else channels
        n_out = channels // 2 if mask_type == "channel" else channels
        if st_net is None:
            if mask_type == "half":
                st_net = MLPST(channels, hidden_dim, 2 * n_out, num_layers, dropout)
            else:
                st_net = ResNetST(n_cond, mid_channels, 2 * n_out, num_blocks,
                                  double_after_norm=mask_type == "checkerboard")
        self.st_net = st_net
        self.rescale = weight_norm(Rescale(n_out))
        if mask_type == "half":
            keep = (torch.arange(channels) < channels // 2).float()
            self.register_buffer("mask", 1 - keep if reverse_mask else keep, persistent=False)

    def st_joint(self, cond: torch.Tensor) -> torch.Tensor:
        """The s/t net's output for the conditioning input (:meth:`conditioning`): (B, 2 * transformed channels, ...),
        s then t on dim 1. :meth:`couple` takes it whole (``t=None``), so its gradient comes back as one tensor."""
        n_out = self.channels // 2 if self.mask_type == "channel" else self.channels
        st = self.st_net(cond)
        if st.shape[1] != 2 * n_out:
            raise ValueError(f"st_net must return {2 * n_out} channels (s and t for {n_out}) on dim 1, "
                             f"got shape {tuple(st.shape)}")
        # under autocast the s/t net runs in bf16/fp16; the coupling itself stays in the flow's dtype
        return st.to(cond.dtype)

    def st(self, cond: torch.Tensor):
        """(s, t) from the conditioning input (:meth:`conditioning`), each (B, transformed channels, ...): the two
        halves (views) of :meth:`st_joint`."""
        return self.st_joint(cond).chunk(2, dim=1)

    def conditioning(self, x: torch.Tensor) -> torch.Tensor:
        """The s/t net's input: x * b (checkerboard, half) or the conditioning half of the channels. It reads only
        the positions the coupling keeps, so it is the same for x and for the coupling's output."""
        if self.mask_type == "checkerboard":
            return x * checkerboard_mask(x.shape[-2], x.shape[-1], int(self.reverse_mask), x.dtype, x.device)
        if self.mask_type == "half":
            return x * self.mask.to(x.dtype)
        return x.chunk(2, dim=1)[0 if self.reverse_mask else 1]

    def couple(self, x: torch.Tensor, s: torch.Tensor, t: torch.Tensor | None = None, reverse: bool = False,
               sldj: torch.Tensor | None = None):
        """The fused coupling of x with given (s, t) (:meth:`st`), or with t None and s the joint s/t tensor
        (:meth:`st_joint`): ``(y, sldj)`` (``reverse``: the inverse)."""
        scale = self.rescale.scale
        if self.mask_type == "checkerboard":
            return F.affine_coupling(x, s, t, scale, F.checkerboard(int(self.reverse_mask)), reverse, sldj)
        if self.mask_type == "half":
            return F.affine_coupling(x, s, t, scale, self.mask, reverse, sldj)  # the buffer: its values checked once
        return self._couple_halves(x.chunk(2, dim=1), s, t, reverse, sldj)

    def _couple_halves(self, halves, s, t, reverse, sldj):
        """The channel coupling of x given as its two halves (``x.chunk(2, 1)``, views the kernels read in place)."""
        x_id, x_change = halves if self.reverse_mask else halves[::-1]
        y_change, sldj = F.affine_coupling(x_change, s, t, self.rescale.scale, None, reverse, sldj)
        return torch.cat((x_id, y_change) if self.reverse_mask else (y_change, x_id), dim=1), sldj

    def forward(self, x, sldj=None, reverse=False):
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
        dims = 2 if self.mask_type == "half" else 4
        if x.dim() != dims or x.shape[1] != self.channels:
            layout = f"(B, {self.channels})" if dims == 2 else f"(B, {self.channels}, H, W)"
            raise ValueError(f"AffineCoupling({self.channels}, {self.mask_type!r}) expects x of shape {layout}, "
                             f"got {tuple(x.shape)}")
        if self.mask_type == "channel":
            # one chunk of x for the conditioning half and the coupling: chunk's backward then joins the two halves'
            # gradients once (two chunks would each concatenate a full-size gradient, one of them half zeros)
            halves = x.chunk(2, dim=1)
            st = self.st_joint(halves[0 if self.reverse_mask else 1])
            return self._couple_halves(halves, st, None, reverse, sldj)
        return self.couple(x, self.st_joint(self.conditioning(x)), None, reverse, sldj)

    def extra_repr(self) -> str:
        return f"channels={self.channels}, mask_type={self.mask_type!r}, reverse_mask={self.reverse_mask}"
