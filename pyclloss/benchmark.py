"""Benchmark of the InfoNCE losses: forward+backward time and peak extra memory
of each backend and of pytorch-metric-learning, as a markdown table.

Each (loss, implementation, N) runs in a fresh subprocess, so that peak memory
is that run's alone: on the CPU it is the growth of the process's peak resident
set (VmHWM, reset through /proc/self/clear_refs) over the resident set with
the inputs in place; on CUDA, ``torch.cuda.max_memory_allocated`` over the
inputs. Times are medians of ``--repeats`` runs after one warm-up.

    python bench/run.py --sizes 1024 2048 4096 8192 16384 --out bench/results/cpu-info_nce.md
"""

import argparse
import datetime
import importlib.util
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from typing import Dict, List, Optional

LOSSES = ("supcon", "nt_xent")
IMPLS = ("cpp", "triton", "cuda", "reference", "pml")
GIB = 1024 ** 3


def _inputs(loss: str, n: int, d: int, device: str, dtype):
    import torch

    gen = torch.Generator(device="cpu").manual_seed(n)
    x = torch.randn(n, d, generator=gen).to(device=device, dtype=dtype).requires_grad_()
    labels = torch.randint(0, max(2, n // 8), (n,), generator=gen).to(device)
    return x, labels


def _step_fn(loss: str, impl: str, x, labels):
    """A closure running one forward+backward of ``loss`` with ``impl``."""
    import torch

    import pyclloss

    b = x.shape[0] // 2
    if impl == "pml":
        from pytorch_metric_learning import losses as pml

        if loss == "supcon":
            fn = pml.SupConLoss(temperature=0.1)
            call = lambda: fn(x, labels)
        else:
            fn = pml.NTXentLoss(temperature=0.5)
            views = torch.cat([torch.arange(b)] * 2).to(x.device)
            call = lambda: fn(x[: 2 * b], views)
    elif loss == "supcon":
        call = lambda: pyclloss.supcon(x, labels, 0.1, backend=impl)
    else:
        call = lambda: pyclloss.nt_xent(x[:b], x[b: 2 * b], 0.5, backend=impl)

    def step():
        x.grad = None
        call().backward()

    return step


def _pml_estimated_bytes(loss: str, n: int) -> float:
    # NTXentLoss with labels builds a (positive pairs x negative pairs) matrix:
    # about 16·n³ bytes (measured: 2.1 GiB at n = 512).
    return 16.0 * n ** 3 if loss == "nt_xent" else 4.0 * 8 * n * n


def _reference_estimated_bytes(n: int) -> float:
    return 4.0 * 6 * n * n  # logits, masks, softmax and their gradients


def _rss_bytes(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"{field} not in /proc/self/status")


def measure_one(loss: str, impl: str, n: int, d: int, device: str, dtype_name: str,
                repeats: int) -> Dict:
    """Time and peak extra memory of one configuration, in this process."""
    import torch

    dtype = getattr(torch, dtype_name)
    # One-time library set-up (thread pools, JIT-compiled GEMM kernels) is not
    # memory of the loss: a tiny call first keeps it out of the peak.
    _step_fn(loss, impl, *_inputs(loss, 64, d, device, dtype))()
    x, labels = _inputs(loss, n, d, device, dtype)
    step = _step_fn(loss, impl, x, labels)
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # resets VmHWM to the current resident set
        base = _rss_bytes("VmRSS")
    step()
    sync()
    peak = (torch.cuda.max_memory_allocated() if device == "cuda" else _rss_bytes("VmHWM")) - base
    step()  # warm-up
    times = []
    for _ in range(repeats):
        sync()
        t0 = time.perf_counter()
        step()
        sync()
        times.append(time.perf_counter() - t0)
    return {"time_s": statistics.median(times), "peak_bytes": max(peak, 0)}


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


def _available_impls(device: str) -> List[str]:
    import torch

    import pyclloss
    from pyclloss.backends import resolve

    impls = []
    for name, (ok, _) in pyclloss.backends().items():
        try:
            if ok and resolve(name, torch.device(device)) == name:
                impls.append(name)
        except ValueError:
            pass
    if importlib.util.find_spec("pytorch_metric_learning") is not None:
        impls.append("pml")
    return [i for i in IMPLS if i in impls]


def _header(args) -> str:
    import torch

    import pyclloss
    from pyclloss.energy import cpu_model

    if args.device == "cuda":
        machine = f"GPU {torch.cuda.get_device_name()}"
    else:
        machine = f"CPU {cpu_model()}, {os.cpu_count()} cores, {torch.get_num_threads()} threads"
    cmd = "python bench/run.py " + " ".join(sys.argv[1:])
    return (f"# InfoNCE losses: forward+backward\n\n"
            f"- machine: {machine}\n"
            f"- date: {datetime.date.today().isoformat()}\n"
            f"- versions: pyclloss {pyclloss.__version__}, torch {torch.__version__}, "
            f"python {platform.python_version()}\n"
            f"- command: `{cmd}`\n"
            f"- D = {args.dim}, {args.dtype}, median of {args.repeats} after warm-up; "
            f"peak = extra memory over the inputs after a tiny warm-up call (fresh process per cell)\n")


def _cell(result: Optional[Dict]) -> str:
    if result is None:
        return "—"
    if "error" in result:
        return result["error"]
    return f"{result['time_s'] * 1e3:,.0f} ms / {result['peak_bytes'] / 2**20:,.0f} MiB"


def run(args) -> str:
    impls = [i for i in _available_impls(args.device) if not args.impls or i in args.impls]
    lines = [_header(args), "Each cell: time / peak extra memory. Speed-up = reference time / "
             "fused time, same run.\n"]
    budget = args.memory_gib * GIB
    for loss in args.losses:
        lines.append(f"\n## {loss}\n")
        lines.append("| N | " + " | ".join(impls) + " | speed-up |")
        lines.append("|---" * (len(impls) + 2) + "|")
        for n in args.sizes:
            results = {}
            for impl in impls:
                estimate = (_pml_estimated_bytes(loss, n) if impl == "pml" else
                            _reference_estimated_bytes(n) if impl == "reference" else 0)
                if estimate > budget:
                    results[impl] = {"error": f"skipped: needs ~{estimate / GIB:,.0f} GiB"}
                    continue
                results[impl] = _run_isolated(args, loss, impl, n)
                print(f"{loss} N={n} {impl}: {_cell(results[impl])}", file=sys.stderr, flush=True)
            fused = next((results[i] for i in ("cuda", "cpp", "triton") if i in results
                          and "time_s" in results[i]), None)
            base = results.get("reference")
            speedup = (f"{base['time_s'] / fused['time_s']:.1f}×"
                       if fused and base and "time_s" in base else "—")
            lines.append(f"| {n} | " + " | ".join(_cell(results.get(i)) for i in impls)
                         + f" | {speedup} |")
    return "\n".join(lines) + "\n"


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
    p.add_argument("--out", help="also write the markdown table to this file")
    p.add_argument("--single", nargs=3, metavar=("LOSS", "IMPL", "N"), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.single:
        loss, impl, n = args.single
        print(json.dumps(measure_one(loss, impl, int(n), args.dim, args.device, args.dtype,
                                     args.repeats)))
        return 0
    table = run(args)
    print(table)
    if args.out:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "w") as f:
            f.write(table)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
