"""The InfoNCE family as plain functions.

Each loss is assembled from the O(N) statistics of the fused core
(``pyclloss.ops.info_nce``); the N×M logit matrix is never built except by
``backend="reference"``, which runs the formulas of ``pyclloss.reference``.
Losses are returned in float32 (float64 for float64 inputs).
"""

from typing import Optional

import torch
import torch.nn.functional as F

from . import _checks
from .backends import resolve
from .ops import info_nce as core
from .reference import info_nce as reference
from .reference.info_nce import reduce_anchors, stats_dtype

Tensor = torch.Tensor


def _unit(x: Tensor) -> Tensor:
    """L2-normalise rows in the statistics dtype; hand the kernels the input dtype."""
    return F.normalize(x.to(stats_dtype(x.dtype)), dim=-1).to(x.dtype).contiguous()


def nt_xent(z1: Tensor, z2: Tensor, temperature=0.5, *, weights: Optional[Tensor] = None,
            reduction: str = "mean", backend: str = "auto") -> Tensor:
    """NT-Xent, the SimCLR loss (Chen et al., ICML 2020); equals lightly's ``NTXentLoss``.

    ``z = normalize(cat(z1, z2))`` (2B×D); row i's positive is its other view;
    its softmax runs over the 2B−1 other rows:
    ``L_i = −l_{i,i±B} + LSE_{j≠i} l_ij``, ``l_ij = <z_i, z_j> / τ``.

    Args:
        z1, z2: (B, D) the two views' embeddings.
        temperature: τ > 0, a float or a 0-dim tensor (gets a gradient).
        weights: optional (B,) per-sample weights, applied to both views.
        reduction: "mean" (over the 2B anchors), "sum", or "none" (2B,).
    """
    _checks.features("z1", z1)
    _checks.features("z2", z2)
    _checks.same_kind("z2", z2, "z1", z1, same_rows=True)
    reduction = _checks.reduction(reduction)
    b, device = z1.shape[0], z1.device
    weights = _checks.weights("weights", weights, b, device)
    weights = torch.cat([weights, weights]) if weights is not None else None
    tau = _checks.positive("temperature", temperature, device, stats_dtype(z1.dtype))
    backend = resolve(backend, device)
    if backend == "reference":
        return reference.nt_xent(z1, z2, tau, weights=weights, reduction=reduction)
    z = _unit(torch.cat([z1, z2]))
    idx = torch.arange(2 * b, device=device)
    partner = torch.cat([idx[b:], idx[:b]])
    lse, pos_sum, _, _ = core.infonce_fwd(z, z, 1 / tau, partner, idx, 0, False, False, backend)
    return reduce_anchors(lse - pos_sum, None, weights, reduction)


def pair_nt_xent(embeddings: Tensor, labels: Tensor, temperature=0.07, *,
                 reduction: str = "mean", backend: str = "auto") -> Tensor:
    """Pairwise multi-positive NT-Xent; equals pytorch-metric-learning's
    ``NTXentLoss(temperature)(embeddings, labels)`` for any labels.

    Every positive pair (a, p) (same label, a ≠ p) is its own term
    ``softplus(NEG_a − l_ap)`` with ``NEG_a = LSE_{n: y_n ≠ y_a} l_an``, averaged
    over all positive pairs. A batch without positive pairs gives 0.

    Args:
        embeddings: (N, D), normalised inside (cosine similarity).
        labels: (N,) integer class labels.
        reduction: "mean" over positive pairs, "sum", or "none" (N,): each
            anchor's sum over its positive pairs.
    """
    _checks.features("embeddings", embeddings, min_rows=2)
    n, device = embeddings.shape[0], embeddings.device
    labels = _checks.labels("labels", labels, n, device)
    reduction = _checks.reduction(reduction)
    tau = _checks.positive("temperature", temperature, device, stats_dtype(embeddings.dtype))
    backend = resolve(backend, device)
    if backend == "reference":
        return reference.pair_nt_xent(embeddings, labels, tau, reduction=reduction)
    z = _unit(embeddings)
    scale = 1 / tau
    neg_lse, _, pos_count, _ = core.infonce_fwd(z, z, scale, labels, labels, 0, True, False, backend)
    loss_sum, _ = core.infonce_pair_fwd(z, z, scale, labels, labels, 0, neg_lse, backend)
    if reduction == "none":
        return loss_sum
    total = loss_sum.sum()
    return total if reduction == "sum" else total / pos_count.sum().clamp_min(1)


def supcon(features: Tensor, labels: Optional[Tensor] = None, temperature=0.1,
           base_temperature=None, *, weights: Optional[Tensor] = None, reduction: str = "mean",
           backend: str = "auto") -> Tensor:
    """Supervised contrastive loss (Khosla et al., NeurIPS 2020), SupContrast's
    ``SupConLoss`` (contrast_mode "all"); equals pytorch-metric-learning's
    ``SupConLoss(temperature)`` when ``base_temperature`` is τ.

    ``L_i = −(τ/τ_b)·mean_{p∈P(i)} [l_ip − LSE_{a≠i} l_ia]`` over L2-normalised
    rows, P(i) the other rows with label y_i. Anchors without a positive give 0
    and are left out of the mean.

    Args:
        features: (N, D) with ``labels`` (N,), or (B, V, D) multi-view with
            ``labels`` (B,) or None (then each sample is its own class: SimCLR).
        temperature: τ > 0; ``base_temperature``: τ_b (default τ).
        weights: optional per-anchor weights, (N,) or (B,) for 3-D features.
        reduction: "mean" over anchors with a positive, "sum", or "none".
    """
    _checks.features("features", features, ndims=(2, 3))
    device = features.device
    if features.dim() == 3:
        b, views = features.shape[:2]
        if labels is None:
            labels = torch.arange(b, device=device)
        labels = _checks.labels("labels", labels, b, device).repeat(views)
        weights = _checks.weights("weights", weights, b, device)
        weights = weights.repeat(views) if weights is not None else None
        features = features.transpose(0, 1).reshape(b * views, -1)
    else:
        if labels is None:
            raise ValueError("labels are required for features of shape (N, D); pass (B, V, D) "
                             "features for the self-supervised form")
        labels = _checks.labels("labels", labels, features.shape[0], device)
        weights = _checks.weights("weights", weights, features.shape[0], device)
    if features.shape[0] < 2:
        raise ValueError(f"features needs at least 2 samples in all, got {features.shape[0]}")
    reduction = _checks.reduction(reduction)
    dt = stats_dtype(features.dtype)
    tau = _checks.positive("temperature", temperature, device, dt)
    tau_b = tau if base_temperature is None else _checks.positive(
        "base_temperature", base_temperature, device, dt)
    backend = resolve(backend, device)
    if backend == "reference":
        return reference.supcon(features, labels, tau, tau_b, weights=weights, reduction=reduction)
    z = _unit(features)
    lse, pos_sum, pos_count, _ = core.infonce_fwd(z, z, 1 / tau, labels, labels, 0, False, False,
                                                  backend)
    valid = pos_count > 0
    per_anchor = (tau / tau_b) * (lse - pos_sum / pos_count.clamp_min(1))
    return reduce_anchors(per_anchor, valid, weights, reduction)


def info_nce(query: Tensor, key: Tensor, temperature=0.07, targets: Optional[Tensor] = None,
             queue: Optional[Tensor] = None, weights: Optional[Tensor] = None,
             normalize: bool = True, *, reduction: str = "mean", backend: str = "auto") -> Tensor:
    """InfoNCE, one direction (van den Oord et al. 2018; MoCo's loss with a queue).

    ``L_i = −l_{i,t_i} + LSE_j l_ij`` over the keys and the queue's extra
    negatives, ``l = <q, k> / τ``. The queue gets no gradient.

    Args:
        query: (N, D); key: (M, D); targets: (N,) key index of each query's
            positive (default arange(N), which needs M ≥ N).
        queue: optional (Q, D) extra negatives (detached, cast to the query's dtype).
        weights: optional (N,) per-anchor weights.
        normalize: L2-normalise query, key and queue first (default True).
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
    weights = _checks.weights("weights", weights, n, device)
    reduction = _checks.reduction(reduction)
    tau = _checks.positive("temperature", temperature, device, stats_dtype(query.dtype))
    backend = resolve(backend, device)
    if backend == "reference":
        return reference.info_nce(query, key, tau, targets, queue, weights, normalize,
                                  reduction=reduction)
    prep = _unit if normalize else (lambda x: x.contiguous())
    q, k, scale = prep(query), prep(key), 1 / tau
    key_index = torch.arange(m, device=device)
    lse, pos_sum, _, _ = core.infonce_fwd(q, k, scale, targets, key_index, None, False, False,
                                          backend)
    if queue is not None:
        queue_lse = core.infonce_fwd(q, prep(queue.detach()), scale, None, None, None, False,
                                     False, backend)[0]
        lse = torch.logaddexp(lse, queue_lse)
    return reduce_anchors(lse - pos_sum, None, weights, reduction)


def clip_loss(image_features: Tensor, text_features: Tensor, logit_scale, *,
              reduction: str = "mean", backend: str = "auto") -> Tensor:
    """Symmetric CLIP loss (Radford et al. 2021); equals open_clip's ``ClipLoss()``.

    ``½·[CE(s·I·Tᵀ, arange) + CE(s·T·Iᵀ, arange)]`` with s = ``logit_scale``
    (already exponentiated; a tensor that requires grad gets its gradient).
    Inputs are not normalised inside, as in open_clip. Row and column
    log-sum-exps come from the same logit tiles.

    Args:
        image_features, text_features: (N, D) paired embeddings.
        logit_scale: s > 0, float or 0-dim tensor.
        reduction: "mean", "sum", or "none" (N,): ½(row loss + column loss).
    """
    _checks.features("image_features", image_features)
    _checks.features("text_features", text_features)
    _checks.same_kind("text_features", text_features, "image_features", image_features,
                      same_rows=True)
    reduction = _checks.reduction(reduction)
    device = image_features.device
    dt = stats_dtype(image_features.dtype)
    scale = _checks.positive("logit_scale", logit_scale, device, dt)
    backend = resolve(backend, device)
    if backend == "reference":
        return reference.clip_loss(image_features, text_features, scale, reduction=reduction)
    idx = torch.arange(image_features.shape[0], device=device)
    row_lse, pos, _, col_lse = core.infonce_fwd(
        image_features.contiguous(), text_features.contiguous(), scale, idx, idx, None, False,
        True, backend)
    return reduce_anchors((row_lse + col_lse) / 2 - pos, None, None, reduction)


def siglip_loss(image_features: Tensor, text_features: Tensor, logit_scale, logit_bias, *,
                reduction: str = "mean", backend: str = "auto") -> Tensor:
    """Sigmoid loss (SigLIP, Zhai et al. 2023); equals open_clip's single-process
    ``SigLipLoss()``: ``−(1/N)·Σ_ij log σ(z_ij·(s·<x_i, y_j> + b))``, z = +1 on
    the diagonal, −1 elsewhere.

    Args:
        image_features, text_features: (N, D) paired embeddings (not normalised inside).
        logit_scale: s > 0 (exponentiated); logit_bias: b. Floats or 0-dim tensors.
        reduction: "mean" (sum over pairs / N), "sum", or "none" (N,) row sums.
    """
    _checks.features("image_features", image_features)
    _checks.features("text_features", text_features)
    _checks.same_kind("text_features", text_features, "image_features", image_features,
                      same_rows=True)
    reduction = _checks.reduction(reduction)
    device, dt = image_features.device, stats_dtype(image_features.dtype)
    scale = _checks.positive("logit_scale", logit_scale, device, dt)
    bias = _checks.scalar("logit_bias", logit_bias, device, dt)
    backend = resolve(backend, device)
    if backend == "reference":
        return reference.siglip_loss(image_features, text_features, scale, bias,
                                     reduction=reduction)
    idx = torch.arange(image_features.shape[0], device=device)
    rows = core.siglip_fwd(image_features.contiguous(), text_features.contiguous(), scale, bias,
                           idx, idx, backend)
    if reduction == "none":
        return rows
    total = rows.sum()
    return total if reduction == "sum" else total / rows.shape[0]


# ------------------------------------------------------- gated subspaces (Hydra / SimLAP)

from .ops import gated_info_nce as gated_ops  # noqa: E402
from .reference import gated_info_nce as gated_reference  # noqa: E402


def gated_info_nce(q: Tensor, k: Tensor, gates: Tensor, labels: Tensor, partner_labels: Tensor,
                   key_labels: Optional[Tensor] = None, temperature=0.2, *,
                   reduction: str = "mean", backend: str = "auto") -> Tensor:
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
    """
    _checks.features("q", q)
    _checks.features("k", k)
    _checks.same_kind("k", k, "q", q)
    if not isinstance(gates, torch.Tensor) or not gates.dtype.is_floating_point:
        raise TypeError("gates must be a floating torch.Tensor of shape (B, K)")
    if gates.shape != q.shape:
        raise ValueError(f"gates must have the shape of q {tuple(q.shape)}, got "
                         f"{tuple(gates.shape)}")
    if gates.device != q.device:
        raise ValueError(f"gates is on {gates.device} but q is on {q.device}")
    if not _checks._tracing() and not bool(torch.isfinite(gates).all()):
        raise ValueError("gates contains NaN or Inf")
    b, n, device = q.shape[0], k.shape[0], q.device
    labels = _checks.labels("labels", labels, b, device)
    partner_labels = _checks.labels("partner_labels", partner_labels, b, device)
    if key_labels is None:
        if n != b:
            raise ValueError(f"key_labels is required when k has {n} rows and q has {b}")
        key_labels = labels
    key_labels = _checks.labels("key_labels", key_labels, n, device)
    reduction = _checks.reduction(reduction)
    tau = _checks.positive("temperature", temperature, device, stats_dtype(q.dtype))
    gates = gates.to(q.dtype)
    backend = resolve(backend, device, implemented=gated_ops.BACKENDS)
    if backend == "reference":
        return gated_reference.gated_info_nce(q, k, gates, labels, partner_labels, key_labels,
                                              tau, reduction=reduction)
    loss_sum, _, pos_count, _ = gated_ops.gated_pair_loss(
        q.contiguous(), k.contiguous(), gates.contiguous(), 1 / tau, labels, partner_labels,
        key_labels, backend)
    if reduction == "none":
        return loss_sum
    total = loss_sum.sum()
    return total if reduction == "sum" else total / pos_count.sum().clamp_min(1)
