"""Energy meters: the GPU's cumulative energy counter (NVML) and the CPU's RAPL
counters (Linux powercap), read at the start and end of a window.

A window's energy is the difference of cumulative hardware counters, never
integrated power polls. Where no counter can be read the result says so, with
the reason, and carries no figure::

    with EnergyMeter() as meter:
        train()
    meter.result.total_joules   # None when nothing was measurable
    meter.result.unmeasured     # {"rapl": "...why...", "nvml": "...why..."}

``EnergyMeter`` is also a decorator (``@EnergyMeter()``); long windows can call
``meter.sample()`` now and then so that a counter wrapping more than once
between two reads is not missed.
"""

import contextlib
import glob
import os
import platform
import time
from dataclasses import dataclass, field
from typing import Dict, Iterable, List, Optional, Tuple, Union

POWERCAP_ROOT = "/sys/class/powercap"


class CounterUnavailable(Exception):
    """A counter cannot be read; the message says why."""


# ------------------------------------------------------------------------ counters


class RaplCounter:
    """One RAPL zone's ``energy_uj``, which wraps to 0 after ``max_energy_range_uj``."""

    def __init__(self, zone_dir: str, name: str):
        self.zone_dir = zone_dir
        self.name = name
        try:
            self.wrap_joules: Optional[float] = self._read_uj("max_energy_range_uj") / 1e6
        except CounterUnavailable:
            self.wrap_joules = None  # a step backwards is then an error, not a wrap

    def _read_uj(self, file_name: str) -> int:
        path = os.path.join(self.zone_dir, file_name)
        try:
            with open(path) as f:
                return int(f.read().strip())
        except PermissionError:
            raise CounterUnavailable(
                f"permission denied reading {path} (root-only since Linux 5.10)") from None
        except (OSError, ValueError) as exc:
            raise CounterUnavailable(f"cannot read {path}: {exc}") from None

    def read(self) -> float:
        return self._read_uj("energy_uj") / 1e6


class NvmlCounter:
    """One GPU's total energy since the driver loaded (mJ; Volta and newer)."""

    wrap_joules = None  # a 64-bit millijoule counter does not wrap

    def __init__(self, nvml, handle, name: str):
        self._nvml = nvml
        self._handle = handle
        self.name = name

    def read(self) -> float:
        try:
            return self._nvml.nvmlDeviceGetTotalEnergyConsumption(self._handle) / 1e3
        except self._nvml.NVMLError as exc:
            raise CounterUnavailable(f"{self.name}: energy counter not readable: {exc}") from None


def _zone_label(zone_dir: str, name: str) -> Optional[str]:
    """Domain label of a RAPL zone, or None for zones that would count energy twice:
    core/uncore are parts of their package, psys overlaps the packages."""
    if name.startswith("package"):
        return name
    if name == "dram":
        socket = os.path.basename(zone_dir).split(":")[1]
        return f"dram-{socket}"
    return None


def rapl_counters(root: Optional[str] = None) -> Tuple[List[RaplCounter], Optional[str]]:
    """The readable RAPL package and DRAM counters under ``root`` (default
    POWERCAP_ROOT), and the reason when there are none."""
    root = POWERCAP_ROOT if root is None else root
    zone_dirs = sorted(glob.glob(os.path.join(root, "intel-rapl:*")))
    if not zone_dirs:
        return [], f"no RAPL interface ({root}/intel-rapl:* absent)"
    counters, problems = [], []
    for zone_dir in zone_dirs:
        try:
            with open(os.path.join(zone_dir, "name")) as f:
                label = _zone_label(zone_dir, f.read().strip())
            if label is None:
                continue
            counter = RaplCounter(zone_dir, f"cpu:{label}")
            counter.read()
        except CounterUnavailable as exc:
            problems.append(str(exc))
            continue
        except OSError as exc:
            problems.append(f"cannot read {zone_dir}/name: {exc}")
            continue
        counters.append(counter)
    if counters:
        return counters, None
    return [], "; ".join(problems) or f"no package or DRAM zone under {root}"


def _import_nvml():
    try:
        import pynvml  # the nvidia-ml-py package
    except ImportError:
        raise CounterUnavailable(
            "nvidia-ml-py is not installed (pip install nvidia-ml-py)") from None
    try:
        pynvml.nvmlInit()
    except pynvml.NVMLError as exc:
        raise CounterUnavailable(f"NVML did not initialise: {exc}") from None
    return pynvml


def _nvml_handle_of_cuda_device(nvml, index: int):
    """NVML numbers GPUs differently from CUDA (CUDA_VISIBLE_DEVICES, ordering):
    match them by UUID."""
    import torch

    uuid = str(torch.cuda.get_device_properties(index).uuid)
    return nvml.nvmlDeviceGetHandleByUUID(uuid if uuid.startswith("GPU-") else f"GPU-{uuid}")


GpuSelection = Union[str, Iterable[int], None]


def gpus_of(device) -> Optional[List[int]]:
    """The ``gpus`` selection that measures the GPU of a torch device (None on a CPU)."""
    import torch

    device = torch.device(device)
    if device.type != "cuda":
        return None
    return [torch.cuda.current_device() if device.index is None else device.index]


def nvml_counters(gpus: GpuSelection = "all") -> Tuple[List[NvmlCounter], Optional[str]]:
    """Energy counters of the GPUs: ``"all"`` that NVML sees, or the given CUDA
    device indices (as torch numbers them); and the reason when there are none."""
    if gpus is None:
        return [], None
    try:
        nvml = _import_nvml()
    except CounterUnavailable as exc:
        return [], str(exc)
    try:
        if gpus == "all":
            named = [(f"gpu{i}", nvml.nvmlDeviceGetHandleByIndex(i))
                     for i in range(nvml.nvmlDeviceGetCount())]
        else:
            named = [(f"gpu{i}", _nvml_handle_of_cuda_device(nvml, i)) for i in gpus]
    except nvml.NVMLError as exc:
        return [], f"NVML could not list the GPUs: {exc}"
    counters, problems = [], []
    for name, handle in named:
        counter = NvmlCounter(nvml, handle, name)
        try:
            counter.read()
        except CounterUnavailable as exc:
            problems.append(f"{exc} (needs a Volta or newer GPU)")
            continue
        counters.append(counter)
    if counters:
        return counters, None
    return [], "; ".join(problems) or "NVML sees no GPU"


# --------------------------------------------------------------------------- meter


@dataclass
class EnergyResult:
    """Energy of one window: joules per measured domain, and for each group of
    domains that could not be measured, the reason."""

    seconds: float
    joules: Dict[str, float] = field(default_factory=dict)
    unmeasured: Dict[str, str] = field(default_factory=dict)

    @property
    def total_joules(self) -> Optional[float]:
        return sum(self.joules.values()) if self.joules else None

    @property
    def mean_watts(self) -> Optional[float]:
        total = self.total_joules
        return total / self.seconds if total is not None and self.seconds > 0 else None

    @property
    def reason(self) -> Optional[str]:
        """Why there is no figure at all (None when something was measured)."""
        if self.joules:
            return None
        why = "; ".join(f"{k}: {v}" for k, v in self.unmeasured.items()) or "no counter asked for"
        return f"not measurable here ({why})"


class EnergyMeter(contextlib.ContextDecorator):
    """Measures the energy of a ``with`` block (or of each call of a decorated
    function) on the RAPL counters (``cpu=True``) and the NVML counters of
    ``gpus`` ("all", CUDA indices, or None). The outcome is ``self.result``."""

    def __init__(self, gpus: GpuSelection = "all", cpu: bool = True,
                 powercap_root: Optional[str] = None):
        self.gpus = gpus
        self.cpu = cpu
        self.powercap_root = powercap_root
        self.result: Optional[EnergyResult] = None

    def __enter__(self) -> "EnergyMeter":
        self._unmeasured: Dict[str, str] = {}
        self._counters = []
        for group, (counters, reason) in (
                ("rapl", rapl_counters(self.powercap_root) if self.cpu else ([], None)),
                ("nvml", nvml_counters(self.gpus))):
            self._counters += counters
            if reason:
                self._unmeasured[group] = reason
        self._joules = {c.name: 0.0 for c in self._counters}
        self._last = {c.name: c.read() for c in self._counters}
        self._start = time.perf_counter()
        self.result = None
        return self

    def sample(self) -> None:
        """Adds each counter's increase since its last read (unwrapping it)."""
        for counter in list(self._counters):
            try:
                now = counter.read()
            except CounterUnavailable as exc:
                self._drop(counter, str(exc))
                continue
            delta = now - self._last[counter.name]
            if delta < 0:
                if counter.wrap_joules is None:
                    self._drop(counter, f"{counter.name}: counter went backwards")
                    continue
                delta += counter.wrap_joules
            self._joules[counter.name] += delta
            self._last[counter.name] = now

    def _drop(self, counter, reason: str) -> None:
        self._counters.remove(counter)
        del self._joules[counter.name]
        self._unmeasured[counter.name] = reason

    def __exit__(self, *exc_info) -> bool:
        self.sample()
        seconds = time.perf_counter() - self._start
        self.result = EnergyResult(seconds, dict(self._joules), dict(self._unmeasured))
        return False


# -------------------------------------------------------------------------- reports


def energy_report(result: EnergyResult, steps: int, samples: int,
                  idle_watts: Optional[float] = None) -> dict:
    """J/step, samples/J and mean W of a window of ``steps`` steps over
    ``samples`` samples (also net of ``idle_watts`` when given), or the reason
    there are no such figures."""
    report = {"seconds": result.seconds, "steps": steps, "samples": samples}
    if result.unmeasured:
        report["unmeasured"] = dict(result.unmeasured)
    total = result.total_joules
    if total is None:
        report["energy"] = result.reason
        return report
    report.update(joules=dict(result.joules), total_joules=total, mean_watts=result.mean_watts,
                  joules_per_step=total / steps if steps else None,
                  samples_per_joule=samples / total if total > 0 else None)
    if idle_watts is not None:
        net = total - idle_watts * result.seconds
        report.update(idle_watts=idle_watts, net_joules=net,
                      net_joules_per_step=net / steps if steps else None)
    return report


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def describe_gpu(cuda_index: int = 0) -> Dict[str, str]:
    """Name, driver and power limit of a GPU: from NVML where it is installed,
    else the name from torch and the reason for the rest."""
    import torch

    setup = {"gpu": torch.cuda.get_device_name(cuda_index)}
    try:
        nvml = _import_nvml()
    except CounterUnavailable as exc:
        setup["driver"] = setup["power_limit_w"] = f"unknown: {exc}"
        return setup
    try:
        handle = _nvml_handle_of_cuda_device(nvml, cuda_index)
        driver = nvml.nvmlSystemGetDriverVersion()
        setup["driver"] = driver.decode() if isinstance(driver, bytes) else driver
        setup["power_limit_w"] = f"{nvml.nvmlDeviceGetEnforcedPowerLimit(handle) / 1e3:.0f}"
    except nvml.NVMLError as exc:
        setup["driver"] = setup.get("driver", f"unknown: {exc}")
        setup["power_limit_w"] = f"unknown: {exc}"
    return setup
