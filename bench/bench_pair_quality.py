"""DCL, HCL and decoupled NT-Xent (pyclloss.pair_quality): forward+backward time
and peak extra memory of the fused backends, which run the InfoNCE core's
per-row statistics, against the dense reference; the ``dcl``, ``hcl`` and
``decoupled`` workloads of `pyclloss bench` (pyclloss/tools/workloads.py).

    python bench/bench_pair_quality.py --sizes 8192 --out bench/results/cpu-pair_quality.md
"""

import sys

from pyclloss.tools.benchmark import main

if __name__ == "__main__":
    raise SystemExit(main(["--losses", "dcl", "hcl", "decoupled", *sys.argv[1:]]))
