"""CACR (pyclloss.cacr_loss) forward+backward: the fused C++ backend against the
reference, the ``cacr`` workload of `pyclloss bench` (two views of N rows).

Times are interleaved in one process (cpp, reference, cpp, ... for --rounds
rounds, after a warm-up call of each), so that both see the same machine load;
the speed-up is the median of the per-round ratios. Peak extra memory comes
from `pyclloss bench --single` (a fresh process per implementation).

    python bench/bench_cacr.py --n 4096 --dim 128 --out bench/results/cpu-cacr.md
"""

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time

import torch

from pyclloss.tools.benchmark import publish, step_fn
from pyclloss.tools.workloads import inputs

IMPLS = ("cpp", "reference")


def _cpu_model() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
        return next(line.split(":", 1)[1].strip() for line in out.splitlines()
                    if line.startswith("Model name"))
    except (OSError, StopIteration):
        return platform.processor() or "unknown"


def _peak_bytes(impl: str, n: int, dim: int) -> int:
    cmd = [sys.executable, "-m", "pyclloss.tools.benchmark", "--single", "cacr", impl, str(n),
           "--dim", str(dim), "--min-run-time", "0.01", "--min-blocks", "2"]
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="131072")  # the peak follows live buffers
    out = subprocess.run(cmd, capture_output=True, text=True, check=True, env=env).stdout
    return json.loads(out.strip().splitlines()[-1])["peak_bytes"]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n", type=int, default=4096, help="rows per view (default: %(default)s)")
    p.add_argument("--dim", type=int, default=128, help="D (default: %(default)s)")
    p.add_argument("--rounds", type=int, default=7, help="interleaved rounds (default: 7)")
    p.add_argument("--out", help="also write the markdown report here")
    args = p.parse_args(argv)

    load_before = os.getloadavg()
    a = inputs("cacr", args.n, args.dim, "cpu", torch.float32)
    steps = {impl: step_fn("cacr", impl, a) for impl in IMPLS}
    for step in steps.values():
        step()  # warm-up
    times = {impl: [] for impl in IMPLS}
    for _ in range(args.rounds):
        for impl, step in steps.items():
            start = time.perf_counter()
            step()
            times[impl].append(time.perf_counter() - start)
    load_after = os.getloadavg()
    peaks = {impl: _peak_bytes(impl, args.n, args.dim) for impl in IMPLS}
    ratios = [r / c for c, r in zip(times["cpp"], times["reference"])]

    lines = [
        f"# CACR on the CPU: fused C++ against the reference (N = {args.n}, D = {args.dim}, fp32)",
        "",
        f"Command: `python bench/bench_cacr.py --n {args.n} --dim {args.dim} "
        f"--rounds {args.rounds}`",
        "",
        f"- machine: {_cpu_model()}, {os.cpu_count()} cores, torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads",
        f"- load average (1 min) before / after the timings: {load_before[0]:.1f} / "
        f"{load_after[0]:.1f}",
        f"- workload `cacr`: `cacr_loss(z1, z2)`, two views of N = {args.n} rows (the "
        f"repulsion is {args.n}×{args.n}), forward+backward",
        f"- time: {args.rounds} interleaved rounds after a warm-up call; speed-up: median of "
        f"the per-round ratios; peak: extra resident memory over the inputs, fresh process",
        "",
        "| implementation | median time (s) | min / max (s) | peak extra memory (MiB) |",
        "|---|---|---|---|",
    ]
    for impl in IMPLS:
        t = times[impl]
        lines.append(f"| {impl} | {statistics.median(t):.3f} | {min(t):.3f} / {max(t):.3f} | "
                     f"{peaks[impl] / 2**20:.1f} |")
    lines += ["", f"Speed-up of cpp over the reference: {statistics.median(ratios):.2f}× "
                  f"(per-round ratios {min(ratios):.2f}–{max(ratios):.2f})."]
    if max(load_before[0], load_after[0]) > (os.cpu_count() or 1):
        lines += ["", "The load exceeded the core count: other processes shared the cores, so "
                      "absolute times vary from round to round; each round's ratio compares "
                      "the two implementations under the same load."]
    report = "\n".join(lines) + "\n"
    publish(report, args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
