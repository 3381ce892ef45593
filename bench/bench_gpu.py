"""GPU benchmark of the fused InfoNCE losses: CLIP and SupCon forward+backward.

For each loss, dtype and N (D = 512): median time and peak extra memory of
every backend (cuda, triton, reference) and of the peers a user would pick
otherwise (open_clip's ClipLoss, Inf-CL), achieved TFLOP/s counting 8·N²·D,
and that rate against a dense 8192³ matmul measured on the same card. Then the
relative error of the loss and of every gradient against float64 at N = 4096.

    python bench/bench_gpu.py              # prints the tables, writes bench/results/gpu-<card>.md
    python bench/bench_gpu.py --dry-run    # tiny sizes on the CPU backends: checks this script

Timings stop at --time-budget seconds (remaining cells say so); large N runs
get fewer repeats.
"""

import argparse
import datetime
import gc
import os
import re
import statistics
import subprocess
import sys
import time
from typing import Callable, Dict, List, Optional, Tuple

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import pyclloss  # noqa: E402
from pyclloss.tools.benchmark import publish  # noqa: E402

LOSSES = ("clip_loss", "supcon")
BACKENDS = ("cuda", "triton", "reference")
PEERS = ("open_clip", "inf_cl")
GIB = 1024 ** 3
MIB = 1024 ** 2


# ----------------------------------------------------------------------- timing


class Clock:
    """Synchronised wall-clock timing of a step on the benchmark's device."""

    def __init__(self, device: str):
        self.cuda = device == "cuda"

    def sync(self):
        if self.cuda:
            torch.cuda.synchronize()

    def seconds(self, step: Callable[[], None]) -> float:
        if self.cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            step()
            end.record()
            end.synchronize()
            return start.elapsed_time(end) / 1e3
        t0 = time.perf_counter()
        step()
        return time.perf_counter() - t0

    def reset_peak(self) -> int:
        """Resets the peak-memory counter; returns the memory in use now."""
        if not self.cuda:
            return 0
        self.sync()
        torch.cuda.reset_peak_memory_stats()
        return torch.cuda.memory_allocated()

    def peak_since(self, base: int) -> Optional[int]:
        return torch.cuda.max_memory_allocated() - base if self.cuda else None


def measure(step: Callable[[], None], clock: Clock, seconds: float, max_repeats: int) -> Dict:
    """Median time of `step` after a warm-up run that also gives the peak memory."""
    base = clock.reset_peak()
    clock.sync()
    step()  # warm-up: compilation, autotuning, allocator growth
    clock.sync()
    peak = clock.peak_since(base)
    first = clock.seconds(step)
    repeats = max(1, min(max_repeats, int(seconds / max(first, 1e-6))))
    times = [first] + [clock.seconds(step) for _ in range(repeats - 1)]
    return {"time_s": statistics.median(times), "peak_bytes": peak, "repeats": len(times)}


def matmul_rate(dtype: torch.dtype, device: str, n: int) -> float:
    """Dense n³ matmul rate in TFLOP/s (fp32 without TF32)."""
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    clock = Clock(device)
    tf32 = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        result = measure(lambda: torch.matmul(a, b), clock, seconds=1.0, max_repeats=20)
    finally:
        torch.backends.cuda.matmul.allow_tf32 = tf32
    return 2 * n ** 3 / result["time_s"] / 1e12


# ----------------------------------------------------------------------- losses


def peer_losses() -> Tuple[Dict[str, Callable], List[str]]:
    """The CLIP peers that import here, and a note for each that does not."""
    peers, notes = {}, []
    try:
        from open_clip.loss import ClipLoss

        clip = ClipLoss()
        peers["open_clip"] = lambda img, txt, scale: clip(img, txt, scale)
    except Exception as exc:  # open_clip pulls in torchvision; any import failure skips it
        notes.append(f"open_clip is not importable here ({type(exc).__name__}: {exc}); its "
                     "ClipLoss is the dense mean of two cross-entropies, the formula the "
                     "reference column runs.")
    try:
        from inf_cl import cal_inf_loss

        # One direction per call: CLIP is the mean of the two directions.
        peers["inf_cl"] = lambda img, txt, scale: (cal_inf_loss(img, txt, scale=scale) +
                                                   cal_inf_loss(txt, img, scale=scale)) / 2
    except Exception as exc:
        notes.append(f"Inf-CL (inf_cl.cal_inf_loss) is not importable here "
                     f"({type(exc).__name__}); its column is skipped.")
    return peers, notes


def make_inputs(loss: str, n: int, d: int, dtype: torch.dtype, device: str, seed: int = 0):
    """Leaf tensors that get gradients, and the loss's other arguments."""
    gen = torch.Generator(device="cpu").manual_seed(seed + n)
    if loss == "clip_loss":
        img = torch.nn.functional.normalize(torch.randn(n, d, generator=gen), dim=1)
        txt = torch.nn.functional.normalize(img + 0.5 * torch.randn(n, d, generator=gen), dim=1)
        leaves = [img.to(device, dtype).requires_grad_(), txt.to(device, dtype).requires_grad_(),
                  torch.tensor(1 / 0.07, device=device).requires_grad_()]
        return leaves, ()
    features = torch.randn(n, d, generator=gen).to(device, dtype).requires_grad_()
    labels = torch.randint(0, max(2, n // 8), (n,), generator=gen).to(device)
    return [features], (labels,)


def loss_fn(loss: str, impl: str, peers: Dict[str, Callable]) -> Callable:
    if loss == "clip_loss":
        if impl in peers:
            return peers[impl]
        return lambda img, txt, scale: pyclloss.clip_loss(img, txt, scale, backend=impl)
    return lambda features, labels: pyclloss.supcon(features, labels, temperature=0.1,
                                                    backend=impl)


def training_step(fn: Callable, leaves: List[torch.Tensor], extra: tuple) -> Callable[[], None]:
    def step():
        for leaf in leaves:
            leaf.grad = None
        fn(*leaves, *extra).backward()

    return step


def dense_bytes(n: int) -> float:
    """What the dense implementations hold: about six N×N fp32 matrices."""
    return 6.0 * n * n * 4


def free_bytes(device: str) -> float:
    return torch.cuda.mem_get_info()[0] if device == "cuda" else float("inf")


def release(device: str):
    gc.collect()
    if device == "cuda":
        torch.cuda.empty_cache()


def short_error(exc: BaseException) -> str:
    if isinstance(exc, torch.cuda.OutOfMemoryError):
        return "out of memory"
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return f"{type(exc).__name__}: {text}"[:70]


# -------------------------------------------------------------------- the runs


def run_speed(args, impls: List[str], peers: Dict[str, Callable], clock: Clock,
              deadline: float) -> Dict[Tuple, Dict]:
    results = {}
    for loss in args.losses:
        for dtype_name in args.dtypes:
            dtype = getattr(torch, dtype_name)
            for n in args.sizes:
                for impl in impls:
                    if impl in PEERS and loss != "clip_loss":
                        continue
                    key = (loss, dtype_name, n, impl)
                    dense = impl in ("reference", "open_clip")
                    if time.monotonic() > deadline:
                        results[key] = {"skip": "time budget"}
                    elif dense and dense_bytes(n) > 0.6 * free_bytes(args.device):
                        results[key] = {"skip": f"would not fit (~{dense_bytes(n) / GIB:.0f} GiB)"}
                    else:
                        results[key] = run_one(loss, impl, n, args, dtype, peers, clock)
                    print(f"{loss:9s} {dtype_name:8s} N={n:6d} {impl:9s} {cell(results[key])}",
                          flush=True)
    return results


def run_one(loss, impl, n, args, dtype, peers, clock) -> Dict:
    try:
        leaves, extra = make_inputs(loss, n, args.dim, dtype, args.device)
        step = training_step(loss_fn(loss, impl, peers), leaves, extra)
        repeats = args.repeats if n <= 16384 else max(1, args.repeats // 3)
        result = measure(step, clock, seconds=args.seconds_per_cell, max_repeats=repeats)
        result["tflops"] = 8.0 * n * n * args.dim / result["time_s"] / 1e12
        return result
    except Exception as exc:
        return {"error": short_error(exc)}
    finally:
        release(args.device)


def relative_error(got: torch.Tensor, want: torch.Tensor) -> float:
    got, want = got.double(), want.double()
    return ((got - want).norm() / want.norm().clamp_min(1e-300)).item()


def run_accuracy(args, impls: List[str], peers: Dict[str, Callable]) -> Dict[Tuple, Dict]:
    """Loss and gradient errors against float64 on the same (rounded) inputs."""
    results = {}
    n = args.accuracy_n
    for loss in args.losses:
        for dtype_name in args.dtypes:
            dtype = getattr(torch, dtype_name)
            leaves, extra = make_inputs(loss, n, args.dim, dtype, args.device, seed=1)
            exact = [leaf.detach().double().requires_grad_() for leaf in leaves]
            want = loss_fn(loss, "reference", peers)(*exact, *extra)
            want.backward()
            for impl in impls:
                if impl in PEERS and loss != "clip_loss":
                    continue
                try:
                    for leaf in leaves:
                        leaf.grad = None
                    got = loss_fn(loss, impl, peers)(*leaves, *extra)
                    got.backward()
                    results[(loss, dtype_name, impl)] = {
                        "loss": relative_error(got.detach(), want.detach()),
                        "grads": [relative_error(leaf.grad, ref.grad)
                                  for leaf, ref in zip(leaves, exact)],
                    }
                except Exception as exc:
                    results[(loss, dtype_name, impl)] = {"error": short_error(exc)}
                finally:
                    release(args.device)
    return results


# ---------------------------------------------------------------------- report


def cell(result: Dict) -> str:
    if "skip" in result:
        return f"skipped: {result['skip']}"
    if "error" in result:
        return result["error"]
    return f"{result['time_s'] * 1e3:.2f} ms"


def speed_cell(result: Dict, matmul_tflops: float) -> str:
    if "time_s" not in result:
        return cell(result)
    share = 100 * result["tflops"] / matmul_tflops
    return f"{cell(result)} [{result['repeats']}] · {result['tflops']:.3g} TFLOP/s, {share:.0f}%"


def memory_cell(result: Dict) -> str:
    if result.get("peak_bytes") is None:
        return "—" if "time_s" in result else "·"
    return f"{result['peak_bytes'] / MIB:,.0f}"


def speed_tables(args, impls, results, rates) -> List[str]:
    lines = []
    for loss in args.losses:
        cols = [i for i in impls if not (i in PEERS and loss != "clip_loss")]
        lines += [f"### {loss} forward+backward, D = {args.dim}", "",
                  "Time: median of the repeats (count in brackets); TFLOP/s counts 8·N²·D; "
                  "% is of the dense matmul rate of the same dtype on this card.", "",
                  "| dtype | N | " + " | ".join(cols) + " |",
                  "|---|---:|" + "---:|" * len(cols)]
        for dtype_name in args.dtypes:
            for n in args.sizes:
                cells = [speed_cell(results[(loss, dtype_name, n, impl)], rates[dtype_name])
                         for impl in cols]
                lines.append(f"| {dtype_name} | {n} | " + " | ".join(cells) + " |")
        lines += ["", f"Peak extra memory (MiB; `max_memory_allocated` over the inputs, "
                      f"gradients included), {loss}:", "",
                  "| dtype | N | " + " | ".join(cols) + " |",
                  "|---|---:|" + "---:|" * len(cols)]
        for dtype_name in args.dtypes:
            for n in args.sizes:
                cells = [memory_cell(results[(loss, dtype_name, n, impl)]) for impl in cols]
                lines.append(f"| {dtype_name} | {n} | " + " | ".join(cells) + " |")
        lines.append("")
    return lines


GRAD_NAMES = {"clip_loss": ("image", "text", "logit_scale"), "supcon": ("features",)}


def accuracy_tables(args, impls, results) -> List[str]:
    lines = [f"### Relative error against float64, N = {args.accuracy_n}, D = {args.dim}", "",
             "|loss − loss₆₄| / |loss₆₄| and ‖g − g₆₄‖ / ‖g₆₄‖ per gradient, "
             "on the same rounded inputs.", ""]
    for loss in args.losses:
        grads = GRAD_NAMES[loss]
        lines += [f"| {loss} | dtype | loss | " + " | ".join(f"d {g}" for g in grads) + " |",
                  "|---|---|---:|" + "---:|" * len(grads)]
        for dtype_name in args.dtypes:
            for impl in impls:
                r = results.get((loss, dtype_name, impl))
                if r is None:
                    continue
                if "error" in r:
                    lines.append(f"| {impl} | {dtype_name} | {r['error']} |" + " |" * len(grads))
                else:
                    errs = " | ".join(f"{e:.1e}" for e in r["grads"])
                    lines.append(f"| {impl} | {dtype_name} | {r['loss']:.1e} | {errs} |")
        lines.append("")
    return lines


def environment(args) -> Tuple[str, List[str]]:
    """The device's name and the header lines: date, device, versions, command."""
    if args.device == "cuda":
        name = torch.cuda.get_device_name()
        props = torch.cuda.get_device_properties(0)
        try:
            query = ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"]
            driver = subprocess.run(query, capture_output=True, text=True,
                                    timeout=10).stdout.strip()
        except (OSError, subprocess.TimeoutExpired):
            driver = "unknown"
        device = (f"{name}, {props.multi_processor_count} SMs, "
                  f"{props.total_memory / GIB:.0f} GiB, driver {driver}")
    else:
        name, device = "cpu", f"CPU ({os.cpu_count()} logical cores), dry run"
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = "not installed"
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT,
                                capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.TimeoutExpired):
        commit = ""
    lines = [f"- date: {datetime.datetime.now().isoformat(timespec='seconds')}",
             f"- device: {device}",
             f"- torch {torch.__version__} (CUDA {torch.version.cuda}), triton {triton_version}, "
             f"pyclloss {pyclloss.__version__}" + (f" ({commit})" if commit else ""),
             "- backends: " + "; ".join(f"{k}: {'yes' if v[0] else 'no'} ({v[1]})"
                                         for k, v in pyclloss.backends().items()),
             "- command: `python " + " ".join(["bench/bench_gpu.py"] + sys.argv[1:]) + "`"]
    return name, lines


def results_path(name: str) -> str:
    return os.path.join(ROOT, "bench", "results", name)


def slug(name: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")


# ------------------------------------------------------------------------ main


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dry-run", action="store_true",
                        help="tiny sizes on the CPU backends; checks the script, writes no file")
    parser.add_argument("--sizes", type=int, nargs="+", default=[4096, 16384, 32768, 65536])
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--dtypes", nargs="+", default=["bfloat16", "float32"])
    parser.add_argument("--losses", nargs="+", default=list(LOSSES), choices=LOSSES)
    parser.add_argument("--repeats", type=int, default=10, help="most timed runs per cell")
    parser.add_argument("--seconds-per-cell", type=float, default=1.0,
                        help="timed runs per cell stop after about this long")
    parser.add_argument("--accuracy-n", type=int, default=4096)
    parser.add_argument("--time-budget", type=float, default=200.0,
                        help="seconds for the timing runs; later cells are skipped")
    parser.add_argument("--out", help="results file (default bench/results/gpu-<card>.md)")
    args = parser.parse_args(argv)
    args.device = "cpu" if args.dry_run else "cuda"
    if args.dry_run:
        args.sizes, args.dim, args.accuracy_n, args.repeats = [64, 96], 32, 64, 2
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        print("no CUDA device: run on a GPU machine, or use --dry-run", file=sys.stderr)
        return 2
    start = time.monotonic()
    name, header = environment(args)
    peers, notes = peer_losses() if args.device == "cuda" else ({}, ["peers: GPU only"])
    available = pyclloss.backends()
    usable = [b for b in BACKENDS if available[b][0]] if args.device == "cuda" else \
        [b for b in ("cpp", "reference") if available[b][0]]
    notes += [f"backend {b} not available: {available[b][1]}"
              for b in BACKENDS if args.device == "cuda" and not available[b][0]]
    impls = usable + [p for p in PEERS if p in peers]

    rates = {}
    for dtype_name in args.dtypes:
        size = 8192 if args.device == "cuda" else 256
        rates[dtype_name] = matmul_rate(getattr(torch, dtype_name), args.device, size)
    rate_line = "- dense matmul: " + ", ".join(
        f"{k} {v:.0f} TFLOP/s" if v >= 10 else f"{k} {v:.2f} TFLOP/s" for k, v in rates.items()) + \
        f" ({8192 if args.device == 'cuda' else 256}³ torch.matmul, fp32 without TF32)"
    print("\n".join(header + [rate_line]), flush=True)

    speed = run_speed(args, impls, peers, Clock(args.device), start + args.time_budget)
    accuracy = run_accuracy(args, impls, peers)
    lines = ([f"# pyclloss GPU benchmark: {name}", ""] + header + [rate_line, ""] +
             speed_tables(args, impls, speed, rates) + accuracy_tables(args, impls, accuracy) +
             ["Notes:", ""] + [f"- {note}" for note in notes] +
             [f"- wall time of this run: {time.monotonic() - start:.0f} s", ""])
    report = "\n".join(lines)
    print(flush=True)
    publish(report, None if args.dry_run else args.out or results_path(f"gpu-{slug(name)}.md"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
