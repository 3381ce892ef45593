"""Energy benchmark, fp32 vs mixed precision (same as `pyclloss energy`)."""

from pyclloss.tools.energy_benchmark import main

if __name__ == "__main__":
    raise SystemExit(main())
