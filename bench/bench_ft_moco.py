"""Feature-transformation MoCo loss on the CPU: forward+backward time and peak
extra memory, as a markdown table.

* loss: ``pyclloss.ft_moco_loss`` with the C++ backend against the dense
  reference (both through the public function, input checks included);
* design: the negatives' log-sum-exp alone (q̂ and the queue given), three
  ways of feeding the interpolated queue Q̂ to the InfoNCE core: built once by
  the C++ op and kept for the backward (what the C++ backend does), rebuilt
  in the backward instead of kept (the cost of a Q̂-on-the-fly design on the
  CPU, where the core lays its key operand out on every call), and built by
  torch ops.

    python bench/bench_ft_moco.py --out bench/results/cpu-ft_moco.md

Peak memory: growth of the peak resident set over the inputs during one call,
in a fresh process per (implementation, K) (VmHWM, reset through
/proc/self/clear_refs). Times: medians of --repeats calls after a warm-up,
the implementations of a table taking turns in one process; only ratios
within one run mean anything on a shared machine.
"""

import argparse
import os
import statistics
import subprocess
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import pyclloss  # noqa: E402
import pyclloss._C  # noqa: E402,F401  (registers torch.ops.pyclloss_C)
from pyclloss.tools.benchmark import cpu_run_lines, peak_extra_bytes, publish  # noqa: E402
from pyclloss.ops import ft_moco as ops  # noqa: E402
from pyclloss.ops import info_nce as core  # noqa: E402
from pyclloss.reference import ft_moco as ref  # noqa: E402

LOSS_IMPLS = ("cpp", "reference")
DESIGNS = ("kept", "rebuilt", "torch")


class _RebuiltQueue(torch.autograd.Function):
    """neg_lse with Q̂ built by the C++ op in the forward and again in the backward."""

    @staticmethod
    def forward(ctx, q_hat, queue, own_weight, partner_weight, perm, scale):
        weights = (own_weight, partner_weight)
        mixed = torch.ops.pyclloss_C.ft_moco_interpolate_queue(queue, *weights, perm)
        lse = torch.ops.pyclloss_C.infonce_fwd(q_hat, mixed, scale, None, None, None, False,
                                               False)[0]
        ctx.save_for_backward(q_hat, queue, *weights, perm, scale, lse)
        return lse

    @staticmethod
    def backward(ctx, grad):
        q_hat, queue, own_weight, partner_weight, perm, scale, lse = ctx.saved_tensors
        mixed = torch.ops.pyclloss_C.ft_moco_interpolate_queue(queue, own_weight, partner_weight,
                                                               perm)
        dq, _, dscale = torch.ops.pyclloss_C.infonce_bwd(
            q_hat, mixed, scale, None, None, None, False, lse, grad.contiguous(), None, None,
            None, None, False)
        return dq, None, None, None, None, dscale


def _negatives(design, q_hat, queue, weights, perm, scale):
    if design == "kept":
        return ops.negatives_lse(q_hat, queue, *weights, perm, scale, "cpp")
    if design == "rebuilt":
        return _RebuiltQueue.apply(q_hat, queue, *weights, perm, scale)
    mixed = ref.ft_moco_interpolate_queue(queue, *weights, perm)
    return core.infonce_fwd(q_hat, mixed, scale, None, None, None, False, False, "cpp")[0]


def _step(impl, n, size, d):
    gen = torch.Generator().manual_seed(size)
    q = torch.randn(n, d, generator=gen).requires_grad_()
    k = torch.randn(n, d, generator=gen)
    queue = torch.nn.functional.normalize(torch.randn(size, d, generator=gen), dim=1)
    perm = torch.randperm(size, generator=gen)
    weights = ops.interpolation_weights(queue, torch.tensor(0.3), perm, normalize=True)
    scale = torch.tensor(5.0, requires_grad=True)

    def step():
        q.grad = scale.grad = None
        if impl in LOSS_IMPLS:
            loss = pyclloss.ft_moco_loss(q, k, queue, 1.4, 0.3, perm, 0.2, backend=impl)
        else:
            loss = _negatives(impl, q, queue, weights, perm, scale).sum()
        loss.backward()

    return step


def peak_memory(impl, n, size, d):
    """Peak resident-set growth over one call (run in a fresh process)."""
    _step(impl, 64, 64, d)()  # one-time library set-up stays out of the peak
    return max(peak_extra_bytes(_step(impl, n, size, d)), 0)


def interleaved_times(impls, n, size, d, repeats):
    """Median time of each implementation; the implementations take turns, so
    load from other processes hits them alike."""
    steps = {impl: _step(impl, n, size, d) for impl in impls}
    times = {impl: [] for impl in impls}
    for step in steps.values():
        step()  # warm-up
    for _ in range(repeats):
        for impl, step in steps.items():
            start = time.perf_counter()
            step()
            times[impl].append(time.perf_counter() - start)
    return {impl: statistics.median(t) for impl, t in times.items()}


def _table(args, impls, base, title, env):
    lines = [f"\n## {title}\n", "| K | " + " | ".join(impls) + " | "
             + " | ".join(f"{i} / {base}" for i in impls if i != base) + " |",
             "|---" * (2 * len(impls)) + "|"]
    for size in args.queue_sizes:
        peaks = {}
        for impl in impls:
            cmd = [sys.executable, __file__, "--single", impl, str(size), "--n", str(args.n),
                   "--dim", str(args.dim)]
            out = subprocess.run(cmd, capture_output=True, text=True, env=env, check=True)
            peaks[impl] = int(out.stdout.strip().splitlines()[-1])
        times = interleaved_times(impls, args.n, size, args.dim, args.repeats)
        cells = [f"{times[i] * 1e3:,.0f} ms / {peaks[i] / 2**20:,.0f} MiB" for i in impls]
        ratios = [f"{times[i] / times[base]:.2f}×" for i in impls if i != base]
        print(f"K={size}: {cells}", file=sys.stderr, flush=True)
        lines.append(f"| {size} | " + " | ".join(cells) + " | " + " | ".join(ratios) + " |")
    return lines


def main():
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, default=256, help="batch size N")
    p.add_argument("--queue-sizes", nargs="+", type=int, default=[4096, 16384, 65536])
    p.add_argument("--dim", type=int, default=128)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--out")
    p.add_argument("--single", nargs=2, metavar=("IMPL", "K"), help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.single:
        impl, size = args.single
        print(peak_memory(impl, args.n, int(size), args.dim))
        return
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="131072")  # freed buffers leave the RSS
    lines = [
        "# Feature-transformation MoCo loss: forward+backward on the CPU\n",
        *cpu_run_lines(),
        f"- versions: pyclloss {pyclloss.__version__}, torch {torch.__version__}",
        f"- command: `python bench/bench_ft_moco.py {' '.join(sys.argv[1:])}`",
        f"- N = {args.n}, D = {args.dim}, float32, scalar λ_p and λ_n; median of "
        f"{args.repeats} interleaved calls after a warm-up",
        "\nEach cell: time / peak extra memory.",
    ]
    lines += _table(args, LOSS_IMPLS, "cpp", "loss: ft_moco_loss, C++ backend and reference", env)
    lines += _table(args, DESIGNS, "kept", "design: negatives' LSE, how Q̂ reaches the core", env)
    table = "\n".join(lines) + "\n"
    publish(table, args.out)


if __name__ == "__main__":
    main()
