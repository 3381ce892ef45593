"""Statistics helpers every family shares: the dtype the kernels accumulate
and keep statistics in, and the reduction of per-anchor losses."""

from typing import Optional

import torch

Tensor = torch.Tensor


def stats_dtype(dtype: torch.dtype) -> torch.dtype:
    """Accumulation / statistics dtype of the kernels for an input dtype."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def reduce_anchors(per_anchor: Tensor, valid: Optional[Tensor], weights: Optional[Tensor],
                   reduction: str) -> Tensor:
    """Mean (weighted by ``weights``) or sum over valid anchors; invalid anchors
    (``valid`` False) give 0 and are left out of the mean."""
    if valid is not None:
        per_anchor = torch.where(valid, per_anchor, torch.zeros_like(per_anchor))
    if reduction == "none":
        return per_anchor
    w = torch.ones_like(per_anchor) if valid is None else valid.to(per_anchor.dtype)
    if weights is not None:
        w = w * weights.to(per_anchor.dtype)
    total = (w * per_anchor).sum()
    if reduction == "sum":
        return total
    return total / w.sum().clamp_min(torch.finfo(per_anchor.dtype).tiny)
