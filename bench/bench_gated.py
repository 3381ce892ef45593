"""Benchmark of the gated-subspace loss (pyclloss.gated_info_nce): forward+backward
time and peak extra memory of the fused backends and of the reference, whose
B×N×K tensor of gated keys is what the fused kernels avoid.

Each (implementation, size) runs in a fresh subprocess so that its peak is its
own: on the CPU the growth of the peak resident set (VmHWM, reset through
/proc/self/clear_refs) over the resident set with the inputs in place; on CUDA
``torch.cuda.max_memory_allocated`` over the inputs. Times are medians of
``--repeats`` runs after one warm-up.

    python bench/bench_gated.py --sizes 1024 8192 --out bench/results/cpu-gated_info_nce.md
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

IMPLS = ("cpp", "triton", "cuda", "reference")
GIB = 1024 ** 3


def _inputs(b, k, classes, device, dtype):
    import torch

    gen = torch.Generator().manual_seed(b)
    leaf = lambda *shape: torch.randn(*shape, generator=gen).to(device, dtype).requires_grad_()  # noqa: E731
    q, keys = leaf(b, k), leaf(b, k)
    gates = torch.rand(b, k, generator=gen).to(device, dtype).requires_grad_()
    labels = torch.randint(0, classes, (b,), generator=gen).to(device)
    partner = labels[torch.randperm(b, generator=gen).to(device)]
    return q, keys, gates, labels, partner


def measure_one(impl, b, k, classes, device, dtype_name, repeats):
    """Time and peak extra memory of forward+backward at B = N = b, in this process."""
    import torch

    import pyclloss
    from pyclloss.benchmark import _rss_bytes

    dtype = getattr(torch, dtype_name)

    def step_for(inputs):
        q, keys, gates, labels, partner = inputs

        def step():
            q.grad = keys.grad = gates.grad = None
            pyclloss.gated_info_nce(q, keys, gates, labels, partner, labels,
                                    backend=impl).backward()
        return step

    step_for(_inputs(64, k, classes, device, dtype))()  # one-time set-up out of the peak
    step = step_for(_inputs(b, k, classes, device, dtype))
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        base = _rss_bytes("VmRSS")
    step()
    sync()
    peak = (torch.cuda.max_memory_allocated() if device == "cuda" else _rss_bytes("VmHWM")) - base
    times = []
    for _ in range(repeats):
        sync()
        t0 = time.perf_counter()
        step()
        sync()
        times.append(time.perf_counter() - t0)
    return {"time_s": statistics.median(times), "peak_bytes": max(peak, 0)}


def _reference_estimated_bytes(b, k):
    return 4.0 * 4 * b * b * k  # gated keys, normalised, and their gradients (fp32)


def _run_isolated(args, impl, b):
    cmd = [sys.executable, os.path.abspath(__file__), "--single", impl, str(b), "--dim",
           str(args.dim), "--classes", str(args.classes), "--device", args.device, "--dtype",
           args.dtype, "--repeats", str(args.repeats)]
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="131072")  # frees go back to the OS
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=args.timeout, env=env)
    if proc.returncode != 0:
        tail = (proc.stderr.strip().splitlines() or ["failed"])[-1]
        return {"error": "out of memory" if "memory" in tail.lower() else tail[:80]}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _cell(result):
    if result is None:
        return "—"
    if "error" in result:
        return result["error"]
    return f"{result['time_s'] * 1e3:,.0f} ms / {result['peak_bytes'] / 2**20:,.1f} MiB"


def run(args):
    import torch

    import pyclloss
    from pyclloss.backends import resolve
    from pyclloss.energy import cpu_model
    from pyclloss.ops.gated_info_nce import BACKENDS

    device = torch.device(args.device)
    impls = []
    for name in IMPLS:
        try:
            if name in BACKENDS and resolve(name, device, BACKENDS) == name:
                impls.append(name)
        except (ValueError, RuntimeError):
            pass
    machine = (f"GPU {torch.cuda.get_device_name()}" if args.device == "cuda" else
               f"CPU {cpu_model()}, {os.cpu_count()} cores, {torch.get_num_threads()} threads")
    lines = [
        "# gated_info_nce (Hydra / SimLAP gated subspaces): forward+backward\n",
        f"- machine: {machine}",
        f"- date: {datetime.date.today().isoformat()}",
        f"- versions: pyclloss {pyclloss.__version__}, torch {torch.__version__}, "
        f"python {platform.python_version()}",
        f"- command: `python bench/bench_gated.py {' '.join(sys.argv[1:])}`",
        f"- B = N, K = {args.dim}, {args.classes} classes, {args.dtype}, median of "
        f"{args.repeats} after warm-up; peak = extra memory over the inputs (fresh process "
        "per cell)\n",
        "Each cell: time / peak extra memory. Speed-up = reference time / fused time, same run.\n",
        "| B = N | " + " | ".join(impls) + " | speed-up |",
        "|---" * (len(impls) + 2) + "|",
    ]
    for b in args.sizes:
        results = {}
        for impl in impls:
            estimate = _reference_estimated_bytes(b, args.dim) if impl == "reference" else 0
            if estimate > args.memory_gib * GIB:
                results[impl] = {"error": f"skipped: needs ~{estimate / GIB:,.0f} GiB"}
                continue
            results[impl] = _run_isolated(args, impl, b)
            print(f"B={b} {impl}: {_cell(results[impl])}", file=sys.stderr, flush=True)
        fused = next((results[i] for i in ("cuda", "cpp", "triton")
                      if "time_s" in results.get(i, {})), None)
        base = results.get("reference", {})
        speedup = f"{base['time_s'] / fused['time_s']:.0f}×" if fused and "time_s" in base else "—"
        lines.append(f"| {b} | " + " | ".join(_cell(results.get(i)) for i in impls)
                     + f" | {speedup} |")
    return "\n".join(lines) + "\n"


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", nargs="+", type=int, default=[1024, 2048, 8192])
    p.add_argument("--dim", type=int, default=256)
    p.add_argument("--classes", type=int, default=100)
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    p.add_argument("--dtype", default="float32", choices=("float32", "float16", "bfloat16"))
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--memory-gib", type=float, default=8.0,
                   help="skip the reference where it is estimated to need more than this")
    p.add_argument("--timeout", type=float, default=600.0, help="seconds per cell")
    p.add_argument("--out", help="also write the markdown table to this file")
    p.add_argument("--single", nargs=2, metavar=("IMPL", "B"), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.single:
        impl, b = args.single
        print(json.dumps(measure_one(impl, int(b), args.dim, args.classes, args.device,
                                     args.dtype, args.repeats)))
        return 0
    table = run(args)
    print(table)
    if args.out:
        with open(args.out, "w") as f:
            f.write(table)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
