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


@pytest.mark.parametrize("argv, message", [
    (["--sizes", "1"], "--sizes must be at least 2, got 1"),
    (["--dim", "0"], "--dim must be at least 1, got 0"),
    (["--repeats", "0"], "--repeats must be at least 1, got 0"),
    (["--timeout", "-1"], "--timeout must be > 0, got -1.0"),
    (["--memory-gib", "0"], "--memory-gib must be > 0, got 0.0"),
])
def test_bad_arguments_are_one_line_errors_before_measuring(argv, message, capsys, monkeypatch):
    monkeypatch.setattr(benchmark, "measure_all", None)  # never reached
    with pytest.raises(SystemExit) as exit_info:
        benchmark.main(argv)
    assert exit_info.value.code == 2
    assert capsys.readouterr().err == f"pyclloss bench: error: {message}\n"


def test_an_unwritable_report_fails_before_measuring(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(benchmark, "measure_all", None)  # never reached
    (tmp_path / "a-file").write_text("")
    for out, why in ((tmp_path / "a-file" / "r.md", "cannot write there"),
                     (tmp_path, "is a folder, not a file")):
        with pytest.raises(SystemExit) as exit_info:
            benchmark.main(["--out", str(out)])
        assert exit_info.value.code == 2
        assert capsys.readouterr().err.startswith(f"pyclloss bench: error: --out {out}: {why}")
