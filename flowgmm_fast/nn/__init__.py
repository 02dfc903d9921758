"""Flow layers, flows and the prior, all built on :mod:`flowgmm_fast.functional` (so the backend switch applies).

Layers: :class:`AffineCoupling`, :class:`Squeeze`, :class:`Logit`; composition :class:`FlowSequential`;
flows :class:`RealNVP` (images), :class:`RealNVPTabular` (vectors); prior :class:`GaussianMixture`;
s/t networks :class:`ResNetST`, :class:`MLPST`; backprop by inversion (``invertible_backprop=True`` on the flows):
:func:`invertible_forward`, :class:`DriftProbe` (:mod:`flowgmm_fast.nn.invertible`).
"""

from torch import nn as _nn

from .base import Flow, FlowSequential, zero_sldj
from .coupling import AffineCoupling, Rescale
from .gmm import GaussianMixture, init_means
from .invertible import DriftProbe, invertible_forward
from .layers import Logit, Squeeze
from .realnvp import RealNVP, RealNVPTabular
from .st_nets import MLPST, ResNetST


def weight_norm_gains(module: _nn.Module) -> list[_nn.Parameter]:
    """The weight-norm gain parameters g of ``module`` (the original applies weight decay to these only)."""
    return [p for name, p in module.named_parameters() if name.endswith("parametrizations.weight.original0")]


__all__ = ["Flow", "FlowSequential", "AffineCoupling", "Rescale", "Squeeze", "Logit", "RealNVP", "RealNVPTabular",
           "GaussianMixture", "init_means", "ResNetST", "MLPST", "weight_norm_gains", "zero_sldj", "invertible_forward",
           "DriftProbe"]
