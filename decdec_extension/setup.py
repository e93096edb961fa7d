"""Installs the ``decdec`` package; builds the CUDA extension ``decdec._C`` when torch has CUDA
and nvcc is found. Install with ``pip install --no-build-isolation -e decdec_extension`` so the
build sees the installed torch.

Environment: ``DECDEC_CUDA_ARCH_LIST`` (or ``TORCH_CUDA_ARCH_LIST``) picks the architectures,
e.g. "9.0" (default: the local GPU's); ``DECDEC_NO_CUDA=1`` installs the pure-Python package.
"""
import os
from pathlib import Path

from setuptools import find_packages, setup

HERE = Path(__file__).parent


def cuda_extensions():
    if os.environ.get("DECDEC_NO_CUDA") == "1":
        return [], {}
    try:
        import torch
        from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CUDAExtension
    except ImportError:
        return [], {}
    sources = sorted(str(p.relative_to(HERE)) for p in (HERE / "csrc").glob("*.c[up]*"))
    if torch.version.cuda is None or CUDA_HOME is None or not sources:
        return [], {}
    if os.environ.get("DECDEC_CUDA_ARCH_LIST"):
        os.environ["TORCH_CUDA_ARCH_LIST"] = os.environ["DECDEC_CUDA_ARCH_LIST"]
    nvcc = ["-O3", "--use_fast_math", "-lineinfo", "-std=c++17",
            # CUDA 13 hides template-kernel stubs per file unless told otherwise (DESIGN.md)
            "-static-global-template-stub=false"]
    ext = CUDAExtension("decdec._C", sources, extra_compile_args={"cxx": ["-O3", "-std=c++17"], "nvcc": nvcc})
    return [ext], {"build_ext": BuildExtension}


ext_modules, cmdclass = cuda_extensions()
setup(packages=find_packages(include=["decdec", "decdec.*"]), ext_modules=ext_modules, cmdclass=cmdclass)
