"""``import pyclloss`` costs little beyond ``import torch``: the heavy modules
(torch._dynamo, triton, matplotlib, scikit-learn) load on first use only."""

import os
import subprocess
import sys

import torch

import pyclloss
from pyclloss.backends import _constant_when_traced, resolve

HEAVY = ("torch._dynamo", "triton", "matplotlib", "sklearn")
BUDGET_S = 0.15


def _python(*args: str) -> str:
    """stdout and stderr of a fresh interpreter that finds this pyclloss."""
    root = os.path.dirname(os.path.dirname(pyclloss.__file__))
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([root, os.environ.get("PYTHONPATH", "")]))
    env.pop("TRITON_INTERPRET", None)
    done = subprocess.run([sys.executable, *args], env=env, capture_output=True, text=True,
                          check=True, timeout=120)
    return done.stdout + done.stderr


def test_import_loads_no_heavy_module():
    code = ("import sys, torch; before = set(sys.modules); import pyclloss; "
            f"print(sorted(m for m in set(sys.modules) - before "
            f"if any(m == h or m.startswith(h + '.') for h in {HEAVY!r})))")
    assert _python("-c", code).strip().splitlines()[-1] == "[]"


def _cumulative_seconds(importtime: str, module: str) -> float:
    """The cumulative time of ``module``'s top-level import in ``-X importtime`` output."""
    for line in importtime.splitlines():
        parts = [p.strip() for p in line.split("|")]
        if len(parts) == 3 and parts[2] == module:
            return int(parts[1]) / 1e6
    raise AssertionError(f"{module} not in the -X importtime output")


def test_import_costs_little_beyond_torch():
    # The best of three: the machine's other load only ever adds time.
    best = min(_cumulative_seconds(_python("-X", "importtime", "-c", "import torch, pyclloss"),
                                   "pyclloss") for _ in range(3))
    assert best < BUDGET_S, f"import pyclloss took {best:.3f} s after torch (budget {BUDGET_S})"


def test_resolve_is_marked_constant_as_torch_compiler_marks():
    def marked_by_torch():
        pass

    def marked_here():
        pass

    torch.compiler.assume_constant_result(marked_by_torch)
    _constant_when_traced(marked_here)
    assert vars(marked_by_torch) == vars(marked_here) == vars(resolve)
