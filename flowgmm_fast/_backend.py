"""Backend switch: which implementation runs each op of :mod:`flowgmm_fast.functional`.

Backends
--------
``"torch"``   the pure-PyTorch reference (:mod:`flowgmm_fast.ops.reference`); always available; the ground truth.
``"triton"``  fused Triton kernels (:mod:`flowgmm_fast.ops.triton_ops`); CUDA tensors, or CPU tensors under the
              Triton interpreter (``TRITON_INTERPRET=1`` set before triton is imported; slow, for testing).
``"native"``  the compiled C++/CUDA extension ``flowgmm_fast._C`` (:mod:`flowgmm_fast.ops.native_ops`); CPU tensors,
              and CUDA tensors when the extension was built with CUDA.
``"auto"``    (default) per op and device, the fastest backend that is available (see :data:`AUTO_PREFERENCE`);
              on CUDA only among the backends a GPU run has validated (:data:`CUDA_VALIDATED`), else the reference.

The choice is process-global and read once per op call; :func:`use_backend` changes it for a ``with`` block. The
environment variable ``FLOWGMM_FAST_BACKEND`` sets the initial value (read once, at import).

Every backend module exposes the same normalised op signatures (documented in :mod:`flowgmm_fast.ops.reference`);
:mod:`flowgmm_fast.functional` validates and normalises the user's arguments once and then calls the chosen
backend's op, so switching the backend switches every layer and model built on the functional API.
"""

from __future__ import annotations

import contextlib
import importlib
import os
import sys
import warnings
from collections.abc import Iterator
from types import ModuleType

import torch

from ._info import rebuild_hint

BACKENDS = ("torch", "triton", "native", "auto")

# The ops every backend implements (names of functions in each backend module).
OPS = ("affine_coupling", "squeeze2x2", "logit_transform", "gmm_log_prob", "gmm_nll")

# "auto": the order in which backends are tried, per device type, unless _AUTO_TABLE names a backend for the op.
# The Triton interpreter is a test vehicle, never picked automatically on the CPU.
AUTO_PREFERENCE: dict[str, tuple[str, ...]] = {
    "cuda": ("triton", "native", "torch"),
    "cpu": ("native", "torch"),
}

# The fast backends that benchmarks/gpu_check.sh has run and passed on a GPU, with its results file committed in
# benchmarks/results/ as the evidence. "auto" on CUDA picks only among these (then the reference): the Triton and
# CUDA kernels are compiled and tested on the CPU (the interpreter, the CPU kernels) but have not yet run on a GPU.
# Users opt in explicitly: set_backend("triton"), FLOWGMM_FAST_BACKEND=native, or set_auto_table({"cuda": {...}}).
CUDA_VALIDATED: tuple[str, ...] = ()

# Optional per-op override of AUTO_PREFERENCE, per device type, filled from a measured benchmark table
# (op name -> backend name). Set through :func:`set_auto_table`.
# Measured (benchmarks/results/ops_cpu-2t_20261124T095535Z_912a65ec.json, 2-core CPU): native coupling, logit and GMM
# are 3.1-7.3x faster than eager PyTorch; the native squeeze (a copy, at the machine's copy bandwidth either way) ties
# eager (0.99-1.03x), so the squeeze stays a plain PyTorch view + copy that Inductor can fuse.
_AUTO_TABLE: dict[str, dict[str, str]] = {"cpu": {"squeeze2x2": "torch"}}

_MODULES = {
    "torch": "flowgmm_fast.ops.reference",
    "triton": "flowgmm_fast.ops.triton_ops",
    "native": "flowgmm_fast.ops.native_ops",
}


class BackendUnavailableError(RuntimeError):
    """Raised when a backend is asked for but cannot run here; the message says why and how to fix it."""


def _validate_name(name: str) -> str:
    if not isinstance(name, str) or name not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {name!r}")
    return name


def _initial_backend() -> str:
    env = os.environ.get("FLOWGMM_FAST_BACKEND", "auto").strip().lower() or "auto"
    if env not in BACKENDS:
        raise ValueError(f"environment variable FLOWGMM_FAST_BACKEND must be one of {BACKENDS}, got {env!r}")
    return env


_current: str = _initial_backend()
_loaded: dict[str, ModuleType] = {"torch": importlib.import_module(_MODULES["torch"])}
_load_errors: dict[str, str] = {}


def _triton_interpreted() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def _load(name: str) -> ModuleType | None:
    """Import a backend module once; remember why it failed if it did."""
    if name in _loaded:
        return _loaded[name]
    if name in _load_errors:
        return None
    try:
        module = importlib.import_module(_MODULES[name])
        reason = module.unavailable_reason() if hasattr(module, "unavailable_reason") else None
    except Exception as exc:  # an import failure is a reason, reported when the backend is asked for
        reason = f"{type(exc).__name__}: {exc}"
        module = None
    if reason is not None:
        _load_errors[name] = reason
        return None
    _loaded[name] = module
    return module


def unavailable_reason(name: str) -> str | None:
    """Why backend ``name`` cannot be used in this process (None when it can)."""
    _validate_name(name)
    if name in ("torch", "auto"):
        return None
    if _load(name) is not None:
        return None
    reason = _load_errors[name]
    if name == "native":
        return reason if reason.startswith("flowgmm_fast._C") else (
            f"the native backend needs the compiled extension flowgmm_fast._C ({reason}); fix: {rebuild_hint()}")
    if name == "triton":
        return f"the triton backend cannot be used ({reason}); install triton (it ships with CUDA builds of torch)"
    return reason


def available_backends() -> list[str]:
    """Names of the backends usable in this process (always includes "torch" and "auto")."""
    return [n for n in BACKENDS if unavailable_reason(n) is None]


def device_supported(name: str, device_type: str) -> bool:
    """Whether (available) backend ``name`` runs ops on tensors of ``device_type``."""
    if name == "torch":
        return True
    module = _load(name)
    if module is None:
        return False
    return bool(module.supports_device(device_type))


def set_backend(name: str) -> None:
    """Select the backend for all subsequent op calls ("torch", "triton", "native" or "auto")."""
    global _current
    _validate_name(name)
    reason = unavailable_reason(name)
    if reason is not None:
        raise BackendUnavailableError(reason)
    _current = name


def get_backend() -> str:
    """The selected backend name (possibly "auto")."""
    return _current


@contextlib.contextmanager
def use_backend(name: str) -> Iterator[None]:
    """Context manager: run the enclosed code with backend ``name``, then restore the previous choice."""
    previous = _current
    set_backend(name)
    try:
        yield
    finally:
        globals()["_current"] = previous


def set_auto_table(table: dict[str, dict[str, str]]) -> None:
    """Override "auto" per device type and op, e.g. ``{"cuda": {"gmm_nll": "native"}}`` (from a benchmark table)."""
    for device_type, ops in table.items():
        for op, backend in ops.items():
            if op not in OPS:
                raise ValueError(f"set_auto_table: unknown op {op!r}; expected one of {OPS}")
            if backend not in ("torch", "triton", "native"):
                raise ValueError(f"set_auto_table: backend for {op!r} must be torch, triton or native, got {backend!r}")
        _AUTO_TABLE.setdefault(device_type, {}).update(ops)


def resolve(op: str, device: torch.device) -> str:
    """The concrete backend name that runs ``op`` for tensors on ``device`` under the current selection."""
    return _resolve(op, device.type, _current)


def _assume_constant_result(fn):
    """What ``torch.compiler.assume_constant_result`` does -- mark ``fn`` so dynamo calls it at trace time and bakes
    the result into the graph -- without importing torch._dynamo (1.5 s, as long as the rest of ``import torch``) when
    flowgmm_fast is imported. tests/test_compile.py checks that the public decorator still sets this attribute and that
    the dispatch compiles with fullgraph=True."""
    fn._dynamo_marked_constant = True
    return fn


_warned_native_fallback = False


def _warn_native_fallback() -> None:
    """Once per process: "auto" passes over the native backend because flowgmm_fast._C exists but cannot be used
    (failed to load, or built for another torch). A pure-Python install (no _C at all) is a choice, not warned about."""
    global _warned_native_fallback
    if _warned_native_fallback:
        return
    _warned_native_fallback = True
    module = sys.modules.get(_MODULES["native"])
    if module is not None and not getattr(module, "EXTENSION_BUILT", True):
        return
    warnings.warn(f"flowgmm_fast: backend \"auto\" cannot use the native backend and runs the slower PyTorch "
                  f"reference instead: {unavailable_reason('native')}. (FLOWGMM_FAST_BACKEND=torch picks the "
                  "reference explicitly and silences this warning; `python -m flowgmm_fast` shows the build.)",
                  RuntimeWarning, stacklevel=5)


@_assume_constant_result
def _resolve(op: str, device_type: str, current: str) -> str:
    # Under torch.compile this runs for real at trace time (backend modules are imported lazily, which dynamo cannot
    # trace) and its result is baked into the graph; dynamo guards on ``_current`` read by the caller, so switching
    # the backend recompiles.
    if current != "auto":
        if unavailable_reason(current) is not None:
            raise BackendUnavailableError(unavailable_reason(current))
        if not device_supported(current, device_type):
            hint = ""
            if current == "triton" and device_type == "cpu":
                hint = " (set TRITON_INTERPRET=1 before importing triton to run the kernels on the CPU interpreter)"
            elif current == "native" and device_type == "cuda":
                hint = f" (the extension was built without CUDA kernels; to rebuild it, {rebuild_hint()})"
            raise BackendUnavailableError(f"backend {current!r} does not support {device_type} tensors{hint}")
        return current
    preferred = _AUTO_TABLE.get(device_type, {}).get(op)
    order = AUTO_PREFERENCE.get(device_type, ("torch",))
    if device_type == "cuda":
        order = tuple(b for b in order if b == "torch" or b in CUDA_VALIDATED)
    order = ((preferred,) if preferred else ()) + order
    for candidate in order:
        if unavailable_reason(candidate) is None:
            if device_supported(candidate, device_type):
                return candidate
        elif candidate == "native":
            _warn_native_fallback()
    return "torch"


def get_op(op: str, device: torch.device):
    """The implementation of ``op`` that runs for tensors on ``device`` (used by :mod:`flowgmm_fast.functional`)."""
    return getattr(_loaded[resolve(op, device)], op)
