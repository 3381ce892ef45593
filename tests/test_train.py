"""The reference trainer: a tiny run end to end, exact resumption, clear errors,
and the pieces (data, losses, evaluation, checkpoints) on known values."""

import contextlib
import dataclasses
import datetime
import io
import json
import os
import random
import re
import sys

import numpy as np
import pytest
import torch

import pyclloss
from pyclloss.tools import cli
from pyclloss.reference import info_nce as reference
from pyclloss.tools.train import LOSSES, TrainConfig, main, train
from pyclloss.tools.train import trainer as trainer_module
from pyclloss.tools.train.data import augment, epoch_generator, load_dataset, load_tensor_file
from pyclloss.tools.train.evaluate import knn_accuracy, linear_probe_accuracy
from pyclloss.tools.train import report
from pyclloss.tools.train.losses import loss_function
from pyclloss.tools.train.progress import Progress
from pyclloss.tools.train.report import summary_lines


@pytest.fixture(autouse=True)
def in_a_fresh_folder(tmp_path, monkeypatch):
    """The trainer writes its run folders under the working directory."""
    monkeypatch.chdir(tmp_path)


@pytest.fixture
def tiny_data(tmp_path):
    """80 labelled 8×8 images of 4 classes (a .pt file)."""
    generator = torch.Generator().manual_seed(1)
    labels = torch.arange(80) % 4
    images = torch.rand(80, 1, 8, 8, generator=generator) * 0.3
    images[torch.arange(80), 0, 2 * labels, :] += 0.7  # a class-dependent bright row
    path = tmp_path / "tiny.pt"
    torch.save({"images": images, "labels": labels}, path)
    return str(path)


def tiny_config(data, **changes):
    cfg = TrainConfig(data=data, batch_size=16, epochs=2, width=4, embedding_dim=8,
                      queue_size=32, device="cpu")
    for name, value in changes.items():
        setattr(cfg, name, value)
    return cfg


def test_default_data_end_to_end_writes_the_summary(tmp_path, capsys):
    summary_path = tmp_path / "summary.json"
    threads_before = torch.get_num_threads()
    assert main(["--epochs", "1", "--batch-size", "128", "--width", "8", "--threads", "1",
                 "--summary", str(summary_path)]) == 0
    assert torch.get_num_threads() == threads_before  # the trainer's setting is undone
    printed = capsys.readouterr().out
    summary = json.loads(summary_path.read_text())
    assert summary["steps_done"] == 1348 // 128
    assert summary["cpu_threads"] == 1
    assert summary["data"] == {"source": "sklearn digits", "image_shape": [1, 8, 8],
                               "train_images": 1348, "test_images": 449}
    assert len(summary["epoch_losses"]) == 1 and 0 < summary["final_loss"] < 10
    for when in ("initial", "final"):
        for metric in ("knn_accuracy", "linear_probe_accuracy"):
            assert 0.3 < summary["evaluation"][when][metric] <= 1.0  # 10 classes: chance 0.1
    energy = summary["energy"]
    assert energy["steps"] == summary["steps_done"] and energy["samples"] == 10 * 128
    assert ("joules_per_step" in energy) != ("energy" in energy)  # a figure or the reason
    assert printed.splitlines() == summary_lines(summary, str(summary_path))


def test_the_summary_lines_show_the_runs_figures(tiny_data, tmp_path, capsys):
    """About ten lines on stdout, each figure the JSON's: loss and accuracies
    before → after, time, energy or why not, and where the JSON is."""
    path = tmp_path / "s.json"
    assert main(["--data", tiny_data, "--batch-size", "16", "--width", "4", "--epochs", "3",
                 "--embedding-dim", "8", "--device", "cpu", "--summary", str(path)]) == 0
    out = capsys.readouterr().out
    summary = json.loads(path.read_text())
    lines = dict(line.split(None, 1) for line in out.splitlines()[1:])
    assert out.startswith("pyclloss train: nt_xent (τ = 0.5), fp32, backend auto, cpu ")
    assert len(out.splitlines()) <= 12
    losses = summary["epoch_losses"]
    assert len(losses) == 3
    assert lines["loss"].startswith(f"{losses[0]:.4f} → {losses[-1]:.4f}  (epoch 1 → 3, 9 steps")
    for label, key in (("kNN", "knn_accuracy"), ("linear", "linear_probe_accuracy")):
        before, after = (summary["evaluation"][when][key] for when in ("initial", "final"))
        assert lines[label].startswith(f"{before:.1%} → {after:.1%}")
    assert lines["data"] == f"{tiny_data}: 60 training / 20 held-out images of 1×8×8"
    assert f"{summary['samples_per_second']:,.0f} samples/s" in lines["time"]
    energy = summary["energy"]
    assert lines["energy"] == (energy["energy"] if "energy" in energy else lines["energy"])
    assert lines["summary"] == str(path)


def test_summary_lines_of_unlabelled_data_and_of_a_finished_resume(tmp_path, capsys):
    unlabelled = tmp_path / "unlabelled.pt"
    torch.save(torch.rand(40, 1, 8, 8), unlabelled)
    checkpoint = str(tmp_path / "c.pt")
    argv = ["--data", str(unlabelled), "--batch-size", "16", "--width", "4", "--epochs", "1",
            "--embedding-dim", "8", "--device", "cpu", "--checkpoint", checkpoint]
    assert main(argv) == 0
    assert "accuracy skipped: the data has no labels" in capsys.readouterr().out.splitlines()
    assert main(argv + ["--resume", checkpoint]) == 0  # nothing left to train
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].endswith(", resumed at epoch 1")
    assert lines[-3].startswith("time     no epoch left to train; ")


def test_energy_line_with_a_measured_counter():
    energy = {"total_joules": 1234.5, "mean_watts": 41.2, "joules_per_step": 0.0823,
              "unmeasured": {"nvml": "no GPU"}}
    assert report._energy_line(energy) == ("energy   1,234.5 J, 41.2 W mean, 0.0823 J/step "
                                           "(not counted: nvml)")
    no_step = {"total_joules": 2.0, "mean_watts": 40.0, "joules_per_step": None}
    assert report._energy_line(no_step) == "energy   2.0 J, 40.0 W mean"


def test_the_json_goes_to_a_new_run_folder_by_default(tiny_data, tmp_path, capsys):
    argv = ["--data", tiny_data, "--batch-size", "16", "--width", "4", "--embedding-dim", "8",
            "--epochs", "1", "--device", "cpu", "--loss", "supcon"]
    assert main(argv) == 0
    (folder,) = os.listdir(tmp_path / "runs")
    assert re.fullmatch(r"\d{8}-\d{6}-supcon", folder)
    path = os.path.join("runs", folder, "summary.json")
    assert capsys.readouterr().out.splitlines()[-1] == f"summary  {path}"
    summary = json.loads((tmp_path / path).read_text())
    assert summary["config"]["loss"] == "supcon" and summary["steps_done"] == 60 // 16


def test_run_folders_never_collide(tmp_path):
    started = datetime.datetime(2026, 1, 2, 3, 4, 5)
    folders = [report.new_run_folder(str(tmp_path), "clip", started) for _ in range(3)]
    assert [os.path.basename(f) for f in folders] == [
        "20260102-030405-clip", "20260102-030405-clip-2", "20260102-030405-clip-3"]
    assert all(os.path.isdir(f) for f in folders)


def test_quiet_prints_nothing_and_still_writes_the_json(tiny_data, tmp_path, capsys):
    path = tmp_path / "quiet.json"
    assert main(["--data", tiny_data, "--batch-size", "16", "--width", "4", "--epochs", "2",
                 "--embedding-dim", "8", "--device", "cpu", "--summary", str(path),
                 "--quiet"]) == 0
    assert capsys.readouterr() == ("", "")
    assert len(json.loads(path.read_text())["epoch_losses"]) == 2


def test_help_shows_defaults_and_choices(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    # each option's entry, its lines joined
    entries = {entry.split()[0]: " ".join(entry.split())
               for entry in re.split(r"\n  (?=--)", text.split("\noptions:\n")[1])[1:]}
    assert entries["--loss"].startswith(f"--loss {{{','.join(LOSSES)}}} nt_xent: SimCLR's")
    assert entries["--precision"].startswith("--precision {fp32,fp16,bf16} ")
    assert entries["--backend"].startswith("--backend {auto,cpp,triton,cuda,reference} ")
    assert "auto (cuda if available), cpu, cuda or cuda:N" in entries["--device"]
    for name, value in dataclasses.asdict(TrainConfig()).items():
        flag = f"--{name.replace('_', '-')}"
        if isinstance(value, bool):  # a switch, off by default
            assert not value and "default" not in entries[flag], flag
        elif value is not None:
            assert entries[flag].endswith(f"(default: {value})"), flag
        else:
            assert "(default: None)" not in entries[flag] and "default" in entries[flag], flag
    assert "default" not in entries["--quiet"]


def test_progress_lines_go_to_stderr(tiny_data, tmp_path, capsys):
    assert main(["--data", tiny_data, "--batch-size", "16", "--width", "4", "--epochs", "2",
                 "--embedding-dim", "8", "--device", "cpu", "--summary",
                 str(tmp_path / "s.json")]) == 0
    out, err = capsys.readouterr()
    lines = err.splitlines()
    assert [line.split("  ")[:1] for line in lines] == [["epoch 1/2"], ["epoch 2/2"]]
    losses = json.loads((tmp_path / "s.json").read_text())["epoch_losses"]
    assert [line.split("  ")[1] for line in lines] == [f"loss {x:.4f}" for x in losses]
    assert all(line.endswith(" samples/s") for line in lines) and "epoch 1/2" not in out


class Terminal(io.StringIO):
    def isatty(self):
        return True


@pytest.mark.parametrize("tqdm_installed", [True, False])
def test_progress_on_a_terminal(tqdm_installed, monkeypatch):
    """A tqdm bar of epochs with the loss and samples/s; plain lines without tqdm."""
    if tqdm_installed:
        pytest.importorskip("tqdm")
    else:
        monkeypatch.setitem(sys.modules, "tqdm", None)
    terminal = Terminal()
    monkeypatch.setattr(sys, "stderr", terminal)
    with Progress("clip", 4, 1) as progress:
        for epoch, loss in ((2, 3.25), (3, 3.125), (4, 3.0)):
            progress.epoch(epoch, loss, 1234.0)
    text = terminal.getvalue()
    if tqdm_installed:
        final = text.replace("\r", "\n").strip().splitlines()[-1]
        assert final.startswith("clip: 100%") and "4/4" in final and "epoch" in final
        assert final.endswith("loss 3.0000, 1,234 samples/s]")
    else:
        assert text.splitlines() == [f"epoch {e}/4  loss {x:.4f}  1,234 samples/s"
                                     for e, x in ((2, 3.25), (3, 3.125), (4, 3.0))]


def test_quiet_progress_prints_nothing(capsys):
    with Progress("clip", 2, 0, enabled=False) as progress:
        progress.epoch(1, 1.0, 10.0)
        progress.epoch(2, 1.0, 10.0)
    assert capsys.readouterr() == ("", "")


def test_version(capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["--version"])
    assert exit_info.value.code == 0
    assert capsys.readouterr().out == f"pyclloss {pyclloss.__version__}\n"


# fp16 runs with batches of 8: 7 steps an epoch, so that the first epoch has steps
# past the GradScaler's first skipped ones (it starts at a scale that overflows).
@pytest.mark.parametrize("loss, precision, batch_size", [
    ("nt_xent", "fp32", 16), ("moco", "bf16", 16), ("clip", "fp16", 8), ("supcon", "fp16", 8)])
def test_resume_equals_an_uninterrupted_run(tiny_data, tmp_path, loss, precision, batch_size):
    straight = str(tmp_path / "straight.pt")
    split = str(tmp_path / "split.pt")
    run = dict(loss=loss, precision=precision, batch_size=batch_size)
    full = train(tiny_config(tiny_data, checkpoint=straight, **run))
    train(tiny_config(tiny_data, epochs=1, checkpoint=split, **run))
    resumed = train(tiny_config(tiny_data, resume=split, checkpoint=split, **run))
    assert resumed["resumed_from_epoch"] == 1
    assert resumed["epoch_losses"] == full["epoch_losses"]
    assert resumed["evaluation"] == full["evaluation"]
    a = torch.load(straight, weights_only=True)["learner"]
    b = torch.load(split, weights_only=True)["learner"]
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name
    assert not [f for f in os.listdir(tmp_path) if f.startswith(".tmp-")]


def test_rng_states_round_trip():
    states = trainer_module.rng_states()
    draws = torch.rand(3), np.random.rand(3), random.random()
    trainer_module.set_rng_states(states)
    again = torch.rand(3), np.random.rand(3), random.random()
    assert torch.equal(draws[0], again[0]) and (draws[1] == again[1]).all()
    assert draws[2] == again[2]


def test_a_different_seed_trains_differently(tiny_data):
    losses = [train(tiny_config(tiny_data, epochs=1, seed=s))["epoch_losses"] for s in (0, 1)]
    assert losses[0] != losses[1]


def run_main_expecting_error(argv, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    return capsys.readouterr().err


@pytest.mark.parametrize("argv, message", [
    (["--loss", "triplet"], "argument --loss: invalid choice: 'triplet' (choose from "),
    (["--precision", "fp8"], "argument --precision: invalid choice: 'fp8'"),
    (["--backend", "tpu"], "argument --backend: invalid choice: 'tpu'"),
    (["--data", "/nonexistent/images.pt"], "--data /nonexistent/images.pt: no such file"),
    (["--resume", "/nonexistent/ckpt.pt"], "--resume /nonexistent/ckpt.pt: no such checkpoint"),
    (["--batch-size", "1"], "--batch-size must be at least 2"),
    (["--temperature", "0"], "--temperature must be > 0"),
    (["--loss", "moco", "--queue-size", "8", "--batch-size", "16"], "--queue-size must hold"),
    (["--device", "cuda:0"] if not torch.cuda.is_available() else ["--epochs", "0"],
     "CUDA is not available" if not torch.cuda.is_available() else "--epochs must be"),
])
def test_bad_arguments_give_clear_errors(argv, message, capsys):
    assert message in run_main_expecting_error(argv, capsys)


def test_errors_that_depend_on_the_data(tiny_data, tmp_path, capsys):
    unlabelled = tmp_path / "unlabelled.pt"
    torch.save(torch.rand(20, 1, 8, 8), unlabelled)
    err = run_main_expecting_error(["--data", str(unlabelled), "--loss", "supcon"], capsys)
    assert "--loss supcon needs labels" in err
    err = run_main_expecting_error(["--data", tiny_data, "--batch-size", "512"], capsys)
    assert "--batch-size 512 is larger than the 60 training images" in err


def _write(path, content):
    """A .pt file: bytes as they are, anything else through torch.save."""
    if isinstance(content, bytes):
        path.write_bytes(content)
    else:
        torch.save(content, path)
    return str(path)


BAD_FILES = {"garbage": b"\x00not a pickle\xff" * 10, "empty": b"", "a list": [1, 2, 3],
             "a number": 7}


@pytest.mark.parametrize("kind", BAD_FILES)
@pytest.mark.parametrize("flag", ["--data", "--resume"])
def test_unreadable_files_are_one_line_errors(flag, kind, tmp_path, capsys, monkeypatch):
    """Garbage, empty and non-dict files: one line, exit 2, before any training step."""
    monkeypatch.setattr(trainer_module, "train_step", _no_training)
    path = _write(tmp_path / "bad.pt", BAD_FILES[kind])
    err = run_main_expecting_error([flag, path, "--epochs", "1"], capsys)
    assert err.startswith(f"pyclloss train: error: {flag} {path}: ") and err.count("\n") == 1
    if flag == "--resume" and kind in ("a list", "a number"):
        assert "not a checkpoint of this trainer" in err
    if flag == "--data" and kind == "a number":
        assert "expected a tensor, (images, labels) or a dict, got int" in err
    if kind in ("garbage", "empty"):
        assert "not a file torch.load can read" in err


def _no_training(*args, **kwargs):
    raise AssertionError("training started")


@pytest.mark.parametrize("state, message", [
    ({"version": 1}, "a damaged checkpoint (missing or malformed: config, epoch, step, "
                     "epoch_losses, initial_eval, learner, optimizer, scaler, rng)"),
    ({"version": 1, "config": {}, "epoch": 1, "step": "3", "epoch_losses": [],
      "initial_eval": None, "learner": {}, "optimizer": {}, "scaler": {}, "rng": {}},
     "a damaged checkpoint (missing or malformed: step)"),
    ({"version": 1, "config": {"colour": "red"}, "epoch": 1, "step": 3, "epoch_losses": [],
      "initial_eval": None, "learner": {}, "optimizer": {}, "scaler": {}, "rng": {}},
     "the checkpoint has an unknown setting 'colour'"),
    ({"version": 1, "config": {}, "epoch": 1, "step": 3, "epoch_losses": [1.0],
      "initial_eval": None, "learner": {"weight": torch.ones(2)}, "optimizer": {},
      "scaler": {}, "rng": {}}, "does not fit this run ("),
])
def test_damaged_checkpoints_are_one_line_errors(state, message, tiny_data, tmp_path, capsys,
                                                 monkeypatch):
    monkeypatch.setattr(trainer_module, "train_step", _no_training)
    path = _write(tmp_path / "c.pt", state)
    err = run_main_expecting_error(["--data", tiny_data, "--batch-size", "16", "--width", "4",
                                    "--embedding-dim", "8", "--resume", path], capsys)
    assert f"--resume {path}: {message}" in err and err.count("\n") == 1


@pytest.mark.parametrize("images, labels, message", [
    (torch.full((8, 1, 4, 4), float("nan")), None, "images contain NaN or Inf"),
    (torch.rand(8, 4, 4), torch.tensor([0, 1, 0, 1, 0, 1, 0, -1]),
     "labels must be class indices in [0, 8) (at most one class per image), got -1..1"),
    (torch.rand(8, 4, 4), torch.tensor([0, 1, 0, 1, 0, 1, 0, 10**12]),
     "labels must be class indices in [0, 8)"),
    (torch.rand(8, 4, 4), torch.tensor([0.0, 1.5, 0, 1, 0, 1, 0, 1]),
     "labels must be integers (class indices)"),
    (torch.rand(8, 4, 4), ["a"] * 8, "labels must be a tensor or a list of integers"),
    ([[0.5]], None, "images must be a tensor, got list"),
    (torch.rand(0, 1, 4, 4), None, "images must be (N, C, H, W) or (N, H, W) with N >= 1"),
])
def test_bad_data_is_a_one_line_error(images, labels, message, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(trainer_module, "train_step", _no_training)
    path = _write(tmp_path / "d.pt", {"images": images, "labels": labels} if labels is not None
                  else {"images": images})
    err = run_main_expecting_error(["--data", path, "--loss", "nt_xent"], capsys)
    assert f"--data {path}: {message}" in err and err.count("\n") == 1


def test_unwritable_outputs_fail_before_training(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(trainer_module, "train_step", _no_training)
    monkeypatch.setattr(trainer_module, "load_dataset", _no_training)
    a_file = tmp_path / "a-file"
    a_file.write_text("")
    for flag in ("--summary", "--checkpoint"):
        inside_a_file = str(a_file / "out.json")
        err = run_main_expecting_error([flag, inside_a_file], capsys)
        assert f"{flag} {inside_a_file}: cannot write there" in err and err.count("\n") == 1
        err = run_main_expecting_error([flag, str(tmp_path)], capsys)
        assert f"{flag} {tmp_path}: is a folder, not a file" in err
    (tmp_path / "runs").write_text("")  # the default run folders' parent is a file
    err = run_main_expecting_error([], capsys)
    assert "--summary's default folder runs: cannot write there" in err
    # a folder still to be made is made, and the probe leaves nothing there
    trainer_module.check_config(TrainConfig(summary=str(tmp_path / "new" / "s.json")))
    assert os.listdir(tmp_path / "new") == []


@pytest.mark.parametrize("argv, message", [
    (["--threads", "-1"], "--threads must be in [0, "),
    (["--threads", str(10**6)], "--threads must be in [0, "),
    (["--temperature", "nan"], "--temperature must be > 0 and finite"),
    (["--temperature", "inf"], "--temperature must be > 0 and finite"),
])
def test_bad_numbers_are_one_line_errors(argv, message, capsys):
    err = run_main_expecting_error(argv, capsys)
    assert message in err and err.count("\n") == 1


def test_resume_refuses_a_changed_configuration(tiny_data, tmp_path, capsys):
    checkpoint = str(tmp_path / "c.pt")
    train(tiny_config(tiny_data, epochs=1, checkpoint=checkpoint))
    err = run_main_expecting_error(["--data", tiny_data, "--batch-size", "8", "--width", "4",
                                    "--embedding-dim", "8", "--resume", checkpoint], capsys)
    assert "trained with batch_size=16, this run asks for 8" in err


def test_unsupported_autocast_is_a_clear_error(monkeypatch):
    # Older torch warns and leaves fp16 CPU autocast off: the output stays fp32.
    monkeypatch.setattr(torch, "autocast", lambda *args, **kwargs: contextlib.nullcontext())
    with pytest.raises(ValueError, match="has no torch.float16 autocast on cpu; use bf16"):
        trainer_module.autocast_dtype("fp16", torch.device("cpu"))
    assert trainer_module.autocast_dtype("fp32", torch.device("cpu")) is None


# ------------------------------------------------------------------------ the pieces


def test_tensor_files_in_every_accepted_layout(tmp_path):
    images = torch.randint(0, 256, (6, 5, 5), dtype=torch.uint8)
    labels = torch.tensor([0, 1, 0, 1, 2, 2])
    for name, obj in {"plain": images, "pair": (images, labels),
                      "dict": {"images": images, "labels": labels}}.items():
        path = tmp_path / f"{name}.pt"
        torch.save(obj, path)
        data = load_tensor_file(str(path))
        assert data.images.shape == (6, 1, 5, 5) and data.images.dtype == torch.float32
        assert torch.equal(data.images, images.unsqueeze(1).float() / 255)
        assert data.labels is None if name == "plain" else torch.equal(data.labels, labels)
    torch.save({"images": images, "labels": labels[:3]}, tmp_path / "short.pt")
    with pytest.raises(ValueError, match="3 labels for 6 images"):
        load_tensor_file(str(tmp_path / "short.pt"))


def test_image_folder_needs_pillow(tmp_path, monkeypatch):
    (tmp_path / "cats").mkdir()
    monkeypatch.setitem(sys.modules, "PIL", None)
    with pytest.raises(RuntimeError, match="needs Pillow"):
        load_dataset(str(tmp_path), 16)


def test_image_folder_with_pillow(tmp_path):
    image_module = pytest.importorskip("PIL.Image")
    for label, color in (("a", (255, 0, 0)), ("b", (0, 0, 255))):
        (tmp_path / label).mkdir()
        image_module.new("RGB", (10, 7), color).save(tmp_path / label / "x.png")
    data = load_dataset(str(tmp_path), 4)
    assert data.images.shape == (2, 3, 4, 4) and data.labels.tolist() == [0, 1]
    assert data.images[0, 0].min() == 1.0 and data.images[1, 2].min() == 1.0


def test_data_order_and_views_are_a_function_of_seed_and_epoch():
    images = torch.rand(5, 1, 8, 8)

    def draw(seed, epoch):
        generator = epoch_generator(seed, epoch, "cpu")
        return torch.randperm(5, generator=generator), augment(images, generator)

    order, views = draw(3, 7)
    again_order, again_views = draw(3, 7)
    assert torch.equal(order, again_order) and torch.equal(views, again_views)
    assert not torch.equal(views, draw(3, 8)[1]) and not torch.equal(views, draw(4, 7)[1])
    assert views.shape == images.shape and not torch.allclose(views, images)


def test_identity_augmentation_returns_the_image():
    images = torch.rand(3, 2, 6, 6)
    same = augment(images, torch.Generator().manual_seed(0), min_crop=1.0, max_shift=0.0,
                   max_rotation=0.0, noise=0.0)
    torch.testing.assert_close(same, images)


def test_every_registered_loss_trains(tiny_data):
    for name in LOSSES:
        summary = train(tiny_config(tiny_data, loss=name, epochs=1))
        assert torch.isfinite(torch.tensor(summary["epoch_losses"])).all(), name


def test_moco_entry_is_pycllosss_moco_loss_with_its_queue():
    torch.manual_seed(0)
    loss = LOSSES["moco"].build(6, 10, TrainConfig(queue_size=5, temperature=0.2))
    query, key = torch.randn(3, 6), torch.randn(3, 6)
    queue_before = loss.loss.queue.clone()
    expected = reference.info_nce(query, key, 0.2, queue=queue_before, in_batch_negatives=False)
    torch.testing.assert_close(loss(query, key, None), expected)
    torch.testing.assert_close(loss.loss.queue[:3], torch.nn.functional.normalize(key, dim=1))


def test_the_backend_is_passed_to_the_loss(monkeypatch):
    def fused(z1, z2, temperature=0.5, *, backend="auto"):
        return backend

    library = type("Library", (), {"fused": staticmethod(fused)})
    monkeypatch.setattr("pyclloss.tools.train.losses._loss_library", lambda: library)
    assert loss_function("fused", "triton")(None, None) == "triton"
    assert loss_function("fused", "auto")(None, None) == "auto"


def test_knn_and_linear_probe_on_known_features():
    generator = torch.Generator().manual_seed(0)
    centers = torch.eye(4) * 5
    labels = torch.arange(200) % 4
    x = centers[labels] + 0.3 * torch.randn(200, 4, generator=generator)
    assert knn_accuracy(x[:150], labels[:150], x[150:], labels[150:]) == 1.0
    assert linear_probe_accuracy(x[:150], labels[:150], x[150:], labels[150:]) == 1.0
    noise = torch.randn(200, 4, generator=generator)  # features unrelated to the labels
    assert knn_accuracy(noise[:150], labels[:150], noise[150:], labels[150:]) < 0.6


def test_a_failed_checkpoint_write_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    path = str(tmp_path / "c.pt")
    trainer_module.save_checkpoint(path, {"epoch": 1})

    def failing_save(obj, f):
        f.write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", failing_save)
    with pytest.raises(OSError, match="disk full"):
        trainer_module.save_checkpoint(path, {"epoch": 2})
    monkeypatch.undo()
    assert torch.load(path, weights_only=True) == {"epoch": 1}
    assert os.listdir(tmp_path) == ["c.pt"]


# ------------------------------------------------ DCL, HCL, decoupled; DBPM


@pytest.mark.parametrize("loss", ["dcl", "hcl", "decoupled"])
def test_pair_quality_losses_train_on_the_default_data(loss):
    summary = train(TrainConfig(loss=loss, epochs=1, batch_size=256, width=4, device="cpu"),
                    progress=False)
    assert summary["data"]["source"] == "sklearn digits"
    assert 0 < summary["final_loss"] < 10 and summary["dbpm"] is None


def test_dbpm_reweights_in_a_run_on_the_default_data():
    """Warm-up of one epoch: the first epoch's end flags samples, the second
    epoch down-weights them, so its loss differs from the same run without DBPM."""
    run = dict(loss="dcl", epochs=2, batch_size=256, width=4, device="cpu")
    plain = train(TrainConfig(**run), progress=False)
    mined = train(TrainConfig(**run, dbpm=True, dbpm_warmup=1), progress=False)
    assert mined["epoch_losses"][0] == pytest.approx(plain["epoch_losses"][0], rel=1e-5)
    assert mined["epoch_losses"][1] != pytest.approx(plain["epoch_losses"][1], rel=1e-3)
    report = mined["dbpm"]
    assert report["warmup_epochs"] == 1 and report["noisy"] + report["faulty"] > 0
    assert report["memory_std"] > 0


def test_every_per_sample_loss_trains_with_dbpm(tiny_data):
    for name in [n for n, entry in LOSSES.items() if entry.per_sample]:
        summary = train(tiny_config(tiny_data, loss=name, dbpm=True, dbpm_warmup=1))
        assert torch.isfinite(torch.tensor(summary["epoch_losses"])).all(), name
        assert summary["dbpm"]["memory_std"] > 0, name


def test_dbpm_default_warmup_flags_within_the_default_run():
    defaults = TrainConfig()
    assert 0 < defaults.dbpm_warmup < defaults.epochs


def test_dbpm_loss_is_dbpm_of_the_mean_of_both_views_rows():
    loss = trainer_module.build_learner(
        TrainConfig(loss="hcl", dbpm=True, dbpm_warmup=0, epochs=4, embedding_dim=6,
                    temperature=0.5), 1, torch.zeros(1), torch.ones(1), 10, 20).loss
    z1, z2, idx = torch.randn(5, 6), torch.randn(5, 6), torch.tensor([3, 0, 7, 19, 4])
    rows = pyclloss.hcl_loss(z1, z2, 0.5, reduction="none")
    torch.testing.assert_close(loss(z1, z2, None, idx), rows.view(2, 5).mean(0).mean())
    torch.testing.assert_close(loss.dbpm.epoch_loss[idx], rows.view(2, 5).mean(0).double())


def test_dbpm_resume_equals_an_uninterrupted_run(tiny_data, tmp_path, monkeypatch):
    """The DBPM memory is part of the checkpoint; a run interrupted after its
    second epoch resumes exactly. Its --epochs (DBPM's epoch weights) stays."""
    run = dict(loss="decoupled", dbpm=True, dbpm_warmup=1, epochs=3)
    straight, split = str(tmp_path / "straight.pt"), str(tmp_path / "split.pt")
    full = train(tiny_config(tiny_data, checkpoint=straight, **run))
    one_epoch = trainer_module.train_epoch

    def interrupted(cfg, epoch, *args):
        if epoch == 2:
            raise KeyboardInterrupt
        return one_epoch(cfg, epoch, *args)

    monkeypatch.setattr(trainer_module, "train_epoch", interrupted)
    with pytest.raises(KeyboardInterrupt):
        train(tiny_config(tiny_data, checkpoint=split, **run))
    monkeypatch.undo()
    resumed = train(tiny_config(tiny_data, resume=split, checkpoint=split, **run))
    assert resumed["resumed_from_epoch"] == 2
    assert resumed["epoch_losses"] == full["epoch_losses"]
    assert resumed["dbpm"] == full["dbpm"]
    with pytest.raises(ValueError, match="trained with epochs=3, this run asks for 4"):
        train(tiny_config(tiny_data, resume=split, **{**run, "epochs": 4}))


@pytest.mark.parametrize("argv, message", [
    (["--loss", "clip", "--dbpm"], "--dbpm needs a loss with per-sample terms"),
    (["--dbpm", "--dbpm-warmup", "-1"], "--dbpm-warmup must be"),
])
def test_dbpm_bad_arguments(argv, message, capsys):
    assert message in run_main_expecting_error(argv, capsys)
