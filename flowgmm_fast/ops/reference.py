"""Pure-PyTorch reference implementations: the ground truth every backend is tested against (the "torch" backend).

These functions take the *normalised* arguments that :mod:`flowgmm_fast.functional` produces after validation; every
backend module (``triton_ops``, ``native_ops``) implements exactly these signatures and semantics:

``affine_coupling(x, s, t, scale, mask, checker_parity, reverse, sldj) -> (y, sldj_out)``
    x, s, t: (B, C, *S) with the same shape, dtype and device (any strides); or t None and s (B, 2C, *S), the s/t
        net's output holding s then t on dim 1 (s, t = s.chunk(2, 1)).
    scale: None or (C,) -- s_eff = scale[c] * tanh(s) when given, else s_eff = s.
    mask: None or a 0/1 tensor of shape x.shape[1:] (dtype of x), 1 = kept (conditioning) position.
    checker_parity: -1 (no checkerboard) or 0/1 for a 4-D x: the mask is b[h, w] = (h + w + parity) % 2, computed
        from indices (mask is None then). parity 0 is real-nvp's ``checkerboard_mask(reverse=False)``.
    With b the mask (0 when none): s_m = (1 - b) * s_eff, t_m = (1 - b) * t;
        forward: y = (x + t_m) * exp(s_m)    sldj_out = sldj + sum_{non-batch} s_m
        reverse: y = x * exp(-s_m) - t_m     sldj_out = sldj - sum_{non-batch} s_m
    (for 0/1 masks this is y = b x + (1 - b)(x + t) exp(s_eff), and masked positions never see exp of s).
    sldj: None (= 0) or (B,) float32/float64. sldj_out is float64 when x or sldj is float64, else float32.
``squeeze2x2(x, reverse, alt_order) -> y``
    x: (B, C, H, W) -> (B, 4C, H/2, W/2) (reverse: the inverse). Default order: out[:, 4c + 2i + j, h, w] =
    x[:, c, 2h + i, 2w + j]. alt_order: out[:, k C + c, h, w] = x[:, c, 2h + i_k, 2w + j_k] with
    (i_k, j_k) = (0, 0), (1, 1), (0, 1), (1, 0) (real-nvp's alternate order).
``logit_transform(x, alpha, reverse, sldj, noise) -> (y, sldj_out)``
    forward: u = (255 x + noise) / 256 if noise is given else x;  p = alpha + (1 - 2 alpha) u;  y = log p - log(1 - p);
        sldj_out = sldj + sum [log(1 - 2 alpha) - log p - log(1 - p)]   (log-det w.r.t. u).
    reverse: p = sigmoid(x); y = (p - alpha) / (1 - 2 alpha); sldj_out = sldj - the same sum at p. noise is None.
``gmm_log_prob(z, means, log_std, weight_logits) -> (B, K)``
    z: (B, D); means: (K, D); log_std: (K,) isotropic or (K, D) diagonal; weight_logits: None (uniform) or (K,).
    logits[b, k] = log N(z_b; mu_k, diag(sigma_k^2)) + log softmax(weight_logits)_k.
``gmm_nll(z, means, log_std, weight_logits, labels, label_weight, return_logits) -> nll or (nll, logits)``
    labels: None or int64 (B,) in [-1, K). nll[b] = -logsumexp_k logits[b, k] for label -1 (or labels None),
    -label_weight * log N(z_b; mu_y, Sigma_y) for label y (the original's convention: no log pi_y); NaN (and NaN
    gradients) for a label outside [-1, K), which no backend reads as an index.

Precision: float16/bfloat16 inputs are computed in float32 (outputs cast back for y, log-dets and GMM outputs stay
float32); float64 stays float64. ``upcast=False`` computes in the input dtype instead -- tests use it as "PyTorch's
own error" in the three-way low-precision comparison.
"""

from __future__ import annotations

import math

import torch

__all__ = ["affine_coupling", "squeeze2x2", "logit_transform", "gmm_log_prob", "gmm_nll", "checkerboard_mask",
           "ldj_dtype"]


def ldj_dtype(*dtypes: torch.dtype) -> torch.dtype:
    """Log-det / likelihood dtype: float64 when any input is float64, else float32 (never half)."""
    return torch.float64 if torch.float64 in dtypes else torch.float32


def _compute_dtype(dtype: torch.dtype, upcast: bool) -> torch.dtype:
    if not upcast:
        return dtype
    return torch.float64 if dtype == torch.float64 else torch.float32


def _accumulate(ldj_el, x, sldj, reverse):
    """sldj_out = sldj +- (per-sample sum of the elementwise log-det ``ldj_el``), in the log-det dtype."""
    out_dt = ldj_dtype(x.dtype, sldj.dtype if sldj is not None else torch.float32)
    ldj = ldj_el.reshape(x.shape[0], math.prod(x.shape[1:])).sum(-1).to(out_dt)  # (an empty batch has no -1 size)
    if reverse:
        ldj = -ldj
    return ldj if sldj is None else sldj.to(out_dt) + ldj


def checkerboard_mask(height: int, width: int, parity: int, dtype=torch.float32, device=None) -> torch.Tensor:
    """(H, W) 0/1 tensor with b[h, w] = (h + w + parity) % 2 (1 = kept / conditioning position)."""
    h = torch.arange(height, device=device).view(-1, 1)
    w = torch.arange(width, device=device).view(1, -1)
    return ((h + w + parity) % 2).to(dtype)


class _Tanh(torch.autograd.Function):
    """tanh whose backward forms 1 - tanh(s)^2 as q (2 - q), q = 1 - |tanh s| = 2 e / (1 + e), e = exp(-2|s|):
    autograd's 1 - y^2 carries y's rounding error, the whole size of the slope once |s| is large (in float32 it is
    exactly 0 from |s| = 9.01, 2% off at |s| = 6; in float64 the same from |s| = 18.7). Twice differentiable."""

    @staticmethod
    def forward(ctx, s):
        ctx.save_for_backward(s)
        return torch.tanh(s)

    @staticmethod
    def backward(ctx, grad):
        (s,) = ctx.saved_tensors
        e = torch.exp(-2 * s.abs())
        q = 2 * e / (1 + e)
        return grad * (q * (2 - q))


def affine_coupling(x, s, t, scale, mask, checker_parity, reverse, sldj, *, upcast: bool = True):
    if t is None:
        s, t = s.chunk(2, dim=1)
    cdt = _compute_dtype(x.dtype, upcast)
    xc, sc, tc = x.to(cdt), s.to(cdt), t.to(cdt)
    if scale is not None:
        shape = (1, -1) + (1,) * (x.dim() - 2)
        s_eff = scale.to(cdt).view(shape) * _Tanh.apply(sc)
    else:
        s_eff = sc
    if checker_parity >= 0:
        keep = checkerboard_mask(x.shape[-2], x.shape[-1], checker_parity, cdt, x.device)
    elif mask is not None:
        keep = mask.to(cdt)
    else:
        keep = None
    if keep is not None:
        s_m, t_m = (1 - keep) * s_eff, (1 - keep) * tc
    else:
        s_m, t_m = s_eff, tc
    y = xc * torch.exp(-s_m) - t_m if reverse else (xc + t_m) * torch.exp(s_m)
    return y.to(x.dtype), _accumulate(s_m, x, sldj, reverse)


_ALT_ORDER = (0, 3, 1, 2)  # (i, j) offsets (0,0), (1,1), (0,1), (1,0) as indices 2i + j


def squeeze2x2(x, reverse, alt_order):
    if not reverse:
        b, c, h, w = x.shape
        v = x.reshape(b, c, h // 2, 2, w // 2, 2)
        if alt_order:
            v = v.permute(0, 3, 5, 1, 2, 4).reshape(b, 4, c, h // 2, w // 2)[:, list(_ALT_ORDER)]
        else:
            v = v.permute(0, 1, 3, 5, 2, 4)
        return v.reshape(b, 4 * c, h // 2, w // 2)
    b, c4, h, w = x.shape
    c = c4 // 4
    if alt_order:
        inv = [_ALT_ORDER.index(k) for k in range(4)]
        v = x.reshape(b, 4, c, h, w)[:, inv].reshape(b, 2, 2, c, h, w).permute(0, 3, 4, 1, 5, 2)
    else:
        v = x.reshape(b, c, 2, 2, h, w).permute(0, 1, 4, 2, 5, 3)
    return v.reshape(b, c, 2 * h, 2 * w)


def logit_transform(x, alpha, reverse, sldj, noise, *, upcast: bool = True):
    cdt = _compute_dtype(x.dtype, upcast)
    xc = x.to(cdt)
    log_scale = math.log1p(-2 * alpha)
    if reverse:
        y = (torch.sigmoid(xc) - alpha) / (1 - 2 * alpha)
        # softplus(x) + softplus(-x) = |x| + 2 log(1 + e^-|x|): exact at any |x| (F.softplus turns linear past 20,
        # dropping the 2e-9-sized term, which float64 resolves)
        ax = xc.abs()
        ldj_el = log_scale + ax + 2 * torch.log1p(torch.exp(-ax))
    else:
        if noise is not None:
            xc = (xc * 255 + noise.to(cdt)) / 256
        p = alpha + (1 - 2 * alpha) * xc
        y = torch.log(p) - torch.log1p(-p)
        ldj_el = log_scale - torch.log(p) - torch.log1p(-p)
    return y.to(x.dtype), _accumulate(ldj_el, x, sldj, reverse)


def _gaussian_log_density(z, means, log_std, cdt):
    """(B, K) log N(z_b; mu_k, diag(sigma_k^2)) in the closed form |z|^2/s^2 - 2 z.mu/s^2 + |mu|^2/s^2 (no (B, K, D)),
    on z and mu centred on the mean of the means c: |z - mu|^2 is unchanged by the shift (so c is a constant for
    autograd), and the three terms no longer cancel when the means sit far from 0 (uncentred, at D = 3072 with means
    ~5 per dimension the float32 logits were off by ~0.05)."""
    z, means, log_std = z.to(cdt), means.to(cdt), log_std.to(cdt)
    centre = means.detach().mean(0)
    z, means = z - centre, means - centre
    d = z.shape[1]
    if log_std.dim() == 1:
        inv_var = torch.exp(-2 * log_std)
        sq = (z * z).sum(1, keepdim=True) - 2 * z @ means.T + (means * means).sum(1)
        maha = sq * inv_var
        log_det = d * log_std
    else:
        inv_var = torch.exp(-2 * log_std)
        maha = (z * z) @ inv_var.T - 2 * z @ (means * inv_var).T + (means * means * inv_var).sum(1)
        log_det = log_std.sum(1)
    return -0.5 * maha - log_det - 0.5 * d * math.log(2 * math.pi)


def _log_weights(weight_logits, k, cdt, device):
    if weight_logits is None:
        return torch.full((k,), -math.log(k), dtype=cdt, device=device)
    return torch.log_softmax(weight_logits.to(cdt), dim=0)


def gmm_log_prob(z, means, log_std, weight_logits, *, upcast: bool = True):
    cdt = _compute_dtype(ldj_dtype(z.dtype, means.dtype, log_std.dtype), upcast)
    if not upcast:
        cdt = z.dtype
    log_n = _gaussian_log_density(z, means, log_std, cdt)
    return log_n + _log_weights(weight_logits, means.shape[0], cdt, z.device)


def gmm_nll(z, means, log_std, weight_logits, labels, label_weight, return_logits=False, *, upcast: bool = True):
    cdt = _compute_dtype(ldj_dtype(z.dtype, means.dtype, log_std.dtype), upcast)
    if not upcast:
        cdt = z.dtype
    log_n = _gaussian_log_density(z, means, log_std, cdt)
    logits = log_n + _log_weights(weight_logits, means.shape[0], cdt, z.device)
    nll = -torch.logsumexp(logits, dim=1)
    if labels is not None:
        k = means.shape[0]
        picked = log_n.gather(1, labels.clamp(0, k - 1).unsqueeze(1)).squeeze(1)
        nll = torch.where(labels >= 0, -label_weight * picked, nll)
        # a label outside [-1, K) (unchecked on CUDA outside debug mode) is never used as an index: its nll and
        # gradients are NaN, as in the kernels
        poison = torch.where((labels < -1) | (labels >= k), math.nan, 1.0).to(nll.dtype)
        nll = nll * poison  # (a where() on nll * nan would send 0 * nan = NaN to the valid rows' gradients)
    return (nll, logits) if return_logits else nll
