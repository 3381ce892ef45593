"""The benchmark report: forward+backward time and peak extra memory against N,
for every backend here and the peer implementations that are installed, as a
markdown table and a PNG plot.

The losses, their inputs and their peers are the workloads of
``pyclloss.tools.workloads``: by default supcon (pytorch-metric-learning),
nt_xent (pytorch-metric-learning, lightly), clip (open_clip, Inf-CL on CUDA),
siglip (open_clip), diff_sort (diffsort) and gated; supremix, rnc and
ft_moco against their references on request (``--losses``), each at its own
sizes unless ``--sizes`` is given.

Each (loss, implementation, N) runs in a fresh subprocess, so that peak memory
is that run's alone: on the CPU it is the growth of the process's peak resident
set (VmHWM, reset through /proc/self/clear_refs) over the resident set with
the inputs in place; on CUDA, ``torch.cuda.max_memory_allocated`` over the
inputs. Times come from ``torch.utils.benchmark``'s blocked autorange (it warms
up, sizes blocks of calls so that the timer's overhead is negligible, and
synchronises the GPU), run for at least ``--min-run-time`` seconds and about
``--min-blocks`` blocks: the report gives the median time per call over the blocks
and their interquartile range (IQR), and the speed-up of pyclloss's fastest fused
backend over the best peer and over its own reference. For the InfoNCE losses
the report adds the fused backend's effective rate, 8·N²·D FLOPs (forward with
recomputing backward, without the symmetry that the self-similarity losses
exploit, so that all figures compare) over its time, against a square 4096³
fp32 matmul timed in the same process (the faster of torch.mm and, on the CPU,
oneDNN's).

    pyclloss bench --sizes 1024 4096 16384 --out bench/results/cpu-report.md   # + .png
"""

import argparse
import datetime
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import time
from typing import Callable, Dict, List, Optional

from . import _arguments as arguments
from . import peers
from .workloads import DEFAULT_SIZES, PEERS, WORKLOADS, estimated_bytes, inputs, loss_call

LOSSES = tuple(WORKLOADS)
DEFAULT_LOSSES = [name for name, workload in WORKLOADS.items() if workload.in_default_run]
BACKEND_IMPLS = ("cuda", "cpp", "triton", "reference")
FUSED_IMPLS = ("cuda", "cpp", "triton")
IMPLS = BACKEND_IMPLS + tuple(PEERS)
GIB = 1024 ** 3


def step_fn(loss: str, impl: str, args: Dict) -> Callable[[], None]:
    """One forward+backward of ``loss`` with ``impl``."""
    call = loss_call(loss, impl, args)
    leaves = [t for t in args.values() if t.requires_grad]

    def step():
        for t in leaves:
            t.grad = None
        call().backward()

    return step


def publish(report: str, out: Optional[str] = None) -> None:
    """Prints a report and, when ``out`` is given, writes it there (the folder
    made if needed)."""
    print(report)
    if out:
        os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
        with open(out, "w") as f:
            f.write(report if report.endswith("\n") else report + "\n")


def rss_bytes(field: str) -> int:
    """A memory field of /proc/self/status (VmRSS, VmHWM), in bytes."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"{field} not in /proc/self/status")


def peak_extra_bytes(fn: Callable[[], object], device="cpu") -> int:
    """Peak memory growth over one call of ``fn``: on a CUDA device the
    allocator's peak over what is allocated now; on the CPU the peak resident
    set (VmHWM, reset through /proc/self/clear_refs) over the resident set now."""
    import torch

    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        fn()
        torch.cuda.synchronize(device)
        return torch.cuda.max_memory_allocated(device) - base
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # VmHWM := VmRSS
    base = rss_bytes("VmRSS")
    fn()
    return rss_bytes("VmHWM") - base


def blocked_timing(step: Callable[[], None], min_run_time: float, min_blocks: int) -> Dict:
    """The median time per call of ``step`` over blocks of calls, and the
    interquartile range, from torch.utils.benchmark's blocked autorange, which
    warms up, sizes the blocks so that the timer's overhead is negligible and
    synchronises the GPU. Slow calls run one per block: the run is made long
    enough for ``min_blocks`` of them, and topped up when a slower call ended it
    early. The threads are torch's current ones."""
    import torch
    from torch.utils import benchmark as torch_benchmark

    timer = torch_benchmark.Timer(stmt="step()", globals={"step": step},
                                  num_threads=torch.get_num_threads())
    measurements = [timer.blocked_autorange(min_run_time=min_run_time)]
    blocks = len(measurements[0].times)
    while blocks < min_blocks:
        last = measurements[-1]
        more = timer.blocked_autorange(
            min_run_time=(min_blocks - blocks) * last.median * last.number_per_run)
        measurements.append(more)
        blocks += len(more.times)
    (merged,) = torch_benchmark.Measurement.merge(measurements)
    return {"time_s": merged.median, "iqr_s": merged.iqr, "blocks": blocks,
            "calls_per_block": measurements[0].number_per_run}


def effective_flops(n: int, d: int) -> float:
    """FLOPs credited to one forward+backward of an InfoNCE loss over N rows (or
    N pairs) of D features: 8·N²·D."""
    return 8.0 * n * n * d


def _seconds(call: Callable[[], object], sync: Callable[[], None]) -> float:
    sync()
    t0 = time.perf_counter()
    call()
    sync()
    return time.perf_counter() - t0


def square_matmul(device: str = "cpu", size: int = 4096) -> Callable[[], object]:
    """A square fp32 matmul of ``size`` (2·size³ FLOPs): the faster here of
    torch.mm and, on the CPU, oneDNN's (torch's MKL sgemm runs far below the
    peak of some CPUs)."""
    import torch

    a = torch.randn(size, size, device=device)
    b = torch.randn(size, size, device=device)
    calls = [lambda: torch.mm(a, b)]
    if device == "cpu" and torch.backends.mkldnn.is_available():
        a_onednn, b_t_onednn = a.to_mkldnn(), b.t().contiguous().to_mkldnn()
        calls.append(lambda: torch._C._nn.mkldnn_linear(a_onednn, b_t_onednn, None))
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    for call in calls:
        call()  # warm-up
    return min(calls, key=lambda call: _seconds(call, sync))


def matmul_flops(device: str = "cpu", size: int = 4096, repeats: int = 3) -> float:
    """FLOP/s of square_matmul, median of ``repeats``."""
    import torch

    call = square_matmul(device, size)
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    return 2.0 * size ** 3 / statistics.median(_seconds(call, sync) for _ in range(repeats))


def measure_one(loss: str, impl: str, n: int, d: int, device: str, dtype_name: str,
                min_run_time: float, min_blocks: int) -> Dict:
    """Time and peak extra memory of one configuration, in this process."""
    import torch

    dtype = getattr(torch, dtype_name)
    # One-time library set-up (thread pools, JIT-compiled GEMM kernels) is not
    # memory of the loss: a tiny call first keeps it out of the peak.
    step_fn(loss, impl, inputs(loss, 64, d, device, dtype))()
    step = step_fn(loss, impl, inputs(loss, n, d, device, dtype))
    start = time.perf_counter()
    peak = peak_extra_bytes(step, device)
    once = time.perf_counter() - start
    # a run long enough for min_blocks blocks of one call, as far as one call tells
    timing = blocked_timing(step, max(min_run_time, min_blocks * once), min_blocks)
    result = {**timing, "peak_bytes": max(peak, 0)}
    if WORKLOADS[loss].rated:
        result["matmul_flops"] = matmul_flops(device)
    return result


def _run_isolated(args, loss, impl, n) -> Dict:
    cmd = [sys.executable, "-m", "pyclloss.tools.benchmark", "--single", loss, impl, str(n),
           "--dim", str(args.dim), "--device", args.device, "--dtype", args.dtype,
           "--min-run-time", str(args.min_run_time), "--min-blocks", str(args.min_blocks)]
    # A fixed mmap threshold makes glibc return every large buffer to the OS on
    # free, so the peak resident set follows the live allocations.
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="131072")
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=args.timeout, env=env)
    if proc.returncode != 0:
        tail = (proc.stderr.strip().splitlines() or ["failed"])[-1]
        return {"error": "out of memory" if "memory" in tail.lower() else tail[:80]}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _backends_here(device: str, loss: str) -> List[str]:
    """The backends with kernels for ``loss``'s family that run on ``device`` here."""
    import torch

    import pyclloss
    from pyclloss.backends import families, resolve

    family = families()[WORKLOADS[loss].family]
    here = []
    for name, (ok, _) in pyclloss.backends().items():
        try:
            if ok and resolve(name, torch.device(device), family.backends) == name:
                here.append(name)
        except ValueError:
            pass
    return [name for name in BACKEND_IMPLS if name in here]


def _peers_here(device: str) -> Dict[str, str]:
    """{peer: "" if it runs here, else why not}."""
    status = {}
    for name, peer in PEERS.items():
        if peer.cuda_only and device != "cuda":
            status[name] = "runs on CUDA only"
            continue
        try:
            peer.load()
            status[name] = ""
        except peers.PeerUnavailable as exc:
            status[name] = str(exc)
    return status


def machine(device: str) -> str:
    import torch

    from pyclloss.tools.energy import cpu_model

    if device == "cuda":
        return f"GPU {torch.cuda.get_device_name()}"
    return f"CPU {cpu_model()}, {os.cpu_count()} cores, {torch.get_num_threads()} threads"


def cpu_run_lines() -> List[str]:
    """The machine, the load at the start and the date, for a CPU report's head."""
    return [f"- machine: {machine('cpu')}; 1-minute load average "
            f"{os.getloadavg()[0]:.1f} at the start",
            f"- date: {datetime.date.today().isoformat()}"]


def _blocks_range(results: Dict) -> str:
    blocks = [r["blocks"] for by_impl in results.values() for by_n in by_impl.values()
              for r in by_n.values() if "blocks" in r]
    return f"{min(blocks)}–{max(blocks)}" if blocks else "no"


def _header(args, measured: Dict) -> str:
    import torch

    import pyclloss

    cmd = "pyclloss bench " + " ".join(sys.argv[1:] if args.command is None else args.command)
    missing = "; ".join(f"{name}: {why}" for name, why in measured["peers"].items() if why)
    return (f"# pyclloss benchmark: forward+backward\n\n"
            f"- machine: {machine(args.device)}\n"
            f"- date: {datetime.date.today().isoformat()}\n"
            f"- versions: pyclloss {pyclloss.__version__}, torch {torch.__version__}, "
            f"python {platform.python_version()}\n"
            f"- command: `{cmd.strip()}`\n"
            f"- D = {args.dim}, {args.dtype}{_notes(measured['results'])}\n"
            f"- time: median per call over blocks of calls (torch.utils.benchmark blocked "
            f"autorange, at least {args.min_run_time:g} s and about {args.min_blocks} blocks per "
            f"cell; {_blocks_range(measured['results'])} blocks), with the interquartile range "
            f"of the blocks (IQR)\n"
            f"- peak: extra memory over the inputs after a tiny warm-up call (fresh process per "
            f"cell)\n"
            + (f"- peers not measured: {missing}\n" if missing else ""))


def _notes(results: Dict) -> str:
    """The inputs of the losses measured whose shape is not (N, D)."""
    notes = [f"{loss}: {WORKLOADS[loss].note}" for loss in results if WORKLOADS[loss].note]
    return "".join(f"; {note}" for note in notes)


def _ms(seconds: float) -> str:
    """Milliseconds to three significant digits, without an exponent."""
    ms = seconds * 1e3
    decimals = max(0, 2 - math.floor(math.log10(ms))) if ms > 0 else 0
    return f"{ms:,.{decimals}f}"


def _cell(result: Optional[Dict]) -> str:
    if result is None:
        return "—"
    if "error" in result:
        return result["error"]
    return (f"{_ms(result['time_s'])} ms (IQR {_ms(result['iqr_s'])}) / "
            f"{result['peak_bytes'] / 2**20:,.0f} MiB")


def _fastest(row: Dict[str, Optional[Dict]], impls) -> Optional[str]:
    """The fastest of ``impls`` that ran in this row, or None."""
    timed = [i for i in impls if row.get(i) and "time_s" in row[i]]
    return min(timed, key=lambda i: row[i]["time_s"]) if timed else None


def _speedups(row: Dict[str, Optional[Dict]], peers: List[str]) -> List[str]:
    """pyclloss's fastest fused backend against the best peer (named) and against
    the reference; "—" where either side did not run."""
    fused = _fastest(row, FUSED_IMPLS)
    peer = _fastest(row, peers)
    reference = _fastest(row, ("reference",))
    if fused is None:
        return ["—", "—"]
    time_s = row[fused]["time_s"]
    return [f"{row[peer]['time_s'] / time_s:.1f}× {peer}" if peer else "—",
            f"{row[reference]['time_s'] / time_s:.1f}×" if reference else "—"]


def _rate(row: Dict[str, Optional[Dict]], n: int, d: int) -> str:
    """The fastest fused backend's effective rate against its process's matmul."""
    fused = _fastest(row, FUSED_IMPLS)
    if fused is None or "matmul_flops" not in row[fused]:
        return "—"
    result = row[fused]
    rate = effective_flops(n, d) / result["time_s"]
    return (f"{rate / 1e9:,.0f} GFLOP/s = {rate / result['matmul_flops']:.2f}× "
            f"({result['matmul_flops'] / 1e9:,.0f})")


def measure_all(args) -> Dict:
    """{loss: {impl: {N: result}}} for the implementations that run here."""
    peer_status = _peers_here(args.device)
    budget = args.memory_gib * GIB
    results = {}
    for loss in args.losses:
        impls = _backends_here(args.device, loss) + [p for p in WORKLOADS[loss].peers
                                                      if not peer_status[p]]
        impls = [impl for impl in impls if not args.impls or impl in args.impls]
        results[loss] = {impl: {} for impl in impls}
        for n in args.sizes or WORKLOADS[loss].sizes:
            for impl in impls:
                estimate = estimated_bytes(loss, impl, n, args.dim)
                if estimate > budget:
                    result = {"error": f"skipped: needs ~{estimate / GIB:,.0f} GiB"}
                else:
                    result = _run_isolated(args, loss, impl, n)
                results[loss][impl][n] = result
                print(f"{loss} N={n} {impl}: {_cell(result)}", file=sys.stderr, flush=True)
    return {"peers": peer_status, "results": results}


def markdown(args, measured: Dict, plot_line: Optional[str]) -> str:
    """The report; ``plot_line`` is the plot's image link, or why there is none."""
    lines = [_header(args, measured),
             "Each cell: median time (IQR) / peak extra memory. Speed-up: pyclloss's fastest "
             "fused backend against the fastest peer and against its own reference, same run.\n"]
    if plot_line:
        lines.append(plot_line + "\n")
    for loss, by_impl in measured["results"].items():
        impls = list(by_impl)
        peers = [i for i in impls if i not in BACKEND_IMPLS]
        rated = any("matmul_flops" in r for by_n in by_impl.values() for r in by_n.values())
        lines.append(f"\n## {loss}\n")
        lines.append("| N | " + " | ".join(impls) + " | speed-up vs best peer | vs reference |"
                     + (" fused rate = × matmul (matmul GFLOP/s) |" if rated else ""))
        lines.append("|---" * (len(impls) + 3 + rated) + "|")
        for n in sorted({n for by_n in by_impl.values() for n in by_n}):
            row = {impl: by_impl[impl].get(n) for impl in impls}
            lines.append(f"| {n} | " + " | ".join(_cell(row[i]) for i in impls) + " | "
                         + " | ".join(_speedups(row, peers)) + " |"
                         + (f" {_rate(row, n, args.dim)} |" if rated else ""))
    return "\n".join(lines) + "\n"


def pyplot():
    """matplotlib's pyplot on a file backend, or None when matplotlib is missing."""
    try:
        import matplotlib
    except ImportError:
        return None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


NO_MATPLOTLIB = "matplotlib is not installed (pip install matplotlib)"
# One colour per implementation in every panel; pyclloss's solid, the peers' dashed.
COLORS = {"cuda": "tab:green", "cpp": "tab:blue", "triton": "tab:purple",
          "reference": "tab:gray", **{name: peer.color for name, peer in PEERS.items()}}


def _panel(time_ax, memory_ax, by_impl: Dict[str, Dict]) -> List[str]:
    """One loss's curves, and a cross at the foot of the N axis for each cell that
    did not run (one row of crosses per implementation). Returns those cells'
    reasons."""
    skipped = []
    for impl, by_n in by_impl.items():
        style = dict(color=COLORS[impl], label=impl,
                     linestyle="-" if impl in BACKEND_IMPLS else "--")
        ok = sorted((n, r) for n, r in by_n.items() if "time_s" in r)
        if ok:
            ns = [n for n, _ in ok]
            time_ax.plot(ns, [r["time_s"] * 1e3 for _, r in ok], marker="o", ms=4, **style)
            memory_ax.plot(ns, [max(r["peak_bytes"], 2**20) / 2**20 for _, r in ok],
                           marker="o", ms=4, **style)
        failed = sorted(n for n, r in by_n.items() if "error" in r)
        if failed:
            height = 0.04 + 0.06 * len({line.split()[0] for line in skipped})
            for ax in (time_ax, memory_ax):
                ax.plot(failed, [height] * len(failed), "x", color=COLORS[impl], ms=7, mew=2,
                        label=impl, transform=ax.get_xaxis_transform(), clip_on=False)
            skipped += [f"{impl} N={n}: {by_n[n]['error']}" for n in failed]
    return skipped


def figure(measured: Dict, title: str):
    """Time and peak memory against N, one column of panels per loss, one legend."""
    plt = pyplot()
    losses = list(measured["results"])
    fig, axes = plt.subplots(2, len(losses), figsize=(3.8 * len(losses) + 0.5, 7.0),
                             squeeze=False)
    for col, loss in enumerate(losses):
        time_ax, memory_ax = axes[0][col], axes[1][col]
        skipped = _panel(time_ax, memory_ax, measured["results"][loss])
        time_ax.set_title(loss)
        memory_ax.set_xlabel("N")
        for ax in (time_ax, memory_ax):
            ax.set_xscale("log", base=2)
            ax.set_yscale("log")
            ax.grid(True, which="both", alpha=0.3)
        if skipped:
            memory_ax.text(0.0, -0.22, "× not run:\n" + "\n".join(skipped), fontsize=6,
                           va="top", transform=memory_ax.transAxes)
    axes[0][0].set_ylabel("fwd+bwd time (ms, median)")
    axes[1][0].set_ylabel("peak extra memory (MiB, floor 1)")
    legend = {}
    for ax in axes.flat:
        for handle, label in zip(*ax.get_legend_handles_labels()):
            legend.setdefault(label, handle)
    fig.suptitle(title)
    fig.tight_layout()
    fig.legend(legend.values(), legend.keys(), loc="center left", bbox_to_anchor=(1.0, 0.5),
               fontsize=8)
    return fig


def plot(measured: Dict, path: str, title: str) -> Optional[str]:
    """Writes the plot to ``path``; returns why there is none, or None."""
    plt = pyplot()
    if plt is None:
        return NO_MATPLOTLIB
    fig = figure(measured, title)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return None


def check_arguments(args) -> None:
    """Every argument, before any measurement; ``--out``'s folder is created and probed."""
    if args.sizes:
        arguments.at_least("--sizes", min(args.sizes), 2)
    arguments.at_least("--dim", args.dim, 1)
    arguments.above("--min-run-time", args.min_run_time, 0)
    arguments.at_least("--min-blocks", args.min_blocks, 2)
    arguments.above("--timeout", args.timeout, 0)
    arguments.above("--memory-gib", args.memory_gib, 0)
    if args.out:
        arguments.writable_file("--out", args.out)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="pyclloss bench", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--losses", nargs="+", default=DEFAULT_LOSSES, choices=LOSSES,
                   help="default: %(default)s")
    p.add_argument("--sizes", nargs="+", type=int,
                   help="values of N (default: each loss's own; "
                        f"{' '.join(map(str, DEFAULT_SIZES))} for those of the default run)")
    p.add_argument("--dim", type=int, default=128, help="D (default: %(default)s)")
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda"),
                   help="default: %(default)s")
    p.add_argument("--dtype", default="float32", choices=("float32", "float16", "bfloat16"),
                   help="default: %(default)s")
    p.add_argument("--min-run-time", type=float, default=1.0,
                   help="seconds of timed calls per cell, at least (default: %(default)s)")
    p.add_argument("--min-blocks", type=int, default=5,
                   help="blocks of calls per cell, about; the IQR is over them "
                        "(default: %(default)s)")
    p.add_argument("--impls", nargs="+", choices=IMPLS, help="restrict to these columns")
    p.add_argument("--memory-gib", type=float, default=12.0,
                   help="skip configurations estimated to need more than this "
                        "(default: %(default)s)")
    p.add_argument("--timeout", type=float, default=600.0,
                   help="seconds per cell (default: %(default)s)")
    p.add_argument("--out", help="also write the markdown report to this file, and the plot "
                                 "beside it (same name, .png)")
    p.add_argument("--single", nargs=3, metavar=("LOSS", "IMPL", "N"), help=argparse.SUPPRESS)
    return p


def main(argv: Optional[List[str]] = None) -> int:
    p = build_parser()
    args = p.parse_args(argv)
    args.command = argv
    try:
        check_arguments(args)
    except ValueError as exc:
        p.exit(2, f"pyclloss bench: error: {exc}\n")
    if args.single:
        loss, impl, n = args.single
        print(json.dumps(measure_one(loss, impl, int(n), args.dim, args.device, args.dtype,
                                     args.min_run_time, args.min_blocks)))
        return 0
    if args.out and pyplot() is None:
        print(f"pyclloss bench: the report will have no plot: {NO_MATPLOTLIB}", file=sys.stderr)
    measured = measure_all(args)
    plot_line = None
    if args.out:
        plot_path = os.path.splitext(args.out)[0] + ".png"
        title = f"pyclloss forward+backward: {machine(args.device)}; {args.dtype}, D = {args.dim}"
        why_not = plot(measured, plot_path, title)
        plot_line = (f"No plot: {why_not}." if why_not else
                     f"![time and memory against N]({os.path.basename(plot_path)})")
        print(f"no plot: {why_not}" if why_not else f"plot: {plot_path}", file=sys.stderr)
    report = markdown(args, measured, plot_line)
    publish(report, args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
