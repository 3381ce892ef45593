"""The benchmark report (same as `pyclloss bench`)."""

from pyclloss.tools.benchmark import main

if __name__ == "__main__":
    raise SystemExit(main())
