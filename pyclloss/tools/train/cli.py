"""Command line of the reference trainer: ``pyclloss train`` / ``python -m pyclloss.train``."""

import argparse
import datetime
import os
import sys
from typing import List, Optional

from pyclloss.tools import _arguments as arguments
from pyclloss.tools.train.losses import LOSSES
from pyclloss.tools.train.report import (RUNS_FOLDER, SUMMARY_FILE, new_run_folder, summary_lines,
                                   write_json)
from pyclloss.tools.train.trainer import BACKENDS, PRECISIONS, TrainConfig, check_config, train

DESCRIPTION = f"""\
Contrastive pre-training of a small CNN with a pyclloss loss; kNN and linear-probe
accuracy of the encoder before and after. Default data: scikit-learn's bundled
digits (no download).

Progress goes to stderr (a tqdm bar on a terminal), a summary of a few lines to
stdout, and the full summary, every epoch's loss included, as JSON to
{RUNS_FOLDER}/<date-time>-<loss>/{SUMMARY_FILE} (or --summary)."""


def build_parser() -> argparse.ArgumentParser:
    defaults = TrainConfig()
    parser = argparse.ArgumentParser(prog="pyclloss train", description=DESCRIPTION,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)

    def add(flag: str, help: str, **kwargs) -> None:
        """An option whose help ends with its default, where it has one."""
        kwargs.setdefault("default", getattr(defaults, flag[2:].replace("-", "_"), None))
        if kwargs["default"] is not None and kwargs["default"] is not False:
            help += " (default: %(default)s)"
        parser.add_argument(flag, help=help, **kwargs)

    add("--loss", "; ".join(f"{name}: {entry.about}" for name, entry in LOSSES.items()),
        choices=list(LOSSES))
    add("--precision", "autocast dtype of the model (fp16 adds a GradScaler)",
        choices=list(PRECISIONS))
    add("--backend", "kernels of the loss (auto: the fastest that runs on the device)",
        choices=BACKENDS)
    add("--batch-size", "images per step (each gives two views)", type=int)
    add("--epochs", "passes over the training images", type=int)
    add("--lr", "AdamW learning rate (constant)", type=float)
    add("--weight-decay", "AdamW weight decay", type=float)
    add("--temperature", "the loss's temperature; default: the loss's own", type=float)
    add("--embedding-dim", "width of the projection head's output", type=int)
    add("--width", "channels of the first conv layer", type=int)
    add("--queue-size", "moco and ft_moco: keys in the queue", type=int)
    add("--momentum", "moco and ft_moco: EMA of the key encoder", type=float)
    add("--seed", "seeds the model, the data order and the augmentations", type=int)
    add("--device", "auto (cuda if available), cpu, cuda or cuda:N", metavar="DEVICE")
    add("--threads", "CPU threads of torch (0: torch's default); small models run fastest on "
                     "one", type=int)
    add("--data", "a .pt file (a tensor of images, (images, labels), or {'images', 'labels'}) "
                  "or an image folder root/<class>/<image> (needs Pillow); default: "
                  "scikit-learn's digits", metavar="PATH")
    add("--image-size", "side that images of a folder are resized to", type=int)
    add("--dbpm", "re-weight each sample's loss by dynamic bad pair mining (DBPM: the noisy "
                  "and faulty pairs, found from each sample's loss over the epochs, are "
                  "down-weighted)", action="store_true", default=False)
    add("--dbpm-warmup", "--dbpm: epochs before DBPM flags samples", type=int)
    add("--checkpoint", "written (atomically) after every epoch; default: none", metavar="PATH")
    add("--resume", "a checkpoint to continue from, up to --epochs; default: a fresh start",
        metavar="PATH")
    add("--summary", f"the JSON summary's file; default: {RUNS_FOLDER}/<date-time>-<loss>/"
                     f"{SUMMARY_FILE}", metavar="PATH")
    add("--quiet", "print nothing but errors (the JSON summary is still written)",
        action="store_true", default=False)
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    parser = build_parser()
    options = vars(parser.parse_args(argv))
    quiet = options.pop("quiet")
    cfg = TrainConfig(**options)
    started = datetime.datetime.now()
    try:
        check_config(cfg)
        if cfg.summary is None:  # the run folder itself is made once the run succeeded
            arguments.writable_folder("--summary's default folder", RUNS_FOLDER)
        summary = train(cfg, progress=not quiet)
        path = cfg.summary or os.path.join(new_run_folder(RUNS_FOLDER, cfg.loss, started),
                                           SUMMARY_FILE)
        write_json(path, summary)
    except (ValueError, OSError, RuntimeError) as exc:
        parser.exit(2, f"pyclloss train: error: {exc}\n")
    if not quiet:
        print("\n".join(summary_lines(summary, path)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
