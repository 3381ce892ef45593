"""Every Triton kernel of the package compiles for sm_90 (H100 / H200), here on the CPU.

The interpreter tests run the kernels as numpy code, which accepts programs the
compiler refuses; tests/triton_sm90.py records each launch the Triton paths make
(in a process with the interpreter) and compiles it to cubin (in a process
without), together with every GPU tile candidate of the InfoNCE kernel, checking
each against the chip's shared memory. A kernel that fails here would fail on
every GPU.
"""

import os
import subprocess
import sys

import pytest

from helpers import env_without_interpreter

pytest.importorskip("triton")

HERE = os.path.dirname(os.path.abspath(__file__))


def _has_cuda_compiler() -> bool:
    try:
        from triton.backends.nvidia.compiler import CUDABackend  # noqa: F401
    except Exception:
        return False
    return True


# A folder holding another Triton to compile with as well, e.g. from
# `pip install --no-deps --target DIR triton==3.6.0` (CI sets it): GPU users run
# the Triton their torch's CUDA wheel installs (3.6 with torch 2.11), not the one
# the tests pin.
OTHER_TRITON = os.environ.get("PYCLLOSS_TRITON_SITE")
# every family's kernels must be reached (a family whose Triton path broke
# before launching would otherwise pass silently)
KERNELS = {"_tiles_kernel", "_forward_kernel", "_neg_lse_kernel", "_supremix_fwd_kernel",
           "_rnc_fwd_kernel", "_sort_fwd_kernel", "_cacr_fwd_kernel", "_cacr_grad_kernel",
           "_topk_kernel", "_rows_bwd_kernel"}
TOOL = [sys.executable, os.path.join(HERE, "triton_sm90.py")]


@pytest.fixture(scope="module")
def launches(tmp_path_factory):
    """Every launch the Triton paths make, recorded under the installed Triton's
    interpreter (the launches are the same for any Triton; 3.6's interpreter
    fails on numpy 2.x)."""
    path = str(tmp_path_factory.mktemp("sm90") / "launches.json")
    capture = subprocess.run(TOOL + ["capture", path], env=env_without_interpreter(),
                             capture_output=True, text=True, timeout=900)
    assert capture.returncode == 0, capture.stderr[-3000:]
    return path


def _compile(launches, env):
    compiled = subprocess.run(TOOL + ["compile", launches], env=env, capture_output=True,
                              text=True, timeout=1800)
    lines = compiled.stdout.splitlines()
    assert compiled.returncode == 0, \
        "\n".join(l for l in lines if l.startswith("FAILED")) or compiled.stderr[-3000:]
    names = {line.split()[1] for line in lines if line.startswith("ok")}
    assert KERNELS <= names, names
    return lines[0]  # "triton VERSION at PATH"


@pytest.mark.skipif(not _has_cuda_compiler(), reason="Triton without its NVIDIA backend")
def test_every_kernel_compiles_for_sm90(launches):
    _compile(launches, env_without_interpreter())


@pytest.mark.skipif(not OTHER_TRITON, reason="PYCLLOSS_TRITON_SITE names no other Triton")
def test_every_kernel_compiles_for_sm90_with_another_triton(launches):
    path = os.pathsep.join(filter(None, [OTHER_TRITON, os.environ.get("PYTHONPATH")]))
    used = _compile(launches, env_without_interpreter(PYTHONPATH=path))
    assert os.path.realpath(OTHER_TRITON) in used, used
