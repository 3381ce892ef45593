"""pytest-benchmark micro benchmarks of the InfoNCE losses, forward+backward.

    python -m pytest bench/bench_info_nce.py --benchmark-only
"""

import pytest
import torch

import pyclloss

BACKENDS = [b for b in ("cpp", "reference") if pyclloss.backends()[b].available]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("n", [1024, 4096])
@pytest.mark.parametrize("loss", ["supcon", "nt_xent", "clip_loss"])
def test_fwd_bwd(benchmark, loss, n, backend):
    x = torch.randn(n, 128, requires_grad=True)
    y = torch.randn(n, 128, requires_grad=True)
    labels = torch.randint(0, n // 8, (n,))
    calls = {
        "supcon": lambda: pyclloss.supcon(x, labels, 0.1, backend=backend),
        "nt_xent": lambda: pyclloss.nt_xent(x, y, 0.5, backend=backend),
        "clip_loss": lambda: pyclloss.clip_loss(x, y, 10.0, backend=backend),
    }

    def step():
        x.grad = y.grad = None
        calls[loss]().backward()

    benchmark.pedantic(step, rounds=3, warmup_rounds=1)
