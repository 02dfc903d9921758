"""The "native" backend: the compiled extension ``flowgmm_fast._C`` (C++ CPU loops and CUDA kernels, ``csrc/``) behind
the normalised signatures of :mod:`flowgmm_fast.ops.reference`.

Ops (``torch.ops.flowgmm_native``, schemas in ``csrc/ops.cpp``, named like the triton backend's):
    coupling_fwd / coupling_bwd   fused affine coupling: tanh-scale, mask (none / dense / checkerboard from indices),
                                  exp, per-sample log-det into sldj; backward gives x, s, t, scale (per-channel
                                  reduction) and sldj gradients in one pass, recomputed from the inputs
    squeeze2x2                    2x2 squeeze / unsqueeze, both channel orders (its own backward, reverse flipped)
    logit_fwd / logit_bwd         fused dequantise + logit + log-det (backward: dL/dx and, when asked, dL/dnoise)
    gmm_fwd / gmm_bwd             GMM log-densities, log pi, logsumexp over K, label gather -> (nll (B,), logits (B, K));
                                  backward from the inputs and the saved (B, K) logits
The C++ side registers the CPU and CUDA kernels (``csrc/ops.cpp``) and the autograd of the forward ops
(``csrc/autograd.cpp``: C++ ``torch::autograd::Function``s under the Autograd key, far cheaper per call than Python's
``register_autograd``); this module adds ``register_fake`` (shapes for torch.compile and opcheck). Compute dtype:
float32 for float32/bfloat16/float16 inputs, float64 for float64; log-dets and GMM outputs are float32 (float64 when
an input is float64). No gradient flows to ``mask``.

The extension records the torch and CUDA versions it was built against (``_C.build_info()``); another torch series
(major.minor: the C++ ABI is not stable across them) or CUDA major version makes the backend unavailable with a message
naming the fix. ``EXTENSION_BUILT`` is False when there is no ``_C`` at all (a pure-Python install, by choice), True
when there is one, even if it failed to load.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import re

import torch
from torch import Tensor

from flowgmm_fast._info import rebuild_hint, source_checkout

__all__ = ["affine_coupling", "squeeze2x2", "logit_transform", "gmm_log_prob", "gmm_nll", "unavailable_reason",
           "supports_device", "build_info"]


def _wheel_torch_requirement() -> str | None:
    """The ``torch==X.Y.*`` an installed binary wheel requires (None in a source checkout, or without such a pin)."""
    if source_checkout() is not None:  # the metadata found may be another copy's; the fix there is a rebuild anyway
        return None
    try:
        requirements = importlib.metadata.requires("flowgmm-fast") or []
    except importlib.metadata.PackageNotFoundError:
        return None
    pins = [r.replace(" ", "") for r in requirements if re.fullmatch(r"torch\s*==\s*[\d.]+\*?", r)]
    return pins[0] if pins else None


def _load_failure(exc: ImportError) -> str:
    pin = _wheel_torch_requirement()
    torch_hint = (f"this flowgmm-fast was built for {pin} and torch {torch.__version__} is running; fix: "
                  f"`pip install \"{pin}\"`, or {rebuild_hint()}") if pin else f"fix: {rebuild_hint()}"
    return f"flowgmm_fast._C could not be imported ({type(exc).__name__}: {exc}); {torch_hint}"


try:
    _C = importlib.import_module("flowgmm_fast._C")  # a missing module raises ModuleNotFoundError naming it

    _BUILD: dict = _C.build_info()
    _IMPORT_ERROR: str | None = None
    EXTENSION_BUILT = True
except ImportError as exc:  # reported through unavailable_reason()
    _BUILD = {}
    EXTENSION_BUILT = not (isinstance(exc, ModuleNotFoundError) and exc.name == "flowgmm_fast._C")
    _IMPORT_ERROR = (_load_failure(exc) if EXTENSION_BUILT else "flowgmm_fast._C was not built (an install without "
                     f"the compiled extension); to build it, {rebuild_hint()}")


def build_info() -> dict:
    """How ``flowgmm_fast._C`` was built (``{}`` if it is not loaded): ``torch`` and ``cuda`` (versions it was built
    against), ``with_cuda``, ``cuda_archs``, ``cuda_skipped`` (why a build fell back to the CPU kernels), ``debug``."""
    return dict(_BUILD)


def _series(version: str | None, parts: int) -> tuple[str, ...] | None:
    match = re.match(r"(\d+)\.(\d+)", version or "")
    return match.groups()[:parts] if match else None


def _version_mismatch() -> str | None:
    built = _BUILD.get("torch")
    if _series(built, 2) is None or _series(built, 2) != _series(torch.__version__, 2):
        wanted = ".".join(_series(built, 2) or ("?", "?"))
        return (f"flowgmm_fast._C was built against torch {built} but torch {torch.__version__} is running; fix: "
                f"install torch=={wanted}.* (`pip install \"torch=={wanted}.*\"`), or {rebuild_hint()}")
    if _BUILD.get("with_cuda") and _series(_BUILD.get("cuda"), 1) != _series(torch.version.cuda, 1):
        return (f"flowgmm_fast._C was built with CUDA {_BUILD.get('cuda')} kernels but torch uses CUDA "
                f"{torch.version.cuda or 'none (a CPU-only build)'}; fix: install a torch built with CUDA "
                f"{_BUILD.get('cuda')}, or {rebuild_hint()}")
    return None


def unavailable_reason() -> str | None:
    """Why the native backend cannot run in this process (None when it can)."""
    return _IMPORT_ERROR or _version_mismatch()


def supports_device(device_type: str) -> bool:
    """CPU always; CUDA when the extension was built with its CUDA kernels."""
    return device_type == "cpu" or (device_type == "cuda" and bool(_BUILD.get("with_cuda")))


def _check_device(t: Tensor) -> None:
    if not supports_device(t.device.type):
        hint = (f" (flowgmm_fast._C was built without CUDA kernels; to rebuild it, {rebuild_hint()})"
                if t.device.type == "cuda" else "")
        raise RuntimeError(f"the native backend runs on cpu{' and cuda' if _BUILD.get('with_cuda') else ''} tensors, "
                           f"got a tensor on {t.device}{hint}")


def _ldj_dtype(*dtypes: torch.dtype) -> torch.dtype:
    return torch.float64 if torch.float64 in dtypes else torch.float32


def _empty(shape, like: Tensor, dtype: torch.dtype | None = None) -> Tensor:
    return torch.empty(shape, dtype=like.dtype if dtype is None else dtype, device=like.device)


if _IMPORT_ERROR is None:
    _ops = torch.ops.flowgmm_native

    # ------------------------------------------------------------------------------------------------ coupling
    @torch.library.register_fake("flowgmm_native::coupling_fwd")
    def _(x, s, t, scale, mask, checker_parity, reverse, sldj):
        out_dt = _ldj_dtype(x.dtype, sldj.dtype if sldj is not None else torch.float32)
        return _empty(x.shape, x), _empty((x.shape[0],), x, out_dt)

    @torch.library.register_fake("flowgmm_native::coupling_bwd")
    def _(grad_y, grad_sldj, x, s, t, scale, mask, checker_parity, reverse):
        # without t, s is the joint (B, 2C, *S) s/t tensor: its gradient is one tensor of its shape, t's is (0,)
        gscale = _empty((x.shape[1],), x, scale.dtype) if scale is not None else _empty((0,), x)
        return _empty(x.shape, x), _empty(s.shape, x), _empty(x.shape if t is not None else (0,), x), gscale

    # ------------------------------------------------------------------------------------------------- squeeze
    @torch.library.register_fake("flowgmm_native::squeeze2x2")
    def _(x, reverse, alt_order):
        b, c, h, w = x.shape
        return _empty((b, c // 4, 2 * h, 2 * w) if reverse else (b, 4 * c, h // 2, w // 2), x)

    # --------------------------------------------------------------------------------------------------- logit
    @torch.library.register_fake("flowgmm_native::logit_fwd")
    def _(x, alpha, reverse, sldj, noise):
        out_dt = _ldj_dtype(x.dtype, sldj.dtype if sldj is not None else torch.float32)
        return _empty(x.shape, x), _empty((x.shape[0],), x, out_dt)

    @torch.library.register_fake("flowgmm_native::logit_bwd")
    def _(grad_y, grad_sldj, x, alpha, reverse, noise, noise_grad):
        return _empty(x.shape, x), _empty(x.shape if noise is not None and noise_grad else (0,), x)

    # ----------------------------------------------------------------------------------------------------- gmm
    @torch.library.register_fake("flowgmm_native::gmm_fwd")
    def _(z, means, log_std, weight_logits, labels, label_weight):
        cdt = _ldj_dtype(z.dtype, means.dtype, log_std.dtype)
        return _empty((z.shape[0],), z, cdt), _empty((z.shape[0], means.shape[0]), z, cdt)

    @torch.library.register_fake("flowgmm_native::gmm_bwd")
    def _(grad_nll, grad_logits, z, means, log_std, weight_logits, labels, label_weight, logits):
        cdt = _ldj_dtype(z.dtype, means.dtype, log_std.dtype)
        gw = (_empty((means.shape[0],), z, weight_logits.dtype) if weight_logits is not None
              else _empty((0,), z, cdt))
        return _empty(z.shape, z), _empty(means.shape, means), _empty(log_std.shape, log_std), gw


# ------------------------------------------------------------------------------------- normalised signatures


def affine_coupling(x, s, t, scale, mask, checker_parity, reverse, sldj):
    """(y (B, C, *S) like x, sldj_out (B,)): one fused pass; see reference.affine_coupling for the semantics.
    s, t and x are read in place when each sample's (C, *S) plane is dense (e.g. ``.chunk(2, 1)`` views); t=None: s
    is the joint (B, 2C, *S) s/t tensor, whose gradient then comes back as one tensor (no concatenation)."""
    _check_device(x)
    return _ops.coupling_fwd(x, s, t, scale, mask, checker_parity, reverse, sldj)


def squeeze2x2(x, reverse, alt_order):
    """(B, C, H, W) -> (B, 4C, H/2, W/2) (reverse: the inverse); see reference.squeeze2x2."""
    _check_device(x)
    return _ops.squeeze2x2(x, reverse, alt_order)


def logit_transform(x, alpha, reverse, sldj, noise):
    """(y like x, sldj_out (B,)): dequantise + logit + log-det in one pass; see reference.logit_transform."""
    _check_device(x)
    return _ops.logit_fwd(x, alpha, reverse, sldj, noise)


def gmm_log_prob(z, means, log_std, weight_logits):
    """Class logits (B, K) = log N(z; mu_k, Sigma_k) + log pi_k; see reference.gmm_log_prob."""
    _check_device(z)
    return _ops.gmm_fwd(z, means, log_std, weight_logits, None, 1.0)[1]


def gmm_nll(z, means, log_std, weight_logits, labels, label_weight, return_logits=False):
    """Per-sample nll (B,) (and the (B, K) logits of the same pass); see reference.gmm_nll."""
    _check_device(z)
    nll, logits = _ops.gmm_fwd(z, means, log_std, weight_logits, labels, label_weight)
    return (nll, logits) if return_logits else nll
