"""`pyclloss bench`: every cell's step runs and differentiates, and the report
and plot are built from the measurements."""

import pytest
import torch

from pyclloss import benchmark


def _impls(loss):
    here = [b for b in benchmark._backends_here("cpu") if b != "triton"]  # interpreter: slow
    peers = benchmark._peers_here("cpu")
    return here + [p for p in benchmark.PEERS[loss] if not peers[p]]


@pytest.mark.parametrize("loss", benchmark.LOSSES)
def test_every_implementation_computes_the_same_loss(loss):
    """The columns of one table measure the same computation."""
    values = {}
    for impl in _impls(loss):
        inputs = benchmark._inputs(loss, 24, 16, "cpu", torch.float64 if impl != "diffsort"
                                   else torch.float32)
        values[impl] = benchmark._loss_call(loss, impl, inputs)().item()
        benchmark._step_fn(loss, impl, inputs)()
        assert all(t.grad is not None and torch.isfinite(t.grad).all()
                   for t in inputs.values() if t.requires_grad), impl
    assert len(values) >= 2
    first = next(iter(values.values()))
    for impl, value in values.items():
        assert value == pytest.approx(first, rel=1e-4), (impl, values)


def test_measure_one_reports_time_and_memory():
    result = benchmark.measure_one("supcon", "reference", 64, 16, "cpu", "float32", 1)
    assert result["time_s"] > 0 and result["peak_bytes"] >= 0


def test_report_and_plot(tmp_path):
    measured = {"peers": {"pml": "", "inf_cl": "Inf-CL runs on CUDA only"},
                "results": {"supcon": {
                    "cpp": {64: {"time_s": 0.001, "peak_bytes": 2**20}},
                    "reference": {64: {"time_s": 0.004, "peak_bytes": 2**22}},
                    "pml": {64: {"error": "skipped: needs ~20 GiB"}}}}}
    ns = type("Args", (), dict(sizes=[64], dim=16, dtype="float32", repeats=1, device="cpu",
                               command=["--sizes", "64"]))
    report = benchmark.markdown(ns, measured, "r.png")
    row = next(line for line in report.splitlines() if line.startswith("| 64 |"))
    assert row == ("| 64 | 1.0 ms / 1 MiB | 4.0 ms / 4 MiB | skipped: needs ~20 GiB | 4.0× |")
    assert "Inf-CL runs on CUDA only" in report and "![time and memory against N](r.png)" in report
    pytest.importorskip("matplotlib")
    assert benchmark.plot(measured, str(tmp_path / "r.png")).startswith("plot:")
    assert (tmp_path / "r.png").stat().st_size > 0


def test_bad_sizes_are_rejected(capsys):
    with pytest.raises(SystemExit):
        benchmark.main(["--sizes", "1"])
    assert "--sizes" in capsys.readouterr().err


def test_effective_rate_column():
    """InfoNCE cells carry the matmul rate of their process; the fused backend's
    8·N²·D / time is shown against it."""
    assert benchmark.effective_flops(64, 16) == 8 * 64 * 64 * 16
    assert benchmark.matmul_flops("cpu", size=64, repeats=1) > 0
    rate = 10e9
    time_s = benchmark.effective_flops(64, 16) / (rate / 2)  # half the matmul's rate
    measured = {"peers": {}, "results": {"supcon": {
        "cpp": {64: {"time_s": time_s, "peak_bytes": 0, "matmul_flops": rate}},
        "reference": {64: {"time_s": 4 * time_s, "peak_bytes": 0, "matmul_flops": rate}}}}}
    ns = type("Args", (), dict(sizes=[64], dim=16, dtype="float32", repeats=1, device="cpu",
                               command=["--sizes", "64"]))
    report = benchmark.markdown(ns, measured, None)
    assert "| N | cpp | reference | speed-up | fused rate = × matmul (matmul GFLOP/s) |" in report
    row = next(line for line in report.splitlines() if line.startswith("| 64 |"))
    assert row.endswith("| 4.0× | 5 GFLOP/s = 0.50× (10) |")
