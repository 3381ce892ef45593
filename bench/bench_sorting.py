"""Differentiable sorting networks and GroCo: time of forward + backward and
peak memory of pyclloss against diffsort (and torchsort.soft_sort when it is
importable), written as a markdown table to bench/results/sorting-<machine>.md.

    python bench/bench_sorting.py                   # CPU
    python bench/bench_sorting.py --device cuda     # GPU (auto backend)
    python bench/bench_sorting.py --gpu-check       # GPU target: cuda, triton, diffsort
    python bench/bench_sorting.py --gpu-check --dry-run   # the same, small, on the CPU

Sort cases: cauchy, float32, odd-even and bitonic, B x n over the grid below;
the loss is <w, sorted> + <W, P> with fixed random w, W, so the backward runs
through both outputs. --gpu-check: the issue's GPU target, B = 65536, n = 32,
bfloat16 and float32, both networks, the CUDA and Triton backends and diffsort
in one run, written to bench/results/sorting-gpu-<card>.md. GroCo cases: 10 negatives and 1, 2, 3 positives
(n = 11, 12, 13), against the authors' formulation on diffsort.

Timings are medians over interleaved repeats after a warm-up (the
implementations of a case take turns, so load from other processes hits them
alike); only ratios within one run mean anything. Peak memory: growth of the
process's peak RSS over the call on the CPU, torch.cuda.max_memory_allocated
growth on the GPU; inputs are allocated before (see ``child_memory`` for
how the CPU number is kept honest).
"""

import argparse
import functools
import gc
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import pyclloss
import pyclloss.sorting as S
from pyclloss.backends import resolve
from pyclloss.tools.benchmark import peak_extra_bytes, publish
from pyclloss.ops import sorting as sorting_ops
from pyclloss.reference.sorting import network_layers

try:
    import diffsort
except ImportError:  # pragma: no cover - reported in the table
    diffsort = None
try:
    import torchsort
except ImportError:
    torchsort = None

BATCHES = (256, 4096, 65536)
SIZES = (8, 16, 32, 64)
NETWORKS = ("odd_even", "bitonic")
GROCO_POSITIVES = (1, 2, 3)
GROCO_NEGATIVES = 10
# Skip rules, in units of B * n^2 * layers (the work of one fused forward):
# the fused CPU kernels above this take tens of seconds per call here, and
# diffsort / the reference keep several B x n x n tensors per layer.
CPU_FUSED_WORK_LIMIT = 1.1e9
DENSE_BYTES_LIMIT = {"cpu": 3e9, "cuda": 40e9}
RESULTS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")


# ------------------------------------------------------------------ measurement


def measure_memory(fn, device):
    """Peak memory growth of one call, in bytes."""
    gc.collect()
    return peak_extra_bytes(fn, device)


def time_once(fn, device):
    if device == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        return start.elapsed_time(end) / 1e3
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def child_memory(*spec, script=__file__):
    """Peak memory of one implementation, measured by ``script --child SPEC``
    (``spec`` as JSON; this file unless given) in a fresh process whose glibc
    serves every block of 4 KiB or more with its own mmap: freed blocks leave
    the RSS at once and are never reused, so the RSS growth is the peak of live
    tensors (in one long-lived process, fragments freed by earlier cases are
    reused and hide allocations)."""
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="4096", MALLOC_TRIM_THRESHOLD_="0")
    out = subprocess.run([sys.executable, os.path.abspath(script), "--child", json.dumps(spec)],
                         env=env, capture_output=True, text=True, check=True)
    return int(out.stdout.split()[-1])


def run_case(kind, params, device, repeats, log):
    """({name: (median seconds, peak bytes)}, max abs diff vs diffsort or None,
    skipped note or None) with the implementations' timings interleaved."""
    impls, check, skipped = CASES[kind](*params, device)
    if not impls:
        return None, None, skipped
    log(f"{kind} {params}: {', '.join(impls)}")
    peaks = {}
    for name, fn in impls.items():
        fn()  # warm-up (Triton compiles here)
        peaks[name] = (measure_memory(fn, device) if device == "cuda"
                       else child_memory(kind, params, name))
    times = {name: [] for name in impls}
    for _ in range(repeats):
        for name, fn in impls.items():
            times[name].append(time_once(fn, device))
    result = {name: (statistics.median(times[name]), peaks[name]) for name in impls}
    return result, check() if check else None, skipped


# ----------------------------------------------------------------------- cases


def diffsort_sorter(network, n, steepness, device, dtype=torch.float32):
    sorter = diffsort.DiffSortNet(network, n, steepness=steepness, distribution="cauchy")
    # The network is a plain list of matrices: .to() on the module does not reach it.
    sorter.sorting_network = [[m.to(device, dtype) for m in layer]
                              for layer in sorter.sorting_network]
    return sorter


def sort_step(sort_fn, x, w, big_w):
    def step():
        xx = x.detach().requires_grad_(True)
        sorted_x, perm = sort_fn(xx)
        ((sorted_x * w).sum() + (perm * big_w).sum()).backward()
    return step


def values_step(sort_fn, x, w):
    def step():
        xx = x.detach().requires_grad_(True)
        (sort_fn(xx) * w).sum().backward()
    return step


def dense_bytes(b, n, layers):
    # diffsort and the reference keep about six B x n x n float32 tensors per layer
    return 6 * layers * b * n * n * 4


def sort_case(network, b, n, device):
    """The implementations that fit here, a values check, a note on what is skipped."""
    case = f"{network} B={b} n={n}"
    layers = len(network_layers(network, n))
    if device == "cpu" and b * n * n * layers > CPU_FUSED_WORK_LIMIT:
        return {}, None, f"{case}: every implementation (fused CPU kernel > ~10 s per call here)"
    g = torch.Generator().manual_seed(0)
    x = torch.randn(b, n, generator=g).to(device)
    w = torch.randn(b, n, generator=g).to(device)
    big_w = torch.randn(b, n, n, generator=g).to(device)
    fused = functools.partial(S.diff_sort, network=network)
    impls = {"pyclloss": sort_step(fused, x, w, big_w)}
    check, skipped = None, None
    if dense_bytes(b, n, layers) <= DENSE_BYTES_LIMIT[device]:
        impls["reference"] = sort_step(functools.partial(fused, backend="reference"), x, w, big_w)
        if diffsort is not None:
            sorter = diffsort_sorter(network, n, 10.0, device)
            impls["diffsort"] = sort_step(sorter, x, w, big_w)

            def check():
                return max((a - c).abs().max().item() for a, c in zip(fused(x), sorter(x)))
    else:
        skipped = f"{case}: reference and diffsort (memory)"
    if torchsort is not None:
        impls["torchsort.soft_sort (values only)"] = values_step(
            functools.partial(torchsort.soft_sort, regularization_strength=0.1), x, w)
    return impls, check, skipped


def groco_with_diffsort(pos_sim, neg_sim, num_neg, sorter):
    """The authors' formulation: BCE on the positive- and on the negative-rank sums."""
    sims = torch.cat([neg_sim.topk(num_neg, dim=1).values.flip(1),
                      pos_sim.sort(dim=1).values], dim=1)
    _, perm = sorter(sims)
    target = (torch.arange(sims.shape[1], device=sims.device) >= num_neg).float()
    pred_pos = perm[:, :, num_neg:].sum(2).clip(0, 1)
    pred_neg = perm[:, :, :num_neg].sum(2).clip(0, 1)
    target = target.expand_as(pred_pos)
    return (F.binary_cross_entropy(pred_pos, target)
            + F.binary_cross_entropy(pred_neg, 1 - target)) / 2


def groco_step(loss_fn, pos, neg):
    def step():
        loss_fn(pos.detach().requires_grad_(True), neg.detach().requires_grad_(True)).backward()
    return step


def groco_case(n_pos, b, device):
    g = torch.Generator().manual_seed(0)
    pos = torch.rand(b, n_pos, generator=g).to(device)
    neg = torch.rand(b, 4 * GROCO_NEGATIVES, generator=g).to(device)
    ours = functools.partial(S.groco_loss, num_neg=GROCO_NEGATIVES)
    impls = {
        "pyclloss": groco_step(ours, pos, neg),
        "reference": groco_step(functools.partial(ours, backend="reference"), pos, neg),
    }
    check = None
    if diffsort is not None:
        sorter = diffsort_sorter("odd_even", GROCO_NEGATIVES + n_pos, 1.0, device)
        authors = functools.partial(groco_with_diffsort, num_neg=GROCO_NEGATIVES, sorter=sorter)
        impls["diffsort (authors' GroCo)"] = groco_step(authors, pos, neg)

        def check():
            return abs(ours(pos, neg).item() - authors(pos, neg).item())
    return impls, check, None


CASES = {"sort": sort_case, "groco": groco_case}


def sort_rows(device, repeats, batches, sizes, log):
    rows, skipped = [], []
    for network in NETWORKS:
        for b in batches:
            for n in sizes:
                result, match, note = run_case("sort", [network, b, n], device, repeats, log)
                if note:
                    skipped.append(note)
                if result:
                    rows.append((network, b, n, result, match))
    return rows, skipped


def groco_rows(device, repeats, batches, log):
    rows = []
    for n_pos in GROCO_POSITIVES:
        for b in batches:
            result, match, _ = run_case("groco", [n_pos, b], device, repeats, log)
            rows.append(("groco", b, GROCO_NEGATIVES + n_pos, result, match))
    return rows


# -------------------------------------------------------------------- GPU check

GPU_CHECK_BATCH, GPU_CHECK_SIZE = 65536, 32
DRY_RUN_BATCH = 16
GPU_CHECK_DTYPES = (torch.bfloat16, torch.float32)


def fused_backends(device):
    """The fused backends of diff_sort that run on device here."""
    names = ("cuda", "triton") if device == "cuda" else ("cpp", "triton")
    found = []
    for name in names:
        try:
            resolve(name, torch.device(device), sorting_ops.KERNELS.backends)
        except (RuntimeError, ValueError):
            continue
        found.append(name)
    return found


def sort_outputs(sort_fn, x, w, big_w):
    """sorted, P and the gradient of x of the benchmark loss, in float32."""
    xx = x.detach().requires_grad_(True)
    sorted_x, perm = sort_fn(xx)
    ((sorted_x * w).sum() + (perm * big_w).sum()).backward()
    return sorted_x.detach().float(), perm.detach().float(), xx.grad.float()


def gpu_check_case(network, dtype, b, n, device, repeats, log):
    """{name: (median seconds, peak bytes, max abs diffs of (sorted and P, grad x) vs
    diffsort in float32 or None), or the error that stopped it}."""
    g = torch.Generator().manual_seed(0)
    x, w, big_w = (t.to(device, dtype) for t in (torch.randn(b, n, generator=g),
                                                 torch.randn(b, n, generator=g),
                                                 torch.randn(b, n, n, generator=g)))
    impls = {name: functools.partial(S.diff_sort, network=network, backend=name)
             for name in fused_backends(device)}
    if diffsort is not None:
        impls["diffsort"] = diffsort_sorter(network, n, 10.0, device, dtype)
    # Accuracy: against diffsort in float32 on the same (rounded) inputs.
    expected = (sort_outputs(diffsort_sorter(network, n, 10.0, device, torch.float32),
                             *(t.float() for t in (x, w, big_w)))
                if diffsort is not None else None)
    results = {}
    for name, sort_fn in impls.items():
        step = sort_step(sort_fn, x, w, big_w)
        log(f"gpu check {network} {dtype} B={b} n={n}: {name}")
        try:
            step()  # warm-up (Triton compiles here)
            peak = measure_memory(step, device)
            seconds = statistics.median(time_once(step, device) for _ in range(repeats))
        except RuntimeError as err:  # out of memory included
            results[name] = str(err).splitlines()[0][:100]
            continue
        diff = None
        if expected is not None:
            errors = [(a - e).abs().max().item()
                      for a, e in zip(sort_outputs(sort_fn, x, w, big_w), expected)]
            diff = (max(errors[:2]), errors[2])
        results[name] = (seconds, peak, diff)
        gc.collect()
        if device == "cuda":
            torch.cuda.empty_cache()
    return results


def gpu_check_lines(device, repeats, b, n, time_budget, log):
    started = time.monotonic()
    lines = [f"## diff_sort: forward + backward, cauchy, B = {b}, n = {n}", "",
             "Loss <w, sorted> + <W, P>. max abs diff: against diffsort in float32 on the same "
             "(rounded) inputs.", "",
             "| network | dtype | implementation | ms | peak MiB | speed-up vs diffsort | "
             "memory / diffsort | max abs diff sorted, P | max abs diff grad x |",
             "|---|---|---|---|---|---|---|---|---|"]
    skipped = []
    for network in NETWORKS:
        for dtype in GPU_CHECK_DTYPES:
            dtype_name = str(dtype).replace("torch.", "")
            if time.monotonic() - started > time_budget:
                skipped.append(f"{network} {dtype_name}")
                continue
            results = gpu_check_case(network, dtype, b, n, device, repeats, log)
            base = results.get("diffsort")
            base = None if isinstance(base, str) else base
            for name, result in results.items():
                if isinstance(result, str):
                    lines.append(f"| {network} | {dtype_name} | {name} | failed: {result} "
                                 "| | | | | |")
                    continue
                seconds, peak, diff = result
                ratios = (["—", "—"] if base is None or name == "diffsort" else
                          [f"{base[0] / seconds:.1f}x", f"{peak / max(base[1], 1):.3f}"])
                diffs = ["—", "—"] if diff is None else [f"{d:.1e}" for d in diff]
                lines.append("| " + " | ".join([network, dtype_name, name, fmt_ms(seconds),
                                                fmt_mb(peak), *ratios, *diffs]) + " |")
    lines.append("")
    if skipped:
        lines += [f"Not measured (time budget of {time_budget:.0f} s spent): "
                  + ", ".join(skipped), ""]
    return lines


# ----------------------------------------------------------------------- report


def machine_name(device):
    if device == "cuda":
        return torch.cuda.get_device_name()
    with open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or "cpu"


def slug(text):
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")


def _version(module):
    return getattr(module, "__version__", "installed") if module is not None else "not installed"


def header(device, command):
    import triton

    lines = [f"# Sorting networks and GroCo: fused vs diffsort ({device.upper()})", ""]
    lines.append(f"- Machine: {machine_name(device)}")
    if device == "cpu":
        lines.append(f"- CPU cores: {os.cpu_count()}, torch threads: {torch.get_num_threads()}, "
                     f"load average at start: {os.getloadavg()[0]:.1f} (shared machine)")
        lines.append("- Peak memory: RSS growth over one call (after a warm-up), in a fresh "
                     "process per implementation with MALLOC_MMAP_THRESHOLD_=4096")
    else:
        lines.append(f"- CUDA {torch.version.cuda}, driver: {_driver_version()}")
    lines.append(f"- Versions: python {platform.python_version()}, torch {torch.__version__}, "
                 f"triton {_version(triton)}, diffsort {_version(diffsort)}, "
                 f"torchsort {_version(torchsort)}, pyclloss {pyclloss.__version__}")
    backend = resolve("auto", torch.device(device), sorting_ops.KERNELS.backends)
    lines.append(f"- pyclloss backend (auto): {backend}")
    lines.append(f"- Command: `{command}`")
    lines.append("")
    return lines


def _driver_version():
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, check=True)
        return out.stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def fmt_ms(seconds):
    return f"{seconds * 1e3:.1f}"


def fmt_mb(nbytes):
    return f"{nbytes / 2**20:.1f}"


def table(rows, title, what):
    impls = []
    for *_, result, _ in rows:
        impls += [name for name in result if name not in impls]
    lines = [f"## {title}", ""]
    cols = ["case", "B", "n"]
    for name in impls:
        cols += [f"{name} ms", f"{name} MiB"]
    cols += ["speed-up vs diffsort", "memory / diffsort", f"max abs diff vs diffsort ({what})"]
    lines.append("| " + " | ".join(cols) + " |")
    lines.append("|" + "---|" * len(cols))
    for case, b, n, result, match in rows:
        cells = [case, str(b), str(n)]
        for name in impls:
            t, m = result.get(name, (None, None))
            cells += ["—" if t is None else fmt_ms(t), "—" if m is None else fmt_mb(m)]
        base = next((result[k] for k in result if k.startswith("diffsort")), None)
        if base is not None:
            cells.append(f"{base[0] / result['pyclloss'][0]:.1f}x")
            cells.append(f"{result['pyclloss'][1] / max(base[1], 1):.3f}")
            cells.append(f"{match:.1e}")
        else:
            cells += ["—", "—", "—"]
        lines.append("| " + " | ".join(cells) + " |")
    lines.append("")
    return lines


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--batches", type=int, nargs="+", default=list(BATCHES))
    parser.add_argument("--sizes", type=int, nargs="+", default=list(SIZES))
    parser.add_argument("--no-groco", action="store_true")
    parser.add_argument("--out", default=None, help="default: bench/results/sorting-<machine>.md")
    parser.add_argument("--gpu-check", action="store_true",
                        help="the GPU target: B = 65536, n = 32, cuda, triton and diffsort")
    parser.add_argument("--dry-run", action="store_true",
                        help="with --gpu-check: B = 64 on the CPU (cpp in place of cuda)")
    parser.add_argument("--time-budget", type=float, default=50.0,
                        help="--gpu-check: seconds after which no new case starts")
    parser.add_argument("--child", help=argparse.SUPPRESS)  # one CPU memory measurement
    args = parser.parse_args()
    if args.gpu_check:
        args.device = "cpu" if args.dry_run else "cuda"
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit(f"{'--gpu-check' if args.gpu_check else '--device cuda'}: no CUDA "
                         "device (--gpu-check --dry-run runs it small on the CPU)")
    if args.child:
        kind, params, name = json.loads(args.child)
        fn = CASES[kind](*params, "cpu")[0][name]
        fn()
        print(measure_memory(fn, "cpu"))
        return

    def log(msg):
        print(msg, file=sys.stderr, flush=True)

    command = "python bench/bench_sorting.py " + " ".join(sys.argv[1:])
    lines = header(args.device, command.strip())
    if torchsort is None:
        lines += [("torchsort is not installed (it builds only with --no-build-isolation and a "
                   "C++ toolchain): no torchsort.soft_sort column."), ""]
    if diffsort is None:
        lines += ["diffsort is not installed: no baseline column.", ""]

    if args.gpu_check:
        batch = DRY_RUN_BATCH if args.dry_run else GPU_CHECK_BATCH
        lines += gpu_check_lines(args.device, args.repeats, batch, GPU_CHECK_SIZE,
                                 args.time_budget, log)
        publish("\n".join(lines), args.out or (None if args.dry_run else os.path.join(
            RESULTS_DIR, f"sorting-gpu-{slug(machine_name('cuda'))}.md")))
        return

    rows, skipped = sort_rows(args.device, args.repeats, args.batches, args.sizes, log)
    lines += table(rows, "diff_sort: forward + backward, cauchy, float32", "sorted and P")
    if skipped:
        lines += ["Skipped (too slow or too large here):", ""]
        lines += [f"- {s}" for s in skipped] + [""]
    if not args.no_groco:
        lines += table(groco_rows(args.device, args.repeats, args.batches, log),
                       f"GroCo: forward + backward, {GROCO_NEGATIVES} negatives, "
                       "n = 10 + positives", "loss")

    publish("\n".join(lines), args.out or os.path.join(
        RESULTS_DIR, f"sorting-{slug(args.device + '-' + machine_name(args.device))}.md"))


if __name__ == "__main__":
    main()
