"""AMCL on the CPU: forward+backward of ``pyclloss.amcl_loss`` with the C++
backend against the dense reference (both through the public function, input
checks included), on the benchmark's ``amcl`` workload (N = 2B rows, 3 heads,
top-100 negatives, the temperature network Linear(D, D) → ReLU → Linear(D, D)),
as a markdown table.

    python bench/bench_amcl.py --out bench/results/cpu-amcl.md

Peak memory: growth of the peak resident set over the inputs during one call,
in a fresh process per (implementation, N). Times: the implementations take
turns in one process, --repeats calls each after a warm-up; the table gives
the median wall time and the median CPU time of the process (all threads),
and their ratios. On a shared machine only ratios within one run mean
anything; the CPU time is the less sensitive to other processes.
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
from pyclloss.tools import workloads  # noqa: E402
from pyclloss.tools.benchmark import cpu_run_lines, peak_extra_bytes, publish  # noqa: E402

IMPLS = ("cpp", "reference")


def _step(impl, n, d):
    inputs = workloads.inputs("amcl", n, d, "cpu", torch.float32)
    loss = workloads.loss_call("amcl", impl, inputs)

    def step():
        for x in inputs.values():
            x.grad = None
        loss().backward()
    return step


def peak_memory(impl, n, d):
    """Peak resident-set growth over one call (run in a fresh process)."""
    _step(impl, 64, d)()  # one-time library set-up stays out of the peak
    return max(peak_extra_bytes(_step(impl, n, d)), 0)


def interleaved_times(n, d, repeats):
    """Median (wall, CPU) seconds of each implementation, taking turns."""
    steps = {impl: _step(impl, n, d) for impl in IMPLS}
    times = {impl: [] for impl in IMPLS}
    for step in steps.values():
        step()  # warm-up
    for _ in range(repeats):
        for impl, step in steps.items():
            wall, cpu = time.perf_counter(), time.process_time()
            step()
            times[impl].append((time.perf_counter() - wall, time.process_time() - cpu))
    return {impl: tuple(statistics.median(t[i] for t in runs) for i in (0, 1))
            for impl, runs in times.items()}


def main():
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", nargs="+", type=int, default=[2048, 4096], help="N = 2B rows")
    p.add_argument("--dim", type=int, default=128)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--threads", type=int, help="intra-op threads (default: torch's)")
    p.add_argument("--out")
    p.add_argument("--single", nargs=2, metavar=("IMPL", "N"), help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.single:
        impl, n = args.single
        print(peak_memory(impl, int(n), args.dim))
        return
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="131072")  # freed buffers leave the RSS
    lines = [
        "# AMCL: forward+backward on the CPU\n",
        *cpu_run_lines(),
        f"- versions: pyclloss {pyclloss.__version__}, torch {torch.__version__}",
        f"- command: `python bench/bench_amcl.py {' '.join(sys.argv[1:])}`",
        f"- D = {args.dim}, float32, {workloads.AMCL_HEADS} heads, top-{workloads.AMCL_TOPK} "
        f"negatives; medians of {args.repeats} interleaved calls after a warm-up",
        "\nEach cell: wall time / CPU time (all threads) / peak extra memory.\n",
        "| N | cpp | reference | reference / cpp, wall | reference / cpp, CPU |",
        "|---|---|---|---|---|",
    ]
    for n in args.sizes:
        peaks = {}
        for impl in IMPLS:
            cmd = [sys.executable, __file__, "--single", impl, str(n), "--dim", str(args.dim),
                   "--threads", str(torch.get_num_threads())]
            out = subprocess.run(cmd, capture_output=True, text=True, env=env, check=True)
            peaks[impl] = int(out.stdout.strip().splitlines()[-1])
        times = interleaved_times(n, args.dim, args.repeats)
        cells = [f"{times[i][0] * 1e3:,.0f} ms / {times[i][1] * 1e3:,.0f} ms / "
                 f"{peaks[i] / 2**20:,.0f} MiB" for i in IMPLS]
        ratios = [f"{times['reference'][k] / times['cpp'][k]:.1f}×" for k in (0, 1)]
        print(f"N={n}: {cells} {ratios}", file=sys.stderr, flush=True)
        lines.append(f"| {n} | " + " | ".join(cells + ratios) + " |")
    lines.append(f"\n1-minute load average at the end: {os.getloadavg()[0]:.1f}")
    table = "\n".join(lines) + "\n"
    publish(table, args.out)


if __name__ == "__main__":
    main()
