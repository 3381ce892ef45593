"""What ``pyclloss train`` reports: a summary of about ten lines for the terminal,
and the full summary as JSON in a file, by default in a new run folder."""

import datetime
import itertools
import json
import os
from typing import List

RUNS_FOLDER = "runs"  # relative to the working directory
SUMMARY_FILE = "summary.json"


def new_run_folder(root: str, loss: str, started: datetime.datetime) -> str:
    """A new folder ``root/<YYYYmmdd-HHMMSS>-<loss>``; ``-2``, ``-3``, ... are
    appended when another run took the name."""
    stem = os.path.join(root, f"{started:%Y%m%d-%H%M%S}-{loss}")
    for attempt in itertools.count(1):
        folder = stem if attempt == 1 else f"{stem}-{attempt}"
        try:
            os.makedirs(folder)
            return folder
        except FileExistsError:
            continue


def write_json(path: str, summary: dict) -> None:
    with open(path, "w") as f:
        json.dump(summary, f, indent=2)
        f.write("\n")


# label and note of each accuracy line
ACCURACIES = {"knn_accuracy": ("kNN", "accuracy on the held-out images, before → after"),
              "linear_probe_accuracy": ("linear", "linear probe, same")}


def _accuracy_lines(evaluation) -> List[str]:
    if isinstance(evaluation, str):  # why there is none
        return [f"accuracy {evaluation}"]
    return [f"{label:<8} {evaluation['initial'][key]:.1%} → {evaluation['final'][key]:.1%}  "
            f"({note})" for key, (label, note) in ACCURACIES.items()]


def _time_line(summary: dict) -> str:
    wall = f"{summary['wall_seconds']:,.1f} s in all"
    if summary["samples_per_second"] is None:
        return f"time     no epoch left to train; {wall}"
    return (f"time     {summary['train_seconds']:,.1f} s training at "
            f"{summary['samples_per_second']:,.0f} samples/s; {wall}")


def _energy_line(energy: dict) -> str:
    if "total_joules" not in energy:
        return f"energy   {energy['energy']}"
    line = f"energy   {energy['total_joules']:,.1f} J, {energy['mean_watts']:.1f} W mean"
    if energy["joules_per_step"] is not None:  # None when no step ran
        line += f", {energy['joules_per_step']:.3g} J/step"
    if energy.get("unmeasured"):
        line += f" (not counted: {', '.join(energy['unmeasured'])})"
    return line


def summary_lines(summary: dict, path: str) -> List[str]:
    """The run in about ten lines: what ran, the loss and the accuracies before →
    after, time, energy (or why it is not measurable), and where the JSON is."""
    cfg, data = summary["config"], summary["data"]
    threads = summary["cpu_threads"]
    resumed = summary["resumed_from_epoch"]
    losses = summary["epoch_losses"]
    lines = [
        f"pyclloss train: {cfg['loss']} (τ = {summary['temperature']:g}), {cfg['precision']}, "
        f"backend {cfg['backend']}, {summary['device']} ({threads} CPU "
        f"thread{'s' if threads != 1 else ''})"
        + (f", resumed at epoch {resumed}" if resumed is not None else ""),
        f"data     {data['source']}: {data['train_images']:,} training / "
        f"{data['test_images']:,} held-out images of {'×'.join(map(str, data['image_shape']))}",
        f"loss     {losses[0]:.4f} → {losses[-1]:.4f}  (epoch 1 → {len(losses)}, "
        f"{summary['steps_done']:,} steps of {cfg['batch_size']})",
        *_accuracy_lines(summary["evaluation"]),
        _time_line(summary),
        _energy_line(summary["energy"]),
        f"summary  {path}",
    ]
    return lines
