"""`pyclloss bench`: every cell's step runs and differentiates, and the report
and plot are built from the measurements."""

import sys
import time

import pytest
import torch

from pyclloss.tools import benchmark


def _impls(loss):
    here = [b for b in benchmark._backends_here("cpu", loss) if b != "triton"]  # interpreter
    peers = benchmark._peers_here("cpu")
    return here + [p for p in benchmark.WORKLOADS[loss].peers if not peers[p]]


@pytest.mark.parametrize("loss", benchmark.LOSSES)
def test_every_implementation_computes_the_same_loss(loss):
    """The columns of one table measure the same computation."""
    values = {}
    for impl in _impls(loss):
        inputs = benchmark.inputs(loss, 24, 16, "cpu", torch.float64 if impl != "diffsort"
                                  else torch.float32)
        values[impl] = benchmark.loss_call(loss, impl, inputs)().item()
        benchmark.step_fn(loss, impl, inputs)()
        assert all(t.grad is not None and torch.isfinite(t.grad).all()
                   for t in inputs.values() if t.requires_grad), impl
    assert len(values) >= 2
    first = next(iter(values.values()))
    for impl, value in values.items():
        assert value == pytest.approx(first, rel=1e-4), (impl, values)


def test_every_op_family_has_a_workload():
    from pyclloss.backends import families

    assert {w.family for w in benchmark.WORKLOADS.values()} == set(families())


def test_without_sizes_each_loss_runs_at_its_own(monkeypatch):
    cells = []
    monkeypatch.setattr(benchmark, "_run_isolated",
                        lambda args, loss, impl, n: cells.append((loss, impl, n)) or _timed(1))
    args = _args(sizes=None, losses=["supcon", "rnc"], impls=["reference"])
    measured = benchmark.measure_all(args)
    assert cells == [("supcon", "reference", n) for n in benchmark.WORKLOADS["supcon"].sizes] + [
        ("rnc", "reference", n) for n in benchmark.WORKLOADS["rnc"].sizes]
    assert benchmark.WORKLOADS["rnc"].sizes != benchmark.WORKLOADS["supcon"].sizes
    assert list(measured["results"]) == ["supcon", "rnc"]
    args = _args(sizes=[64], losses=["rnc"], impls=["reference"])
    cells.clear()
    benchmark.measure_all(args)
    assert cells == [("rnc", "reference", 64)]


def test_measure_one_reports_time_spread_and_memory():
    result = benchmark.measure_one("supcon", "reference", 64, 16, "cpu", "float32", 0.05, 3)
    assert set(result) == {"time_s", "iqr_s", "blocks", "calls_per_block", "peak_bytes",
                           "matmul_flops"}  # supcon is rated against the matmul
    assert result["time_s"] > 0 and result["iqr_s"] >= 0 and result["peak_bytes"] >= 0
    assert result["blocks"] >= 3 and result["calls_per_block"] >= 1


def test_timings_come_from_blocked_autorange_with_enough_blocks(monkeypatch):
    """A 10 ms call: blocks of one call; a run too short for 4 of them is topped
    up; the median is the call's time and the IQR the blocks' spread."""
    from torch.utils import benchmark as torch_benchmark

    runs = []
    blocked_autorange = torch_benchmark.Timer.blocked_autorange

    def spy(timer, **kwargs):
        measurement = blocked_autorange(timer, **kwargs)
        runs.append((kwargs["min_run_time"], len(measurement.times)))
        return measurement

    monkeypatch.setattr(torch_benchmark.Timer, "blocked_autorange", spy)
    result = benchmark.blocked_timing(lambda: time.sleep(0.01), 0.001, 4)
    assert runs[0] == (0.001, 1) and len(runs) >= 2
    assert result["blocks"] == sum(blocks for _, blocks in runs) >= 4
    assert result["calls_per_block"] == 1
    assert 0.01 <= result["time_s"] < 0.05 and 0 <= result["iqr_s"] < 0.03


def _args(**changes):
    fields = dict(sizes=[64], dim=16, dtype="float32", min_run_time=1.0, min_blocks=5,
                  device="cpu", command=["--sizes", "64"], losses=["supcon"], impls=None,
                  memory_gib=12.0, timeout=600.0)
    fields.update(changes)
    return type("Args", (), fields)


def _timed(ms, iqr_ms=0.1, mib=1, blocks=7):
    return {"time_s": ms / 1e3, "iqr_s": iqr_ms / 1e3, "peak_bytes": mib * 2**20,
            "blocks": blocks, "calls_per_block": 1}


MEASURED = {"peers": {"pml": "", "inf_cl": "Inf-CL runs on CUDA only"},
            "results": {"supcon": {
                "cpp": {64: _timed(1.0, 0.05), 128: _timed(3.0)},
                "reference": {64: _timed(4.0, 0.5, 4, blocks=5), 128: {"error": "out of memory"}},
                "pml": {64: {"error": "skipped: needs ~20 GiB"}, 128: _timed(4.5)}},
                "nt_xent": {
                "cpp": {64: _timed(2.0), 128: {"error": "out of memory"}},
                "pml": {64: _timed(9.0), 128: _timed(30.0)},
                "lightly": {64: _timed(5.0), 128: _timed(20.0)}}}}


def _rows(report):
    return [line for line in report.splitlines() if line.startswith("| 6") or
            line.startswith("| 12")]


def test_report_cells_show_median_iqr_and_memory():
    report = benchmark.markdown(_args(sizes=[64, 128]), MEASURED, "![plot](r.png)")
    supcon_64, supcon_128, nt_xent_64, nt_xent_128 = _rows(report)
    assert supcon_64 == ("| 64 | 1.00 ms (IQR 0.0500) / 1 MiB | 4.00 ms (IQR 0.500) / 4 MiB | "
                         "skipped: needs ~20 GiB | — | 4.0× |")
    assert "Inf-CL runs on CUDA only" in report and "![plot](r.png)" in report
    assert "5–7 blocks" in report and "blocked autorange" in report


def test_speed_up_is_against_the_best_peer_and_the_reference():
    report = benchmark.markdown(_args(sizes=[64, 128]), MEASURED, None)
    supcon_64, supcon_128, nt_xent_64, nt_xent_128 = _rows(report)
    assert "| speed-up vs best peer | vs reference |" in report
    assert supcon_128.endswith("| 3.00 ms (IQR 0.100) / 1 MiB | out of memory | "
                               "4.50 ms (IQR 0.100) / 1 MiB | 1.5× pml | — |")
    assert nt_xent_64.endswith("| 2.5× lightly | — |")  # lightly is faster than pml
    assert nt_xent_128.endswith("| — | — |")  # the fused backend did not run


def test_the_plot_keeps_one_colour_per_implementation():
    pytest.importorskip("matplotlib")
    fig = benchmark.figure(MEASURED, "pyclloss forward+backward: CPU X; float32, D = 16")
    colours = {}
    for ax in fig.axes:
        for line in ax.get_lines():
            colours.setdefault(line.get_label(), set()).add(line.get_color())
    assert set(colours) == {"cpp", "reference", "pml", "lightly"}
    assert all(len(c) == 1 for c in colours.values())  # the same in every panel
    assert len({c.pop() for c in colours.values()}) == 4  # and distinct
    assert fig.get_suptitle() == "pyclloss forward+backward: CPU X; float32, D = 16"
    notes = "\n".join(text.get_text() for ax in fig.axes for text in ax.texts)
    assert "pml N=64: skipped: needs ~20 GiB" in notes
    assert "reference N=128: out of memory" in notes and "cpp N=128: out of memory" in notes
    legend = [t.get_text() for t in fig.legends[0].get_texts()]
    assert sorted(legend) == ["cpp", "lightly", "pml", "reference"]


def test_main_writes_the_report_and_plot(tmp_path, monkeypatch, capsys):
    pytest.importorskip("matplotlib")
    monkeypatch.setattr(benchmark, "measure_all", lambda args: MEASURED)
    out = tmp_path / "r.md"
    assert benchmark.main(["--sizes", "64", "128", "--out", str(out)]) == 0
    assert "![time and memory against N](r.png)" in out.read_text()
    assert (tmp_path / "r.png").stat().st_size > 0
    assert f"plot: {tmp_path / 'r.png'}" in capsys.readouterr().err


def test_without_matplotlib_the_report_says_so(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib fails
    monkeypatch.setattr(benchmark, "measure_all", lambda args: MEASURED)
    out = tmp_path / "r.md"
    assert benchmark.main(["--sizes", "64", "128", "--out", str(out)]) == 0
    report = out.read_text()
    assert "No plot: matplotlib is not installed (pip install matplotlib)." in report
    assert "![" not in report and not (tmp_path / "r.png").exists()
    err = capsys.readouterr().err
    assert err.startswith("pyclloss bench: the report will have no plot: matplotlib is not")


@pytest.mark.parametrize("argv, message", [
    (["--sizes", "1"], "--sizes must be at least 2, got 1"),
    (["--dim", "0"], "--dim must be at least 1, got 0"),
    (["--min-run-time", "0"], "--min-run-time must be > 0, got 0.0"),
    (["--min-blocks", "1"], "--min-blocks must be at least 2, got 1"),
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


def test_effective_rate_column():
    """InfoNCE cells carry the matmul rate of their process; the fastest fused
    backend's 8·N²·D / time is shown against it."""
    assert benchmark.effective_flops(64, 16) == 8 * 64 * 64 * 16
    assert benchmark.matmul_flops("cpu", size=64, repeats=1) > 0
    rate = 10e9
    time_s = benchmark.effective_flops(64, 16) / (rate / 2)  # half the matmul's rate
    cpp, reference = _timed(time_s * 1e3), _timed(4 * time_s * 1e3)
    cpp["matmul_flops"] = reference["matmul_flops"] = rate
    measured = {"peers": {}, "results": {"supcon": {"cpp": {64: cpp}, "reference": {64: reference}}}}
    report = benchmark.markdown(_args(), measured, None)
    assert "| vs reference | fused rate = × matmul (matmul GFLOP/s) |" in report
    (row,) = _rows(report)
    assert row.endswith("| — | 4.0× | 5 GFLOP/s = 0.50× (10) |")
    assert {name for name, w in benchmark.WORKLOADS.items() if w.rated} == {
        "supcon", "nt_xent", "clip", "siglip"}
