"""The InfoNCE family as plain functions.

Each loss is assembled from the O(N) statistics of the fused core
(``pyclloss.ops.info_nce``); the N×M logit matrix is never built except by
``backend="reference"``, which runs the formulas of ``pyclloss.reference``.
Losses are returned in float32 (float64 for float64 inputs).

Every loss takes ``gather_distributed=True`` (or a ``process_group``) to run
over a torch.distributed group as one big batch, the global batch being the
rank-major concatenation of the local ones, with ``strategy="all_gather"`` or
``"ring"``; see ``pyclloss.distributed`` and docs/distributed.md.
"""

from typing import Optional

import torch
import torch.nn.functional as F

from . import _checks, distributed
from .backends import resolve
from .ops import ft_moco as ft_moco_ops
from .ops import gated_info_nce as gated_ops
from .ops import info_nce as core
from .ops import rnc as rnc_ops
from .ops import supremix as supremix_ops
from .reference import ft_moco as ft_moco_reference
from .reference import gated_info_nce as gated_reference
from .reference import info_nce as reference
from .reference import rnc as rnc_reference
from .reference import supremix as supremix_reference
from ._stats import reduce_anchors, stats_dtype, unit_rows

Tensor = torch.Tensor


def _feature_size(x: Tensor) -> int:
    """D for the backend choice: a plain int on the GPU (where measured choices
    depend on it), 0 elsewhere (no dependence on a traced size)."""
    return int(x.shape[-1]) if x.is_cuda else 0


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
    backend = resolve(backend, device, family="info_nce", dtype=z1.dtype,
                      size=_feature_size(z1))
    if backend == "reference" and exchange is None:
        return reference.nt_xent(z1, z2, tau, weights=weights, reduction=reduction)
    weights = torch.cat([weights, weights]) if weights is not None else None  # both views
    z = unit_rows(torch.cat([z1, z2]))
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
    backend = resolve(backend, device, family="info_nce", dtype=embeddings.dtype,
                      size=_feature_size(embeddings))
    if backend == "reference" and exchange is None:
        return reference.pair_nt_xent(embeddings, labels, tau, reduction=reduction)
    z = unit_rows(embeddings)
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
    backend = resolve(backend, device, family="info_nce", dtype=features.dtype,
                      size=_feature_size(features))
    if backend == "reference" and exchange is None:
        return reference.supcon(features, labels, tau, tau_b, weights=weights, reduction=reduction)
    z = unit_rows(features)
    if exchange is not None:
        tau, tau_b = exchange.replicated(tau), exchange.replicated(tau_b)
        lse, pos_sum, pos_count = core.row_stats(exchange, z, labels, z, labels, layout.times(views),
                                                     1 / tau, True, False, backend)
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
    backend = resolve(backend, device, family="info_nce", dtype=query.dtype,
                      size=_feature_size(query))
    if backend == "reference" and exchange is None:
        return reference.info_nce(query, key, tau, targets, queue, weights, normalize,
                                  reduction=reduction, in_batch_negatives=in_batch_negatives)
    prep = unit_rows if normalize else (lambda x: x.contiguous())
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
        lse, pos_sum, _ = core.row_stats(exchange, q, targets + keys.offset, k, keys.ids(device), keys,
                                             scale, False, False, backend)
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
    backend = resolve(backend, device, family="info_nce", dtype=image_features.dtype,
                      size=_feature_size(image_features))
    if exchange is not None:
        layout = exchange.layout(image_features.shape[0], image_features, reduction,
                                 logit_scale=scale)
        ids, scale = layout.ids(device), exchange.replicated(scale)
        images, texts = image_features.contiguous(), text_features.contiguous()
        image_lse, image_pos, _ = core.row_stats(exchange, images, ids, texts, ids, layout, scale,
                                                     False, False, backend)
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
    backend = resolve(backend, device, family="info_nce", dtype=image_features.dtype,
                      size=_feature_size(image_features))
    if backend == "reference" and exchange is None:
        return reference.siglip_loss(image_features, text_features, scale, bias,
                                     reduction=reduction)
    images, texts = image_features.contiguous(), text_features.contiguous()
    if exchange is not None:
        layout = exchange.layout(images.shape[0], images, reduction, logit_scale=scale,
                                 logit_bias=bias)
        ids, rows_in_all = layout.ids(device), layout.total
        rows = core.siglip_rows(exchange, images, ids, texts, ids, layout, exchange.replicated(scale),
                                    exchange.replicated(bias), backend)
    else:
        idx = torch.arange(images.shape[0], device=device)
        rows = core.siglip_fwd(images, texts, scale, bias, idx, idx, backend)
        rows_in_all = images.shape[0]
    if reduction == "none":
        return rows
    total = rows.sum()
    return distributed.over_ranks(exchange, total if reduction == "sum" else total / rows_in_all)


# ----------------------------------------------------- feature-transformation MoCo


def _mixing_coefficient(name: str, value, shapes, device: torch.device,
                        dtype: torch.dtype) -> Tensor:
    """A finite mixing coefficient: a number or 0-dim tensor, or a tensor of one of
    ``shapes``; detached, in ``dtype``."""
    if not isinstance(value, torch.Tensor) or value.dim() == 0:
        return _checks.scalar(name, value, device, dtype).detach()
    if not value.dtype.is_floating_point:
        raise TypeError(f"{name} must be a floating tensor, got {value.dtype}")
    if tuple(value.shape) not in shapes:
        forms = " or ".join(str(s) for s in shapes)
        raise ValueError(f"{name} must be a scalar or have shape {forms}, got {tuple(value.shape)}")
    if value.device != device:
        raise ValueError(f"{name} is on {value.device} but the features are on {device}")
    _checks.finite(name, value)
    return value.detach().to(dtype)


def ft_moco_loss(q: Tensor, k: Tensor, queue: Tensor, lam_pos, lam_neg, perm: Tensor,
                 temperature=0.2, *, normalize: bool = True, normalize_mixed: bool = False,
                 reduction: str = "mean", backend: str = "auto") -> Tensor:
    """MoCo's InfoNCE with feature transformation ("Improving Contrastive Learning
    by Visualizing Feature Transformation", Zhu et al., ICCV 2021).

    Positive extrapolation ``q̂ = λ_p·q + (1−λ_p)·k``, ``k̂ = λ_p·k + (1−λ_p)·q``
    (the key is detached first, as in the authors' code, so q gets a gradient
    through both); negative interpolation of the queue
    ``Q̂_j = λ_n·Q_j + (1−λ_n)·Q_π(j)``; ``L_i = CE([q̂_i·k̂_i, q̂_i·Q̂ᵀ] / τ, 0)``.
    The paper samples one λ_p = 1 + Beta(2, 2) and one λ_n ~ Beta(1.6, 1.6) per
    step and π = randperm(K) (:class:`pyclloss.FTMoCoLoss` does). The fused
    backends never build the N×K logits: the Triton kernels blend Q_j and
    Q_π(j) inside their key tiles, the C++ backend builds Q̂ (K×D) once per
    step for the InfoNCE core (see :mod:`pyclloss.ops.ft_moco`).

    Args:
        q: (N, D) queries. k: (N, D) keys (detached inside).
        queue: (K, D) negatives (detached; cast to q's dtype).
        lam_pos: λ_p, a number / 0-dim tensor, or per sample (N,) or per
            element (N, D) (the code's ``dim_mask`` variants).
        lam_neg: λ_n, a number / 0-dim tensor, or per queue row (K,) (the
            code's per-element λ_n of its ``dim_mask`` "neg"/"both" is not
            supported). Mixing coefficients get no gradient.
        perm: (K,) integer queue indices π (a permutation in the paper).
        temperature: τ > 0 (float or 0-dim tensor, which gets a gradient).
        normalize: L2-normalise q, k and the queue before mixing (the paper's
            encoder outputs and queue are unit vectors). The mixed features are
            not normalised again unless ``normalize_mixed`` (the code's
            ``postmix_norm``: q̂ and k̂ only).
        reduction: "mean", "sum" or "none" (N,).
    """
    _checks.features("q", q)
    _checks.features("k", k)
    _checks.same_kind("k", k, "q", q, same_rows=True)
    queue = _checks.features("queue", queue).to(q.dtype)
    _checks.same_kind("queue", queue, "q", q)
    (n, d), size, device = q.shape, queue.shape[0], q.device
    dt = stats_dtype(q.dtype)
    lam_pos = _mixing_coefficient("lam_pos", lam_pos, [(n,), (n, d)], device, dt)
    lam_neg = _mixing_coefficient("lam_neg", lam_neg, [(size,)], device, dt)
    perm = _checks.index_targets("perm", perm, size, size, device)
    reduction = _checks.reduction(reduction)
    tau = _checks.temperature("temperature", temperature, device, dt)
    backend = resolve(backend, device, implemented=ft_moco_ops.KERNELS.backends)
    if backend == "reference":
        return ft_moco_reference.ft_moco_loss(q, k, queue, lam_pos, lam_neg, perm, tau,
                                              normalize, normalize_mixed, reduction)
    anchors, keys = q.to(dt), k.detach().to(dt)
    if normalize:
        anchors, keys = F.normalize(anchors, dim=1), F.normalize(keys, dim=1)
    q_hat, k_hat = ft_moco_reference.extrapolate_pair(anchors, keys, lam_pos)
    if normalize_mixed:
        q_hat, k_hat = F.normalize(q_hat, dim=1), F.normalize(k_hat, dim=1)
    scale = 1 / tau
    pos = scale * (q_hat * k_hat).sum(1)
    negatives = queue.detach().contiguous()
    weights = ft_moco_ops.interpolation_weights(negatives, lam_neg, perm, normalize)
    neg_lse = ft_moco_ops.negatives_lse(q_hat.to(q.dtype).contiguous(), negatives, *weights,
                                        perm, scale, backend)
    return reduce_anchors(torch.logaddexp(pos, neg_lse) - pos, None, None, reduction)


# ------------------------------------------------------- gated subspaces (Hydra / SimLAP)


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
        gather_distributed, process_group, strategy: see the module docstring;
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
    backend = resolve(backend, device, implemented=gated_ops.KERNELS.backends)
    if backend == "reference" and exchange is None:
        return gated_reference.gated_info_nce(q, k, gates, labels, partner_labels, key_labels,
                                              tau, reduction=reduction)
    q, k, gates = q.contiguous(), k.contiguous(), gates.contiguous()
    if exchange is not None:
        layout = exchange.layout(n, k, reduction, temperature=tau)
        tau = exchange.replicated(tau)
    if exchange is not None and exchange.ring is not None:
        pos_count, loss_sum = gated_ops.ring_pair_stats(exchange, q, gates, labels, partner_labels,
                                                        k, key_labels, layout, 1 / tau, backend)
    else:
        if exchange is not None:
            k, key_labels = exchange.gather(k, key_labels, layout)
        loss_sum, _, pos_count, _ = gated_ops.gated_pair_loss(q, k, gates, 1 / tau, labels,
                                                              partner_labels, key_labels, backend)
    if reduction == "none":
        return loss_sum
    total = loss_sum.sum()
    if reduction == "sum":
        return distributed.over_ranks(exchange, total)
    pairs = distributed.over_ranks(exchange, pos_count.sum().to(total.dtype)).clamp_min(1)
    return distributed.over_ranks(exchange, total / pairs)


# ---------------------------------------------------------------- regression losses


def _fixed_positive(name: str, value) -> float:
    """A hyper-parameter > 0 that gets no gradient, as a float (the ops take one)."""
    if isinstance(value, torch.Tensor) and value.requires_grad:
        raise ValueError(f"{name} must be a fixed number here (no gradient), got a tensor that "
                         f"requires grad")
    device = value.device if isinstance(value, torch.Tensor) else torch.device("cpu")
    _checks.positive(name, value, device, torch.float64)
    return float(value)


def _regression_labels(name: str, y, n: int, device: torch.device, dtype: torch.dtype,
                       multi_dim: bool = False) -> Tensor:
    """Real-valued labels (n,) (or (n, L) with ``multi_dim``) in ``dtype``."""
    if not isinstance(y, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(y).__name__}")
    if y.dtype.is_complex or y.dtype == torch.bool:
        raise TypeError(f"{name} must hold real numbers, got {y.dtype}")
    if y.shape[:1] != (n,) or y.dim() not in ((1, 2) if multi_dim else (1,)):
        shapes = f"({n},) or ({n}, L)" if multi_dim else f"({n},)"
        raise ValueError(f"{name} must have shape {shapes}, got {tuple(y.shape)}")
    if y.device != device:
        raise ValueError(f"{name} is on {y.device} but the features are on {device}")
    y = y.detach().to(dtype)
    _checks.finite(name, y)
    return y.contiguous()


def supremix_loss(z: Tensor, t: Tensor, lam_neg: Tensor, temperature=0.5, base_temperature=0.5,
                  gap: float = 5.0, *, reduction: str = "mean", backend: str = "auto") -> Tensor:
    """SupReMix (Wu et al., "Mixup Your Own Pairs"): supervised contrastive
    regression with mix-neg and mix-pos mixtures and distance-magnified
    denominators (docs/losses.md, ``pyclloss.reference.supremix``).

    For anchor i: mix-neg ``λ_ik·z_i + (1−λ_ik)·z_k`` for every k with
    t_k ≠ t_i; mix-pos ``α·z_j + (1−α)·z_k`` for t_j < t_i < t_k with both
    gaps < ``gap``, α = (t_k − t_i)/(t_k − t_j). Mixtures are detached;
    denominator terms weighted by |t_i − t_c| + 1. Anchors without a positive
    give 0 and are left out of the mean. The fused backends work on the Gram
    matrix: O(n²) memory, O(n³) scalar work, nothing n×n×n.

    Args:
        z: (n, D) embeddings, L2-normalised inside; n >= 2.
        t: (n,) real-valued labels.
        lam_neg: (n, n) λ of the mix-neg pair (i, k) in [0, 1] (SupReMixLoss
            draws them from Beta(2, 8)); entries of other pairs are ignored.
        temperature, base_temperature: τ, τ_b > 0, floats or 0-dim tensors
            (they get gradients).
        gap: mix-pos neighbours lie closer than this to the anchor's label.
        reduction: "mean" over anchors with a positive, "sum", or "none" (n,).
    """
    _checks.features("z", z, min_rows=2)
    n, device, dt = z.shape[0], z.device, stats_dtype(z.dtype)
    t = _regression_labels("t", t, n, device, dt)
    lam = _checks.float_tensor("lam_neg", lam_neg, (n, n), device).detach().to(dt).contiguous()
    _checks.require((lam >= 0) & (lam <= 1), "lam_neg must lie in [0, 1]")
    reduction = _checks.reduction(reduction)
    tau = _checks.temperature("temperature", temperature, device, dt)
    tau_b = _checks.temperature("base_temperature", base_temperature, device, dt)
    gap = _fixed_positive("gap", gap)
    backend = resolve(backend, device, supremix_ops.KERNELS.backends)
    if backend == "reference":
        return supremix_reference.supremix_loss(z, t, lam, tau, tau_b, gap, reduction)
    lse, pos_sum, pos_count, _ = supremix_ops.supremix(unit_rows(z), t, lam, 1 / tau, gap, backend)
    per_anchor = (tau / tau_b) * (lse - pos_sum / pos_count.clamp_min(1))
    return reduce_anchors(per_anchor, pos_count > 0, None, reduction)


def rnc_loss(features: Tensor, labels: Tensor, temperature=2.0, *, reduction: str = "mean",
             backend: str = "auto") -> Tensor:
    """Rank-N-Contrast (Zha et al., NeurIPS 2023); equals the authors' ``RnCLoss``.

    ``s_ij = −‖v_i − v_j‖₂/τ``, ``d_ij = ‖y_i − y_j‖₁``;
    ``L = −1/(n(n−1))·Σ_i Σ_{j≠i} [s_ij − log Σ_{k≠i, d_ik ≥ d_ij} exp(s_ik)]``.
    The fused backends never build the n×n×n mask: the C++ kernel sorts each
    row by d (O(n² log n)), ties grouped exactly. Features are not normalised.

    Args:
        features: (n, D), or (B, V, D) views (the authors' (B, 2, D)), stacked
            view-major; n >= 2 in all.
        labels: (n,) or (n, L) real labels ((B,) or (B, L) for 3-D features).
        temperature: τ > 0, a float or a 0-dim tensor (gets a gradient).
        reduction: "mean" (the authors' loss), "sum", or "none": (n,) each
            anchor's mean over j ≠ i.
    """
    _checks.features("features", features, ndims=(2, 3))
    device, dt = features.device, stats_dtype(features.dtype)
    labels = _regression_labels("labels", labels, features.shape[0], device, dt, multi_dim=True)
    if features.dim() == 3:
        views = features.shape[1]
        features = features.transpose(0, 1).reshape(-1, features.shape[2])
        labels = labels.repeat(views, *([1] * (labels.dim() - 1)))
    n = features.shape[0]
    if n < 2:
        raise ValueError(f"features needs at least 2 samples in all, got {n}")
    reduction = _checks.reduction(reduction)
    tau = _checks.temperature("temperature", temperature, device, dt)
    backend = resolve(backend, device, rnc_ops.KERNELS.backends)
    if backend == "reference":
        return rnc_reference.rnc_loss(features, labels, tau, reduction)
    sim = -rnc_ops.rnc_distances(features.to(dt), backend) / tau
    rows = rnc_ops.rnc_rows(sim, rnc_reference.label_distance(labels), backend)
    return reduce_anchors(rows / (n - 1), None, None, reduction)
