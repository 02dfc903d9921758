"""FlowGMM: an invertible flow with a Gaussian-mixture prior in its latent space (Izmailov et al., ICML 2020).

log p(x)      = log p(f(x)) + log|det df/dx|                           (exact likelihood)
unlabeled x:  log p(f(x)) = logsumexp_k [log N(f(x); mu_k, Sigma_k) + log pi_k]
labeled (x,y): label_weight * log N(f(x); mu_y, Sigma_y)               (the original's convention, no log pi_y)
prediction:   argmax_k of the class logits log N(f(x); mu_k, Sigma_k) + log pi_k
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
from torch import nn

from .nn._checks import check_int
from .nn.gmm import GaussianMixture


class FlowGMMOutput(NamedTuple):
    nll: torch.Tensor     # (B,) per-sample negative log-likelihood (prior NLL - log-det)
    logits: torch.Tensor  # (B, K) class logits
    z: torch.Tensor       # (B, D) flattened latent
    sldj: torch.Tensor    # (B,) log|det df/dx|


class FlowGMM(nn.Module):
    """A flow ``f`` (``z, sldj = flow(x)``, ``x = flow.inverse(z)``) with a :class:`GaussianMixture` prior.

    ``model(x, labels=None, label_weight=1.)`` runs the flow once and the fused prior once, returning
    :class:`FlowGMMOutput` -- everything a training step needs (loss = ``out.nll.mean()``, accuracy from
    ``out.logits``). ``event_shape`` (e.g. (C, H, W)) is needed only by :meth:`sample` for flows that don't define
    ``flow.event_shape`` (RealNVPTabular does).
    """

    def __init__(self, flow: nn.Module, prior: GaussianMixture, event_shape: tuple[int, ...] | None = None):
        super().__init__()
        if not isinstance(flow, nn.Module):
            raise TypeError(f"flow must be an nn.Module mapping x to (z, sldj), got {type(flow).__name__}")
        if not isinstance(prior, GaussianMixture):
            raise TypeError(f"prior must be a flowgmm_fast.nn.GaussianMixture, got {type(prior).__name__}")
        self.flow = flow
        self.prior = prior
        if event_shape is not None:
            event_shape = tuple(check_int("event_shape entries", n, 1) for n in event_shape)
            if math.prod(event_shape) != prior.dim:
                raise ValueError(f"event_shape {event_shape} holds {math.prod(event_shape)} values but the prior has "
                                 f"dim={prior.dim}")
        self.event_shape = event_shape if event_shape is not None else getattr(flow, "event_shape", None)

    def encode(self, x: torch.Tensor):
        """(z (B, D), sldj (B,)) with z = f(x) flattened."""
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
        z, sldj = self.flow(x)
        z = z.reshape(z.shape[0], -1)
        if z.shape[1] != self.prior.dim:
            raise ValueError(f"the flow's latent has {z.shape[1]} dims but the prior has dim={self.prior.dim}")
        return z, sldj

    def forward(self, x, labels=None, label_weight: float = 1.0) -> FlowGMMOutput:
        z, sldj = self.encode(x)
        prior_nll, logits = self.prior.nll(z, labels, label_weight, return_logits=True)
        return FlowGMMOutput(prior_nll - sldj.to(prior_nll.dtype), logits, z, sldj)

    def log_prob(self, x, labels=None, label_weight: float = 1.0) -> torch.Tensor:
        """(B,) log p(x) (labeled rows: label_weight * log N(f(x); mu_y) + log-det)."""
        z, sldj = self.encode(x)
        prior_nll = self.prior.nll(z, labels, label_weight)
        return sldj.to(prior_nll.dtype) - prior_nll

    def nll(self, x, labels=None, label_weight: float = 1.0) -> torch.Tensor:
        """(B,) -log p(x)."""
        return -self.log_prob(x, labels, label_weight)

    def bits_per_dim(self, x, num_bins: int = 256) -> torch.Tensor:
        """(B,) bits/dim of dequantised 8-bit data: (nll + D ln num_bins) / (D ln 2), D = numel of one sample."""
        num_bins = check_int("num_bins", num_bins, 2)
        if not isinstance(x, torch.Tensor) or x.dim() < 1:
            raise TypeError(f"x must be a batched torch.Tensor, got {type(x).__name__}")
        d = math.prod(x.shape[1:])
        return (self.nll(x) + d * math.log(num_bins)) / (d * math.log(2))

    def class_logits(self, x) -> torch.Tensor:
        """(B, K) log N(f(x); mu_k, Sigma_k) + log pi_k."""
        z, _ = self.encode(x)
        return self.prior.class_logits(z)

    def predict_proba(self, x) -> torch.Tensor:
        """(B, K) class posterior p(y = k | x)."""
        return torch.softmax(self.class_logits(x), dim=1)

    def predict(self, x) -> torch.Tensor:
        """(B,) most probable class."""
        return self.class_logits(x).argmax(dim=1)

    @torch.no_grad()
    def sample(self, n: int, class_id: int | None = None, generator: torch.Generator | None = None) -> torch.Tensor:
        """n samples x = f^{-1}(z), z from the mixture (or from component ``class_id``)."""
        n = check_int("n", n, 0)
        if self.event_shape is None:
            raise ValueError("FlowGMM.sample needs the data shape: pass event_shape=(C, H, W) to FlowGMM for an "
                             "image flow")
        z = self.prior.sample(n, class_id, generator)
        return self.flow.inverse(z.reshape(n, *self.event_shape))
