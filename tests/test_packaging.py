"""Packaging and installation: the sdist holds every source whatever the build switches, the pure-Python wheel and its
metadata, setup.py's messages (no torch at build time, no usable CUDA toolkit), the debug-information switch, the
long description, a light ``import flowgmm_fast``, ``python -m flowgmm_fast`` / ``build_info()``, and the warning when
"auto" cannot use a compiled extension that failed to load.

The whole path a user takes -- sdist -> CPU wheel compiled from it -> fresh virtual environment -> smoke test from
outside the repository -- runs in .ci/package_test.sh (part of `make test`); these tests take seconds."""

from __future__ import annotations

import email
import importlib.util
import json
import os
import re
import subprocess
import sys
import tarfile
import time
import zipfile
from pathlib import Path

import pytest
import torch

import flowgmm_fast
from flowgmm_fast import _backend

ROOT = Path(__file__).resolve().parent.parent
CLEAN_ENV = {k: v for k, v in os.environ.items() if not k.startswith("FLOWGMM_FAST_")}


def _load_setup():
    spec = importlib.util.spec_from_file_location("flowgmm_fast_setup", ROOT / "setup.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)  # not as __main__: defines the helpers, builds nothing
    return module


setup_py = _load_setup()


def _run(cmd, env=None, cwd=ROOT, timeout=600):
    return subprocess.run([str(c) for c in cmd], capture_output=True, text=True, env=env or CLEAN_ENV, cwd=cwd,
                          timeout=timeout)


def _hidden_torch(tmp_path: Path) -> dict:
    """An environment in which `import torch` fails (a stand-in package first on PYTHONPATH), as in pip's isolated
    build environment or a machine without torch."""
    fake = tmp_path / "hide" / "torch"
    fake.mkdir(parents=True)
    (fake / "__init__.py").write_text("raise ImportError('torch is hidden by the test')\n")
    return {**CLEAN_ENV, "PYTHONPATH": str(fake.parent)}


def _tracked(*paths: str) -> list[str]:
    out = _run(["git", "ls-files", *paths])
    if out.returncode != 0:  # not a git checkout: what is on disk
        return sorted(str(p.relative_to(ROOT)) for d in paths for p in (ROOT / d).rglob("*")
                      if p.is_file() and "__pycache__" not in p.parts and p.suffix not in (".so", ".pyc"))
    return out.stdout.split()


# ---------------------------------------------------------------------------------------------------- sdist, wheel
@pytest.fixture(scope="module")
def sdist(tmp_path_factory) -> Path:
    """The sdist, made with the switches that used to drop sources: no extension, no CUDA."""
    out = tmp_path_factory.mktemp("dist")
    env = {**CLEAN_ENV, "FLOWGMM_FAST_BUILD_EXT": "0", "FLOWGMM_FAST_BUILD_CUDA": "0"}
    res = _run([sys.executable, "-m", "build", "--sdist", "--no-isolation", "--outdir", out, "."], env=env)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    (path,) = out.glob("flowgmm_fast-*.tar.gz")
    return path


def test_sdist_holds_every_source_header_and_license_whatever_the_switches(sdist):
    with tarfile.open(sdist) as tar:
        names = {n.split("/", 1)[1] for n in tar.getnames() if "/" in n}
    tracked = _tracked("csrc", "kernels", "flowgmm_fast")
    assert any(n.endswith(".cu") for n in tracked) and any(n.endswith(".h") for n in tracked)
    missing = sorted(set(tracked) - names)
    assert not missing, f"the sdist lacks {missing}"
    assert {"LICENSE", "README.md", "setup.py", "pyproject.toml", "MANIFEST.in", "flowgmm_fast/py.typed"} <= names
    assert not [n for n in names if n.endswith((".so", ".pyc")) or n.startswith(("build/", "flowgmm_fast/kernels/"))]


def test_sdist_metadata_spdx_license_classifiers_urls_and_a_portable_description(sdist):
    with tarfile.open(sdist) as tar:
        member = next(m for m in tar.getmembers() if m.name.count("/") == 1 and m.name.endswith("/PKG-INFO"))
        meta = email.message_from_bytes(tar.extractfile(member).read())
    assert meta["License-Expression"] == "Apache-2.0"
    assert meta.get_all("License-File") == ["LICENSE"]
    assert meta["Version"] == flowgmm_fast.__version__
    classifiers = meta.get_all("Classifier")
    assert "Typing :: Typed" in classifiers and not [c for c in classifiers if c.startswith("License ::")]
    assert any(u.startswith("Paper, https://") for u in meta.get_all("Project-URL"))
    assert "torch>=2.6" in meta.get_all("Requires-Dist")  # the sdist builds against any torch; its wheel pins one
    assert meta["Description-Content-Type"] == "text/markdown"
    description = meta.get_payload()
    assert "FlowGMM" in description and "## Install" in description
    assert not re.findall(r"\]\((?!https?://|#)[^)]*\)", description), "relative links break off the repository"


def test_pure_python_wheel_from_the_sdist_needs_no_torch_and_keeps_a_range(sdist, tmp_path):
    env = {**_hidden_torch(tmp_path), "FLOWGMM_FAST_BUILD_EXT": "0"}
    res = _run([sys.executable, "-m", "pip", "wheel", "--no-build-isolation", "--no-deps", "--wheel-dir", tmp_path,
                sdist], env=env)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    (wheel,) = tmp_path.glob("flowgmm_fast-*.whl")
    assert wheel.name.endswith("-py3-none-any.whl")
    with zipfile.ZipFile(wheel) as zf:
        names = zf.namelist()
        meta = email.message_from_bytes(zf.read(next(n for n in names if n.endswith(".dist-info/METADATA"))))
    assert {"flowgmm_fast/py.typed", "flowgmm_fast/kernels/coupling.py", "flowgmm_fast/__main__.py"} <= set(names)
    assert not [n for n in names if n.endswith(".so")]
    assert [r for r in meta.get_all("Requires-Dist") if re.match(r"torch\b(?!vision)", r)] == ["torch>=2.6"]


def test_building_the_extension_without_torch_stops_quickly_naming_the_working_commands(tmp_path):
    # what `pip install .` meets in its isolated build environment: a message, not a traceback, within seconds
    start = time.monotonic()
    res = _run([sys.executable, "-m", "pip", "wheel", "--no-build-isolation", "--no-deps", "--wheel-dir", tmp_path,
                ROOT], env=_hidden_torch(tmp_path))
    elapsed = time.monotonic() - start
    output = res.stdout + res.stderr
    assert res.returncode != 0
    assert "pip install --no-build-isolation ." in output and "FLOWGMM_FAST_BUILD_EXT=0 pip install ." in output
    assert "torch is hidden by the test" in output and "Traceback" not in output
    assert elapsed < 60, f"took {elapsed:.0f} s"


def test_torch_requirement_pins_the_series_of_the_build():
    assert setup_py.torch_requirement("2.14.1+cu130") == "torch==2.14.*"
    assert setup_py.torch_requirement("2.6.0") == "torch==2.6.*"
    assert setup_py.torch_requirement(None) == setup_py.TORCH_RANGE == "torch>=2.6"
    assert setup_py.needs_torch(["setup.py", "bdist_wheel"]) and setup_py.needs_torch(["setup.py", "dist_info"])
    assert not setup_py.needs_torch(["setup.py", "sdist", "--formats", "gztar"])
    assert not setup_py.needs_torch(["setup.py", "egg_info"])
    assert not setup_py.compiles(["setup.py", "dist_info", "--output-dir", "x"])
    assert setup_py.compiles(["setup.py", "editable_wheel"])


# ---------------------------------------------------------------------------------------------- the CUDA toolkit
def _toolkit(root: Path, *, nvcc_release: str | None = "13.0", cudart: bool = True, lib_dir: str = "lib64") -> Path:
    if nvcc_release is not None:
        (root / "bin").mkdir(parents=True)
        nvcc = root / "bin" / "nvcc"
        nvcc.write_text(f"#!/bin/sh\necho 'Cuda compilation tools, release {nvcc_release}, V{nvcc_release}.1'\n")
        nvcc.chmod(0o755)
    (root / lib_dir).mkdir(parents=True, exist_ok=True)
    if cudart:
        (root / lib_dir / "libcudart.so").write_bytes(b"")
    return root


def test_cuda_toolkit_is_checked_before_compiling(tmp_path):
    problem = setup_py.cuda_toolkit_problem
    assert problem(str(_toolkit(tmp_path / "ok")), "13.0") is None
    assert problem(str(_toolkit(tmp_path / "lib", lib_dir="lib")), "13.0") is None
    assert "CPU-only build" in problem(str(tmp_path / "ok"), None)
    assert "no CUDA toolkit was found" in problem(None, "13.0")
    assert "has no bin/nvcc" in problem(str(_toolkit(tmp_path / "nonvcc", nvcc_release=None)), "13.0")
    # the case: an nvcc wrapper on PATH (CUDA_HOME guessed as its parent) without the runtime library
    msg = problem(str(_toolkit(tmp_path / "wrapper", cudart=False)), "13.0", guessed=True)
    assert "libcudart.so" in msg and "guessed from the nvcc on PATH" in msg
    assert "major versions must match" in problem(str(_toolkit(tmp_path / "old", nvcc_release="12.8")), "13.0")


@pytest.fixture
def ext_env(monkeypatch):
    monkeypatch.chdir(ROOT)
    for name in list(os.environ):
        if name.startswith("FLOWGMM_FAST_"):
            monkeypatch.delenv(name)
    monkeypatch.setenv("MAX_JOBS", "1")
    monkeypatch.setenv("TORCH_CUDA_ARCH_LIST", "9.0")
    import torch.utils.cpp_extension as cpp_extension

    def use_toolkit(path):
        monkeypatch.setattr(cpp_extension, "CUDA_HOME", None if path is None else str(path))
        monkeypatch.setenv("CUDA_HOME", str(path or ""))

    return use_toolkit


def _flags(ext) -> dict:
    args = ext.extra_compile_args
    return {"cxx": args["cxx"] if isinstance(args, dict) else args,
            "nvcc": args.get("nvcc", []) if isinstance(args, dict) else [],
            "macros": dict(ext.define_macros), "sources": ext.sources}


def test_without_a_usable_toolkit_auto_builds_the_cpu_kernels_and_says_why(ext_env, tmp_path, capsys):
    ext_env(_toolkit(tmp_path / "wrapper", cudart=False))
    (ext,), cmdclass = setup_py.extension(torch)
    f = _flags(ext)
    assert "build_ext" in cmdclass and not [s for s in f["sources"] if s.endswith(".cu")]
    assert "FLOWGMM_WITH_CUDA" not in f["macros"]
    skipped = f["macros"]["FLOWGMM_CUDA_SKIPPED"]
    assert ("libcudart.so" in skipped or "CPU-only" in skipped) and '"' not in skipped[1:-1]
    assert "building the CPU kernels only" in capsys.readouterr().err
    assert f["cxx"][-1] == "-g0" and f["macros"]["FLOWGMM_BUILD_DEBUG"] == "0"  # release: no debug information


def test_forced_cuda_without_a_usable_toolkit_stops_before_compiling(ext_env, monkeypatch, tmp_path):
    ext_env(_toolkit(tmp_path / "wrapper", cudart=False))
    monkeypatch.setenv("FLOWGMM_FAST_BUILD_CUDA", "1")
    with pytest.raises(SystemExit, match="(?s)FLOWGMM_FAST_BUILD_CUDA=1 but .*libcudart.*FLOWGMM_FAST_BUILD_CUDA=0"):
        setup_py.extension(torch)


@pytest.mark.skipif(torch.version.cuda is None, reason="a CPU-only torch cannot build the CUDA kernels")
def test_a_whole_toolkit_builds_cuda_and_debug_info_is_opt_in(ext_env, monkeypatch, tmp_path):
    ext_env(_toolkit(tmp_path / "cuda", nvcc_release=torch.version.cuda))
    (ext,), _ = setup_py.extension(torch)
    f = _flags(ext)
    assert "FLOWGMM_WITH_CUDA" in f["macros"] and any(s.endswith(".cu") for s in f["sources"])
    assert "-lineinfo" not in f["nvcc"] and "-g0" in f["cxx"] and f["macros"]["FLOWGMM_CUDA_ARCHS"] == '"9.0"'
    monkeypatch.setenv("FLOWGMM_FAST_BUILD_DEBUG", "1")
    (ext,), _ = setup_py.extension(torch)
    f = _flags(ext)
    assert "-lineinfo" in f["nvcc"] and f["cxx"][-1] == "-g" and f["macros"]["FLOWGMM_BUILD_DEBUG"] == "1"


def test_long_description_reads_well_off_the_repository():
    text = ("See [`experiments/RESULTS.md`](experiments/RESULTS.md) and [the notes](../shared/REFERENCE.md), "
            "[the paper](https://arxiv.org/abs/1912.13025), [below](#install).\n![plot](benchmarks/x.png)\nend")
    out = setup_py.long_description(text)
    assert out == ("See `experiments/RESULTS.md` and the notes (`../shared/REFERENCE.md` in the source tree), "
                   "[the paper](https://arxiv.org/abs/1912.13025), [below](#install).\nend")
    readme = setup_py.long_description((ROOT / "README.md").read_text())
    assert not re.findall(r"\]\((?!https?://|#)[^)]*\)", readme)


# --------------------------------------------------------------------------------------- import, build_info, report
def test_import_is_light_no_dynamo_and_no_extension():
    code = ("import sys, flowgmm_fast; print([m for m in ('torch._dynamo', 'flowgmm_fast._C', 'triton') "
            "if m in sys.modules])")
    res = _run([sys.executable, "-c", code], env={**CLEAN_ENV, "PYTHONPATH": str(ROOT)})
    assert res.returncode == 0, res.stderr
    assert "torch._dynamo" not in res.stdout and "flowgmm_fast._C" not in res.stdout, res.stdout


def test_build_info_at_the_top_level():
    info = flowgmm_fast.build_info()
    assert info["version"] == flowgmm_fast.__version__
    assert set(info) == {"version", "location", "source_checkout", "extension", "extension_error"}
    if _backend.unavailable_reason("native") is None:
        ext = info["extension"]
        assert ext["torch"] == torch.__version__ and Path(ext["path"]).is_file() and info["extension_error"] is None
        assert {"with_cuda", "cuda", "cuda_archs", "cuda_skipped", "debug"} <= set(ext)
    else:
        assert info["extension_error"]


def test_python_m_flowgmm_fast_reports_versions_devices_and_backends():
    env = {**CLEAN_ENV, "PYTHONPATH": str(ROOT)}
    res = _run([sys.executable, "-m", "flowgmm_fast"], env=env)
    assert res.returncode == 0, res.stderr
    for needle in (f"flowgmm-fast {flowgmm_fast.__version__}", f"torch       {torch.__version__}",
                   "compiled extension flowgmm_fast._C", "CUDA devices", "backends (selected: auto",
                   "  torch    available on cpu, cuda", "auto     cpu: affine_coupling="):
        assert needle in res.stdout, f"{needle!r} not in\n{res.stdout}"
    assert "triton" in res.stdout and "native" in res.stdout
    res = _run([sys.executable, "-m", "flowgmm_fast", "--json"], env=env)
    data = json.loads(res.stdout)
    assert data["backends"]["torch"]["available"] and data["torch"]["version"] == torch.__version__
    assert set(data["backends"]) == set(_backend.BACKENDS)


# ------------------------------------------------------------------------------- "auto" when _C failed to load
_BREAK_C = """
import importlib.abc, sys, warnings
class Fail(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name == "flowgmm_fast._C":
            raise {error}
sys.meta_path.insert(0, Fail())
warnings.simplefilter("always")
import torch, flowgmm_fast as ff
x = torch.randn(2, 3, 4, 4)
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    for _ in range(2):
        ff.functional.affine_coupling(x, x, x, mask=ff.functional.checkerboard(0))
print("NATIVE:", ff.available_backends())
for w in caught:
    print("WARNING:", w.category.__name__, w.message)
"""


def _auto_with_broken_c(error: str):
    res = _run([sys.executable, "-c", _BREAK_C.format(error=error)], env={**CLEAN_ENV, "PYTHONPATH": str(ROOT)})
    assert res.returncode == 0, res.stderr
    return [line for line in res.stdout.splitlines() if line.startswith("WARNING:")], res.stdout


def test_auto_warns_once_when_the_extension_fails_to_load():
    warned, out = _auto_with_broken_c("ImportError('undefined symbol: _ZN3c10_fake')")
    assert "'native'" not in out
    assert len(warned) == 1, out
    assert "RuntimeWarning" in warned[0] and "undefined symbol: _ZN3c10_fake" in warned[0]
    assert "pip install --no-build-isolation" in warned[0] and "FLOWGMM_FAST_BACKEND=torch" in warned[0]


def test_auto_does_not_warn_for_an_install_without_the_extension():
    warned, out = _auto_with_broken_c("ModuleNotFoundError(\"No module named 'flowgmm_fast._C'\", "
                                      "name='flowgmm_fast._C')")
    assert "'native'" not in out and warned == [], out


def test_an_installed_wheel_that_fails_to_load_names_the_torch_it_was_built_for(monkeypatch):
    native_ops = pytest.importorskip("flowgmm_fast.ops.native_ops")
    monkeypatch.setattr(native_ops, "source_checkout", lambda: None)
    monkeypatch.setattr(native_ops.importlib.metadata, "requires", lambda name: ["torch==2.14.*", "numpy",
                                                                              'torchvision; extra == "train"'])
    monkeypatch.setattr(native_ops, "rebuild_hint", lambda: "REBUILD")
    msg = native_ops._load_failure(ImportError("undefined symbol: _ZN5torch"))
    assert "undefined symbol" in msg and 'built for torch==2.14.* and torch ' in msg
    assert '`pip install "torch==2.14.*"`, or REBUILD' in msg
    monkeypatch.setattr(native_ops.importlib.metadata, "requires", lambda name: ["torch>=2.6", "numpy"])
    assert native_ops._load_failure(ImportError("x")).endswith("fix: REBUILD")
