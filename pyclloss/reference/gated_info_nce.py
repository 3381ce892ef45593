"""Plain-PyTorch gated-subspace loss (Hydra / SimLAP, Wu et al., "Rethinking
Positive Pairs in Contrastive Learning"): the executable spec.

Two layers, both dense:

* the three kernels of the fused op family (``gated_fwd``,
  ``gated_pair_fwd``, ``gated_bwd``) with the semantics of
  docs/gated_info_nce.md, written from the B×N×K gated tensor. This is the
  ground truth of every kernel test;
* the loss itself, :func:`gated_info_nce`, straight from the paper's formula
  and differentiated by autograd: ``backend="reference"`` runs it.

The norm clamp is ``F.normalize``'s: a gated vector x is divided by
``max(‖x‖, EPS)``, so a gated norm at or below EPS contributes the unnormalised
vector (scaled by 1/EPS) and no gradient through its norm.
"""

import torch
import torch.nn.functional as F

from .._stats import stats_dtype

Tensor = torch.Tensor

EPS = 1e-12  # F.normalize's default; every backend clamps gated norms to it


def _gated_logits(q, k, gates, scale):
    """s·<q_b⊙g_b, k_n⊙g_b> / (max(‖q_b⊙g_b‖, EPS)·max(‖k_n⊙g_b‖, EPS)), via
    the B×N×K tensor of gated keys."""
    acc = stats_dtype(q.dtype)
    q, k, gates = q.to(acc), k.to(acc), gates.to(acc)
    gated_q = F.normalize(q * gates, dim=1, eps=EPS)
    gated_k = F.normalize(k[None, :, :] * gates[:, None, :], dim=2, eps=EPS)
    return scale.to(acc) * torch.einsum("bd,bnd->bn", gated_q, gated_k)


def _masks(labels, partner_labels, key_labels):
    """Positives P_bn = [partner_b == y_n]; excluded X_bn = [labels_b == y_n] or P_bn."""
    pos = partner_labels[:, None] == key_labels[None, :]
    excluded = (labels[:, None] == key_labels[None, :]) | pos
    return pos, excluded


def _negative_lse(logits, excluded):
    """LSE over the non-excluded keys of each row; exactly -inf (and no
    gradient) for a row without negatives."""
    has_neg = (~excluded).any(1, keepdim=True)
    lse = torch.logsumexp(logits.masked_fill(excluded & has_neg, float("-inf")), dim=1)
    return torch.where(has_neg[:, 0], lse, torch.full_like(lse, float("-inf")))


# ------------------------------------------------------------------- the kernels


def gated_fwd(q, k, gates, scale, labels, partner_labels, key_labels):
    logits = _gated_logits(q, k, gates, scale)
    pos, excluded = _masks(labels, partner_labels, key_labels)
    return _negative_lse(logits, excluded), pos.sum(1).to(logits.dtype)


def _pair_terms(logits, pos, neg_lse):
    margin = neg_lse[:, None] - logits
    zero = torch.zeros_like(logits)
    return (torch.where(pos, F.softplus(margin), zero).sum(1),
            torch.where(pos, torch.sigmoid(margin), zero).sum(1))


def gated_pair_fwd(q, k, gates, scale, labels, partner_labels, key_labels, neg_lse):
    logits = _gated_logits(q, k, gates, scale)
    pos, _ = _masks(labels, partner_labels, key_labels)
    return _pair_terms(logits, pos, neg_lse)


def gated_logit_grad(logits, pos, excluded, neg_lse, neg_coef, pos_coef):
    """G_bn = neg_coef_b·exp(l_bn − neg_lse_b)·[n ∉ X_b]
    + pos_coef_b·sigmoid(neg_lse_b − l_bn)·P_bn, exactly 0 where a coefficient is 0."""
    lse = neg_lse[:, None]
    negative = ~excluded & (neg_coef[:, None] != 0)
    prob = torch.exp(torch.where(negative, logits - lse, torch.zeros_like(logits)))
    grad = torch.where(negative, neg_coef[:, None] * prob, torch.zeros_like(logits))
    positive = pos & (pos_coef[:, None] != 0)
    weight = torch.sigmoid(torch.where(positive, lse - logits, torch.zeros_like(logits)))
    return grad + torch.where(positive, pos_coef[:, None] * weight, torch.zeros_like(logits))


def _normalize_backward(x, grad_unit):
    """Gradient through x / max(‖x‖, EPS) (last dim): the norm passes a gradient
    only where it is above EPS."""
    norm = x.norm(dim=-1, keepdim=True)
    clamped = norm.clamp_min(EPS)
    unit = x / clamped
    radial = unit * (unit * grad_unit).sum(-1, keepdim=True) * (norm > EPS)
    return (grad_unit - radial) / clamped


def gated_bwd(q, k, gates, scale, labels, partner_labels, key_labels, neg_lse, neg_coef,
              pos_coef, need_dk):
    """dq, dk, dgates, dscale of sum_bn G_bn·l_bn (G from gated_logit_grad), by the
    chain rule through the B×N×K gated keys (no autograd: the kernels' contract
    holds inside custom ops too)."""
    acc = stats_dtype(q.dtype)
    q_, k_, g_, s = q.to(acc), k.to(acc), gates.to(acc), scale.to(acc)
    gated_q = q_ * g_
    gated_k = k_[None, :, :] * g_[:, None, :]
    unit_q = F.normalize(gated_q, dim=1, eps=EPS)
    unit_k = F.normalize(gated_k, dim=2, eps=EPS)
    logits = s * torch.einsum("bd,bnd->bn", unit_q, unit_k)
    pos, excluded = _masks(labels, partner_labels, key_labels)
    grad = gated_logit_grad(logits, pos, excluded, neg_lse, neg_coef, pos_coef)
    d_gated_q = _normalize_backward(gated_q, s * torch.einsum("bn,bnd->bd", grad, unit_k))
    d_gated_k = _normalize_backward(gated_k, s * grad[:, :, None] * unit_q[:, None, :])
    dgates = d_gated_q * q_ + torch.einsum("bnd,nd->bd", d_gated_k, k_)
    dk = torch.einsum("bnd,bd->nd", d_gated_k, g_).to(k.dtype) if need_dk else k.new_empty(0)
    dscale = (grad * logits).sum() / s
    return (d_gated_q * g_).to(q.dtype), dk, dgates.to(gates.dtype), dscale


# --------------------------------------------------------------- the loss, from the paper


def gated_info_nce(q, k, gates, labels, partner_labels, key_labels, temperature=0.2,
                   reduction="mean"):
    """The Hydra/SimLAP gated pairwise multi-positive loss:
    ``L = Σ_bn P_bn·softplus(NEG_b − l_bn) / Σ P`` with ``NEG_b = LSE_{n ∉ X_b} l_bn``.
    Rows without positives add 0; a batch without positive pairs gives 0."""
    scale = 1 / torch.as_tensor(temperature, dtype=stats_dtype(q.dtype), device=q.device)
    logits = _gated_logits(q, k, gates, scale)
    pos, excluded = _masks(labels, partner_labels, key_labels)
    loss_sum, _ = _pair_terms(logits, pos, _negative_lse(logits, excluded))
    if reduction == "none":
        return loss_sum
    total = loss_sum.sum()
    return total if reduction == "sum" else total / pos.sum().clamp_min(1)
