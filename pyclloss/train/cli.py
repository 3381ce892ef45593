"""Command line of the reference trainer: ``pyclloss train`` / ``python -m pyclloss.train``."""

import argparse
import json
import sys
from typing import List, Optional

from pyclloss.train.losses import LOSSES
from pyclloss.train.trainer import BACKENDS, PRECISIONS, TrainConfig, train


def build_parser() -> argparse.ArgumentParser:
    defaults = TrainConfig()
    parser = argparse.ArgumentParser(
        prog="pyclloss train",
        description="Contrastive pre-training of a small CNN with a pyclloss loss; kNN and "
                    "linear-probe accuracy of the encoder before and after. Default data: "
                    "scikit-learn's bundled digits (no download).")
    add = parser.add_argument
    add("--loss", default=defaults.loss,
        help="; ".join(f"{name}: {entry.about}" for name, entry in LOSSES.items()))
    add("--precision", default=defaults.precision,
        help=f"{' | '.join(PRECISIONS)}: autocast dtype of the model (fp16 adds a GradScaler)")
    add("--backend", default=defaults.backend, help=" | ".join(BACKENDS))
    add("--batch-size", type=int, default=defaults.batch_size)
    add("--epochs", type=int, default=defaults.epochs)
    add("--lr", type=float, default=defaults.lr, help="AdamW learning rate (constant)")
    add("--weight-decay", type=float, default=defaults.weight_decay)
    add("--temperature", type=float, default=None, help="default: the loss's own")
    add("--embedding-dim", type=int, default=defaults.embedding_dim)
    add("--width", type=int, default=defaults.width, help="channels of the first conv layer")
    add("--queue-size", type=int, default=defaults.queue_size, help="moco's key queue")
    add("--momentum", type=float, default=defaults.momentum, help="moco's key encoder EMA")
    add("--seed", type=int, default=defaults.seed)
    add("--device", default=defaults.device, help="auto | cpu | cuda | cuda:N")
    add("--threads", type=int, default=defaults.threads,
        help="CPU threads of torch (0: torch's default); small models run fastest on one")
    add("--data", default=None,
        help="a .pt file (a tensor of images, (images, labels), or {'images', 'labels'}) or "
             "an image folder root/<class>/<image> (needs Pillow)")
    add("--image-size", type=int, default=defaults.image_size,
        help="side that images of a folder are resized to")
    add("--checkpoint", default=None, help="written (atomically) after every epoch")
    add("--resume", default=None, help="a checkpoint to continue from, up to --epochs")
    add("--summary", default=None, help="also write the JSON summary to this file")
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    parser = build_parser()
    cfg = TrainConfig(**vars(parser.parse_args(argv)))
    try:
        summary = train(cfg)
    except (ValueError, OSError, RuntimeError) as exc:
        parser.exit(2, f"pyclloss train: error: {exc}\n")
    text = json.dumps(summary, indent=2)
    print(text)
    if cfg.summary:
        with open(cfg.summary, "w") as f:
            f.write(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
