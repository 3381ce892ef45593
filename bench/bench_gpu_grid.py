"""The GPU targets of the CLIP loss: fused against dense PyTorch over N × D × precision.

For every N, D and precision mode, a CLIP forward+backward (open_clip's
formula) is timed on each fused backend (triton, cuda) and on the dense
PyTorch loss a user would otherwise run (``s·I·Tᵀ`` and two cross-entropies;
under autocast for bf16), with the peak extra memory, the effective rate
(8·N²·D over the time) next to a dense matmul of the same precision measured
in this process, and the relative error of the loss and of every gradient
against float64 on the same inputs. Then the headline case: N = 32768,
D = 512, bf16, against Inf-CL when it imports.

    python bench/bench_gpu_grid.py                 # writes bench/results/gpu-grid-<card>.md
    python bench/bench_gpu_grid.py --dry-run       # tiny sizes on the CPU: checks this script

Precision modes: bfloat16; float32-tf32 (TF32 allowed for every matmul, the
fused kernels' tiles included); float32 (TF32 not allowed: the dense loss runs
fp32 matmuls, the fused tiles three TF32 products each).
"""

import argparse
import os
import sys
import time

if "--dry-run" in sys.argv:  # before anything imports triton
    os.environ.setdefault("TRITON_INTERPRET", "1")

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import pyclloss  # noqa: E402
from pyclloss.tools.benchmark import publish  # noqa: E402
from bench_gpu import (Clock, environment, measure, release, results_path,  # noqa: E402
                       short_error, slug)

MODES = {"bfloat16": (torch.bfloat16, False), "float32-tf32": (torch.float32, True),
         "float32": (torch.float32, False)}
TOLERANCE = {"bfloat16": 2e-2, "float32-tf32": 1e-2, "float32": 1e-4}
MIB = 1024 ** 2


def set_mode(mode: str) -> torch.dtype:
    dtype, tf32 = MODES[mode]
    torch.backends.cuda.matmul.allow_tf32 = tf32
    return dtype


def dense_clip(img, txt, scale):
    """open_clip's ClipLoss, written out (its loss.py does exactly this)."""
    logits = scale * img @ txt.T
    labels = torch.arange(img.shape[0], device=img.device)
    return (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels)) / 2


def inf_cl_clip():
    try:
        from inf_cl import cal_inf_loss
    except Exception as exc:
        return None, f"Inf-CL does not import here ({type(exc).__name__})"
    import torch.distributed as dist

    if not dist.is_initialized():  # its scale gradient all-reduces even on one GPU
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", "29531")
        dist.init_process_group("nccl", rank=0, world_size=1)
    # One direction per call: CLIP is the mean of the two directions.
    return (lambda img, txt, scale: (cal_inf_loss(img, txt, scale=scale) +
                                     cal_inf_loss(txt, img, scale=scale)) / 2), None


def implementation(name: str, dtype: torch.dtype, device: str, peers: dict):
    if name == "dense":
        if dtype == torch.bfloat16 and device == "cuda":
            def autocast_dense(img, txt, scale):
                with torch.autocast("cuda", dtype=torch.bfloat16):
                    return dense_clip(img, txt, scale)
            return autocast_dense
        return dense_clip
    if name in peers:
        return peers[name]
    return lambda img, txt, scale: pyclloss.clip_loss(img, txt, scale, backend=name)


def inputs(n: int, d: int, dtype: torch.dtype, device: str, seed: int = 0):
    gen = torch.Generator(device="cpu").manual_seed(seed + n + d)
    img = F.normalize(torch.randn(n, d, generator=gen), dim=1)
    txt = F.normalize(img + 0.7 * torch.randn(n, d, generator=gen), dim=1)
    return [img.to(device, dtype).requires_grad_(), txt.to(device, dtype).requires_grad_(),
            torch.tensor(1 / 0.07, device=device).requires_grad_()]


def step_of(fn, leaves):
    def step():
        for leaf in leaves:
            leaf.grad = None
        fn(*leaves).backward()
    return step


def relative_errors(fn, leaves, exact_loss, exact_grads):
    for leaf in leaves:
        leaf.grad = None
    loss = fn(*leaves)
    loss.backward()
    errs = [abs(loss.item() - exact_loss) / abs(exact_loss)]
    for leaf, want in zip(leaves, exact_grads):
        errs.append(((leaf.grad.double() - want).norm() / want.norm()).item())
    return errs


def exact(leaves):
    doubles = [leaf.detach().double().requires_grad_() for leaf in leaves]
    loss = dense_clip(*doubles)
    loss.backward()
    return loss.item(), [t.grad for t in doubles]


def matmul_rate(mode: str, device: str, size: int) -> float:
    dtype = set_mode(mode)
    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)
    result = measure(lambda: torch.matmul(a, b), Clock(device), seconds=1.0, max_repeats=20)
    return 2 * size ** 3 / result["time_s"] / 1e12


def run_cell(n, d, mode, impls, args, peers, rates, check_accuracy=True):
    dtype = set_mode(mode)
    clock = Clock(args.device)
    leaves = inputs(n, d, dtype, args.device)
    row = {"n": n, "d": d, "mode": mode}
    truth = exact(leaves) if check_accuracy else None
    for impl in impls:
        try:
            fn = implementation(impl, dtype, args.device, peers)
            result = measure(step_of(fn, leaves), clock, args.seconds_per_cell, args.repeats)
            result["tflops"] = 8.0 * n * n * d / result["time_s"] / 1e12
            result["share"] = result["tflops"] / rates[mode]
            if truth is not None:
                result["errors"] = relative_errors(fn, leaves, *truth)
        except Exception as exc:
            result = {"error": short_error(exc)}
        row[impl] = result
        release(args.device)
    del leaves, truth
    release(args.device)
    return row


def fmt_time(r):
    if "error" in r:
        return r["error"]
    return f"{r['time_s'] * 1e3:.2f} ms ({100 * r['share']:.0f}%)"


def fmt_err(r):
    return f"{max(r['errors']):.1e}" if "errors" in r else "—"


def fmt_mem(r):
    return "—" if r.get("peak_bytes") is None else f"{r['peak_bytes'] / MIB:,.0f}"


def verdict(row, fused, mode):
    """Whether the fused backend is at least as fast as dense and within tolerance."""
    f, dense = row.get(fused, {}), row.get("dense", {})
    if "time_s" not in f:
        return "—"
    fast = "time_s" not in dense or f["time_s"] <= dense["time_s"]
    exact_enough = "errors" not in f or max(f["errors"]) <= TOLERANCE[mode]
    return ("yes" if fast else "slower") + ("" if exact_enough else ", inexact")


def report(rows, headline, impls, rates, header, notes):
    lines = header + ["- dense matmul: " + ", ".join(
        f"{mode} {rate:.0f} TFLOP/s" for mode, rate in rates.items()) +
        " (8192³ torch.matmul on random data, same process)", "",
        "## CLIP forward+backward: fused vs dense PyTorch", "",
        "Time: median; in brackets the effective rate 8·N²·D / time as a share of the dense "
        "matmul rate of the same precision. err: largest relative error of the loss and the "
        "three gradients against float64 on the same inputs. 'fused ≤ dense': the faster fused "
        "backend (named) against dense, with the exactness target "
        "(bf16 2e-2, fp32 1e-4; fp32 with TF32 allowed is not held to 1e-4).", "",
        "| mode | N | D | " + " | ".join(f"{i} | err" for i in impls) +
        " | peak MiB " + " / ".join(impls) + " | fused ≤ dense |",
        "|---|---:|---:|" + "---:|---:|" * len(impls) + "---|---|"]
    for row in rows:
        best = min((i for i in impls if i != "dense" and "time_s" in row.get(i, {})),
                   key=lambda i: row[i]["time_s"], default=None)
        lines.append(
            f"| {row['mode']} | {row['n']} | {row['d']} | " +
            " | ".join(f"{fmt_time(row[i])} | {fmt_err(row[i])}" for i in impls) +
            " | " + " / ".join(fmt_mem(row[i]) for i in impls) +
            f" | {verdict(row, best, row['mode']) if best else '—'} ({best}) |")
    if headline:
        cols = [i for i in headline if i not in ("n", "d", "mode")]
        dense_peak = headline.get("dense", {}).get("peak_bytes")
        lines += ["", f"## Headline: N = {headline['n']}, D = {headline['d']}, "
                  f"{headline['mode']}", "",
                  "| implementation | time | TFLOP/s (8·N²·D) | share of matmul | "
                  "peak extra MiB | memory / dense |",
                  "|---|---:|---:|---:|---:|---:|"]
        for impl in cols:
            r = headline[impl]
            if "error" in r:
                lines.append(f"| {impl} | {r['error']} | | | | |")
                continue
            mem = (f"{100 * r['peak_bytes'] / dense_peak:.2f}%"
                   if dense_peak and r.get("peak_bytes") is not None else "—")
            lines.append(f"| {impl} | {r['time_s'] * 1e3:.2f} ms | {r['tflops']:.0f} | "
                         f"{100 * r['share']:.0f}% | {fmt_mem(r)} | {mem} |")
    lines += ["", "Notes:", ""] + [f"- {n}" for n in notes] + [""]
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[4096, 8192, 16384])
    parser.add_argument("--dims", type=int, nargs="+", default=[128, 256, 512, 1024])
    parser.add_argument("--modes", nargs="+", choices=list(MODES), default=list(MODES))
    parser.add_argument("--headline", type=int, nargs=2, default=[32768, 512],
                        metavar=("N", "D"), help="the bf16 headline case (0 0: skip)")
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--seconds-per-cell", type=float, default=0.5)
    parser.add_argument("--time-budget", type=float, default=240.0)
    parser.add_argument("--out", help="default bench/results/gpu-grid-<card>.md")
    parser.add_argument("--dry-run", action="store_true")
    args = parser.parse_args(argv)
    args.device = "cpu" if args.dry_run else "cuda"
    if args.dry_run:
        args.sizes, args.dims, args.headline, args.repeats = [64], [32], [96, 32], 2
        args.modes = ["float32"]
    elif not torch.cuda.is_available():
        print("no CUDA device: run on a GPU machine, or use --dry-run", file=sys.stderr)
        return 2
    start = time.monotonic()
    args.command = "bench/bench_gpu_grid.py"
    name, header = environment(args)
    header = [h.replace("bench/bench_gpu.py", "bench/bench_gpu_grid.py") for h in header]
    available = pyclloss.backends()
    impls = [b for b in ("triton", "cuda") if available[b][0]] + ["dense"]
    notes = [f"backend {b} not available: {available[b][1]}"
             for b in ("triton", "cuda") if not available[b][0]]
    size = 8192 if args.device == "cuda" else 128
    rates = {mode: matmul_rate(mode, args.device, size) for mode in MODES}
    rows = []
    for mode in args.modes:
        for n in args.sizes:
            for d in args.dims:
                if time.monotonic() - start > args.time_budget:
                    notes.append(f"time budget: {mode} N={n} D={d} not run")
                    continue
                rows.append(run_cell(n, d, mode, impls, args, {}, rates))
                print(" | ".join([mode, str(n), str(d)] +
                                 [f"{i} {fmt_time(rows[-1][i])} err {fmt_err(rows[-1][i])}"
                                  for i in impls]), flush=True)
    headline = None
    if args.headline[0] > 0:
        peer, why = inf_cl_clip() if args.device == "cuda" else (None, "Inf-CL: GPU only")
        peers = {"inf_cl": peer} if peer else {}
        if why:
            notes.append(why)
        n, d = args.headline
        headline = run_cell(n, d, "bfloat16", impls + list(peers), args, peers, rates,
                            check_accuracy=False)
        print("headline:", {k: fmt_time(v) for k, v in headline.items()
                            if isinstance(v, dict)}, flush=True)
    notes.append(f"wall time of this run: {time.monotonic() - start:.0f} s")
    text = report(rows, headline, impls, rates, [f"# CLIP on {name}: fused vs dense", ""] +
                  header, notes)
    publish(text, None if args.dry_run else args.out or results_path(f"gpu-grid-{slug(name)}.md"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
