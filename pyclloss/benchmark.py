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

For the InfoNCE losses the table adds the fused backend's effective rate,
8·N²·D FLOPs (forward with recomputing backward, without the symmetry that
the self-similarity losses exploit, so that all figures compare) over its
time, against a square 4096³ fp32 matmul timed in the same process (the faster
of torch.mm and, on the CPU, oneDNN's).

Each (loss, implementation, N) runs in a fresh subprocess, so that peak memory
is that run's alone: on the CPU it is the growth of the process's peak resident
set (VmHWM, reset through /proc/self/clear_refs) over the resident set with
the inputs in place; on CUDA, ``torch.cuda.max_memory_allocated`` over the
inputs. Times are medians of ``--repeats`` runs after one warm-up.

    pyclloss bench --sizes 1024 4096 16384 --out bench/results/cpu-report.md   # + .png
"""

import argparse
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from typing import Callable, Dict, List, Optional

from . import peers

LOSSES = ("supcon", "nt_xent", "clip", "siglip", "diff_sort", "gated")
BACKEND_IMPLS = ("cuda", "cpp", "triton", "reference")
PEERS = {"supcon": ("pml",), "nt_xent": ("pml", "lightly"), "clip": ("open_clip", "inf_cl"),
         "siglip": ("open_clip",), "diff_sort": ("diffsort",), "gated": ()}
IMPLS = BACKEND_IMPLS + ("pml", "lightly", "open_clip", "inf_cl", "diffsort")
RATED = ("supcon", "nt_xent", "clip", "siglip")  # losses with an effective rate
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


def peak_extra_bytes(fn: Callable[[], object], device: str = "cpu") -> int:
    """Peak memory growth over one call of ``fn``: on CUDA the allocator's peak
    over what is allocated now; on the CPU the peak resident set (VmHWM, reset
    through /proc/self/clear_refs) over the resident set now."""
    import torch

    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        fn()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - base
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # VmHWM := VmRSS
    base = rss_bytes("VmRSS")
    fn()
    return rss_bytes("VmHWM") - base


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
                repeats: int) -> Dict:
    """Time and peak extra memory of one configuration, in this process."""
    import torch

    dtype = getattr(torch, dtype_name)
    # One-time library set-up (thread pools, JIT-compiled GEMM kernels) is not
    # memory of the loss: a tiny call first keeps it out of the peak.
    _step_fn(loss, impl, _inputs(loss, 64, d, device, dtype))()
    step = _step_fn(loss, impl, _inputs(loss, n, d, device, dtype))
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    peak = peak_extra_bytes(step, device)
    step()  # warm-up
    times = []
    for _ in range(repeats):
        sync()
        t0 = time.perf_counter()
        step()
        sync()
        times.append(time.perf_counter() - t0)
    result = {"time_s": statistics.median(times), "peak_bytes": max(peak, 0)}
    if loss in RATED:
        result["matmul_flops"] = matmul_flops(device)
    return result


def _run_isolated(args, loss, impl, n) -> Dict:
    cmd = [sys.executable, "-m", "pyclloss.benchmark", "--single", loss, impl, str(n),
           "--dim", str(args.dim), "--device", args.device, "--dtype", args.dtype,
           "--repeats", str(args.repeats)]
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


def _header(args, peer_status: Dict[str, str]) -> str:
    import torch

    import pyclloss
    from pyclloss.energy import cpu_model

    if args.device == "cuda":
        machine = f"GPU {torch.cuda.get_device_name()}"
    else:
        machine = f"CPU {cpu_model()}, {os.cpu_count()} cores, {torch.get_num_threads()} threads"
    cmd = "pyclloss bench " + " ".join(sys.argv[1:] if args.command is None else args.command)
    missing = "; ".join(f"{name}: {why}" for name, why in peer_status.items() if why)
    return (f"# pyclloss benchmark: forward+backward\n\n"
            f"- machine: {machine}\n"
            f"- date: {datetime.date.today().isoformat()}\n"
            f"- versions: pyclloss {pyclloss.__version__}, torch {torch.__version__}, "
            f"python {platform.python_version()}\n"
            f"- command: `{cmd.strip()}`\n"
            f"- D = {args.dim} ({SORT_SIZE} values per row for diff_sort; K = D and "
            f"{GATED_CLASSES} classes for gated), {args.dtype}, median "
            f"of {args.repeats} after warm-up; peak = extra memory over the inputs after a tiny "
            f"warm-up call (fresh process per cell)\n"
            + (f"- peers not measured: {missing}\n" if missing else ""))


def _cell(result: Optional[Dict]) -> str:
    if result is None:
        return "—"
    if "error" in result:
        return result["error"]
    return f"{result['time_s'] * 1e3:,.1f} ms / {result['peak_bytes'] / 2**20:,.0f} MiB"


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


def _rate_cell(result: Optional[Dict], n: int, d: int) -> str:
    if not result or "matmul_flops" not in result:
        return "—"
    rate = effective_flops(n, d) / result["time_s"]
    return (f"{rate / 1e9:,.0f} GFLOP/s = {rate / result['matmul_flops']:.2f}× "
            f"({result['matmul_flops'] / 1e9:,.0f})")


def markdown(args, measured: Dict, plot_name: Optional[str]) -> str:
    lines = [_header(args, measured["peers"]),
             "Each cell: time / peak extra memory. Speed-up = reference time / fused time, "
             "same run.\n"]
    if plot_name:
        lines.append(f"![time and memory against N]({plot_name})\n")
    for loss, by_impl in measured["results"].items():
        impls = list(by_impl)
        rated = any("matmul_flops" in r for by_n in by_impl.values() for r in by_n.values())
        lines.append(f"\n## {loss}\n")
        lines.append("| N | " + " | ".join(impls) + " | speed-up |"
                     + (" fused rate = × matmul (matmul GFLOP/s) |" if rated else ""))
        lines.append("|---" * (len(impls) + 2 + rated) + "|")
        for n in args.sizes:
            row = {impl: by_impl[impl].get(n) for impl in impls}
            fused = next((row[i] for i in ("cuda", "cpp", "triton")
                          if row.get(i) and "time_s" in row[i]), None)
            base = row.get("reference")
            speedup = (f"{base['time_s'] / fused['time_s']:.1f}×"
                       if fused and base and "time_s" in base else "—")
            lines.append(f"| {n} | " + " | ".join(_cell(row[i]) for i in impls)
                         + f" | {speedup} |" + (f" {_rate_cell(fused, n, args.dim)} |"
                                                 if rated else ""))
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


def plot(measured: Dict, path: str) -> str:
    """Time and peak memory against N, one column of panels per loss; says what it did."""
    plt = pyplot()
    if plt is None:
        return "no plot: matplotlib is not installed"
    losses = list(measured["results"])
    fig, axes = plt.subplots(2, len(losses), figsize=(3.6 * len(losses), 6.4), squeeze=False)
    for col, loss in enumerate(losses):
        for impl, by_n in measured["results"][loss].items():
            ok = sorted((n, r) for n, r in by_n.items() if "time_s" in r)
            if not ok:
                continue
            ns = [n for n, _ in ok]
            style = "-o" if impl in BACKEND_IMPLS else "--s"
            axes[0][col].plot(ns, [r["time_s"] * 1e3 for _, r in ok], style, label=impl, ms=4)
            axes[1][col].plot(ns, [max(r["peak_bytes"], 2**20) / 2**20 for _, r in ok], style,
                              label=impl, ms=4)
        axes[0][col].set_title(loss)
        axes[1][col].set_xlabel("N")
        for ax in (axes[0][col], axes[1][col]):
            ax.set_xscale("log", base=2)
            ax.set_yscale("log")
            ax.grid(True, which="both", alpha=0.3)
        axes[0][col].legend(fontsize=7)
    axes[0][0].set_ylabel("fwd+bwd time (ms)")
    axes[1][0].set_ylabel("peak extra memory (MiB, floor 1)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return f"plot: {path}"


def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="pyclloss bench", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--losses", nargs="+", default=list(LOSSES), choices=LOSSES)
    p.add_argument("--sizes", nargs="+", type=int, default=[1024, 2048, 4096, 8192, 16384])
    p.add_argument("--dim", type=int, default=128)
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    p.add_argument("--dtype", default="float32", choices=("float32", "float16", "bfloat16"))
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--impls", nargs="+", choices=IMPLS, help="restrict to these columns")
    p.add_argument("--memory-gib", type=float, default=12.0,
                   help="skip configurations estimated to need more than this")
    p.add_argument("--timeout", type=float, default=600.0, help="seconds per cell")
    p.add_argument("--out", help="also write the markdown report to this file, and the plot "
                                 "beside it (same name, .png)")
    p.add_argument("--single", nargs=3, metavar=("LOSS", "IMPL", "N"), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    args.command = argv
    if any(n < 2 for n in args.sizes):
        p.error("--sizes must be at least 2")
    if args.single:
        loss, impl, n = args.single
        print(json.dumps(measure_one(loss, impl, int(n), args.dim, args.device, args.dtype,
                                     args.repeats)))
        return 0
    measured = measure_all(args)
    plot_path = os.path.splitext(args.out)[0] + ".png" if args.out else None
    report = markdown(args, measured, os.path.basename(plot_path) if plot_path else None)
    print(report)
    if args.out:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "w") as f:
            f.write(report)
        print(plot(measured, plot_path), file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
