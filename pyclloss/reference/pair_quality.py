"""Plain-PyTorch pair-quality losses: the executable spec.

Each loss here weighs pairs by how informative they are; the weights come
from the batch itself (softmax weights, a temperature network, a class prior,
hard-negative tilting). All are written from their authors' released code
(docs/pair_quality.md gives the formulas and every deviation), dense (they
build the N×N matrices) and differentiated by autograd:

* ``cacr_loss``: contrastive attraction and repulsion (CACR), any number of views
  (defined in ``pyclloss.reference.cacr`` with its kernels' contract);
* ``amcl_loss``: adaptive multi-head contrastive learning (AMCL), pair temperatures
  from a temperature network, top-k hardest negatives;
* ``dcl_loss`` / ``hcl_loss``: debiased (Chuang et al.) and hard-negative
  (Robinson et al.) estimators of the negatives' mass;
* ``decoupled_nt_xent``: decoupled contrastive learning (Yeh et al.), the
  positive left out of the denominator, optionally von Mises-Fisher weighted.

Everything runs in log space in the statistics dtype (float64 for float64
inputs, float32 otherwise): no exponential of a logit is ever formed.
"""

import math
from typing import Optional

import torch
import torch.nn.functional as F

from .._stats import reduce_anchors, stats_dtype
from . import cacr

Tensor = torch.Tensor


# ------------------------------------------------------------------------------ CACR

# The spec of CACR and of its fused kernels lives with them in reference.cacr.
cacr_loss = cacr.cacr_loss


# ------------------------------------------------------------------------------ AMCL


def _net_dtype(net, default: torch.dtype) -> torch.dtype:
    param = next(iter(net.parameters()), None) if hasattr(net, "parameters") else None
    return default if param is None else param.dtype


def _omega(tau: Tensor, dim: int) -> Tensor:
    """The AMCL temperature regulariser Ω(τ) = (D/2)·log τ + 1/τ."""
    return 0.5 * dim * torch.log(tau) + torch.reciprocal(tau)


def _amcl_rows(z: Tensor, temperature_net, tau_min, tau_max, beta, topk) -> Tensor:
    """Per-row AMCL terms (2B,) of one head; z (2B, D) normalised, view-major."""
    n, dim = z.shape
    b = n // 2
    phi = temperature_net(z.to(_net_dtype(temperature_net, z.dtype))).to(z.dtype)
    sim = z @ z.T
    tau = tau_min + (tau_max - tau_min) * torch.sigmoid(-(phi @ phi.T))
    rows = torch.arange(n, device=z.device)
    partner = (rows + b) % n
    tau_pos = tau[rows, partner]
    sim_pos = sim[rows, partner]
    negative = (rows[None, :] != rows[:, None]) & (rows[None, :] != partner[:, None])
    k = min(topk, n - 2)
    idx = sim.masked_fill(~negative, float("-inf")).topk(k, dim=1, sorted=False).indices
    sim_top, tau_top = sim.gather(1, idx), tau.gather(1, idx)
    negatives = (sim_top / tau_top).mean(1)
    reg_neg = (torch.log(tau_top) + torch.reciprocal(tau_top)).sum(1)
    return -sim_pos / tau_pos + negatives + beta * _omega(tau_pos, dim) - beta * reg_neg


def amcl_loss(z1, z2, temperature_net, tau_min=1e-5, tau_max=2.0, beta=0.01, topk=100,
              weights=None, reduction="mean"):
    """AMCL (adaptive multi-head contrastive learning), the authors' ``AMCLNTXentLoss``.

    z1, z2 (B, C, D): C heads, each L2-normalised. Per head and pair,
    ``τ_ij = τ_min + (τ_max − τ_min)·σ(−⟨φ(z_i), φ(z_j)⟩)`` with φ the shared
    ``temperature_net`` on the normalised features. Per head, anchor a with
    positive p (its other view) and the 2B − 2 other rows of both views as
    negatives, K = the min(topk, 2B − 2) negatives of largest s_aj = ⟨z_a, z_j⟩:

        −s_ap/τ_ap + mean_K(s_aj/τ_aj) + β·Ω(τ_ap) − β·Σ_K(log τ_aj + 1/τ_aj),
        Ω(τ) = (D/2)·log τ + 1/τ.

    Sample i's loss is the mean of its two directions (anchor in z1, anchor in
    z2), summed over the heads; ``reduction="none"`` gives these (B,).
    """
    acc = stats_dtype(z1.dtype)
    b = z1.shape[0]
    z = F.normalize(torch.cat([z1, z2]).to(acc), dim=-1)  # (2B, C, D)
    per_row = sum(_amcl_rows(z[:, h], temperature_net, tau_min, tau_max, beta, topk)
                  for h in range(z.shape[1]))
    return reduce_anchors((per_row[:b] + per_row[b:]) / 2, None, weights, reduction)


# --------------------------------------------------------------- SimCLR-pair helpers


def _pair_logits(z1: Tensor, z2: Tensor, temperature):
    """The 2B×2B logits of normalised cat(z1, z2), each row's positive logit, and
    the mask of its 2B − 2 negatives (neither itself nor its other view)."""
    acc = stats_dtype(z1.dtype)
    z = F.normalize(torch.cat([z1, z2]).to(acc), dim=1)
    n = z.shape[0]
    logits = z @ z.T / temperature
    rows = torch.arange(n, device=z.device)
    partner = (rows + n // 2) % n
    negative = (rows[None, :] != rows[:, None]) & (rows[None, :] != partner[:, None])
    return logits, logits[rows, partner], negative


def _negatives_lse(logits: Tensor, negative: Tensor, scale: float = 1.0) -> Tensor:
    return torch.logsumexp((scale * logits).masked_fill(~negative, float("-inf")), dim=1)


def _pair_weights(weights: Optional[Tensor]) -> Optional[Tensor]:
    """Per-sample weights (B,) for the 2B rows (both views)."""
    return None if weights is None else torch.cat([weights, weights])


def debiased_loss(pos: Tensor, log_negatives: Tensor, count: int, temperature, tau_plus):
    """−log(e^pos / (e^pos + Ng)), Ng = max((Σneg − τ⁺·M·e^pos) / (1 − τ⁺), M·e^{−1/t}),
    from log Σneg, in log space. Where the estimate falls below the floor (or
    below zero) the floor holds and the estimate gets no gradient, as the
    authors' clamp."""
    floor = math.log(count) - 1 / temperature
    log_prior = math.log(tau_plus) if tau_plus > 0 else float("-inf")
    # log of τ⁺·M·e^pos / Σneg: the estimate is positive iff this is < 0
    log_ratio = log_prior + math.log(count) + pos - log_negatives
    with torch.no_grad():
        estimate = log_negatives + torch.log1p(-torch.exp(log_ratio.clamp_max(0)))
        above = (log_ratio < 0) & (estimate - math.log1p(-tau_plus) >= floor)
    # the unused branch gets log_ratio = −inf: a finite, zero gradient
    safe_ratio = torch.where(above, log_ratio, torch.full_like(log_ratio, float("-inf")))
    log_ng = torch.where(above, log_negatives + torch.log1p(-torch.exp(safe_ratio))
                         - math.log1p(-tau_plus), floor * torch.ones_like(pos))
    return F.softplus(log_ng - pos)


def dcl_loss(z1, z2, temperature=0.5, tau_plus=0.1, weights=None, reduction="mean"):
    """Debiased contrastive loss (Chuang et al., NeurIPS 2020), ``chingyaoc/DCL``.

    SimCLR pairs on normalised cat(z1, z2): row i has the positive logit
    p_i = ⟨z_i, z_i±B⟩/t and the M = 2B − 2 other rows as negatives;
    ``Ng = max((Σ_j e^{s_ij/t} − τ⁺·M·e^{p_i}) / (1 − τ⁺), M·e^{−1/t})``,
    ``L_i = −log(e^{p_i} / (e^{p_i} + Ng))``. τ⁺ = 0 gives NT-Xent.
    ``reduction="none"`` gives the 2B rows; ``weights`` (B,) apply to both views.
    """
    logits, pos, negative = _pair_logits(z1, z2, temperature)
    count = logits.shape[0] - 2
    per_row = debiased_loss(pos, _negatives_lse(logits, negative), count, temperature,
                             tau_plus)
    return reduce_anchors(per_row, None, _pair_weights(weights), reduction)


def hcl_loss(z1, z2, temperature=0.5, tau_plus=0.1, beta=1.0, weights=None, reduction="mean"):
    """Hard-negative contrastive loss (Robinson et al., ICLR 2021), ``joshr17/HCL``.

    As :func:`dcl_loss` with the negatives tilted towards the hard ones:
    Σ_j e^{s_ij/t} becomes ``Σ_j w_j·e^{s_ij/t}`` with
    ``w_j = e^{β s_ij/t} / mean_j e^{β s_ij/t}``, i.e. in log space
    ``log M + LSE((1+β)·s/t) − LSE(β·s/t)``. β = 0 gives DCL.
    """
    logits, pos, negative = _pair_logits(z1, z2, temperature)
    count = logits.shape[0] - 2
    log_reweighted = (math.log(count) + _negatives_lse(logits, negative, 1 + beta)
                      - _negatives_lse(logits, negative, beta))
    per_row = debiased_loss(pos, log_reweighted, count, temperature, tau_plus)
    return reduce_anchors(per_row, None, _pair_weights(weights), reduction)


# ------------------------------------------------------------------------ decoupled


def von_mises_fisher_weights(z1: Tensor, z2: Tensor, sigma=0.5) -> Tensor:
    """DCLW's positive weights ``w_i = 2 − B·softmax_i(⟨z¹_i, z²_i⟩/σ)`` on the
    normalised views, detached (lightly's ``negative_mises_fisher_weights``)."""
    acc = stats_dtype(z1.dtype)
    a, b = F.normalize(z1.detach().to(acc), dim=1), F.normalize(z2.detach().to(acc), dim=1)
    return 2 - a.shape[0] * torch.softmax((a * b).sum(1) / sigma, dim=0)


def decoupled_nt_xent(z1, z2, temperature=0.1, weight="none", sigma=0.5, weights=None,
                      reduction="mean"):
    """Decoupled contrastive learning (Yeh et al., ECCV 2022), lightly's ``DCLLoss``
    (``weight="none"``) and ``DCLWLoss`` (``weight="vmf"``).

    NT-Xent without the positive in the denominator: row i of normalised
    cat(z1, z2), ``L_i = −w_i·p_i + LSE_{j ∉ {i, i±B}} s_ij/t``, with w = 1 or the
    von Mises-Fisher weights (:func:`von_mises_fisher_weights`, the same for
    both views). ``reduction="none"`` gives the 2B rows.
    """
    if weight not in ("none", "vmf"):
        raise ValueError(f"weight must be 'none' or 'vmf', got {weight!r}")
    logits, pos, negative = _pair_logits(z1, z2, temperature)
    if weight == "vmf":
        pos = pos * _pair_weights(von_mises_fisher_weights(z1, z2, sigma))
    per_row = -pos + _negatives_lse(logits, negative)
    return reduce_anchors(per_row, None, _pair_weights(weights), reduction)
