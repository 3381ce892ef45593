"""Plain-PyTorch InfoNCE family: the executable spec.

Two layers, both dense (they build the N×M logit matrix):

* the five kernels of the fused core (``infonce_fwd``, ``infonce_pair_fwd``,
  ``infonce_bwd``, ``siglip_fwd``, ``siglip_bwd``) with the exact semantics of
  docs/fused_core.md. This is the ``reference`` backend of the core and the
  ground truth of every kernel test;
* the losses written straight from their papers' formulas (``nt_xent``,
  ``pair_nt_xent``, ``supcon``, ``info_nce``, ``clip_loss``, ``siglip_loss``),
  differentiated by autograd. ``backend="reference"`` runs these, and every
  loss-level test compares against them.
"""

from typing import Optional, Tuple

import torch
import torch.nn.functional as F

from .._stats import reduce_anchors, stats_dtype

Tensor = torch.Tensor


# --------------------------------------------------------------------------- masks


def _excluded(n: int, m: int, exclude_offset: Optional[int], device) -> Tensor:
    rows = torch.arange(n, device=device)[:, None]
    cols = torch.arange(m, device=device)[None, :]
    if exclude_offset is None:
        return torch.zeros(n, m, dtype=torch.bool, device=device)
    return cols == rows + exclude_offset


def _positive(q_labels, k_labels, excluded: Tensor) -> Tensor:
    if q_labels is None:
        return torch.zeros_like(excluded)
    return (q_labels[:, None] == k_labels[None, :]) & ~excluded


def _masks(q, k, q_labels, k_labels, exclude_offset, neg_only):
    excl = _excluded(q.shape[0], k.shape[0], exclude_offset, q.device)
    pos = _positive(q_labels, k_labels, excl)
    den = ~excl & ~pos if neg_only else ~excl
    return excl, pos, den


def _logits(q: Tensor, k: Tensor, scale: Tensor) -> Tuple[Tensor, Tensor]:
    acc = stats_dtype(q.dtype)
    dot = q.to(acc) @ k.to(acc).T
    return dot, scale.to(acc) * dot


def _masked_lse(logits: Tensor, mask: Tensor, dim: int) -> Tensor:
    return torch.logsumexp(logits.masked_fill(~mask, float("-inf")), dim=dim)


def _coef_weighted_softmax(logits, lse, coef, mask, dim):
    """coef * exp(logits - lse) on mask, exactly 0 where coef is 0."""
    lse_b = lse.unsqueeze(dim)
    coef_b = coef.unsqueeze(dim)
    active = mask & (coef_b != 0)
    p = torch.exp(torch.where(active, logits - lse_b, torch.zeros_like(logits)))
    return torch.where(active, coef_b * p, torch.zeros_like(logits))


# ------------------------------------------------------------------- the core kernels


def infonce_fwd(q, k, scale, q_labels, k_labels, exclude_offset, neg_only, col_stats):
    excl, pos, den = _masks(q, k, q_labels, k_labels, exclude_offset, neg_only)
    _, logits = _logits(q, k, scale)
    row_lse = _masked_lse(logits, den, 1)
    pos_sum = torch.where(pos, logits, torch.zeros_like(logits)).sum(1)
    pos_count = pos.sum(1).to(logits.dtype)
    if col_stats:
        col_lse = _masked_lse(logits, ~excl, 0)
    else:
        col_lse = logits.new_empty(0)
    return row_lse, pos_sum, pos_count, col_lse


def infonce_pair_fwd(q, k, scale, q_labels, k_labels, exclude_offset, neg_lse):
    _, pos, _ = _masks(q, k, q_labels, k_labels, exclude_offset, False)
    _, logits = _logits(q, k, scale)
    arg = neg_lse[:, None] - logits
    zero = torch.zeros_like(logits)
    loss_sum = torch.where(pos, F.softplus(arg), zero).sum(1)
    sigmoid_sum = torch.where(pos, torch.sigmoid(arg), zero).sum(1)
    return loss_sum, sigmoid_sum


def infonce_grad_logits(q, k, scale, q_labels, k_labels, exclude_offset, neg_only,
                        row_lse, row_coef, col_lse, col_coef, pos_coef, pair_lse):
    """The N×M matrix G of docs/fused_core.md, with the logits' dot products."""
    excl, pos, den = _masks(q, k, q_labels, k_labels, exclude_offset, neg_only)
    dot, logits = _logits(q, k, scale)
    grad = torch.zeros_like(logits)
    if row_coef is not None:
        grad = grad + _coef_weighted_softmax(logits, row_lse, row_coef, den, 1)
    if col_coef is not None:
        grad = grad + _coef_weighted_softmax(logits, col_lse, col_coef, ~excl, 0)
    if pos_coef is not None:
        weight = torch.sigmoid(pair_lse[:, None] - logits) if pair_lse is not None else 1.0
        grad = grad + torch.where(pos, pos_coef[:, None] * weight, torch.zeros_like(logits))
    return grad, dot


def infonce_bwd(q, k, scale, q_labels, k_labels, exclude_offset, neg_only,
                row_lse, row_coef, col_lse, col_coef, pos_coef, pair_lse, need_dk):
    grad, dot = infonce_grad_logits(q, k, scale, q_labels, k_labels, exclude_offset, neg_only,
                                    row_lse, row_coef, col_lse, col_coef, pos_coef, pair_lse)
    return _grads_from_logit_grad(q, k, scale, grad, dot, need_dk)


def _grads_from_logit_grad(q, k, scale, grad, dot, need_dk):
    s = scale.to(grad.dtype)
    dq = (s * (grad @ k.to(grad.dtype))).to(q.dtype)
    dk = (s * (grad.T @ q.to(grad.dtype))).to(k.dtype) if need_dk else k.new_empty(0)
    dscale = (grad * dot).sum()
    return dq, dk, dscale


def _siglip_sign(q, k, q_labels, k_labels, acc):
    excl = _excluded(q.shape[0], k.shape[0], None, q.device)
    pos = _positive(q_labels, k_labels, excl)
    return torch.where(pos, 1.0, -1.0).to(acc)


def siglip_fwd(q, k, scale, bias, q_labels, k_labels):
    _, logits = _logits(q, k, scale)
    z = _siglip_sign(q, k, q_labels, k_labels, logits.dtype)
    return -F.logsigmoid(z * (logits + bias.to(logits.dtype))).sum(1)


def siglip_bwd(q, k, scale, bias, q_labels, k_labels, row_coef, need_dk):
    dot, logits = _logits(q, k, scale)
    z = _siglip_sign(q, k, q_labels, k_labels, logits.dtype)
    grad = row_coef[:, None] * (-z) * torch.sigmoid(-z * (logits + bias.to(logits.dtype)))
    dq, dk, dscale = _grads_from_logit_grad(q, k, scale, grad, dot, need_dk)
    return dq, dk, dscale, grad.sum()


# ------------------------------------------------------------ the losses, from the papers


def info_nce(query, key, temperature=0.07, targets=None, queue=None, weights=None,
             normalize=True, reduction="mean", in_batch_negatives=True):
    """InfoNCE (van den Oord et al.): cross-entropy of ``query @ cat(key, queue).T / τ``
    against ``targets`` (default arange). Without ``in_batch_negatives``, MoCo
    (He et al.): each query's logits are its own key's, then the queue's, target 0."""
    acc = stats_dtype(query.dtype)
    q, k = query.to(acc), key.to(acc)
    negs = queue.to(acc).detach() if queue is not None else None
    if normalize:
        q, k = F.normalize(q, dim=1), F.normalize(k, dim=1)
        negs = F.normalize(negs, dim=1) if negs is not None else None
    if targets is None:
        targets = torch.arange(q.shape[0], device=q.device)
    if in_batch_negatives:
        keys = k if negs is None else torch.cat([k, negs])
        logits = q @ keys.T / temperature
    else:
        own = (q * k[targets]).sum(1, keepdim=True)
        logits = torch.cat([own, q @ negs.T], dim=1) / temperature
        targets = torch.zeros_like(targets)
    per_anchor = F.cross_entropy(logits, targets, reduction="none")
    valid = torch.ones_like(per_anchor, dtype=torch.bool)
    return reduce_anchors(per_anchor, valid, weights, reduction)


def nt_xent(z1, z2, temperature=0.5, weights=None, reduction="mean"):
    """NT-Xent (SimCLR, Chen et al. 2020): 2B normalised views, each row's positive
    is its other view, the softmax runs over the 2B-1 other rows."""
    acc = stats_dtype(z1.dtype)
    z = F.normalize(torch.cat([z1, z2]).to(acc), dim=1)
    n = z.shape[0]
    b = n // 2
    logits = (z @ z.T / temperature).masked_fill(torch.eye(n, dtype=torch.bool, device=z.device),
                                                  float("-inf"))
    targets = torch.cat([torch.arange(b, n), torch.arange(0, b)]).to(z.device)
    per_anchor = F.cross_entropy(logits, targets, reduction="none")
    if weights is not None:
        weights = torch.cat([weights, weights])
    return reduce_anchors(per_anchor, None, weights, reduction)


def supcon(features, labels=None, temperature=0.1, base_temperature=None, weights=None,
           reduction="mean"):
    """SupCon (Khosla et al. 2020), SupContrast's ``SupConLoss`` with
    contrast_mode='all'. ``features`` (N, D) or (B, V, D)."""
    base_temperature = temperature if base_temperature is None else base_temperature
    if features.dim() == 3:
        b, v, _ = features.shape
        features = features.transpose(0, 1).reshape(b * v, -1)
        labels = torch.arange(b, device=features.device) if labels is None else labels
        labels = labels.repeat(v)
        weights = weights.repeat(v) if weights is not None else None
    acc = stats_dtype(features.dtype)
    z = F.normalize(features.to(acc), dim=1)
    n = z.shape[0]
    eye = torch.eye(n, dtype=torch.bool, device=z.device)
    logits = (z @ z.T / temperature).masked_fill(eye, float("-inf"))
    log_prob = logits - torch.logsumexp(logits, dim=1, keepdim=True)
    pos = (labels[:, None] == labels[None, :]) & ~eye
    n_pos = pos.sum(1)
    mean_log_prob_pos = torch.where(pos, log_prob, torch.zeros_like(log_prob)).sum(1) / n_pos.clamp_min(1)
    per_anchor = -(temperature / base_temperature) * mean_log_prob_pos
    return reduce_anchors(per_anchor, n_pos > 0, weights, reduction)


def pair_nt_xent(embeddings, labels, temperature=0.07, reduction="mean"):
    """pytorch-metric-learning's NTXentLoss with labels: every positive pair (a, p)
    is the term -log(e^{l_ap} / (e^{l_ap} + sum_{n: y_n != y_a} e^{l_an})),
    averaged over all positive pairs."""
    acc = stats_dtype(embeddings.dtype)
    z = F.normalize(embeddings.to(acc), dim=1)
    n = z.shape[0]
    eye = torch.eye(n, dtype=torch.bool, device=z.device)
    logits = z @ z.T / temperature
    same = labels[:, None] == labels[None, :]
    pos, neg = same & ~eye, ~same
    neg_lse = _masked_lse(logits, neg, 1)
    pair_loss = F.softplus(neg_lse[:, None] - logits)
    if reduction == "none":
        return torch.where(pos, pair_loss, torch.zeros_like(pair_loss)).sum(1)
    total = pair_loss[pos].sum()
    return total if reduction == "sum" else total / pos.sum().clamp_min(1)


def clip_loss(image_features, text_features, logit_scale, reduction="mean"):
    """CLIP (Radford et al. 2021), open_clip's ``ClipLoss``: mean of the two
    cross-entropies of ``logit_scale * image @ text.T`` against arange."""
    acc = stats_dtype(image_features.dtype)
    logits = logit_scale.to(acc) * image_features.to(acc) @ text_features.to(acc).T
    targets = torch.arange(logits.shape[0], device=logits.device)
    per_i = F.cross_entropy(logits, targets, reduction="none")
    per_t = F.cross_entropy(logits.T, targets, reduction="none")
    per_anchor = (per_i + per_t) / 2
    return reduce_anchors(per_anchor, None, None, reduction)


def siglip_loss(image_features, text_features, logit_scale, logit_bias, reduction="mean"):
    """SigLIP (Zhai et al. 2023), open_clip's ``SigLipLoss``:
    -(1/N) sum_ij log sigmoid(z_ij (s <x_i, y_j> + b)), z = +1 on the diagonal."""
    acc = stats_dtype(image_features.dtype)
    logits = logit_scale.to(acc) * image_features.to(acc) @ text_features.to(acc).T
    logits = logits + logit_bias.to(acc)
    n = logits.shape[0]
    z = 2 * torch.eye(n, device=logits.device, dtype=acc) - 1
    per_anchor = -F.logsigmoid(z * logits).sum(1)
    if reduction == "none":
        return per_anchor
    total = per_anchor.sum()
    return total if reduction == "sum" else total / n
