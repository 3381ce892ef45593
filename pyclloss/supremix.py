"""SupReMix (Wu et al., "Mixup Your Own Pairs"): supervised contrastive
regression with mixed embeddings, as a function and as a module that draws
the mixing coefficients."""

import torch
from torch import nn

from . import _checks
from ._stats import reduce_anchors, stats_dtype
from .backends import resolve
from .ops import supremix as ops
from .ops.unit_rows import unit_rows
from .reference import supremix as reference

Tensor = torch.Tensor


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
    t = _checks.real_labels("t", t, n, device, dt)
    lam = _checks.float_tensor("lam_neg", lam_neg, (n, n), device).detach().to(dt).contiguous()
    _checks.require((lam >= 0) & (lam <= 1), "lam_neg must lie in [0, 1]")
    reduction = _checks.reduction(reduction)
    tau = _checks.temperature("temperature", temperature, device, dt)
    tau_b = _checks.temperature("base_temperature", base_temperature, device, dt)
    gap = _checks.fixed_positive("gap", gap)
    backend = resolve(backend, device, ops.KERNELS.backends)
    if backend == "reference":
        return reference.supremix_loss(z, t, lam, tau, tau_b, gap, reduction)
    lse, pos_sum, pos_count, _ = ops.supremix(unit_rows([z], backend), t, lam, 1 / tau, gap,
                                              backend)
    per_anchor = (tau / tau_b) * (lse - pos_sum / pos_count.clamp_min(1))
    return reduce_anchors(per_anchor, pos_count > 0, None, reduction)


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
        _checks.features("z", z, min_rows=2)
        a, b = (torch.tensor(float(c), device=z.device) for c in self.beta)
        lam = torch.distributions.Beta(a, b).sample((z.shape[0], z.shape[0]))
        return supremix_loss(z, t, lam, self.temperature, self.base_temperature, self.gap,
                             reduction=self.reduction, backend=self.backend)
