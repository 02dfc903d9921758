"""RealNVP 2x2 squeeze / unsqueeze as one gather-scatter pass (a pure permutation, log-det 0).

Squeezed layout (B, 4C, H/2, W/2), unsqueezed (B, C, H, W). For squeezed channel o:
    default order: c = o // 4, k = o % 4, (i, j) = (k // 2, k % 2)
    alt order:     c = o % C,  k = o // C, (i, j) = (0,0), (1,1), (0,1), (1,0) for k = 0..3, i.e. i = k % 2,
                   j = (k == 1) | (k == 2)
and squeezed[b, o, h, w] = unsqueezed[b, c, 2h + i, 2w + j].
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import on_input_device

__all__ = ["squeeze2x2"]

_BLOCK = 1024


@triton.jit
def _squeeze2x2_kernel(src_ptr, dst_ptr, n, C, H2, W2,
                       REVERSE: tl.constexpr, ALT_ORDER: tl.constexpr, BLOCK: tl.constexpr):
    """One element per squeezed index q: forward dst[q] = src[u(q)], reverse dst[u(q)] = src[q], with u(q) the
    unsqueezed index of q (see the module docstring)."""
    q = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    m = q < n
    w2 = q % W2
    h2 = (q // W2) % H2
    o = (q // (W2 * H2)) % (4 * C)
    b = q // (W2 * H2 * 4 * C)
    if ALT_ORDER:
        c = o % C
        k = o // C
        i = k % 2
        j = ((k == 1) | (k == 2)).to(tl.int64)
    else:
        c = o // 4
        i = (o // 2) % 2
        j = o % 2
    u = ((b * C + c) * (2 * H2) + 2 * h2 + i) * (2 * W2) + 2 * w2 + j
    if REVERSE:
        tl.store(dst_ptr + u, tl.load(src_ptr + q, mask=m), mask=m)
    else:
        tl.store(dst_ptr + q, tl.load(src_ptr + u, mask=m), mask=m)


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
    n = out.numel()
    if n == 0:
        return out
    _squeeze2x2_kernel[(triton.cdiv(n, _BLOCK),)](x, out, n, c, h2, w2, REVERSE=bool(reverse),
                                                   ALT_ORDER=bool(alt_order), BLOCK=_BLOCK, num_warps=4)
    return out
