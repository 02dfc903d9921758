"""Smoke test of an installed flowgmm-fast wheel, run by .ci/package_test.sh in a fresh virtual environment from a
folder outside the repository (so only the wheel can provide flowgmm_fast): the import, the diagnostic command, the
wheel's metadata, one op per available backend against the reference, and one FlowGMM training step.

    python smoke_installed.py [--expect-native] [--pure]

--expect-native: the wheel carries the compiled extension (CPU kernels), so "native" must be available and "auto"
must pick it on the CPU without a warning. --pure: the pure-Python wheel (no extension, a torch range).
Not collected by pytest (no test_ prefix): it tests an installation, not the source tree.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import subprocess
import sys
import warnings
from pathlib import Path


def check(condition: bool, message: str) -> None:
    if not condition:
        raise SystemExit(f"smoke test FAILED: {message}")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--expect-native", action="store_true")
    parser.add_argument("--pure", action="store_true")
    args = parser.parse_args()

    import torch

    import flowgmm_fast as ff
    from flowgmm_fast import functional as F
    from flowgmm_fast.nn import GaussianMixture, RealNVPTabular

    location = Path(ff.__file__).resolve()
    check(Path(sys.prefix).resolve() in location.parents,
          f"flowgmm_fast was imported from {location}, not from this environment ({sys.prefix})")
    info = ff.build_info()
    check(info["source_checkout"] is None, f"flowgmm_fast runs from a source checkout: {info['source_checkout']}")
    check((location.parent / "py.typed").is_file(), "py.typed is missing from the installed package")
    print(f"flowgmm_fast {ff.__version__} from {location.parent}; torch {torch.__version__}")

    # metadata: the SPDX license, the torch requirement (pinned series for a binary wheel, a range for pure Python)
    meta = importlib.metadata.metadata("flowgmm-fast")
    check(meta.get("License-Expression") == "Apache-2.0", f"License-Expression is {meta.get('License-Expression')!r}")
    requires = importlib.metadata.requires("flowgmm-fast") or []
    torch_req = [r for r in requires if r.replace(" ", "").startswith("torch") and "extra" not in r]
    series = ".".join(torch.__version__.split(".")[:2])
    wanted = "torch>=2.6" if args.pure else f"torch=={series}.*"
    check([r.replace(" ", "") for r in torch_req] == [wanted], f"torch requirement {torch_req}, expected {wanted}")

    # the diagnostic command
    diag = subprocess.run([sys.executable, "-m", "flowgmm_fast"], capture_output=True, text=True, timeout=300)
    check(diag.returncode == 0, f"python -m flowgmm_fast failed:\n{diag.stdout}\n{diag.stderr}")
    check("backends" in diag.stdout and "installed package" in diag.stdout, f"unexpected report:\n{diag.stdout}")
    print(diag.stdout)

    backends = ff.available_backends()
    if args.expect_native:
        check("native" in backends, f"native backend unavailable: {ff.unavailable_reason('native')}")
        ext = info["extension"]
        check(ext is not None and not ext["debug"], f"extension build info: {ext}")
        check(Path(sys.prefix).resolve() in Path(ext["path"]).resolve().parents, f"_C loaded from {ext['path']}")
    if args.pure:
        check(info["extension"] is None and "native" not in backends, f"a pure wheel with an extension: {info}")

    # one op per available backend, on a device it runs on, against the reference
    g = torch.Generator().manual_seed(0)
    x, s, t = (torch.randn(3, 4, 4, 4, generator=g) for _ in range(3))
    mask = F.checkerboard(0)
    with ff.use_backend("torch"):
        y_ref, ldj_ref = F.affine_coupling(x, s, t, mask=mask)
    ran = []
    for name in backends:
        if name == "auto":
            continue
        devices = [d for d in ("cpu", "cuda") if ff._backend.device_supported(name, d)
                   and (d == "cpu" or torch.cuda.is_available())]
        for device in devices[:1]:
            with ff.use_backend(name):
                y, ldj = F.affine_coupling(x.to(device), s.to(device), t.to(device), mask=mask)
            torch.testing.assert_close(y.cpu(), y_ref, rtol=1e-4, atol=1e-4)
            torch.testing.assert_close(ldj.cpu(), ldj_ref, rtol=1e-4, atol=1e-4)
            ran.append(f"{name}/{device}")
    check("torch/cpu" in ran, f"ops ran on {ran}")
    print("affine_coupling matches the reference on:", ", ".join(ran))

    # one FlowGMM training step under "auto" (native on the CPU when present): no warning, finite loss, weights move
    torch.manual_seed(0)
    model = ff.FlowGMM(RealNVPTabular(6, 2, 16), GaussianMixture(3, 6))
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    x = torch.randn(16, 6)
    labels = torch.tensor([-1, 0, 1, 2] * 4)
    before = [p.detach().clone() for p in model.parameters()]
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        with ff.use_backend("auto"):
            loss = model(x, labels).nll.mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
    check(bool(torch.isfinite(loss)), f"training step loss {loss}")
    check(any(not torch.equal(b, p) for b, p in zip(before, model.parameters())), "the step changed no weight")
    print(f"one FlowGMM training step: loss {loss.item():.4f}")
    print("smoke test passed")


if __name__ == "__main__":
    main()
