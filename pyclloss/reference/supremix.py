"""Plain-PyTorch SupReMix (contrastive regression with mixed pairs): the spec.

For anchor i of n L2-normalised embeddings z with real-valued labels t
(Wu et al., "Mixup Your Own Pairs"; docs/losses.md):

* mix-neg, for every k with t_k ≠ t_i: ``m = λ_ik·z_i + (1−λ_ik)·z_k`` with
  label ``λ_ik·t_i + (1−λ_ik)·t_k`` (a negative);
* mix-pos, for every pair (j, k) with t_j < t_i < t_k, t_i − t_j < gap and
  t_k − t_i < gap: ``m = α·z_j + (1−α)·z_k``, α = (t_k − t_i)/(t_k − t_j),
  label t_i (a positive).

Mixtures are detached and not renormalised; their logits are ``<z_i, m>/τ``.
P_i = same-label real samples ∪ mix-pos; A_i = real samples j ≠ i ∪ every
mixture of i; every denominator term is weighted by ``w = |t_i − t_c| + 1``::

    L_i = −(τ/τ_b)·(1/|P_i|)·Σ_{p∈P_i} [l_ip − log Σ_{c∈A_i} w_ic·exp(l_ic)]

Anchors without a positive give 0 and are left out of the mean.

The mix-pos logits are built as ``α·<z_i, z_j'> + (1−α)·<z_i, z_k'>`` (z' the
detached embeddings): the same numbers as materialising the n×n×n×D mixture
tensor of the authors' code, with n×n×n memory so that the reference still
runs at benchmark sizes.
"""

import torch
import torch.nn.functional as F

from .._stats import reduce_anchors, stats_dtype

Tensor = torch.Tensor


def distance_weight(t_anchor: Tensor, t_other: Tensor) -> Tensor:
    """SupReMix's distance magnifier of a denominator term: |t_i − t_c| + 1."""
    return (t_anchor - t_other).abs() + 1


def mix_pos_alpha(t: Tensor, gap: float) -> tuple[Tensor, Tensor]:
    """(members, α) of the mix-pos pairs, both (n, n, n) indexed (i, j, k)."""
    ti, tj, tk = t[:, None, None], t[None, :, None], t[None, None, :]
    members = (tj < ti) & (ti < tk) & (ti - tj < gap) & (tk - ti < gap)
    span = torch.where(members, tk - tj, torch.ones_like(tk - tj))  # no 0/0 off the pairs
    return members, torch.where(members, (tk - ti) / span, torch.zeros_like(span))


def supremix_loss(z: Tensor, t: Tensor, lam_neg: Tensor, temperature=0.5, base_temperature=0.5,
                  gap: float = 5.0, reduction: str = "mean") -> Tensor:
    """SupReMix loss from the formulas above; z (n, D) is normalised here,
    t (n,) labels, lam_neg (n, n) the λ of every mix-neg pair (i, k); the
    temperatures floats or 0-dim tensors."""
    acc = stats_dtype(z.dtype)
    z = F.normalize(z.to(acc), dim=1)
    t, lam = t.to(acc), lam_neg.to(acc)
    n = z.shape[0]
    zd = z.detach()
    not_self = ~torch.eye(n, dtype=torch.bool, device=z.device)
    ti, tc = t[:, None], t[None, :]

    # Real samples c ≠ i.
    real_logits = z @ z.T / temperature
    real_weight = distance_weight(ti, tc)
    real_pos = (ti == tc) & not_self

    # mix-neg: the mixture m_ik itself, (n, n, D).
    mix_neg = lam[:, :, None] * zd[:, None, :] + (1 - lam)[:, :, None] * zd[None, :, :]
    neg_logits = (z[:, None, :] * mix_neg).sum(-1) / temperature
    neg_members = ti != tc
    neg_weight = distance_weight(ti, lam * ti + (1 - lam) * tc)

    # mix-pos: (n, n, n) logits through the linearity of the inner product.
    pos_members, alpha = mix_pos_alpha(t, gap)
    anchor_dot = z @ zd.T
    pos_logits = (alpha * anchor_dot[:, :, None] + (1 - alpha) * anchor_dot[:, None, :]) / temperature

    logits = torch.cat([real_logits, neg_logits, pos_logits.reshape(n, -1)], dim=1)
    log_weight = torch.cat([real_weight, neg_weight, torch.ones_like(pos_logits.reshape(n, -1))],
                           dim=1).log()
    members = torch.cat([not_self, neg_members, pos_members.reshape(n, -1)], dim=1)
    positives = torch.cat([real_pos, torch.zeros_like(neg_members), pos_members.reshape(n, -1)],
                          dim=1)

    minus_inf = torch.full_like(logits, float("-inf"))
    lse = torch.logsumexp(torch.where(members, logits + log_weight, minus_inf), dim=1)
    pos_count = positives.sum(1)
    pos_sum = torch.where(positives, logits, torch.zeros_like(logits)).sum(1)
    valid = pos_count > 0
    per_anchor = (temperature / base_temperature) * (lse - pos_sum / pos_count.clamp_min(1))
    return reduce_anchors(per_anchor, valid, None, reduction)
