"""What this installation of flowgmm_fast is: where it lives, how its compiled extension was built, how to rebuild
it, and (``python -m flowgmm_fast``) the versions, CUDA devices and each backend's status in one report.

Importing this module is cheap (``import flowgmm_fast`` imports it); the extension and the backends are loaded only
when :func:`build_info` or :func:`report` asks for them.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import sys
import warnings
from pathlib import Path

from ._version import __version__

PACKAGE_DIR = Path(__file__).resolve().parent


def source_checkout() -> Path | None:
    """The repository root when flowgmm_fast runs from a source checkout (editable install, PYTHONPATH), else None."""
    root = PACKAGE_DIR.parent
    return root if (root / "setup.py").is_file() and (root / "csrc").is_dir() else None


def rebuild_hint() -> str:
    """How to rebuild flowgmm_fast._C against the running torch, worded for this installation: a source checkout
    rebuilds in place; an installed wheel is replaced by one built from the sdist or a checkout."""
    root = source_checkout()
    if root is not None:
        return f"run `pip install --no-build-isolation -e .` in {root} (CUDA_HOME set for the CUDA kernels)"
    return ("reinstall from the sdist or a source checkout, against the running torch: `pip install "
            "--no-build-isolation --no-deps --force-reinstall <sdist or checkout>` (CUDA_HOME set for the CUDA "
            "kernels)")


def build_info() -> dict:
    """How this flowgmm_fast was built.

    ``{"version", "location", "source_checkout", "extension", "extension_error"}``: ``extension`` is what
    ``flowgmm_fast._C`` records about its build (``torch``, ``cuda``, ``with_cuda``, ``cuda_archs``,
    ``cuda_skipped``: why a build fell back to the CPU kernels, ``debug``) plus its ``path``, or None when it is not
    loaded; ``extension_error`` says why the native backend cannot run here (None when it can).
    """
    from . import _backend

    error = _backend.unavailable_reason("native")
    extension = None
    native = sys.modules.get(_backend._MODULES["native"])  # imported by unavailable_reason, if importable at all
    if native is not None and native.build_info():
        extension = {**native.build_info(), "path": native._C.__file__}
    checkout = source_checkout()
    return {"version": __version__, "location": str(PACKAGE_DIR),
            "source_checkout": str(checkout) if checkout else None, "extension": extension, "extension_error": error}


def _version_of(module_name: str) -> str | None:
    try:
        module = __import__(module_name)
    except Exception:  # not installed, or broken: the report says "not importable"
        return None
    return getattr(module, "__version__", "unknown")


def _arch_runs_on(archs: str, capability: tuple[int, int]) -> bool:
    """Whether code built for TORCH_CUDA_ARCH_LIST ``archs`` runs on a GPU of ``capability``: a cubin for X.Y runs on
    X.Z with Z >= Y; PTX for X.Y is compiled by the driver for any GPU >= X.Y."""
    for entry in re.split(r"[;\s]+", archs.strip()):
        match = re.match(r"(\d+)\.(\d+)(\+PTX)?$", entry)
        if match is None:
            continue
        major, minor = int(match.group(1)), int(match.group(2))
        if (capability[0] == major and capability[1] >= minor) or (match.group(3) and capability >= (major, minor)):
            return True
    return False


def collect() -> dict:
    """Everything :func:`report` prints, as plain data (``python -m flowgmm_fast --json``)."""
    import torch

    from . import _backend

    info = build_info()
    info["python"] = f"{platform.python_version()} ({platform.system()} {platform.machine()})"
    info["torch"] = {"version": torch.__version__, "cuda": torch.version.cuda,
                     "location": str(Path(torch.__file__).parent)}
    info["triton"] = _version_of("triton")
    info["numpy"] = _version_of("numpy")
    devices = []
    cuda_ok = torch.cuda.is_available()
    archs = (info["extension"] or {}).get("cuda_archs", "")
    for i in range(torch.cuda.device_count() if cuda_ok else 0):
        props = torch.cuda.get_device_properties(i)
        cap = (props.major, props.minor)
        devices.append({"index": i, "name": props.name, "capability": f"{cap[0]}.{cap[1]}",
                        "memory_gib": round(props.total_memory / 2**30, 1),
                        "native_kernels_run": bool(archs) and _arch_runs_on(archs, cap)})
    info["cuda_available"] = cuda_ok
    info["cuda_devices"] = devices
    device_types = ["cpu"] + (["cuda"] if cuda_ok else [])
    backends = {}
    with warnings.catch_warnings():  # the report states the reasons itself
        warnings.simplefilter("ignore")
        for name in _backend.BACKENDS:
            if name == "auto":
                backends[name] = {"available": True, "cuda_validated": list(_backend.CUDA_VALIDATED), "per_op": {
                    d: {op: _backend._resolve(op, d, "auto") for op in _backend.OPS} for d in device_types}}
                continue
            reason = _backend.unavailable_reason(name)
            backends[name] = {"available": reason is None, "reason": reason, "devices": [
                d for d in ("cpu", "cuda") if reason is None and _backend.device_supported(name, d)]}
    info["backends"] = backends
    info["selected_backend"] = _backend.get_backend()
    info["environment"] = {k: os.environ.get(k) for k in ("FLOWGMM_FAST_BACKEND", "TRITON_INTERPRET", "CUDA_HOME",
                                                          "CUDA_VISIBLE_DEVICES") if os.environ.get(k) is not None}
    return info


def _size(path: str) -> str:
    try:
        return f"{os.path.getsize(path) / 2**20:.1f} MiB"
    except OSError:
        return "size unknown"


def report(info: dict | None = None) -> str:
    """The human-readable report of :func:`collect`."""
    info = collect() if info is None else info
    t = info["torch"]
    where = f"source checkout {info['source_checkout']}" if info["source_checkout"] else "installed package"
    lines = [f"flowgmm-fast {info['version']}",
             f"  package     {info['location']} ({where})",
             f"  python      {info['python']}",
             f"  torch       {t['version']} (CUDA {t['cuda'] or 'none: CPU-only build'}) at {t['location']}",
             f"  triton      {info['triton'] or 'not importable'}",
             f"  numpy       {info['numpy'] or 'not importable'}",
             "", "compiled extension flowgmm_fast._C"]
    ext = info["extension"]
    if ext is not None:
        cuda = (f"yes (CUDA {ext['cuda']}, architectures {ext.get('cuda_archs') or 'unknown'})" if ext["with_cuda"]
                else "no (" + (ext.get("cuda_skipped") or "turned off: FLOWGMM_FAST_BUILD_CUDA=0") + ")")
        lines += [f"  file        {ext['path']} ({_size(ext['path'])})",
                  f"  built for   torch {ext['torch']}",
                  f"  CUDA        {cuda}",
                  f"  debug info  {'yes' if ext.get('debug') else 'no'}"]
    if info["extension_error"]:
        lines.append(f"  unavailable: {info['extension_error']}")
    lines += ["", "CUDA devices"]
    if not info["cuda_available"]:
        lines.append("  none (torch.cuda.is_available() is False" + (
            ": torch is a CPU-only build)" if not t["cuda"] else ": no driver or no visible GPU)"))
    for d in info["cuda_devices"]:
        runs = "" if ext is None or not ext["with_cuda"] else (
            "; native CUDA kernels run on it" if d["native_kernels_run"]
            else "; the native CUDA kernels were not built for it (set TORCH_CUDA_ARCH_LIST and rebuild)")
        lines.append(f"  cuda:{d['index']}  {d['name']}, compute capability {d['capability']}, "
                     f"{d['memory_gib']} GiB{runs}")
    env = ", ".join(f"{k}={v}" for k, v in info["environment"].items()) or "no FLOWGMM_FAST_BACKEND set"
    lines += ["", f"backends (selected: {info['selected_backend']}; {env})"]
    for name, b in info["backends"].items():
        if name == "auto":
            for device, ops in b["per_op"].items():
                picks = ", ".join(f"{op}={backend}" for op, backend in ops.items())
                lines.append(f"  {'auto' if device == 'cpu' else '':<8} {device}: {picks}")
            lines.append(f"  {'':<8} on CUDA, auto picks only GPU-validated fast backends: "
                         f"{', '.join(b['cuda_validated']) or 'none yet (opt in with set_backend)'}")
        elif b["available"]:
            lines.append(f"  {name:<8} available on {', '.join(b['devices']) or 'no device here'}")
        else:
            lines.append(f"  {name:<8} unavailable: {b['reason']}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m flowgmm_fast",
                                     description="Report versions, build information, CUDA devices and backends.")
    parser.add_argument("--json", action="store_true", help="print the report as JSON")
    args = parser.parse_args(argv)
    info = collect()
    print(json.dumps(info, indent=1) if args.json else report(info))
    return 0
