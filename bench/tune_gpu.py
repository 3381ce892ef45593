"""Tunes the Triton InfoNCE kernel on this GPU and records the result in
triton_kernels/tuned.json, so that later runs on the same card model start
with the measured tile configurations (no autotuning) and ``backend="auto"``
picks the faster of the cuda and triton backends.

    python bench/tune_gpu.py                       # D in 128 256 512 1024, bf16 and fp32
    python bench/tune_gpu.py --dry-run             # the interpreter, tiny sizes: checks this script

1. Compile: worker processes compile every candidate configuration of the two
   passes a CLIP step runs (forward with column statistics, gradient chunks)
   for each D and operand precision, on small inputs; Triton's cache on disk
   is shared, so the timing below loads them instead of compiling one by one.
2. Tune: for each D and precision, a CLIP forward+backward at N = M = --n with
   autotuning on and the recorded data ignored picks each pass's fastest
   configuration on the call's own inputs.
3. Backend: the same step timed on the cuda backend (when built); the faster
   of the two becomes ``auto``'s choice for the InfoNCE family.

Precisions: bfloat16, float16, float32-tf32 (TF32 allowed), float32-tf32x3
(TF32 not allowed: three TF32 products per tile).
"""

import argparse
import concurrent.futures
import json
import os
import statistics
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

PRECISIONS = {  # name: (dtype, TF32 allowed)
    "bfloat16": ("bfloat16", False),
    "float16": ("float16", False),
    "float32-tf32": ("float32", True),
    "float32-tf32x3": ("float32", False),
}
TUNED_FILE = os.path.join(ROOT, "triton_kernels", "tuned.json")


def _set_precision(precision: str):
    import torch

    dtype_name, tf32 = PRECISIONS[precision]
    torch.backends.cuda.matmul.allow_tf32 = tf32
    return getattr(torch, dtype_name)


def _clip_step(n: int, d: int, dtype, device: str, backend: str, seed: int = 0):
    """A CLIP forward+backward on fresh unit-norm inputs, as a callable."""
    import torch
    import torch.nn.functional as F

    import pyclloss

    gen = torch.Generator(device="cpu").manual_seed(seed)
    img = F.normalize(torch.randn(n, d, generator=gen), dim=1).to(device, dtype).requires_grad_()
    txt = F.normalize(torch.randn(n, d, generator=gen), dim=1).to(device, dtype).requires_grad_()
    scale = torch.tensor(1 / 0.07, device=device).requires_grad_()

    def step():
        img.grad = txt.grad = scale.grad = None
        pyclloss.clip_loss(img, txt, scale, backend=backend).backward()

    return step


def _compile_job(job):
    """Worker: runs every candidate configuration once on small inputs (compiles them)."""
    precision, d, device = job
    from pyclloss.triton_kernels import info_nce as tri
    from pyclloss.triton_kernels import tuning

    dtype = _set_precision(precision)
    failures = []
    for config in tri._candidates(dtype, d):
        tuning.CHOSEN.clear()
        original = tuning.choose
        tuning.choose = lambda *args, _config=config, **kwargs: _config
        try:
            _clip_step(512, d, dtype, device, "triton")()
        except Exception as exc:  # a configuration that does not build here is reported
            failures.append(f"{precision} D={d} {config}: {type(exc).__name__}: "
                            f"{str(exc).splitlines()[0][:200] if str(exc) else ''}")
        finally:
            tuning.choose = original
    return failures


def compile_all(precisions, dims, device, workers):
    jobs = [(p, d, device) for p in precisions for d in dims]
    if workers <= 1:
        return [f for job in jobs for f in _compile_job(job)]
    ctx = __import__("multiprocessing").get_context("spawn")
    with concurrent.futures.ProcessPoolExecutor(workers, mp_context=ctx) as pool:
        return [f for result in pool.map(_compile_job, jobs) for f in result]


def _median_ms(step, device, repeats=10):
    import torch

    step()
    times = []
    for _ in range(repeats):
        if device == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            step()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            step()
            times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def tune(precisions, dims, n, device, deadline):
    """{precision: {bucket: {kernel: entry}}}, and backend timings {precision: {bucket: {...}}}."""
    import pyclloss
    from pyclloss.triton_kernels import tuning

    os.environ["PYCLLOSS_TUNED"] = "0"  # measure, do not read the recorded data
    tuning._tuned.cache_clear()
    configs, backends = {}, {}
    has_cuda = pyclloss.backends()["cuda"][0]
    for precision in precisions:
        for d in dims:
            if time.monotonic() > deadline:
                print(f"time budget: {precision} D={d} not tuned", flush=True)
                continue
            dtype = _set_precision(precision)
            tuning.CHOSEN.clear()
            step = _clip_step(n, d, dtype, device, "triton")
            times = {"triton": _median_ms(step, device)}
            if has_cuda:
                times["cuda"] = _median_ms(_clip_step(n, d, dtype, device, "cuda"), device)
            bucket = str(tuning.bucket(d))
            configs.setdefault(precision, {})[bucket] = {
                kernel: entry for (kernel, _, _), entry in tuning.CHOSEN.items()}
            backends.setdefault(precision, {})[bucket] = times
            print(f"{precision:15s} D={d:5d} N={n}: " +
                  ", ".join(f"{k} {v:.3f} ms" for k, v in times.items()) + "; " +
                  "; ".join(f"{kernel} {entry['config']}"
                            for (kernel, _, _), entry in tuning.CHOSEN.items()), flush=True)
    return configs, backends


def record(card, configs, backends, n, path):
    """Merges this card's measurements into tuned.json (other cards kept)."""
    data = {}
    if os.path.exists(path):
        with open(path) as f:
            data = json.load(f)
    entry = data.setdefault(card, {})
    entry.setdefault("measured", {})["info_nce"] = (
        f"{time.strftime('%Y-%m-%d')}, CLIP forward+backward at N = M = {n}, "
        "median time per configuration (triton.testing.do_bench)")
    kernels = entry.setdefault("configs", {})
    for precision, by_bucket in configs.items():
        for bucket, by_kernel in by_bucket.items():
            for kernel, chosen in by_kernel.items():
                kernels.setdefault(kernel, {}).setdefault(precision, {})[bucket] = chosen["config"]
    timings = entry.setdefault("times_ms", {})
    auto = entry.setdefault("auto", {}).setdefault("info_nce", {})
    for precision, by_bucket in backends.items():
        for bucket, times in by_bucket.items():
            timings.setdefault(precision, {})[bucket] = {k: round(v, 4) for k, v in times.items()}
            auto.setdefault(precision, {})[bucket] = min(times, key=times.get)
    with open(path, "w") as f:
        json.dump(data, f, indent=1, sort_keys=True)
        f.write("\n")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dims", type=int, nargs="+", default=[128, 256, 512, 1024])
    parser.add_argument("--precisions", nargs="+", choices=list(PRECISIONS),
                        default=["bfloat16", "float32-tf32", "float32-tf32x3"])
    parser.add_argument("--n", type=int, default=8192, help="rows of the tuning problem")
    parser.add_argument("--workers", type=int, default=8, help="compile processes")
    parser.add_argument("--time-budget", type=float, default=120.0,
                        help="seconds for the tuning runs (compiling not counted)")
    parser.add_argument("--out", default=TUNED_FILE, help="the tuned.json to update")
    parser.add_argument("--compile-only", action="store_true",
                        help="step 1 alone (e.g. while the CUDA extension builds)")
    parser.add_argument("--skip-compile", action="store_true", help="steps 2 and 3 alone")
    parser.add_argument("--dry-run", action="store_true",
                        help="Triton's interpreter on the CPU, tiny sizes; writes --out only "
                             "if given explicitly")
    args = parser.parse_args(argv)
    if args.dry_run:
        os.environ["TRITON_INTERPRET"] = "1"
        args.dims, args.n, args.workers = [32], 64, 1
        args.precisions = ["float16", "float32-tf32x3"]
    import torch

    device = "cpu" if args.dry_run else "cuda"
    if device == "cuda" and not torch.cuda.is_available():
        print("no CUDA device: run on a GPU machine, or use --dry-run", file=sys.stderr)
        return 2
    from pyclloss.triton_kernels import tuning

    if not args.skip_compile:
        start = time.monotonic()
        failures = compile_all(args.precisions, args.dims, device, args.workers)
        print(f"compiled the candidates in {time.monotonic() - start:.0f} s; "
              f"{len(failures)} did not build", flush=True)
        for failure in failures:
            print("  " + failure, flush=True)
    if args.compile_only:
        return 0
    configs, backends = tune(args.precisions, args.dims, args.n, device,
                             time.monotonic() + args.time_budget)
    if not args.dry_run or "--out" in " ".join(argv or sys.argv[1:]):
        record(tuning.card_key(), configs, backends, args.n, args.out)
        print(f"wrote {args.out}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
