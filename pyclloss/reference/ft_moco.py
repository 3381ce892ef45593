"""Plain-PyTorch feature-transformation MoCo loss: the executable spec.

"Improving Contrastive Learning by Visualizing Feature Transformation" (Zhu et
al., ICCV 2021), the configuration of the authors' released training script:

* positive extrapolation, ``q̂ = λ_p·q + (1−λ_p)·k``, ``k̂ = λ_p·k + (1−λ_p)·q``
  with the key detached *before* mixing, so q gets a gradient through both q̂
  and k̂ (λ_p = 1 + Beta(2, 2), one scalar per step);
* negative interpolation of the (detached) queue,
  ``Q̂_j = λ_n·Q_j + (1−λ_n)·Q_π(j)`` (λ_n ~ Beta(1.6, 1.6), one scalar per
  step, π a random permutation);
* no re-normalisation after mixing (the code's ``postmix_norm`` is off; when
  on, it normalises q̂ and k̂ only, never the queue);
* logits ``[q̂·k̂, q̂·Q̂ᵀ] / τ``, cross-entropy with label 0.

Two layers, both dense:

* ``ft_moco_loss``, straight from the formulas above (builds Q̂ and the N×K
  logits), differentiated by autograd;
* the kernels of ``pyclloss.ops.ft_moco`` with the semantics the fused
  backends follow: ``ft_moco_interpolate_queue`` (Q̂ from per-row weights)
  and the negatives' log-sum-exp ``ft_moco_neg_lse`` with its backward.
"""

import torch
import torch.nn.functional as F

from .._stats import reduce_anchors, stats_dtype

Tensor = torch.Tensor


def _per_row(lam: Tensor) -> Tensor:
    """A mixing coefficient of shape (), (R,) or (R, D) as a factor of (R, D) rows."""
    return lam[:, None] if lam.dim() == 1 else lam


def extrapolate_pair(q: Tensor, k: Tensor, lam_pos: Tensor):
    """Positive extrapolation (q̂, k̂); λ_p of shape (), (N,) or (N, D)."""
    lam = _per_row(lam_pos.to(q.dtype))
    return lam * q + (1 - lam) * k, lam * k + (1 - lam) * q


# ------------------------------------------------------------------- the kernels
# The queue interpolation with per-row weights, Q̂_j = a_j·Q_j + b_j·Q_π(j):
# a = λ_n, b = 1 − λ_n, each over its row's norm when the queue is normalised.


def ft_moco_interpolate_queue(queue, own_weight, partner_weight, perm):
    """Q̂ (K×D) in the statistics dtype."""
    rows = queue.to(own_weight.dtype)
    return own_weight[:, None] * rows + partner_weight[:, None] * rows[perm]


def ft_moco_neg_lse(q_hat, queue, own_weight, partner_weight, perm, scale):
    """neg_lse_i = LSE_j s·<q̂_i, Q̂_j> (N,), in the statistics dtype."""
    mixed = ft_moco_interpolate_queue(queue, own_weight, partner_weight, perm)
    return torch.logsumexp(scale * (q_hat.to(mixed.dtype) @ mixed.T), dim=1)


def ft_moco_neg_lse_bwd(q_hat, queue, own_weight, partner_weight, perm, scale, neg_lse, grad):
    """dq̂ and dscale of sum_i grad_i·neg_lse_i (the queue gets no gradient)."""
    mixed = ft_moco_interpolate_queue(queue, own_weight, partner_weight, perm)
    dot = q_hat.to(mixed.dtype) @ mixed.T
    grad_logits = grad[:, None] * torch.exp(scale * dot - neg_lse[:, None])
    return (scale * (grad_logits @ mixed)).to(q_hat.dtype), (grad_logits * dot).sum()


# --------------------------------------------------------------------- the loss


def ft_moco_loss(q, k, queue, lam_pos, lam_neg, perm, temperature=0.2, normalize=True,
                 normalize_mixed=False, reduction="mean"):
    """Feature-transformation MoCo loss (Zhu et al., ICCV 2021), see the module doc."""
    acc = stats_dtype(q.dtype)
    q, k, negs = q.to(acc), k.detach().to(acc), queue.detach().to(acc)
    if normalize:
        q, k, negs = (F.normalize(x, dim=1) for x in (q, k, negs))
    q_hat, k_hat = extrapolate_pair(q, k, lam_pos)
    if normalize_mixed:
        q_hat, k_hat = F.normalize(q_hat, dim=1), F.normalize(k_hat, dim=1)
    lam = _per_row(lam_neg.to(acc))
    negs_hat = lam * negs + (1 - lam) * negs[perm]
    logits = torch.cat([(q_hat * k_hat).sum(1, keepdim=True), q_hat @ negs_hat.T], dim=1)
    targets = torch.zeros(q.shape[0], dtype=torch.long, device=q.device)
    per_anchor = F.cross_entropy(logits / temperature, targets, reduction="none")
    return reduce_anchors(per_anchor, None, None, reduction)
