"""Energy meters against fake counters: a powercap tree in tmp_path and a fake
NVML module. Nothing may report a figure that no counter gave."""

import builtins
import sys
import time
import types

import pytest

from pyclloss.tools import energy
from pyclloss.tools.energy import EnergyMeter, energy_report, nvml_counters, rapl_counters


def write_zone(root, zone, name, energy_uj, max_range_uj=None):
    zone_dir = root / zone
    zone_dir.mkdir(parents=True, exist_ok=True)
    (zone_dir / "name").write_text(name + "\n")
    if energy_uj is not None:
        (zone_dir / "energy_uj").write_text(f"{energy_uj}\n")
    if max_range_uj is not None:
        (zone_dir / "max_energy_range_uj").write_text(f"{max_range_uj}\n")
    return zone_dir


def set_energy(zone_dir, energy_uj):
    (zone_dir / "energy_uj").write_text(f"{energy_uj}\n")


@pytest.fixture
def powercap(tmp_path):
    """One socket: package, its core subzone (inside the package) and DRAM."""
    zones = {
        "package": write_zone(tmp_path, "intel-rapl:0", "package-0", 5_000_000, 1_000_000_000),
        "core": write_zone(tmp_path, "intel-rapl:0:0", "core", 1_000_000, 1_000_000_000),
        "dram": write_zone(tmp_path, "intel-rapl:0:1", "dram", 2_000_000, 1_000_000_000),
    }
    return tmp_path, zones


def no_gpus_meter(root):
    return EnergyMeter(gpus=None, cpu=True, powercap_root=str(root))


def test_rapl_counts_packages_and_dram_not_their_parts(powercap):
    root, _ = powercap
    counters, reason = rapl_counters(str(root))
    assert reason is None
    assert [c.name for c in counters] == ["cpu:package-0", "cpu:dram-0"]
    assert [c.read() for c in counters] == [5.0, 2.0]
    assert [c.wrap_joules for c in counters] == [1000.0, 1000.0]


def test_meter_reports_the_counter_difference(powercap):
    root, zones = powercap
    with no_gpus_meter(root) as meter:
        set_energy(zones["package"], 17_500_000)  # +12.5 J
        set_energy(zones["dram"], 3_000_000)  # +1 J
        set_energy(zones["core"], 900_000_000)  # part of the package: not counted again
    result = meter.result
    assert result.joules == pytest.approx({"cpu:package-0": 12.5, "cpu:dram-0": 1.0})
    assert result.total_joules == pytest.approx(13.5)
    assert result.mean_watts == pytest.approx(13.5 / result.seconds)
    assert result.unmeasured == {} and result.reason is None


def test_wraparound_adds_the_counter_range(powercap):
    root, zones = powercap
    set_energy(zones["package"], 999_000_000)
    with no_gpus_meter(root) as meter:
        set_energy(zones["package"], 2_000_000)  # wrapped at 1000 J: +1 J +2 J
    assert meter.result.joules["cpu:package-0"] == pytest.approx(3.0)


def test_sampling_catches_every_wrap_of_a_long_window(powercap):
    root, zones = powercap
    with no_gpus_meter(root) as meter:
        for reading in (800_000_000, 100_000_000, 900_000_000, 50_000_000):
            set_energy(zones["package"], reading)
            meter.sample()
    # 5 -> 800 -> (wrap) 100 -> 900 -> (wrap) 50 J: 795 + 300 + 800 + 150
    assert meter.result.joules["cpu:package-0"] == pytest.approx(2045.0)


def test_a_counter_going_backwards_without_a_known_range_is_dropped(tmp_path):
    zone = write_zone(tmp_path, "intel-rapl:0", "package-0", 5_000_000)
    with no_gpus_meter(tmp_path) as meter:
        set_energy(zone, 1_000_000)
    assert meter.result.joules == {}
    assert "went backwards" in meter.result.unmeasured["cpu:package-0"]
    assert meter.result.total_joules is None


def test_missing_interface_and_missing_files(tmp_path):
    counters, reason = rapl_counters(str(tmp_path))
    assert counters == [] and "absent" in reason
    write_zone(tmp_path, "intel-rapl:0", "package-0", None)  # no energy_uj
    counters, reason = rapl_counters(str(tmp_path))
    assert counters == [] and "energy_uj" in reason


def test_permission_denied(powercap, monkeypatch):
    root, _ = powercap

    def open_without_permission(path, *args, **kwargs):
        if str(path).endswith("energy_uj"):
            raise PermissionError(13, "Permission denied", str(path))
        return builtins.open(path, *args, **kwargs)

    # Root reads a chmod 000 file anyway: refuse the reads in the module instead.
    monkeypatch.setattr(energy, "open", open_without_permission, raising=False)
    with no_gpus_meter(root) as meter:
        pass
    assert meter.result.joules == {}
    assert meter.result.total_joules is None and meter.result.mean_watts is None
    assert "permission denied" in meter.result.reason
    assert meter.result.reason.startswith("not measurable here")


class FakeNvml(types.ModuleType):
    """pynvml's calls the meter uses; energies in mJ, settable per GPU."""

    class NVMLError(Exception):
        pass

    def __init__(self, energies_mj, unsupported=(), init_error=None):
        super().__init__("pynvml")
        self.energies_mj = dict(enumerate(energies_mj))
        self.unsupported = set(unsupported)
        self.init_error = init_error

    def nvmlInit(self):
        if self.init_error:
            raise self.NVMLError(self.init_error)

    def nvmlDeviceGetCount(self):
        return len(self.energies_mj)

    def nvmlDeviceGetHandleByIndex(self, index):
        return index

    def nvmlDeviceGetTotalEnergyConsumption(self, handle):
        if handle in self.unsupported:
            raise self.NVMLError("Not Supported")
        return self.energies_mj[handle]


def test_nvml_energy_of_every_gpu(monkeypatch, tmp_path):
    nvml = FakeNvml([1_000_000, 7_000])
    monkeypatch.setitem(sys.modules, "pynvml", nvml)
    with EnergyMeter(gpus="all", cpu=False) as meter:
        nvml.energies_mj[0] += 250_500  # mJ
        nvml.energies_mj[1] += 1_000
    assert meter.result.joules == pytest.approx({"gpu0": 250.5, "gpu1": 1.0})
    report = energy_report(meter.result, steps=10, samples=1000, idle_watts=2.0)
    assert report["joules_per_step"] == pytest.approx(25.15)
    assert report["samples_per_joule"] == pytest.approx(1000 / 251.5)
    assert report["net_joules"] == pytest.approx(251.5 - 2.0 * meter.result.seconds)


def test_nvml_gpu_without_energy_counter(monkeypatch):
    monkeypatch.setitem(sys.modules, "pynvml", FakeNvml([10, 20], unsupported={0}))
    counters, reason = nvml_counters("all")
    assert [c.name for c in counters] == ["gpu1"] and reason is None
    monkeypatch.setitem(sys.modules, "pynvml", FakeNvml([10], unsupported={0}))
    counters, reason = nvml_counters("all")
    assert counters == [] and "Not Supported" in reason and "Volta" in reason


def test_nvml_not_installed_or_not_initialising(monkeypatch):
    monkeypatch.setitem(sys.modules, "pynvml", None)  # import raises ImportError
    assert "not installed" in nvml_counters("all")[1]
    monkeypatch.setitem(sys.modules, "pynvml", FakeNvml([10], init_error="Driver Not Loaded"))
    assert "Driver Not Loaded" in nvml_counters("all")[1]


def test_nothing_readable_gives_no_figure(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "pynvml", None)
    with EnergyMeter(gpus="all", cpu=True, powercap_root=str(tmp_path)) as meter:
        sum(range(1000))
    result = meter.result
    assert result.joules == {} and result.total_joules is None and result.mean_watts is None
    assert set(result.unmeasured) == {"rapl", "nvml"}
    report = energy_report(result, steps=5, samples=50, idle_watts=3.0)
    assert report["energy"] == result.reason
    assert not {"joules", "total_joules", "joules_per_step", "samples_per_joule", "mean_watts",
                "net_joules"} & set(report)
    assert report["seconds"] > 0


def test_meter_as_decorator(powercap):
    root, zones = powercap
    meter = no_gpus_meter(root)

    @meter
    def work(joules):
        now_uj = int((zones["package"] / "energy_uj").read_text())
        set_energy(zones["package"], now_uj + int(joules * 1e6))

    work(4.0)
    assert meter.result.joules["cpu:package-0"] == pytest.approx(4.0)
    work(1.5)  # each call is its own window
    assert meter.result.joules["cpu:package-0"] == pytest.approx(1.5)


# ------------------------------------------------------------------ the benchmark


@pytest.fixture
def bench_energy():
    from pyclloss.tools import energy_benchmark

    return energy_benchmark


def table_rows(report):
    lines = [line for line in report.splitlines() if line.startswith("| ")]
    header = [c.strip() for c in lines[0].strip("|").split("|")]
    return [dict(zip(header, (c.strip() for c in line.strip("|").split("|"))))
            for line in lines[1:]]


def run_quick_bench(bench_energy, out, capsys):
    argv = ["--quick", "--device", "cpu", "--precisions", "fp32,bf16", "--out", str(out)]
    assert bench_energy.main(argv) == 0
    capsys.readouterr()
    (report_path,) = out.glob("energy-*.md")
    return report_path.read_text()


def test_bench_reports_not_measurable_with_time_and_memory(bench_energy, tmp_path, monkeypatch,
                                                         capsys):
    monkeypatch.setattr(energy, "POWERCAP_ROOT", str(tmp_path / "no-powercap"))
    report = run_quick_bench(bench_energy, tmp_path / "out", capsys)
    assert "energy: not measurable here (rapl: no RAPL interface" in report
    rows = table_rows(report)
    assert [(r["workload"], r["precision"]) for r in rows] == [
        ("loss", "fp32"), ("loss", "bf16"), ("step", "fp32"), ("step", "bf16")]
    for row in rows:
        assert float(row["s/step"].split(" ± ")[0]) > 0
        assert float(row["workload peak MiB"]) >= 0
        assert row["J/step"] == row["W"] == row["samples/J"] == row["g CO2e/1k steps"] == "—"


def test_bench_energy_figures_from_a_constant_power_counter(bench_energy, tmp_path, monkeypatch,
                                                          capsys):
    """A RAPL package counter that grows at 10 W: every trial draws 10 W, idle too,
    so the net figures are about 0 and J/step = 10 W × s/step."""
    write_zone(tmp_path, "intel-rapl:0", "package-0", 0, 10**15)
    monkeypatch.setattr(energy, "POWERCAP_ROOT", str(tmp_path))
    start = time.perf_counter()
    monkeypatch.setattr(energy.RaplCounter, "read", lambda self: 10.0 * (time.perf_counter()
                                                                          - start))
    report = run_quick_bench(bench_energy, tmp_path / "out", capsys)
    assert "energy counters: cpu:package-0" in report and "idle: 10.0 W" in report
    # The trials are milliseconds long: the counter reads and the clock are a few
    # microseconds apart.
    for row in table_rows(report):
        mean = {k: float(v.split(" ± ")[0]) for k, v in row.items() if " ± " in v}
        assert mean["W"] == pytest.approx(10.0, rel=0.02)
        assert mean["J/step"] == pytest.approx(10.0 * mean["s/step"], rel=0.02)
        assert abs(mean["W net"]) < 0.2
        assert mean["g CO2e/1k steps"] == pytest.approx(
            1000 * mean["J/step"] / 3.6e6 * bench_energy.DEFAULT_CARBON_INTENSITY, rel=1e-3)
    assert table_rows(report)[1]["J/step vs fp32"].endswith("×")


@pytest.mark.parametrize("argv, message", [
    (["--precisions", "fp32,fp8"], "--precisions: unknown 'fp8'"),
    (["--workloads", "loss,eval"], "--workloads: unknown ['eval']"),
    (["--trials", "1"], "--trials must be at least 2"),
    (["--backend", "tpu"], "--backend 'tpu'"),
    (["--dim", "0"], "--dim must be at least 1, got 0"),
    (["--threads", "-5"], "--threads must be in [0, "),
    (["--threads", "100000"], "--threads must be in [0, "),
    (["--steps", "0"], "--steps must be at least 1, got 0"),
    (["--image-size", "0"], "--image-size must be at least 1, got 0"),
    (["--channels", "0"], "--channels must be at least 1, got 0"),
    (["--trial-seconds", "0"], "--trial-seconds must be > 0, got 0.0"),
    (["--idle-seconds", "nan"], "--idle-seconds must be > 0, got nan"),
    (["--cooldown", "-1"], "--cooldown must be at least 0, got -1.0"),
    (["--carbon-intensity", "-1"], "--carbon-intensity must be at least 0, got -1.0"),
])
def test_bench_bad_arguments(bench_energy, argv, message, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(bench_energy, "run_benchmark", None)  # never reached
    with pytest.raises(SystemExit) as exit_info:
        bench_energy.main(["--quick", "--out", str(tmp_path), *argv])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1
    assert list(tmp_path.iterdir()) == []


def test_bench_unwritable_out_fails_before_measuring(bench_energy, tmp_path, capsys,
                                                    monkeypatch):
    monkeypatch.setattr(bench_energy, "run_benchmark", None)  # never reached
    (tmp_path / "a-file").write_text("")
    out = tmp_path / "a-file" / "results"
    with pytest.raises(SystemExit) as exit_info:
        bench_energy.main(["--quick", "--out", str(out)])
    assert exit_info.value.code == 2
    assert capsys.readouterr().err.startswith(f"pyclloss energy: error: --out {out}: cannot "
                                              f"write there")


def test_trial_memory_is_the_workloads_peak(bench_energy):
    """A workload that allocates 64 MiB peaks at about 64 MiB; one run after it
    that allocates nothing peaks near 0, not at the process's peak."""
    import torch

    cpu = torch.device("cpu")
    allocating = bench_energy.Workload(1, lambda steps: torch.ones(16 * 2**20).sum())  # fp32
    idle = bench_energy.Workload(1, lambda steps: None)
    assert bench_energy.run_trial(allocating, 1, cpu, None).peak_mib == pytest.approx(64, abs=3)
    assert bench_energy.run_trial(idle, 1, cpu, None).peak_mib < 2


def test_the_loss_workload_runs_every_registered_loss(bench_energy):
    """The loss workload's embeddings have --dim columns, whatever the trainer's default."""
    import torch

    from pyclloss.tools.train import LOSSES, TrainConfig

    args = types.SimpleNamespace(batch_size=16, dim=24)
    for name in LOSSES:
        cfg = TrainConfig(loss=name, batch_size=16, queue_size=64)
        bench_energy.loss_workload(cfg, args, torch.device("cpu"), "fp32").run(1)
