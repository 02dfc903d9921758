"""The "triton" backend: torch.library custom ops (namespace ``flowgmm_triton``) over the kernels in
:mod:`flowgmm_fast.kernels`, with autograd and fake implementations, behind the normalised signatures of
:mod:`flowgmm_fast.ops.reference`.

Ops (named like the native backend's so the two correspond):
    coupling_fwd / coupling_bwd   fused affine coupling (tanh-scale, mask or index checkerboard, exp, log-det + sldj)
    squeeze2x2                    2x2 squeeze / unsqueeze (its own backward with ``reverse`` flipped)
    logit_fwd / logit_bwd         fused dequantise + logit + log-det (backward: dL/dx and, when asked, dL/dnoise)
    gmm_fwd / gmm_bwd             fused GMM log-densities, log pi, logsumexp, label gather -> (nll, logits)
Backwards recompute from the forward's inputs (the GMM keeps its (B, K) logits), so nothing of size (B, C, H, W)
beyond the inputs is saved.

Dtypes: float32, bfloat16 and float16 run in the kernels (fp32 arithmetic, log-dets and GMM outputs fp32). float64
inputs are routed to the reference implementation (the kernels compute in fp32 and would lose the precision asked
for). Devices: CUDA; CPU tensors only when TRITON_INTERPRET=1 was set before this module (and triton) was imported.

The ops are ``torch.library.custom_op``s with ``register_fake``, so ``torch.compile(fullgraph=True)`` treats each as
one opaque node without a graph break. (``triton_op`` + ``wrap_triton`` would let Inductor see the kernels, but its
fake-tensor path launches the kernel on fake CPU tensors under the interpreter, so opcheck cannot run in CI.)
"""

from __future__ import annotations

import os
from typing import Optional

import torch
from torch import Tensor

from . import reference

_INTERPRETED = os.environ.get("TRITON_INTERPRET", "0") == "1"

try:
    from flowgmm_fast.kernels import coupling as _coupling
    from flowgmm_fast.kernels import gmm as _gmm
    from flowgmm_fast.kernels import logit as _logit
    from flowgmm_fast.kernels import squeeze as _squeeze

    _IMPORT_ERROR: str | None = None
except ImportError as exc:  # reported through unavailable_reason()
    _IMPORT_ERROR = f"{type(exc).__name__}: {exc}"

__all__ = ["affine_coupling", "squeeze2x2", "logit_transform", "gmm_log_prob", "gmm_nll", "unavailable_reason",
           "supports_device"]

_NS = "flowgmm_triton"


def unavailable_reason() -> str | None:
    """Why the kernels cannot run in this process (None when they can)."""
    return _IMPORT_ERROR


def supports_device(device_type: str) -> bool:
    """CUDA always; CPU only under the Triton interpreter (TRITON_INTERPRET=1 read once, at import)."""
    return device_type == "cuda" or (device_type == "cpu" and _INTERPRETED)


def _f32(n: int, like: Tensor) -> Tensor:
    return like.new_empty((n,), dtype=torch.float32)


# ---------------------------------------------------------------------------------------------------- coupling


@torch.library.custom_op(f"{_NS}::coupling_fwd", mutates_args=())
def coupling_fwd(x: Tensor, s: Tensor, t: Optional[Tensor], scale: Optional[Tensor], mask: Optional[Tensor],
                 checker_parity: int, reverse: bool, sldj: Optional[Tensor]) -> tuple[Tensor, Tensor]:
    """(y (B, C, *S) like x, ldj_out (B,) fp32 = sldj + (+-sum s_m)); t None: s is the joint (B, 2C, *S) s/t
    tensor; see kernels/coupling.py."""
    return _coupling.coupling_forward(x, s, t, scale, mask, checker_parity, reverse, sldj)


@coupling_fwd.register_fake
def _(x, s, t, scale, mask, checker_parity, reverse, sldj):
    return torch.empty_like(x, memory_format=torch.contiguous_format), _f32(x.shape[0], x)


@torch.library.custom_op(f"{_NS}::coupling_bwd", mutates_args=())
def coupling_bwd(grad_y: Tensor, grad_ldj: Tensor, x: Tensor, s: Tensor, t: Optional[Tensor], scale: Optional[Tensor],
                 mask: Optional[Tensor], checker_parity: int, reverse: bool) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(grad_x, grad_s, grad_t, grad_scale (C,) fp32, or (0,) when scale is None); t None: grad_s is the joint
    (B, 2C, *S) gradient and grad_t (0,)."""
    gx, gs, gt, gscale = _coupling.coupling_backward(grad_y, grad_ldj, x, s, t, scale, mask, checker_parity, reverse)
    return (gx, gs, gt if gt is not None else x.new_empty((0,)),
            gscale if gscale is not None else x.new_empty((0,), dtype=torch.float32))


@coupling_bwd.register_fake
def _(grad_y, grad_ldj, x, s, t, scale, mask, checker_parity, reverse):
    gx = torch.empty_like(x, memory_format=torch.contiguous_format)
    gs = x.new_empty(s.shape)
    gt = torch.empty_like(gx) if t is not None else x.new_empty((0,))
    return gx, gs, gt, _f32(x.shape[1] if scale is not None else 0, x)


def _requires_grad(*tensors) -> bool:
    return any(t is not None and t.requires_grad for t in tensors)


def _coupling_setup(ctx, inputs, output):
    x, s, t, scale, mask, checker_parity, reverse, sldj = inputs
    ctx.save_for_backward(x, s, t, scale, mask)
    ctx.checker_parity, ctx.reverse, ctx.has_sldj = checker_parity, reverse, sldj is not None
    if not _requires_grad(x, s, t, scale):  # y depends on x, s, t, scale only (as in the reference)
        ctx.mark_non_differentiable(output[0])


def _coupling_backward(ctx, grad_y, grad_ldj):
    x, s, t, scale, mask = ctx.saved_tensors
    gx, gs, gt, gscale = coupling_bwd(grad_y, grad_ldj, x, s, t, scale, mask, ctx.checker_parity, ctx.reverse)
    gscale = gscale.to(scale.dtype) if scale is not None else None
    return gx, gs, gt if t is not None else None, gscale, None, None, None, grad_ldj if ctx.has_sldj else None


coupling_fwd.register_autograd(_coupling_backward, setup_context=_coupling_setup)


def affine_coupling(x, s, t, scale, mask, checker_parity, reverse, sldj):
    """Fused affine coupling (normalised signature of :func:`flowgmm_fast.ops.reference.affine_coupling`).
    x, s, t: (B, C, *S) (t None: s is the joint (B, 2C, *S) s/t tensor); views with dense per-sample planes are read
    in place; one kernel launch per direction. float64 x runs the reference."""
    if x.dtype == torch.float64:
        return reference.affine_coupling(x, s, t, scale, mask, checker_parity, reverse, sldj)
    if sldj is not None and sldj.dtype == torch.float64:
        y, ldj = coupling_fwd(x, s, t, scale, mask, checker_parity, reverse, None)
        return y, sldj + ldj.double()
    return coupling_fwd(x, s, t, scale, mask, checker_parity, reverse, sldj)


# ---------------------------------------------------------------------------------------------------- squeeze


@torch.library.custom_op(f"{_NS}::squeeze2x2", mutates_args=())
def squeeze2x2_op(x: Tensor, reverse: bool, alt_order: bool) -> Tensor:
    """(B, C, H, W) -> (B, 4C, H/2, W/2), or the inverse; see kernels/squeeze.py."""
    return _squeeze.squeeze2x2(x, reverse, alt_order)


@squeeze2x2_op.register_fake
def _(x, reverse, alt_order):
    b, c, h, w = x.shape
    shape = (b, c // 4, 2 * h, 2 * w) if reverse else (b, 4 * c, h // 2, w // 2)
    return x.new_empty(shape)


def _squeeze_setup(ctx, inputs, output):
    ctx.reverse, ctx.alt_order = inputs[1], inputs[2]


def _squeeze_backward(ctx, grad):
    return squeeze2x2_op(grad, not ctx.reverse, ctx.alt_order), None, None


squeeze2x2_op.register_autograd(_squeeze_backward, setup_context=_squeeze_setup)


def squeeze2x2(x, reverse, alt_order):
    """2x2 squeeze (normalised signature of :func:`flowgmm_fast.ops.reference.squeeze2x2`); one launch, any dtype."""
    return squeeze2x2_op(x, reverse, alt_order)


# ---------------------------------------------------------------------------------------------------- logit


@torch.library.custom_op(f"{_NS}::logit_fwd", mutates_args=())
def logit_fwd(x: Tensor, alpha: float, reverse: bool, sldj: Optional[Tensor],
              noise: Optional[Tensor]) -> tuple[Tensor, Tensor]:
    """(y like x, ldj_out (B,) fp32); see kernels/logit.py."""
    return _logit.logit_forward(x, alpha, reverse, sldj, noise)


@logit_fwd.register_fake
def _(x, alpha, reverse, sldj, noise):
    return torch.empty_like(x, memory_format=torch.contiguous_format), _f32(x.shape[0], x)


@torch.library.custom_op(f"{_NS}::logit_bwd", mutates_args=())
def logit_bwd(grad_y: Tensor, grad_ldj: Tensor, x: Tensor, alpha: float, reverse: bool,
              noise: Optional[Tensor], noise_grad: bool) -> tuple[Tensor, Tensor]:
    """(grad_x like x, grad_noise like x when ``noise_grad``, else shape (0,)); grad_noise = dL/du / 256 from the
    fp32 dL/du (as grad_x / 255 it would overflow a half wherever grad_x does)."""
    gx, gn = _logit.logit_backward(grad_y, grad_ldj, x, alpha, reverse, noise, noise_grad)
    return gx, gn if gn is not None else x.new_empty((0,))


@logit_bwd.register_fake
def _(grad_y, grad_ldj, x, alpha, reverse, noise, noise_grad):
    gn = torch.empty_like(x, memory_format=torch.contiguous_format) if noise is not None and noise_grad else \
        x.new_empty((0,))
    return torch.empty_like(x, memory_format=torch.contiguous_format), gn


def _logit_setup(ctx, inputs, output):
    x, alpha, reverse, sldj, noise = inputs
    ctx.save_for_backward(x, noise)
    ctx.alpha, ctx.reverse, ctx.has_sldj = alpha, reverse, sldj is not None
    if not _requires_grad(x, noise):  # y depends on x and noise only
        ctx.mark_non_differentiable(output[0])


def _logit_backward(ctx, grad_y, grad_ldj):
    x, noise = ctx.saved_tensors
    noise_grad = noise is not None and ctx.needs_input_grad[4]
    gx, g_noise = logit_bwd(grad_y, grad_ldj, x, ctx.alpha, ctx.reverse, noise, noise_grad)
    return gx, None, None, grad_ldj if ctx.has_sldj else None, g_noise if noise_grad else None


logit_fwd.register_autograd(_logit_backward, setup_context=_logit_setup)


def logit_transform(x, alpha, reverse, sldj, noise):
    """Fused logit preprocessing (normalised signature of :func:`flowgmm_fast.ops.reference.logit_transform`);
    one launch per direction. float64 x runs the reference."""
    if x.dtype == torch.float64:
        return reference.logit_transform(x, alpha, reverse, sldj, noise)
    if sldj is not None and sldj.dtype == torch.float64:
        y, ldj = logit_fwd(x, alpha, reverse, None, noise)
        return y, sldj + ldj.double()
    return logit_fwd(x, alpha, reverse, sldj, noise)


# ---------------------------------------------------------------------------------------------------- GMM


@torch.library.custom_op(f"{_NS}::gmm_fwd", mutates_args=())
def gmm_fwd(z: Tensor, means: Tensor, log_std: Tensor, weight_logits: Optional[Tensor], labels: Optional[Tensor],
            label_weight: float) -> tuple[Tensor, Tensor]:
    """(nll (B,) fp32, logits (B, K) fp32) from one fused pass; see kernels/gmm.py."""
    return _gmm.gmm_forward(z, means, log_std, weight_logits, labels, label_weight)


@gmm_fwd.register_fake
def _(z, means, log_std, weight_logits, labels, label_weight):
    return _f32(z.shape[0], z), z.new_empty((z.shape[0], means.shape[0]), dtype=torch.float32)


@torch.library.custom_op(f"{_NS}::gmm_bwd", mutates_args=())
def gmm_bwd(grad_nll: Tensor, grad_logits: Optional[Tensor], z: Tensor, means: Tensor, log_std: Tensor,
            weight_logits: Optional[Tensor], labels: Optional[Tensor], label_weight: float, logits: Tensor,
            need_params: bool) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(grad_z like z, grad_means (K, D), grad_log_std, grad_weight_logits (K,)), parameter grads fp32; a parameter
    grad that is not computed (need_params False, or no weight_logits) is returned with shape (0,)."""
    gz, gm, gls, gwl = _gmm.gmm_backward(grad_nll, grad_logits, z, means, log_std, weight_logits, labels,
                                         label_weight, logits, need_params)
    return (gz, *(g if g is not None else z.new_empty((0,), dtype=torch.float32) for g in (gm, gls, gwl)))


@gmm_bwd.register_fake
def _(grad_nll, grad_logits, z, means, log_std, weight_logits, labels, label_weight, logits, need_params):
    def f32(shape):
        return z.new_empty(shape if need_params else (0,), dtype=torch.float32)

    gwl = f32(tuple(weight_logits.shape) if weight_logits is not None else (0,))
    return torch.empty_like(z, memory_format=torch.contiguous_format), f32(tuple(means.shape)), \
        f32(tuple(log_std.shape)), gwl


def _gmm_setup(ctx, inputs, output):
    z, means, log_std, weight_logits, labels, label_weight = inputs
    ctx.save_for_backward(z, means, log_std, weight_logits, labels, output[1])
    ctx.label_weight = label_weight
    ctx.set_materialize_grads(False)


def _gmm_backward(ctx, grad_nll, grad_logits):
    z, means, log_std, weight_logits, labels, logits = ctx.saved_tensors
    if grad_nll is None:
        grad_nll = torch.zeros(z.shape[0], dtype=torch.float32, device=z.device)
    need_params = any(ctx.needs_input_grad[1:4])
    gz, gm, gls, gwl = gmm_bwd(grad_nll, grad_logits, z, means, log_std, weight_logits, labels, ctx.label_weight,
                               logits, need_params)
    if not need_params:
        return gz, None, None, None, None, None
    gwl = gwl.to(weight_logits.dtype) if weight_logits is not None else None
    return gz, gm.to(means.dtype), gls.to(log_std.dtype), gwl, None, None


gmm_fwd.register_autograd(_gmm_backward, setup_context=_gmm_setup)


def _gmm_use_reference(z, means, *tensors) -> bool:
    """float64 inputs, or more components than the kernels hold in registers (K > MAX_COMPONENTS), run the
    reference: the kernels compute in fp32 and keep all K logits of a row block on chip."""
    too_many = means.shape[0] > _gmm.MAX_COMPONENTS
    return too_many or any(t is not None and t.dtype == torch.float64 for t in (z, means, *tensors))


def gmm_log_prob(z, means, log_std, weight_logits):
    """Class logits (B, K) fp32 (normalised signature of :func:`flowgmm_fast.ops.reference.gmm_log_prob`); one
    fused launch. float64 inputs and K > 128 components run the reference."""
    if _gmm_use_reference(z, means, log_std, weight_logits):
        return reference.gmm_log_prob(z, means, log_std, weight_logits)
    return gmm_fwd(z, means, log_std, weight_logits, None, 1.0)[1]


def gmm_nll(z, means, log_std, weight_logits, labels, label_weight, return_logits=False):
    """Per-sample NLL (B,) fp32, and the class logits (B, K) from the same pass when ``return_logits`` (normalised
    signature of :func:`flowgmm_fast.ops.reference.gmm_nll`). float64 inputs and K > 128 components run the reference."""
    if _gmm_use_reference(z, means, log_std, weight_logits):
        return reference.gmm_nll(z, means, log_std, weight_logits, labels, label_weight, return_logits)
    nll, logits = gmm_fwd(z, means, log_std, weight_logits, labels, float(label_weight))
    return (nll, logits) if return_logits else nll
