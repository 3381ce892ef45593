"""The gated-subspace loss of Hydra / SimLAP (Wu et al., "Rethinking Positive
Pairs in Contrastive Learning", 2024) as a function, and ``HydraLoss``, which
adds it to InfoNCE with the class embeddings and gate MLP of the authors' code.
The fused kernels never build the B×N×K tensor of gated keys
(docs/gated_info_nce.md)."""

from typing import Optional

import torch
from torch import nn

from . import _checks, distributed
from ._stats import stats_dtype
from .backends import resolve
from .info_nce import info_nce
from .ops import gated_info_nce as ops
from .reference import gated_info_nce as reference

Tensor = torch.Tensor


def gated_info_nce(q: Tensor, k: Tensor, gates: Tensor, labels: Tensor, partner_labels: Tensor,
                   key_labels: Optional[Tensor] = None, temperature=0.2, *,
                   reduction: str = "mean", backend: str = "auto",
                   gather_distributed: bool = False, process_group=None,
                   strategy: str = "all_gather") -> Tensor:
    """The gated-subspace loss of Hydra / SimLAP (Wu et al., "Rethinking Positive
    Pairs in Contrastive Learning", 2024), pairwise multi-positive form.

    Anchor b compares with key n in the subspace its gate g_b selects:
    ``l_bn = <q_b⊙g_b, k_n⊙g_b> / (‖q_b⊙g_b‖·‖k_n⊙g_b‖) / τ``. Its positives are
    the keys of its partner class (``key_labels[n] == partner_labels[b]``); its
    own class and the partner class are left out of the negatives:
    ``L = Σ_{b, n∈P_b} softplus(NEG_b − l_bn) / |P|``,
    ``NEG_b = LSE_{n: key_labels[n] ∉ {labels[b], partner_labels[b]}} l_bn``.
    The B×N×K tensor of gated keys is never built (see docs/gated_info_nce.md).

    Gated norms are clamped below at 1e-12 as ``F.normalize`` does, in every
    backend. An anchor without positives adds 0; an anchor without negatives
    has ``NEG_b = −inf`` and its positive terms are 0 (as in the authors'
    code); a batch without positive pairs gives 0, never NaN.

    Args:
        q: (B, K) anchors; k: (N, K) keys (not normalised inside: the loss is
            invariant to the scale of each row).
        gates: (B, K) per-anchor gates in (0, 1), cast to q's dtype; gets a gradient.
        labels: (B,) the anchors' classes; partner_labels: (B,) their partner
            classes; key_labels: (N,) the keys' classes (default ``labels``, N = B).
        temperature: τ > 0, a float or a 0-dim tensor (gets a gradient).
        reduction: "mean" over positive pairs, "sum", or "none" (B,): each
            anchor's sum over its positives.
        gather_distributed, process_group, strategy: one big batch over a
            torch.distributed group, as the InfoNCE losses (docs/distributed.md):
            the local anchors (with their gates) meet every rank's keys and key
            labels. With ``"ring"`` the keys and key labels rotate; the gates
            stay with their anchors.
    """
    _checks.features("q", q)
    _checks.features("k", k)
    _checks.same_kind("k", k, "q", q)
    _checks.float_tensor("gates", gates, tuple(q.shape), q.device)
    _checks.finite("gates", gates)
    b, n, device = q.shape[0], k.shape[0], q.device
    labels = _checks.labels("labels", labels, b, device)
    partner_labels = _checks.labels("partner_labels", partner_labels, b, device)
    if key_labels is None:
        if n != b:
            raise ValueError(f"key_labels is required when k has {n} rows and q has {b}")
        key_labels = labels
    key_labels = _checks.labels("key_labels", key_labels, n, device)
    reduction = _checks.reduction(reduction)
    tau = _checks.temperature("temperature", temperature, device, stats_dtype(q.dtype))
    exchange = distributed.exchange(gather_distributed, process_group, strategy)
    gates = gates.to(q.dtype)
    backend = resolve(backend, device, implemented=ops.KERNELS.backends)
    if backend == "reference" and exchange is None:
        return reference.gated_info_nce(q, k, gates, labels, partner_labels, key_labels,
                                        tau, reduction=reduction)
    q, k, gates = q.contiguous(), k.contiguous(), gates.contiguous()
    if exchange is not None:
        layout = exchange.layout(n, k, reduction, temperature=tau)
        tau = exchange.replicated(tau)
    if exchange is not None and exchange.ring is not None:
        pos_count, loss_sum = ops.ring_pair_stats(exchange, q, gates, labels, partner_labels,
                                                  k, key_labels, layout, 1 / tau, backend)
    else:
        if exchange is not None:
            k, key_labels = exchange.gather(k, key_labels, layout)
        loss_sum, _, pos_count, _ = ops.gated_pair_loss(q, k, gates, 1 / tau, labels,
                                                        partner_labels, key_labels, backend)
    if reduction == "none":
        return loss_sum
    total = loss_sum.sum()
    if reduction == "sum":
        return distributed.over_ranks(exchange, total)
    pairs = distributed.over_ranks(exchange, pos_count.sum().to(total.dtype)).clamp_min(1)
    return distributed.over_ranks(exchange, total / pairs)


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
        self.distributed = distributed.loss_arguments(gather_distributed, process_group, strategy)
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
        y = _checks.labels(name, y, q.shape[0], q.device)
        classes = self.class_embedding.num_embeddings
        _checks.require((y >= 0) & (y < classes),
                        f"{name} must be class indices in [0, num_classes = {classes})")
        return y

    def gates(self, labels: Tensor, partner_labels: Tensor) -> Tensor:
        """g = σ(MLP((E[labels] + E[partner_labels]) / 2)), (B, dim)."""
        pair = (self.class_embedding(labels) + self.class_embedding(partner_labels)) / 2
        return torch.sigmoid(self.gate_mlp(pair))

    def forward(self, q: Tensor, k: Tensor, labels: Tensor, key_labels: Optional[Tensor] = None,
                partner_labels: Optional[Tensor] = None) -> Tensor:
        contrast = info_nce(q, k, self.temperature, backend=self.backend, **self.distributed)
        if self.beta == 0:
            return contrast
        labels = self._class_indices("labels", labels, q)
        if partner_labels is None:
            partner_labels = labels[torch.randperm(labels.shape[0], device=labels.device)]
        partner_labels = self._class_indices("partner_labels", partner_labels, q)
        gated = gated_info_nce(q, k, self.gates(labels, partner_labels), labels,
                               partner_labels, key_labels, self.temperature,
                               backend=self.backend, **self.distributed)
        return (contrast + self.beta * gated) / (1 + self.beta)
