"""The reference trainer: contrastive pre-training with any pyclloss loss
(``pyclloss train``, ``python -m pyclloss.train``)."""

from pyclloss.train.cli import main
from pyclloss.train.losses import LOSSES
from pyclloss.train.trainer import TrainConfig, train

__all__ = ["LOSSES", "TrainConfig", "main", "train"]
