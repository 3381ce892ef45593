"""Effective rate of the InfoNCE losses against the machine's matmul, quiet and
with one core kept busy, optionally against another checkout ("before").

Each measurement runs in a fresh process that times, fp32 forward+backward,
nt_xent and supcon over N rows and clip over N/2 pairs (cpp and reference
backends), each step right after a square 4096³ matmul
(pyclloss.tools.benchmark.square_matmul, the faster of torch.mm and oneDNN's). The
effective rate is 8·N'²·D over the time (N' = rows or pairs: the count
without the symmetry of the self-similarity losses, so that all figures
compare); its ratio to the matmul's rate comes from each step and the matmul
just before it, so that a machine whose load changes affects both alike.
Processes alternate: for every round, every checkout, quiet and then with
one `while True: pass` process running beside it. The table gives medians
over the rounds and the load average the machine had.

    python bench/bench_info_nce.py --rounds 5 --baseline ../pyclloss-before \\
        --out bench/results/cpu-symmetric.md

With --out, the raw figures of every process go beside the table (.json).

--cpu-time measures on one thread by the process's CPU time instead: the
load of other processes then does not count, which gives the kernels'
efficiency on a shared machine (no busy-core runs then).

--baseline is a checkout of the code to compare with, its extension built in
place (python setup.py build_ext --inplace), and with this checkout's
pyclloss/tools/benchmark.py (the matmul timing) if it predates it. The reference
backend is measured in this checkout only.

The pytest-benchmark micro benchmarks below run with
    python -m pytest bench/bench_info_nce.py --benchmark-only
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

import pytest
import torch

import pyclloss
from pyclloss.tools.benchmark import effective_flops, publish, square_matmul
from pyclloss.tools.energy import cpu_model

LOSSES = ("nt_xent", "supcon", "clip")
HERE = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _calls(n, d, backend):
    """{loss: (leaves, closure, effective FLOPs)} at N rows (N/2 CLIP pairs)."""
    gen = torch.Generator().manual_seed(n)
    x = torch.randn(n, d, generator=gen, requires_grad=True)
    labels = torch.randint(0, max(2, n // 8), (n,), generator=gen)
    img = torch.randn(n // 2, d, generator=gen, requires_grad=True)
    txt = torch.randn(n // 2, d, generator=gen, requires_grad=True)
    b = n // 2
    return {
        "nt_xent": ([x], lambda: pyclloss.nt_xent(x[:b], x[b:], 0.5, backend=backend),
                    effective_flops(n, d)),
        "supcon": ([x], lambda: pyclloss.supcon(x, labels, 0.1, backend=backend),
                   effective_flops(n, d)),
        "clip": ([img, txt], lambda: pyclloss.clip_loss(img, txt, 1 / 0.07, backend=backend),
                 effective_flops(n // 2, d)),
    }


def measure(n, d, backends, repeats, clock=time.perf_counter):
    """One process's figures: {"loss backend": [seconds, ratio to the matmul],
    "matmul": [seconds, FLOP/s], "load": [before, after]}, medians of
    `repeats` (matmul, step of each backend) rounds after a warm-up one."""
    def _seconds(fn):
        t0 = clock()
        fn()
        return clock() - t0

    load = os.getloadavg()[0]
    matmul = square_matmul("cpu")
    matmul_work = 2.0 * 4096 ** 3
    out, matmul_times = {}, []
    calls = {backend: _calls(n, d, backend) for backend in backends}
    for loss in LOSSES:
        samples = {backend: [] for backend in backends}
        for repeat in range(repeats + 1):
            for backend in backends:
                leaves, call, flops = calls[backend][loss]
                for t in leaves:
                    t.grad = None
                matmul_seconds = _seconds(matmul)
                seconds = _seconds(lambda: call().backward())
                if repeat > 0:
                    matmul_times.append(matmul_seconds)
                    ratio = (flops / seconds) / (matmul_work / matmul_seconds)
                    samples[backend].append((seconds, ratio))
        for backend, pairs in samples.items():
            out[f"{loss} {backend}"] = [statistics.median(s for s, _ in pairs),
                                        statistics.median(r for _, r in pairs)]
    seconds = statistics.median(matmul_times)
    out["matmul"] = [seconds, matmul_work / seconds]
    out["load"] = [load, os.getloadavg()[0]]
    return out


def _run(tree, busy, args, backends):
    cmd = [sys.executable, os.path.abspath(__file__), "--single", "--n", str(args.n),
           "--dim", str(args.dim), "--repeats", str(args.repeats), "--backends", *backends]
    cmd += ["--cpu-time"] if args.cpu_time else []
    env = dict(os.environ, PYTHONPATH=tree)
    hog = subprocess.Popen([sys.executable, "-c", "while True: pass"]) if busy else None
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=tree, check=True)
    finally:
        if hog is not None:
            hog.kill()
            hog.wait()
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _quiet_table(rounds_of, keys):
    """Rows of medians over {checkout: [figures]} of quiet processes."""
    checkouts = list(rounds_of)

    def cell(checkout, key):
        rounds = rounds_of[checkout]
        if key not in rounds[0]:
            return "—"
        seconds = statistics.median(r[key][0] for r in rounds)
        return f"{seconds * 1e3:,.0f} ms = {statistics.median(r[key][1] for r in rounds):.2f}×"

    def speedup(key):
        if len(checkouts) < 2 or key not in rounds_of["before"][0]:
            return " — |" if len(checkouts) == 2 else ""
        before, after = ([r[key][0] for r in rounds_of[c]] for c in ("before", "after"))
        return f" {statistics.median(before) / statistics.median(after):.2f}× |"

    lines = ["| | " + " | ".join(checkouts) + (" | speed-up |" if len(checkouts) == 2 else " |"),
             "|---" * (len(checkouts) + 1 + (len(checkouts) == 2)) + "|"]
    rates = [statistics.median(r["matmul"][1] for r in rounds_of[c]) / 1e9 for c in checkouts]
    lines.append("| matmul 4096³ | " + " | ".join(f"{rate:,.0f} GFLOP/s" for rate in rates)
                 + (" | |" if len(checkouts) == 2 else " |"))
    for key in keys:
        lines.append(f"| {key} | " + " | ".join(cell(c, key) for c in checkouts) + " |"
                     + speedup(key))
    return lines


def report(args, runs):
    """Markdown from {(checkout, busy): [figures of each round]}."""
    def slowdown(checkout, key):
        pairs = zip(runs[(checkout, False)], runs[(checkout, True)])
        ratios = [busy[key][0] / calm[key][0] for calm, busy in pairs if key in calm]
        return f"{statistics.median(ratios):.2f}×" if ratios else "—"

    checkouts = [c for c in ("before", "after") if (c, False) in runs]
    keys = [f"{loss} {backend}" for backend in args.backends for loss in LOSSES]
    loads = [x for rounds in runs.values() for r in rounds for x in r["load"]]
    quiet = {c: runs[(c, False)] for c in checkouts}
    best = max(r["matmul"][1] for rounds in quiet.values() for r in rounds)
    idle = {c: [r for r in rounds if r["matmul"][1] >= 0.9 * best] for c, rounds in quiet.items()}
    lines = [
        "# InfoNCE losses on the CPU: effective rate against the matmul",
        "",
        f"- command: `python bench/bench_info_nce.py {' '.join(args.command)}`",
        f"- machine: {cpu_model()}, {os.cpu_count()} cores, "
        + ("1 thread, timed by the process's CPU time" if args.cpu_time
           else f"{torch.get_num_threads()} threads") + f"; torch {torch.__version__}",
        f"- N = {args.n} rows (clip: {args.n // 2} pairs), D = {args.dim}, fp32, forward+backward, "
        f"median of {args.repeats} per process, median over {args.rounds} rounds of alternating "
        f"processes; machine load average (1 min) during the runs: {min(loads):.1f} to "
        f"{max(loads):.1f}",
        "- time = ms, × = effective rate 8·N'²·D / time (N' = rows or pairs) over the rate of a "
        "square 4096³ fp32 matmul timed just before each step (the faster of torch.mm and "
        "oneDNN's)",
        "",
        "All quiet processes:",
        "",
        *_quiet_table(quiet, keys),
    ]
    if all(idle.values()) and any(len(idle[c]) < len(quiet[c]) for c in checkouts):
        counts = ", ".join(f"{c} {len(idle[c])} of {len(quiet[c])}" for c in checkouts)
        lines += ["", "Quiet processes whose matmul ran within 10% of the best of the run "
                  f"(the cores otherwise idle: {counts}):", "", *_quiet_table(idle, keys)]
    if any(busy for _, busy in runs):
        lines += ["", "With one core kept busy by another process: time busy / time quiet "
                  "(median over the rounds of the ratio of neighbouring processes).", "",
                  "| | " + " | ".join(checkouts) + " |", "|---" * (len(checkouts) + 1) + "|"]
        for key in ["matmul"] + keys:
            lines.append(f"| {key} | " + " | ".join(slowdown(c, key) for c in checkouts) + " |")
    return "\n".join(lines) + "\n"


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, default=8192)
    p.add_argument("--dim", type=int, default=128)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--backends", nargs="+", default=["cpp", "reference"],
                   choices=("cpp", "reference"))
    p.add_argument("--baseline", help="checkout to compare with (its extension built)")
    p.add_argument("--no-busy", action="store_true", help="skip the runs with a busy core")
    p.add_argument("--cpu-time", action="store_true",
                   help="one thread, timed by the process's CPU time (implies --no-busy)")
    p.add_argument("--out", help="also write the markdown table to this file")
    p.add_argument("--single", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.single:
        if args.cpu_time:
            torch.set_num_threads(1)
        clock = time.process_time if args.cpu_time else time.perf_counter
        print(json.dumps(measure(args.n, args.dim, args.backends, args.repeats, clock)))
        return 0
    args.command = sys.argv[1:] if argv is None else argv
    trees = {"after": HERE}
    if args.baseline:
        trees = {"before": os.path.abspath(args.baseline), **trees}
    runs = {}
    for round_ in range(args.rounds):
        for busy in (False,) if args.no_busy or args.cpu_time else (False, True):
            for name, tree in trees.items():
                # The reference is the same code in both checkouts: measured once.
                backends = args.backends if name == "after" else ["cpp"]
                figures = _run(tree, busy, args, backends)
                runs.setdefault((name, busy), []).append(figures)
                print(f"round {round_} {name} {'busy' if busy else 'quiet'}: "
                      + ", ".join(f"{k} {v[0] * 1e3:.0f} ms = {v[1]:.2f}×"
                                  for k, v in figures.items() if k not in ("load", "matmul"))
                      + f", matmul {figures['matmul'][1] / 1e9:.0f} GFLOP/s, load "
                      + "{:.1f}-{:.1f}".format(*figures["load"]), file=sys.stderr)
    table = report(args, runs)
    publish(table, args.out)
    if args.out:
        with open(os.path.splitext(args.out)[0] + ".json", "w") as f:  # the raw figures
            json.dump([{"checkout": name, "busy": busy, "rounds": rounds}
                       for (name, busy), rounds in runs.items()], f)
    return 0


# ------------------------------------------------------- pytest-benchmark


@pytest.mark.parametrize("backend", [b for b in ("cpp", "reference")
                                     if pyclloss.backends()[b].available])
@pytest.mark.parametrize("n", [1024, 4096])
@pytest.mark.parametrize("loss", LOSSES)
def test_fwd_bwd(benchmark, loss, n, backend):
    leaves, call, flops = _calls(n, 128, backend)[loss]

    def step():
        for t in leaves:
            t.grad = None
        call().backward()

    benchmark.extra_info["effective GFLOP/s"] = None
    benchmark.pedantic(step, rounds=3, warmup_rounds=1)
    benchmark.extra_info["effective GFLOP/s"] = flops / benchmark.stats.stats.median / 1e9


if __name__ == "__main__":
    raise SystemExit(main())
