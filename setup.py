"""Build flowgmm_fast and its compiled extension flowgmm_fast._C.

Install (the extension is compiled against the torch already installed, so the build must see that torch):
  pip install --no-build-isolation .          add -e for an editable install from a checkout
  FLOWGMM_FAST_BUILD_EXT=0 pip install .      pure Python ("torch" and "triton" backends), no torch or compiler needed
                                              at build time
Environment switches:
  FLOWGMM_FAST_BUILD_EXT=0      skip the extension entirely (the pure-Python package)
  FLOWGMM_FAST_BUILD_CUDA=0/1   force the CUDA kernels off / on. Default: on when the CUDA toolkit torch finds
                                (CUDA_HOME, else the nvcc on PATH) is a whole toolkit -- bin/nvcc and the runtime
                                library libcudart.so -- whose major version matches torch's CUDA; otherwise only the
                                CPU kernels are built, and the reason is printed and kept in
                                build_info()["cuda_skipped"]. With 1, a missing or mismatched toolkit stops the build
                                before anything is compiled.
  FLOWGMM_FAST_BUILD_DEBUG=1    keep debug information (-g for C++, -lineinfo for CUDA: gdb, compute-sanitizer and
                                Nsight source views); release builds have none (-g0): 3.3 MiB instead of 21 MB
  TORCH_CUDA_ARCH_LIST          CUDA architectures (default "8.0;9.0+PTX": A100, H100, PTX for newer GPUs)
  MAX_JOBS                      parallel compile jobs for ninja (default: from cores and memory, ~3 GiB per nvcc job)

A wheel with the extension requires the torch series it was compiled against (``torch==X.Y.*``: the C++ ABI is not
stable across minor releases); the pure-Python wheel takes any ``torch>=2.6``. The sdist holds every source, header
and .cu file whatever these switches say (MANIFEST.in): it builds a wheel for any machine.
"""

from __future__ import annotations

import glob
import os
import re
import subprocess
import sys

ROOT = os.path.dirname(os.path.abspath(__file__))
TORCH_RANGE = "torch>=2.6"
OTHER_DEPENDENCIES = ["numpy"]

# setup.py commands that compile the extension or write the metadata of a wheel (whose torch requirement is the torch
# found at build time). The others -- sdist, egg_info (pip asks for the build requirements through it), check, clean,
# --version -- never import torch: an sdist can be made on any machine.
_BUILD_COMMANDS = {"build", "build_ext", "bdist_wheel", "bdist", "bdist_egg", "bdist_dumb", "bdist_rpm", "develop",
                   "install", "editable_wheel", "dist_info"}

_WORKING_COMMANDS = """\
  - with torch installed:   pip install --no-build-isolation .      (add -e in a checkout for an editable install)
                            plain `pip install .` builds in an isolated environment, without your torch
  - pure Python, no build:  FLOWGMM_FAST_BUILD_EXT=0 pip install .  ("torch" and "triton" backends only)
  - no torch yet:           install torch first (https://pytorch.org/get-started/locally/), then the first line"""


def _flag(name: str) -> bool | None:
    value = os.environ.get(name)
    if value is None or value == "":
        return None
    if value not in ("0", "1"):
        raise SystemExit(f"{name} must be 0 or 1, got {value!r}")
    return value == "1"


def _say(message: str) -> None:
    print(f"flowgmm-fast: {message}", file=sys.stderr, flush=True)


def _default_max_jobs() -> str:
    cores = os.cpu_count() or 1
    try:
        mem_gib = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    except (ValueError, OSError, AttributeError):
        mem_gib = 8.0
    return str(max(1, min(cores, int(mem_gib // 3))))


def needs_torch(argv: list[str]) -> bool:
    """Whether this run of setup.py compiles the extension or writes a wheel's metadata (and so needs torch)."""
    return _flag("FLOWGMM_FAST_BUILD_EXT") is not False and any(arg in _BUILD_COMMANDS for arg in argv[1:])


def compiles(argv: list[str]) -> bool:
    """Whether this run may compile (not only dist_info, the metadata pip prepares before building)."""
    return any(arg in _BUILD_COMMANDS - {"dist_info"} for arg in argv[1:])


def import_torch():
    """torch, or a SystemExit naming the commands that work (no traceback: this is the first thing users hit)."""
    try:
        import torch
    except ImportError as exc:
        raise SystemExit(
            f"\nflowgmm-fast: cannot build the compiled extension: torch is not importable here ({exc}).\n"
            "The extension is compiled against the torch you will run it with, so that torch must be visible to the "
            f"build:\n{_WORKING_COMMANDS}\n") from None
    return torch


def torch_requirement(torch_version: str | None) -> str:
    """``torch==X.Y.*`` for a wheel with the extension built against torch X.Y.z; the range otherwise."""
    if torch_version is None:
        return TORCH_RANGE
    match = re.match(r"(\d+)\.(\d+)", torch_version)
    if match is None:
        raise SystemExit(f"flowgmm-fast: cannot read the torch version {torch_version!r}")
    return f"torch=={match.group(1)}.{match.group(2)}.*"


def cuda_toolkit_problem(cuda_home: str | None, torch_cuda: str | None, guessed: bool = False) -> str | None:
    """Why the CUDA kernels cannot be built with the toolkit at ``cuda_home`` for a torch built with CUDA
    ``torch_cuda`` (None when they can). Checked before anything compiles: a bare nvcc wrapper on PATH is not a
    toolkit (the link would fail on -lcudart after minutes of compiling)."""
    if not torch_cuda:
        return "the installed torch is a CPU-only build (torch.version.cuda is None)"
    if not cuda_home:
        return "no CUDA toolkit was found (CUDA_HOME is unset, no nvcc on PATH, no /usr/local/cuda)"
    where = f"CUDA_HOME={cuda_home}" + (" (guessed from the nvcc on PATH)" if guessed else "")
    nvcc = os.path.join(cuda_home, "bin", "nvcc")
    if not (os.path.isfile(nvcc) and os.access(nvcc, os.X_OK)):
        return f"{where} has no bin/nvcc"
    # torch links -lcudart from lib64 (lib when there is no lib64), see torch.utils.cpp_extension.library_paths
    lib_dir = "lib64" if os.path.isdir(os.path.join(cuda_home, "lib64")) else "lib"
    if not glob.glob(os.path.join(cuda_home, lib_dir, "libcudart.so*")):
        return f"{where} has no CUDA runtime library ({lib_dir}/libcudart.so): it is not a whole CUDA toolkit"
    try:
        out = subprocess.run([nvcc, "--version"], capture_output=True, text=True, timeout=120)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"`{nvcc} --version` failed ({type(exc).__name__}: {exc})"
    release = re.search(r"release (\d+)\.(\d+)", out.stdout)
    if out.returncode != 0 or release is None:
        return f"`{nvcc} --version` did not report a CUDA release (exit code {out.returncode})"
    if release.group(1) != torch_cuda.split(".")[0]:
        return (f"{where} holds CUDA {release.group(1)}.{release.group(2)} but torch was built with CUDA {torch_cuda}: "
                "their major versions must match")
    return None


def _macro_text(text: str) -> str:
    """A string that survives a C string-literal macro through ninja and the shell."""
    return '"' + re.sub(r'[^A-Za-z0-9 _.,:;=()/+\-]', "_", text) + '"'


def extension(torch):
    """(ext_modules, cmdclass) for flowgmm_fast._C, after checking the CUDA toolkit."""
    from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension

    cpp = sorted(glob.glob(os.path.join("csrc", "**", "*.cpp"), recursive=True))
    cu = sorted(glob.glob(os.path.join("csrc", "**", "*.cu"), recursive=True))
    if not cpp:
        raise SystemExit(f"flowgmm-fast: no C++ sources under {os.path.join(ROOT, 'csrc')}: an incomplete source tree")
    forced = _flag("FLOWGMM_FAST_BUILD_CUDA")
    build_cuda, skipped = False, ""
    if forced is not False and cu:
        guessed = not (os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH"))
        problem = cuda_toolkit_problem(CUDA_HOME, torch.version.cuda, guessed)
        if problem is None:
            build_cuda = True
        elif forced:
            raise SystemExit(f"\nflowgmm-fast: FLOWGMM_FAST_BUILD_CUDA=1 but {problem}.\nPoint CUDA_HOME at a CUDA "
                             f"toolkit matching torch's CUDA {torch.version.cuda} (the folder with bin/nvcc and "
                             "lib64/libcudart.so), or build the CPU kernels only with FLOWGMM_FAST_BUILD_CUDA=0.\n")
        else:
            skipped = problem
            _say(f"building the CPU kernels only: {problem}. To build the CUDA kernels too, point CUDA_HOME at a "
                 "CUDA toolkit (bin/nvcc and lib64/libcudart.so) matching torch's CUDA; FLOWGMM_FAST_BUILD_CUDA=1 "
                 "makes this an error.")
    debug = _flag("FLOWGMM_FAST_BUILD_DEBUG") is True
    os.environ.setdefault("MAX_JOBS", _default_max_jobs())
    os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;9.0+PTX")
    _say(f"building flowgmm_fast._C against torch {torch.__version__}: CPU kernels"
         + (f" and CUDA kernels (CUDA_HOME={CUDA_HOME}, TORCH_CUDA_ARCH_LIST={os.environ['TORCH_CUDA_ARCH_LIST']})"
            if build_cuda else "") + (", with debug information" if debug else ""))

    macros = [
        ("FLOWGMM_TORCH_VERSION", _macro_text(torch.__version__)),
        ("FLOWGMM_CUDA_VERSION", _macro_text((torch.version.cuda or "") if build_cuda else "")),
        ("FLOWGMM_CUDA_ARCHS", _macro_text(os.environ["TORCH_CUDA_ARCH_LIST"] if build_cuda else "")),
        ("FLOWGMM_CUDA_SKIPPED", _macro_text(skipped)),
        ("FLOWGMM_BUILD_DEBUG", "1" if debug else "0"),
    ]
    # -fopenmp: at::parallel_for is an inline OpenMP region in the ATen headers (without it the CPU loops run on one
    # thread) and `omp simd` vectorises the loops' reductions. libgomp.so.1 resolves to the copy torch has loaded.
    # -fno-trapping-math: the code never reads floating-point exception flags; without it GCC keeps the float selects
    # of the vectorisable exp/tanh (csrc/flowgmm_math.h) as branches for AVX2 and SSE and those loops stay scalar.
    # -g0 / -g: Python's own CFLAGS carry -g; the last flag wins, so release builds drop the debug sections.
    cxx = ["-O3", "-std=c++20", "-fopenmp", "-fno-trapping-math", "-g" if debug else "-g0"]
    link = ["-fopenmp"]
    include = [os.path.join(ROOT, "csrc")]
    if build_cuda:
        macros.append(("FLOWGMM_WITH_CUDA", None))
        nvcc = ["-O3", "-std=c++20", "--expt-relaxed-constexpr"] + (["-lineinfo"] if debug else [])
        ext = CUDAExtension("flowgmm_fast._C", cpp + cu, include_dirs=include, define_macros=macros,
                            extra_compile_args={"cxx": cxx, "nvcc": nvcc}, extra_link_args=link)
    else:
        ext = CppExtension("flowgmm_fast._C", cpp, include_dirs=include, define_macros=macros,
                           extra_compile_args={"cxx": cxx}, extra_link_args=link)
    return [ext], {"build_ext": BuildExtension.with_options(use_ninja=True)}


# Links and images whose target is a path inside the repository (README.md's relative links) break on a package
# index page; the long description keeps their text and drops the image.
_RELATIVE_IMAGE = re.compile(r"!\[[^\]]*\]\((?![a-z][a-z0-9+.-]*:|#)[^)]*\)\n?", re.IGNORECASE)
_RELATIVE_LINK = re.compile(r"\[([^\]]+)\]\((?![a-z][a-z0-9+.-]*:|#)([^)]*)\)", re.IGNORECASE)


def long_description(readme: str) -> str:
    """README.md as it should read off the repository: relative images dropped, relative links turned into their
    text (with the path in the source tree when the text does not already name it)."""

    def unlink(match: re.Match) -> str:
        text, target = match.group(1), match.group(2)
        return text if target.strip("`") in text else f"{text} (`{target}` in the source tree)"

    return _RELATIVE_LINK.sub(unlink, _RELATIVE_IMAGE.sub("", readme))


def main() -> None:
    import setuptools
    from setuptools import find_packages, setup

    if int(setuptools.__version__.split(".")[0]) < 77:  # pyproject.toml's SPDX license string needs 77
        raise SystemExit(f"flowgmm-fast: setuptools {setuptools.__version__} is too old to build this package: "
                         "pip install 'setuptools>=77' (torch >= 2.9 requires it anyway), then build again")

    ext_modules, cmdclass, torch_version = [], {}, None
    if needs_torch(sys.argv):
        torch = import_torch()
        torch_version = torch.__version__
        if compiles(sys.argv):
            ext_modules, cmdclass = extension(torch)
    with open(os.path.join(ROOT, "README.md"), encoding="utf-8") as f:
        readme = long_description(f.read())
    setup(
        # flowgmm_fast.kernels is the top-level kernels/ folder (a checkout may hold a symlink to it in the package)
        packages=find_packages(include=["flowgmm_fast", "flowgmm_fast.*"],
                               exclude=["flowgmm_fast.kernels", "flowgmm_fast.kernels.*"]) + ["flowgmm_fast.kernels"],
        package_dir={"flowgmm_fast.kernels": "kernels"},
        package_data={"flowgmm_fast": ["py.typed"]},
        install_requires=[torch_requirement(torch_version), *OTHER_DEPENDENCIES],
        long_description=readme,
        long_description_content_type="text/markdown",
        ext_modules=ext_modules,
        cmdclass=cmdclass,
    )


if __name__ == "__main__":
    main()
