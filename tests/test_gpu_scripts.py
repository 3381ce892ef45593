"""The scripts of bench/gpu_check.sh's stages work, here on the CPU.

A script that breaks on an argument, a report format or the tuned.json it
writes would otherwise show only on a GPU. Each script's --dry-run runs the
same code paths on tiny sizes (Triton's interpreter, or the cpp backend); these
tests run them and check what they computed and wrote.
"""

import json
import os
import subprocess
import sys

import pytest
import torch

from helpers import env_without_interpreter

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _run(*args, timeout=600):
    done = subprocess.run([sys.executable, *args], cwd=ROOT, env=env_without_interpreter(),
                          capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, (done.stdout + done.stderr)[-3000:]
    return done.stdout


def _table_rows(text: str, first_cell: str):
    """The cells of the markdown table rows whose first cell is ``first_cell``."""
    rows = []
    for line in text.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if line.startswith("|") and cells[0] == first_cell:
            rows.append(cells)
    return rows


def test_tune_gpu_writes_configurations_that_tuning_reads_back(tmp_path, monkeypatch):
    pytest.importorskip("triton")
    from pyclloss.triton_kernels import tuning

    out = tmp_path / "tuned.json"
    kept = {"some-card": {"auto": {"sorting": {"float32-tf32": {"32": "cuda"}}}}}
    out.write_text(json.dumps(kept))
    log = _run("bench/tune_gpu.py", "--dry-run", "--out", str(out))
    assert "0 did not build" in log, log
    data = json.loads(out.read_text())
    assert data["some-card"] == kept["some-card"]  # other cards' entries are merged, not lost
    card = data["interpreter"]
    for precision in ("float16", "float32-tf32x3"):
        assert card["auto"]["info_nce"][precision] == {"32": "triton"}  # cuda is not built here
        assert card["times_ms"][precision]["32"]["triton"] > 0
    monkeypatch.setattr(tuning, "_TUNED_FILE", str(out))
    monkeypatch.delenv("PYCLLOSS_TUNED", raising=False)
    tuning._tuned.cache_clear()
    try:
        for kernel in ("info_nce.lse", "info_nce.grad"):
            recorded = card["configs"][kernel]["float16"]["32"]
            assert {"BLOCK_M", "BLOCK_N", "BLOCK_D", "num_warps"} <= set(recorded)
            # what a launch at D = 20 or 64 on that card would use: D's bucket, else the nearest
            assert tuning.tuned_config(kernel, "float16", 20, card="interpreter") == recorded
            assert tuning.tuned_config(kernel, "float16", 64, card="interpreter") == recorded
        assert tuning.preferred_backend("info_nce", torch.float16, 32,
                                        card="interpreter") == "triton"
    finally:
        tuning._tuned.cache_clear()


def test_the_clip_grid_reports_exact_fused_and_dense_results():
    pytest.importorskip("triton")
    report = _run("bench/bench_gpu_grid.py", "--dry-run")
    rows = _table_rows(report, "float32")
    assert rows, report
    for cells in rows:
        # | mode | N | D | triton | err | dense | err | ...: fp32 without TF32 holds 1e-4
        assert float(cells[4]) < 1e-4 and float(cells[6]) < 1e-4, cells
    assert "Headline" in report and "Inf-CL" in report


def test_the_infonce_benchmark_times_every_loss_and_is_exact():
    report = _run("bench/bench_gpu.py", "--dry-run")
    for loss in ("clip_loss", "supcon"):
        assert f"### {loss} forward+backward" in report, report
    for dtype in ("bfloat16", "float32"):
        timed = [cells for cells in _table_rows(report, dtype) if "ms [" in cells[2]]
        # two losses at two sizes, each timed on cpp and the reference
        assert len(timed) == 4 and all("ms [" in cell for cells in timed for cell in cells[2:]), \
            timed
    errors = _table_rows(report, "cpp") + _table_rows(report, "reference")
    assert len(errors) == 8, errors  # two losses, two dtypes
    for cells in errors:
        bound = 2e-2 if cells[1] == "bfloat16" else 1e-4
        assert all(float(err) < bound for err in cells[2:]), cells


def test_the_sorting_check_compares_with_diffsort():
    pytest.importorskip("diffsort")
    report = _run("bench/bench_sorting.py", "--gpu-check", "--dry-run")
    rows = [cells for network in ("odd_even", "bitonic") for cells in _table_rows(report, network)]
    fused = [cells for cells in rows if cells[2] != "diffsort"]
    assert len(fused) == 4 and all(cells[5].endswith("x") for cells in fused), rows
    # | network | dtype | implementation | ms | MiB | speed-up | memory | diff sorted, P | diff grad x |
    assert all(float(cells[-2]) < 1e-4 and float(cells[-1]) < 1e-3
               for cells in fused if cells[1] == "float32"), fused
