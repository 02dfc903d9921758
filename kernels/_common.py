"""Small @triton.jit helpers shared by the kernels, and launch-size helpers for the launchers."""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

# An offset that can reach this is computed in int64 (the IDX64 constexpr of the kernels): Triton computes i32 * i32 in
# i32, which wraps silently. The margin covers the lanes of the last tile that run past the end (masked, but indexed).
WIDE_INDEX = 2**31 - 2**16


@triton.jit
def tanh_f32(x):
    """tanh(x) for fp32 x, accurate near 0 (odd Taylor series for |x| < 0.1, else (1 - e^{-2|x|}) / (1 + e^{-2|x|})).

    Written out because libdevice.tanh has no Triton-interpreter implementation (CPU tests run the same kernels).
    """
    a = tl.abs(x)
    e = tl.exp(-2.0 * a)
    big = (1.0 - e) / (1.0 + e)
    a2 = a * a
    small = a * (1.0 + a2 * (-0.3333333333333333 + a2 * (0.13333333333333333 + a2 * -0.05396825396825397)))
    r = tl.where(a < 0.1, small, big)
    return tl.where(x < 0, -r, r)


@triton.jit
def tanh_slope_f32(x):
    """1 - tanh(x)^2 for fp32 x as q (2 - q), q = 1 - |tanh x| = 2 e / (1 + e), e = exp(-2|x|): no cancellation (as
    1 - tanh^2 it would carry tanh's absolute rounding error, its whole size once |x| > 8), and 0 where e underflows."""
    e = tl.exp(-2.0 * tl.abs(x))
    q = 2.0 * e / (1.0 + e)
    return q * (2.0 - q)


@triton.jit
def partial_row(b, n, p):
    """Row b * n + p of a (B * n, ...) buffer of partial sums, in int64: with the row length this product passes 2^31
    at sizes that fit one GPU (e.g. B = 2^21 samples x 1024 channels)."""
    return b.to(tl.int64) * n + p


def wide_index(*extents: int) -> bool:
    """True when an offset within one of these extents (elements of a sample, of the means, ...) can pass int32: the
    kernels then index in int64 (their IDX64 constexpr), else in int32 (cheaper, and exact below the limit)."""
    return any(int(e) >= WIDE_INDEX for e in extents)


def on_input_device(launcher):
    """Run a launcher with its first argument's CUDA device current. Triton launches on the current device and its
    current stream, so without this a tensor on cuda:1 while cuda:0 is current would be read on the wrong device;
    torch.cuda.device also makes cuda:1's current stream the one Triton launches on. CPU tensors (the interpreter)
    run as they are."""

    @functools.wraps(launcher)
    def launch(first, *args, **kwargs):
        if first.device.type != "cuda":
            return launcher(first, *args, **kwargs)
        with torch.cuda.device(first.device):
            return launcher(first, *args, **kwargs)

    launch.on_input_device = True
    return launch


def check_grid(grid: tuple, what: str) -> None:
    """CUDA grids allow 65535 programs on axes 1 and 2: a clear error instead of a failed launch."""
    for axis, n in enumerate(grid[1:], 1):
        if n > 65535:
            raise ValueError(f"{what}: {n} tiles on grid axis {axis} exceed CUDA's 65535 (a sample too large for the "
                             f"triton kernels); use the native or torch backend")


def next_pow2(n: int) -> int:
    return triton.next_power_of_2(max(int(n), 1))


def tile_2d(rows: int, cols: int, max_cols: int = 1024, max_elems: int = 4096) -> tuple[int, int]:
    """(BLOCK_ROWS, BLOCK_COLS) powers of two for a (rows, cols) row-major view: full rows when they fit. 4096
    elements hold a whole realistic coupling sample (C = 12, 16 x 16), so its log-det needs no second pass."""
    block_cols = min(next_pow2(cols), max_cols)
    block_rows = min(next_pow2(rows), max(1, max_elems // block_cols))
    return block_rows, block_cols


def num_warps_for(elems: int) -> int:
    return 8 if elems >= 4096 else 4 if elems >= 1024 else 2 if elems >= 256 else 1
