"""The ``pyclloss`` console script: ``info`` and ``bench``."""

import argparse
import platform
import sys
from typing import List, Optional


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def info(args: argparse.Namespace) -> int:
    import torch

    import pyclloss
    from pyclloss.backends import resolve

    print(f"pyclloss {pyclloss.__version__}")
    print(f"python   {platform.python_version()} ({sys.executable})")
    print(f"torch    {torch.__version__} (CUDA {torch.version.cuda or 'none'})")
    try:
        import triton

        print(f"triton   {triton.__version__}")
    except ImportError:
        print("triton   not installed")
    print(f"cpu      {_cpu_model()}, {torch.get_num_threads()} torch threads")
    if torch.cuda.is_available():
        print(f"gpu      {torch.cuda.get_device_name()}")
    print("backends:")
    for name, (available, reason) in pyclloss.backends().items():
        print(f"  {name:<10} {'yes' if available else 'no ':<4} {reason}")
    for device in ("cpu",) + (("cuda",) if torch.cuda.is_available() else ()):
        print(f"auto on {device}: {resolve('auto', torch.device(device))}")
    return 0


def bench(args: argparse.Namespace) -> int:
    from pyclloss.benchmark import main as bench_main

    return bench_main(args.rest)


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="pyclloss", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("info", help="versions and available backends").set_defaults(func=info)
    p = sub.add_parser("bench", help="benchmark table of the InfoNCE losses (pyclloss bench --help)")
    p.add_argument("rest", nargs=argparse.REMAINDER)
    p.set_defaults(func=bench)
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    raise SystemExit(main())
