"""DCL, HCL and decoupled NT-Xent (pyclloss.pair_quality): forward+backward time
and peak extra memory of the fused backends, which run the InfoNCE core's
per-row statistics, against the dense reference; the ``dcl``, ``hcl`` and
``decoupled`` workloads of `pyclloss bench` (pyclloss/tools/workloads.py).

    python bench/bench_pair_quality.py --sizes 8192 --out bench/results/cpu-pair_quality.md

With ``--rounds R`` (R ≥ 1) it measures the speed-up on a shared machine
instead: R rounds, each running every (loss, implementation) cell of the
one size in its own process (`pyclloss bench --single`), fused and reference
alternating (the order flips every round), and reports per loss the median
over the rounds of the time ratio of neighbouring processes, with the load
average beside each cell; ``--out`` then writes the markdown and the raw
figures (.json):

    python bench/bench_pair_quality.py --rounds 5 --size 8192 --fused cpp \\
        --out bench/results/cpu-pair_quality.md
"""

import argparse
import json
import os
import statistics
import subprocess
import sys

from pyclloss.tools.benchmark import machine, main, publish

LOSSES = ("dcl", "hcl", "decoupled")


def _cell(loss: str, impl: str, n: int, dim: int) -> dict:
    """One cell in a fresh process, as `pyclloss bench` runs it; with the load average."""
    cmd = [sys.executable, "-m", "pyclloss.tools.benchmark", "--single", loss, impl, str(n),
           "--dim", str(dim)]
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="131072")  # as `pyclloss bench`
    with open("/proc/loadavg") as f:
        load = float(f.read().split()[0])
    out = subprocess.run(cmd, capture_output=True, text=True, check=True, env=env).stdout
    return {**json.loads(out.strip().splitlines()[-1]), "load_before": load}


def rounds(count: int, n: int, dim: int, fused: str) -> dict:
    raw = {loss: [] for loss in LOSSES}
    for r in range(count):
        for loss in LOSSES:
            order = (fused, "reference") if r % 2 == 0 else ("reference", fused)
            cells = {impl: _cell(loss, impl, n, dim) for impl in order}
            raw[loss].append(cells)
            print(f"round {r + 1} {loss}: " + ", ".join(
                f"{impl} {c['time_s'] * 1e3:,.0f} ms / {c['peak_bytes'] / 2**20:,.0f} MiB "
                f"(load {c['load_before']:.1f})" for impl, c in cells.items()), file=sys.stderr)
    return raw


def report(raw: dict, args) -> str:
    loads = [c["load_before"] for cells in raw.values() for r in cells for c in r.values()]
    lines = ["# DCL, HCL and decoupled NT-Xent: fused against the reference", "",
             f"- command: `python bench/bench_pair_quality.py {' '.join(args.argv)}`",
             f"- machine: {machine('cpu')}",
             f"- N = {args.size} rows ({args.size // 2} pairs), D = {args.dim}, fp32, "
             f"forward+backward; {args.rounds} rounds, each cell in its own process; "
             f"load average (1 min) before the cells: {min(loads):.1f} to {max(loads):.1f}",
             "", f"| loss | {args.fused} | reference | speed-up (median of the rounds' ratios) "
             f"| {args.fused} peak extra memory | reference peak extra memory |",
             "|---|---|---|---|---|---|"]
    for loss, cells in raw.items():
        fused = statistics.median(r[args.fused]["time_s"] for r in cells)
        ref = statistics.median(r["reference"]["time_s"] for r in cells)
        ratio = statistics.median(r["reference"]["time_s"] / r[args.fused]["time_s"]
                                  for r in cells)
        peak = max(r[args.fused]["peak_bytes"] for r in cells) / 2**20
        ref_peak = max(r["reference"]["peak_bytes"] for r in cells) / 2**20
        lines.append(f"| {loss} | {fused * 1e3:,.0f} ms | {ref * 1e3:,.0f} ms | {ratio:.1f}× "
                     f"| {peak:,.0f} MiB | {ref_peak:,.0f} MiB |")
    return "\n".join(lines)


def rounds_main(argv) -> int:
    p = argparse.ArgumentParser(description="interleaved rounds (module docstring)")
    p.add_argument("--rounds", type=int, required=True)
    p.add_argument("--size", type=int, default=8192)
    p.add_argument("--dim", type=int, default=128)
    p.add_argument("--fused", default="cpp", choices=("cpp", "triton", "cuda"))
    p.add_argument("--out")
    args = p.parse_args(argv)
    args.argv = argv
    if args.rounds < 1:
        p.error("--rounds must be >= 1")
    raw = rounds(args.rounds, args.size, args.dim, args.fused)
    text = report(raw, args)
    publish(text, args.out)
    if args.out:
        with open(os.path.splitext(args.out)[0] + ".json", "w") as f:
            json.dump(raw, f, indent=1)
    return 0


if __name__ == "__main__":
    if "--rounds" in sys.argv:
        raise SystemExit(rounds_main(sys.argv[1:]))
    raise SystemExit(main(["--losses", *LOSSES, *sys.argv[1:]]))
