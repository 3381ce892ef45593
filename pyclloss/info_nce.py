"""The InfoNCE family: NT-Xent, pairwise NT-Xent, SupCon, InfoNCE (with a
queue, and MoCo's form), CLIP and SigLIP, as functions and as modules.

Each loss is assembled from the O(N) statistics of the fused core
(``pyclloss.ops.info_nce``); the N×M logit matrix is never built except by
``backend="reference"``, which runs the formulas of ``pyclloss.reference``.
Losses are returned in float32 (float64 for float64 inputs).

Every loss takes ``gather_distributed=True`` (or a ``process_group``) to run
over a torch.distributed group as one big batch, the global batch being the
rank-major concatenation of the local ones, with ``strategy="all_gather"`` or
``"ring"``; see ``pyclloss.distributed`` and docs/distributed.md. The modules
keep these arguments; ``MoCoLoss`` owns its queue of negatives.
"""

from typing import Optional

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from . import _checks, distributed
from ._stats import reduce_anchors, stats_dtype
from .backends import resolve
from .ops import info_nce as core
from .ops.unit_rows import unit_rows
from .reference import info_nce as reference

Tensor = torch.Tensor


def _backend(backend: str, x: Tensor) -> str:
    """The concrete backend of the fused core for features ``x``. On the GPU
    ``auto`` follows the choices measured for x's dtype and D, which is read
    as a plain int there only (no dependence on a traced size elsewhere)."""
    size = int(x.shape[-1]) if x.is_cuda else 0
    return resolve(backend, x.device, core.KERNELS.backends, family=core.KERNELS.name,
                   dtype=x.dtype, size=size)


def nt_xent(z1: Tensor, z2: Tensor, temperature=0.5, *, weights: Optional[Tensor] = None,
            reduction: str = "mean", backend: str = "auto", gather_distributed: bool = False,
            process_group=None, strategy: str = "all_gather") -> Tensor:
    """NT-Xent, the SimCLR loss (Chen et al., ICML 2020); equals lightly's ``NTXentLoss``.

    ``z = normalize(cat(z1, z2))`` (2B×D); row i's positive is its other view;
    its softmax runs over the 2B−1 other rows:
    ``L_i = −l_{i,i±B} + LSE_{j≠i} l_ij``, ``l_ij = <z_i, z_j> / τ``.

    Args:
        z1, z2: (B, D) the two views' embeddings.
        temperature: τ > 0, a float or a 0-dim tensor (gets a gradient).
        weights: optional (B,) per-sample weights, applied to both views.
        reduction: "mean" (over the 2B anchors), "sum", or "none" (2B,).
        gather_distributed, process_group, strategy: the global batch is
            ``cat(z1 of every rank)``, ``cat(z2 of every rank)`` (module docstring).
    """
    _checks.features("z1", z1)
    _checks.features("z2", z2)
    _checks.same_kind("z2", z2, "z1", z1, same_rows=True)
    reduction = _checks.reduction(reduction)
    b, device = z1.shape[0], z1.device
    weights = _checks.weights("weights", weights, b, device, stats_dtype(z1.dtype))
    tau = _checks.temperature("temperature", temperature, device, stats_dtype(z1.dtype))
    exchange = distributed.exchange(gather_distributed, process_group, strategy)
    backend = _backend(backend, z1)
    if backend == "reference" and exchange is None:
        return reference.nt_xent(z1, z2, tau, weights=weights, reduction=reduction)
    weights = torch.cat([weights, weights]) if weights is not None else None  # both views
    z = unit_rows([z1, z2], backend)
    if exchange is not None:
        # rows (z1, z2) of the local samples; a row's positive shares its sample id
        layout = exchange.layout(b, z, reduction, temperature=tau)
        ids = layout.ids(device).repeat(2)
        lse, pos_sum, _ = core.row_stats(exchange, z, ids, z, ids, layout.times(2),
                                         1 / exchange.replicated(tau), True, False, backend)
    else:
        idx = torch.arange(2 * b, device=device)
        partner = torch.cat([idx[b:], idx[:b]])
        lse, pos_sum, _, _ = core.infonce_fwd(z, z, 1 / tau, partner, idx, 0, False, False,
                                              backend)
    return distributed.reduce(exchange, lse - pos_sum, None, weights, reduction)


def pair_nt_xent(embeddings: Tensor, labels: Tensor, temperature=0.07, *,
                 reduction: str = "mean", backend: str = "auto", gather_distributed: bool = False,
                 process_group=None, strategy: str = "all_gather") -> Tensor:
    """Pairwise multi-positive NT-Xent; equals pytorch-metric-learning's
    ``NTXentLoss(temperature)(embeddings, labels)`` for any labels, with one
    difference: pml takes ``log(p + tiny)`` of a pair's probability p, which
    caps a pair's loss at 708.4 in float64 (87.3 in float32: p below 1e-38, a
    positive ~87τ below a negative); ours is ``−log p``.

    Every positive pair (a, p) (same label, a ≠ p) is its own term
    ``softplus(NEG_a − l_ap)`` with ``NEG_a = LSE_{n: y_n ≠ y_a} l_an``, averaged
    over all positive pairs. A batch without positive pairs (a single row
    included) gives 0.

    Args:
        embeddings: (N, D), normalised inside (cosine similarity).
        labels: (N,) integer class labels.
        reduction: "mean" over positive pairs, "sum", or "none" (N,): each
            anchor's sum over its positive pairs.
        gather_distributed, process_group, strategy: see the module docstring;
            positive pairs across ranks count.
    """
    _checks.features("embeddings", embeddings)
    n, device = embeddings.shape[0], embeddings.device
    labels = _checks.labels("labels", labels, n, device)
    reduction = _checks.reduction(reduction)
    tau = _checks.temperature("temperature", temperature, device, stats_dtype(embeddings.dtype))
    exchange = distributed.exchange(gather_distributed, process_group, strategy)
    backend = _backend(backend, embeddings)
    if backend == "reference" and exchange is None:
        return reference.pair_nt_xent(embeddings, labels, tau, reduction=reduction)
    z = unit_rows([embeddings], backend)
    if exchange is not None:
        layout = exchange.layout(n, z, reduction, temperature=tau)
        pos_count, loss_sum = core.pair_stats(exchange, z, labels, layout,
                                              1 / exchange.replicated(tau), backend)
    else:
        scale = 1 / tau
        neg_lse, _, pos_count, _ = core.infonce_fwd(z, z, scale, labels, labels, 0, True, False,
                                                    backend)
        loss_sum, _ = core.infonce_pair_fwd(z, z, scale, labels, labels, 0, neg_lse, backend)
    if reduction == "none":
        return loss_sum
    total = loss_sum.sum()
    if reduction == "mean":
        total = total / distributed.over_ranks(exchange, pos_count.sum().detach()).clamp_min(1)
    return distributed.over_ranks(exchange, total)


def supcon(features: Tensor, labels: Optional[Tensor] = None, temperature=0.1,
           base_temperature=None, *, weights: Optional[Tensor] = None, reduction: str = "mean",
           backend: str = "auto", gather_distributed: bool = False, process_group=None,
           strategy: str = "all_gather") -> Tensor:
    """Supervised contrastive loss (Khosla et al., NeurIPS 2020): SupContrast's
    ``SupConLoss(τ, contrast_mode="all", base_temperature=τ_b)`` of the unit
    rows, and pytorch-metric-learning's ``SupConLoss(τ)`` when τ_b = τ, except
    where those two differ from each other or from us:

    - an anchor without a positive gives 0 and is left out of the mean (as in
      pml; SupContrast counts it as a 0 in its mean);
    - a batch without any negative pair (all labels equal) gives SupContrast's
      loss; pml returns 0;
    - pml's mean also leaves out anchors whose loss is exactly 0 in floating
      point (a positive more than ~37τ in float64, ~16τ in float32, above every
      other similarity of the anchor); ours keeps them.

    Per anchor (``reduction="none"``) the three agree. A single row gives 0.

    ``L_i = −(τ/τ_b)·mean_{p∈P(i)} [l_ip − LSE_{a≠i} l_ia]`` over L2-normalised
    rows, P(i) the other rows with label y_i.

    Args:
        features: (N, D) with ``labels`` (N,), or (B, V, D) multi-view with
            ``labels`` (B,) or None (then each sample is its own class: SimCLR).
        temperature: τ > 0; ``base_temperature``: τ_b (default τ).
        weights: optional per-anchor weights, (N,) or (B,) for 3-D features.
        reduction: "mean" over anchors with a positive, "sum", or "none".
        gather_distributed, process_group, strategy: see the module docstring;
            labels travel with the keys, so positives on other ranks count.
    """
    _checks.features("features", features, ndims=(2, 3))
    device = features.device
    reduction = _checks.reduction(reduction)
    dt = stats_dtype(features.dtype)
    tau = _checks.temperature("temperature", temperature, device, dt)
    tau_b = tau if base_temperature is None else _checks.temperature(
        "base_temperature", base_temperature, device, dt)
    exchange = distributed.exchange(gather_distributed, process_group, strategy)
    layout = exchange.layout(features.shape[0], features, reduction, temperature=tau,
                             base_temperature=tau_b) if exchange is not None else None
    views = 1
    if features.dim() == 3:
        b, views = features.shape[:2]
        if labels is None:  # each sample its own class, numbered over the global batch
            labels = layout.ids(device) if layout is not None else torch.arange(b, device=device)
        labels = _checks.labels("labels", labels, b, device).repeat(views)
        weights = _checks.weights("weights", weights, b, device, stats_dtype(features.dtype))
        weights = weights.repeat(views) if weights is not None else None
        features = features.transpose(0, 1).reshape(b * views, -1)
    else:
        if labels is None:
            raise ValueError("labels are required for features of shape (N, D); pass (B, V, D) "
                             "features for the self-supervised form")
        labels = _checks.labels("labels", labels, features.shape[0], device)
        weights = _checks.weights("weights", weights, features.shape[0], device,
                                  stats_dtype(features.dtype))
    backend = _backend(backend, features)
    if backend == "reference" and exchange is None:
        return reference.supcon(features, labels, tau, tau_b, weights=weights, reduction=reduction)
    z = unit_rows([features], backend)
    if exchange is not None:
        tau, tau_b = exchange.replicated(tau), exchange.replicated(tau_b)
        lse, pos_sum, pos_count = core.row_stats(exchange, z, labels, z, labels,
                                                 layout.times(views), 1 / tau, True, False,
                                                 backend)
    else:
        lse, pos_sum, pos_count, _ = core.infonce_fwd(z, z, 1 / tau, labels, labels, 0, False,
                                                      False, backend)
    valid = pos_count > 0
    per_anchor = (tau / tau_b) * (lse - pos_sum / pos_count.clamp_min(1))
    return distributed.reduce(exchange, per_anchor, valid, weights, reduction)


def info_nce(query: Tensor, key: Tensor, temperature=0.07, targets: Optional[Tensor] = None,
             queue: Optional[Tensor] = None, weights: Optional[Tensor] = None,
             normalize: bool = True, *, in_batch_negatives: bool = True,
             reduction: str = "mean", backend: str = "auto", gather_distributed: bool = False,
             process_group=None, strategy: str = "all_gather") -> Tensor:
    """InfoNCE, one direction (van den Oord et al. 2018), optionally with a queue.

    ``L_i = −l_{i,t_i} + LSE_{j∈N_i ∪ {t_i}} l_ij``, ``l = <q, k> / τ``; the
    queue gets no gradient. Which keys are negatives (N_i):

    * ``in_batch_negatives=True`` (default): every key but the query's own, plus
      the queue (the in-batch InfoNCE of CPC and CLIP's one direction; with a
      queue, ESimCSE's in-batch + momentum-queue form);
    * ``in_batch_negatives=False``: the queue only, each query meeting just its
      own key: MoCo's ``CE([q·k₊, q·queueᵀ] / τ, 0)`` (He et al., CVPR 2020),
      what :class:`pyclloss.MoCoLoss` computes. Needs a queue.

    Args:
        query: (N, D); key: (M, D); targets: (N,) key index of each query's
            positive (default arange(N), which needs M ≥ N).
        queue: optional (Q, D) extra negatives (detached, cast to the query's dtype).
        weights: optional (N,) per-anchor weights.
        normalize: L2-normalise query, key and queue first (default True).
        in_batch_negatives: whether the other keys are negatives (above).
        gather_distributed, process_group, strategy: see the module docstring;
            ``targets`` index the local keys; with ``in_batch_negatives`` every
            rank's keys are negatives, without it each query meets its own key
            only and the mean runs over the global batch. The queue is used as
            given on each rank (pass the same queue everywhere for the
            single-process result).
    """
    _checks.features("query", query)
    _checks.features("key", key)
    _checks.same_kind("key", key, "query", query)
    n, m, device = query.shape[0], key.shape[0], query.device
    if targets is None:
        if m < n:
            raise ValueError(f"key needs at least as many rows as query ({n}) when targets is None,"
                             f" got {m}")
        targets = torch.arange(n, device=device)
    targets = _checks.index_targets("targets", targets, n, m, device)
    if queue is not None:
        # a stored queue (often float32 under autocast) joins in the query's dtype
        queue = _checks.features("queue", queue).to(query.dtype)
        _checks.same_kind("queue", queue, "query", query)
    if not isinstance(in_batch_negatives, bool):
        raise TypeError(f"in_batch_negatives must be a bool, got "
                        f"{type(in_batch_negatives).__name__}")
    if not in_batch_negatives and queue is None:
        raise ValueError("in_batch_negatives=False needs a queue: the queue holds the only "
                         "negatives")
    weights = _checks.weights("weights", weights, n, device, stats_dtype(query.dtype))
    reduction = _checks.reduction(reduction)
    tau = _checks.temperature("temperature", temperature, device, stats_dtype(query.dtype))
    exchange = distributed.exchange(gather_distributed, process_group, strategy)
    backend = _backend(backend, query)
    if backend == "reference" and exchange is None:
        return reference.info_nce(query, key, tau, targets, queue, weights, normalize,
                                  reduction=reduction, in_batch_negatives=in_batch_negatives)
    prep = (lambda x: unit_rows([x], backend)) if normalize else (lambda x: x.contiguous())
    q, k = prep(query), prep(key)
    if exchange is not None:
        keys = exchange.layout(m, k, reduction, temperature=tau)
        scale = 1 / exchange.replicated(tau)
    else:
        scale = 1 / tau
    if not in_batch_negatives:  # the own key: the positive and the only key in the softmax
        dt = stats_dtype(q.dtype)
        lse = pos_sum = scale * (q.to(dt) * k[targets].to(dt)).sum(1)
    elif exchange is not None:
        lse, pos_sum, _ = core.row_stats(exchange, q, targets + keys.offset, k,
                                         keys.ids(device), keys, scale, False, False, backend)
    else:
        key_index = torch.arange(m, device=device)
        lse, pos_sum, _, _ = core.infonce_fwd(q, k, scale, targets, key_index, None, False, False,
                                              backend)
    if queue is not None:
        queue_lse = core.infonce_fwd(q, prep(queue.detach()), scale, None, None, None, False,
                                     False, backend)[0]
        lse = torch.logaddexp(lse, queue_lse)
    return distributed.reduce(exchange, lse - pos_sum, None, weights, reduction)


def clip_loss(image_features: Tensor, text_features: Tensor, logit_scale, *,
              reduction: str = "mean", backend: str = "auto", gather_distributed: bool = False,
              process_group=None, strategy: str = "all_gather") -> Tensor:
    """Symmetric CLIP loss (Radford et al. 2021); equals open_clip's ``ClipLoss()``.

    ``½·[CE(s·I·Tᵀ, arange) + CE(s·T·Iᵀ, arange)]`` with s = ``logit_scale``
    (already exponentiated; a tensor that requires grad gets its gradient).
    Inputs are not normalised inside, as in open_clip. Row and column
    log-sum-exps come from the same logit tiles.

    Args:
        image_features, text_features: (N, D) paired embeddings.
        logit_scale: s > 0, float or 0-dim tensor.
        reduction: "mean", "sum", or "none" (N,): ½(row loss + column loss).
        gather_distributed, process_group, strategy: see the module docstring;
            the local images against every rank's texts and the local texts
            against every rank's images (open_clip's local loss, exact).
    """
    _checks.features("image_features", image_features)
    _checks.features("text_features", text_features)
    _checks.same_kind("text_features", text_features, "image_features", image_features,
                      same_rows=True)
    reduction = _checks.reduction(reduction)
    device = image_features.device
    dt = stats_dtype(image_features.dtype)
    scale = _checks.positive("logit_scale", logit_scale, device, dt)
    exchange = distributed.exchange(gather_distributed, process_group, strategy)
    backend = _backend(backend, image_features)
    if exchange is not None:
        layout = exchange.layout(image_features.shape[0], image_features, reduction,
                                 logit_scale=scale)
        ids, scale = layout.ids(device), exchange.replicated(scale)
        images, texts = image_features.contiguous(), text_features.contiguous()
        image_lse, image_pos, _ = core.row_stats(exchange, images, ids, texts, ids, layout,
                                                 scale, False, False, backend)
        text_lse, text_pos, _ = core.row_stats(exchange, texts, ids, images, ids, layout, scale,
                                               False, False, backend)
        per_anchor = (image_lse - image_pos + text_lse - text_pos) / 2
        return exchange.reduce(per_anchor, None, None, reduction)
    if backend == "reference":
        return reference.clip_loss(image_features, text_features, scale, reduction=reduction)
    idx = torch.arange(image_features.shape[0], device=device)
    row_lse, pos, _, col_lse = core.infonce_fwd(
        image_features.contiguous(), text_features.contiguous(), scale, idx, idx, None, False,
        True, backend)
    return reduce_anchors((row_lse + col_lse) / 2 - pos, None, None, reduction)


def siglip_loss(image_features: Tensor, text_features: Tensor, logit_scale, logit_bias, *,
                reduction: str = "mean", backend: str = "auto", gather_distributed: bool = False,
                process_group=None, strategy: str = "all_gather") -> Tensor:
    """Sigmoid loss (SigLIP, Zhai et al. 2023); equals open_clip's single-process
    ``SigLipLoss()``: ``−(1/N)·Σ_ij log σ(z_ij·(s·<x_i, y_j> + b))``, z = +1 on
    the diagonal, −1 elsewhere.

    Args:
        image_features, text_features: (N, D) paired embeddings (not normalised inside).
        logit_scale: s > 0 (exponentiated); logit_bias: b. Floats or 0-dim tensors.
        reduction: "mean" (sum over pairs / N), "sum", or "none" (N,) row sums.
        gather_distributed, process_group, strategy: see the module docstring;
            the local images against every rank's texts (with ``"ring"``,
            open_clip's neighbour exchange: the texts travel).
    """
    _checks.features("image_features", image_features)
    _checks.features("text_features", text_features)
    _checks.same_kind("text_features", text_features, "image_features", image_features,
                      same_rows=True)
    reduction = _checks.reduction(reduction)
    device, dt = image_features.device, stats_dtype(image_features.dtype)
    scale = _checks.positive("logit_scale", logit_scale, device, dt)
    bias = _checks.scalar("logit_bias", logit_bias, device, dt)
    exchange = distributed.exchange(gather_distributed, process_group, strategy)
    backend = _backend(backend, image_features)
    if backend == "reference" and exchange is None:
        return reference.siglip_loss(image_features, text_features, scale, bias,
                                     reduction=reduction)
    images, texts = image_features.contiguous(), text_features.contiguous()
    if exchange is not None:
        layout = exchange.layout(images.shape[0], images, reduction, logit_scale=scale,
                                 logit_bias=bias)
        ids, rows_in_all = layout.ids(device), layout.total
        rows = core.siglip_rows(exchange, images, ids, texts, ids, layout,
                                exchange.replicated(scale), exchange.replicated(bias), backend)
    else:
        idx = torch.arange(images.shape[0], device=device)
        rows = core.siglip_fwd(images, texts, scale, bias, idx, idx, backend)
        rows_in_all = images.shape[0]
    if reduction == "none":
        return rows
    total = rows.sum()
    return distributed.over_ranks(exchange, total if reduction == "sum" else total / rows_in_all)


# ------------------------------------------------------------------------ modules


class _Distributable(nn.Module):
    """Keeps the keyword-only distributed arguments of the losses
    (``gather_distributed``, ``process_group``, ``strategy``; off by default)."""

    def __init__(self, reduction: str, backend: str, gather_distributed: bool,
                 process_group, strategy: str):
        super().__init__()
        self.reduction, self.backend = reduction, backend
        self.distributed = distributed.loss_arguments(gather_distributed, process_group, strategy)


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
        return nt_xent(z1, z2, self.temperature, weights=weights, reduction=self.reduction,
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
        return pair_nt_xent(embeddings, labels, self.temperature, reduction=self.reduction,
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
        return supcon(features, labels, self.temperature, self.base_temperature,
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
        return info_nce(query, key, self.temperature, targets, queue, weights, self.normalize,
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
        return clip_loss(image_features, text_features, logit_scale, reduction=self.reduction,
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
        return siglip_loss(image_features, text_features, logit_scale, logit_bias,
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
        per_query = info_nce(query, key, self.temperature, queue=self.queue,
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
