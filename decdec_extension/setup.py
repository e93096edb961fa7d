"""Installs the ``decdec`` package; builds the CUDA extension ``decdec._C`` when torch has CUDA
and nvcc is found, and the CPU kernels ``decdec._cpu`` with the host C++ compiler (optional: if
that build fails the package falls back to its pure-PyTorch paths). Install with
``pip install --no-build-isolation -e decdec_extension`` so the build sees the installed torch.

Environment: ``DECDEC_CUDA_ARCH_LIST`` (or ``TORCH_CUDA_ARCH_LIST``) picks the architectures,
e.g. "9.0" (default: the local GPU's); ``DECDEC_NO_CUDA=1`` skips the CUDA extension,
``DECDEC_NO_CPU_KERNELS=1`` the CPU one.
"""
import os

from setuptools import find_packages, setup


CPU_SOURCES = ["csrc/cpu_selection.cpp"]
CUDA_SOURCES = ["csrc/bindings.cpp", "csrc/kernels.cu", "csrc/attention.cu"]
CXX_FLAGS = ["-O3", "-std=c++17"]
# at::parallel_for spreads over threads only where OpenMP is on, as in torch's own build
CPU_FLAGS = CXX_FLAGS + ["-fopenmp"]


def extensions():
    try:
        import torch
        from torch.utils.cpp_extension import BuildExtension
    except ImportError:
        return [], {}

    class BuildWithOptionalCPU(BuildExtension):
        def build_extension(self, ext):
            try:
                super().build_extension(ext)
            except Exception as e:  # the compiler's own error is printed above this
                if ext.name != "decdec._cpu":
                    raise
                print(f"warning: decdec._cpu was not built ({type(e).__name__}); the CPU paths stay pure PyTorch")

    exts = [e for e in (cpu_extension(), cuda_extension(torch)) if e is not None]
    return exts, {"build_ext": BuildWithOptionalCPU} if exts else {}


def cpu_extension():
    if os.environ.get("DECDEC_NO_CPU_KERNELS") == "1":
        return None
    from torch.utils.cpp_extension import CppExtension
    return CppExtension("decdec._cpu", CPU_SOURCES, extra_compile_args=CPU_FLAGS, extra_link_args=["-fopenmp"])


def cuda_extension(torch):
    if os.environ.get("DECDEC_NO_CUDA") == "1":
        return None
    from torch.utils.cpp_extension import CUDA_HOME, CUDAExtension
    if torch.version.cuda is None or CUDA_HOME is None:
        return None
    if os.environ.get("DECDEC_CUDA_ARCH_LIST"):
        os.environ["TORCH_CUDA_ARCH_LIST"] = os.environ["DECDEC_CUDA_ARCH_LIST"]
    nvcc = ["-O3", "--use_fast_math", "-lineinfo", "-std=c++17",
            # CUDA 13 hides template-kernel stubs per file unless told otherwise (DESIGN.md)
            "-static-global-template-stub=false"]
    return CUDAExtension("decdec._C", CUDA_SOURCES, extra_compile_args={"cxx": CXX_FLAGS, "nvcc": nvcc})


ext_modules, cmdclass = extensions()
setup(packages=find_packages(include=["decdec", "decdec.*"]), ext_modules=ext_modules, cmdclass=cmdclass)
