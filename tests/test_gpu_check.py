"""benchmarks/gpu_check.sh --cpu-dry-run: the one-shot GPU check's own logic (benchmarks/gpu_check.py) on the CPU at
tiny shapes, Triton under its interpreter -- every check present in the results file and passed or skipped with a
reason -- and a wrong "kernel" (the hidden --inject-fault option scales the fast backends' outputs) is caught, so the
parity checks cannot pass vacuously. About a minute and a half on 2 cores in all."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from benchmarks import gpu_check
from flowgmm_fast import _backend

ROOT = Path(__file__).resolve().parent.parent


def _env(out: Path) -> dict:
    path = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p)
    return dict(os.environ, PYTHON=sys.executable, PYTHONPATH=path, OUT=str(out), TRITON_INTERPRET="1")


def _results(out: Path) -> dict:
    files = sorted(out.glob("gpu_check_*.json"))
    assert len(files) == 1, files
    return json.loads(files[0].read_text())


def _expected_names() -> set[str]:
    names = set()
    for case in gpu_check.parity_cases(dry=True):
        names |= {f"parity/{case.name}/{b}/{d}" for b in gpu_check.FAST for d in gpu_check.DTYPES}
        names |= {f"repeat/{case.name}/{b}" for b in gpu_check.FAST}
    names |= {f"edge/gmm-all-inf-row/{b}" for b in gpu_check.FAST}
    names |= {f"edge/labels-out-of-range/{b}" for b in ("torch",) + gpu_check.FAST}
    names |= {f"train/{m}/{b}/{v}" for m in ("realnvp", "tabular") for b in ("torch",) + gpu_check.FAST
              for v in ("compile", "cudagraph", "repeat")}
    return names | {"edge/native-odd-shapes", "edge/compute-sanitizer"}


def test_cpu_dry_run_runs_every_check(tmp_path):
    proc = subprocess.run(["bash", "benchmarks/gpu_check.sh", "--cpu-dry-run"], cwd=ROOT, env=_env(tmp_path),
                          capture_output=True, text=True, timeout=400, check=False)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    data = _results(tmp_path)
    assert data["kind"] == "gpu_check" and data["meta"]["mode"] == "cpu-dry-run"
    assert (tmp_path / "tests.log").read_text().count("[pass]") == data["summary"]["pass"]
    records = {r["name"]: r for r in data["records"]}
    assert set(records) == _expected_names()
    for name, rec in records.items():
        assert rec["status"] in ("pass", "skip"), (name, rec)
        if rec["status"] == "skip":
            assert rec["reason"], name
            # on the CPU only what needs CUDA, and backends that cannot run here, may be skipped
            unavailable = [b for b in gpu_check.FAST if f"/{b}/" in name + "/" and
                           (_backend.unavailable_reason(b) is not None or not _backend.device_supported(b, "cpu"))]
            assert name.endswith(("/cudagraph", "compute-sanitizer")) or unavailable, (name, rec["reason"])
    ran = [r for r in data["records"] if r["name"].startswith("parity/") and r["status"] == "pass"]
    assert ran, "no parity check ran"
    for rec in ran:  # every output and gradient compared, each with its ratio to PyTorch's own error
        quantities = rec["details"]["quantities"]
        assert "out0" in quantities and any(q.startswith("grad ") for q in quantities)
        assert all(q["ok"] and q["ratio"] <= gpu_check.RATIO_BOUND for q in quantities.values())


def test_a_wrong_kernel_fails_the_check(tmp_path):
    cmd = [sys.executable, "-m", "benchmarks.gpu_check", "--cpu-dry-run", "--out", str(tmp_path),
           "--only", "parity/coupling-vec/,repeat/coupling-vec/", "--inject-fault", "0.1"]
    proc = subprocess.run(cmd, cwd=ROOT, env=_env(tmp_path), capture_output=True, text=True, timeout=200, check=False)
    assert proc.returncode == 1, proc.stdout[-3000:] + proc.stderr[-2000:]
    records = {r["name"]: r for r in _results(tmp_path)["records"]}
    ran = [b for b in gpu_check.FAST if records[f"parity/coupling-vec/{b}/fp32"]["status"] != "skip"]
    assert ran, records
    for b in ran:
        for d in gpu_check.DTYPES:
            rec = records[f"parity/coupling-vec/{b}/{d}"]
            assert rec["status"] == "fail" and rec["details"]["quantities"]["out0"]["ratio"] > gpu_check.RATIO_BOUND
        assert records[f"repeat/coupling-vec/{b}"]["status"] == "pass"  # a wrong kernel can still be repeatable
    assert "FAILED parity/coupling-vec/" in proc.stdout
