"""The benchmark report: forward+backward time and peak extra memory against N,
for every backend here and the peer implementations that are installed, as a
markdown table and a PNG plot.

Losses and their peers:

- ``supcon``: pytorch-metric-learning ``SupConLoss``;
- ``nt_xent``: pytorch-metric-learning ``NTXentLoss``, lightly ``NTXentLoss``;
- ``clip``: open_clip ``ClipLoss``, Inf-CL (CUDA only);
- ``siglip``: open_clip ``SigLipLoss``;
- ``diff_sort``: N rows of 16 values, odd-even, cauchy; diffsort ``DiffSortNet``;
- ``gated``: ``gated_info_nce`` with B = N anchors and keys of D = K dims, 100
  classes (the reference builds the B×N×K gated keys).

Each (loss, implementation, N) runs in a fresh subprocess, so that peak memory
is that run's alone: on the CPU it is the growth of the process's peak resident
set (VmHWM, reset through /proc/self/clear_refs) over the resident set with
the inputs in place; on CUDA, ``torch.cuda.max_memory_allocated`` over the
inputs. Times come from ``torch.utils.benchmark``'s blocked autorange (it warms
up, sizes blocks of calls so that the timer's overhead is negligible, and
synchronises the GPU), run for at least ``--min-run-time`` seconds and about
``--min-blocks`` blocks: the report gives the median time per call over the blocks
and their interquartile range (IQR), and the speed-up of pyclloss's fastest fused
backend over the best peer and over its own reference.

    pyclloss bench --sizes 1024 4096 16384 --out bench/results/cpu-report.md   # + .png
"""

import argparse
import datetime
import json
import math
import os
import platform
import subprocess
import sys
import time
from typing import Callable, Dict, List, Optional

from . import _arguments as arguments
from . import peers

LOSSES = ("supcon", "nt_xent", "clip", "siglip", "diff_sort", "gated")
BACKEND_IMPLS = ("cuda", "cpp", "triton", "reference")
FUSED_IMPLS = ("cuda", "cpp", "triton")
PEERS = {"supcon": ("pml",), "nt_xent": ("pml", "lightly"), "clip": ("open_clip", "inf_cl"),
         "siglip": ("open_clip",), "diff_sort": ("diffsort",), "gated": ()}
IMPLS = BACKEND_IMPLS + ("pml", "lightly", "open_clip", "inf_cl", "diffsort")
SORT_SIZE = 16  # values per row of the diff_sort rows
GATED_CLASSES = 100
GIB = 1024 ** 3


def _inputs(loss: str, n: int, d: int, device: str, dtype) -> Dict:
    """The leaf tensors (with gradients) and other arguments of one configuration."""
    import torch

    gen = torch.Generator(device="cpu").manual_seed(n)
    leaf = lambda *shape: torch.randn(*shape, generator=gen).to(device=device, dtype=dtype)
    if loss == "diff_sort":
        return {"x": leaf(n, SORT_SIZE).requires_grad_(), "w": leaf(n, SORT_SIZE),
                "wp": leaf(n, SORT_SIZE, SORT_SIZE)}
    if loss in ("clip", "siglip"):
        unit = lambda: torch.nn.functional.normalize(leaf(n, d), dim=1).requires_grad_()
        return {"img": unit(), "txt": unit(),
                "scale": torch.tensor(1 / 0.07, device=device), "bias":
                torch.tensor(-10.0, device=device)}
    if loss == "gated":
        labels = torch.randint(0, GATED_CLASSES, (n,), generator=gen).to(device)
        return {"q": leaf(n, d).requires_grad_(), "k": leaf(n, d).requires_grad_(),
                "gates": torch.rand(n, d, generator=gen).to(device, dtype).requires_grad_(),
                "labels": labels, "partners": labels[torch.randperm(n, generator=gen).to(device)]}
    labels = torch.randint(0, max(2, n // 8), (n,), generator=gen).to(device)
    return {"x": leaf(n, d).requires_grad_(), "labels": labels}


def _loss_call(loss: str, impl: str, a: Dict) -> Callable:
    """A closure computing the scalar to differentiate, with ``impl``."""
    import torch

    import pyclloss

    if loss == "diff_sort":
        if impl == "diffsort":
            sort = peers.diffsort_net()("odd_even", SORT_SIZE, steepness=10.0,
                                        distribution="cauchy").to(a["x"].device)
        else:
            sort = lambda x: pyclloss.diff_sort(x, "odd_even", 10.0, "cauchy", backend=impl)

        def sorted_and_p():
            values, p = sort(a["x"])
            return (values * a["w"]).sum() + (p * a["wp"]).sum()
        return sorted_and_p
    if loss == "gated":
        return lambda: pyclloss.gated_info_nce(a["q"], a["k"], a["gates"], a["labels"],
                                               a["partners"], backend=impl)
    if loss in ("clip", "siglip"):
        img, txt, scale, bias = a["img"], a["txt"], a["scale"], a["bias"]
        if impl == "open_clip":
            oc = peers.open_clip_losses()
            if loss == "clip":
                clip = oc.ClipLoss()
                return lambda: clip(img, txt, scale)
            siglip = oc.SigLipLoss()
            return lambda: siglip(img, txt, scale, bias)
        if impl == "inf_cl":
            one_way = peers.inf_cl_loss()
            return lambda: (one_way(img, txt, scale=scale) + one_way(txt, img, scale=scale)) / 2
        if loss == "clip":
            return lambda: pyclloss.clip_loss(img, txt, scale, backend=impl)
        return lambda: pyclloss.siglip_loss(img, txt, scale, bias, backend=impl)
    x, labels = a["x"], a["labels"]
    b = x.shape[0] // 2
    views = torch.cat([torch.arange(b)] * 2).to(x.device)
    if impl == "pml":
        pml = peers.pml_losses()
        if loss == "supcon":
            supcon = pml.SupConLoss(temperature=0.1)
            return lambda: supcon(x, labels)
        pml_ntxent = pml.NTXentLoss(temperature=0.5)
        return lambda: pml_ntxent(x[: 2 * b], views)
    if impl == "lightly":
        lightly_ntxent = peers.lightly_ntxent()(temperature=0.5)
        return lambda: lightly_ntxent(x[:b], x[b: 2 * b])
    if loss == "supcon":
        return lambda: pyclloss.supcon(x, labels, 0.1, backend=impl)
    return lambda: pyclloss.nt_xent(x[:b], x[b: 2 * b], 0.5, backend=impl)


def _step_fn(loss: str, impl: str, inputs: Dict) -> Callable[[], None]:
    """One forward+backward of ``loss`` with ``impl``."""
    call = _loss_call(loss, impl, inputs)
    leaves = [t for t in inputs.values() if t.requires_grad]

    def step():
        for t in leaves:
            t.grad = None
        call().backward()

    return step


def _estimated_bytes(loss: str, impl: str, n: int, d: int) -> float:
    """What a dense implementation needs, to skip cells beyond the memory budget."""
    if loss == "gated":  # gated keys, normalised, and their gradients
        return 4.0 * 4 * n * n * d if impl == "reference" else 0.0
    if loss == "diff_sort":
        # diffsort keeps several (N, n, n) tensors per layer (n layers of odd-even)
        return 4.0 * 6 * n * SORT_SIZE ** 3 if impl in ("diffsort", "reference") else 0.0
    if impl == "pml":
        # NTXentLoss with labels builds a (positive pairs x negative pairs) matrix:
        # about 16·n³ bytes (measured: 2.1 GiB at n = 512).
        return 16.0 * n ** 3 if loss == "nt_xent" else 4.0 * 8 * n * n
    if impl in ("reference", "lightly", "open_clip"):
        return 4.0 * 6 * n * n  # logits, masks, softmax and their gradients
    return 0.0


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


def measure_one(loss: str, impl: str, n: int, d: int, device: str, dtype_name: str,
                min_run_time: float, min_blocks: int) -> Dict:
    """Time and peak extra memory of one configuration, in this process."""
    import torch

    dtype = getattr(torch, dtype_name)
    # One-time library set-up (thread pools, JIT-compiled GEMM kernels) is not
    # memory of the loss: a tiny call first keeps it out of the peak.
    _step_fn(loss, impl, _inputs(loss, 64, d, device, dtype))()
    step = _step_fn(loss, impl, _inputs(loss, n, d, device, dtype))
    start = time.perf_counter()
    peak = peak_extra_bytes(step, device)
    once = time.perf_counter() - start
    # a run long enough for min_blocks blocks of one call, as far as one call tells
    timing = blocked_timing(step, max(min_run_time, min_blocks * once), min_blocks)
    return {**timing, "peak_bytes": max(peak, 0)}


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


def _backends_here(device: str) -> List[str]:
    import torch

    import pyclloss
    from pyclloss.backends import resolve

    here = []
    for name, (ok, _) in pyclloss.backends().items():
        try:
            if ok and resolve(name, torch.device(device)) == name:
                here.append(name)
        except ValueError:
            pass
    return [name for name in BACKEND_IMPLS if name in here]


_PEER_LOADERS = {"pml": peers.pml_losses, "lightly": peers.lightly_ntxent,
                 "open_clip": peers.open_clip_losses, "inf_cl": peers.inf_cl_loss,
                 "diffsort": peers.diffsort_net}


def _peers_here(device: str) -> Dict[str, str]:
    """{peer: "" if it runs here, else why not}."""
    status = {}
    for name, load in _PEER_LOADERS.items():
        if name == "inf_cl" and device != "cuda":
            status[name] = "Inf-CL runs on CUDA only"
            continue
        try:
            load()
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
            f"- D = {args.dim} ({SORT_SIZE} values per row for diff_sort; K = D and "
            f"{GATED_CLASSES} classes for gated), {args.dtype}\n"
            f"- time: median per call over blocks of calls (torch.utils.benchmark blocked "
            f"autorange, at least {args.min_run_time:g} s and about {args.min_blocks} blocks per "
            f"cell; {_blocks_range(measured['results'])} blocks), with the interquartile range "
            f"of the blocks (IQR)\n"
            f"- peak: extra memory over the inputs after a tiny warm-up call (fresh process per "
            f"cell)\n"
            + (f"- peers not measured: {missing}\n" if missing else ""))


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


def measure_all(args) -> Dict:
    """{loss: {impl: {N: result}}} for the implementations that run here."""
    backends = [b for b in _backends_here(args.device) if not args.impls or b in args.impls]
    peer_status = _peers_here(args.device)
    budget = args.memory_gib * GIB
    results = {}
    for loss in args.losses:
        impls = backends + [p for p in PEERS[loss] if not peer_status[p]
                            and (not args.impls or p in args.impls)]
        results[loss] = {impl: {} for impl in impls}
        for n in args.sizes:
            for impl in impls:
                estimate = _estimated_bytes(loss, impl, n, args.dim)
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
        lines.append(f"\n## {loss}\n")
        lines.append("| N | " + " | ".join(impls) + " | speed-up vs best peer | vs reference |")
        lines.append("|---" * (len(impls) + 3) + "|")
        for n in args.sizes:
            row = {impl: by_impl[impl].get(n) for impl in impls}
            lines.append(f"| {n} | " + " | ".join(_cell(row[i]) for i in impls) + " | "
                         + " | ".join(_speedups(row, peers)) + " |")
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
          "reference": "tab:gray", "pml": "tab:orange", "lightly": "tab:red",
          "open_clip": "tab:brown", "inf_cl": "tab:pink", "diffsort": "tab:olive"}


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
    p.add_argument("--losses", nargs="+", default=list(LOSSES), choices=LOSSES,
                   help="default: all")
    p.add_argument("--sizes", nargs="+", type=int, default=[1024, 2048, 4096, 8192, 16384],
                   help="values of N (default: %(default)s)")
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
    print(report)
    if args.out:
        with open(args.out, "w") as f:
            f.write(report)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
