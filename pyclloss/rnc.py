"""Rank-N-Contrast (Zha et al., NeurIPS 2023): contrastive regression by the
ranks of label distances, as a function and as a module."""

import torch
from torch import nn

from . import _checks
from ._stats import reduce_anchors, stats_dtype
from .backends import resolve
from .ops import rnc as ops
from .reference import rnc as reference

Tensor = torch.Tensor


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
    labels = _checks.real_labels("labels", labels, features.shape[0], device, dt, multi_dim=True)
    if features.dim() == 3:
        views = features.shape[1]
        features = features.transpose(0, 1).reshape(-1, features.shape[2])
        labels = labels.repeat(views, *([1] * (labels.dim() - 1)))
    n = features.shape[0]
    if n < 2:
        raise ValueError(f"features needs at least 2 samples in all, got {n}")
    reduction = _checks.reduction(reduction)
    tau = _checks.temperature("temperature", temperature, device, dt)
    backend = resolve(backend, device, ops.KERNELS.backends)
    if backend == "reference":
        return reference.rnc_loss(features, labels, tau, reduction)
    sim = -ops.rnc_distances(features.to(dt), backend) / tau
    rows = ops.rnc_rows(sim, reference.label_distance(labels), backend)
    return reduce_anchors(rows / (n - 1), None, None, reduction)


class RnCLoss(nn.Module):
    """Rank-N-Contrast; ``forward(features, labels)`` with features (n, D) or
    (B, V, D). See :func:`pyclloss.rnc_loss`."""

    def __init__(self, temperature: float = 2.0, reduction: str = "mean", backend: str = "auto"):
        super().__init__()
        self.temperature, self.reduction, self.backend = temperature, reduction, backend

    def forward(self, features: Tensor, labels: Tensor) -> Tensor:
        return rnc_loss(features, labels, self.temperature, reduction=self.reduction,
                        backend=self.backend)
