"""SupReMix and Rank-N-Contrast: time of forward + backward and peak memory of
the fused backend against the reference formulas, written as a markdown table
to bench/results/<device>-mixup.md.

    python bench/bench_mixup.py                       # CPU, the C++ kernels
    python bench/bench_mixup.py --device cuda         # GPU, Triton

Inputs: D = 128 float32 features; SupReMix with integer labels in [0, 64)
(ages), gap 5, λ ~ Beta(2, 8); RnC with integer labels in [0, 100) (many tie
groups). Timings are medians (and minima, the least disturbed by other
processes) over interleaved repeats after a warm-up of the fused backend (the reference, plain PyTorch, is timed from its first call and
repeated at most --reference-repeats times, and not once its calls took a
minute: RnC's O(n³) mask form takes minutes at n = 2048 on two cores); only
ratios within one run mean anything.
Peak memory: as bench_sorting (RSS growth in a fresh process on the CPU).
"""

import argparse
import json
import os
import platform
import statistics
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench_sorting import (child_memory, fmt_mb, fmt_ms, machine_name, measure_memory,
                           time_once)

import pyclloss
from pyclloss.backends import resolve
from pyclloss.ops import rnc as rnc_ops
from pyclloss.ops import supremix as supremix_ops

DIM = 128
SUPREMIX_SIZES = (128, 256, 512)
RNC_SIZES = (512, 1024, 2048)
# The reference's n×n×n tensors: SupReMix keeps about ten of them alive.
SUPREMIX_REFERENCE_MAX_N = 256
OPS = {"supremix": supremix_ops, "rnc": rnc_ops}


def make_step(loss, n, impl, device):
    """One forward + backward; returns the loss value."""
    g = torch.Generator().manual_seed(n)
    x = torch.randn(n, DIM, generator=g).to(device)
    if loss == "supremix":
        t = torch.randint(0, 64, (n,), generator=g).float().to(device)
        with torch.random.fork_rng(devices=[]):  # the same λ for every implementation
            torch.manual_seed(n)
            lam = torch.distributions.Beta(2.0, 8.0).sample((n, n)).to(device)

        def forward(z):
            return pyclloss.supremix_loss(z, t, lam, backend=impl)
    else:
        y = torch.randint(0, 100, (n,), generator=g).float().to(device)

        def forward(v):
            return pyclloss.rnc_loss(v, y, backend=impl)

    def step():
        leaf = x.detach().requires_grad_(True)
        value = forward(leaf)
        value.backward()
        return value.item()
    return step


def run_case(loss, n, args, log):
    fused = resolve("auto", torch.device(args.device), OPS[loss].KERNELS.backends)
    impls = [fused]
    if loss == "rnc" or n <= SUPREMIX_REFERENCE_MAX_N:
        impls.append("reference")
    steps = {impl: make_step(loss, n, impl, args.device) for impl in impls}
    values = {fused: steps[fused]()}  # warm-up
    peaks = {}
    for impl in impls:
        big_reference = impl == "reference" and loss == "rnc" and n > args.reference_memory_max_n
        if args.device == "cuda":
            peaks[impl] = measure_memory(steps[impl], "cuda")
        elif not big_reference:
            peaks[impl] = child_memory(loss, n, impl, impl != "reference", script=__file__)
    times = {impl: [] for impl in impls}
    for r in range(args.repeats):
        for impl in impls:
            if impl == "reference" and (r >= args.reference_repeats or sum(times[impl]) > 60):
                continue
            seconds = time_once(lambda impl=impl: values.__setitem__(impl, steps[impl]()),
                                args.device)
            times[impl].append(seconds)
            log(f"{loss} n={n} {impl}: {seconds * 1e3:.1f} ms")
    stats = {impl: (statistics.median(ts), min(ts)) for impl, ts in times.items()}
    return fused, stats, peaks, values


def header(args, command):
    lines = [f"# SupReMix and Rank-N-Contrast: fused vs reference ({args.device.upper()})", ""]
    lines.append(f"- Machine: {machine_name(args.device)}")
    if args.device == "cpu":
        lines.append(f"- CPU cores: {os.cpu_count()}, torch threads: {torch.get_num_threads()}, "
                     f"1-minute load average at start: {os.getloadavg()[0]:.1f}")
        lines.append("- Peak memory: RSS growth over one call, in a fresh process per "
                     "implementation with MALLOC_MMAP_THRESHOLD_=4096")
    lines.append(f"- Versions: python {platform.python_version()}, torch {torch.__version__}, "
                 f"pyclloss {pyclloss.__version__}")
    lines.append(f"- Command: `{command}`")
    lines.append(f"- Forward + backward, float32, D = {DIM}; repeats: {args.repeats} "
                 f"(reference: at most {args.reference_repeats})")
    lines.append("")
    return lines


def table(rows):
    columns = ["loss", "n", "fused backend", "fused ms (median / min)", "fused MiB",
               "reference ms (median / min)", "reference MiB", "speed-up (median / min)",
               "\\|loss fused − reference\\|"]
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for loss, n, fused, stats, peaks, values in rows:
        ref = stats.get("reference")
        cells = [loss, str(n), fused, " / ".join(fmt_ms(x) for x in stats[fused]),
                 fmt_mb(peaks[fused]) if fused in peaks else "—",
                 " / ".join(fmt_ms(x) for x in ref) if ref else "—",
                 fmt_mb(peaks["reference"]) if "reference" in peaks else "—",
                 " / ".join(f"{r / f:.1f}x" for r, f in zip(ref, stats[fused])) if ref else "—",
                 f"{abs(values[fused] - values['reference']):.1e}" if "reference" in values
                 else "—"]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--reference-repeats", type=int, default=3)
    parser.add_argument("--reference-memory-max-n", type=int, default=1024,
                        help="RnC reference memory is measured up to this n (a call at 2048 "
                             "takes minutes)")
    parser.add_argument("--supremix-sizes", type=int, nargs="*", default=list(SUPREMIX_SIZES))
    parser.add_argument("--rnc-sizes", type=int, nargs="*", default=list(RNC_SIZES))
    parser.add_argument("--out", default=None, help="default: bench/results/<device>-mixup.md")
    parser.add_argument("--child", help=argparse.SUPPRESS)  # one CPU memory measurement
    args = parser.parse_args()

    if args.child:
        loss, n, impl, warm_up = json.loads(args.child)
        step = make_step(loss, n, impl, "cpu")
        if warm_up:
            step()
        print(measure_memory(step, "cpu"))
        return

    def log(msg):
        print(msg, file=sys.stderr, flush=True)

    command = "python bench/bench_mixup.py " + " ".join(sys.argv[1:])
    lines = header(args, command.strip())
    rows = [("supremix", n, *run_case("supremix", n, args, log)) for n in args.supremix_sizes]
    rows += [("rnc", n, *run_case("rnc", n, args, log)) for n in args.rnc_sizes]
    lines += table(rows)
    note = (f"RnC reference memory is measured up to n = {args.reference_memory_max_n} (a "
            "call at n = 2048 takes minutes); its peak is bounded by the (anchors, j, k) "
            "tensors of one anchor block, 2^23 elements each (the mask, the masked "
            "similarities, their exponentials), plus O(n²). SupReMix's reference "
            f"runs up to n = {SUPREMIX_REFERENCE_MAX_N} (n×n×n tensors).")
    lines += ["", note, ""]
    out = args.out or os.path.join(os.path.dirname(os.path.abspath(__file__)), "results",
                                   f"{args.device}-mixup.md")
    with open(out, "w") as f:
        f.write("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
