"""The fused coupling on the layouts the coupling layer hands it, on every backend that runs here.

AffineCoupling passes its s/t net's output whole (``t=None``: s holds s then t on dim 1), the channel coupling's
halves as ``.chunk(2, 1)`` views, and the gradient of y arrives as a slice of the gradient of ``torch.cat``. The
native and triton kernels read tensors whose per-sample (C, *S) planes are dense at their batch strides (no copy) and
copy anything else (channels_last, transposed). Each case checks the forward and every gradient against the reference
on contiguous copies, and the native cases check that no copy was made (the profiler, and the gradient buffer).
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from flowgmm_fast.nn import AffineCoupling
from flowgmm_fast.ops import reference as R
from helpers import backend_devices, use

BACKENDS = [(b, d) for b in ("native", "triton") for d in backend_devices(b)]
# native computes float64 itself; triton runs float64 on the reference, so it is tested in float32 (tiny sizes: the
# interpreter runs it on the CPU)
DTYPE = {"native": torch.float64, "triton": torch.float32}
TOL = {torch.float64: dict(rtol=1e-12, atol=1e-12), torch.float32: dict(rtol=1e-5, atol=1e-5)}


def _op(backend):
    if backend == "native":
        from flowgmm_fast.ops import native_ops as ops
    else:
        from flowgmm_fast.ops import triton_ops as ops
    return ops.affine_coupling


def _layout(base: torch.Tensor, layout: str, c: int):
    """Tensors of shape base.shape with channels c, laid out as `layout`: "contiguous", "chunk" (the second half of
    a (B, 2c, *S) tensor: dense planes, batch stride 2c S), "channels_last" or "transposed" (not plane-dense)."""
    if layout == "contiguous":
        return base.contiguous()
    if layout == "chunk":
        wide = torch.cat([torch.full_like(base, float("nan")), base], dim=1)  # the first half must never be read
        return wide.chunk(2, dim=1)[1]
    if layout == "channels_last":
        return base.contiguous(memory_format=torch.channels_last)
    if layout == "transposed":
        return base.transpose(-1, -2).contiguous().transpose(-1, -2)
    raise ValueError(layout)


CASES = [((3, 2, 4, 6), mask, scale) for mask in ("none", "checker1", "tensor") for scale in (False, True)] + [
    ((3, 5), "none", True), ((3, 6), "tensor", True)]


def _inputs(shape, mask, scale, device, dtype, seed=0):
    gen = torch.Generator().manual_seed(seed)
    x, s, t = (torch.randn(shape, generator=gen, dtype=torch.float64) for _ in range(3))
    sc = torch.rand(shape[1], generator=gen, dtype=torch.float64) + 0.5 if scale else None
    sl = torch.randn(shape[0], generator=gen, dtype=torch.float64)
    m, parity = None, -1
    if mask == "tensor":
        m = (torch.rand(shape[1:], generator=gen) > 0.5).to(dtype).to(device)
    elif mask.startswith("checker"):
        parity = int(mask[-1])
    to = (lambda v: None if v is None else v.to(device, dtype))
    return [to(v) for v in (x, s, t, sc)] + [sl.to(device)], m, parity


def _run(op, x, s, t, sc, m, parity, reverse, sl, gy_layout):
    """Forward, then backward with the gradient of y laid out as gy_layout: (y, ldj, grads of x, s, t, scale)."""
    leaves = [v.detach().requires_grad_() if v is not None else None for v in (x, s, t, sc)]
    xl, sl_, tl_, scl = leaves
    y, ldj = op(xl, sl_, tl_, scl, m, parity, reverse, sl)
    gen = torch.Generator().manual_seed(1)
    gy = torch.randn(y.shape, generator=gen, dtype=torch.float64).to(y.device, y.dtype)
    gl = torch.randn(ldj.shape, generator=gen, dtype=torch.float64).to(ldj.device, ldj.dtype)
    if gy_layout == "chunk" and y.dim() > 1:  # y's gradient a slice of cat's: batch-strided
        wide = torch.cat([y, y], dim=1)
        loss = (wide * torch.cat([gy, gy], dim=1)).sum() / 2 + (ldj * gl).sum()
    else:
        loss = (y * gy).sum() + (ldj * gl).sum()
    grads = torch.autograd.grad(loss, [v for v in leaves if v is not None])
    return y, ldj, grads


@pytest.mark.parametrize("backend,device", BACKENDS)
@pytest.mark.parametrize("shape,mask,scale", CASES)
@pytest.mark.parametrize("layout", ["chunk", "joint", "channels_last", "transposed"])
@pytest.mark.parametrize("reverse", [False, True])
def test_layouts_match_reference(backend, device, shape, mask, scale, layout, reverse):
    if layout in ("channels_last", "transposed") and len(shape) != 4:
        pytest.skip("an image layout")
    dtype = DTYPE[backend]
    (x, s, t, sc, sl), m, parity = _inputs(shape, mask, scale, device, dtype)
    c = shape[1]
    ref = _run(R.affine_coupling, x, s, t, sc, m, parity, reverse, sl, "contiguous")
    if layout == "joint":  # s and t as one (B, 2C, *S) tensor, itself a chunk view of a (B, 4C, *S) one
        st = _layout(torch.cat([s, t], dim=1), "chunk", 2 * c)
        y, ldj, grads = _run(_op(backend), _layout(x, "chunk", c), st, None, sc, m, parity, reverse, sl, "chunk")
        g_st = grads[1]
        assert g_st.shape == st.shape
        grads = (grads[0], *g_st.chunk(2, dim=1), *grads[2:])
    else:
        x_, s_, t_ = (_layout(v, layout, c) for v in (x, s, t))
        y, ldj, grads = _run(_op(backend), x_, s_, t_, sc, m, parity, reverse, sl, layout)
    tol = TOL[dtype]
    torch.testing.assert_close(y, ref[0], **tol)
    torch.testing.assert_close(ldj, ref[1].to(ldj.dtype), **tol)
    assert y.is_contiguous()
    assert len(grads) == len(ref[2])
    for name, g, r in zip(("x", "s", "t", "scale"), grads, ref[2]):
        torch.testing.assert_close(g, r, **tol, msg=lambda msg: f"grad {name}: {msg}")


def _native_ops():
    return torch.ops.flowgmm_native


@pytest.mark.parametrize("device", backend_devices("native"))
def test_native_joint_gradient_is_one_tensor(device):
    """t=None: the backward op returns the s/t gradient as one contiguous (B, 2C, *S) tensor (no concatenation
    after it) and an empty t gradient; fake (meta) shapes agree."""
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(2, 3, 4, 4, generator=gen).to(device)
    st = torch.randn(2, 6, 4, 4, generator=gen).to(device)
    gx, gst, gt, gsc = _native_ops().coupling_bwd(torch.randn_like(x), None, x, st, None, None, None, 0, False)
    assert gst.shape == st.shape and gst.is_contiguous() and gt.numel() == 0 and gsc.numel() == 0
    torch.library.opcheck(_native_ops().coupling_bwd.default, (torch.randn_like(x), None, x, st, None, None, None, 0,
                                                               False))
    torch.library.opcheck(_native_ops().coupling_fwd.default,
                          (x.requires_grad_(), st.requires_grad_(), None, None, None, 1, False, None))
    with pytest.raises(RuntimeError, match="without t, s must hold s and t"):
        _native_ops().coupling_fwd(x, x, None, None, None, 0, False, None)


_COPIES = ("aten::contiguous", "aten::clone", "aten::copy_", "aten::cat")


def _profiled_copies(layer, x):
    """Forward + backward of the layer on the native backend under the profiler: the copy-type ops (contiguous,
    clone, copy_, cat) that ran inside a flowgmm_native op, every cat, and the others that moved at least two samples'
    worth of elements, each as (name, the chain of ops above it) -- except those inside the s/t net's convolution
    (its own business: mkldnn copies a strided input, the slow path writes its bias with copy_)."""
    from torch.profiler import profile

    cot = torch.randn_like(x)  # a loss whose own backward copies nothing (y.square() would)
    with use("native"), profile(record_shapes=True) as prof:
        y, ldj = layer(x)
        ((y * cot).sum() + ldj.sum()).backward()
    big = 2 * x[0].numel()
    found = []

    def walk(ev, chain):
        numel = max((math.prod(shape) for shape in ev.input_shapes if shape), default=0)
        # (cat's tensor-list input has no recorded shape: every cat counts)
        in_conv = any("convolution" in c for c in chain)
        if ev.name in _COPIES and not in_conv and (ev.name == "aten::cat" or numel >= big
                                                   or any(c.startswith("flowgmm_native::") for c in chain)):
            found.append((ev.name, tuple(chain)))
        for child in ev.cpu_children:
            walk(child, chain + [ev.name])

    for ev in prof.events():
        if ev.cpu_parent is None:
            walk(ev, [])
    names = {e.name for e in prof.events()}
    assert "flowgmm_native::coupling_fwd" in names and "flowgmm_native::coupling_bwd" in names
    return found


@pytest.mark.parametrize("device", backend_devices("native"))
def test_native_checkerboard_layer_makes_no_copy(device):
    """AffineCoupling's forward + backward on the native backend: its s/t net's output reaches the coupling kernel
    without a copy, and its gradient leaves as one tensor without a concatenation: no contiguous / clone / copy_ /
    cat of any batch-sized tensor in the whole step, and none at all inside the coupling ops."""
    torch.manual_seed(0)
    layer = AffineCoupling(4, "checkerboard", st_net=nn.Conv2d(4, 8, 1)).to(device)
    x = torch.randn(3, 4, 6, 6, device=device, requires_grad=True)
    assert _profiled_copies(layer, x) == []


@pytest.mark.parametrize("device", backend_devices("native"))
def test_native_channel_layer_copies_only_the_concatenation(device):
    """The channel coupling: the chunk views of x, of the s/t output and of y's gradient are read in place. What
    copies remain (besides the 1x1 convolution's own copy of its input, the conditioning half, a view) are the cat
    joining the kept and transformed halves and chunk's backward (a cat): one each way."""
    torch.manual_seed(0)
    layer = AffineCoupling(4, "channel", st_net=nn.Conv2d(2, 4, 1)).to(device)
    x = torch.randn(3, 4, 6, 6, device=device, requires_grad=True)
    copies = _profiled_copies(layer, x)
    assert sorted(name for name, _ in copies) == ["aten::cat", "aten::cat"], copies
    assert any("SplitBackward0" in chain for _, chain in copies), copies


@pytest.mark.parametrize("backend,device", BACKENDS)
@pytest.mark.parametrize("mask", ["checkerboard", "channel"])
@pytest.mark.parametrize("reverse_mask", [False, True])
def test_layer_matches_torch_backend(backend, device, mask, reverse_mask):
    """The layer (joint s/t path) on the backend against the torch backend: y, log-det and every gradient."""
    torch.manual_seed(0)
    dtype = DTYPE[backend]
    n_cond = 2 if mask == "channel" else 4
    layer = AffineCoupling(4, mask, reverse_mask, st_net=nn.Conv2d(n_cond, 2 * n_cond, 1)).to(device, dtype)
    x0 = torch.randn(2, 4, 4, 4, device=device, dtype=dtype)
    out = {}
    for name in (backend, "torch"):
        layer.zero_grad()
        x = x0.clone().requires_grad_()
        with use(name):
            y, ldj = layer(x)
            (y.square().sum() + ldj.sum()).backward()
        out[name] = [y, ldj, x.grad] + [p.grad.clone() for p in layer.parameters()]
    for a, b in zip(out[backend], out["torch"]):
        torch.testing.assert_close(a, b, **TOL[dtype])
