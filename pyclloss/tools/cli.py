"""The ``pyclloss`` console script: ``info``, ``train``, ``bench`` and ``energy``."""

import argparse
import platform
import sys
from typing import List, Optional


def version() -> str:
    import pyclloss

    return f"pyclloss {pyclloss.__version__}"


def info(args: argparse.Namespace) -> int:
    import torch

    import pyclloss
    from pyclloss.backends import extension_status
    from pyclloss.tools.energy import cpu_model

    print(version())
    print(f"python   {platform.python_version()} ({sys.executable})")
    print(f"torch    {torch.__version__} (CUDA {torch.version.cuda or 'none'})")
    print(f"_C       {extension_status()}")
    try:
        import triton

        print(f"triton   {triton.__version__}")
    except ImportError:
        print("triton   not installed")
    print(f"cpu      {cpu_model()}, {torch.get_num_threads()} torch threads")
    if torch.cuda.is_available():
        print(f"gpu      {torch.cuda.get_device_name()}")
    print("backends:")
    for name, (available, reason) in pyclloss.backends().items():
        print(f"  {name:<10} {'yes' if available else 'no ':<4} {reason}")
    print("\n".join(kernel_table()))
    return 0


def kernel_table() -> List[str]:
    """Op family × backend from the kernel registry: yes (kernels, available
    here), no (kernels, backend not available here), - (no kernels); and what
    ``auto`` runs for CPU (and CUDA) tensors."""
    import torch

    import pyclloss
    from pyclloss.backends import BACKENDS, families, resolve

    available = {name: a.available for name, a in pyclloss.backends().items()}
    devices = ("cpu",) + (("cuda",) if torch.cuda.is_available() else ())
    lines = ["kernels (yes: here, no: not available here, -: none):",
             f"  {'family':<16}" + "".join(f"{name:<11}" for name in BACKENDS)
             + "".join(f"auto on {device:<5}" for device in devices).rstrip()]
    for family in families().values():
        cells = ["-" if name not in family.backends else "yes" if available[name] else "no"
                 for name in BACKENDS]
        autos = [resolve("auto", torch.device(device), family.backends) for device in devices]
        lines.append((f"  {family.name:<16}" + "".join(f"{cell:<11}" for cell in cells)
                      + "".join(f"{name:<13}" for name in autos)).rstrip())
    return lines


def bench(argv: List[str]) -> int:
    from pyclloss.tools.benchmark import main as bench_main

    return bench_main(argv)


def train(argv: List[str]) -> int:
    from pyclloss.tools.train.cli import main as train_main

    return train_main(argv)


def energy(argv: List[str]) -> int:
    from pyclloss.tools.energy_benchmark import main as energy_main

    return energy_main(argv)


# Subcommands with parsers of their own get the rest of the command line.
SUBCOMMANDS = {"train": train, "bench": bench, "energy": energy}


def main(argv: Optional[List[str]] = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv and argv[0] in SUBCOMMANDS:
        return SUBCOMMANDS[argv[0]](argv[1:])
    parser = argparse.ArgumentParser(
        prog="pyclloss", description="Fused contrastive-learning losses for PyTorch: "
                                     "versions and backends, the reference trainer, benchmarks.")
    parser.add_argument("--version", action="version", version=version())
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("info", help="versions and available backends").set_defaults(func=info)
    sub.add_parser("train", help="the reference trainer (pyclloss train --help)")
    sub.add_parser("bench", help="time and memory of every backend against the peers "
                                        "(pyclloss bench --help)")
    sub.add_parser("energy", help="fp32 vs mixed-precision energy benchmark (pyclloss energy --help)")
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    raise SystemExit(main())
