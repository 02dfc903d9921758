"""Build flowgmm_fast and its compiled extension flowgmm_fast._C.

Environment switches:
  FLOWGMM_FAST_BUILD_EXT=0      skip the extension entirely (pure Python install; "torch" and "triton" backends only)
  FLOWGMM_FAST_BUILD_CUDA=0/1   force the CUDA kernels off / on (default: on when nvcc is found through CUDA_HOME)
  TORCH_CUDA_ARCH_LIST          CUDA architectures (default "8.0;9.0+PTX": A100, H100, PTX for newer GPUs)
  MAX_JOBS                      parallel compile jobs for ninja (default: from cores and memory, ~3 GiB per nvcc job)
Install with ``pip install --no-build-isolation -e .`` so the extension builds against the torch already installed.
"""

import glob
import os

from setuptools import find_packages, setup

ROOT = os.path.dirname(os.path.abspath(__file__))


def _default_max_jobs() -> str:
    cores = os.cpu_count() or 1
    try:
        mem_gib = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    except (ValueError, OSError, AttributeError):
        mem_gib = 8.0
    return str(max(1, min(cores, int(mem_gib // 3))))


def _flag(name: str):
    value = os.environ.get(name)
    if value is None or value == "":
        return None
    if value not in ("0", "1"):
        raise SystemExit(f"{name} must be 0 or 1, got {value!r}")
    return value == "1"


def extensions():
    if _flag("FLOWGMM_FAST_BUILD_EXT") is False:
        return [], {}
    import torch
    from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension

    cpp = sorted(glob.glob("csrc/**/*.cpp", recursive=True))
    cu = sorted(glob.glob("csrc/**/*.cu", recursive=True))
    if not cpp:
        return [], {}
    build_cuda = _flag("FLOWGMM_FAST_BUILD_CUDA")
    if build_cuda is None:
        build_cuda = CUDA_HOME is not None and bool(cu)
    if build_cuda and CUDA_HOME is None:
        raise SystemExit("FLOWGMM_FAST_BUILD_CUDA=1 but no CUDA toolkit was found: set CUDA_HOME (e.g. /usr/local/cuda)")
    os.environ.setdefault("MAX_JOBS", _default_max_jobs())
    os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;9.0+PTX")

    cuda_version = (torch.version.cuda or "") if build_cuda else ""
    macros = [
        ("FLOWGMM_TORCH_VERSION", f'"{torch.__version__}"'),
        ("FLOWGMM_CUDA_VERSION", f'"{cuda_version}"'),
    ]
    # -fopenmp: at::parallel_for is an inline OpenMP region in the ATen headers (without it the CPU loops run on one
    # thread) and `omp simd` vectorises the loops' reductions. libgomp.so.1 resolves to the copy torch has loaded.
    # -fno-trapping-math: the code never reads floating-point exception flags; without it GCC keeps the float selects
    # of the vectorisable exp/tanh (csrc/flowgmm_math.h) as branches for AVX2 and SSE and those loops stay scalar.
    cxx = ["-O3", "-std=c++20", "-fopenmp", "-fno-trapping-math"]
    link = ["-fopenmp"]
    include = [os.path.join(ROOT, "csrc")]
    if build_cuda:
        macros.append(("FLOWGMM_WITH_CUDA", None))
        nvcc = ["-O3", "-std=c++20", "--expt-relaxed-constexpr", "-lineinfo"]
        ext = CUDAExtension("flowgmm_fast._C", cpp + cu, include_dirs=include, define_macros=macros,
                            extra_compile_args={"cxx": cxx, "nvcc": nvcc}, extra_link_args=link)
    else:
        ext = CppExtension("flowgmm_fast._C", cpp, include_dirs=include, define_macros=macros,
                           extra_compile_args={"cxx": cxx}, extra_link_args=link)
    return [ext], {"build_ext": BuildExtension.with_options(use_ninja=True)}


ext_modules, cmdclass = extensions()

setup(
    packages=find_packages(include=["flowgmm_fast", "flowgmm_fast.*"]) + ["flowgmm_fast.kernels"],
    package_dir={"flowgmm_fast.kernels": "kernels"},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
