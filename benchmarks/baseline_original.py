"""BASELINE ONLY -- the original FlowGMM code's formulation, re-written here to be timed against (never used by the
library). Written from the description in REFERENCE.md ("Known faults of the original code"), not copied:

* Prior (fault 3): every call rebuilds K ``torch.distributions.MultivariateNormal`` objects with the FULL covariance
  matrix ``sigma_k^2 I`` (D x D), so each call pays K Cholesky factorisations of a D x D matrix and K triangular solves
  of the (B, D) batch; the labeled rows are then filled class by class with boolean-mask indexing.
* Per-layer NaN checks (fault 4): every coupling layer checks ``isnan().any()`` of its scale factor in Python, a
  host-device synchronisation per layer per step (anomaly detection, also on in the original, is left off here: it
  would only make the baseline slower still).

The values equal the closed form (:func:`flowgmm_fast.ops.reference.gmm_nll`) up to rounding; tests check that.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.distributions import MultivariateNormal


def original_gmm_components(means: torch.Tensor, log_std: torch.Tensor) -> list[MultivariateNormal]:
    """K full-covariance Gaussians N(mu_k, sigma_k^2 I), built anew (a D x D Cholesky each) as the original did per call.

    means: (K, D); log_std: (K,) isotropic log sigma.
    """
    if log_std.dim() != 1:
        raise ValueError(f"the original formulation has isotropic components: log_std must be (K,), "
                         f"got shape {tuple(log_std.shape)}")
    eye = torch.eye(means.shape[1], dtype=means.dtype, device=means.device)
    return [MultivariateNormal(mu, covariance_matrix=torch.exp(2 * ls) * eye, validate_args=False) for mu, ls in zip(means, log_std)]


def original_gmm_log_prob(z: torch.Tensor, means: torch.Tensor, log_std: torch.Tensor,
                          weight_logits: torch.Tensor | None = None, labels: torch.Tensor | None = None,
                          label_weight: float = 1.0) -> torch.Tensor:
    """(B,) log-likelihood of z: (B, D) under the mixture, in the original formulation (module docstring).

    Unlabeled rows (label -1 or labels None): logsumexp_k [log N_k(z) + log pi_k]; labeled rows (label k):
    label_weight * log N_k(z).
    """
    comps = original_gmm_components(means, log_std)
    all_log_probs = torch.stack([g.log_prob(z) for g in comps], dim=1)
    k = means.shape[0]
    weights = torch.zeros(k, dtype=z.dtype, device=z.device) if weight_logits is None else weight_logits
    mixture = torch.logsumexp(all_log_probs + torch.log(torch.softmax(weights, dim=0)), dim=1)
    if labels is None:
        return mixture
    out = torch.zeros_like(mixture)
    unlabeled = labels == -1
    out[unlabeled] += mixture[unlabeled]
    for i in range(k):
        rows = labels == i
        out[rows] += all_log_probs[:, i][rows] * label_weight
    return out


def original_gmm_nll(z, means, log_std, weight_logits=None, labels=None, label_weight=1.0) -> torch.Tensor:
    """(B,) negative of :func:`original_gmm_log_prob` (the normalised gmm_nll signature, for the op benchmarks)."""
    return -original_gmm_log_prob(z, means, log_std, weight_logits, labels, label_weight)


def _nan_check_hook(module: nn.Module, inputs, output) -> None:
    st = output[0] if isinstance(output, (tuple, list)) else output
    if torch.isnan(st).any():  # a host-device sync per layer, as in the original
        raise RuntimeError(f"{type(module).__name__}: scale factor has NaN entries")


def add_nan_checks(flow: nn.Module) -> list:
    """Register the original's per-layer ``isnan().any()`` check on the s/t output of every coupling layer of ``flow``.

    Returns the hook handles (``handle.remove()`` undoes it). Raises if ``flow`` has no coupling layer.
    """
    from flowgmm_fast.nn import AffineCoupling

    handles = [m.st_net.register_forward_hook(_nan_check_hook) for m in flow.modules() if isinstance(m, AffineCoupling)]
    if not handles:
        raise ValueError("add_nan_checks: the flow has no flowgmm_fast.nn.AffineCoupling layer")
    return handles


class OriginalFormulation(nn.Module):
    """A FlowGMM run the original code's way: the same flow and prior parameters as ``model`` (shared, not copied),
    the full-covariance prior rebuilt per call, and a NaN check per coupling layer. Call it only under the "torch"
    backend to time the original's formulation.

    ``forward(x, labels=None, label_weight=1.)`` returns the per-sample NLL (B,), like ``FlowGMM(...).nll``.
    """

    def __init__(self, model: nn.Module):
        super().__init__()
        if model.prior.covariance != "isotropic":
            raise ValueError("OriginalFormulation needs an isotropic GaussianMixture prior (the original's)")
        self.model = model
        self._handles = add_nan_checks(model.flow)

    def forward(self, x, labels=None, label_weight: float = 1.0) -> torch.Tensor:
        z, sldj = self.model.encode(x)
        prior = self.model.prior
        log_prior = original_gmm_log_prob(z, prior.means, prior.log_std, prior.weight_logits, labels, label_weight)
        return -(log_prior + sldj.to(log_prior.dtype))

    def remove_checks(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []
