"""Builds pyclloss._C: the C++ CPU kernels always, the CUDA kernels when torch
has CUDA and nvcc is found.

Environment overrides:
  PYCLLOSS_CUDA=0   never build the CUDA kernels
  PYCLLOSS_CUDA=1   require them (fail if torch has no CUDA or nvcc is missing)
  PYCLLOSS_CUDA_ARCH="80;90"  compute capabilities for nvcc (default 80;90)
  MAX_JOBS          parallel compile jobs (torch's ninja builder)
"""

import glob
import os
import re
import sys

from setuptools import setup

try:
    import torch
    from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension
except ImportError as exc:  # pragma: no cover - build-time message
    raise SystemExit(
        "pyclloss builds against the installed PyTorch: install torch first, then "
        "`pip install --no-build-isolation .`"
    ) from exc

HERE = os.path.dirname(os.path.abspath(__file__))


def _want_cuda():
    flag = os.environ.get("PYCLLOSS_CUDA", "auto")
    available = torch.version.cuda is not None and CUDA_HOME is not None
    if flag == "0":
        return False
    if flag == "1" and not available:
        raise SystemExit("PYCLLOSS_CUDA=1 but torch has no CUDA or nvcc was not found")
    return available


def _openmp_flags():
    return ["-fopenmp"] if os.name != "nt" else ["/openmp"]


def _torch_version_macro():
    """torch.__version__ for csrc/bindings.cpp, which stringifies the bare tokens."""
    version = str(torch.__version__)
    if not re.fullmatch(r"[0-9][0-9A-Za-z.+]*", version):
        raise SystemExit(f"unexpected torch version string {version!r}")
    return ("PYCLLOSS_TORCH_VERSION", version)


# Release builds: no debug info, stripped (the shared object is 20x smaller).
RELEASE_CXX = ["-O3", "-g0"]
RELEASE_LINK = ["-s"]


def _extension():
    rel = lambda pattern: sorted(os.path.relpath(p, HERE) for p in glob.glob(os.path.join(HERE, pattern)))
    sources = ["csrc/bindings.cpp"] + rel("csrc/cpu/*.cpp")
    include_dirs = [os.path.join(HERE, "csrc", "include")]
    cxx = RELEASE_CXX + ["-std=c++17"] + _openmp_flags()
    macros = [_torch_version_macro()]
    link = _openmp_flags() + RELEASE_LINK
    if not _want_cuda():
        return CppExtension(
            "pyclloss._C",
            sources,
            include_dirs=include_dirs,
            define_macros=macros,
            extra_compile_args={"cxx": cxx},
            extra_link_args=link,
        )
    archs = os.environ.get("PYCLLOSS_CUDA_ARCH", "80;90").replace(",", ";").split(";")
    gencode = [f"-gencode=arch=compute_{a},code=sm_{a}" for a in archs if a]
    return CUDAExtension(
        "pyclloss._C",
        sources + rel("csrc/cuda/*.cu") + rel("csrc/cuda/*.cpp"),
        include_dirs=include_dirs,
        define_macros=macros + [("PYCLLOSS_WITH_CUDA", None)],
        extra_compile_args={"cxx": cxx, "nvcc": ["-O3", "-std=c++17", "--use_fast_math"] + gencode},
        extra_link_args=link,
    )


class BuildExt(BuildExtension.with_options(use_ninja=True)):
    """torch's ninja builder, with the object files kept in build/ between builds
    (setuptools gives an editable build a fresh temporary folder), so that a
    rebuild compiles only what changed."""

    def finalize_options(self):
        super().finalize_options()
        self.build_temp = os.path.join(HERE, "build", f"temp-{sys.implementation.cache_tag}")


setup(
    ext_modules=[_extension()],
    cmdclass={"build_ext": BuildExt},
)
