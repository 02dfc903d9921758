"""The fused coupling on vectors, x of shape (B, D) (RealNVPTabular): forward, log-det and every gradient against the
reference, on the native CPU kernel and the Triton kernels (interpreter here). The Triton vector kernels tile
(rows x features) per program and reduce the scale gradient in the kernel over several row tiles (one partial per row
program, summed in a fixed order); the shapes below cover one row, odd sizes, a row count one past a power of two
(257, a partly masked last row tile), D = 768 (the text-embedding width) and several row tiles per program."""

from __future__ import annotations

import pytest
import torch
from helpers import backend_devices, use

from flowgmm_fast.ops import reference as R

BACKENDS = [(b, d) for b in ("native", "triton") for d in backend_devices(b)]
DTYPE = {"native": torch.float64, "triton": torch.float32}
TOL = {torch.float64: {"rtol": 1e-12, "atol": 1e-12}, torch.float32: {"rtol": 2e-5, "atol": 2e-5}}
SHAPES = [(1, 1), (3, 5), (257, 8), (64, 768)]


def _op(backend):
    if backend == "native":
        from flowgmm_fast.ops import native_ops as ops
    else:
        from flowgmm_fast.ops import triton_ops as ops
    return ops.affine_coupling


def _case(shape, mask, scale, sldj, device, dtype, seed=0, chunk=False):
    gen = torch.Generator().manual_seed(seed)
    b, d = shape
    x, s, t = (torch.randn(shape, generator=gen, dtype=torch.float64) for _ in range(3))
    if chunk:   # s and t as the halves of one (B, 2D) tensor: batch stride 2D, read in place
        st = torch.cat([s, t], 1)
        s, t = st[:, :d], st[:, d:]
    sc = torch.rand(d, generator=gen, dtype=torch.float64) + 0.5 if scale else None
    m = (torch.rand(d, generator=gen) > 0.5).to(torch.float64) if mask else None
    sl = torch.randn(b, generator=gen, dtype=torch.float64) if sldj else None
    gy, gl = torch.randn(shape, generator=gen, dtype=torch.float64), torch.randn(b, generator=gen, dtype=torch.float64)
    conv = [None if v is None else v.to(device=device, dtype=dtype) for v in (x, s, t, sc, m, sl, gy, gl)]
    conv[5] = None if sl is None else sl.to(device=device, dtype=torch.float32 if dtype != torch.float64 else dtype)
    return conv


def _run(fn, x, s, t, sc, m, sl, gy, gl, reverse):
    leaves = [v.detach().clone().requires_grad_() for v in (x, s, t)] + (
        [sc.detach().clone().requires_grad_()] if sc is not None else [])
    y, ldj = fn(leaves[0], leaves[1], leaves[2], leaves[3] if sc is not None else None, m, -1, reverse, sl)
    grads = torch.autograd.grad((y, ldj), leaves, (gy, gl.to(ldj.dtype)))
    return [y, ldj, *grads]


@pytest.mark.parametrize("backend,device", BACKENDS)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("mask,scale,sldj", [(False, False, False), (True, True, True), (True, False, True),
                                             (False, True, False)])
@pytest.mark.parametrize("reverse", [False, True])
def test_vector_coupling_matches_reference(backend, device, shape, mask, scale, sldj, reverse):
    dtype = DTYPE[backend]
    args = _case(shape, mask, scale, sldj, device, dtype, seed=shape[0] * 31 + shape[1])
    with use(backend):
        got = _run(_op(backend), *args, reverse)
    ref = _run(R.affine_coupling, *args, reverse)
    names = ["y", "ldj", "grad x", "grad s", "grad t", "grad scale"]
    for name, a, b in zip(names, got, ref):
        torch.testing.assert_close(a, b.to(a.dtype), **TOL[dtype], msg=lambda e, n=name: f"{n}: {e}")


@pytest.mark.parametrize("backend,device", BACKENDS)
@pytest.mark.parametrize("shape", [(1100, 3), (5, 1500)])
def test_vector_coupling_many_tiles_and_chunk_views(backend, device, shape):
    """(1100, 3): 1100 rows of 3 features in 1024-row tiles, the last one nearly empty; (5, 1500): two feature tiles
    (partial log-dets summed by the launcher). s and t are views into one (B, 2D) tensor."""
    dtype = DTYPE[backend]
    args = _case(shape, True, True, True, device, dtype, seed=7, chunk=True)
    with use(backend):
        got = _run(_op(backend), *args, False)
    ref = _run(R.affine_coupling, *args, False)
    for a, b in zip(got, ref):
        torch.testing.assert_close(a, b.to(a.dtype), **TOL[dtype])


def test_triton_vector_backward_reduces_over_row_programs(monkeypatch):
    """Force several row tiles per program (iters > 1) and several row programs: the scale gradient is the fixed-order
    sum of per-program partials, equal to the reference; two runs are bitwise identical."""
    devices = backend_devices("triton")
    if not devices:
        pytest.skip("triton backend unavailable")
    from flowgmm_fast.kernels import coupling

    monkeypatch.setattr(coupling, "_VEC_ROW_PROGRAMS", 3)
    monkeypatch.setattr(coupling, "tile_2d", lambda rows, cols: (4, triton_next_pow2(cols)))
    args = _case((37, 6), True, True, True, devices[0], torch.float32, seed=3)
    with use("triton"):
        got = _run(_op("triton"), *args, False)
        again = _run(_op("triton"), *args, False)
    ref = _run(R.affine_coupling, *args, False)
    for a, b, c in zip(got, ref, again):
        torch.testing.assert_close(a, b.to(a.dtype), **TOL[torch.float32])
        assert torch.equal(a, c)


def triton_next_pow2(n: int) -> int:
    return 1 << max(int(n) - 1, 0).bit_length()
