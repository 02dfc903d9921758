"""Property-based differential tests (hypothesis): every functional op on every fast backend against the reference,
values and every gradient, on random shapes (batch 1, primes, 1-wide planes), dtypes, masks (none, dense in several
broadcast shapes, bool, checkerboard), strides (sliced, transposed, batch-expanded, channels_last) and magnitudes.

Documented tolerance. With ``ref`` the float64 reference on the same (rounded) inputs, ``same`` the reference computed
in the input dtype (``upcast=False``: PyTorch's own error there) and ``sens`` the elementwise sensitivity of ``ref``
to its inputs -- the largest change of the float64 output or gradient over 3 random relative perturbations of every
floating input by one unit roundoff of the compute dtype (fp32, or fp64 for fp64) and of every cotangent by one unit
roundoff of its output's dtype (the incoming gradient of a bf16 output is bf16), which is the error a correctly rounded
evaluation of each input-dependent quantity can cause -- an output element ``out`` passes when

    |out - ref| <= 2 |same - ref| + 32 sens + 2 eps |ref| + atol_out

(eps: the larger machine epsilon of the output's dtype and of the compute dtype -- a float64 log-det of float32
inputs is computed in float32 --, roundings on store; atol_out: 1e-12 for fp64, 1e-6 for fp32,
1e-3 for fp16, 1e-2 for bf16, in the units of the output). For the GMM the sensitivity also counts the closed form's
own rounding: each of |z|^2, z.mu and |mu|^2 (on values centred on the mean of the means) is perturbed by sqrt(D) units
roundoff relative, the accuracy of a D-long fp32 dot product (the reference and every backend evaluate that form).
Gradients are compared w.r.t. the op's inputs (for a batch-expanded input, the per-sample gradient). Where ``ref`` is infinite or NaN the output must be the same
non-finite value (NaN where ``ref`` is NaN, the same infinity); where only the dtype's own result overflows (``same``
non-finite, ``ref`` finite) the element is not compared. For float64 inputs ``ref`` equals ``same`` bit for bit and is
no exact truth, so |same - ref| is replaced by the same algorithm's float32 error scaled by eps64 / eps32. The squeeze is
a permutation and must match exactly.

Profiles (environment variable FLOWGMM_FUZZ): "ci" (default; derandomised, about two minutes in all on 2 cores, as the
test suite runs in CI: 60 examples per op on native and 8 under the Triton interpreter, 40 and 6 for each of the slower
gmm_log_prob and gmm_nll) and "long" (1000 examples per op on native, 200 under the Triton interpreter, random seeds;
about an hour on 2 cores, most of it the GMM at D up to 3072), e.g.

    FLOWGMM_FUZZ=long python -m pytest tests/test_fuzz_ops.py -q -s      # prints the example counts per op

Each test prints ``fuzz <op> <backend>: N examples, 0 mismatches`` (with ``-s``); a mismatch fails with the shrunk
example.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import flowgmm_fast
from flowgmm_fast import functional as F
from flowgmm_fast.ops import reference as R
from helpers import backend_devices

PROFILE = os.environ.get("FLOWGMM_FUZZ", "ci")
if PROFILE not in ("ci", "long"):
    raise ValueError(f"FLOWGMM_FUZZ must be 'ci' or 'long', got {PROFILE!r}")
EXAMPLES = {"ci": {"native": 60, "triton": 8}, "long": {"native": 1000, "triton": 200}}[PROFILE]
# the GMM examples are the slow ones (D up to 3072): in CI each of its two ops gets fewer
CI_EXAMPLES_GMM = {"native": 40, "triton": 6}
BACKENDS = [b for b in ("native", "triton") if "cpu" in backend_devices(b)]
SENS_FACTOR = 32
N_PERTURB = 3
ATOL = {torch.float64: 1e-12, torch.float32: 1e-6, torch.float16: 1e-3, torch.bfloat16: 1e-2}
FLOATS = (torch.float32, torch.float64, torch.bfloat16, torch.float16)


def _settings(op: str, backend: str):
    n = CI_EXAMPLES_GMM[backend] if PROFILE == "ci" and op.startswith("gmm") else EXAMPLES[backend]
    return settings(max_examples=n, deadline=None, derandomize=PROFILE == "ci", database=None,
                    suppress_health_check=list(HealthCheck), print_blob=True)


def _run(op: str, backend: str, strategy, check) -> None:
    if backend not in BACKENDS:
        pytest.skip(f"backend {backend} does not run on the CPU here")
    count = [0]

    @_settings(op, backend)
    @given(case=strategy)
    def body(case):
        check(backend, case)
        count[0] += 1

    body()
    print(f"fuzz {op} {backend}: {count[0]} examples, 0 mismatches")


# ----------------------------------------------------------------------------------------------- comparison
def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _check(name: str, out: torch.Tensor, same: torch.Tensor, ref: torch.Tensor, sens: torch.Tensor, case,
           same_err: torch.Tensor | None = None, eps_compute: float = 0.0) -> None:
    assert out.shape == ref.shape, f"{name}: shape {tuple(out.shape)} != {tuple(ref.shape)} ({case})"
    out64, same64 = out.detach().double(), same.detach().double()
    nonfinite = ~torch.isfinite(ref)
    if nonfinite.any():
        want_nan = torch.isnan(ref)
        ok = torch.where(want_nan, torch.isnan(out64), out64 == ref)
        bad = nonfinite & ~ok
        assert not bad.any(), (f"{name}: {int(bad.sum())} element(s) should be {ref[bad][:3].tolist()}, got "
                               f"{out64[bad][:3].tolist()} ({case})")
    check = torch.isfinite(ref) & torch.isfinite(same64)
    eps = max(torch.finfo(out.dtype).eps, eps_compute)
    err = (out64 - ref).abs()
    own = (same64 - ref).abs() if same_err is None else torch.maximum((same64 - ref).abs(), same_err)
    bound = 2 * own + SENS_FACTOR * sens + 2 * eps * ref.abs() + ATOL[out.dtype]
    bad = check & ~(err <= bound)
    if bad.any():
        i = int(bad.flatten().nonzero()[0])
        raise AssertionError(f"{name}: {int(bad.sum())}/{bad.numel()} elements out of tolerance; first at {i}: got "
                             f"{out64.flatten()[i]:.9g}, reference {ref.flatten()[i]:.9g}, same-dtype "
                             f"{same64.flatten()[i]:.9g}, sensitivity {sens.flatten()[i]:.3g} ({case})")


def _grads(outputs, cotangents, leaves):
    loss = sum((o.double() * c).sum() for o, c in zip(outputs, cotangents) if o is not None)
    wanted = [t for t in leaves if t is not None and t.requires_grad]
    got = torch.autograd.grad(loss, wanted, allow_unused=True) if wanted else []
    it = iter(got)
    return [next(it) if t is not None and t.requires_grad else None for t in leaves]


def _leaves(values, dtype_of):
    """Leaves in the given dtypes (floating ones require grad)."""
    return [None if v is None else v.detach().to(dtype_of(v)).requires_grad_(v.is_floating_point())
            for v in values]


def _differential(name: str, run_backend, run_ref, values, case, *, exact: bool = False, run_sens=None) -> None:
    """Compare run_backend(*leaves) with run_ref(*leaves64, upcast) -- outputs and gradients -- as the module
    docstring says. ``values``: the op's tensor inputs (None allowed), already in their dtypes; run_* build the op
    inputs from the leaves (layouts) and return (tuple of outputs, list of the op inputs built, aligned with
    ``values``). Gradients are taken w.r.t. those op inputs (views of the leaves): for a batch-expanded input that is
    the kernel's per-sample gradient, not torch's sum of it in the input dtype. ``run_sens(*leaves64, gen)``, when
    given, replaces run_ref for the sensitivity: a float64 evaluation that also perturbs the op's own intermediate
    roundings (see the GMM)."""
    leaves = _leaves(values, lambda v: v.dtype)
    outs, ins = run_backend(*leaves)
    leaves64 = _leaves(values, lambda v: torch.float64 if v.is_floating_point() else v.dtype)
    refs, ins64 = run_ref(*leaves64, upcast=True)
    gen = torch.Generator().manual_seed(case.seed + 1)
    cots = [torch.randn(r.shape, generator=gen, dtype=torch.float64) for r in refs]
    differentiable = any(t is not None and t.requires_grad for t in leaves)
    if exact:  # a permutation: bit-exact values and gradients (cotangents representable in the output dtype)
        cots = [c.to(o.dtype).double() if o.is_floating_point() else c for c, o in zip(cots, outs)]
        for o, r in zip(outs, refs):
            assert torch.equal(o.double(), r.detach().double()), f"{name}: values differ ({case})"
        if differentiable:
            for go, gr in zip(_grads(outs, cots, ins), _grads(refs, cots, ins64)):
                assert (go is None) == (gr is None) and (go is None or torch.equal(go.double(), gr)), \
                    f"{name}: gradients differ ({case})"
        return
    leaves_same = _leaves(values, lambda v: v.dtype)
    sames, ins_same = run_ref(*leaves_same, upcast=False)
    g_out = _grads(outs, cots, ins) if differentiable else []
    g_ref = _grads(refs, cots, ins64) if differentiable else []
    g_same = _grads(sames, cots, ins_same) if differentiable else []
    # sensitivity: float64 reference at inputs and cotangents perturbed by one unit roundoff of the compute dtype
    sens_out = [torch.zeros_like(r.detach()) for r in refs]
    sens_grad = [None if g is None else torch.zeros_like(g) for g in g_ref]
    pgen = torch.Generator().manual_seed(case.seed + 2)
    for _ in range(N_PERTURB):
        pert = []
        for v in values:
            if v is None or not v.is_floating_point():
                pert.append(v)
                continue
            u = torch.rand(v.shape, generator=pgen, dtype=torch.float64) * 2 - 1
            eps = torch.finfo(_compute_dtype(v.dtype)).eps
            pert.append(v.double() * (1 + eps * u))
        pleaves = _leaves(pert, lambda v: v.dtype)
        prefs, pins = run_ref(*pleaves, upcast=True) if run_sens is None else run_sens(*pleaves, gen=pgen)
        # an incoming gradient reaches the backward rounded to its output's dtype (bf16 / fp16 for y)
        pcots = [c * (1 + torch.finfo(o.dtype).eps * (torch.rand(c.shape, generator=pgen, dtype=torch.float64) * 2 - 1))
                 for c, o in zip(cots, outs)]
        for s, p, r in zip(sens_out, prefs, refs):
            s.copy_(torch.maximum(s, (p.detach().double() - r.detach().double()).abs().nan_to_num(0, 0, 0)))
        if differentiable:
            for s, p, r in zip(sens_grad, _grads(prefs, pcots, pins), g_ref):
                if s is not None:
                    s.copy_(torch.maximum(s, (p - r).abs().nan_to_num(0, 0, 0)))
    # float64: the reference is no exact truth (its own rounding, e.g. 1 - tanh^2, equals 'same' bit for bit), so its
    # error is estimated as the same algorithm's float32 error scaled by eps64 / eps32
    own_out, own_grad = [None] * len(refs), [None] * len(g_ref)
    if _compute_dtype(values[0].dtype) == torch.float64:
        scale64 = torch.finfo(torch.float64).eps / torch.finfo(torch.float32).eps
        leaves32 = _leaves(values, lambda v: torch.float32 if v.is_floating_point() else v.dtype)
        s32, ins32 = run_ref(*leaves32, upcast=False)
        own_out = [((a.detach().double() - r.detach().double()).abs() * scale64).nan_to_num(0, 0, 0)
                   for a, r in zip(s32, refs)]
        if differentiable:
            own_grad = [None if a is None or r is None else ((a.double() - r).abs() * scale64).nan_to_num(0, 0, 0)
                        for a, r in zip(_grads(s32, cots, ins32), g_ref)]
    eps_c = torch.finfo(_compute_dtype(values[0].dtype)).eps
    for i, (o, sm, r, sn) in enumerate(zip(outs, sames, refs, sens_out)):
        _check(f"{name} output {i}", o, sm, r.detach().double(), sn, case, own_out[i], eps_c)
    if differentiable:
        for i, (go, gs, gr, sn, inp) in enumerate(zip(g_out, g_same, g_ref, sens_grad, ins)):
            if gr is None:
                continue
            assert go is not None, f"{name}: no gradient for input {i} ({case})"
            assert go.dtype == inp.dtype, f"{name}: gradient {i} has dtype {go.dtype}, input {inp.dtype}"
            _check(f"{name} grad {i}", go, gs, gr, sn, case, own_grad[i], eps_c)


def _layout(t: torch.Tensor | None, kind: str) -> torch.Tensor | None:
    """The same values as ``t`` in another memory layout (differentiable, so gradients reach the leaf)."""
    if t is None or kind in ("contiguous", "expanded"):
        return t
    if kind == "channels_last" and t.dim() == 4:
        return t.contiguous(memory_format=torch.channels_last)
    if kind == "sliced":
        big = torch.zeros(*t.shape[:-1], 2 * t.shape[-1], dtype=t.dtype)
        big = big.index_copy(-1, torch.arange(0, 2 * t.shape[-1], 2), t)
        return big[..., ::2]
    if kind == "transposed" and t.dim() >= 2:
        return t.transpose(0, -1).contiguous().transpose(0, -1)
    return t


def _values(gen, shape, scale=1.0, dtype=torch.float32, low=None, high=None):
    if low is not None:
        v = torch.rand(shape, generator=gen, dtype=torch.float64) * (high - low) + low
    else:
        v = torch.randn(shape, generator=gen, dtype=torch.float64) * scale
    return v.to(dtype)


# ----------------------------------------------------------------------------------------------- affine coupling
@dataclass
class CouplingCase:
    dtype: torch.dtype
    shape: tuple
    mask: str
    scale: str
    reverse: bool
    sldj: str
    layout: str
    magnitude: str
    seed: int


@st.composite
def coupling_cases(draw):
    rank = draw(st.sampled_from([2, 3, 4, 4]))
    b = draw(st.sampled_from([1, 2, 3, 5]))
    c = draw(st.sampled_from([1, 2, 3, 5, 6]))
    if rank == 2:
        shape = (b, draw(st.sampled_from([1, 2, 3, 7, 13, 40, 41])))
    elif rank == 3:
        shape = (b, c, draw(st.sampled_from([1, 2, 5, 7])))
    else:
        shape = (b, c, draw(st.sampled_from([1, 2, 3, 4, 5, 8, 13])), draw(st.sampled_from([1, 2, 3, 6, 7, 32])))
    masks = ["none", "dense", "bool", "batch1"] + (["checker0", "checker1", "plane", "channel"] if rank == 4 else [])
    return CouplingCase(dtype=draw(st.sampled_from(FLOATS)), shape=shape, mask=draw(st.sampled_from(masks)),
                        scale=draw(st.sampled_from(["none", "vector", "shaped"])), reverse=draw(st.booleans()),
                        sldj=draw(st.sampled_from(["none", "float32", "float64"])),
                        layout=draw(st.sampled_from(["contiguous", "sliced", "transposed", "expanded"]
                                                    + (["channels_last"] if rank == 4 else []))),
                        magnitude=draw(st.sampled_from(["normal", "large", "saturated"])),
                        seed=draw(st.integers(0, 2**31 - 1)))


def _coupling_mask(case, gen):
    """(functional mask argument, mask in the reference's normalised form or None, checker parity)."""
    shape = case.shape
    if case.mask == "none":
        return None, None, -1
    if case.mask.startswith("checker"):
        return F.checkerboard(int(case.mask[-1])), None, int(case.mask[-1])
    bshape = {"dense": shape[1:], "bool": shape[1:], "batch1": (1,) + shape[1:],
              "plane": (1, 1) + shape[2:], "channel": (shape[1], 1, 1)}[case.mask]
    m = (torch.rand(bshape, generator=gen) > 0.5)
    arg = m if case.mask == "bool" else m.to(case.dtype)
    full = torch.broadcast_to(m.reshape(bshape[-(len(shape) - 1):] if len(bshape) >= len(shape) else bshape),
                              shape[1:])
    return arg, full, -1


def check_coupling(backend, case: CouplingCase):
    gen = torch.Generator().manual_seed(case.seed)
    b = case.shape[0]
    base_shape = (1,) + case.shape[1:] if case.layout == "expanded" else case.shape
    big = case.magnitude == "large"
    x = _values(gen, base_shape, 1e3 if big else 1.0, case.dtype)
    s = _values(gen, base_shape, 30.0 if case.magnitude == "saturated" and case.scale != "none" else
                3.0 if big else 1.0, case.dtype)
    t = _values(gen, base_shape, 1e3 if big else 1.0, case.dtype)
    c = case.shape[1]
    sc = None if case.scale == "none" else _values(gen, (c,), low=0.2, high=2.5, dtype=case.dtype)
    sl = None if case.sldj == "none" else _values(gen, (b,), 10.0, getattr(torch, case.sldj))
    mask_arg, mask_full, parity = _coupling_mask(case, gen)

    def inputs(x, s, t, sc):
        if case.layout == "expanded":
            x, s, t = (v.expand(case.shape) for v in (x, s, t))
        x, s, t = (_layout(v, case.layout) for v in (x, s, t))
        if sc is not None and case.scale == "shaped" and len(case.shape) > 2:
            sc = sc.reshape((c,) + (1,) * (len(case.shape) - 2))
        return x, s, t, sc

    def run_backend(x, s, t, sc, sl):
        x, s, t, sc = inputs(x, s, t, sc)
        with flowgmm_fast.use_backend(backend):
            out = F.affine_coupling(x, s, t, scale=sc, mask=mask_arg, reverse=case.reverse, sldj=sl)
        return out, [x, s, t, sc, sl]

    def run_ref(x, s, t, sc, sl, upcast):
        x, s, t, sc = inputs(x, s, t, sc)
        m = None if mask_full is None else mask_full.to(x.dtype)
        out = R.affine_coupling(x, s, t, None if sc is None else sc.reshape(c), m, parity, case.reverse, sl,
                                upcast=upcast)
        return out, [x, s, t, sc, sl]

    _differential("affine_coupling", run_backend, run_ref, [x, s, t, sc, sl], case)


# ----------------------------------------------------------------------------------------------- logit
@dataclass
class LogitCase:
    dtype: torch.dtype
    shape: tuple
    alpha: float
    reverse: bool
    noise: bool
    sldj: str
    layout: str
    magnitude: str
    seed: int


@st.composite
def logit_cases(draw):
    b = draw(st.sampled_from([1, 2, 3, 7]))
    rest = draw(st.sampled_from([(), (1,), (5,), (3, 4), (1, 1, 1), (2, 3, 5), (3, 8, 8), (1, 13, 2)]))
    reverse = draw(st.booleans())
    return LogitCase(dtype=draw(st.sampled_from(FLOATS)), shape=(b,) + rest,
                     alpha=draw(st.sampled_from([0.0, 0.05, 0.3, 0.4999]) | st.floats(0.0, 0.4999)),
                     reverse=reverse, noise=not reverse and draw(st.booleans()),
                     sldj=draw(st.sampled_from(["none", "float32", "float64"])),
                     layout=draw(st.sampled_from(["contiguous", "sliced", "transposed", "expanded", "channels_last"])),
                     magnitude=draw(st.sampled_from(["normal", "edges", "large"])), seed=draw(st.integers(0, 2**31 - 1)))


def check_logit(backend, case: LogitCase):
    gen = torch.Generator().manual_seed(case.seed)
    base_shape = (1,) + case.shape[1:] if case.layout == "expanded" else case.shape
    if case.reverse:
        x = _values(gen, base_shape, 30.0 if case.magnitude == "large" else 3.0, case.dtype)
    else:
        lo = 0.0 if case.magnitude == "edges" and case.alpha > 0 else 1e-3
        x = _values(gen, base_shape, low=lo, high=1 - lo, dtype=case.dtype)
    noise = _values(gen, base_shape, low=0.0, high=0.999, dtype=case.dtype) if case.noise else None
    sl = None if case.sldj == "none" else _values(gen, (case.shape[0],), 10.0, getattr(torch, case.sldj))

    def inputs(x, n):
        if case.layout == "expanded":
            x = x.expand(case.shape)
            n = None if n is None else n.expand(case.shape)
        return _layout(x, case.layout), _layout(n, case.layout)

    def run_backend(x, n, sl):
        x, n = inputs(x, n)
        with flowgmm_fast.use_backend(backend):
            return F.logit_transform(x, case.alpha, reverse=case.reverse, sldj=sl, noise=n), [x, n, sl]

    def run_ref(x, n, sl, upcast):
        x, n = inputs(x, n)
        return R.logit_transform(x, case.alpha, case.reverse, sl, n, upcast=upcast), [x, n, sl]

    _differential("logit_transform", run_backend, run_ref, [x, noise, sl], case)


# ----------------------------------------------------------------------------------------------- GMM
@dataclass
class GmmCase:
    dtype: torch.dtype
    param_dtype: str
    b: int
    k: int
    d: int
    diag: bool
    weights: bool
    labels: str
    label_weight: float
    layout: str
    magnitude: str
    log_prob: bool
    seed: int


@st.composite
def gmm_cases(draw, log_prob: bool):
    return GmmCase(dtype=draw(st.sampled_from(FLOATS)), param_dtype=draw(st.sampled_from(["same", "float32"])),
                   b=draw(st.sampled_from([1, 2, 3, 5, 17, 64])), k=draw(st.sampled_from([1, 2, 3, 10, 17])),
                   d=draw(st.sampled_from([1, 2, 7, 32, 33, 100, 784, 3072])), diag=draw(st.booleans()),
                   weights=draw(st.booleans()), labels=draw(st.sampled_from(["none", "mixed", "all"])),
                   label_weight=draw(st.sampled_from([1.0, 0.0, 3.0, -0.5]) | st.floats(-3, 3)),
                   layout=draw(st.sampled_from(["contiguous", "sliced", "transposed", "expanded"])),
                   magnitude=draw(st.sampled_from(["normal", "offset", "spread", "tight"])),
                   log_prob=log_prob, seed=draw(st.integers(0, 2**31 - 1)))


def _gmm_with_rounding(z, means, log_std, wl, labels, label_weight, gen):
    """R.gmm_nll's (nll, logits) in float64 with the closed form's own rounding injected: each of |z'|^2, z'.mu' and
    |mu'|^2 (z, mu centred on the mean of the means; diagonal: weighted by 1/sigma^2) is multiplied by 1 + u eps
    sqrt(D), u ~ U(-1, 1): a D-long fp32 dot product is good to about sqrt(D) units roundoff of its terms' size, and
    the three cancel when z and mu are far from the centre but close to each other."""
    k, d = means.shape
    eps = torch.finfo(torch.float32).eps * math.sqrt(d)

    def noisy(t):
        return t * (1 + eps * (torch.rand(t.shape, generator=gen, dtype=torch.float64) * 2 - 1))

    centre = means.detach().mean(0)
    zc, mc = z - centre, means - centre
    iv = torch.exp(-2 * log_std)
    if log_std.dim() == 1:
        maha = (noisy((zc * zc).sum(1, keepdim=True).expand(-1, k)) - 2 * noisy(zc @ mc.T)
                + noisy((mc * mc).sum(1).expand(z.shape[0], -1))) * iv
        log_det = d * log_std
    else:
        maha = noisy((zc * zc) @ iv.T) - 2 * noisy(zc @ (mc * iv).T) + noisy((mc * mc * iv).sum(1).expand(z.shape[0], -1))
        log_det = log_std.sum(1)
    log_n = -0.5 * maha - log_det - 0.5 * d * math.log(2 * math.pi)
    log_pi = torch.full((k,), -math.log(k), dtype=z.dtype) if wl is None else torch.log_softmax(wl, 0)
    logits = log_n + log_pi
    nll = -torch.logsumexp(logits, 1)
    if labels is not None:
        picked = log_n.gather(1, labels.clamp(0, k - 1)[:, None])[:, 0]
        nll = torch.where(labels >= 0, -label_weight * picked, nll)
    return nll, logits


def check_gmm(backend, case: GmmCase):
    gen = torch.Generator().manual_seed(case.seed)
    pdt = case.dtype if case.param_dtype == "same" else torch.float32
    base_b = 1 if case.layout == "expanded" else case.b
    if case.magnitude == "offset":  # means far from 0 and close together: the closed form's cancellation
        means64 = 5 + 0.5 * torch.randn(case.k, case.d, generator=gen, dtype=torch.float64)
    elif case.magnitude == "spread":
        means64 = 5 * torch.randn(case.k, case.d, generator=gen, dtype=torch.float64)
    else:
        means64 = torch.randn(case.k, case.d, generator=gen, dtype=torch.float64)
    comp = torch.randint(0, case.k, (base_b,), generator=gen)
    noise = 0.05 if case.magnitude == "tight" else 1.0
    z = (means64[comp] + noise * torch.randn(base_b, case.d, generator=gen, dtype=torch.float64)).to(case.dtype)
    means = means64.to(pdt)
    log_std = _values(gen, (case.k, case.d) if case.diag else (case.k,), low=-1.0, high=1.0, dtype=pdt)
    wl = _values(gen, (case.k,), 1.0, pdt) if case.weights else None
    labels = None
    if case.labels != "none":
        low = -1 if case.labels == "mixed" else 0
        labels = torch.randint(low, case.k, (case.b,), generator=gen)

    def z_input(z):
        if case.layout == "expanded":
            z = z.expand(case.b, case.d)
        return _layout(z, case.layout)

    def run_backend(z, means, log_std, wl):
        z = z_input(z)
        with flowgmm_fast.use_backend(backend):
            if case.log_prob:
                return (F.gmm_log_prob(z, means, log_std, wl),), [z, means, log_std, wl]
            return F.gmm_nll(z, means, log_std, wl, labels=labels, label_weight=case.label_weight,
                             return_logits=True), [z, means, log_std, wl]

    def run_ref(z, means, log_std, wl, upcast):
        z = z_input(z)
        if case.log_prob:
            return (R.gmm_log_prob(z, means, log_std, wl, upcast=upcast),), [z, means, log_std, wl]
        return R.gmm_nll(z, means, log_std, wl, labels, case.label_weight, True, upcast=upcast), \
            [z, means, log_std, wl]

    def run_sens(z, means, log_std, wl, gen):
        z = z_input(z)
        nll, logits = _gmm_with_rounding(z, means, log_std, wl, labels, case.label_weight, gen)
        return ((logits,) if case.log_prob else (nll, logits)), [z, means, log_std, wl]

    _differential("gmm_log_prob" if case.log_prob else "gmm_nll", run_backend, run_ref, [z, means, log_std, wl],
                  case, run_sens=run_sens)


# ----------------------------------------------------------------------------------------------- squeeze
@dataclass
class SqueezeCase:
    dtype: torch.dtype
    shape: tuple
    reverse: bool
    alt_order: bool
    layout: str
    seed: int


@st.composite
def squeeze_cases(draw):
    reverse = draw(st.booleans())
    b = draw(st.sampled_from([1, 2, 3]))
    c = draw(st.sampled_from([1, 2, 3, 5]))
    h, w = draw(st.sampled_from([1, 2, 3, 4, 7])), draw(st.sampled_from([1, 2, 3, 8]))
    shape = (b, 4 * c, h, w) if reverse else (b, c, 2 * h, 2 * w)
    return SqueezeCase(dtype=draw(st.sampled_from(FLOATS + (torch.int64, torch.uint8, torch.bool))), shape=shape,
                       reverse=reverse, alt_order=draw(st.booleans()),
                       layout=draw(st.sampled_from(["contiguous", "sliced", "transposed", "channels_last"])),
                       seed=draw(st.integers(0, 2**31 - 1)))


def check_squeeze(backend, case: SqueezeCase):
    gen = torch.Generator().manual_seed(case.seed)
    x = (torch.randn(case.shape, generator=gen) * 100).to(case.dtype)

    def run_backend(x):
        x = _layout(x, case.layout)
        with flowgmm_fast.use_backend(backend):
            return (F.squeeze2x2(x, reverse=case.reverse, alt_order=case.alt_order),), [x]

    def run_ref(x, upcast):
        x = _layout(x, case.layout)
        return (R.squeeze2x2(x, case.reverse, case.alt_order),), [x]

    _differential("squeeze2x2", run_backend, run_ref, [x], case, exact=True)


FUZZED = {"affine_coupling": (coupling_cases, check_coupling), "logit_transform": (logit_cases, check_logit),
          "gmm_log_prob": (lambda: gmm_cases(log_prob=True), check_gmm),
          "gmm_nll": (lambda: gmm_cases(log_prob=False), check_gmm), "squeeze2x2": (squeeze_cases, check_squeeze)}


@pytest.mark.parametrize("backend", ["native", "triton"])
@pytest.mark.parametrize("op", list(FUZZED))
def test_op_matches_reference_fuzz(op, backend):
    strategy, check = FUZZED[op]
    _run(op, backend, strategy(), check)


def test_tolerance_catches_a_wrong_kernel():
    """Control: the documented tolerance is tight enough to see a one-ulp-per-step drift in a sum and a 1e-4 relative
    error in a value (the size of the bugs this file was written against)."""
    case = CouplingCase(torch.float32, (2, 3, 8, 8), "none", "vector", False, "none", "contiguous", "normal", 0)
    gen = torch.Generator().manual_seed(0)
    x, s, t = (torch.randn(case.shape, generator=gen) for _ in range(3))
    sc = torch.rand(3, generator=gen) + 0.5

    def ref(x, s, t, sc, upcast):
        return R.affine_coupling(x, s, t, sc, None, -1, False, None, upcast=upcast), [x, s, t, sc]

    def off_by_1e4(x, s, t, sc):
        y, ldj = R.affine_coupling(x, s, t, sc, None, -1, False, None)
        return (y * (1 + 1e-4), ldj), [x, s, t, sc]

    with pytest.raises(AssertionError, match="out of tolerance"):
        _differential("control", off_by_1e4, ref, [x, s, t, sc], case)
    _differential("control", lambda *a: ref(*a, upcast=True), ref, [x, s, t, sc], case)
