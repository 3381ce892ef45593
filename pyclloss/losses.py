"""nn.Module wrappers of the losses in ``pyclloss.functional``, with the state
some of them own (MoCo's queue)."""

from typing import Optional

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from . import distributed
from . import functional as fn

Tensor = torch.Tensor


def _distributed_arguments(gather_distributed: bool, process_group, strategy: str) -> dict:
    """The keyword-only distributed arguments of the functional losses."""
    return {"gather_distributed": gather_distributed, "process_group": process_group,
            "strategy": strategy}


class _Distributable(nn.Module):
    """Keeps the keyword-only distributed arguments of the functional losses
    (``gather_distributed``, ``process_group``, ``strategy``; off by default)."""

    def __init__(self, reduction: str, backend: str, gather_distributed: bool,
                 process_group, strategy: str):
        super().__init__()
        self.reduction, self.backend = reduction, backend
        self.distributed = _distributed_arguments(gather_distributed, process_group, strategy)


class NTXentLoss(_Distributable):
    """SimCLR's NT-Xent; ``forward(z1, z2)``. See :func:`pyclloss.nt_xent`."""

    def __init__(self, temperature: float = 0.5, reduction: str = "mean", backend: str = "auto", *,
                 gather_distributed: bool = False, process_group=None,
                 strategy: str = "all_gather"):
        super().__init__(reduction, backend, gather_distributed, process_group, strategy)
        self.temperature = temperature

    def forward(self, z1: Tensor, z2: Tensor, weights: Optional[Tensor] = None) -> Tensor:
        if isinstance(z2, Tensor) and z2.dim() == 1 and not z2.is_floating_point():
            raise TypeError("NTXentLoss takes two views (z1, z2), got labels as z2; for "
                            "pytorch-metric-learning's (embeddings, labels) use PairNTXentLoss "
                            "or pyclloss.compat.pml.NTXentLoss")
        return fn.nt_xent(z1, z2, self.temperature, weights=weights, reduction=self.reduction,
                          backend=self.backend, **self.distributed)


class PairNTXentLoss(_Distributable):
    """pytorch-metric-learning's NTXentLoss with labels; ``forward(embeddings, labels)``.
    See :func:`pyclloss.pair_nt_xent`."""

    def __init__(self, temperature: float = 0.07, reduction: str = "mean", backend: str = "auto", *,
                 gather_distributed: bool = False, process_group=None,
                 strategy: str = "all_gather"):
        super().__init__(reduction, backend, gather_distributed, process_group, strategy)
        self.temperature = temperature

    def forward(self, embeddings: Tensor, labels: Tensor) -> Tensor:
        return fn.pair_nt_xent(embeddings, labels, self.temperature, reduction=self.reduction,
                               backend=self.backend, **self.distributed)


class SupConLoss(_Distributable):
    """Supervised contrastive loss; ``forward(features, labels=None)``.
    See :func:`pyclloss.supcon`."""

    def __init__(self, temperature: float = 0.1, base_temperature: Optional[float] = None,
                 reduction: str = "mean", backend: str = "auto", *,
                 gather_distributed: bool = False, process_group=None,
                 strategy: str = "all_gather"):
        super().__init__(reduction, backend, gather_distributed, process_group, strategy)
        self.temperature, self.base_temperature = temperature, base_temperature

    def forward(self, features: Tensor, labels: Optional[Tensor] = None,
                weights: Optional[Tensor] = None) -> Tensor:
        return fn.supcon(features, labels, self.temperature, self.base_temperature,
                         weights=weights, reduction=self.reduction, backend=self.backend,
                         **self.distributed)


class InfoNCELoss(_Distributable):
    """One-direction InfoNCE; ``forward(query, key, targets=None, queue=None, weights=None)``.
    ``in_batch_negatives``: whether the other keys are negatives (default; else
    the queue only, MoCo). See :func:`pyclloss.info_nce`."""

    def __init__(self, temperature: float = 0.07, normalize: bool = True,
                 reduction: str = "mean", backend: str = "auto", *,
                 in_batch_negatives: bool = True, gather_distributed: bool = False,
                 process_group=None, strategy: str = "all_gather"):
        super().__init__(reduction, backend, gather_distributed, process_group, strategy)
        self.temperature, self.normalize = temperature, normalize
        self.in_batch_negatives = in_batch_negatives

    def forward(self, query: Tensor, key: Tensor, targets: Optional[Tensor] = None,
                queue: Optional[Tensor] = None, weights: Optional[Tensor] = None) -> Tensor:
        return fn.info_nce(query, key, self.temperature, targets, queue, weights, self.normalize,
                           in_batch_negatives=self.in_batch_negatives, reduction=self.reduction,
                           backend=self.backend, **self.distributed)


class ClipLoss(_Distributable):
    """open_clip's ``ClipLoss``; ``forward(image_features, text_features,
    logit_scale)``. See :func:`pyclloss.clip_loss`."""

    def __init__(self, reduction: str = "mean", backend: str = "auto", *,
                 gather_distributed: bool = False, process_group=None,
                 strategy: str = "all_gather"):
        super().__init__(reduction, backend, gather_distributed, process_group, strategy)

    def forward(self, image_features: Tensor, text_features: Tensor, logit_scale) -> Tensor:
        return fn.clip_loss(image_features, text_features, logit_scale, reduction=self.reduction,
                            backend=self.backend, **self.distributed)


class SigLipLoss(_Distributable):
    """open_clip's ``SigLipLoss``; ``forward(image_features, text_features,
    logit_scale, logit_bias)``. See :func:`pyclloss.siglip_loss`."""

    def __init__(self, reduction: str = "mean", backend: str = "auto", *,
                 gather_distributed: bool = False, process_group=None,
                 strategy: str = "all_gather"):
        super().__init__(reduction, backend, gather_distributed, process_group, strategy)

    def forward(self, image_features: Tensor, text_features: Tensor, logit_scale,
                logit_bias) -> Tensor:
        return fn.siglip_loss(image_features, text_features, logit_scale, logit_bias,
                              reduction=self.reduction, backend=self.backend,
                              **self.distributed)


class MoCoLoss(nn.Module):
    """MoCo's InfoNCE with a FIFO queue of negatives (He et al., CVPR 2020).

    ``forward(query, key)`` is MoCo's ``CE([q·k₊, q·queueᵀ] / τ, 0)``: each
    query against its own key and the queue, the other keys of the batch are
    not negatives (:func:`pyclloss.info_nce` with ``in_batch_negatives=False``;
    lightly's ``NTXentLoss`` with a memory bank). It then enqueues the
    normalised, detached keys, overwriting the oldest entries. The queue
    starts, as in MoCo, filled with random unit vectors.

    Args:
        dim: embedding size D. queue_size: number of queued negatives.
        temperature: τ (MoCo v2: 0.2).
        gather_distributed, process_group: run over a torch.distributed group
            (default group: the world) as one big batch: the loss is the mean
            over every rank's queries, and every rank enqueues every rank's keys
            (rank-major, MoCo's concat_all_gather), so all ranks hold the same
            queue; the first such call gives every rank the queue of the
            group's first rank. Without an initialised process group: one
            process. Keys never travel for the loss itself, so there is no
            ``strategy``. Gradients follow docs/distributed.md.
    """

    def __init__(self, dim: int, queue_size: int = 65536, temperature: float = 0.2,
                 backend: str = "auto", *, gather_distributed: bool = False,
                 process_group=None):
        super().__init__()
        if not isinstance(dim, int) or dim < 1:
            raise ValueError(f"dim must be a positive int, got {dim!r}")
        if not isinstance(queue_size, int) or queue_size < 1:
            raise ValueError(f"queue_size must be a positive int, got {queue_size!r}")
        self.temperature, self.backend = temperature, backend
        self.gather_distributed, self.process_group = gather_distributed, process_group
        self.register_buffer("queue", F.normalize(torch.randn(queue_size, dim), dim=1))
        self.register_buffer("queue_ptr", torch.zeros((), dtype=torch.long))
        self._queue_shared = False

    def forward(self, query: Tensor, key: Tensor) -> Tensor:
        exchange, layout = self._join(key)
        per_query = fn.info_nce(query, key, self.temperature, queue=self.queue,
                                in_batch_negatives=False, reduction="none", backend=self.backend)
        return self._mean_and_enqueue(per_query, key, exchange, layout)

    def _join(self, key: Tensor):
        """(Exchange, Layout of the keys) of a distributed call, else (None, None).
        Checks that the ranks agree, then gives them the first rank's queue once."""
        exchange = distributed.exchange(self.gather_distributed, self.process_group, "all_gather")
        if exchange is None:
            return None, None
        layout = exchange.layout(key.shape[0], key, "mean", temperature=self.temperature,
                                 queue_size=self.queue.shape[0])
        if not self._queue_shared:
            first = dist.get_global_rank(exchange.group, 0)
            dist.broadcast(self.queue, first, group=exchange.group)
            dist.broadcast(self.queue_ptr, first, group=exchange.group)
            self._queue_shared = True
        return exchange, layout

    def _mean_and_enqueue(self, per_query: Tensor, key: Tensor, exchange, layout) -> Tensor:
        """The mean loss over the batch, every rank's when distributed; the keys
        (every rank's) enqueued."""
        if exchange is None:
            loss = per_query.mean()
        else:
            loss = exchange.reduce(per_query, None, None, "mean")
            key = exchange.all_rows(key, layout)
        self._enqueue(key)
        return loss

    @torch.no_grad()
    def _enqueue(self, key: Tensor) -> None:
        size = self.queue.shape[0]
        keys = F.normalize(key.detach().to(self.queue.dtype), dim=1)[-size:]
        start = int(self.queue_ptr)
        rows = (start + torch.arange(keys.shape[0], device=keys.device)) % size
        self.queue[rows] = keys
        self.queue_ptr.fill_((start + keys.shape[0]) % size)


class FTMoCoLoss(MoCoLoss):
    """MoCo with feature transformation (Zhu et al., ICCV 2021): positive
    extrapolation and negative interpolation; ``forward(query, key)``.

    Each call samples, as the authors' training script does, one
    ``λ_p = 1 + Beta(pos_alpha, pos_alpha)``, one ``λ_n ~ Beta(neg_alpha,
    neg_alpha)`` and a permutation π of the queue (:meth:`sample_mix`, from
    torch's random generator), computes :func:`pyclloss.ft_moco_loss` against
    the queue, then enqueues the untransformed keys.

    Args:
        dim, queue_size: as :class:`MoCoLoss`. temperature: τ (0.2).
        pos_alpha, neg_alpha: the Beta parameters (2.0 and 1.6 in the paper).
        normalize_mixed: normalise q̂ and k̂ after mixing (off in the paper).
        gather_distributed, process_group: as :class:`MoCoLoss` (the mean over
            every rank's queries, one queue on every rank). Each rank draws its
            own mix from its own generator, as the authors' script does.
    """

    def __init__(self, dim: int, queue_size: int = 65536, temperature: float = 0.2,
                 pos_alpha: float = 2.0, neg_alpha: float = 1.6, normalize_mixed: bool = False,
                 backend: str = "auto", *, gather_distributed: bool = False,
                 process_group=None):
        super().__init__(dim, queue_size, temperature, backend,
                         gather_distributed=gather_distributed, process_group=process_group)
        for name, alpha in (("pos_alpha", pos_alpha), ("neg_alpha", neg_alpha)):
            if not isinstance(alpha, (int, float)) or not alpha > 0:
                raise ValueError(f"{name} must be a number > 0, got {alpha!r}")
        self.pos_alpha, self.neg_alpha = float(pos_alpha), float(neg_alpha)
        self.normalize_mixed = normalize_mixed

    def sample_mix(self):
        """(λ_p, λ_n, π) for one step: two 0-dim float32 tensors and a (K,) permutation."""
        device = self.queue.device
        lam_pos = (1 + self._symmetric_beta(self.pos_alpha)).to(device)
        lam_neg = self._symmetric_beta(self.neg_alpha).to(device)
        return lam_pos, lam_neg, torch.randperm(self.queue.shape[0], device=device)

    @staticmethod
    def _symmetric_beta(alpha: float) -> Tensor:
        concentration = torch.tensor(alpha)
        return torch.distributions.Beta(concentration, concentration).sample()

    def forward(self, query: Tensor, key: Tensor) -> Tensor:
        exchange, layout = self._join(key)
        lam_pos, lam_neg, perm = self.sample_mix()
        per_query = fn.ft_moco_loss(query, key, self.queue, lam_pos, lam_neg, perm,
                                    self.temperature, normalize_mixed=self.normalize_mixed,
                                    reduction="none", backend=self.backend)
        return self._mean_and_enqueue(per_query, key, exchange, layout)


class HydraLoss(nn.Module):
    """Hydra / SimLAP (Wu et al., "Rethinking Positive Pairs in Contrastive
    Learning", 2024): InfoNCE plus the gated-subspace loss of arbitrary class pairs.

    Owns the class embeddings E and the gate MLP of the authors' code
    (ReLU → BatchNorm → Linear → ReLU → BatchNorm → Linear, then sigmoid).
    ``forward(q, k, labels)`` draws a partner class per anchor
    (``labels[randperm(B)]``, or ``partner_labels`` when given), computes
    ``g_b = σ(MLP((E[y_b] + E[partner_b]) / 2))`` and returns
    ``(info_nce(q, k) + β·gated_info_nce(q, k, g, ...)) / (1 + β)``; q_b and k_b
    are two views of sample b. See :func:`pyclloss.gated_info_nce`.

    Args:
        num_classes: size of the class-embedding table. dim: K, the embedding size.
        temperature: τ of both terms. beta: β, the weight of the gated term.
        embed_dim, mlp_dim: class-embedding and hidden sizes of the gate MLP.
        gather_distributed, process_group, strategy: both terms over a process
            group (pyclloss.distributed), with either strategy.
    """

    def __init__(self, num_classes: int, dim: int, temperature: float = 0.2, beta: float = 1.0,
                 embed_dim: int = 512, mlp_dim: int = 1024, backend: str = "auto", *,
                 gather_distributed: bool = False, process_group=None,
                 strategy: str = "all_gather"):
        super().__init__()
        self.distributed = _distributed_arguments(gather_distributed, process_group, strategy)
        for name, value in (("num_classes", num_classes), ("dim", dim), ("embed_dim", embed_dim),
                            ("mlp_dim", mlp_dim)):
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if not beta >= 0:
            raise ValueError(f"beta must be >= 0, got {beta!r}")
        self.temperature, self.beta, self.backend = temperature, beta, backend
        self.class_embedding = nn.Embedding(num_classes, embed_dim)
        self.gate_mlp = nn.Sequential(
            nn.ReLU(), nn.BatchNorm1d(embed_dim), nn.Linear(embed_dim, mlp_dim),
            nn.ReLU(), nn.BatchNorm1d(mlp_dim), nn.Linear(mlp_dim, dim))

    def _class_indices(self, name: str, y, q: Tensor) -> Tensor:
        """``y`` checked as indices into the class-embedding table, by name."""
        y = fn._checks.labels(name, y, q.shape[0], q.device)
        classes = self.class_embedding.num_embeddings
        fn._checks.require((y >= 0) & (y < classes),
                           f"{name} must be class indices in [0, num_classes = {classes})")
        return y

    def gates(self, labels: Tensor, partner_labels: Tensor) -> Tensor:
        """g = σ(MLP((E[labels] + E[partner_labels]) / 2)), (B, dim)."""
        pair = (self.class_embedding(labels) + self.class_embedding(partner_labels)) / 2
        return torch.sigmoid(self.gate_mlp(pair))

    def forward(self, q: Tensor, k: Tensor, labels: Tensor, key_labels: Optional[Tensor] = None,
                partner_labels: Optional[Tensor] = None) -> Tensor:
        contrast = fn.info_nce(q, k, self.temperature, backend=self.backend, **self.distributed)
        if self.beta == 0:
            return contrast
        labels = self._class_indices("labels", labels, q)
        if partner_labels is None:
            partner_labels = labels[torch.randperm(labels.shape[0], device=labels.device)]
        partner_labels = self._class_indices("partner_labels", partner_labels, q)
        gated = fn.gated_info_nce(q, k, self.gates(labels, partner_labels), labels,
                                  partner_labels, key_labels, self.temperature,
                                  backend=self.backend, **self.distributed)
        return (contrast + self.beta * gated) / (1 + self.beta)


class SupReMixLoss(nn.Module):
    """SupReMix; ``forward(z, t)`` draws the mix-neg λ's (n×n) from
    Beta(``beta``) with torch's generator, then calls
    :func:`pyclloss.supremix_loss`."""

    def __init__(self, temperature: float = 0.5, base_temperature: float = 0.5, gap: float = 5.0,
                 beta: tuple = (2.0, 8.0), reduction: str = "mean", backend: str = "auto"):
        super().__init__()
        if (not isinstance(beta, (tuple, list)) or len(beta) != 2
                or not all(isinstance(c, (int, float)) and c > 0 for c in beta)):
            raise ValueError(f"beta must be two numbers > 0 (the Beta distribution's "
                             f"concentrations), got {beta!r}")
        self.temperature, self.base_temperature, self.gap = temperature, base_temperature, gap
        self.beta, self.reduction, self.backend = tuple(beta), reduction, backend

    def forward(self, z: Tensor, t: Tensor) -> Tensor:
        fn._checks.features("z", z, min_rows=2)
        a, b = (torch.tensor(float(c), device=z.device) for c in self.beta)
        lam = torch.distributions.Beta(a, b).sample((z.shape[0], z.shape[0]))
        return fn.supremix_loss(z, t, lam, self.temperature, self.base_temperature, self.gap,
                                reduction=self.reduction, backend=self.backend)


class RnCLoss(nn.Module):
    """Rank-N-Contrast; ``forward(features, labels)`` with features (n, D) or
    (B, V, D). See :func:`pyclloss.rnc_loss`."""

    def __init__(self, temperature: float = 2.0, reduction: str = "mean", backend: str = "auto"):
        super().__init__()
        self.temperature, self.reduction, self.backend = temperature, reduction, backend

    def forward(self, features: Tensor, labels: Tensor) -> Tensor:
        return fn.rnc_loss(features, labels, self.temperature, reduction=self.reduction,
                           backend=self.backend)
