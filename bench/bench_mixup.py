"""SupReMix and Rank-N-Contrast: forward+backward time and peak memory of the
fused backend against the reference formulas, the ``supremix`` and ``rnc``
workloads of `pyclloss bench` (pyclloss/tools/workloads.py), each at its own
sizes unless --sizes is given (SupReMix's reference builds n×n×n tensors).

    python bench/bench_mixup.py --out bench/results/cpu-mixup.md
    python bench/bench_mixup.py --device cuda      # Triton
"""

import sys

from pyclloss.tools.benchmark import main

if __name__ == "__main__":
    raise SystemExit(main(["--losses", "supremix", "rnc", *sys.argv[1:]]))
