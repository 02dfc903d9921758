"""The backend switch: names, the context manager, the environment variable, "auto", and clear errors."""

import os
import subprocess
import sys

import pytest
import torch

import flowgmm_fast
from flowgmm_fast import _backend


def test_torch_and_auto_always_available():
    names = flowgmm_fast.available_backends()
    assert "torch" in names and "auto" in names
    assert set(names) <= set(_backend.BACKENDS)


def test_set_get_and_context_manager_restore():
    before = flowgmm_fast.get_backend()
    with flowgmm_fast.use_backend("torch"):
        assert flowgmm_fast.get_backend() == "torch"
        with flowgmm_fast.use_backend("auto"):
            assert flowgmm_fast.get_backend() == "auto"
        assert flowgmm_fast.get_backend() == "torch"
    assert flowgmm_fast.get_backend() == before
    with pytest.raises(RuntimeError):
        with flowgmm_fast.use_backend("torch"):
            raise RuntimeError("boom")
    assert flowgmm_fast.get_backend() == before


def test_unknown_backend_name_is_rejected():
    with pytest.raises(ValueError, match="backend must be one of"):
        flowgmm_fast.set_backend("cuda")


def test_missing_native_extension_names_the_rebuild_command(monkeypatch):
    monkeypatch.setitem(_backend._MODULES, "native", "flowgmm_fast._no_such_extension")
    monkeypatch.setattr(_backend, "_loaded", {k: v for k, v in _backend._loaded.items() if k != "native"})
    monkeypatch.setattr(_backend, "_load_errors", {})
    assert "native" not in flowgmm_fast.available_backends()
    with pytest.raises(flowgmm_fast.BackendUnavailableError, match="pip install --no-build-isolation -e ."):
        flowgmm_fast.set_backend("native")
    assert flowgmm_fast.get_backend() != "native"


def test_auto_resolves_to_an_available_backend_for_cpu():
    with flowgmm_fast.use_backend("auto"):
        name = _backend.resolve("affine_coupling", torch.device("cpu"))
    assert name in ("native", "torch")
    if _backend.unavailable_reason("native") is None:
        assert name == "native"  # the compiled CPU coupling beats eager PyTorch (benchmarks/results)
        with flowgmm_fast.use_backend("auto"):  # ... the squeeze only ties it: the measured table keeps it on torch
            assert _backend.resolve("squeeze2x2", torch.device("cpu")) == "torch"
            assert _backend.resolve("logit_transform", torch.device("cpu")) == "native"
    assert name != "triton"  # the interpreter is a test vehicle, never picked for speed


def test_triton_backend_refuses_cpu_tensors_without_the_interpreter(monkeypatch):
    if _backend.unavailable_reason("triton") is not None:
        pytest.skip("triton backend not importable")
    module = _backend._loaded["triton"]
    monkeypatch.setattr(module, "supports_device", lambda device_type: device_type == "cuda")
    with flowgmm_fast.use_backend("triton"):
        with pytest.raises(flowgmm_fast.BackendUnavailableError, match="TRITON_INTERPRET=1"):
            flowgmm_fast.functional.squeeze2x2(torch.randn(1, 1, 2, 2))


def test_set_auto_table_validates():
    with pytest.raises(ValueError, match="unknown op"):
        _backend.set_auto_table({"cuda": {"conv": "triton"}})
    with pytest.raises(ValueError, match="must be torch, triton or native"):
        _backend.set_auto_table({"cuda": {"gmm_nll": "cudnn"}})


def _run(code, **env):
    full_env = {**os.environ, **env}
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=full_env, timeout=120)


def test_environment_variable_sets_the_initial_backend():
    out = _run("import flowgmm_fast; print(flowgmm_fast.get_backend())", FLOWGMM_FAST_BACKEND="torch")
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "torch"
    bad = _run("import flowgmm_fast", FLOWGMM_FAST_BACKEND="fastest")
    assert bad.returncode != 0 and "FLOWGMM_FAST_BACKEND must be one of" in bad.stderr


def test_every_backend_module_exposes_every_op():
    for name in flowgmm_fast.available_backends():
        if name == "auto":
            continue
        module = _backend._load(name)
        for op in _backend.OPS:
            assert callable(getattr(module, op)), f"backend {name} lacks {op}"


def test_auto_on_cuda_picks_only_gpu_validated_backends(monkeypatch):
    # no GPU run has validated the fast kernels yet: "auto" on CUDA tensors runs the reference; a validated backend
    # (or an explicit per-op table entry) is picked when available. _resolve is called with the device type directly,
    # so this runs without a GPU; availability is faked.
    monkeypatch.setattr(_backend, "unavailable_reason", lambda name: None)
    monkeypatch.setattr(_backend, "device_supported", lambda name, device_type: True)
    monkeypatch.setattr(_backend, "_AUTO_TABLE", {"cpu": {"squeeze2x2": "torch"}})
    assert _backend.CUDA_VALIDATED == ()
    assert _backend._resolve("affine_coupling", "cuda", "auto") == "torch"
    assert _backend._resolve("affine_coupling", "cpu", "auto") == "native"
    monkeypatch.setattr(_backend, "CUDA_VALIDATED", ("native",))
    assert _backend._resolve("affine_coupling", "cuda", "auto") == "native"
    monkeypatch.setattr(_backend, "CUDA_VALIDATED", ("triton", "native"))
    assert _backend._resolve("gmm_nll", "cuda", "auto") == "triton"
    monkeypatch.setattr(_backend, "CUDA_VALIDATED", ())
    _backend.set_auto_table({"cuda": {"gmm_nll": "triton"}})  # the user's explicit opt-in
    assert _backend._resolve("gmm_nll", "cuda", "auto") == "triton"
    assert _backend._resolve("logit_transform", "cuda", "auto") == "torch"
