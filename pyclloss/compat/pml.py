"""pytorch-metric-learning's ``NTXentLoss`` and ``SupConLoss``, same arguments
and semantics::

    from pytorch_metric_learning.losses import NTXentLoss, SupConLoss  # before
    from pyclloss.compat.pml import NTXentLoss, SupConLoss              # after

``forward(embeddings, labels=None, indices_tuple=None, ref_emb=None,
ref_labels=None)``, as pml's losses:

* ``embeddings`` with ``labels`` (every pair the labels define) run on the
  fused kernels (:func:`pyclloss.pair_nt_xent`, :func:`pyclloss.supcon`),
  with O(N·D) memory instead of pml's N×N matrices;
* ``indices_tuple`` (a miner's pairs ``(a1, p, a2, n)`` or triplets
  ``(a, p, n)``) or ``ref_emb``/``ref_labels`` (the keys are another set)
  pick arbitrary pairs: those calls compute pml's formula on the N×M
  similarity matrix in plain PyTorch, as pml does.

Constructor arguments besides ``temperature`` (keyword only, as in pml):
``reducer`` None (pml's default: ``MeanReducer`` for NT-Xent,
``AvgNonZeroReducer`` for SupCon) or one of pml's ``MeanReducer``,
``SumReducer``, ``AvgNonZeroReducer``, ``ThresholdReducer``; ``distance`` None
or pml's ``CosineSimilarity()`` (the default); ``collect_stats`` is accepted
and records nothing. Any other reducer or distance, and an
``embedding_regularizer``, raise ``NotImplementedError``. ``backend`` is
pyclloss's.
"""

from typing import NamedTuple, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..info_nce import pair_nt_xent, supcon

Tensor = torch.Tensor


class Reducer(NamedTuple):
    """A pml reducer as pyclloss applies it: ``kind`` "mean", "sum" or
    "threshold" (the mean of the losses in (low, high); none left gives 0)."""
    kind: str
    low: Optional[float] = None
    high: Optional[float] = None

    @classmethod
    def of(cls, reducer, default: "Reducer") -> "Reducer":
        if reducer is None:
            return default
        cls_name = type(reducer).__name__
        if not type(reducer).__module__.startswith("pytorch_metric_learning"):
            cls_name = None
        if cls_name == "MeanReducer":
            return cls("mean")
        if cls_name == "SumReducer":
            return cls("sum")
        if cls_name in ("AvgNonZeroReducer", "ThresholdReducer"):
            return cls("threshold", reducer.low, reducer.high)
        raise NotImplementedError(
            f"reducer {type(reducer).__name__}: pyclloss.compat.pml supports pml's MeanReducer, "
            "SumReducer, AvgNonZeroReducer and ThresholdReducer")

    def __call__(self, losses: Tensor, embeddings: Tensor) -> Tensor:
        if self.kind == "mean":
            return losses.mean()
        if self.kind == "sum":
            return losses.sum()
        if self.low is not None:
            losses = losses[losses > self.low]
        if self.high is not None:
            losses = losses[losses < self.high]
        return losses.mean() if losses.numel() else _zero(embeddings)


def _zero(embeddings: Tensor) -> Tensor:
    """pml's zero loss: 0, in the graph of the embeddings."""
    return (embeddings * 0).sum()


def _check_distance(distance) -> None:
    if distance is None:
        return
    if (type(distance).__name__ == "CosineSimilarity"
            and type(distance).__module__.startswith("pytorch_metric_learning")
            and distance.p == 2 and distance.power == 1):
        return
    raise NotImplementedError(f"distance {distance!r}: pyclloss.compat.pml computes cosine "
                              "similarity only (pml's CosineSimilarity(), the default)")


def _pairs(embeddings: Tensor, labels: Optional[Tensor], indices_tuple: Optional[Sequence[Tensor]],
           ref_emb: Optional[Tensor], ref_labels: Optional[Tensor]):
    """(cosine similarities N×M, (a1, p, a2, n)) as pml forms them: the pairs
    of the labels, or the given pairs, or the triplets' pairs. Against the
    embeddings themselves, or with ``ref_emb`` but no ``ref_labels``, an
    anchor is not its own positive."""
    if ref_emb is None:
        ref_emb, ref_labels = embeddings, None
    sim = F.normalize(embeddings, dim=1) @ F.normalize(ref_emb, dim=1).T
    if indices_tuple is None:
        exclude_self = ref_labels is None
        ref_labels = labels if exclude_self else ref_labels.to(labels.device)
        matches = labels[:, None] == ref_labels[None, :]
        differs = ~matches
        if exclude_self:
            matches.fill_diagonal_(False)
        return sim, torch.where(matches) + torch.where(differs)
    if len(indices_tuple) == 4:
        return sim, tuple(indices_tuple)
    if len(indices_tuple) == 3:
        anchors, positives, negatives = indices_tuple
        return sim, (anchors, positives, anchors, negatives)
    raise ValueError(f"indices_tuple must hold 3 tensors (anchors, positives, negatives) or 4 "
                     f"(a1, p, a2, n), got {len(indices_tuple)}")


def _check_inputs(embeddings: Tensor, labels: Optional[Tensor], indices_tuple) -> None:
    if labels is None and indices_tuple is None:
        raise ValueError("labels and indices_tuple cannot both be None")
    if labels is not None and (labels.dim() != 1 or labels.shape[0] != embeddings.shape[0]):
        raise ValueError(f"labels must have shape ({embeddings.shape[0]},) to match embeddings, "
                         f"got {tuple(labels.shape)}")


class _PMLLoss(nn.Module):
    """What pml's two losses share: arguments, checks, and the choice between
    the fused kernels (labels only) and pml's formula on given pairs."""

    default_reducer: Reducer

    def __init__(self, temperature: float, *, reducer=None, distance=None,
                 embedding_regularizer=None, embedding_reg_weight: float = 1,
                 collect_stats: Optional[bool] = None, backend: str = "auto"):
        super().__init__()
        if embedding_regularizer is not None:
            raise NotImplementedError("embedding_regularizer: pyclloss.compat.pml has no "
                                      "embedding regularisation; add it to the loss yourself")
        _check_distance(distance)
        self.temperature, self.reducer = temperature, Reducer.of(reducer, self.default_reducer)
        self.collect_stats, self.backend = collect_stats, backend

    def forward(self, embeddings: Tensor, labels: Optional[Tensor] = None,
                indices_tuple: Optional[Sequence[Tensor]] = None,
                ref_emb: Optional[Tensor] = None, ref_labels: Optional[Tensor] = None) -> Tensor:
        _check_inputs(embeddings, labels, indices_tuple)
        if labels is not None:
            labels = labels.to(embeddings.device)
        if indices_tuple is None and ref_emb is None and embeddings.shape[0] >= 2:
            fused = self._fused(embeddings, labels)
            if fused is not None:
                return fused
        sim, pairs = _pairs(embeddings, labels, indices_tuple, ref_emb, ref_labels)
        if all(len(x) <= 1 for x in pairs):
            return _zero(embeddings)
        return self._on_pairs(sim / self.temperature, pairs, embeddings)


class NTXentLoss(_PMLLoss):
    """pml's ``NTXentLoss(temperature=0.07, **kwargs)``: each positive pair
    (a, p) is a term ``−log(e^{l_ap} / (e^{l_ap} + Σ_n e^{l_an}))`` over the
    anchor's negatives n, l = cosine / τ; reduced over the positive pairs."""

    default_reducer = Reducer("mean")

    def __init__(self, temperature: float = 0.07, **kwargs):
        super().__init__(temperature, **kwargs)

    def _fused(self, embeddings: Tensor, labels: Tensor) -> Optional[Tensor]:
        if self.reducer.kind == "threshold":
            return None  # needs every pair's loss
        return pair_nt_xent(embeddings, labels, self.temperature, reduction=self.reducer.kind,
                            backend=self.backend)

    def _on_pairs(self, logits: Tensor, pairs, embeddings: Tensor) -> Tensor:
        a1, p, a2, n = pairs
        if len(a1) == 0 or len(a2) == 0:
            return _zero(embeddings)
        pos, neg = logits[a1, p], logits[a2, n]
        # each positive pair meets the negatives of its own anchor
        own = a1[:, None] == a2[None, :]
        neg = neg.expand(len(a1), -1).masked_fill(~own, torch.finfo(logits.dtype).min)
        losses = torch.logsumexp(torch.cat([pos[:, None], neg], dim=1), dim=1) - pos
        return self.reducer(losses, embeddings)


class SupConLoss(_PMLLoss):
    """pml's ``SupConLoss(temperature=0.1, **kwargs)``: each anchor i's
    ``−mean_{p∈P(i)} [l_ip − LSE_{j∈P(i)∪N(i)} l_ij]`` (0 without a positive),
    l = cosine / τ; reduced over the anchors. A batch without any positive or
    any negative pair gives 0."""

    default_reducer = Reducer("threshold", low=0)

    def __init__(self, temperature: float = 0.1, **kwargs):
        super().__init__(temperature, **kwargs)

    def _fused(self, embeddings: Tensor, labels: Tensor) -> Optional[Tensor]:
        counts = torch.unique(labels, return_counts=True)[1]
        if counts.numel() < 2 or int(counts.max()) < 2:  # no negative or no positive pair
            return _zero(embeddings)
        losses = supcon(embeddings, labels, self.temperature, reduction="none",
                        backend=self.backend)
        return self.reducer(losses, embeddings)

    def _on_pairs(self, logits: Tensor, pairs, embeddings: Tensor) -> Tensor:
        a1, p, a2, n = pairs
        positive = torch.zeros_like(logits, dtype=torch.bool)
        negative = torch.zeros_like(positive)
        positive[a1, p], negative[a2, n] = True, True
        if (positive & negative).any():
            raise ValueError("indices_tuple makes a pair both positive and negative")
        if not positive.any() or not negative.any():
            return _zero(embeddings)
        contrast = positive | negative
        # a finite fill: rows without any pair keep finite statistics and gradients
        lse = torch.logsumexp(logits.masked_fill(~contrast, torch.finfo(logits.dtype).min),
                              dim=1, keepdim=True)
        log_prob = logits - torch.where(contrast.any(dim=1, keepdim=True), lse,
                                        torch.zeros_like(lse))
        count = positive.sum(dim=1)
        losses = -(positive * log_prob).sum(dim=1) / count.clamp_min(1)
        return self.reducer(losses, embeddings)
