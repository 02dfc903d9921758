"""The Gaussian-mixture latent prior of FlowGMM: one component per class."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F_
from torch import nn

from .. import functional as F
from ._checks import check_int

COVARIANCES = ("isotropic", "diagonal")


def _softplus_inverse(value: float) -> float:
    return value + math.log(-math.expm1(-value))


def init_means(num_classes: int, dim: int, kind: str = "random", r: float = 1.0,
               generator: torch.Generator | None = None) -> torch.Tensor:
    """Initial component means (K, D) as in the original (REFERENCE.md).

    ``"random"``  (images): mu_k ~ N(0, r^2 I).
    ``"tabular"``: 2 classes: mu_1 = -mu_0 with |mu_0| = 3.75 (a random direction); more classes: N(0, 0.56^2 I).
    """
    if kind == "random":
        return r * torch.randn(num_classes, dim, generator=generator)
    if kind == "tabular":
        if num_classes == 2:
            direction = torch.randn(dim, generator=generator)
            mu0 = 3.75 * direction / direction.norm()
            return torch.stack((mu0, -mu0))
        return 0.56 * torch.randn(num_classes, dim, generator=generator)
    raise ValueError(f"means init kind must be 'random' or 'tabular', got {kind!r}")


class GaussianMixture(nn.Module):
    """p(z) = sum_k pi_k N(z; mu_k, Sigma_k), Sigma_k = diag(sigma_k^2) ((K,) isotropic or (K, D) diagonal sigma).

    sigma = softplus(raw) (the original's parametrisation; ``std`` is the initial sigma, 1 for images, softplus(1) ~
    1.313 for tabular data), pi = softmax(weight_logits) (uniform at init). Each of means / std / weights is trainable
    only when asked. ``means``: a (K, D) tensor, or None to draw them with :func:`init_means` (``means_init``,
    ``means_r``). All likelihoods go through the fused :func:`flowgmm_fast.functional.gmm_nll` / ``gmm_log_prob``.
    """

    def __init__(self, num_classes: int, dim: int, *, means: torch.Tensor | None = None, means_init: str = "random",
                 means_r: float = 1.0, std: float = 1.0, covariance: str = "isotropic",
                 means_trainable: bool = False, std_trainable: bool = False, weights_trainable: bool = False,
                 generator: torch.Generator | None = None):
        super().__init__()
        num_classes, dim = check_int("num_classes", num_classes, 1), check_int("dim", dim, 1)
        if covariance not in COVARIANCES:
            raise ValueError(f"covariance must be one of {COVARIANCES}, got {covariance!r}")
        if isinstance(std, bool) or not isinstance(std, (int, float)):
            raise TypeError(f"std must be a number > 0, got {type(std).__name__} {std!r}")
        if not 0 < std < float("inf"):
            raise ValueError(f"std must be finite and > 0, got {std!r}")
        if means is None:
            means = init_means(num_classes, dim, means_init, means_r, generator)
        elif not isinstance(means, torch.Tensor) or not means.is_floating_point():
            raise TypeError(f"means must be a floating torch.Tensor of shape ({num_classes}, {dim}), got "
                            f"{getattr(means, 'dtype', type(means).__name__)}")
        elif tuple(means.shape) != (num_classes, dim):
            raise ValueError(f"means must have shape ({num_classes}, {dim}), got {tuple(means.shape)}")
        elif not bool(torch.isfinite(means).all()):
            raise ValueError("means must be finite")
        self.num_classes, self.dim, self.covariance = num_classes, dim, covariance
        std_shape = (num_classes,) if covariance == "isotropic" else (num_classes, dim)
        self.means = nn.Parameter(means.detach().clone().float(), requires_grad=means_trainable)
        self.std_raw = nn.Parameter(torch.full(std_shape, _softplus_inverse(std)), requires_grad=std_trainable)
        self.weight_logits = nn.Parameter(torch.zeros(num_classes), requires_grad=weights_trainable)

    @property
    def log_std(self) -> torch.Tensor:
        """log sigma, (K,) or (K, D)."""
        return torch.log(F_.softplus(self.std_raw))

    def class_logits(self, z: torch.Tensor) -> torch.Tensor:
        """(B, K) log N(z; mu_k, Sigma_k) + log pi_k for z: (B, D)."""
        return F.gmm_log_prob(z, self.means, self.log_std, self.weight_logits)

    def nll(self, z, labels=None, label_weight: float = 1.0, return_logits: bool = False):
        """Per-sample prior NLL (B,) (labels: -1 unlabeled, else the class; see functional.gmm_nll)."""
        return F.gmm_nll(z, self.means, self.log_std, self.weight_logits, labels, label_weight, return_logits)

    def log_prob(self, z, labels=None, label_weight: float = 1.0) -> torch.Tensor:
        return -self.nll(z, labels, label_weight)

    @torch.no_grad()
    def sample(self, n: int, class_id: int | None = None, generator: torch.Generator | None = None) -> torch.Tensor:
        """(n, D) draws from the mixture, or from component ``class_id``."""
        n = check_int("n", n, 0)
        if class_id is None:
            comp = torch.multinomial(torch.softmax(self.weight_logits.float(), 0).cpu(), n, replacement=True,
                                     generator=generator)
        else:
            class_id = check_int("class_id", class_id)
            if not 0 <= class_id < self.num_classes:
                raise ValueError(f"class_id must be in [0, {self.num_classes}), got {class_id}")
            comp = torch.full((n,), class_id, dtype=torch.long)
        comp = comp.to(self.means.device)
        eps = torch.randn(n, self.dim, generator=generator).to(self.means)
        std = F_.softplus(self.std_raw)[comp]
        std = std.unsqueeze(1) if std.dim() == 1 else std
        return self.means[comp] + std * eps

    def extra_repr(self) -> str:
        return f"num_classes={self.num_classes}, dim={self.dim}, covariance={self.covariance!r}"
