"""The training loop: configuration, precision, checkpoints that resume exactly,
and the run's summary."""

import contextlib
import dataclasses
import os
import random
import tempfile
import time
import warnings
from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch

from pyclloss.tools import _arguments as arguments
from pyclloss.tools.energy import EnergyMeter, energy_report, gpus_of
from pyclloss.tools.train.data import (augment, epoch_generator, load_dataset, read_torch_file,
                                 train_test_split)
from pyclloss.tools.train.evaluate import evaluate
from pyclloss.tools.train.losses import LOSSES, DBPMLoss
from pyclloss.tools.train.model import ContrastiveLearner, Encoder
from pyclloss.tools.train.progress import Progress

PRECISIONS = {"fp32": None, "fp16": torch.float16, "bf16": torch.bfloat16}
BACKENDS = ("auto", "cpp", "triton", "cuda", "reference")
CHECKPOINT_VERSION = 1


@dataclass
class TrainConfig:
    loss: str = "nt_xent"
    precision: str = "fp32"
    backend: str = "auto"
    batch_size: int = 256
    epochs: int = 150
    lr: float = 5e-3
    weight_decay: float = 1e-4
    temperature: Optional[float] = None  # None: the loss's own default
    embedding_dim: int = 64
    width: int = 32
    queue_size: int = 1024  # moco
    momentum: float = 0.99  # moco's key encoder
    seed: int = 0
    device: str = "auto"
    threads: int = 1  # CPU threads of torch; 0: torch's default
    data: Optional[str] = None  # None: scikit-learn's digits
    image_size: int = 32  # image folders are resized to this
    checkpoint: Optional[str] = None
    resume: Optional[str] = None
    summary: Optional[str] = None
    dbpm: bool = False  # re-weight the per-sample losses by dynamic bad pair mining
    dbpm_warmup: int = 50  # epochs before DBPM flags samples (a third of the default run)


# What may change between a run and its resumption without changing the result.
RESUMABLE_CHANGES = ("epochs", "device", "checkpoint", "resume", "summary")


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {name}: CUDA is not available to this torch "
                         f"({torch.__version__})")
    return device


def autocast_dtype(precision: str, device: torch.device) -> Optional[torch.dtype]:
    """The autocast dtype of ``precision``, checked to work on ``device``: some
    torch versions have no fp16 autocast on the CPU (they warn and run fp32)."""
    if precision not in PRECISIONS:
        raise ValueError(f"--precision {precision!r}: expected one of {', '.join(PRECISIONS)}")
    dtype = PRECISIONS[precision]
    if dtype is None:
        return None
    ones = torch.ones(1, 1, device=device)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with torch.autocast(device.type, dtype=dtype):
                works = torch.nn.functional.linear(ones, ones).dtype == dtype
    except RuntimeError:
        works = False
    if not works:
        raise ValueError(f"--precision {precision}: torch {torch.__version__} has no {dtype} "
                         f"autocast on {device.type}; use "
                         f"{'bf16' if precision == 'fp16' else 'fp32'}")
    return dtype


def check_config(cfg: TrainConfig) -> None:
    """Every argument, before any work; the folders of ``--checkpoint`` and
    ``--summary`` are created and probed with a temporary file."""
    if cfg.loss not in LOSSES:
        raise ValueError(f"--loss {cfg.loss!r}: expected one of {', '.join(LOSSES)}")
    if cfg.backend not in BACKENDS:
        raise ValueError(f"--backend {cfg.backend!r}: expected one of {', '.join(BACKENDS)}")
    arguments.threads("--threads", cfg.threads)
    for name in ("batch_size", "epochs", "embedding_dim", "width", "queue_size", "image_size"):
        arguments.at_least(f"--{name.replace('_', '-')}", getattr(cfg, name), 1)
    arguments.at_least("--dbpm-warmup", cfg.dbpm_warmup, 0)
    if cfg.dbpm and not LOSSES[cfg.loss].per_sample:
        raise ValueError(f"--dbpm needs a loss with per-sample terms, one of "
                         f"{', '.join(n for n, e in LOSSES.items() if e.per_sample)}; "
                         f"--loss {cfg.loss} has none")
    if cfg.batch_size < 2:
        raise ValueError("--batch-size must be at least 2 (a contrastive batch needs negatives)")
    if cfg.loss == "moco" and cfg.queue_size < cfg.batch_size:
        raise ValueError("--queue-size must hold at least one batch (>= --batch-size)")
    if cfg.temperature is not None and not 0 < cfg.temperature < float("inf"):
        raise ValueError("--temperature must be > 0 and finite")
    if not 0.0 <= cfg.momentum < 1.0:
        raise ValueError("--momentum must be in [0, 1)")
    if cfg.resume is not None and not os.path.isfile(cfg.resume):
        raise FileNotFoundError(f"--resume {cfg.resume}: no such checkpoint")
    for flag, path in (("--checkpoint", cfg.checkpoint), ("--summary", cfg.summary)):
        if path is not None:
            arguments.writable_file(flag, path)


# ----------------------------------------------------------------------- checkpoints


def rng_states() -> dict:
    np_state = np.random.get_state()
    return {"torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
            "numpy": (np_state[0], np_state[1].tolist(), *np_state[2:]),
            "python": random.getstate()}


def set_rng_states(states: dict) -> None:
    torch.set_rng_state(states["torch"])
    if states["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])
    name, keys, *rest = states["numpy"]
    np.random.set_state((name, np.array(keys, dtype=np.uint32), *rest))
    random.setstate(states["python"])


def save_checkpoint(path: str, state: dict) -> None:
    """Writes to a temporary file beside ``path`` and renames it over ``path``, so
    that an interrupted write never leaves a truncated checkpoint."""
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=".tmp-", suffix=".pt")
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


# entries of a checkpoint, with the type of those the loop uses as they are
CHECKPOINT_ENTRIES = {"version": int, "config": dict, "epoch": int, "step": int,
                      "epoch_losses": list, "initial_eval": object, "learner": dict,
                      "optimizer": dict, "scaler": dict, "rng": dict}


def load_checkpoint(path: str, cfg: TrainConfig) -> dict:
    """The checkpoint at ``path``, checked to be one of this trainer's and to fit ``cfg``."""
    state = read_torch_file("--resume", path)
    if not isinstance(state, dict) or state.get("version") != CHECKPOINT_VERSION:
        raise ValueError(f"--resume {path}: not a checkpoint of this trainer")
    damaged = [name for name, kind in CHECKPOINT_ENTRIES.items()
               if name not in state or not isinstance(state[name], kind)]
    if damaged:
        raise ValueError(f"--resume {path}: a damaged checkpoint (missing or malformed: "
                         f"{', '.join(damaged)})")
    # DBPM weighs each epoch's losses by (epoch + 1) / epochs: --epochs stays
    resumable = [n for n in RESUMABLE_CHANGES if not (cfg.dbpm and n == "epochs")]
    for name, saved in state["config"].items():
        if not hasattr(cfg, name):
            raise ValueError(f"--resume {path}: the checkpoint has an unknown setting {name!r}")
        if name not in resumable and getattr(cfg, name) != saved:
            raise ValueError(f"--resume {path}: the checkpoint was trained with "
                             f"{name}={saved!r}, this run asks for {getattr(cfg, name)!r}")
    if state["epoch"] > cfg.epochs:
        raise ValueError(f"--resume {path}: the checkpoint is at epoch {state['epoch']}, "
                         f"past --epochs {cfg.epochs}")
    return state


def restore(path: str, state: dict, learner, optimizer, scaler) -> None:
    """Loads the checkpoint's states; one that does not fit this model is a ValueError."""
    try:
        learner.load_state_dict(state["learner"])
        optimizer.load_state_dict(state["optimizer"])
        scaler.load_state_dict(state["scaler"])
        set_rng_states(state["rng"])
    except (RuntimeError, KeyError, ValueError, TypeError, IndexError) as exc:
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ValueError(f"--resume {path}: does not fit this run ({reason})") from None


# -------------------------------------------------------------------------- training


def loss_temperature(cfg: TrainConfig) -> float:
    return LOSSES[cfg.loss].temperature if cfg.temperature is None else cfg.temperature


def build_learner(cfg: TrainConfig, in_channels: int, mean, std, num_classes: int = 10,
                  num_samples: int = 0) -> ContrastiveLearner:
    """The model and its loss; with ``--dbpm`` the loss is wrapped in DBPM over
    the ``num_samples`` training images."""
    entry = LOSSES[cfg.loss]
    loss_cfg = dataclasses.replace(cfg, temperature=loss_temperature(cfg))
    encoder = Encoder(in_channels, cfg.width, mean, std)
    loss = entry.build(cfg.embedding_dim, num_classes, loss_cfg)
    if cfg.dbpm:
        loss = DBPMLoss(loss, num_samples, cfg.epochs, cfg.dbpm_warmup)
    return ContrastiveLearner(encoder, cfg.embedding_dim, loss,
                              cfg.momentum if entry.momentum_encoder else None)


def dbpm_report(dbpm) -> dict:
    """What DBPM flagged at the last epoch's end (the samples down-weighted next)."""
    return {"warmup_epochs": dbpm.warmup_epochs, "noisy": len(dbpm.noisy_indices),
            "faulty": len(dbpm.faulty_indices),
            "memory_mean": dbpm.mu.item(), "memory_std": dbpm.sigma.item()}


def train_step(learner, optimizer, scaler, view1, view2, labels, amp_dtype,
               indices=None) -> torch.Tensor:
    """One optimisation step; returns the loss (a 0-dim tensor, not synchronised).
    ``indices``: the batch's training-set indices, for a loss that tracks samples
    (DBPM)."""
    loss = learner(view1, view2, labels, amp_dtype, indices)
    optimizer.zero_grad(set_to_none=True)
    scaler.scale(loss).backward()
    scaler.step(optimizer)
    scaler.update()
    learner.update_momentum_encoder()
    return loss.detach()


@contextlib.contextmanager
def cpu_threads(threads: int):
    """torch's intra-op threads for a block (0 leaves them be). A small model runs
    fastest on one: more threads mostly wait on each other, the more so on a busy
    machine."""
    previous = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def train_epoch(cfg: TrainConfig, epoch: int, learner, optimizer, scaler, train_set,
                amp_dtype) -> list:
    """One epoch in the order and with the views drawn from (seed, epoch); the
    steps' losses."""
    generator = epoch_generator(cfg.seed, epoch, train_set.images.device)
    order = torch.randperm(len(train_set), generator=generator, device=train_set.images.device)
    steps = len(train_set) // cfg.batch_size
    losses = []
    for index in order[:steps * cfg.batch_size].view(steps, -1):
        images = train_set.images[index]
        labels = train_set.labels[index] if train_set.labels is not None else None
        view1, view2 = augment(images, generator), augment(images, generator)
        loss = train_step(learner, optimizer, scaler, view1, view2, labels, amp_dtype,
                          index if cfg.dbpm else None)
        losses.append(loss.item())
    if cfg.dbpm:
        learner.loss.end_epoch()
    return losses


def train(cfg: TrainConfig, progress: bool = True) -> dict:
    """Trains, evaluates before and after, and returns the run's summary;
    ``progress`` shows the epochs on stderr."""
    check_config(cfg)
    with cpu_threads(cfg.threads):
        return _train(cfg, progress)


def _train(cfg: TrainConfig, show_progress: bool) -> dict:
    started = time.perf_counter()
    device = resolve_device(cfg.device)
    amp_dtype = autocast_dtype(cfg.precision, device)
    state = load_checkpoint(cfg.resume, cfg) if cfg.resume else None
    data = load_dataset(cfg.data, cfg.image_size)
    if LOSSES[cfg.loss].needs_labels and data.labels is None:
        raise ValueError(f"--loss {cfg.loss} needs labels; {data.source} has none")
    train_set, test_set = train_test_split(data)
    steps_per_epoch = len(train_set) // cfg.batch_size
    if steps_per_epoch == 0:
        raise ValueError(f"--batch-size {cfg.batch_size} is larger than the "
                         f"{len(train_set)} training images")
    train_set, test_set = train_set.to(device), test_set.to(device)
    can_evaluate = data.labels is not None and len(test_set) > 0

    torch.manual_seed(cfg.seed)
    mean = train_set.images.mean(dim=(0, 2, 3))
    std = train_set.images.std(dim=(0, 2, 3)).clamp_min(1e-6)
    classes = int(data.labels.max()) + 1 if data.labels is not None else 0
    learner = build_learner(cfg, train_set.images.shape[1], mean, std, classes,
                            len(train_set)).to(device)
    optimizer = torch.optim.AdamW([p for p in learner.parameters() if p.requires_grad],
                                  lr=cfg.lr, weight_decay=cfg.weight_decay)
    scaler = torch.amp.GradScaler(device.type, enabled=cfg.precision == "fp16")

    def evaluation():
        if not can_evaluate:
            return None
        return evaluate(learner.encoder, train_set.images, train_set.labels,
                        test_set.images, test_set.labels)

    if state is not None:
        restore(cfg.resume, state, learner, optimizer, scaler)
        first_epoch, step, epoch_losses, initial = (
            state["epoch"], state["step"], state["epoch_losses"], state["initial_eval"])
    else:
        first_epoch, step, epoch_losses, initial = 0, 0, [], evaluation()

    samples, train_seconds = 0, 0.0
    learner.train()
    with EnergyMeter(gpus=gpus_of(device)) as meter, \
            Progress(cfg.loss, cfg.epochs, first_epoch, enabled=show_progress) as progress:
        for epoch in range(first_epoch, cfg.epochs):
            epoch_start = time.perf_counter()
            losses = train_epoch(cfg, epoch, learner, optimizer, scaler, train_set, amp_dtype)
            train_seconds += time.perf_counter() - epoch_start
            step += len(losses)
            samples += len(losses) * cfg.batch_size
            epoch_losses.append(sum(losses) / len(losses))
            progress.epoch(epoch + 1, epoch_losses[-1], samples / train_seconds)
            meter.sample()
            if cfg.checkpoint:
                save_checkpoint(cfg.checkpoint, {
                    "version": CHECKPOINT_VERSION, "config": dataclasses.asdict(cfg),
                    "epoch": epoch + 1, "step": step, "epoch_losses": epoch_losses,
                    "initial_eval": initial, "learner": learner.state_dict(),
                    "optimizer": optimizer.state_dict(), "scaler": scaler.state_dict(),
                    "rng": rng_states()})

    final = evaluation()
    summary = {
        "config": dataclasses.asdict(cfg),
        "temperature": loss_temperature(cfg),
        "device": str(device),
        "cpu_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "data": {"source": data.source, "image_shape": list(data.images.shape[1:]),
                 "train_images": len(train_set), "test_images": len(test_set)},
        "resumed_from_epoch": first_epoch if cfg.resume else None,
        "epochs_done": cfg.epochs,
        "steps_done": step,
        "epoch_losses": epoch_losses,
        "final_loss": epoch_losses[-1] if epoch_losses else None,
        "train_seconds": train_seconds,
        "samples_per_second": samples / train_seconds if train_seconds > 0 else None,
        "evaluation": ({"initial": initial, "final": final} if can_evaluate
                       else "skipped: the data has no labels"),
        "energy": energy_report(meter.result, step - first_epoch * steps_per_epoch, samples),
        "dbpm": dbpm_report(learner.loss.dbpm) if cfg.dbpm else None,
        "wall_seconds": time.perf_counter() - started,
    }
    return summary
