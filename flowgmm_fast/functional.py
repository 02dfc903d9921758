"""Functional API: the ops every backend implements, validated once here and dispatched to the selected backend.

Each function checks its arguments (rank, shape, dtype, device), normalises them to the backend signature documented
in :mod:`flowgmm_fast.ops.reference`, and calls the implementation chosen by :mod:`flowgmm_fast._backend`
("torch", "triton", "native" or "auto"). Bad input raises ``ValueError`` / ``TypeError`` naming the argument.
Checks that read tensor values run where they cost no host-device sync on the hot path: mask entries in {0, 1} once
per mask tensor (and in-place version; every call in debug mode), the label range for every CPU call and for CUDA
labels in debug mode only. In debug mode
(:mod:`flowgmm_fast.debug`) every op also checks that its floating inputs and outputs are finite.

Paper: Izmailov et al., "Semi-Supervised Learning with Normalizing Flows" (ICML 2020), eq. (1)-(3) for the likelihood;
Dinh et al., "Density estimation using Real NVP" (ICLR 2017), eq. (7)-(9) for the coupling.
"""

from __future__ import annotations

import math
import weakref
from dataclasses import dataclass

import torch

from . import _backend, debug

__all__ = ["affine_coupling", "squeeze2x2", "logit_transform", "gmm_log_prob", "gmm_nll", "Checkerboard",
           "checkerboard"]

_FLOATS = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


@dataclass(frozen=True)
class Checkerboard:
    """A checkerboard mask over the last two dims, b[h, w] = (h + w + parity) % 2, computed from indices by the
    kernels (no mask tensor is read). parity 0 equals real-nvp's ``checkerboard_mask(reverse=False)``."""

    parity: int = 0

    def __post_init__(self):
        if self.parity not in (0, 1):
            raise ValueError(f"Checkerboard parity must be 0 or 1, got {self.parity!r}")


def checkerboard(parity: int = 0) -> Checkerboard:
    """Mask argument for :func:`affine_coupling`: a checkerboard of the given parity (0 or 1)."""
    return Checkerboard(parity)


def _check_tensor(name: str, value, *, dims=None, min_dims=None, floating=True) -> torch.Tensor:
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(value).__name__}")
    if floating and value.dtype not in _FLOATS:
        raise TypeError(f"{name} must be a floating tensor (float16, bfloat16, float32 or float64), got {value.dtype}")
    if dims is not None and value.dim() not in dims:
        raise ValueError(f"{name} must have {' or '.join(map(str, dims))} dims, got shape {tuple(value.shape)}")
    if min_dims is not None and value.dim() < min_dims:
        raise ValueError(f"{name} must have at least {min_dims} dims (batch first), got shape {tuple(value.shape)}")
    return value


def _check_flag(name: str, value) -> bool:
    """A Python bool flag (``reverse="no"`` or ``1`` would otherwise be taken as True)."""
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be a bool (True or False), got {type(value).__name__} {value!r}")
    return value


def _check_number(name: str, value, *, finite: bool = True) -> float:
    """A real Python / NumPy number (not a bool, not a tensor), finite unless ``finite=False``."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) and not _is_numpy_real(value):
        raise TypeError(f"{name} must be a real number (int or float), got {type(value).__name__} {value!r}")
    value = float(value)
    if finite and not math.isfinite(value):
        raise ValueError(f"{name} must be finite, got {value!r}")
    return value


def _is_numpy_real(value) -> bool:
    try:
        import numpy as np
    except ImportError:  # pragma: no cover - numpy ships with torch
        return False
    return isinstance(value, (np.integer, np.floating))


def _debug_check(op: str, **tensors) -> None:
    """Debug mode: every floating tensor given must be finite (a host sync each; off by default)."""
    if not debug.enabled() or torch.compiler.is_compiling():
        return
    for name, t in tensors.items():
        if t is not None and t.is_floating_point():
            debug.check_finite(f"{op}: {name}", t)


# Masks whose values were checked: id -> (weak reference, version). A mask is checked the first time each mask tensor
# (at each in-place version) is seen, so a layer's persistent mask costs one check in all (one host sync on CUDA; on
# the CPU the check would cost 10% of a small fused coupling call if repeated).
_CHECKED_MASKS: dict[int, tuple[weakref.ref, int]] = {}


def _check_mask_values(mask: torch.Tensor) -> None:
    if mask.dtype == torch.bool or mask.numel() == 0 or torch.compiler.is_compiling():
        return
    key = id(mask)
    seen = _CHECKED_MASKS.get(key)
    if not debug.enabled() and seen is not None and seen[0]() is mask and seen[1] == mask._version:
        return
    if not bool(((mask == 0) | (mask == 1)).all()):
        bad = mask[(mask != 0) & (mask != 1)].flatten()[:4].tolist()
        raise ValueError(f"mask must hold only 0 and 1 (1 = kept / conditioning position), got value(s) such as "
                         f"{bad}")
    if len(_CHECKED_MASKS) >= 256:
        _CHECKED_MASKS.clear()
    _CHECKED_MASKS[key] = (weakref.ref(mask), mask._version)


def _normalise_mask(mask: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """A 0/1 mask broadcastable to x, the same for every sample -> a (C, *S) tensor in x's dtype (a constant)."""
    _check_tensor("mask", mask, floating=False)
    if mask.is_complex():
        raise TypeError(f"mask must be a real (bool, integer or floating) tensor, got {mask.dtype}")
    _check_same("mask", mask, x, "x", shape=False, dtype=False)
    shape = tuple(mask.shape)
    try:
        full = torch.broadcast_shapes(shape, tuple(x.shape))
    except RuntimeError:
        full = None
    if full != tuple(x.shape):
        raise ValueError(f"mask must be broadcastable to x of shape {tuple(x.shape)} (e.g. {tuple(x.shape[1:])} or "
                         f"(1, {', '.join(map(str, x.shape[1:]))})), got {shape}")
    lead = len(shape) - (x.dim() - 1)  # dims of the mask at or before x's batch dim
    if lead > 0 and any(n != 1 for n in shape[:lead]):
        raise ValueError(f"mask must be the same for every sample (size 1 on the batch dim), got shape {shape} "
                         f"for x of shape {tuple(x.shape)}")
    _check_mask_values(mask)
    if lead > 0:
        mask = mask.reshape(shape[lead:])
    # a constant: no backend differentiates w.r.t. the mask
    return torch.broadcast_to(mask.detach().to(x.dtype), x.shape[1:]).contiguous()


def _check_same(name: str, value: torch.Tensor, ref: torch.Tensor, ref_name: str, *, shape=True, dtype=True):
    if value.device != ref.device:
        raise ValueError(f"{name} must be on the same device as {ref_name} ({ref.device}), got {value.device}")
    if shape and value.shape != ref.shape:
        raise ValueError(f"{name} must have the shape of {ref_name} {tuple(ref.shape)}, got {tuple(value.shape)}")
    if dtype and value.dtype != ref.dtype:
        raise TypeError(f"{name} must have the dtype of {ref_name} ({ref.dtype}), got {value.dtype}")


def _check_sldj(sldj, x: torch.Tensor):
    if sldj is None:
        return None
    _check_tensor("sldj", sldj, dims=(1,))
    if sldj.dtype not in (torch.float32, torch.float64):
        raise TypeError(f"sldj must be float32 or float64 (log-dets are never half), got {sldj.dtype}")
    if sldj.shape[0] != x.shape[0]:
        raise ValueError(f"sldj must have shape ({x.shape[0]},) (one log-det per sample), got {tuple(sldj.shape)}")
    _check_same("sldj", sldj, x, "x", shape=False, dtype=False)
    return sldj


def _per_channel(name: str, value, x: torch.Tensor) -> torch.Tensor:
    """Normalise a per-channel parameter -- (C,), (C, 1, ..., 1) or a single value -- to (C,)."""
    _check_tensor(name, value)
    _check_same(name, value, x, "x", shape=False, dtype=False)
    c = x.shape[1]
    shaped_ok = value.dim() <= x.dim() - 1 and (value.dim() == 0 or all(n == 1 for n in value.shape[1:]))
    if value.numel() == 1 and shaped_ok:
        return value.reshape(1).expand(c)
    if not shaped_ok or value.shape[0] != c:
        expect = f"({c},)" if x.dim() == 2 else f"({c},) or ({c}{', 1' * (x.dim() - 2)})"
        raise ValueError(f"{name} must be per-channel with shape {expect} for x of shape {tuple(x.shape)}, "
                         f"got {tuple(value.shape)}")
    return value.reshape(c)


def affine_coupling(x, s, t, scale=None, mask=None, reverse=False, sldj=None):
    """Affine coupling with its log-det: ``(y, sldj_out)``.

    x, s, t: (B, C, *S) (images (B, C, H, W), vectors (B, D)), same shape, dtype and device; or t=None with s the
        s/t net's output (B, 2C, *S) holding s then t on dim 1 (its gradient then comes back as one tensor instead of
        two halves joined by ``chunk``'s backward). The native backend reads tensors whose per-sample (C, *S) planes
        are dense in place (e.g. ``.chunk(2, 1)`` views of a (B, 2C, *S) tensor); other layouts are copied first.
    scale: optional per-channel (C,) / (C, 1, 1) tensor; s_eff = scale * tanh(s) when given, else s.
    mask: None (every position transformed), a 0/1 tensor broadcastable to x and the same for every sample, e.g.
        (C, H, W), (1, 1, H, W) or (D,) (1 = kept / conditioning position; treated as a constant, no gradient), or
        :func:`checkerboard` (parity) for 4-D x.
    forward: y = b x + (1 - b)(x + t) exp(s_eff); sldj_out = sldj + sum_{non-batch} (1 - b) s_eff.
    reverse: y = b x + (1 - b)(x exp(-s_eff) - t); sldj_out = sldj - the same sum.
    sldj: optional (B,) float32/float64 running log-det; sldj_out is float64 if x or sldj is, else float32.
    Fused in one pass per direction (tanh, scale, mask, exp, log-det reduction) by the triton and native backends.
    """
    _check_tensor("x", x, min_dims=2)
    _check_tensor("s", s)
    if t is None:
        _check_same("s", s, x, "x", shape=False)
        if s.shape != (x.shape[0], 2 * x.shape[1], *x.shape[2:]):
            raise ValueError(f"s must have shape {(x.shape[0], 2 * x.shape[1], *x.shape[2:])} (s and t on dim 1) "
                             f"when t is None, got {tuple(s.shape)}")
    else:
        _check_tensor("t", t)
        _check_same("s", s, x, "x")
        _check_same("t", t, x, "x")
    scale = None if scale is None else _per_channel("scale", scale, x)
    reverse = _check_flag("reverse", reverse)
    parity = -1
    if isinstance(mask, Checkerboard):
        if x.dim() != 4:
            raise ValueError(f"mask=checkerboard(...) needs 4-D x (B, C, H, W), got shape {tuple(x.shape)}")
        parity, mask = mask.parity, None
    elif mask is not None:
        mask = _normalise_mask(mask, x)
    sldj = _check_sldj(sldj, x)
    _debug_check("affine_coupling", x=x, s=s, t=t, scale=scale, sldj=sldj)
    y, sldj_out = _backend.get_op("affine_coupling", x.device)(x, s, t, scale, mask, parity, reverse, sldj)
    _debug_check("affine_coupling", y=y, sldj_out=sldj_out)
    return y, sldj_out


def squeeze2x2(x, reverse=False, alt_order=False):
    """RealNVP's 2x2 squeeze: (B, C, H, W) -> (B, 4C, H/2, W/2); ``reverse=True`` undoes it.

    Default order: out[:, 4c + 2i + j] = x[:, c, i::2, j::2]; ``alt_order=True`` is real-nvp's alternate order
    out[:, kC + c] with offsets (0,0), (1,1), (0,1), (1,0) for k = 0..3. A pure permutation: log-det 0.
    """
    _check_tensor("x", x, dims=(4,), floating=False)
    reverse, alt_order = _check_flag("reverse", reverse), _check_flag("alt_order", alt_order)
    if not reverse and (x.shape[2] % 2 or x.shape[3] % 2):
        raise ValueError(f"squeeze2x2 needs x with even height and width, got x of shape {tuple(x.shape)}")
    if reverse and x.shape[1] % 4:
        raise ValueError(f"squeeze2x2(reverse=True) needs x with channels divisible by 4, got x of shape "
                         f"{tuple(x.shape)}")
    _debug_check("squeeze2x2", x=x)
    return _backend.get_op("squeeze2x2", x.device)(x, reverse, alt_order)


def logit_transform(x, alpha=0.05, reverse=False, sldj=None, *, noise=None):
    """Logit preprocessing of RealNVP with its log-det: ``(y, sldj_out)``.

    forward: u = (255 x + noise) / 256 when ``noise`` (uniform [0, 1) dequantisation noise, shape of x) is given,
    else u = x (x in [0, 1]); p = alpha + (1 - 2 alpha) u; y = logit(p);
    sldj_out = sldj + sum_{non-batch} [log(1 - 2 alpha) - log p - log(1 - p)] -- the log-det w.r.t. u. The
    dequantisation's own scale 255/256 is not counted: bits/dim adds D log 256 for the 256 bins (REFERENCE.md).
    reverse: y = (sigmoid(x) - alpha) / (1 - 2 alpha); sldj_out = sldj - the same sum. Fused in one pass.
    """
    _check_tensor("x", x, min_dims=1)
    alpha = _check_number("alpha", alpha)
    if not 0 <= alpha < 0.5:
        raise ValueError(f"alpha must be in [0, 0.5), got {alpha!r}")
    reverse = _check_flag("reverse", reverse)
    if noise is not None:
        if reverse:
            raise ValueError("noise is only used by the forward transform (reverse=False)")
        _check_tensor("noise", noise)
        _check_same("noise", noise, x, "x")
    sldj = _check_sldj(sldj, x)
    _debug_check("logit_transform", x=x, noise=noise, sldj=sldj)
    y, sldj_out = _backend.get_op("logit_transform", x.device)(x, alpha, reverse, sldj, noise)
    _debug_check("logit_transform", y=y, sldj_out=sldj_out)
    return y, sldj_out


def _check_gmm(z, means, log_std, weight_logits):
    _check_tensor("z", z, dims=(2,))
    _check_tensor("means", means, dims=(2,))
    _check_tensor("log_std", log_std, dims=(1, 2))
    k, d = means.shape
    if k < 1:
        raise ValueError("means must hold at least one component, got shape (0, D)")
    if means.shape[1] != z.shape[1]:
        raise ValueError(f"means must have shape (K, {z.shape[1]}) to match z (B, D) = {tuple(z.shape)}, "
                         f"got {tuple(means.shape)}")
    if log_std.shape not in ((k,), (k, d)):
        raise ValueError(f"log_std must have shape ({k},) (isotropic) or ({k}, {d}) (diagonal), "
                         f"got {tuple(log_std.shape)}")
    _check_same("means", means, z, "z", shape=False, dtype=False)
    _check_same("log_std", log_std, z, "z", shape=False, dtype=False)
    if weight_logits is not None:
        _check_tensor("weight_logits", weight_logits, dims=(1,))
        _check_same("weight_logits", weight_logits, z, "z", shape=False, dtype=False)
        if weight_logits.shape[0] != k:
            raise ValueError(f"weight_logits must have shape ({k},), got {tuple(weight_logits.shape)}")


def gmm_log_prob(z, means, log_std, weight_logits=None):
    """Class logits (B, K): log N(z; mu_k, diag(sigma_k^2)) + log pi_k, pi = softmax(weight_logits) (uniform if None).

    z: (B, D); means: (K, D); log_std: (K,) isotropic or (K, D) diagonal (log sigma). Float32 (float64 for float64
    inputs) output; the kernels tile over D and never materialise (B, K, D).
    """
    _check_gmm(z, means, log_std, weight_logits)
    _debug_check("gmm_log_prob", z=z, means=means, log_std=log_std, weight_logits=weight_logits)
    logits = _backend.get_op("gmm_log_prob", z.device)(z, means, log_std, weight_logits)
    _debug_check("gmm_log_prob", logits=logits)
    return logits


def gmm_nll(z, means, log_std, weight_logits=None, labels=None, label_weight=1.0, return_logits=False):
    """Per-sample negative log-likelihood (B,) of z under the Gaussian-mixture prior.

    label -1 (or ``labels=None``): -logsumexp_k [log N(z; mu_k, Sigma_k) + log pi_k]   (unlabeled)
    label k:                       -label_weight * log N(z; mu_k, Sigma_k)           (labeled; no log pi_k, as the
                                                                                        original FlowGMM)
    labels: int64 (B,) with values in [-1, K). With ``return_logits=True`` returns ``(nll, class_logits)`` from the
    same fused pass. Label range is checked for CPU tensors, and for CUDA tensors in debug mode (a host sync); not
    inside torch.compile (a data-dependent check would break the graph). Where it is not checked, a label outside
    [-1, K) is never used as an index: that sample's nll and gradients are NaN (which the trainer's non-finite guard
    reports). label_weight: a finite number.
    """
    _check_gmm(z, means, log_std, weight_logits)
    if labels is not None:
        _check_tensor("labels", labels, dims=(1,), floating=False)
        if labels.dtype not in (torch.int64, torch.int32):
            raise TypeError(f"labels must be an int64 tensor, got {labels.dtype}")
        if labels.shape[0] != z.shape[0]:
            raise ValueError(f"labels must have shape ({z.shape[0]},) to match z, got {tuple(labels.shape)}")
        _check_same("labels", labels, z, "z", shape=False, dtype=False)
        labels = labels.long()
        check = labels.device.type == "cpu" or debug.enabled()
        if check and labels.numel() and not torch.compiler.is_compiling():
            lo, hi = int(labels.min()), int(labels.max())
            if lo < -1 or hi >= means.shape[0]:
                raise ValueError(f"labels must be in [-1, {means.shape[0]}) (-1 = unlabeled), got values in "
                                 f"[{lo}, {hi}]")
    label_weight = _check_number("label_weight", label_weight)
    return_logits = _check_flag("return_logits", return_logits)
    _debug_check("gmm_nll", z=z, means=means, log_std=log_std, weight_logits=weight_logits)
    out = _backend.get_op("gmm_nll", z.device)(z, means, log_std, weight_logits, labels, label_weight, return_logits)
    _debug_check("gmm_nll", **({"nll": out[0], "logits": out[1]} if return_logits else {"nll": out}))
    return out
