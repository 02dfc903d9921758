"""Fused affine coupling (RealNVP, Dinh et al. 2017 eq. (7)-(9)) forward/reverse and backward, with the log-det.

Layout: x, s, t viewed as (B, C, S) (S = H*W, or 1 for vectors, then C = D), each with its own batch stride: a tensor
whose per-sample (C, S) planes are dense -- a ``.chunk(2, 1)`` view of the s/t net's output or of the channel coupling's
input -- is read in place (other layouts are copied first). Outputs are contiguous, except that the backward of a
joint s/t tensor (t None: s holds s then t on dim 1) writes both gradients into one (B, 2C, S) tensor. Each program owns one sample b and a
(BLOCK_C, BLOCK_S) tile of its (C, S) plane, so the per-channel scale is a (BLOCK_C,) vector load and the per-sample
log-det and per-channel scale-gradient are tile reductions. The partial sums go to small buffers that the launcher
sums (deterministic: no atomics); when one tile covers the whole sample the kernel adds the incoming sldj itself.

Vectors (x of shape (B, D), S = 1) have their own pair of kernels, tiled over rows (see "vectors" below).

Mask modes (MASK_MODE): 0 none, 1 dense 0/1 tensor of shape (C, S), 2 checkerboard b[h, w] = (h + w + parity) % 2
computed from the index (h = s // W, w = s % W; no mask is read). With free = 1 - b:
    s_eff = scale[c] * tanh(s) (HAS_SCALE) or s;   s_m = free * s_eff;   t_m = free * t
    forward: y = (x + t_m) exp(s_m),  ldj = +sum s_m;   reverse: y = x exp(-s_m) - t_m,  ldj = -sum s_m
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from ._common import (
    check_grid,
    num_warps_for,
    on_input_device,
    partial_row,
    tanh_f32,
    tanh_slope_f32,
    tile_2d,
    wide_index,
)

__all__ = ["coupling_forward", "coupling_backward"]


@triton.jit
def _free_mask(mask_ptr, off, inb, sp, W, parity, MASK_MODE: tl.constexpr):
    """(1 - b) for the tile: 1 where the position is transformed, 0 where it is kept (conditioning)."""
    if MASK_MODE == 1:
        free = 1.0 - tl.load(mask_ptr + off, mask=inb, other=1.0).to(tl.float32)
    else:
        keep = ((sp // W) + (sp % W) + parity) % 2
        free = (1 - keep).to(tl.float32)[None, :]
    return free


@triton.jit
def _tile_index(pc, ps, C, S, BLOCK_C: tl.constexpr, BLOCK_S: tl.constexpr, IDX64: tl.constexpr):
    """Channels c, positions sp and offsets c * S + sp within one sample's (C, S) plane of tile (pc, ps); in int64
    when IDX64 (the launcher sets it once C * S can pass int32), else int32."""
    if IDX64:
        pc = pc.to(tl.int64)
        ps = ps.to(tl.int64)
    c = pc * BLOCK_C + tl.arange(0, BLOCK_C)
    sp = ps * BLOCK_S + tl.arange(0, BLOCK_S)
    return c, sp, c[:, None] * S + sp[None, :]


@triton.jit
def _coupling_y(x, s_eff, t, free, HAS_MASK: tl.constexpr, REVERSE: tl.constexpr):
    """(y, s_m) of the forward from fp32 tiles of x, s_eff, t and the broadcastable free mask (1.0 when absent)."""
    if HAS_MASK:
        s_eff = s_eff * free
        t = t * free
    if REVERSE:
        y = x * tl.exp(-s_eff) - t
    else:
        y = (x + t) * tl.exp(s_eff)
    return y, s_eff


@triton.jit
def _coupling_fwd_kernel(x_ptr, s_ptr, t_ptr, scale_ptr, mask_ptr, sldj_ptr, y_ptr, ldj_ptr,
                         C, S, W, parity, x_bs, s_bs, t_bs,
                         HAS_SCALE: tl.constexpr, MASK_MODE: tl.constexpr, REVERSE: tl.constexpr,
                         HAS_SLDJ: tl.constexpr, ONE_TILE: tl.constexpr,
                         BLOCK_C: tl.constexpr, BLOCK_S: tl.constexpr, IDX64: tl.constexpr):
    """y = (x + t_m) exp(s_m) (reverse: x exp(-s_m) - t_m) on one (BLOCK_C, BLOCK_S) tile of sample b, and the tile's
    log-det +-sum s_m: stored to ldj_ptr[b] (+ sldj[b]) when ONE_TILE, else to the partial ldj_ptr[b, tile]."""
    b = tl.program_id(0)
    pc = tl.program_id(1)
    ps = tl.program_id(2)
    c, sp, off = _tile_index(pc, ps, C, S, BLOCK_C, BLOCK_S, IDX64)
    cm = c < C
    inb = cm[:, None] & (sp < S)[None, :]
    b64 = b.to(tl.int64)
    base = b64 * C * S
    x = tl.load(x_ptr + b64 * x_bs + off, mask=inb, other=0.0).to(tl.float32)
    s = tl.load(s_ptr + b64 * s_bs + off, mask=inb, other=0.0).to(tl.float32)
    t = tl.load(t_ptr + b64 * t_bs + off, mask=inb, other=0.0).to(tl.float32)
    if HAS_SCALE:
        sc = tl.load(scale_ptr + c, mask=cm, other=0.0).to(tl.float32)
        s = sc[:, None] * tanh_f32(s)
    free = 1.0
    if MASK_MODE != 0:
        free = _free_mask(mask_ptr, off, inb, sp, W, parity, MASK_MODE)
    y, s = _coupling_y(x, s, t, free, MASK_MODE != 0, REVERSE)
    tl.store(y_ptr + base + off, y.to(y_ptr.dtype.element_ty), mask=inb)
    ldj = tl.sum(tl.sum(s, axis=1), axis=0)
    if REVERSE:
        ldj = -ldj
    if ONE_TILE:
        if HAS_SLDJ:
            ldj += tl.load(sldj_ptr + b).to(tl.float32)
        tl.store(ldj_ptr + b, ldj)
    else:
        tl.store(ldj_ptr + partial_row(b, tl.num_programs(1) * tl.num_programs(2), pc * tl.num_programs(2) + ps), ldj)


@triton.jit
def _coupling_grads(x, s_raw, t, gy, gl, sc, free, HAS_SCALE: tl.constexpr, HAS_MASK: tl.constexpr,
                    REVERSE: tl.constexpr):
    """The backward's elementwise part (formulas at _coupling_bwd_kernel) on fp32 tiles; sc and free broadcast (1.0
    when absent). Returns (gx, gs, gt, g_{s_eff} tanh(s)), the last summed into the scale gradient by the caller."""
    if HAS_SCALE:
        th = tanh_f32(s_raw)
        s = sc * th
    else:
        th = s_raw
        s = s_raw
    if HAS_MASK:
        s = s * free
        t = t * free
    if REVERSE:
        e = tl.exp(-s)
        gx = gy * e
        gt = -gy
        g_sm = -(gx * x) - gl
    else:
        e = tl.exp(s)
        gx = gy * e
        gt = gx
        g_sm = gy * (x + t) * e + gl
    if HAS_MASK:
        gt = gt * free
        g_sm = g_sm * free
    if HAS_SCALE:
        gs = g_sm * sc * tanh_slope_f32(s_raw)
    else:
        gs = g_sm
    return gx, gs, gt, g_sm * th


@triton.jit
def _coupling_bwd_kernel(x_ptr, s_ptr, t_ptr, scale_ptr, mask_ptr, gy_ptr, gldj_ptr,
                         gx_ptr, gs_ptr, gt_ptr, gscale_ptr,
                         C, S, W, parity, x_bs, s_bs, t_bs, gy_bs, gst_bs,
                         HAS_SCALE: tl.constexpr, MASK_MODE: tl.constexpr, REVERSE: tl.constexpr,
                         BLOCK_C: tl.constexpr, BLOCK_S: tl.constexpr, IDX64: tl.constexpr):
    """Backward of _coupling_fwd_kernel recomputed from its inputs (g = grad of the loss; gl = grad of ldj_out[b]):
        forward: gx = gy e^{s_m}, gt = free gx, g_{s_m} = gy y + gl;  reverse: gx = gy e^{-s_m}, gt = -free gy,
        g_{s_m} = -gy x e^{-s_m} - gl;  g_{s_eff} = free g_{s_m};  gs = g_{s_eff} scale (1 - tanh^2 s) (or g_{s_eff});
        gscale[c] partial = sum over the tile's positions of g_{s_eff} tanh(s), stored to gscale_ptr[b, ps, c]."""
    b = tl.program_id(0)
    pc = tl.program_id(1)
    ps = tl.program_id(2)
    c, sp, off = _tile_index(pc, ps, C, S, BLOCK_C, BLOCK_S, IDX64)
    cm = c < C
    inb = cm[:, None] & (sp < S)[None, :]
    b64 = b.to(tl.int64)
    base = b64 * C * S
    x = tl.load(x_ptr + b64 * x_bs + off, mask=inb, other=0.0).to(tl.float32)
    s_raw = tl.load(s_ptr + b64 * s_bs + off, mask=inb, other=0.0).to(tl.float32)
    t = tl.load(t_ptr + b64 * t_bs + off, mask=inb, other=0.0).to(tl.float32)
    gy = tl.load(gy_ptr + b64 * gy_bs + off, mask=inb, other=0.0).to(tl.float32)
    gl = tl.load(gldj_ptr + b).to(tl.float32)
    sc = 1.0
    if HAS_SCALE:
        sc = tl.load(scale_ptr + c, mask=cm, other=0.0).to(tl.float32)[:, None]
    free = 1.0
    if MASK_MODE != 0:
        free = _free_mask(mask_ptr, off, inb, sp, W, parity, MASK_MODE)
    gx, gs, gt, gsc_terms = _coupling_grads(x, s_raw, t, gy, gl, sc, free, HAS_SCALE, MASK_MODE != 0, REVERSE)
    if HAS_SCALE:
        gsc = tl.sum(tl.where(inb, gsc_terms, 0.0), axis=1)
        tl.store(gscale_ptr + partial_row(b, tl.num_programs(2), ps) * C + c, gsc, mask=cm)
    tl.store(gx_ptr + base + off, gx.to(gx_ptr.dtype.element_ty), mask=inb)
    tl.store(gs_ptr + b64 * gst_bs + off, gs.to(gs_ptr.dtype.element_ty), mask=inb)
    tl.store(gt_ptr + b64 * gst_bs + off, gt.to(gt_ptr.dtype.element_ty), mask=inb)


# ----------------------------------------------------------------------------------------------- vectors (S = 1)
# x (B, D): a program owns a (BLOCK_B rows x BLOCK_D features) tile, so a row's features are one contiguous load and a
# small D still fills the program with rows; scale and mask are (BLOCK_D,) loads per program, the log-det a row sum.
# The backward walks ITERS row tiles per program and reduces the scale gradient over them in registers: one (D,) partial
# per row program, summed in a fixed order by the launcher (no atomics, deterministic).


@triton.jit
def _vec_free(mask_ptr, cols, cm):
    """(1 - mask[d]) for the tile's features, (1, BLOCK_D)."""
    return (1.0 - tl.load(mask_ptr + cols, mask=cm, other=1.0).to(tl.float32))[None, :]


@triton.jit
def _coupling_vec_fwd_kernel(x_ptr, s_ptr, t_ptr, scale_ptr, mask_ptr, sldj_ptr, y_ptr, ldj_ptr,
                             B, D, x_bs, s_bs, t_bs,
                             HAS_SCALE: tl.constexpr, HAS_MASK: tl.constexpr, REVERSE: tl.constexpr,
                             HAS_SLDJ: tl.constexpr, ONE_TILE: tl.constexpr,
                             BLOCK_B: tl.constexpr, BLOCK_D: tl.constexpr):
    """_coupling_fwd_kernel for vectors on a (BLOCK_B, BLOCK_D) tile of rows; the row sums of s_m go to ldj_ptr[b]
    (+ sldj[b]) when ONE_TILE (the tile holds all D features), else to the partial ldj_ptr[b, feature tile]."""
    pb = tl.program_id(0)
    pd = tl.program_id(1)
    rows = pb.to(tl.int64) * BLOCK_B + tl.arange(0, BLOCK_B)
    cols = pd * BLOCK_D + tl.arange(0, BLOCK_D)
    rm = rows < B
    cm = cols < D
    inb = rm[:, None] & cm[None, :]
    x = tl.load(x_ptr + rows[:, None] * x_bs + cols[None, :], mask=inb, other=0.0).to(tl.float32)
    s = tl.load(s_ptr + rows[:, None] * s_bs + cols[None, :], mask=inb, other=0.0).to(tl.float32)
    t = tl.load(t_ptr + rows[:, None] * t_bs + cols[None, :], mask=inb, other=0.0).to(tl.float32)
    if HAS_SCALE:
        sc = tl.load(scale_ptr + cols, mask=cm, other=0.0).to(tl.float32)
        s = sc[None, :] * tanh_f32(s)
    free = 1.0
    if HAS_MASK:
        free = _vec_free(mask_ptr, cols, cm)
    y, s = _coupling_y(x, s, t, free, HAS_MASK, REVERSE)
    tl.store(y_ptr + rows[:, None] * D + cols[None, :], y.to(y_ptr.dtype.element_ty), mask=inb)
    ldj = tl.sum(s, axis=1)
    if REVERSE:
        ldj = -ldj
    if ONE_TILE:
        if HAS_SLDJ:
            ldj += tl.load(sldj_ptr + rows, mask=rm, other=0.0).to(tl.float32)
        tl.store(ldj_ptr + rows, ldj, mask=rm)
    else:
        tl.store(ldj_ptr + rows * tl.num_programs(1) + pd, ldj, mask=rm)


@triton.jit
def _coupling_vec_bwd_kernel(x_ptr, s_ptr, t_ptr, scale_ptr, mask_ptr, gy_ptr, gldj_ptr,
                             gx_ptr, gs_ptr, gt_ptr, gscale_ptr,
                             B, D, iters, x_bs, s_bs, t_bs, gy_bs, gst_bs,
                             HAS_SCALE: tl.constexpr, HAS_MASK: tl.constexpr, REVERSE: tl.constexpr,
                             BLOCK_B: tl.constexpr, BLOCK_D: tl.constexpr):
    """_coupling_bwd_kernel for vectors: row tiles pb * iters ... pb * iters + iters - 1 of (BLOCK_B, BLOCK_D); the
    scale gradient summed over them in registers and stored once, to gscale_ptr[pb, d]."""
    pb = tl.program_id(0)
    pd = tl.program_id(1)
    cols = pd * BLOCK_D + tl.arange(0, BLOCK_D)
    cm = cols < D
    sc = 1.0
    if HAS_SCALE:
        sc = tl.load(scale_ptr + cols, mask=cm, other=0.0).to(tl.float32)[None, :]
    free = 1.0
    if HAS_MASK:
        free = _vec_free(mask_ptr, cols, cm)
    gsc = tl.zeros([BLOCK_D], dtype=tl.float32)
    for it in range(iters):
        rows = (pb.to(tl.int64) * iters + it) * BLOCK_B + tl.arange(0, BLOCK_B)
        rm = rows < B
        inb = rm[:, None] & cm[None, :]
        x = tl.load(x_ptr + rows[:, None] * x_bs + cols[None, :], mask=inb, other=0.0).to(tl.float32)
        s_raw = tl.load(s_ptr + rows[:, None] * s_bs + cols[None, :], mask=inb, other=0.0).to(tl.float32)
        t = tl.load(t_ptr + rows[:, None] * t_bs + cols[None, :], mask=inb, other=0.0).to(tl.float32)
        gy = tl.load(gy_ptr + rows[:, None] * gy_bs + cols[None, :], mask=inb, other=0.0).to(tl.float32)
        gl = tl.load(gldj_ptr + rows, mask=rm, other=0.0).to(tl.float32)[:, None]
        gx, gs, gt, gsc_terms = _coupling_grads(x, s_raw, t, gy, gl, sc, free, HAS_SCALE, HAS_MASK, REVERSE)
        if HAS_SCALE:
            gsc += tl.sum(tl.where(inb, gsc_terms, 0.0), axis=0)
        out = rows[:, None] * D + cols[None, :]
        tl.store(gx_ptr + out, gx.to(gx_ptr.dtype.element_ty), mask=inb)
        tl.store(gs_ptr + rows[:, None] * gst_bs + cols[None, :], gs.to(gs_ptr.dtype.element_ty), mask=inb)
        tl.store(gt_ptr + rows[:, None] * gst_bs + cols[None, :], gt.to(gt_ptr.dtype.element_ty), mask=inb)
    if HAS_SCALE:
        tl.store(gscale_ptr + pb.to(tl.int64) * D + cols, gsc, mask=cm)


_VEC_ROW_PROGRAMS = 512     # backward: at most this many row programs (a few per SM), each walking several row tiles


def _coupling_vec_forward(x, s, t, scale, mask, reverse, sldj, x_bs, s_bs, t_bs):
    b, d = x.shape
    y = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    block_b, block_d = tile_2d(b, d)
    grid = (triton.cdiv(b, block_b), triton.cdiv(d, block_d))
    check_grid(grid, "coupling")
    one_tile = grid[1] == 1
    ldj = torch.empty((b,) if one_tile else (b, grid[1]), dtype=torch.float32, device=x.device)
    _coupling_vec_fwd_kernel[grid](
        x, s, t, scale.contiguous() if scale is not None else x, mask.contiguous() if mask is not None else x,
        sldj.contiguous() if sldj is not None else ldj, y, ldj, b, d, x_bs, s_bs, t_bs,
        HAS_SCALE=scale is not None, HAS_MASK=mask is not None, REVERSE=bool(reverse), HAS_SLDJ=sldj is not None,
        ONE_TILE=one_tile, BLOCK_B=block_b, BLOCK_D=block_d, num_warps=num_warps_for(block_b * block_d))
    if not one_tile:
        ldj = ldj.sum(1)
        if sldj is not None:
            ldj = ldj + sldj
    return y, ldj


def _coupling_vec_backward(grad_y, grad_ldj, x, s, t, scale, mask, reverse, gx, gs, gt, strides):
    b, d = x.shape
    block_b, block_d = tile_2d(b, d)
    tiles = triton.cdiv(b, block_b)
    iters = triton.cdiv(tiles, min(tiles, _VEC_ROW_PROGRAMS))
    grid = (triton.cdiv(tiles, iters), triton.cdiv(d, block_d))
    check_grid(grid, "coupling")
    gscale = None if scale is None else torch.empty((grid[0], d), dtype=torch.float32, device=x.device)
    _coupling_vec_bwd_kernel[grid](
        x, s, t, scale.contiguous() if scale is not None else x, mask.contiguous() if mask is not None else x,
        grad_y, grad_ldj.contiguous(), gx, gs, gt, gscale if gscale is not None else gx,
        b, d, iters, *strides,
        HAS_SCALE=scale is not None, HAS_MASK=mask is not None, REVERSE=bool(reverse),
        BLOCK_B=block_b, BLOCK_D=block_d, num_warps=num_warps_for(block_b * block_d))
    return None if gscale is None else gscale.sum(0)


def _geometry(x: torch.Tensor, checker_parity: int):
    """(B, C, S, W) of the (B, C, S) view; W is only used by the checkerboard."""
    b, c = x.shape[0], x.shape[1]
    s = math.prod(x.shape[2:])
    w = x.shape[-1] if checker_parity >= 0 else 1
    return b, c, s, w


def _plane_dense(x: torch.Tensor) -> bool:
    """Each sample's (C, *S) plane is dense and row-major (any batch stride)."""
    expected = 1
    for size, stride in zip(reversed(x.shape[1:]), reversed(x.stride()[1:])):
        if size != 1 and stride != expected:
            return False
        expected *= size
    return True


def _planes(x: torch.Tensor) -> tuple[torch.Tensor, int]:
    """(x, its batch stride) when its planes are dense, else (a contiguous copy, C * S)."""
    if not _plane_dense(x):
        x = x.contiguous()
    return x, x.stride(0) if x.shape[0] > 1 else math.prod(x.shape[1:])


def _split_st(x, s, t):
    """t None: s is the joint (B, 2C, *S) s/t tensor -> its two halves (views)."""
    if t is None:
        c = x.shape[1]
        return s.narrow(1, 0, c), s.narrow(1, c, c)
    return s, t


def _mask_mode(mask, checker_parity: int) -> int:
    return 2 if checker_parity >= 0 else 1 if mask is not None else 0


@on_input_device
def coupling_forward(x, s, t, scale, mask, checker_parity: int, reverse: bool, sldj):
    """Launch the fused coupling: x, s, t (B, C, *S) fp32/bf16/fp16; scale None or (C,); mask None or (C, *S);
    checker_parity -1/0/1; sldj None or (B,) fp32. Returns (y (B, C, *S) in x.dtype, ldj_out (B,) fp32) with
    ldj_out = sldj + (+-sum s_m). One launch (plus a (B, tiles) partial sum when a sample spans several tiles)."""
    s, t = _split_st(x, s, t)
    (x, x_bs), (s, s_bs), (t, t_bs) = _planes(x), _planes(s), _planes(t)
    b, c, n_s, w = _geometry(x, checker_parity)
    if b == 0:
        return torch.empty(x.shape, dtype=x.dtype, device=x.device), torch.zeros(0, dtype=torch.float32, device=x.device)
    if x.dim() == 2:
        return _coupling_vec_forward(x, s, t, scale, mask, reverse, sldj, x_bs, s_bs, t_bs)
    y = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    block_c, block_s = tile_2d(c, n_s)
    grid = (b, triton.cdiv(c, block_c), triton.cdiv(n_s, block_s))
    check_grid(grid, "coupling")
    one_tile = grid[1] * grid[2] == 1
    ldj = torch.empty((b,) if one_tile else (b, grid[1] * grid[2]), dtype=torch.float32, device=x.device)
    mode = _mask_mode(mask, checker_parity)
    _coupling_fwd_kernel[grid](
        x, s, t, scale.contiguous() if scale is not None else x, mask.contiguous() if mode == 1 else x,
        sldj.contiguous() if sldj is not None else ldj, y, ldj,
        c, n_s, w, max(checker_parity, 0), x_bs, s_bs, t_bs,
        HAS_SCALE=scale is not None, MASK_MODE=mode, REVERSE=bool(reverse), HAS_SLDJ=sldj is not None,
        ONE_TILE=one_tile, BLOCK_C=block_c, BLOCK_S=block_s, IDX64=wide_index(c * n_s),
        num_warps=num_warps_for(block_c * block_s))
    if not one_tile:
        ldj = ldj.sum(1)
        if sldj is not None:
            ldj = ldj + sldj
    return y, ldj


@on_input_device
def coupling_backward(grad_y, grad_ldj, x, s, t, scale, mask, checker_parity: int, reverse: bool):
    """Backward of :func:`coupling_forward` from its inputs: grad_y (B, C, *S), grad_ldj (B,) fp32 (the grad of
    ldj_out; the grad of sldj is grad_ldj itself). Returns (grad_x, grad_s, grad_t, grad_scale (C,) fp32 or None);
    with t None (s joint), grad_s is the joint (B, 2C, *S) gradient and grad_t None.
    One launch; grad_scale is the sum of per-(sample, spatial tile) partials of shape (B * tiles, C)."""
    joint = t is None
    s, t = _split_st(x, s, t)
    (x, x_bs), (s, s_bs), (t, t_bs), (grad_y, gy_bs) = _planes(x), _planes(s), _planes(t), _planes(grad_y)
    b, c, n_s, w = _geometry(x, checker_parity)
    gx = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    # s and t gradients: the halves of one (B, 2C, *S) tensor (t None), else two contiguous tensors
    if joint:
        gst = torch.empty((b, 2 * c, *x.shape[2:]), dtype=x.dtype, device=x.device)
        gs, gt = gst.narrow(1, 0, c), gst.narrow(1, c, c)
    else:
        gst, gs, gt = None, torch.empty_like(gx), torch.empty_like(gx)
    gst_bs = 2 * c * n_s if joint else c * n_s
    block_c, block_s = tile_2d(c, n_s)
    grid = (b, triton.cdiv(c, block_c), triton.cdiv(n_s, block_s))
    if b == 0:
        return (gx, gst if joint else gs, None if joint else gt,
                None if scale is None else torch.zeros(c, dtype=torch.float32, device=x.device))
    if x.dim() == 2:
        gscale = _coupling_vec_backward(grad_y, grad_ldj, x, s, t, scale, mask, reverse, gx, gs, gt,
                                        (x_bs, s_bs, t_bs, gy_bs, gst_bs))
        return gx, gst if joint else gs, None if joint else gt, gscale
    check_grid(grid, "coupling")
    gscale = None if scale is None else torch.empty((b * grid[2], c), dtype=torch.float32, device=x.device)
    mode = _mask_mode(mask, checker_parity)
    _coupling_bwd_kernel[grid](
        x, s, t, scale.contiguous() if scale is not None else x, mask.contiguous() if mode == 1 else x,
        grad_y, grad_ldj.contiguous(), gx, gs, gt, gscale if gscale is not None else gx,
        c, n_s, w, max(checker_parity, 0), x_bs, s_bs, t_bs, gy_bs, gst_bs,
        HAS_SCALE=scale is not None, MASK_MODE=mode, REVERSE=bool(reverse),
        BLOCK_C=block_c, BLOCK_S=block_s, IDX64=wide_index(c * n_s), num_warps=num_warps_for(block_c * block_s))
    return gx, gst if joint else gs, None if joint else gt, None if gscale is None else gscale.sum(0)
