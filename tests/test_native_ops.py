"""The "native" backend (compiled flowgmm_fast._C) against the pure-PyTorch reference: every op, forward and every
gradient, on every device the extension runs on here (CPU always; CUDA when present and built).

Low precision uses the three-way bound of helpers.assert_close_3way (error against float64 at most twice PyTorch's own
error in that dtype, reference with ``upcast=False``, plus atol) plus a rounding term of a couple of units in the
last place of the dtype (the kernels compute in fp32 and round once on store). Also: gradcheck in float64,
torch.library.opcheck on each op, torch.compile(fullgraph=True) through the ops, and clear errors on bad input.
"""

from __future__ import annotations

import pytest
import torch

import flowgmm_fast
from flowgmm_fast import functional as F
from flowgmm_fast.ops import reference as R
from helpers import assert_close_3way, backend_devices, cotangent_grads, grad_leaves, requires_native, use

pytestmark = requires_native

DEVICES = backend_devices("native")
RTOL = {torch.float64: 0.0, torch.float32: 1e-5, torch.bfloat16: 2 ** -7, torch.float16: 2 ** -9}
DTYPES = (torch.float32, torch.float64, torch.bfloat16)


def _native():
    from flowgmm_fast.ops import native_ops

    return native_ops


def _ops():
    return torch.ops.flowgmm_native


def _check(out, same, ref64, dtype, name):
    assert_close_3way(out, same, ref64, dtype, name, rtol=RTOL[dtype])


def _compare(fn_native, fn_ref, inputs, dtype, names, cotangent_seed=0):
    """Forward outputs and gradients of fn_native(*inputs in dtype) against fn_ref at float64 and in dtype."""
    nat_in = grad_leaves(inputs)
    ref_in = grad_leaves(inputs, torch.float64)
    same_in = grad_leaves(inputs)
    out = fn_native(*nat_in)
    ref = fn_ref(*ref_in, upcast=True)
    same = fn_ref(*same_in, upcast=False)
    out, ref, same = [o if isinstance(o, tuple) else (o,) for o in (out, ref, same)]
    gen = torch.Generator().manual_seed(cotangent_seed)
    cots = [torch.randn(o.shape, generator=gen, dtype=torch.float64).to(o.device) for o in ref]
    for i, (o, s, r) in enumerate(zip(out, same, ref)):
        assert o.dtype == r.dtype or (r.dtype == torch.float64 and o.dtype in (dtype, torch.float32)), (o.dtype, r.dtype)
        _check(o, s, r, dtype, f"output {i}")
    if not any(t is not None and t.requires_grad for t in nat_in) or out[0].numel() == 0 and len(out) == 1:
        return
    g_out, g_ref, g_same = (cotangent_grads(o, cots, i, allow_unused=True)
                            for o, i in ((out, nat_in), (ref, ref_in), (same, same_in)))
    for name, go, gr, gs in zip(names, g_out, g_ref, g_same):
        if gr is None:
            continue
        assert go is not None, f"no gradient for {name}"
        assert go.shape == gr.shape and go.dtype == nat_in[names.index(name)].dtype, name
        _check(go, gs, gr, dtype, f"grad {name}")


# ------------------------------------------------------------------------------------------------ affine coupling

def _coupling_inputs(shape, mask, scale, sldj, device, seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=gen)
    s = torch.randn(shape, generator=gen)
    t = torch.randn(shape, generator=gen)
    sc = torch.rand(shape[1], generator=gen) + 0.5 if scale else None
    sl = torch.randn(shape[0], generator=gen) if sldj else None
    m, parity = None, -1
    if mask == "tensor":
        m = (torch.rand(shape[1:], generator=gen) > 0.5).float()
    elif mask in ("half", "halfrev"):  # RealNVPTabular's masks: two runs of features
        m = (torch.arange(shape[1]) < shape[1] // 2).float()
        m = 1 - m if mask == "halfrev" else m
    elif mask.startswith("blocks"):  # runs of 2 features, alternately kept and not; "blocks-frac": non-kept = 0.25
        m = ((torch.arange(shape[1]) // 2) % 2 == 0).float()
        if mask == "blocks-frac":
            m[m == 0] = 0.25
    elif mask.startswith("checker"):
        parity = int(mask[-1])
    to = (lambda v: None if v is None else v.to(device))
    return [to(v) for v in (x, s, t, sc, sl)], (None if m is None else m.to(device)), parity


COUPLING_CASES = (
    [((2, 3, 5, 6), mask, scale, rev) for mask in ("none", "tensor", "checker0", "checker1")
     for scale in (False, True) for rev in (False, True)]
    + [(shape, mask, True, rev) for shape, mask in (((1, 1, 2, 2), "checker1"), ((3, 4, 5, 7), "checker0"),
                                                     ((2, 5, 1, 1), "checker1"),
                                                     # the AVX-512 checkerboard rows (even W, >= 16 pairs): a pair
                                                     # tail, whole 16-pair groups, two blocks of pairs plus a tail
                                                     ((2, 3, 6, 10), "checker0"), ((2, 2, 16, 16), "checker1"),
                                                     ((1, 2, 24, 26), "checker0"),
                                                     ((2, 3, 7), "tensor"), ((3, 5), "none"), ((1, 41), "tensor"),
                                                     ((4, 37), "none"),
                                                     # vector masks walked as runs of kept / transformed features:
                                                     # 2 runs, 16 runs (the most taken as runs), 17 (plain loop)
                                                     ((3, 40), "half"), ((2, 41), "halfrev"), ((2, 32), "blocks"),
                                                     ((2, 34), "blocks"), ((2, 30), "blocks-frac"))
       for rev in (False, True)]
)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape,mask,scale,reverse", COUPLING_CASES)
def test_coupling_matches_reference(device, dtype, shape, mask, scale, reverse):
    (x, s, t, sc, sl), m, parity = _coupling_inputs(shape, mask, scale, True, device)
    x, s, t = x.to(dtype), s.to(dtype), t.to(dtype)
    if not scale:
        _compare(lambda x, s, t, sl: _native().affine_coupling(x, s, t, None, None if m is None else m.to(x.dtype),
                                                               parity, reverse, sl),
                 lambda x, s, t, sl, upcast: R.affine_coupling(x, s, t, None, None if m is None else m.to(x.dtype),
                                                               parity, reverse, sl, upcast=upcast),
                 [x, s, t, sl], dtype, ["x", "s", "t", "sldj"])
    else:
        _compare(lambda x, s, t, sc, sl: _native().affine_coupling(x, s, t, sc, None if m is None else m.to(x.dtype),
                                                                   parity, reverse, sl),
                 lambda x, s, t, sc, sl, upcast: R.affine_coupling(x, s, t, sc, None if m is None else m.to(x.dtype),
                                                                   parity, reverse, sl, upcast=upcast),
                 [x, s, t, sc, sl], dtype, ["x", "s", "t", "scale", "sldj"])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("shape", [(0, 3, 4, 4), (0, 5)])
def test_coupling_empty_batch(device, shape):
    x = torch.zeros(shape, device=device, requires_grad=True)
    y, ldj = _native().affine_coupling(x, x, x, torch.ones(shape[1], device=device), None, -1, False, None)
    assert y.shape == x.shape and ldj.shape == (0,)
    (y.sum() + ldj.sum()).backward()
    assert x.grad.shape == x.shape


@pytest.mark.parametrize("device", DEVICES)
def test_coupling_non_contiguous_and_sldj_dtypes(device):
    gen = torch.Generator().manual_seed(3)
    base = torch.randn(3, 4, 6, 5, generator=gen).to(device)
    x, s, t = base.transpose(2, 3), (base * 0.5).transpose(2, 3), (base - 1).transpose(2, 3)  # (3, 4, 5, 6) views
    assert not x.is_contiguous()
    sc = torch.rand(8, generator=gen).to(device)[::2]
    for sl in (None, torch.randn(3, dtype=torch.float64, generator=gen).to(device)):
        y, ldj = _native().affine_coupling(x, s, t, sc, None, 0, False, sl)
        y_ref, ldj_ref = R.affine_coupling(x, s, t, sc, None, 0, False, sl)
        assert ldj.dtype == ldj_ref.dtype
        torch.testing.assert_close(y, y_ref)
        torch.testing.assert_close(ldj, ldj_ref)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("shape,mask", [((2, 3, 3, 4), "none"), ((2, 3, 3, 4), "tensor"), ((2, 3, 3, 4), "checker1"),
                                        ((3, 10), "half"), ((2, 12), "blocks-frac")])
@pytest.mark.parametrize("reverse", [False, True])
def test_coupling_gradcheck(device, shape, mask, reverse):
    (x, s, t, sc, sl), m, parity = _coupling_inputs(shape, mask, True, True, device, seed=5)
    args = [v.double().requires_grad_() for v in (x, s, t, sc, sl)]
    m = None if m is None else m.double()
    assert torch.autograd.gradcheck(
        lambda x, s, t, sc, sl: _native().affine_coupling(x, s, t, sc, m, parity, reverse, sl), args)


@pytest.mark.parametrize("device", DEVICES)
def test_coupling_exp_over_the_float_range(device):
    """y = exp(s) (x = 1, t = 0, no scale) across float32's range: the CPU's vectorised exp (csrc/flowgmm_math.h) must
    match torch.exp to ~1 ulp, overflow to inf where it does, reach FLT_MAX's neighbourhood (2^(n-1) * 2 for n = 128)
    and propagate NaN. Below -86.64 it flushes to 0 (torch gives values under 2.4e-38)."""
    s = torch.cat([torch.linspace(-100, 100, 20001), torch.tensor([88.72, 88.7228, 88.73, -86.6, -87.5, float("inf"),
                                                                   float("-inf"), float("nan")])]).to(device)
    x, t = torch.ones_like(s), torch.zeros_like(s)
    y, ldj = _native().affine_coupling(x.view(1, -1), s.view(1, -1), t.view(1, -1), None, None, -1, False, None)
    ref = torch.exp(s)
    y = y.view(-1)
    assert torch.equal(torch.isnan(y), torch.isnan(ref))
    assert torch.equal(torch.isposinf(y), torch.isposinf(ref))
    finite = torch.isfinite(ref)
    torch.testing.assert_close(y[finite], ref[finite], rtol=3e-7, atol=2.5e-38)
    assert float(y[20001]) > 3.3e38  # exp(88.72), n = 128: finite, just under FLT_MAX


@pytest.mark.parametrize("device", DEVICES)
def test_coupling_tanh_scale_small_and_large_s(device):
    """s_eff = scale * tanh(s) with s from 1e-6 (tanh ~ s: relative accuracy matters) to +-30 (saturated)."""
    mag = torch.logspace(-6, 1.5, 400)
    s = torch.cat([mag, -mag]).to(device).view(1, -1)
    x, t = torch.zeros_like(s), torch.zeros_like(s)
    scale = torch.ones(s.shape[1], device=device)
    _, ldj = _native().affine_coupling(x, s, t, scale, None, -1, False, None)
    y, _ = _native().affine_coupling(torch.ones_like(s), s, t, scale, None, -1, False, None)
    torch.testing.assert_close(torch.log(y), torch.tanh(s), rtol=2e-6, atol=2e-7)
    torch.testing.assert_close(ldj, torch.tanh(s).sum(1), rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------------------------------------------------- squeeze

@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64, torch.int64, torch.bool])
@pytest.mark.parametrize("alt_order", [False, True])
@pytest.mark.parametrize("shape", [(2, 3, 4, 6), (1, 1, 2, 2), (0, 2, 4, 4), (3, 5, 6, 10), (5, 7, 2, 14),
                                   (3, 1, 34, 2)])
def test_squeeze_matches_reference(device, dtype, alt_order, shape):
    x = (torch.randn(shape) * 10).to(dtype).to(device)
    y = _native().squeeze2x2(x, False, alt_order)
    assert torch.equal(y, R.squeeze2x2(x, False, alt_order))
    assert torch.equal(_native().squeeze2x2(y, True, alt_order), x)
    z = (torch.randn(y.shape) * 10).to(dtype).to(device)      # reverse of data the forward did not make
    assert torch.equal(_native().squeeze2x2(z, True, alt_order), R.squeeze2x2(z, True, alt_order))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("alt_order", [False, True])
@pytest.mark.parametrize("reverse", [False, True])
def test_squeeze_gradcheck(device, alt_order, reverse):
    shape = (2, 8, 2, 3) if reverse else (2, 2, 4, 6)
    x = torch.randn(shape, dtype=torch.float64, device=device).transpose(0, 1).contiguous().transpose(0, 1)
    x.requires_grad_()
    assert torch.autograd.gradcheck(lambda v: _native().squeeze2x2(v, reverse, alt_order), (x,))


# --------------------------------------------------------------------------------------------------------- logit

@pytest.mark.parametrize("device", DEVICES)
def test_logit_log_over_the_float_range(device):
    """alpha = 0, so y = log u - log1p(-u) straight from the CPU's vectorised log / log1p (csrc/flowgmm_math.h), for u
    from denormals to 1 - 2^-24 and the ends 0 and 1 (-inf, +inf); reverse from -100 to 100 (exp's saturation)."""
    u = torch.cat([torch.logspace(-44, 0, 3000)[:-1], 1 - torch.logspace(-7.2, -0.31, 500), torch.tensor([0.0, 1.0])])
    u = u.float().to(device).view(1, -1)
    y, _ = _native().logit_transform(u, 0.0, False, None, None)
    ref = (torch.log(u.double()) - torch.log1p(-u.double()))
    assert torch.equal(torch.isinf(y), torch.isinf(ref)) and torch.equal(y[torch.isinf(y)], ref[torch.isinf(ref)].float())
    finite = torch.isfinite(ref)
    # a couple of float32 ulps of the two log terms (y itself cancels to 0 at u = 1/2)
    bound = 4e-7 * (torch.log(u.double()).abs() + torch.log1p(-u.double()).abs())
    assert ((y.double() - ref).abs() <= bound)[finite].all()
    x = torch.linspace(-100, 100, 4001, device=device).view(1, -1)
    for alpha in (0.0, 0.05):
        y, ldj = _native().logit_transform(x, alpha, True, None, None)
        y_ref, ldj_ref = R.logit_transform(x.double(), alpha, True, None, None)
        torch.testing.assert_close(y.double(), y_ref, rtol=1e-6, atol=1e-7)
        torch.testing.assert_close(ldj.double(), ldj_ref, rtol=1e-6, atol=1e-3)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("mode", ["forward", "forward_noise", "reverse"])
@pytest.mark.parametrize("shape", [(3, 2, 4, 5), (1, 7), (2, 33)])
def test_logit_matches_reference(device, dtype, mode, shape):
    gen = torch.Generator().manual_seed(1)
    reverse = mode == "reverse"
    x = (torch.randn(shape, generator=gen) * 2 if reverse else torch.rand(shape, generator=gen)).to(device, dtype)
    noise = torch.rand(shape, generator=gen).to(device, dtype) if mode == "forward_noise" else None
    sl = torch.randn(shape[0], generator=gen).to(device)
    _compare(lambda x, sl, *n: _native().logit_transform(x, 0.05, reverse, sl, n[0] if n else None),
             lambda x, sl, *n, upcast: R.logit_transform(x, 0.05, reverse, sl, n[0] if n else None, upcast=upcast),
             [x, sl] + ([noise] if noise is not None else []), dtype, ["x", "sldj", "noise"])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("mode", ["forward", "forward_noise", "reverse"])
def test_logit_gradcheck(device, mode):
    reverse = mode == "reverse"
    x = (torch.randn(2, 3, 4) if reverse else torch.rand(2, 3, 4) * 0.9 + 0.05).double().to(device).requires_grad_()
    sl = torch.randn(2, dtype=torch.float64, device=device, requires_grad=True)
    args = [x, sl]
    if mode == "forward_noise":
        args.append(torch.rand(2, 3, 4, dtype=torch.float64, device=device, requires_grad=True))
    assert torch.autograd.gradcheck(
        lambda x, sl, *n: _native().logit_transform(x, 0.1, reverse, sl, n[0] if n else None), args)


# ----------------------------------------------------------------------------------------------------------- gmm

def _gmm_inputs(b, k, d, diag, weights, labels, device, seed=0):
    gen = torch.Generator().manual_seed(seed)
    z = torch.randn(b, d, generator=gen)
    means = torch.randn(k, d, generator=gen)
    log_std = torch.randn((k, d) if diag else (k,), generator=gen) * 0.3
    w = torch.randn(k, generator=gen) if weights else None
    lab = None
    if labels == "mixed":
        lab = torch.randint(-1, k, (b,), generator=gen)
    elif labels == "all":
        lab = torch.randint(0, k, (b,), generator=gen)
    to = (lambda v: None if v is None else v.to(device))
    return [to(v) for v in (z, means, log_std, w)], to(lab)


GMM_CASES = [(5, 3, 7, diag, weights, labels) for diag in (False, True) for weights in (False, True)
             for labels in (None, "mixed")] + [
    (1, 1, 1, False, False, "all"), (3, 4, 1023, True, True, "all"), (6, 10, 33, False, True, "mixed"),
    (2, 2, 5, True, False, "all")]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("b,k,d,diag,weights,labels", GMM_CASES)
def test_gmm_matches_reference(device, dtype, b, k, d, diag, weights, labels):
    (z, means, log_std, w), lab = _gmm_inputs(b, k, d, diag, weights, labels, device)
    z, means, log_std = z.to(dtype), means.to(dtype), log_std.to(dtype)
    w = None if w is None else w.to(dtype)
    names = ["z", "means", "log_std"] + (["weight_logits"] if w is not None else [])
    inputs = [z, means, log_std] + ([w] if w is not None else [])
    _compare(lambda z, m, ls, *w: _native().gmm_nll(z, m, ls, w[0] if w else None, lab, 0.7, True),
             lambda z, m, ls, *w, upcast: R.gmm_nll(z, m, ls, w[0] if w else None, lab, 0.7, True, upcast=upcast),
             inputs, dtype, names)
    _compare(lambda z, m, ls, *w: _native().gmm_log_prob(z, m, ls, w[0] if w else None),
             lambda z, m, ls, *w, upcast: R.gmm_log_prob(z, m, ls, w[0] if w else None, upcast=upcast),
             inputs, dtype, names, cotangent_seed=1)


@pytest.mark.parametrize("device", DEVICES)
def test_gmm_empty_batch_and_mixed_dtypes(device):
    (z, means, log_std, w), _ = _gmm_inputs(0, 3, 4, False, True, None, device)
    nll, logits = _native().gmm_nll(z, means, log_std, w, None, 1.0, True)
    assert nll.shape == (0,) and logits.shape == (0, 3)
    (z, means, log_std, w), lab = _gmm_inputs(4, 3, 6, True, True, "mixed", device)
    got = _native().gmm_nll(z.bfloat16(), means.double(), log_std, w, lab, 2.0)
    ref = R.gmm_nll(z.bfloat16(), means.double(), log_std, w, lab, 2.0)
    assert got.dtype == ref.dtype == torch.float64
    torch.testing.assert_close(got, ref)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("diag", [False, True])
@pytest.mark.parametrize("labels", [None, "mixed"])
def test_gmm_gradcheck(device, diag, labels):
    (z, means, log_std, w), lab = _gmm_inputs(4, 3, 5, diag, True, labels, device, seed=2)
    args = [v.double().requires_grad_() for v in (z, means, log_std, w)]
    assert torch.autograd.gradcheck(
        lambda z, m, ls, w: _native().gmm_nll(z, m, ls, w, lab, 0.6, True), args)


@pytest.mark.parametrize("diag", [False, True])
def test_gmm_backward_stays_accurate_over_many_rows(diag):
    # The parameter gradients are sums over the batch whose terms cancel (the log-std one is an expansion of
    # sum_b G_bk (maha_bk - D)); float running sums over 5e4 rows gave 3e-4 .. 1.5e-3 of the largest gradient (means,
    # log_std) before the row sums moved to float64. fp32 inputs, against the float64 reference.
    g = torch.Generator().manual_seed(0)
    b, k, d = 50_000, 32, 2
    means = torch.randn(k, d, generator=g) * 3
    log_std = torch.randn(k, d, generator=g) * 0.2 if diag else torch.randn(k, generator=g) * 0.2
    cls = torch.randint(0, k, (b,), generator=g)
    z = means[cls] + torch.randn(b, d, generator=g)
    lab = torch.where(torch.rand(b, generator=g) < 0.1, cls, -1)
    w = torch.randn(k, generator=g) * 0.1
    grads = {}
    for dtype, fn in ((torch.float64, R.gmm_nll), (torch.float32, _native().gmm_nll)):
        args = [v.to(dtype).requires_grad_() for v in (z, means, log_std, w)]
        fn(*args, lab, 1.0).sum().backward()
        grads[dtype] = [a.grad.double() for a in args]
    for name, got, ref in zip(("z", "means", "log_std", "weight_logits"), grads[torch.float32], grads[torch.float64]):
        err = ((got - ref).abs().max() / ref.abs().max()).item()
        assert err < 2e-5, f"{name}: max error {err:.2e} of the largest gradient"


# ----------------------------------------------------------------------------------- registration and compile

def _opcheck_samples(device):
    (x, s, t, sc, sl), m, _ = _coupling_inputs((2, 3, 4, 4), "tensor", True, True, device)
    (z, means, log_std, w), lab = _gmm_inputs(4, 3, 5, False, True, "mixed", device)
    req = (lambda v: v.clone().requires_grad_())
    return [
        ("coupling_fwd", (req(x), req(s), req(t), req(sc), m, -1, False, req(sl))),
        ("coupling_fwd", (req(x), req(s), req(t), None, None, 1, True, None)),
        ("squeeze2x2", (req(x), False, True)),
        ("logit_fwd", (x.sigmoid().requires_grad_(), 0.05, False, req(sl), torch.rand_like(x))),
        ("logit_fwd", (req(x), 0.05, True, None, None)),
        ("gmm_fwd", (req(z), req(means), req(log_std), req(w), lab, 0.5)),
        ("gmm_fwd", (req(z), req(means), torch.zeros(3, 5, device=device, requires_grad=True), None, None, 1.0)),
    ]


@pytest.mark.parametrize("device", DEVICES)
def test_opcheck(device):
    for name, args in _opcheck_samples(device):
        torch.library.opcheck(getattr(_ops(), name).default, args)


@pytest.mark.parametrize("device", DEVICES)
def test_opcheck_backward_ops(device):
    (x, s, t, sc, sl), m, _ = _coupling_inputs((2, 3, 4, 4), "tensor", True, True, device)
    torch.library.opcheck(_ops().coupling_bwd.default, (torch.randn_like(x), sl, x, s, t, sc, m, -1, False))
    torch.library.opcheck(_ops().logit_bwd.default, (torch.randn_like(x), sl, x.sigmoid(), 0.05, False, None, False))
    torch.library.opcheck(_ops().logit_bwd.default, (torch.randn_like(x), sl, x.sigmoid(), 0.05, False,
                                                     torch.rand_like(x), True))
    (z, means, log_std, w), lab = _gmm_inputs(4, 3, 5, True, True, "mixed", device)
    _, logits = _ops().gmm_fwd(z, means, log_std, w, lab, 0.5)
    torch.library.opcheck(_ops().gmm_bwd.default, (torch.randn(4, device=device), torch.randn_like(logits), z, means,
                                                   log_std, w, lab, 0.5, logits))


@pytest.mark.parametrize("device", DEVICES)
def test_compile_fullgraph_training_step(device):
    """A coupling -> squeeze -> GMM-nll step traced with fullgraph=True (no graph breaks) gives eager's gradients."""
    (x, s, t, sc, _), _, _ = _coupling_inputs((4, 2, 4, 4), "none", True, False, device)
    means = torch.randn(3, 32, device=device)
    labels = torch.tensor([0, -1, 2, -1], device=device)

    def step(x, s, t, scale, means):
        y, ldj = F.affine_coupling(x, s, t, scale, mask=F.checkerboard(1))
        y = F.squeeze2x2(y)
        nll = F.gmm_nll(y.flatten(1), means, torch.zeros(3, device=device), labels=labels)
        return (nll - ldj).mean()

    with use("native"):
        leaves = grad_leaves([x, s, t, sc, means])
        loss = step(*leaves)
        grads = torch.autograd.grad(loss, leaves)
        c_leaves = grad_leaves([x, s, t, sc, means])
        c_loss = torch.compile(step, fullgraph=True, backend="aot_eager")(*c_leaves)
        c_grads = torch.autograd.grad(c_loss, c_leaves)
    torch.testing.assert_close(c_loss, loss)
    for g, cg in zip(grads, c_grads):
        torch.testing.assert_close(cg, g)


def test_build_info_matches_running_torch():
    info = _native().build_info()
    assert info["torch"] == torch.__version__
    assert isinstance(info["with_cuda"], bool)
    assert _native().supports_device("cpu")
    assert _native().supports_device("cuda") == info["with_cuda"]
    assert _native().unavailable_reason() is None


def test_version_mismatch_message(monkeypatch):
    native = _native()
    monkeypatch.setitem(native._BUILD, "torch", "0.0.0")
    reason = native.unavailable_reason()
    assert "0.0.0" in reason and torch.__version__ in reason and "pip install --no-build-isolation -e ." in reason


# ------------------------------------------------------------------------------------------------------ bad input

@pytest.mark.parametrize("device", DEVICES)
def test_bad_inputs_give_clear_errors(device):
    ops = _ops()
    x = torch.randn(2, 3, 4, 4, device=device)
    cases = [
        (lambda: ops.coupling_fwd(x, x[:, :2], x, None, None, -1, False, None), "s must have the shape of x"),
        (lambda: ops.coupling_fwd(x, x.double(), x, None, None, -1, False, None), "s must have the dtype of x"),
        (lambda: ops.coupling_fwd(x.long(), x.long(), x.long(), None, None, -1, False, None), "x must be a floating"),
        (lambda: ops.coupling_fwd(x, x, x, torch.ones(4, device=device), None, -1, False, None),
         r"scale must have shape \(3,\)"),
        (lambda: ops.coupling_fwd(x, x, x, None, torch.ones(3, 4, device=device), -1, False, None),
         "mask must have shape"),
        (lambda: ops.coupling_fwd(x, x, x, None, None, 2, False, None), "checker_parity must be"),
        (lambda: ops.coupling_fwd(x[0], x[0], x[0], None, None, 0, False, None), "needs 4-D x"),
        (lambda: ops.coupling_fwd(x, x, x, None, None, -1, False, torch.zeros(3, device=device)),
         r"sldj must have shape \(2,\)"),
        (lambda: ops.coupling_fwd(x, x, x, None, None, -1, False, torch.zeros(2, device=device).half()),
         "sldj must be float32 or float64"),
        (lambda: ops.coupling_fwd(x[0, 0, 0], x[0, 0, 0], x[0, 0, 0], None, None, -1, False, None),
         "x must have at least 2 dims"),
        (lambda: ops.squeeze2x2(x[:, :, :3], False, False), "even height and width"),
        (lambda: ops.squeeze2x2(x, True, False), "channels divisible by 4"),
        (lambda: ops.squeeze2x2(x[0], False, False), "x must have 4 dims"),
        (lambda: ops.logit_fwd(x, 0.7, False, None, None), r"alpha must be in \[0, 0.5\)"),
        (lambda: ops.logit_fwd(x, 0.05, True, None, x), "noise is only used by the forward"),
        (lambda: ops.logit_fwd(x, 0.05, False, None, x[:1]), "noise must have the shape of x"),
    ]
    z, means = torch.randn(4, 5, device=device), torch.randn(3, 5, device=device)
    cases += [
        (lambda: ops.gmm_fwd(z, means[:, :4], torch.zeros(3, device=device), None, None, 1.0), r"means must have shape"),
        (lambda: ops.gmm_fwd(z, means, torch.zeros(2, device=device), None, None, 1.0), "log_std must have shape"),
        (lambda: ops.gmm_fwd(z, means, torch.zeros(3, device=device), torch.zeros(4, device=device), None, 1.0),
         "weight_logits must have shape"),
        (lambda: ops.gmm_fwd(z, means, torch.zeros(3, device=device), None,
                             torch.zeros(4, dtype=torch.int32, device=device), 1.0), "labels must be int64"),
        (lambda: ops.gmm_fwd(z, means, torch.zeros(3, device=device), None,
                             torch.zeros(3, dtype=torch.int64, device=device), 1.0), r"labels must have shape \(4,\)"),
        (lambda: ops.gmm_fwd(z[0], means, torch.zeros(3, device=device), None, None, 1.0), "z must have shape"),
    ]
    for fn, pattern in cases:
        with pytest.raises(RuntimeError, match=pattern):
            fn()


def test_unsupported_device_is_a_clear_error():
    """A tensor on a device the build does not cover (CUDA without the CUDA kernels; here also meta) is refused with
    the reason, before reaching the dispatcher."""
    native = _native()
    device = "cuda" if torch.cuda.is_available() and not native.supports_device("cuda") else "meta"
    x = torch.zeros(2, 3, 4, 4, device=device)
    with pytest.raises(RuntimeError, match=f"native backend runs on cpu.*got a tensor on {device}"):
        native.affine_coupling(x, x, x, None, None, -1, False, None)
    with pytest.raises(RuntimeError, match=f"got a tensor on {device}"):
        native.gmm_nll(x.flatten(1), x.flatten(1)[:2], torch.zeros(2, device=device), None, None, 1.0)


def test_functional_dispatches_to_native():
    x = torch.randn(2, 4, 4, 4)
    with use("native"):
        assert flowgmm_fast.get_backend() == "native"
        y, ldj = F.affine_coupling(x, x * 0.1, x, mask=F.checkerboard(0))
    y_ref, ldj_ref = R.affine_coupling(x, x * 0.1, x, None, None, 0, False, None)
    torch.testing.assert_close(y, y_ref)
    torch.testing.assert_close(ldj, ldj_ref)
