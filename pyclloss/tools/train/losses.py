"""The trainer's losses: ``--loss`` name -> a module ``forward(z1, z2, labels)``.

Adding a loss is one ``LOSSES`` entry: a factory taking (embedding dim, number
of classes in the labels, config) and returning such a module.
"""

import functools
import math
from dataclasses import dataclass
from typing import Any, Callable, Dict

import torch
import torch.nn.functional as F
from torch import nn

import pyclloss
from pyclloss.pair_quality import DBPM


def _loss_library():
    """The module with nt_xent, supcon, info_nce and clip_loss."""
    return pyclloss


def loss_function(name: str, backend: str) -> Callable:
    """``name`` from the loss library, bound to ``backend``."""
    return functools.partial(getattr(_loss_library(), name), backend=backend)


class PairLoss(nn.Module):
    """A loss of two views' embeddings (and labels, for the supervised ones);
    ``reduction="none"`` gives the rows of both views, view-major (2B,)."""

    def __init__(self, function: Callable, temperature: float, use_labels: bool,
                 reduction: str = "mean"):
        super().__init__()
        self.function = function
        self.temperature = temperature
        self.use_labels = use_labels
        self.reduction = reduction

    def forward(self, z1, z2, labels):
        if self.use_labels:  # SupCon's multi-view layout (B, V, D)
            return self.function(torch.stack([z1, z2], dim=1), labels, self.temperature,
                                 reduction=self.reduction)
        return self.function(z1, z2, self.temperature, reduction=self.reduction)


class DBPMLoss(nn.Module):
    """A :class:`PairLoss` re-weighted per sample by dynamic bad pair mining
    (``pyclloss.pair_quality.DBPM``): a sample's loss is the mean of its two
    views' rows; ``forward`` also takes the batch's data-set indices. Call
    :meth:`end_epoch` after each epoch."""

    def __init__(self, loss: PairLoss, num_samples: int, max_epochs: int, warmup_epochs: int):
        super().__init__()
        loss.reduction = "none"
        self.loss = loss
        self.dbpm = DBPM(num_samples, max_epochs, warmup_epochs)

    def forward(self, z1, z2, labels, indices):
        rows = self.loss(z1, z2, labels)
        return self.dbpm(rows.view(2, -1).mean(0), indices)

    def end_epoch(self) -> None:
        self.dbpm.end_epoch()


class ClipLoss(nn.Module):
    """CLIP's symmetric loss between the two views, with a learnable logit scale
    (stored as its log, initialised to 1/temperature, capped at 100 as in CLIP)."""

    def __init__(self, function: Callable, temperature: float):
        super().__init__()
        self.function = function
        self.log_scale = nn.Parameter(torch.tensor(math.log(1.0 / temperature)))

    def forward(self, z1, z2, labels):
        scale = self.log_scale.exp().clamp(max=100.0)
        return self.function(F.normalize(z1.float(), dim=1), F.normalize(z2.float(), dim=1), scale)


class QueryKeyLoss(nn.Module):
    """A loss module of (query, key), such as pyclloss's ``MoCoLoss`` with its
    key queue, with the trainer's signature."""

    def __init__(self, loss: nn.Module):
        super().__init__()
        self.loss = loss

    def forward(self, query, key, labels):
        return self.loss(query, key)


class LabelledViews(nn.Module):
    """A loss module of (features, labels) over both views: the views stacked
    as (B, 2, D) (``stacked``) or concatenated, with the labels repeated."""

    def __init__(self, loss: nn.Module, stacked: bool):
        super().__init__()
        self.loss, self.stacked = loss, stacked

    def forward(self, z1, z2, labels):
        if self.stacked:
            return self.loss(torch.stack([z1, z2], dim=1), labels)
        return self.loss(torch.cat([z1, z2]), torch.cat([labels, labels]).float())


class GroCoViews(nn.Module):
    """GroCo between two views as its authors train it (Shvetsova et al.,
    "Learning by Sorting", ICCV 2023): each view's embeddings are anchors; an
    anchor's positive is the cosine similarity to its other view, its negatives
    those to the other anchors of its own view, of which the ``num_neg``
    hardest are relaxed-sorted below the positive; positives and negatives are
    detached (the authors' stop-gradient); the mean over the two views. The
    sorting steepness is 1 / temperature."""

    def __init__(self, backend: str, temperature: float, num_neg: int = 10):
        super().__init__()
        self.backend, self.steepness, self.num_neg = backend, 1.0 / temperature, num_neg

    def forward(self, z1, z2, labels):
        from pyclloss.sorting import groco_loss

        views = [F.normalize(z.float(), dim=1) for z in (z1, z2)]
        b = z1.shape[0]
        own = torch.eye(b, dtype=torch.bool, device=z1.device)
        loss = 0.0
        for anchor, other in (views, views[::-1]):
            pos = (anchor * other.detach()).sum(1, keepdim=True)
            neg = (anchor @ anchor.detach().T).masked_fill(own, float("-inf"))
            loss = loss + groco_loss(pos, neg, self.steepness, min(self.num_neg, b - 1),
                                     backend=self.backend)
        return loss / 2


# ---------------------------------------------------------------------- AMCL


class MultiHeadViews(nn.Module):
    """AMCL's multi-head projector and loss: the embedding (B, dim) mapped by a
    linear layer to ``heads`` heads (B, heads, dim), then ``pyclloss.AMCLLoss``
    (which owns the temperature network) on the two views; ``temperature``
    is AMCL's upper bound τ_max."""

    def __init__(self, dim: int, heads: int, temperature: float, backend: str):
        super().__init__()
        self.heads = nn.Linear(dim, heads * dim)
        self.loss = pyclloss.AMCLLoss(dim, heads, tau_max=temperature, backend=backend)

    def forward(self, z1, z2, labels):
        b = z1.shape[0]
        return self.loss(*(self.heads(z.float()).view(b, self.loss.num_heads, -1)
                           for z in (z1, z2)))


@dataclass(frozen=True)
class LossEntry:
    build: Callable[[int, int, Any], nn.Module]  # (embedding dim, classes, TrainConfig) -> loss
    temperature: float  # the default of the loss's paper / code
    needs_labels: bool = False
    momentum_encoder: bool = False  # keys from an EMA copy of the model (MoCo)
    about: str = ""
    per_sample: bool = False  # builds a PairLoss, so --dbpm can wrap it (DBPMLoss)


LOSSES: Dict[str, LossEntry] = {
    "nt_xent": LossEntry(
        lambda dim, classes, cfg: PairLoss(loss_function("nt_xent", cfg.backend),
                                           cfg.temperature, False),
        temperature=0.5, per_sample=True, about="SimCLR's NT-Xent"),
    "supcon": LossEntry(
        lambda dim, classes, cfg: PairLoss(loss_function("supcon", cfg.backend),
                                           cfg.temperature, True),
        temperature=0.1, needs_labels=True, per_sample=True,
        about="supervised contrastive (uses the labels)"),
    "clip": LossEntry(
        lambda dim, classes, cfg: ClipLoss(loss_function("clip_loss", cfg.backend),
                                           cfg.temperature),
        temperature=0.07, about="CLIP's symmetric loss between the views, learnable scale"),
    "moco": LossEntry(
        lambda dim, classes, cfg: QueryKeyLoss(
            pyclloss.MoCoLoss(dim, cfg.queue_size, cfg.temperature, cfg.backend)),
        temperature=0.2, momentum_encoder=True, about="MoCo v2: momentum encoder and key queue"),
    "ft_moco": LossEntry(
        lambda dim, classes, cfg: QueryKeyLoss(
            pyclloss.FTMoCoLoss(dim, cfg.queue_size, cfg.temperature, backend=cfg.backend)),
        temperature=0.2, momentum_encoder=True,
        about="MoCo with feature transformation (positive extrapolation, queue interpolation)"),
    "hydra": LossEntry(
        # HydraLoss.forward(q, k, labels) is already the trainer's signature.
        lambda dim, classes, cfg: pyclloss.HydraLoss(classes, dim, cfg.temperature,
                                                     backend=cfg.backend),
        temperature=0.2, needs_labels=True,
        about="Hydra: InfoNCE plus gated-subspace contrast of random class pairs (uses the "
              "labels)"),
    "supremix": LossEntry(
        lambda dim, classes, cfg: LabelledViews(
            pyclloss.SupReMixLoss(cfg.temperature, cfg.temperature, backend=cfg.backend),
            stacked=False),
        temperature=0.5, needs_labels=True,
        about="SupReMix, contrastive regression with mixed embeddings (the labels as ordinal "
              "targets)"),
    "rnc": LossEntry(
        lambda dim, classes, cfg: LabelledViews(
            pyclloss.RnCLoss(cfg.temperature, backend=cfg.backend), stacked=True),
        temperature=2.0, needs_labels=True,
        about="Rank-N-Contrast, contrastive regression (the labels as ordinal targets)"),
    "groco": LossEntry(
        lambda dim, classes, cfg: GroCoViews(cfg.backend, cfg.temperature),
        temperature=1.0, about="GroCo: relaxed sorting of the positive above the hardest "
                               "negatives (steepness = 1 / temperature)"),
    # ------------------------------------------------ DCL, HCL, decoupled NT-Xent
    "dcl": LossEntry(
        lambda dim, classes, cfg: PairLoss(loss_function("dcl_loss", cfg.backend),
                                           cfg.temperature, False),
        temperature=0.5, per_sample=True,
        about="debiased contrastive loss (Chuang et al.; class prior 0.1)"),
    "hcl": LossEntry(
        lambda dim, classes, cfg: PairLoss(loss_function("hcl_loss", cfg.backend),
                                           cfg.temperature, False),
        temperature=0.5, per_sample=True,
        about="hard-negative contrastive loss (Robinson et al.; class prior 0.1, beta 1)"),
    "decoupled": LossEntry(
        lambda dim, classes, cfg: PairLoss(loss_function("decoupled_nt_xent", cfg.backend),
                                           cfg.temperature, False),
        temperature=0.1, per_sample=True,
        about="decoupled NT-Xent (Yeh et al.): the positive out of the denominator"),
    # CACR: the two views' embeddings, no labels; the temperature multiplies the
    # costs of both softmaxes, as the authors' τ⁺ and τ⁻.
    "cacr": LossEntry(
        lambda dim, classes, cfg: QueryKeyLoss(pyclloss.CACRLoss(
            cfg.temperature, cfg.temperature, backend=cfg.backend)),
        temperature=1.0, about="CACR: contrastive attraction and repulsion (temperature = the "
                               "authors' inverse temperature of both softmaxes)"),
    "amcl": LossEntry(
        lambda dim, classes, cfg: MultiHeadViews(dim, 3, cfg.temperature, cfg.backend),
        temperature=2.0, about="AMCL: 3 projection heads, pair temperatures from a temperature "
                               "network, top-100 hardest negatives (temperature = τ_max)"),
}
