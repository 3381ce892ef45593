"""What does mixed precision save? Energy, time and memory of the same loss and
the same training step in fp32, fp16 and bf16 (``pyclloss energy``).

Each trial runs one workload in one precision for a fixed number of steps and
reads the energy counters around it (pyclloss.tools.energy: NVML's cumulative GPU
counter, RAPL on the CPU). The precisions' trials are interleaved, reversing the
order every round (fp32 fp16 bf16, bf16 fp16 fp32, ...), so that drifts of
temperature and clocks spread over all of them. Idle power, measured after a
cool-down, gives the figures net of idle. Where no counter is readable the
report says so and gives time and memory only.

    pyclloss energy             # writes bench/results/energy-<machine>.md (+ .png)
    pyclloss energy --quick     # a few seconds, for tests
"""

import argparse
import datetime
import itertools
import os
import re
import statistics
import sys
import time
from dataclasses import dataclass, replace
from typing import Callable, Dict, List, Optional

import torch

from . import _arguments as arguments
from .benchmark import peak_extra_bytes, pyplot
from .energy import EnergyMeter, cpu_model, describe_gpu, gpus_of
from .train.losses import LOSSES
from .train.trainer import (
    PRECISIONS,
    TrainConfig,
    autocast_dtype,
    build_learner,
    check_config,
    cpu_threads,
    resolve_device,
    train_step,
)

# About the world-average carbon intensity of electricity generation, g CO2e/kWh.
DEFAULT_CARBON_INTENSITY = 475.0
RESULTS_DIR = os.path.join("bench", "results")  # relative to the working directory
JOULES_PER_KWH = 3.6e6


@dataclass
class Workload:
    samples_per_step: int
    run: Callable[[int], None]  # runs n steps; the device is synchronised after them


@dataclass
class Trial:
    seconds: float
    steps: int
    samples: int
    joules: Optional[float]
    peak_mib: float  # the workload's, over the memory in use when the trial started


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def loss_workload(cfg: TrainConfig, args, device, precision) -> Workload:
    """Forward and backward of the loss alone, on embeddings in the precision's dtype."""
    dtype = autocast_dtype(precision, device) or torch.float32
    generator = torch.Generator(device=device).manual_seed(0)
    z1, z2 = (torch.randn(args.batch_size, args.dim, generator=generator, device=device,
                          dtype=dtype).requires_grad_() for _ in range(2))
    labels = torch.randint(0, 10, (args.batch_size,), generator=generator, device=device)
    # the loss module's own buffers (a queue, gates) take the workload's dim
    loss_cfg = replace(cfg, embedding_dim=args.dim)
    loss_module = build_learner(loss_cfg, 1, torch.zeros(1), torch.ones(1)).loss.to(device)

    def run(steps):
        for _ in range(steps):
            z1.grad = z2.grad = None
            loss_module(z1, z2, labels).backward()
        synchronize(device)

    return Workload(args.batch_size, run)


def step_workload(cfg: TrainConfig, args, device, precision) -> Workload:
    """The reference trainer's training step (encoder, head, loss, backward, AdamW)
    under the precision's autocast, on a fixed batch of two views."""
    amp_dtype = autocast_dtype(precision, device)
    torch.manual_seed(0)
    shape = (args.batch_size, args.channels, args.image_size, args.image_size)
    views = [torch.rand(shape, device=device) for _ in range(2)]
    labels = torch.randint(0, 10, (args.batch_size,), device=device)
    learner = build_learner(cfg, args.channels, torch.full((args.channels,), 0.5),
                            torch.full((args.channels,), 0.25)).to(device)
    optimizer = torch.optim.AdamW([p for p in learner.parameters() if p.requires_grad], lr=1e-3)
    scaler = torch.amp.GradScaler(device.type, enabled=precision == "fp16")

    def run(steps):
        for _ in range(steps):
            train_step(learner, optimizer, scaler, *views, labels, amp_dtype)
        synchronize(device)

    return Workload(args.batch_size, run)


WORKLOADS = {"loss": loss_workload, "step": step_workload}


def calibrated_steps(workload: Workload, seconds: float) -> int:
    """The number of steps (at least 2) that takes about ``seconds``, timed on 3."""
    start = time.perf_counter()
    workload.run(3)
    return max(2, round(seconds * 3 / (time.perf_counter() - start)))


def run_trial(workload: Workload, steps: int, device, gpus) -> Trial:
    """``steps`` steps of ``workload``: time, energy, and the workload's peak
    memory over what was in use when the trial started (not the process's peak,
    which only grows over the run and holds the other workloads too)."""
    with EnergyMeter(gpus=gpus) as meter:
        peak = peak_extra_bytes(lambda: workload.run(steps), device)
    result = meter.result
    return Trial(result.seconds, steps, steps * workload.samples_per_step, result.total_joules,
                 max(peak, 0) / 2**20)


def measure_idle(seconds: float, cooldown: float, gpus):
    """Idle power (W) after a cool-down, and the meter's result; (None, result)
    without waiting when no counter is readable."""
    with EnergyMeter(gpus=gpus) as probe:
        pass
    if probe.result.total_joules is None:
        return None, probe.result
    time.sleep(cooldown)
    with EnergyMeter(gpus=gpus) as meter:
        time.sleep(seconds)
    return meter.result.mean_watts, meter.result


# ------------------------------------------------------------------------- statistics


def trial_figures(trial: Trial, idle_watts: Optional[float], intensity: float) -> Dict:
    """The per-trial figures; the energy ones only where a counter was read."""
    figures = {"s/step": trial.seconds / trial.steps}
    if trial.joules is None:
        return figures
    figures.update({"J/step": trial.joules / trial.steps, "W": trial.joules / trial.seconds,
                    "samples/J": trial.samples / trial.joules,
                    "g CO2e/1k steps": 1000 * trial.joules / trial.steps / JOULES_PER_KWH
                    * intensity})
    if idle_watts is not None:
        net = trial.joules - idle_watts * trial.seconds
        figures.update({"J/step net": net / trial.steps, "W net": net / trial.seconds})
        if net > 0:
            figures["samples/J net"] = trial.samples / net
    return figures


COLUMNS = ["s/step", "J/step", "J/step net", "W", "W net", "samples/J", "samples/J net",
           "g CO2e/1k steps"]


@dataclass
class Row:
    steps: int
    mean: Dict[str, float]  # the columns measured in every trial
    std: Dict[str, float]
    peak_mib: float


def summarise(trials: Dict[tuple, List[Trial]], idle_watts, intensity) -> Dict[tuple, Row]:
    rows = {}
    for key, runs in trials.items():
        per_trial = [trial_figures(t, idle_watts, intensity) for t in runs]
        measured = [c for c in COLUMNS if all(c in f for f in per_trial)]
        rows[key] = Row(runs[0].steps,
                        {c: statistics.mean(f[c] for f in per_trial) for c in measured},
                        {c: statistics.stdev(f[c] for f in per_trial) for c in measured},
                        max(t.peak_mib for t in runs))
    return rows


# ------------------------------------------------------------------------------ report


def machine_name(device: torch.device) -> str:
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu {cpu_model()}"
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")


def markdown_report(args, argv, device, setup, idle_watts, idle_result, rows) -> str:
    intensity_source = ("the default: about the world-average grid"
                        if args.carbon_intensity == DEFAULT_CARBON_INTENSITY else "given")
    memory = ("the allocator's peak" if device.type == "cuda"
              else "the peak resident set, reset before each trial")
    lines = [f"# Energy: fp32 vs mixed precision, {setup['machine']}", "",
             f"Command: `{' '.join(['pyclloss energy', *argv])}`  ",
             f"Date: {datetime.datetime.now().isoformat(timespec='seconds')}; "
             f"torch {torch.__version__}; device {device}", ""]
    lines += [f"- {k}: {v}" for k, v in setup.items() if k != "machine"]
    if idle_result.total_joules is None:
        lines.append(f"- energy: {idle_result.reason}; the table gives time and memory only")
    else:
        lines.append(f"- energy counters: {', '.join(idle_result.joules)} (cumulative hardware "
                     "counters, read before and after each trial)")
        lines += [f"- not measured: {k}: {v}" for k, v in idle_result.unmeasured.items()]
        lines.append(f"- idle: {idle_watts:.1f} W over {args.idle_seconds:g} s after a "
                     f"{args.cooldown:g} s cool-down")
        lines.append(f"- carbon intensity: {args.carbon_intensity:g} g CO2e/kWh "
                     f"({intensity_source}), applied to the counted energy only")
    image = f"{args.channels}×{args.image_size}×{args.image_size}"
    lines += [f"- workload loss: forward + backward of the loss on two {args.batch_size}"
              f"×{args.dim} embedding batches in the precision's dtype",
              f"- workload step: the trainer's training step (autocast, encoder width "
              f"{args.width}, AdamW) on {args.batch_size} images {image}",
              f"- {args.trials} trials per row, interleaved (the precisions' order reversed "
              "every round); mean ± std over the trials",
              f"- workload peak: the most memory a trial of the workload took over what was in "
              f"use when it started ({memory}), the largest of its trials", ""]
    header = ["workload", "precision", "steps/trial", *COLUMNS, "workload peak MiB",
              "s/step vs fp32", "J/step vs fp32"]
    lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for (workload, precision), row in rows.items():
        fp32 = rows.get((workload, "fp32"))
        ratios = [f"{row.mean[c] / fp32.mean[c]:.2f}×" if fp32 and c in row.mean else "—"
                  for c in ("s/step", "J/step")]
        cells = [f"{row.mean[c]:.4g} ± {row.std[c]:.2g}" if c in row.mean else "—"
                 for c in COLUMNS]
        lines.append("| " + " | ".join([workload, precision, str(row.steps), *cells,
                                         f"{row.peak_mib:,.1f}", *ratios]) + " |")
    return "\n".join(lines) + "\n"


def plot(rows: Dict[tuple, Row], path: str) -> str:
    """A bar chart of J/step (s/step where energy was not measured); says what it did."""
    plt = pyplot()
    if plt is None:
        return "no plot: matplotlib is not installed"
    keys = list(rows)
    column = "J/step" if all("J/step" in rows[k].mean for k in keys) else "s/step"
    colors = {"fp32": "tab:gray", "fp16": "tab:blue", "bf16": "tab:green"}
    fig, ax = plt.subplots(figsize=(1.2 * len(keys) + 2, 4))
    ax.bar(range(len(keys)), [rows[k].mean[column] for k in keys],
           yerr=[rows[k].std[column] for k in keys], capsize=4,
           color=[colors.get(p, "tab:orange") for _, p in keys])
    ax.set_xticks(range(len(keys)), [f"{w}\n{p}" for w, p in keys])
    ax.set_ylabel(column)
    ax.set_title(f"{column}, mean ± std over trials")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return f"plot: {path}"


# --------------------------------------------------------------------------------- main


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="pyclloss energy",
        description="Energy, time and memory of one loss and one training step in fp32 vs "
                    "fp16 vs bf16, interleaved trials, net of idle power.")
    add = parser.add_argument
    add("--loss", default="nt_xent", choices=list(LOSSES))
    add("--backend", default="auto")
    add("--device", default="auto")
    add("--threads", type=int, default=1,
        help="CPU threads of torch (0: torch's default); the default workloads are small")
    add("--workloads", default="loss,step", help="comma-separated: loss, step")
    add("--precisions", default="fp32,fp16,bf16")
    add("--batch-size", type=int, default=None, help="default: 256 on CPU, 1024 on GPU")
    add("--dim", type=int, default=128, help="embedding dim of the loss workload")
    add("--image-size", type=int, default=None, help="default: 8 on CPU, 32 on GPU")
    add("--channels", type=int, default=None, help="default: 1 on CPU, 3 on GPU")
    add("--width", type=int, default=None, help="encoder width; default: 32 on CPU, 64 on GPU")
    add("--trials", type=int, default=None,
        help="trials per workload and precision (>= 2); default 5")
    add("--trial-seconds", type=float, default=None,
        help="sets the steps per trial from the warm-up speed; default: 1 on CPU, 5 on GPU")
    add("--steps", type=int, default=None, help="steps per trial (instead of --trial-seconds)")
    add("--cooldown", type=float, default=None, help="seconds; default: 5 on CPU, 30 on GPU")
    add("--idle-seconds", type=float, default=None, help="default: 5 on CPU, 10 on GPU")
    add("--carbon-intensity", type=float, default=DEFAULT_CARBON_INTENSITY,
        help=f"g CO2e per kWh (default {DEFAULT_CARBON_INTENSITY:g}: about the world-average "
             "grid; use your grid's figure)")
    add("--out", default=RESULTS_DIR, help="folder of the report")
    add("--quick", action="store_true", help="tiny sizes, 2 short trials: seconds, for tests")
    return parser


def fill_defaults(args, device: torch.device) -> None:
    """The device's defaults for the sizes left unset; then every argument is checked."""
    gpu = device.type == "cuda"
    defaults = {"batch_size": 1024 if gpu else 256, "image_size": 32 if gpu else 8,
                "channels": 3 if gpu else 1, "width": 64 if gpu else 32,
                "trial_seconds": 5.0 if gpu else 1.0, "cooldown": 30.0 if gpu else 5.0,
                "idle_seconds": 10.0 if gpu else 5.0, "trials": 5}
    if args.quick:
        defaults.update(batch_size=32, width=8, steps=2, cooldown=0.0, idle_seconds=0.1,
                        trials=2)
        args.dim = min(args.dim, 32)
    for name, value in defaults.items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    if args.trials < 2:
        raise ValueError("--trials must be at least 2 (a std needs two)")
    if args.steps is not None:
        arguments.at_least("--steps", args.steps, 1)
    arguments.threads("--threads", args.threads)

    def value(flag):
        return getattr(args, flag[2:].replace("-", "_"))

    for flag in ("--dim", "--image-size", "--channels"):
        arguments.at_least(flag, value(flag), 1)
    for flag in ("--trial-seconds", "--idle-seconds"):
        arguments.above(flag, value(flag), 0)
    for flag in ("--cooldown", "--carbon-intensity"):
        arguments.at_least(flag, value(flag), 0)


def main(argv: Optional[List[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        device = resolve_device(args.device)
        fill_defaults(args, device)
        workloads = args.workloads.split(",")
        unknown = [w for w in workloads if w not in WORKLOADS]
        if unknown:
            raise ValueError(f"--workloads: unknown {unknown}; expected {', '.join(WORKLOADS)}")
        precisions, skipped = [], []
        for precision in args.precisions.split(","):
            if precision not in PRECISIONS:
                raise ValueError(f"--precisions: unknown {precision!r}; expected "
                                 f"{', '.join(PRECISIONS)}")
            try:  # known, but maybe without autocast on this device
                autocast_dtype(precision, device)
                precisions.append(precision)
            except ValueError as exc:
                skipped.append(str(exc))
        if not precisions:
            raise ValueError("; ".join(skipped))
        cfg = TrainConfig(loss=args.loss, backend=args.backend, width=args.width,
                          batch_size=args.batch_size, queue_size=max(4096, args.batch_size))
        check_config(cfg)
        arguments.writable_folder("--out", args.out)
    except ValueError as exc:
        parser.exit(2, f"pyclloss energy: error: {exc}\n")
    with cpu_threads(args.threads):
        return run_benchmark(args, argv, device, workloads, precisions, skipped, cfg)


def run_benchmark(args, argv, device, workloads, precisions, skipped, cfg) -> int:
    gpus = gpus_of(device)
    setup = {"machine": machine_name(device).replace("-", " "), "cpu": cpu_model()}
    if gpus:
        setup.update(describe_gpu(gpus[0]))
    setup["loss function"] = f"{args.loss} (backend {args.backend})"
    setup["cpu threads"] = str(torch.get_num_threads())
    if skipped:
        setup["skipped"] = "; ".join(skipped)

    print(f"warm-up and calibration on {device} ...", file=sys.stderr, flush=True)
    runs, steps = {}, {}
    for name, precision in itertools.product(workloads, precisions):
        key = (name, precision)
        runs[key] = WORKLOADS[name](cfg, args, device, precision)
        runs[key].run(3)  # warm-up
        steps[key] = args.steps or calibrated_steps(runs[key], args.trial_seconds)

    idle_watts, idle_result = measure_idle(args.idle_seconds, args.cooldown, gpus)

    trials = {key: [] for key in runs}
    for round_index in range(args.trials):
        order = precisions if round_index % 2 == 0 else precisions[::-1]
        for name in workloads:
            for precision in order:
                key = (name, precision)
                trials[key].append(run_trial(runs[key], steps[key], device, gpus))
        print(f"round {round_index + 1}/{args.trials} done", file=sys.stderr, flush=True)

    rows = summarise(trials, idle_watts, args.carbon_intensity)
    report = markdown_report(args, argv, device, setup, idle_watts, idle_result, rows)
    os.makedirs(args.out, exist_ok=True)
    stem = os.path.join(args.out, f"energy-{machine_name(device)}")
    with open(stem + ".md", "w") as f:
        f.write(report)
    print(report)
    print(plot(rows, stem + ".png"), file=sys.stderr)
    print(f"report: {stem}.md", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
