"""Flow base class and composition.

Every flow layer maps ``(x, sldj) -> (y, sldj + log|det dy/dx|)`` and back:
``y, sldj = layer(x, sldj=None)`` and ``x, sldj = layer(y, sldj, reverse=True)``; ``layer.inverse(y)`` returns x.
sldj is (B,) float32 (float64 for float64 inputs) and starts at 0 when None.
"""

from __future__ import annotations

import torch
from torch import nn

from ..ops.reference import ldj_dtype


def zero_sldj(x: torch.Tensor, sldj: torch.Tensor | None) -> torch.Tensor:
    """``sldj`` or, when None, a (B,) zero log-det in the log-det dtype of x."""
    if sldj is not None:
        return sldj
    return torch.zeros(x.shape[0], dtype=ldj_dtype(x.dtype), device=x.device)


class Flow(nn.Module):
    """Base class of invertible layers: ``forward(x, sldj=None, reverse=False) -> (out, sldj)``."""

    def forward(self, x: torch.Tensor, sldj: torch.Tensor | None = None, reverse: bool = False):
        raise NotImplementedError(f"{type(self).__name__} must implement forward(x, sldj=None, reverse=False)")

    def inverse(self, z: torch.Tensor) -> torch.Tensor:
        """x = f^{-1}(z)."""
        return self(z, reverse=True)[0]


class FlowSequential(Flow):
    """Composition of flow layers; reverse runs them backwards through their inverses.

    ``invertible_backprop=True``: with grad enabled, the forward pass keeps no activations and the backward pass
    rebuilds each layer's input by inversion (:mod:`flowgmm_fast.nn.invertible`; ``checkpoint_every=N`` also keeps
    every N-th layer's exact input). Both are plain attributes: they can be switched between steps.
    """

    def __init__(self, *layers: Flow, invertible_backprop: bool = False, checkpoint_every: int | None = None):
        super().__init__()
        for i, layer in enumerate(layers):
            if not isinstance(layer, Flow):
                raise TypeError(f"FlowSequential: layer {i} must be a flowgmm_fast.nn.Flow, got {type(layer).__name__}")
        self.layers = nn.ModuleList(layers)
        from .invertible import check_options

        self.invertible_backprop, self.checkpoint_every = check_options(invertible_backprop, checkpoint_every)

    def forward(self, x, sldj=None, reverse=False):
        if self.invertible_backprop and not reverse and torch.is_grad_enabled():
            from .invertible import invertible_forward

            return invertible_forward(self, x, sldj, checkpoint_every=self.checkpoint_every)
        sldj = zero_sldj(x, sldj)
        for layer in (reversed(self.layers) if reverse else self.layers):
            x, sldj = layer(x, sldj, reverse)
        return x, sldj

    def __len__(self) -> int:
        return len(self.layers)

    def __getitem__(self, i):
        return self.layers[i]
