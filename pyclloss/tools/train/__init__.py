"""The reference trainer: contrastive pre-training with any pyclloss loss
(``pyclloss train``, ``python -m pyclloss.tools.train``)."""

from pyclloss.tools.train.cli import main
from pyclloss.tools.train.losses import LOSSES
from pyclloss.tools.train.trainer import TrainConfig, train

__all__ = ["LOSSES", "TrainConfig", "main", "train"]
