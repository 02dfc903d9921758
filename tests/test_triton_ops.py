"""The "triton" backend against the pure-PyTorch reference: every op, forward and every gradient.

Low precision uses the three-way bound of helpers.assert_close_3way: the kernel's error against a float64 reference
may be at most twice PyTorch's own error in that dtype (reference with ``upcast=False``) plus atol, plus a rounding
term of a few units in the last place of the dtype (the kernels round an fp32 result once on store). Without a GPU
the kernels run on CPU tensors under the Triton interpreter (tests/conftest.py), so sizes are tiny.
"""

from __future__ import annotations

import os

import pytest
import torch

from flowgmm_fast import functional as F
from flowgmm_fast.ops import reference as R
from helpers import (assert_close_3way, backend_devices, cotangent_grads, grad_leaves, requires_cuda, requires_triton,
                     use)

pytestmark = requires_triton

DEVICES = backend_devices("triton")
LOW = (torch.bfloat16, torch.float16)
# rounding of one fp32 -> dtype store, relative (|ref| times a couple of ulps of the dtype)
RTOL = {torch.float32: 1e-5, torch.bfloat16: 2 ** -7, torch.float16: 2 ** -9}


def _ops():
    from flowgmm_fast.ops import triton_ops

    return triton_ops


def _check(out, same, ref64, dtype, name):
    assert_close_3way(out, same, ref64, dtype, name, rtol=RTOL.get(dtype, 0.0))


# ------------------------------------------------------------------------------------------------ affine coupling

def _coupling_cases():
    cases = []
    for mask in ("none", "tensor", "checker0", "checker1"):
        for reverse in (False, True):
            for scale in (False, True):
                cases.append(((2, 3, 5, 6), mask, scale, reverse, (reverse != scale), torch.float32))
    for shape in ((1, 1, 2, 2), (3, 4, 5, 7), (2, 3, 7), (3, 5), (1, 41)):
        mask = "checker1" if len(shape) == 4 else "tensor"
        for reverse in (False, True):
            cases.append((shape, mask, True, reverse, True, torch.float32))
    for dtype in LOW:
        for mask in ("none", "tensor", "checker0"):
            for reverse in (False, True):
                cases.append(((2, 3, 4, 6), mask, True, reverse, True, dtype))
    return cases


def _mask_args(mask: str, shape, device):
    """(functional mask argument, normalised reference mask, checker parity)."""
    if mask == "none":
        return None, None, -1
    if mask == "tensor":
        dense = (torch.rand(shape[1:], device=device) > 0.5).float()
        return dense, dense, -1
    parity = int(mask[-1])
    return F.checkerboard(parity), None, parity


def _coupling_run(x, s, t, scale, mask, parity, reverse, sldj, dtype, upcast):
    """Reference outputs and the leaves they depend on, computed in ``dtype`` (sldj stays fp32, or fp64)."""
    leaves = grad_leaves((x, s, t, scale), dtype)
    if sldj is not None:
        leaves.append(sldj.detach().to(torch.float64 if dtype == torch.float64 else torch.float32).requires_grad_())
    else:
        leaves.append(None)
    m = None if mask is None else mask.to(dtype)
    y, ldj = R.affine_coupling(*leaves[:4], m, parity, reverse, leaves[4], upcast=upcast)
    return y, ldj, leaves


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("shape,mask_kind,has_scale,reverse,has_sldj,dtype", _coupling_cases())
def test_affine_coupling_matches_reference(device, shape, mask_kind, has_scale, reverse, has_sldj, dtype):
    torch.manual_seed(0)
    x, s, t = (torch.randn(shape, device=device).to(dtype) for _ in range(3))
    scale = torch.randn(shape[1], device=device).to(dtype) if has_scale else None
    sldj = torch.randn(shape[0], device=device) if has_sldj else None
    mask_arg, mask, parity = _mask_args(mask_kind, shape, device)
    gy, gl = torch.randn(shape, device=device).to(dtype).float(), torch.randn(shape[0], device=device)

    ins = grad_leaves((x, s, t, scale)) + [None if sldj is None else sldj.clone().requires_grad_()]
    with use("triton"):
        y, ldj = F.affine_coupling(ins[0], ins[1], ins[2], ins[3], mask_arg, reverse, ins[4])
    assert y.dtype == dtype and ldj.dtype == torch.float32 and y.shape == shape and ldj.shape == (shape[0],)
    grads = cotangent_grads((y, ldj), (gy, gl), ins)

    y_s, ldj_s, same_in = _coupling_run(x, s, t, scale, mask, parity, reverse, sldj, dtype, False)
    y_r, ldj_r, ref_in = _coupling_run(x, s, t, scale, mask, parity, reverse, sldj, torch.float64, True)
    same_grads = cotangent_grads((y_s, ldj_s), (gy, gl), same_in)
    ref_grads = cotangent_grads((y_r, ldj_r), (gy, gl), ref_in)
    _check(y, y_s, y_r, dtype, "y")
    _check(ldj, ldj_s, ldj_r, dtype, "sldj_out")
    names = [n for n, v in zip(("grad x", "grad s", "grad t", "grad scale", "grad sldj"), ins) if v is not None]
    assert len(grads) == len(same_grads) == len(ref_grads) == len(names)
    for name, g, g_s, g_r in zip(names, grads, same_grads, ref_grads):
        _check(g, g_s, g_r, dtype, name)


@pytest.mark.parametrize("device", DEVICES)
def test_affine_coupling_empty_batch_non_contiguous_and_fp64(device):
    empty = torch.zeros(0, 3, 4, 4, device=device, requires_grad=True)
    with use("triton"):
        y, ldj = F.affine_coupling(empty, empty, empty, torch.ones(3, device=device), F.checkerboard(0))
    assert y.shape == (0, 3, 4, 4) and ldj.shape == (0,)
    (y.sum() + ldj.sum()).backward()
    assert empty.grad.shape == empty.shape

    torch.manual_seed(1)
    base = torch.randn(3, 2, 6, 5, device=device)
    x = base.transpose(2, 3)                      # (3, 2, 5, 6), non-contiguous
    s = torch.randn(3, 2, 5, 12, device=device)[..., ::2]
    t = torch.randn(2, 3, 5, 6, device=device).transpose(0, 1)
    scale = torch.randn(2, 1, 1, device=device)
    with use("triton"):
        y, ldj = F.affine_coupling(x, s, t, scale, F.checkerboard(1))
    y_r, ldj_r = R.affine_coupling(x, s, t, scale.reshape(2), None, 1, False, None)
    torch.testing.assert_close(y, y_r, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ldj, ldj_r, rtol=1e-5, atol=1e-5)

    x64, sldj64 = x.double(), torch.randn(3, device=device, dtype=torch.float64)
    with use("triton"):
        y64, ldj64 = F.affine_coupling(x64, s.double(), t.double(), None, None, True, sldj64)
        y32, ldj_mixed = F.affine_coupling(x, s, t, None, None, True, sldj64)
    assert y64.dtype == torch.float64 and ldj64.dtype == torch.float64 and ldj_mixed.dtype == torch.float64
    torch.testing.assert_close(y64, R.affine_coupling(x64, s.double(), t.double(), None, None, -1, True, sldj64)[0])
    torch.testing.assert_close(ldj_mixed, R.affine_coupling(x, s, t, None, None, -1, True, sldj64)[1],
                               rtol=1e-6, atol=1e-5)  # an fp32 log-det added to an fp64 sldj


def test_coupling_forward_then_reverse_is_identity():
    torch.manual_seed(2)
    device = DEVICES[0]
    x, s, t = (torch.randn(2, 3, 6, 6, device=device) for _ in range(3))
    scale = torch.rand(3, device=device)
    with use("triton"):
        y, ldj = F.affine_coupling(x, s, t, scale, F.checkerboard(0))
        x_back, ldj_back = F.affine_coupling(y, s, t, scale, F.checkerboard(0), reverse=True, sldj=ldj)
    torch.testing.assert_close(x_back, x, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ldj_back, torch.zeros_like(ldj_back), rtol=0, atol=1e-5)


def test_coupling_spanning_several_tiles_sums_partials():
    """A sample spanning 2 x 2 (channel, position) tiles (at most 4096 elements and 1024 positions each): the log-det
    and the scale gradient come from partial sums."""
    torch.manual_seed(3)
    device = DEVICES[0]
    x, s, t = (torch.randn(2, 5, 32, 40, device=device, requires_grad=True) for _ in range(3))
    scale = torch.randn(5, device=device, requires_grad=True)
    sldj = torch.randn(2, device=device)
    with use("triton"):
        y, ldj = F.affine_coupling(x, s, t, scale, F.checkerboard(1), sldj=sldj)
    y_r, ldj_r = R.affine_coupling(x, s, t, scale, None, 1, False, sldj)
    torch.testing.assert_close(y, y_r, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ldj, ldj_r, rtol=1e-5, atol=1e-4)
    g, g_r = (torch.autograd.grad((a * a).sum() + b.sum(), [scale, s]) for a, b in ((y, ldj), (y_r, ldj_r)))
    torch.testing.assert_close(g[0], g_r[0], rtol=1e-4, atol=1e-3)
    torch.testing.assert_close(g[1], g_r[1], rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------------------------------------------ squeeze


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("alt_order", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.int64])
def test_squeeze2x2_matches_reference(device, alt_order, dtype):
    torch.manual_seed(4)
    # odd batch / channel counts; (2, 3, 180, 4): several row-pair tiles per sample; (3, 1, 2, 1030): W/2 = 515 spans
    # three column tiles, the last one partly masked
    for shape in ((1, 1, 2, 2), (2, 3, 6, 4), (0, 2, 2, 2), (3, 5, 6, 10), (5, 7, 2, 14), (2, 3, 180, 4),
                  (3, 1, 2, 1030)):
        x = (torch.randn(shape, device=device) * 100).to(dtype)
        with use("triton"):
            y = F.squeeze2x2(x, alt_order=alt_order)
            back = F.squeeze2x2(y, reverse=True, alt_order=alt_order)
            z = (torch.randn(y.shape, device=device) * 100).to(dtype)      # reverse of data not made by forward
            z_back = F.squeeze2x2(z, reverse=True, alt_order=alt_order)
        assert torch.equal(y, R.squeeze2x2(x, False, alt_order)), shape
        assert torch.equal(back, x), shape
        assert torch.equal(z_back, R.squeeze2x2(z, True, alt_order)), shape
    x = torch.randn(2, 8, 4, 6, device=device).to(dtype).transpose(2, 3)   # non-contiguous, channels % 4 == 0
    with use("triton"):
        assert torch.equal(F.squeeze2x2(x, reverse=True, alt_order=alt_order), R.squeeze2x2(x, True, alt_order))
        assert torch.equal(F.squeeze2x2(x, alt_order=alt_order), R.squeeze2x2(x, False, alt_order))


@pytest.mark.parametrize("alt_order", [False, True])
def test_squeeze2x2_wide_index_variant_matches(monkeypatch, alt_order):
    """The int64 variant (IDX64, for samples of 2^31 elements or more, too large to run here) forced on small inputs."""
    from flowgmm_fast.kernels import squeeze

    monkeypatch.setattr(squeeze, "wide_index", lambda *extents: True)
    x = torch.randn(3, 5, 6, 10, device=DEVICES[0])
    y = squeeze.squeeze2x2(x, False, alt_order)
    assert torch.equal(y, R.squeeze2x2(x, False, alt_order))
    assert torch.equal(squeeze.squeeze2x2(y, True, alt_order), x)


@pytest.mark.parametrize("reverse", [False, True])
def test_squeeze2x2_gradient(reverse):
    device = DEVICES[0]
    x = torch.randn(2, 4, 4, 6, device=device, requires_grad=True)
    cot = torch.randn(R.squeeze2x2(x, reverse, True).shape, device=device)
    with use("triton"):
        g, = torch.autograd.grad((F.squeeze2x2(x, reverse, True) * cot).sum(), [x])
    g_r, = torch.autograd.grad((R.squeeze2x2(x, reverse, True) * cot).sum(), [x])
    assert torch.equal(g, g_r)


# ------------------------------------------------------------------------------------------------ logit


def _logit_cases():
    cases = [((2, 3, 5, 5), rev, noise, sldj, torch.float32)
             for rev in (False, True) for noise in (False, True) for sldj in (False, True) if not (rev and noise)]
    cases += [((1, 7), False, True, True, torch.float32), ((3, 2, 41, 29), False, True, True, torch.float32)]
    cases += [((2, 3, 4, 4), rev, not rev, True, dtype) for dtype in LOW for rev in (False, True)]
    return cases


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("shape,reverse,has_noise,has_sldj,dtype", _logit_cases())
def test_logit_transform_matches_reference(device, shape, reverse, has_noise, has_sldj, dtype):
    torch.manual_seed(5)
    x = (torch.randn(shape, device=device) * 2 if reverse else torch.rand(shape, device=device)).to(dtype)
    noise = torch.rand(shape, device=device).to(dtype) if has_noise else None
    sldj = torch.randn(shape[0], device=device) if has_sldj else None
    gy, gl = torch.randn(shape, device=device).to(dtype).float(), torch.randn(shape[0], device=device)

    def run(dt, upcast, triton):
        ins = grad_leaves((x, noise), dt) + [None if sldj is None else sldj.to(
            torch.float64 if dt == torch.float64 else torch.float32).requires_grad_()]
        if triton:
            with use("triton"):
                y, ldj = F.logit_transform(ins[0], 0.05, reverse, ins[2], noise=ins[1])
        else:
            y, ldj = R.logit_transform(ins[0], 0.05, reverse, ins[2], ins[1], upcast=upcast)
        return y, ldj, cotangent_grads((y, ldj), (gy, gl), ins)

    y, ldj, grads = run(dtype, True, True)
    assert y.dtype == dtype and ldj.dtype == torch.float32
    y_s, ldj_s, grads_s = run(dtype, False, False)
    y_r, ldj_r, grads_r = run(torch.float64, True, False)
    _check(y, y_s, y_r, dtype, "y")
    _check(ldj, ldj_s, ldj_r, dtype, "sldj_out")
    for i, (g, g_s, g_r) in enumerate(zip(grads, grads_s, grads_r)):
        _check(g, g_s, g_r, dtype, f"grad {i}")


@pytest.mark.parametrize("device", DEVICES)
def test_logit_transform_empty_and_non_contiguous(device):
    with use("triton"):
        y, ldj = F.logit_transform(torch.rand(0, 3, 2, 2, device=device))
        assert y.shape == (0, 3, 2, 2) and ldj.shape == (0,)
        x = torch.rand(4, 6, 5, device=device).transpose(1, 2)
        y, ldj = F.logit_transform(x, 0.1)
    y_r, ldj_r = R.logit_transform(x, 0.1, False, None, None)
    torch.testing.assert_close(y, y_r)
    torch.testing.assert_close(ldj, ldj_r)


# ------------------------------------------------------------------------------------------------ GMM


def _gmm_cases():
    cases = []
    for diag in (False, True):
        for weights in (False, True):
            for labels in ("none", "mixed"):
                cases.append((5, 3, 37, diag, weights, labels, torch.float32))
    cases += [(1, 1, 5, False, False, "none", torch.float32), (1, 17, 3, True, True, "mixed", torch.float32),
              (70, 4, 70, False, True, "labeled", torch.float32), (3, 2, 1, True, False, "mixed", torch.float32)]
    cases += [(6, 3, 40, diag, True, "mixed", dtype) for dtype in LOW for diag in (False, True)]
    return cases


def _gmm_inputs(b, k, d, diag, weights, labels, device):
    z = torch.randn(b, d, device=device)
    means = torch.randn(k, d, device=device) * 0.5
    log_std = (torch.randn(k, d, device=device) if diag else torch.randn(k, device=device)) * 0.2
    wl = torch.randn(k, device=device) if weights else None
    lab = None
    if labels == "mixed":
        lab = torch.randint(-1, k, (b,), device=device)
        lab[0] = -1
        lab[-1] = k - 1
    elif labels == "labeled":
        lab = torch.randint(0, k, (b,), device=device)
    return z, means, log_std, wl, lab


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("b,k,d,diag,weights,labels,dtype", _gmm_cases())
def test_gmm_nll_and_logits_match_reference(device, b, k, d, diag, weights, labels, dtype):
    torch.manual_seed(6)
    z, means, log_std, wl, lab = _gmm_inputs(b, k, d, diag, weights, labels, device)
    z, means, log_std, wl = (None if v is None else v.to(dtype) for v in (z, means, log_std, wl))
    gn, gl = torch.randn(b, device=device), torch.randn(b, k, device=device)

    def run(dt, upcast, triton):
        ins = grad_leaves((z, means, log_std, wl), dt)
        if triton:
            with use("triton"):
                nll, logits = F.gmm_nll(*ins, labels=lab, label_weight=0.7, return_logits=True)
        else:
            nll, logits = R.gmm_nll(*ins, lab, 0.7, True, upcast=upcast)
        return nll, logits, cotangent_grads((nll, logits), (gn, gl), ins)

    nll, logits, grads = run(dtype, True, True)
    assert nll.dtype == logits.dtype == torch.float32 and nll.shape == (b,) and logits.shape == (b, k)
    nll_s, logits_s, grads_s = run(dtype, False, False)
    nll_r, logits_r, grads_r = run(torch.float64, True, False)
    _check(nll, nll_s, nll_r, dtype, "nll")
    _check(logits, logits_s, logits_r, dtype, "logits")
    names = [n for n, v in zip(("grad z", "grad means", "grad log_std", "grad weight_logits"), (z, means, log_std, wl))
             if v is not None]
    for name, g, g_s, g_r in zip(names, grads, grads_s, grads_r):
        _check(g, g_s, g_r, dtype, name)


@pytest.mark.parametrize("device", DEVICES)
def test_gmm_log_prob_nll_only_gradient_and_empty_batch(device):
    torch.manual_seed(7)
    z, means, log_std, wl, lab = _gmm_inputs(4, 3, 20, False, True, "mixed", device)
    with use("triton"):
        logits = F.gmm_log_prob(z, means, log_std, wl)
    torch.testing.assert_close(logits, R.gmm_log_prob(z, means, log_std, wl), rtol=1e-5, atol=1e-4)

    zg = z.clone().requires_grad_()   # means/log_std without grad: the parameter kernel is skipped
    with use("triton"):
        g, = torch.autograd.grad(F.gmm_nll(zg, means, log_std, wl, lab, 2.0).sum(), [zg])
    g_r, = torch.autograd.grad(R.gmm_nll(zg, means, log_std, wl, lab, 2.0).sum(), [zg])
    torch.testing.assert_close(g, g_r, rtol=1e-5, atol=1e-5)

    ze = torch.zeros(0, 20, device=device, requires_grad=True)
    me = means.clone().requires_grad_()
    with use("triton"):
        nll, logits = F.gmm_nll(ze, me, log_std, labels=torch.zeros(0, dtype=torch.long, device=device),
                                return_logits=True)
    assert nll.shape == (0,) and logits.shape == (0, 3)
    gz, gm = torch.autograd.grad(nll.sum() + logits.sum(), [ze, me])
    assert gz.shape == (0, 20) and torch.equal(gm, torch.zeros_like(gm))

    z64 = z.double()
    with use("triton"):
        out = F.gmm_nll(z64, means.double(), log_std.double(), None, lab, 1.0)
    assert out.dtype == torch.float64
    torch.testing.assert_close(out, R.gmm_nll(z64, means.double(), log_std.double(), None, lab, 1.0))


def test_gmm_non_contiguous_inputs():
    device = DEVICES[0]
    torch.manual_seed(8)
    z = torch.randn(30, 5, device=device).t()            # (5, 30)
    means = torch.randn(30, 3, device=device).t()        # (3, 30)
    log_std = torch.randn(30, 3, device=device).t() * 0.1
    with use("triton"):
        nll = F.gmm_nll(z, means, log_std)
    torch.testing.assert_close(nll, R.gmm_nll(z, means, log_std, None, None, 1.0), rtol=1e-5, atol=1e-4)


# ------------------------------------------------------------------------------------------------ registration


def _opcheck_cases(device):
    ops = _ops()
    torch.manual_seed(9)

    def r(*shape, grad=True):
        return torch.randn(shape, device=device, requires_grad=grad)

    lab = torch.tensor([-1, 0, 2, 1, -1], device=device)
    logits = R.gmm_log_prob(r(5, 8, grad=False), r(3, 8, grad=False), r(3, grad=False), None)
    return [
        (ops.coupling_fwd, (r(2, 3, 4, 4), r(2, 3, 4, 4), r(2, 3, 4, 4), r(3), None, 0, False, r(2))),
        (ops.coupling_fwd, (r(2, 5), r(2, 5), r(2, 5), None, (torch.rand(5, device=device) > 0.5).float(), -1,
                            True, None)),
        (ops.coupling_bwd, (r(2, 3, 4, 4, grad=False), r(2, grad=False), r(2, 3, 4, 4, grad=False),
                            r(2, 3, 4, 4, grad=False), r(2, 3, 4, 4, grad=False), r(3, grad=False), None, 1, False)),
        (ops.squeeze2x2_op, (r(2, 3, 4, 6), False, True)),
        (ops.squeeze2x2_op, (r(2, 8, 2, 3), True, False)),
        (ops.logit_fwd, (torch.rand(2, 3, 4, device=device, requires_grad=True), 0.05, False, r(2),
                         torch.rand(2, 3, 4, device=device))),
        (ops.logit_fwd, (r(2, 7), 0.05, True, None, None)),
        (ops.logit_bwd, (r(2, 7, grad=False), r(2, grad=False), torch.rand(2, 7, device=device), 0.05, False, None,
                         False)),
        (ops.logit_bwd, (r(2, 7, grad=False), r(2, grad=False), torch.rand(2, 7, device=device), 0.05, False,
                         torch.rand(2, 7, device=device), True)),
        (ops.gmm_fwd, (r(5, 8), r(3, 8), r(3, 8), r(3), lab, 0.5)),
        (ops.gmm_fwd, (r(5, 8), r(3, 8), r(3), None, None, 1.0)),
        (ops.gmm_bwd, (r(5, grad=False), None, r(5, 8, grad=False), r(3, 8, grad=False), r(3, grad=False), None, lab,
                       1.0, logits, True)),
    ]


@pytest.mark.parametrize("device", DEVICES)
def test_opcheck_every_op(device):
    for op, args in _opcheck_cases(device):
        torch.library.opcheck(op, args)


def _training_step(z, s, t, scale, means, log_std, labels):
    y, ldj = F.affine_coupling(z, s, t, scale, F.checkerboard(0))
    y = F.squeeze2x2(y)
    nll = F.gmm_nll(y.reshape(y.shape[0], -1), means, log_std, None, labels, 3.0) - ldj
    return nll.mean()


@pytest.mark.parametrize("device", DEVICES)
def test_compiled_training_step_has_no_graph_break(device):
    """fullgraph=True fails on any graph break. On the CPU the aot_eager backend traces the same graph (fake
    tensors through every custom op and its backward) without generating code; on CUDA Inductor compiles it."""
    torch.manual_seed(10)
    inputs = [torch.randn(2, 1, 4, 4, device=device), torch.randn(2, 1, 4, 4, device=device),
              torch.randn(2, 1, 4, 4, device=device)]
    params = [torch.rand(1, device=device), torch.randn(3, 16, device=device), torch.zeros(3, device=device)]
    params = [p.requires_grad_() for p in params]
    labels = torch.tensor([-1, 2], device=device)
    compiled = torch.compile(_training_step, fullgraph=True, backend="aot_eager" if device == "cpu" else "inductor")
    with use("triton"):
        loss = compiled(*inputs, *params, labels)
        grads = torch.autograd.grad(loss, params)
        loss_eager = _training_step(*inputs, *params, labels)
        grads_eager = torch.autograd.grad(loss_eager, params)
    torch.testing.assert_close(loss, loss_eager)
    for g, g_e in zip(grads, grads_eager):
        torch.testing.assert_close(g, g_e)


@requires_cuda
def test_compiled_training_step_on_cuda_matches_reference():
    torch.manual_seed(11)
    args = [torch.randn(4, 2, 8, 8, device="cuda") for _ in range(3)]
    params = [torch.rand(2, device="cuda"), torch.randn(5, 128, device="cuda"), torch.zeros(5, device="cuda")]
    params = [p.requires_grad_() for p in params]
    labels = torch.tensor([-1, 2, 0, -1], device="cuda")
    compiled = torch.compile(_training_step, fullgraph=True)
    with use("triton"):
        loss = compiled(*args, *params, labels)
        grads = torch.autograd.grad(loss, params)
    with use("torch"):
        loss_r = _training_step(*args, *params, labels)
        grads_r = torch.autograd.grad(loss_r, params)
    torch.testing.assert_close(loss, loss_r, rtol=1e-5, atol=1e-4)
    for g, g_r in zip(grads, grads_r):
        torch.testing.assert_close(g, g_r, rtol=1e-4, atol=1e-4)


# ------------------------------------------------------------------------------------------------ GPU code generation


def _kernel_specs():
    from flowgmm_fast.kernels import coupling, gmm, logit, squeeze

    gmm_cfg = dict(DIAG=True, BLOCK_B=64, BLOCK_K=16, BLOCK_D=32, PRECISION="tf32x3", IDX64=False)
    return [
        (coupling._coupling_fwd_kernel, dict(HAS_SCALE=True, MASK_MODE=2, REVERSE=False, HAS_SLDJ=True,
                                             ONE_TILE=True, BLOCK_C=8, BLOCK_S=256, IDX64=False)),
        (coupling._coupling_fwd_kernel, dict(HAS_SCALE=False, MASK_MODE=0, REVERSE=True, HAS_SLDJ=False,
                                             ONE_TILE=False, BLOCK_C=8, BLOCK_S=256, IDX64=True)),
        (coupling._coupling_bwd_kernel, dict(HAS_SCALE=True, MASK_MODE=1, REVERSE=True, BLOCK_C=8, BLOCK_S=256,
                                             IDX64=True)),
        (coupling._coupling_bwd_kernel, dict(HAS_SCALE=False, MASK_MODE=0, REVERSE=False, BLOCK_C=4096, BLOCK_S=1,
                                             IDX64=False)),
        (coupling._coupling_vec_fwd_kernel, dict(HAS_SCALE=True, HAS_MASK=True, REVERSE=False, HAS_SLDJ=True,
                                                 ONE_TILE=True, BLOCK_B=4, BLOCK_D=1024)),
        (coupling._coupling_vec_fwd_kernel, dict(HAS_SCALE=False, HAS_MASK=False, REVERSE=True, HAS_SLDJ=False,
                                                 ONE_TILE=False, BLOCK_B=512, BLOCK_D=8)),
        (coupling._coupling_vec_bwd_kernel, dict(HAS_SCALE=True, HAS_MASK=True, REVERSE=True, BLOCK_B=512,
                                                 BLOCK_D=8)),
        (coupling._coupling_vec_bwd_kernel, dict(HAS_SCALE=False, HAS_MASK=False, REVERSE=False, BLOCK_B=4,
                                                 BLOCK_D=1024)),
        (squeeze._squeeze2x2_kernel, dict(REVERSE=True, ALT_ORDER=True, BLOCK_R=2, BLOCK_W=256, IDX64=True)),
        (squeeze._squeeze2x2_kernel, dict(REVERSE=False, ALT_ORDER=False, BLOCK_R=32, BLOCK_W=16, IDX64=False)),
        (logit._logit_fwd_kernel, dict(HAS_NOISE=True, REVERSE=False, HAS_SLDJ=True, ONE_TILE=False, BLOCK=1024)),
        (logit._logit_bwd_kernel, dict(HAS_NOISE=False, NOISE_GRAD=False, REVERSE=True, BLOCK=1024)),
        (logit._logit_bwd_kernel, dict(HAS_NOISE=True, NOISE_GRAD=True, REVERSE=False, BLOCK=1024)),
        (gmm._gmm_fwd_kernel, dict(gmm_cfg, HAS_WL=True, HAS_LABELS=True)),
        (gmm._gmm_bwd_z_kernel, dict(gmm_cfg, HAS_LABELS=True, HAS_GLOGITS=True)),
        (gmm._gmm_bwd_params_kernel, dict(gmm_cfg)),
        (gmm._gmm_fwd_kernel, dict(gmm_cfg, DIAG=False, HAS_WL=False, HAS_LABELS=False, IDX64=True)),
        (gmm._gmm_bwd_z_kernel, dict(gmm_cfg, DIAG=False, HAS_LABELS=False, HAS_GLOGITS=False, IDX64=True)),
        (gmm._gmm_bwd_params_kernel, dict(gmm_cfg, IDX64=True)),
    ]


def compile_every_kernel_for_sm90() -> None:
    """Compile each kernel to a cubin for sm_90 (no GPU needed): bf16 data pointers, fp32 scalars. Must run in a
    process without TRITON_INTERPRET (the interpreter replaces the kernels by Python functions)."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from flowgmm_fast.kernels import gmm

    small = dict(DIAG=False, BLOCK_K=16, BLOCK_D=32, PRECISION="tf32x3", IDX64=False)
    specs = [(fn, constexprs, 8) for fn, constexprs in _kernel_specs()]
    for block_b in (16, 32):  # the GMM launches with fewer warps (gmm._num_warps: 2 and 4) must compile too
        warps = gmm._num_warps(block_b, 16)
        specs += [(gmm._gmm_fwd_kernel, dict(small, BLOCK_B=block_b, HAS_WL=True, HAS_LABELS=True), warps),
                  (gmm._gmm_bwd_z_kernel, dict(small, BLOCK_B=block_b, HAS_LABELS=True, HAS_GLOGITS=True), warps),
                  (gmm._gmm_bwd_params_kernel, dict(small, BLOCK_B=block_b), warps)]
    for fn, constexprs, num_warps in specs:
        signature = {}
        for param in fn.params:
            name = param.name
            if param.is_constexpr:
                signature[name] = "constexpr"
            elif name == "lab_ptr":
                signature[name] = "*i64"
            elif name.endswith("_ptr"):
                low = name in ("x_ptr", "s_ptr", "t_ptr", "y_ptr", "z_ptr", "gz_ptr")
                signature[name] = "*bf16" if low else "*fp32"
            else:
                signature[name] = "fp32" if name in ("alpha", "label_weight", "log_k") else "i32"
        compiled = triton.compile(ASTSource(fn, signature, constexprs), target=GPUTarget("cuda", 90, 32),
                                  options=dict(num_warps=num_warps))
        assert compiled.asm["cubin"], fn.__name__


def test_every_kernel_compiles_for_sm90():
    """The interpreter accepts code that a GPU compile rejects (e.g. a kernel reading a non-constexpr global), so
    CI also compiles every kernel for sm_90, in a subprocess without TRITON_INTERPRET."""
    import subprocess
    import sys

    import triton

    if "nvidia" not in triton.backends.backends:
        pytest.skip("triton was installed without its NVIDIA backend")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    here = os.path.dirname(os.path.abspath(__file__))
    code = "import test_triton_ops as t; t.compile_every_kernel_for_sm90()"
    proc = subprocess.run([sys.executable, "-c", code], cwd=here, env=env, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]


@pytest.mark.parametrize("device", DEVICES)
def test_gmm_with_more_components_than_the_kernel_holds_runs_the_reference(device):
    from flowgmm_fast.kernels.gmm import MAX_COMPONENTS

    k = MAX_COMPONENTS + 3
    g = torch.Generator().manual_seed(0)
    z = torch.randn(4, 6, generator=g).to(device).requires_grad_()
    means = torch.randn(k, 6, generator=g).to(device)
    labels = torch.tensor([-1, 0, k - 1, -1], device=device)
    with use("triton"):
        nll = F.gmm_nll(z, means, torch.zeros(k, device=device), labels=labels)
    (gz,) = torch.autograd.grad(nll.sum(), z)
    with use("torch"):
        ref = F.gmm_nll(z, means, torch.zeros(k, device=device), labels=labels)
    (gz_ref,) = torch.autograd.grad(ref.sum(), z)
    torch.testing.assert_close(nll, ref)
    torch.testing.assert_close(gz, gz_ref)
