"""Fused logit preprocessing of RealNVP (dequantisation, logit, per-sample log-det) forward/reverse and backward.

Layout: x viewed as (B, N); one program per (sample b, BLOCK of N). With a = alpha, L = log(1 - 2a) (1 - 2a and L are
formed in double by the launcher and passed in: formed in fp32, 1 - 2a loses 1.3e-4 relative at a = 0.4999):
    forward: u = (255 x + noise) / 256 (HAS_NOISE) or x;  p = a + (1 - 2a) u;  y = log p - log(1 - p);
             ldj = +sum [L - log p - log(1 - p)]
    reverse: p = sigmoid(x);  y = (p - a) / (1 - 2a);  ldj = -sum [L + softplus(x) + softplus(-x)]
Per-sample ldj partials are summed by the launcher (deterministic); one tile per sample adds sldj in the kernel.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from ._common import check_grid, next_pow2, num_warps_for, on_input_device, partial_row

__all__ = ["logit_forward", "logit_backward"]

_MAX_BLOCK = 2048


@triton.jit
def _logit_fwd_kernel(x_ptr, noise_ptr, sldj_ptr, y_ptr, ldj_ptr, N, alpha, scale, log_scale,
                      HAS_NOISE: tl.constexpr, REVERSE: tl.constexpr, HAS_SLDJ: tl.constexpr,
                      ONE_TILE: tl.constexpr, BLOCK: tl.constexpr):
    """y and the log-det of the module docstring on one BLOCK of sample b (partial to ldj_ptr[b, tile]);
    scale = 1 - 2 alpha, log_scale = log(1 - 2 alpha)."""
    b = tl.program_id(0)
    pn = tl.program_id(1)
    a = tl.cast(alpha, tl.float32)
    sc = tl.cast(scale, tl.float32)
    log_scale = tl.cast(log_scale, tl.float32)
    n = pn * BLOCK + tl.arange(0, BLOCK)
    m = n < N
    off = b.to(tl.int64) * N + n
    x = tl.load(x_ptr + off, mask=m, other=0.5).to(tl.float32)
    if REVERSE:
        p = tl.sigmoid(x)
        y = (p - a) / sc
        ax = tl.abs(x)
        ldj_el = log_scale + ax + 2.0 * tl.log(1.0 + tl.exp(-ax))
    else:
        if HAS_NOISE:
            x = (x * 255.0 + tl.load(noise_ptr + off, mask=m, other=0.0).to(tl.float32)) / 256.0
        p = a + sc * x
        lp = tl.log(p)
        l1p = tl.log(1.0 - p)
        y = lp - l1p
        ldj_el = log_scale - lp - l1p
    tl.store(y_ptr + off, y.to(y_ptr.dtype.element_ty), mask=m)
    ldj = tl.sum(tl.where(m, ldj_el, 0.0), axis=0)
    if REVERSE:
        ldj = -ldj
    if ONE_TILE:
        if HAS_SLDJ:
            ldj += tl.load(sldj_ptr + b).to(tl.float32)
        tl.store(ldj_ptr + b, ldj)
    else:
        tl.store(ldj_ptr + partial_row(b, tl.num_programs(1), pn), ldj)


@triton.jit
def _logit_bwd_kernel(x_ptr, noise_ptr, gy_ptr, gldj_ptr, gx_ptr, gn_ptr, N, alpha, scale,
                      HAS_NOISE: tl.constexpr, NOISE_GRAD: tl.constexpr, REVERSE: tl.constexpr,
                      BLOCK: tl.constexpr):
    """gx (and gn = dL/dnoise when NOISE_GRAD) from the inputs (gl = grad of ldj_out[b]):
        forward: g_u = (1 - 2a) [gy (1/p + 1/(1-p)) + gl (1/(1-p) - 1/p)],  gx = g_u 255/256 (HAS_NOISE) or g_u,
                 gn = g_u / 256 (from fp32 g_u: as gx / 255 it would overflow a half wherever gx does)
        reverse: gx = gy p (1 - p) / (1 - 2a) - gl (2p - 1),  p = sigmoid(x)"""
    b = tl.program_id(0)
    pn = tl.program_id(1)
    a = tl.cast(alpha, tl.float32)
    sc = tl.cast(scale, tl.float32)
    n = pn * BLOCK + tl.arange(0, BLOCK)
    m = n < N
    off = b.to(tl.int64) * N + n
    x = tl.load(x_ptr + off, mask=m, other=0.5).to(tl.float32)
    gy = tl.load(gy_ptr + off, mask=m, other=0.0).to(tl.float32)
    gl = tl.load(gldj_ptr + b).to(tl.float32)
    if REVERSE:
        p = tl.sigmoid(x)
        gx = gy * p * (1.0 - p) / sc - gl * (2.0 * p - 1.0)
    else:
        if HAS_NOISE:
            x = (x * 255.0 + tl.load(noise_ptr + off, mask=m, other=0.0).to(tl.float32)) / 256.0
        p = a + sc * x
        ip = 1.0 / p
        iq = 1.0 / (1.0 - p)
        gx = sc * (gy * (ip + iq) + gl * (iq - ip))
        if NOISE_GRAD:
            tl.store(gn_ptr + off, (gx / 256.0).to(gn_ptr.dtype.element_ty), mask=m)
        if HAS_NOISE:
            gx = gx * (255.0 / 256.0)
    tl.store(gx_ptr + off, gx.to(gx_ptr.dtype.element_ty), mask=m)


def _tiles(x: torch.Tensor):
    b = x.shape[0]
    n = math.prod(x.shape[1:])
    block = min(next_pow2(n), _MAX_BLOCK)
    grid = (b, triton.cdiv(n, block))
    check_grid(grid, "logit")  # so n < 65536 * 2048 < 2^31: the in-sample offset pn * BLOCK + i cannot wrap in int32
    return b, n, block, grid


@on_input_device
def logit_forward(x, alpha: float, reverse: bool, sldj, noise):
    """x (B, *) fp32/bf16/fp16, noise None or like x, sldj None or (B,) fp32 -> (y like x, ldj_out (B,) fp32).
    One launch (plus a (B, tiles) partial sum when a sample spans several tiles)."""
    x = x.contiguous()
    b, n, block, grid = _tiles(x)
    y = torch.empty_like(x)
    if b == 0:
        return y, torch.zeros(0, dtype=torch.float32, device=x.device)
    one_tile = grid[1] == 1
    ldj = torch.empty((b,) if one_tile else grid, dtype=torch.float32, device=x.device)
    _logit_fwd_kernel[grid](x, noise.contiguous() if noise is not None else x,
                            sldj.contiguous() if sldj is not None else ldj, y, ldj, n, float(alpha),
                            1.0 - 2.0 * float(alpha), math.log1p(-2.0 * float(alpha)),
                            HAS_NOISE=noise is not None, REVERSE=bool(reverse), HAS_SLDJ=sldj is not None,
                            ONE_TILE=one_tile, BLOCK=block, num_warps=num_warps_for(block))
    if not one_tile:
        ldj = ldj.sum(1)
        if sldj is not None:
            ldj = ldj + sldj
    return y, ldj


@on_input_device
def logit_backward(grad_y, grad_ldj, x, alpha: float, reverse: bool, noise, noise_grad: bool = False):
    """grad_y like x, grad_ldj (B,) fp32 -> (grad_x like x, grad_noise like x when ``noise_grad`` (and noise given),
    else None). One launch."""
    x = x.contiguous()
    b, n, block, grid = _tiles(x)
    gx = torch.empty_like(x)
    gn = torch.empty_like(x) if noise is not None and noise_grad else None
    if b == 0:
        return gx, gn
    _logit_bwd_kernel[grid](x, noise.contiguous() if noise is not None else x, grad_y.contiguous(),
                            grad_ldj.contiguous(), gx, gn if gn is not None else gx, n, float(alpha),
                            1.0 - 2.0 * float(alpha),
                            HAS_NOISE=noise is not None, NOISE_GRAD=gn is not None, REVERSE=bool(reverse),
                            BLOCK=block, num_warps=num_warps_for(block))
    return gx, gn
