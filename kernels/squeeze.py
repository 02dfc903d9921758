"""RealNVP 2x2 squeeze / unsqueeze as one gather-scatter pass (a pure permutation, log-det 0).

Squeezed layout (B, 4C, H/2, W/2), unsqueezed (B, C, H, W). For squeezed channel o:
    default order: c = o // 4, k = o % 4, (i, j) = (k // 2, k % 2)
    alt order:     c = o % C,  k = o // C, (i, j) = (0,0), (1,1), (0,1), (1,0) for k = 0..3, i.e. i = k % 2,
                   j = (k == 1) | (k == 2)
and squeezed[b, o, h, w] = unsqueezed[b, c, 2h + i, 2w + j].

Mapping: a program owns BLOCK_R row pairs r = (c, h) of one sample times BLOCK_W output columns. Row pair r is the two
unsqueezed rows 2h and 2h + 1 of channel c, i.e. the 4 W2 contiguous elements [4 W2 r, 4 W2 (r + 1)) of the sample
(W2 = W / 2): they are read (forward) or written (reverse) as one contiguous (2, 2 BLOCK_W) tile, split into the
even (j = 0) and odd (j = 1) columns, and each half goes to / comes from rows of the squeezed tensor whose W2 elements
are contiguous too. The only integer divisions are per program (sample, tile) and per row pair (c = r // H2), in
int32: offsets are int32 within a sample plus one int64 base per sample (int64 throughout, IDX64, for a sample of
2^31 elements or more).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import next_pow2, num_warps_for, on_input_device, wide_index

__all__ = ["squeeze2x2"]

_TILE = 2048     # elements per program (unsqueezed rows of a row-pair tile x columns)
_MAX_BLOCK_W = 256


@triton.jit
def _squeeze2x2_kernel(src_ptr, dst_ptr, N, C, H2, W2, tiles_r, tiles_w,
                       REVERSE: tl.constexpr, ALT_ORDER: tl.constexpr, BLOCK_R: tl.constexpr,
                       BLOCK_W: tl.constexpr, IDX64: tl.constexpr):
    """Forward dst[b, o(c, i, j), h, w] = src[b, c, 2h + i, 2w + j]; reverse the same assignment the other way."""
    pid = tl.program_id(0)
    per_sample = tiles_r * tiles_w
    b = pid // per_sample
    t = pid - b * per_sample
    tr = t // tiles_w
    tw = t - tr * tiles_w
    base = b.to(tl.int64) * N                                   # the sample's first element, both layouts
    r = tr * BLOCK_R + tl.arange(0, BLOCK_R)                    # row pairs (c, h) of this sample
    if IDX64:
        r = r.to(tl.int64)
    c = r // H2
    h = r - c * H2
    i = tl.arange(0, 2)                                         # the pair's upper / lower unsqueezed row
    w = tw * BLOCK_W + tl.arange(0, BLOCK_W)                    # squeezed column
    e = tw * (2 * BLOCK_W) + tl.arange(0, 2 * BLOCK_W)          # unsqueezed column 2w + j
    row_ok = r < C * H2
    # unsqueezed offsets (BLOCK_R, 2, 2 BLOCK_W): contiguous along the last axis
    u = r[:, None, None] * (4 * W2) + i[None, :, None] * (2 * W2) + e[None, None, :]
    mu = row_ok[:, None, None] & (e < 2 * W2)[None, None, :]
    # squeezed channels of the even (j = 0) and odd (j = 1) columns, (BLOCK_R, 2, 1)
    if ALT_ORDER:       # k = 2 (i xor j) + i: j = 0 -> k = 3i, j = 1 -> k = 2 - i
        o0 = (3 * i)[None, :, None] * C + c[:, None, None]
        o1 = (2 - i)[None, :, None] * C + c[:, None, None]
    else:               # o = 4c + 2i + j
        o0 = 4 * c[:, None, None] + 2 * i[None, :, None]
        o1 = o0 + 1
    hw = h[:, None, None] * W2 + w[None, None, :]
    q0 = o0 * (H2 * W2) + hw                                   # (BLOCK_R, 2, BLOCK_W): contiguous along w
    q1 = o1 * (H2 * W2) + hw
    mq = row_ok[:, None, None] & (w < W2)[None, None, :]
    src = src_ptr + base
    dst = dst_ptr + base
    if REVERSE:
        even = tl.load(src + q0, mask=mq)
        odd = tl.load(src + q1, mask=mq)
        v = tl.reshape(tl.join(even, odd), [BLOCK_R, 2, 2 * BLOCK_W])
        tl.store(dst + u, v, mask=mu)
    else:
        v = tl.load(src + u, mask=mu)
        even, odd = tl.split(tl.reshape(v, [BLOCK_R, 2, BLOCK_W, 2]))
        tl.store(dst + q0, even, mask=mq)
        tl.store(dst + q1, odd, mask=mq)


def squeeze_tiles(rows: int, w2: int) -> tuple[int, int]:
    """(BLOCK_R, BLOCK_W) for a sample of `rows` row pairs of 4 * w2 elements: whole rows when they fit."""
    block_w = min(next_pow2(w2), _MAX_BLOCK_W)
    block_r = min(next_pow2(rows), max(1, _TILE // (4 * block_w)))
    return block_r, block_w


@on_input_device
def squeeze2x2(x: torch.Tensor, reverse: bool, alt_order: bool) -> torch.Tensor:
    """x (B, C, H, W) -> (B, 4C, H/2, W/2), or the inverse when ``reverse`` (x (B, 4C, H, W) -> (B, C, 2H, 2W)).
    Any dtype (a copy); one launch."""
    x = x.contiguous()
    b, c_in, h, w = x.shape
    if reverse:
        c, h2, w2 = c_in // 4, h, w
        out = torch.empty((b, c, 2 * h, 2 * w), dtype=x.dtype, device=x.device)
    else:
        c, h2, w2 = c_in, h // 2, w // 2
        out = torch.empty((b, 4 * c, h2, w2), dtype=x.dtype, device=x.device)
    if out.numel() == 0:
        return out
    n = out.numel() // b
    rows = c * h2
    block_r, block_w = squeeze_tiles(rows, w2)
    tiles_r, tiles_w = triton.cdiv(rows, block_r), triton.cdiv(w2, block_w)
    programs = b * tiles_r * tiles_w
    if programs >= 2**31:
        raise ValueError(f"squeeze2x2: {programs} programs exceed the grid's 2^31 - 1; use the native or torch backend")
    _squeeze2x2_kernel[(programs,)](x, out, n, c, h2, w2, tiles_r, tiles_w, REVERSE=bool(reverse),
                                    ALT_ORDER=bool(alt_order), BLOCK_R=block_r, BLOCK_W=block_w,
                                    IDX64=wide_index(n), num_warps=num_warps_for(4 * block_r * block_w))
    return out
