"""Benchmark of the gated-subspace loss (pyclloss.gated_info_nce): fused backends
against the reference, whose B×N×K tensor of gated keys is what the fused
kernels avoid; the ``gated`` rows of `pyclloss bench` at the issue's K = 256.

    python bench/bench_gated.py --sizes 1024 2048 8192 --out bench/results/cpu-gated_info_nce.md
"""

import sys

from pyclloss.tools.benchmark import main

if __name__ == "__main__":
    raise SystemExit(main(["--losses", "gated", "--dim", "256", *sys.argv[1:]]))
