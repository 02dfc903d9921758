"""Fused Gaussian-mixture likelihood of FlowGMM (Izmailov et al. 2020, eq. (2)-(3)) and its backward.

Forward (one launch): each program owns BLOCK_B rows of z (B, D) and all K components (K <= 128), and walks D in
BLOCK_D tiles accumulating, with iv_k = exp(-2 log_std_k),
    isotropic: |z_b|^2, z_b . mu_k, |mu_k|^2            -> maha = iv_k (|z|^2 - 2 z.mu + |mu|^2)
    diagonal:  z^2 . iv_k, z . (mu_k iv_k), |mu_k|^2 iv_k -> maha = the same three terms, sum_d log_std_kd
so (B, K, D) is never formed. z and mu are centred on c = the mean of the means (loaded per D tile; maha is unchanged
by the shift, but without it the three terms cancel when the means sit far from 0). Then log N = -maha / 2 - log det - D/2 log 2pi, logits = log N + log_softmax(w),
nll = -logsumexp_k logits (label -1) or -label_weight log N_y (label y), all in registers; it writes nll (B,) and the
class logits (B, K) (kept for the backward: B K floats, small next to z). A row whose logits are all -inf has nll +inf
(as the reference); a label outside [-1, K) gives nll NaN and NaN gradients (never an index), checked in the kernel.

Backward: with G[b, k] = d loss / d log N[b, k] (from saved logits: softmax responsibilities, labels, incoming grads):
    _gmm_bwd_z_kernel (per BLOCK_B rows):  writes G, and gz = -z (G iv) + G (mu iv)   (iso: -z rowsum(G iv) + (G iv) mu)
    _gmm_bwd_params_kernel (per BLOCK_D columns x row split): partials of G^T z (and G^T z^2 for diagonal)
both on z - c and mu - c; the launcher finishes the (K, D)-sized algebra for means, log_std and weight_logits.

Dot precision (``_dot_precision``): every tl.dot accumulates in fp32. On sm_80+ its products use
input_precision="tf32x3": each fp32 operand is split into a TF32 high part and a TF32 remainder and three TF32
tensor-core products (hi*hi + hi*lo + lo*hi) are summed: each product is then exact to a few units of 2^-22 relative
(the dropped lo*lo term and the remainders' own TF32 rounding; fp32's rounding is 2^-24), not fp32-exact. Elsewhere
(older GPUs, and the CPU interpreter) it is "ieee": plain fp32 multiply-adds. Plain single-pass TF32 (10-bit mantissa)
is never used, because |z|^2 - 2 z.mu + |mu|^2 cancels. The error of the tf32x3 path against float64 at D = 3072 has not
been measured: it needs a GPU (the interpreter computes the dots in fp32).
"""

from __future__ import annotations

import functools
import math

import torch
import triton
import triton.language as tl

from ._common import next_pow2, on_input_device, wide_index

__all__ = ["gmm_forward", "gmm_backward", "MAX_COMPONENTS"]

MAX_COMPONENTS = 128
_LOG_2PI = math.log(2 * math.pi)
_HALF_LOG_2PI = tl.constexpr(0.5 * _LOG_2PI)  # a constexpr global: Triton kernels may read no other globals


@triton.jit
def _component_index(BLOCK_K: tl.constexpr, IDX64: tl.constexpr):
    """0 .. BLOCK_K - 1, in int64 when IDX64 (the launcher sets it once K * D can pass int32): rk * D + d indexes the
    (K, D) means and log_std."""
    rk = tl.arange(0, BLOCK_K)
    if IDX64:
        rk = rk.to(tl.int64)
    return rk


@triton.jit
def _gmm_fwd_kernel(z_ptr, mu_ptr, c_ptr, ls_ptr, wl_ptr, lab_ptr, logits_ptr, nll_ptr,
                    B, K, D, label_weight, log_k,
                    DIAG: tl.constexpr, HAS_WL: tl.constexpr, HAS_LABELS: tl.constexpr,
                    BLOCK_B: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr,
                    PRECISION: tl.constexpr, IDX64: tl.constexpr):
    """logits[b, k] = log N(z_b; mu_k, diag(e^{2 log_std_k})) + log pi_k and nll[b] for BLOCK_B rows (module doc)."""
    pid = tl.program_id(0)
    lw = tl.cast(label_weight, tl.float32)
    rb = pid.to(tl.int64) * BLOCK_B + tl.arange(0, BLOCK_B)
    bm = rb < B
    rk = _component_index(BLOCK_K, IDX64)
    km = rk < K
    cross = tl.zeros((BLOCK_B, BLOCK_K), dtype=tl.float32)
    quad = tl.zeros((BLOCK_B, BLOCK_K), dtype=tl.float32)
    zz = tl.zeros((BLOCK_B,), dtype=tl.float32)
    mm = tl.zeros((BLOCK_K,), dtype=tl.float32)
    lsum = tl.zeros((BLOCK_K,), dtype=tl.float32)
    for d0 in range(0, D, BLOCK_D):
        rd = d0 + tl.arange(0, BLOCK_D)
        dm = rd < D
        c = tl.load(c_ptr + rd, mask=dm, other=0.0)
        z = tl.load(z_ptr + rb[:, None] * D + rd[None, :], mask=bm[:, None] & dm[None, :], other=0.0).to(tl.float32)
        z = z - c[None, :]
        kd = rk[None, :] * D + rd[:, None]
        kdm = km[None, :] & dm[:, None]
        mu_t = tl.load(mu_ptr + kd, mask=kdm, other=0.0).to(tl.float32)
        mu_t = tl.where(kdm, mu_t - c[:, None], 0.0)
        if DIAG:
            ls_t = tl.load(ls_ptr + kd, mask=kdm, other=0.0).to(tl.float32)
            iv_t = tl.exp(-2.0 * ls_t)
            quad = tl.dot(z * z, iv_t, quad, input_precision=PRECISION)
            cross = tl.dot(z, mu_t * iv_t, cross, input_precision=PRECISION)
            mm += tl.sum(mu_t * mu_t * iv_t, axis=0)
            lsum += tl.sum(ls_t, axis=0)
        else:
            zz += tl.sum(z * z, axis=1)
            cross = tl.dot(z, mu_t, cross, input_precision=PRECISION)
            mm += tl.sum(mu_t * mu_t, axis=0)
    if DIAG:
        maha = quad - 2.0 * cross + mm[None, :]
        log_det = lsum
    else:
        ls = tl.load(ls_ptr + rk, mask=km, other=0.0).to(tl.float32)
        maha = (zz[:, None] - 2.0 * cross + mm[None, :]) * tl.exp(-2.0 * ls)[None, :]
        log_det = ls * D
    log_n = -0.5 * maha - log_det[None, :] - _HALF_LOG_2PI * D
    if HAS_WL:
        wl = tl.load(wl_ptr + rk, mask=km, other=-float("inf")).to(tl.float32)
        wmax = tl.max(wl, axis=0)
        log_pi = wl - wmax - tl.log(tl.sum(tl.exp(wl - wmax), axis=0))
        logits = log_n + log_pi[None, :]
    else:
        logits = log_n - tl.cast(log_k, tl.float32)
    bk = bm[:, None] & km[None, :]
    logits = tl.where(km[None, :], logits, -float("inf"))
    tl.store(logits_ptr + rb[:, None] * K + rk[None, :], logits, mask=bk)
    mx = tl.max(logits, axis=1)
    mx = tl.where(mx == -float("inf"), 0.0, mx)  # an all -inf row: logsumexp -inf, nll +inf (not -inf - -inf = NaN)
    nll = -(mx + tl.log(tl.sum(tl.exp(logits - mx[:, None]), axis=1)))
    if HAS_LABELS:
        lab = tl.load(lab_ptr + rb, mask=bm, other=-1)
        picked = tl.sum(tl.where(rk[None, :] == lab[:, None], log_n, 0.0), axis=1)
        nll = tl.where(lab >= 0, -lw * picked, nll)
        nll = tl.where((lab < -1) | (lab >= K), float("nan"), nll)
    tl.store(nll_ptr + rb, nll, mask=bm)


@triton.jit
def _gmm_bwd_z_kernel(z_ptr, mu_ptr, c_ptr, ls_ptr, lab_ptr, logits_ptr, gnll_ptr, glogits_ptr, g_ptr, gz_ptr,
                      B, K, D, label_weight,
                      DIAG: tl.constexpr, HAS_LABELS: tl.constexpr, HAS_GLOGITS: tl.constexpr,
                      BLOCK_B: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr,
                      PRECISION: tl.constexpr, IDX64: tl.constexpr):
    """G[b, k] = glogits - [label b = -1] gnll_b softmax(logits_b)_k - [k = label b] label_weight gnll_b (stored), and
    gz[b] = sum_k G[b, k] iv_k (mu_k - z_b) over BLOCK_D tiles (two dots for diagonal, one for isotropic)."""
    pid = tl.program_id(0)
    lw = tl.cast(label_weight, tl.float32)
    rb = pid.to(tl.int64) * BLOCK_B + tl.arange(0, BLOCK_B)
    bm = rb < B
    rk = _component_index(BLOCK_K, IDX64)
    km = rk < K
    bk = bm[:, None] & km[None, :]
    logits = tl.load(logits_ptr + rb[:, None] * K + rk[None, :], mask=bk, other=-float("inf"))
    logits = tl.where(bm[:, None], logits, 0.0)
    mx = tl.max(logits, axis=1)
    e = tl.exp(logits - mx[:, None])
    r = e / tl.sum(e, axis=1)[:, None]
    gnll = tl.load(gnll_ptr + rb, mask=bm, other=0.0).to(tl.float32)
    if HAS_GLOGITS:
        g = tl.load(glogits_ptr + rb[:, None] * K + rk[None, :], mask=bk, other=0.0).to(tl.float32)
    else:
        g = tl.zeros((BLOCK_B, BLOCK_K), dtype=tl.float32)
    if HAS_LABELS:
        lab = tl.load(lab_ptr + rb, mask=bm, other=-1)
        unl = (lab < 0)[:, None]
        g = g - tl.where(unl, gnll[:, None] * r, 0.0)
        g = g - tl.where(rk[None, :] == lab[:, None], lw * gnll[:, None], 0.0)
        g = tl.where(((lab < -1) | (lab >= K))[:, None], float("nan"), g)
    else:
        g = g - gnll[:, None] * r
    g = tl.where(bk, g, 0.0)
    tl.store(g_ptr + rb[:, None] * K + rk[None, :], g, mask=bk)
    if DIAG:
        for d0 in range(0, D, BLOCK_D):
            rd = d0 + tl.arange(0, BLOCK_D)
            dm = rd < D
            zoff = rb[:, None] * D + rd[None, :]
            zm = bm[:, None] & dm[None, :]
            c = tl.load(c_ptr + rd, mask=dm, other=0.0)
            z = tl.load(z_ptr + zoff, mask=zm, other=0.0).to(tl.float32) - c[None, :]
            kd = rk[:, None] * D + rd[None, :]
            kdm = km[:, None] & dm[None, :]
            mu = tl.load(mu_ptr + kd, mask=kdm, other=0.0).to(tl.float32) - c[None, :]
            iv = tl.exp(-2.0 * tl.load(ls_ptr + kd, mask=kdm, other=0.0).to(tl.float32))
            gz = tl.dot(g, mu * iv, input_precision=PRECISION) - z * tl.dot(g, iv, input_precision=PRECISION)
            tl.store(gz_ptr + zoff, gz.to(gz_ptr.dtype.element_ty), mask=zm)
    else:
        ls = tl.load(ls_ptr + rk, mask=km, other=0.0).to(tl.float32)
        giv = g * tl.exp(-2.0 * ls)[None, :]
        rs = tl.sum(giv, axis=1)
        for d0 in range(0, D, BLOCK_D):
            rd = d0 + tl.arange(0, BLOCK_D)
            dm = rd < D
            zoff = rb[:, None] * D + rd[None, :]
            zm = bm[:, None] & dm[None, :]
            c = tl.load(c_ptr + rd, mask=dm, other=0.0)
            z = tl.load(z_ptr + zoff, mask=zm, other=0.0).to(tl.float32) - c[None, :]
            mu = tl.load(mu_ptr + rk[:, None] * D + rd[None, :], mask=km[:, None] & dm[None, :],
                         other=0.0).to(tl.float32) - c[None, :]
            gz = tl.dot(giv, mu, input_precision=PRECISION) - z * rs[:, None]
            tl.store(gz_ptr + zoff, gz.to(gz_ptr.dtype.element_ty), mask=zm)


@triton.jit
def _gmm_bwd_params_kernel(z_ptr, c_ptr, g_ptr, a_ptr, a2_ptr, B, K, D, rows_per_split,
                           DIAG: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_K: tl.constexpr,
                           BLOCK_D: tl.constexpr, PRECISION: tl.constexpr, IDX64: tl.constexpr):
    """Partials over one row split of A = G^T (z - c) and (DIAG) A2 = G^T (z - c)^2 for BLOCK_D columns:
    a_ptr[split, k, d] (rows past B have G = 0)."""
    pd = tl.program_id(0)
    split = tl.program_id(1)
    if IDX64:
        pd = pd.to(tl.int64)
    rd = pd * BLOCK_D + tl.arange(0, BLOCK_D)
    dm = rd < D
    rk = _component_index(BLOCK_K, IDX64)
    km = rk < K
    acc = tl.zeros((BLOCK_K, BLOCK_D), dtype=tl.float32)
    acc2 = tl.zeros((BLOCK_K, BLOCK_D), dtype=tl.float32)
    start = split.to(tl.int64) * rows_per_split
    c = tl.load(c_ptr + rd, mask=dm, other=0.0)
    for r0 in range(0, rows_per_split, BLOCK_B):
        rb = start + r0 + tl.arange(0, BLOCK_B)
        bm = rb < B
        z = tl.load(z_ptr + rb[:, None] * D + rd[None, :], mask=bm[:, None] & dm[None, :], other=0.0).to(tl.float32)
        z = tl.where(bm[:, None], z - c[None, :], 0.0)
        g_t = tl.load(g_ptr + rb[None, :] * K + rk[:, None], mask=bm[None, :] & km[:, None], other=0.0)
        acc = tl.dot(g_t, z, acc, input_precision=PRECISION)
        if DIAG:
            acc2 = tl.dot(g_t, z * z, acc2, input_precision=PRECISION)
    out = split.to(tl.int64) * K * D + rk[:, None] * D + rd[None, :]
    om = km[:, None] & dm[None, :]
    tl.store(a_ptr + out, acc, mask=om)
    if DIAG:
        tl.store(a2_ptr + out, acc2, mask=om)


def _config(b: int, k: int, diag: bool, device: torch.device, d: int) -> dict:
    """Block sizes, warps and dot precision. The largest BLOCK_B of each K (fp32 (B, K) tiles of <= 1024) was chosen so
    no kernel spills registers on sm_90 (cuobjdump of the compiled cubins; K = 100 diagonal spills a little in the
    forward); BLOCK_B halves (down to 16, tl.dot's minimum) while there are fewer than 2 row blocks per SM.

    Warps follow the (BLOCK_B, BLOCK_K) tile (``_num_warps``): a tensor-core MMA instruction covers a 16 x 8 block of
    it per warp, so 8 warps on a 16 x 16 tile (what K <= 16 at B = 4096 on 132 SMs used to get) ran the same MMAs
    eight times over; smaller programs also leave room for more of them per SM."""
    if k > MAX_COMPONENTS:
        raise ValueError(f"the triton GMM kernels support at most {MAX_COMPONENTS} components, got K = {k}")
    block_k = max(16, next_pow2(k))
    block_b = 64 if block_k == 16 else 32 if (block_k == 32 and not diag) else 16
    if device.type == "cuda":
        while block_b > 16 and triton.cdiv(b, block_b) < 2 * _sm_count(_index(device)):
            block_b //= 2
    return dict(BLOCK_B=block_b, BLOCK_K=block_k, BLOCK_D=32, PRECISION=_dot_precision(device),
                IDX64=wide_index(block_k * d, d + 32), num_warps=_num_warps(block_b, block_k))


def _num_warps(block_b: int, block_k: int) -> int:
    """One warp per 128 elements of the (BLOCK_B, BLOCK_K) fp32 accumulator tile (two 16 x 8 MMA blocks, 4 registers
    per thread per accumulator), between 2 and 8: 16 x 16 -> 2, 32 x 16 -> 4, 64 x 16 and 16 x 128 -> 8."""
    return max(2, min(8, block_b * block_k // 128))


def _param_splits(row_blocks: int, n_d: int, device: torch.device) -> int:
    """Row splits of the parameter-gradient kernel, whose grid is (n_d column blocks, splits). On CUDA at least four
    programs per SM (when the rows allow), so the last partial wave idles at most a fifth of the GPU: the earlier fixed
    256 programs gave 2 x 96 = 192 programs on an H200's 132 SMs at D = 3072 (a second wave 45% full). Elsewhere (the
    interpreter) 256 programs in all."""
    target = 4 * _sm_count(_index(device)) if device.type == "cuda" else 256
    return max(1, min(row_blocks, triton.cdiv(target, n_d)))


def _index(device: torch.device) -> int:
    return device.index if device.index is not None else torch.cuda.current_device()


@functools.lru_cache(maxsize=None)
def _sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


@functools.lru_cache(maxsize=None)
def _tf32_capable(index: int) -> bool:
    return torch.cuda.get_device_capability(index) >= (8, 0)


def _dot_precision(device: torch.device) -> str:
    """"tf32x3" (three TF32 tensor-core products, close to fp32 accuracy: module docstring) on sm_80+, else "ieee"
    (fp32 FMA). Plain one-pass TF32 is never used: |z|^2 - 2 z.mu + |mu|^2 cancels."""
    if device.type == "cuda" and _tf32_capable(_index(device)):
        return "tf32x3"
    return "ieee"


@on_input_device
def gmm_forward(z, means, log_std, weight_logits, labels, label_weight: float):
    """z (B, D), means (K, D), log_std (K,) or (K, D), weight_logits None or (K,), labels None or int64 (B,) ->
    (nll (B,) fp32, logits (B, K) fp32). Inputs fp32/bf16/fp16 (cast to fp32 on load). One launch."""
    z, means, log_std = z.contiguous(), means.contiguous(), log_std.contiguous()
    b, d = z.shape
    k = means.shape[0]
    diag = log_std.dim() == 2
    nll = torch.empty(b, dtype=torch.float32, device=z.device)
    logits = torch.empty((b, k), dtype=torch.float32, device=z.device)
    if b == 0:
        return nll, logits
    cfg = _config(b, k, diag, z.device, d)
    _gmm_fwd_kernel[(triton.cdiv(b, cfg["BLOCK_B"]),)](
        z, means, _centre(means), log_std, weight_logits.contiguous() if weight_logits is not None else log_std,
        labels.contiguous() if labels is not None else nll, logits, nll,
        b, k, d, float(label_weight), math.log(k),
        DIAG=diag, HAS_WL=weight_logits is not None, HAS_LABELS=labels is not None, **cfg)
    return nll, logits


@on_input_device
def gmm_backward(grad_nll, grad_logits, z, means, log_std, weight_logits, labels, label_weight: float, logits,
                 need_params: bool = True):
    """Backward of :func:`gmm_forward` from its inputs and saved logits. grad_nll (B,), grad_logits None or (B, K).
    Returns (grad_z like z, grad_means (K, D) fp32, grad_log_std like log_std's shape fp32, grad_weight_logits (K,)
    fp32 or None); the parameter grads are None when ``need_params`` is False (the params kernel is skipped)."""
    z, means, log_std = z.contiguous(), means.contiguous(), log_std.contiguous()
    b, d = z.shape
    k = means.shape[0]
    diag = log_std.dim() == 2
    cfg = _config(b, k, diag, z.device, d)
    gz = torch.empty_like(z)
    g = torch.empty((b, k), dtype=torch.float32, device=z.device)
    centre = _centre(means)
    if b > 0:
        _gmm_bwd_z_kernel[(triton.cdiv(b, cfg["BLOCK_B"]),)](
            z, means, centre, log_std, labels.contiguous() if labels is not None else g, logits.contiguous(),
            grad_nll.contiguous(), grad_logits.contiguous() if grad_logits is not None else g, g, gz,
            b, k, d, float(label_weight),
            DIAG=diag, HAS_LABELS=labels is not None, HAS_GLOGITS=grad_logits is not None, **cfg)
    if not need_params:
        return gz, None, None, None
    means32, ls32 = means.float() - centre, log_std.float()  # the means centred as in the kernels
    col = g.sum(0)
    block_b, n_d = cfg["BLOCK_B"], triton.cdiv(d, cfg["BLOCK_D"])
    row_blocks = triton.cdiv(b, block_b)
    splits = _param_splits(row_blocks, n_d, z.device)
    rows_per_split = max(1, triton.cdiv(row_blocks, splits)) * block_b
    splits = max(1, triton.cdiv(b, rows_per_split))
    alloc = torch.empty if b > 0 else torch.zeros  # every (split, k, d) is written by the kernel when b > 0
    a = alloc((splits, k, d), dtype=torch.float32, device=z.device)
    a2 = alloc((splits, k, d), dtype=torch.float32, device=z.device) if diag else a
    if b > 0:
        _gmm_bwd_params_kernel[(n_d, splits)](z, centre, g, a, a2, b, k, d, rows_per_split, DIAG=diag, **cfg)
    a = a.sum(0)
    iv = torch.exp(-2 * ls32)
    if diag:
        a2 = a2.sum(0)
        g_means = iv * (a - col[:, None] * means32)
        g_ls = iv * (a2 - 2 * means32 * a + means32 * means32 * col[:, None]) - col[:, None]
    else:
        g_means = iv[:, None] * (a - col[:, None] * means32)
        log_pi = _log_pi(weight_logits, k, z.device)
        maha = -2 * (logits - log_pi) - 2 * d * ls32 - d * _LOG_2PI
        g_ls = (g * maha).sum(0) - d * col
    g_wl = None
    if weight_logits is not None:
        s = col
        if labels is not None:
            labeled = labels >= 0  # labels outside [-1, K) have NaN rows in g (so in col): clamped, never an index
            s = col.index_add(0, labels.clamp(0, k - 1), torch.where(labeled, label_weight * grad_nll.float(), 0.0))
        g_wl = s - torch.softmax(weight_logits.float(), 0) * s.sum()
    return gz, g_means, g_ls, g_wl


def _centre(means: torch.Tensor) -> torch.Tensor:
    """(D,) fp32 mean of the means: the kernels work on z - c and mu - c (module docstring)."""
    return means.float().mean(0).contiguous()


def _log_pi(weight_logits, k: int, device) -> torch.Tensor:
    if weight_logits is None:
        return torch.full((k,), -math.log(k), dtype=torch.float32, device=device)
    return torch.log_softmax(weight_logits.float(), 0)
