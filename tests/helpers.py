"""Shared test helpers: skip marks, the devices present, per-dtype tolerances, the three-way comparison, autograd
leaves and cotangent gradients for the op suites, and loading an experiment script as a module.

Three-way comparison (flash-attention / Liger style) for low precision: a backend's output ``out`` is compared with
the float64 ground truth ``ref64`` and with PyTorch's own result in the same dtype ``same``:
    |out - ref64| <= 2 * |same - ref64| + atol
so kernels are held to the accuracy PyTorch itself reaches in that dtype, not to an arbitrary fixed tolerance.
"""

from __future__ import annotations

import importlib.util
import os
import sys

import pytest
import torch

import flowgmm_fast
from flowgmm_fast import _backend

requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
requires_native = pytest.mark.skipif(_backend.unavailable_reason("native") is not None,
                                     reason="flowgmm_fast._C not built")
requires_triton = pytest.mark.skipif(_backend.unavailable_reason("triton") is not None,
                                     reason="triton not importable")


def devices() -> list[str]:
    """The devices present ("cpu", plus "cuda" when there is one); the same test body runs on each."""
    return ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def backend_devices(backend: str) -> list[str]:
    """Devices on which ``backend`` runs here (triton on CPU only under TRITON_INTERPRET=1)."""
    if _backend.unavailable_reason(backend) is not None:
        return []
    return [d for d in devices() if _backend.device_supported(backend, d)]


def triton_interpreted() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


# absolute tolerance floor per dtype (added to the 2x PyTorch-error bound)
ATOL = {torch.float64: 1e-10, torch.float32: 1e-5, torch.bfloat16: 1e-2, torch.float16: 1e-3}


def assert_close_3way(out: torch.Tensor, same: torch.Tensor, ref64: torch.Tensor, dtype: torch.dtype,
                      name: str = "output", atol: float | None = None, rtol: float = 0.0) -> None:
    """Assert |out - ref64| <= 2 |same - ref64| + atol + rtol |ref64| elementwise (see module docstring)."""
    atol = ATOL[dtype] if atol is None else atol
    out64, same64, ref = out.detach().double().cpu(), same.detach().double().cpu(), ref64.detach().double().cpu()
    assert out64.shape == ref.shape, f"{name}: shape {tuple(out64.shape)} != reference {tuple(ref.shape)}"
    err = (out64 - ref).abs()
    bound = 2 * (same64 - ref).abs() + atol + rtol * ref.abs()
    bad = ~(err <= bound)
    if bad.any():
        i = int(bad.flatten().nonzero()[0])
        raise AssertionError(
            f"{name} ({dtype}): {int(bad.sum())}/{err.numel()} elements out of tolerance; first at flat index {i}: "
            f"got {out64.flatten()[i]:.6g}, reference {ref.flatten()[i]:.6g}, PyTorch {dtype} "
            f"{same64.flatten()[i]:.6g}, max err {err.max():.3g}")


def use(backend: str):
    """Context manager selecting ``backend`` (thin alias of flowgmm_fast.use_backend for readability in tests)."""
    return flowgmm_fast.use_backend(backend)


def grad_leaves(tensors, dtype=None) -> list:
    """Detached copies (optionally cast) that require grad when floating; None stays None."""
    return [None if t is None else t.detach().to(dtype or t.dtype).requires_grad_(t.is_floating_point())
            for t in tensors]


def cotangent_grads(outputs, cotangents, inputs, allow_unused: bool = False) -> list:
    """Gradients of sum(output * cotangent) (in float64) w.r.t. the inputs that require grad."""
    loss = sum((o.double() * c.double()).sum() for o, c in zip(outputs, cotangents))
    wanted = [t for t in inputs if t is not None and t.requires_grad]
    return list(torch.autograd.grad(loss, wanted, allow_unused=allow_unused))


ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def load_experiment(name: str):
    """experiments/<name>.py imported as a module (the scripts are not a package; experiments/ is on sys.path while it
    loads, as when the script runs, so it can import its siblings)."""
    folder = os.path.join(ROOT, "experiments")
    sys.path.insert(0, folder)
    try:
        spec = importlib.util.spec_from_file_location(name, os.path.join(folder, f"{name}.py"))
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    finally:
        sys.path.remove(folder)
    return module
