"""Plain-PyTorch Rank-N-Contrast (Zha et al., NeurIPS 2023): the spec.

For n features v with labels y (n,) or (n, L)::

    s_ij = −‖v_i − v_j‖₂ / τ            d_ij = ‖y_i − y_j‖₁ (sum over label dims)
    L = −1/(n(n−1)) · Σ_i Σ_{j≠i} [s_ij − log Σ_{k≠i, d_ik ≥ d_ij} exp(s_ik)]

as the authors' ``RnCLoss`` (features (B, 2, D) are the two views, stacked
view-major, labels repeated). Ties count: every k with d_ik = d_ij is in the
denominator of (i, j), j itself included.

The O(n³) mask form here runs over blocks of anchors, each recomputed in the
backward (activation checkpointing), so that memory stays O(block·n²).
"""

import torch
from torch.utils.checkpoint import checkpoint

from .._stats import reduce_anchors, stats_dtype

Tensor = torch.Tensor

# Elements of one block's (anchors, j, k) tensors (the mask, the masked
# similarities and their exponentials).
_BLOCK_ELEMENTS = 1 << 23


def label_distance(labels: Tensor) -> Tensor:
    """d_ij = Σ_l |y_il − y_jl| (n, n); labels (n,) or (n, L)."""
    y = labels.reshape(labels.shape[0], -1)
    return (y[:, None, :] - y[None, :, :]).abs().sum(-1)


def _anchor_block(s: Tensor, d: Tensor, rows: Tensor) -> Tensor:
    """Σ_{j≠i} [log Σ_{k≠i, d_ik ≥ d_ij} exp(s_ik) − s_ij] for the anchors ``rows``.

    Each denominator is its own log-sum-exp: one shift per anchor row (the
    authors' form) underflows to log 0 when a pair's whole set lies far below
    the row's maximum (small τ, or clusters far apart)."""
    n = s.shape[1]
    s_rows, d_rows = s[rows], d[rows]
    others = torch.arange(n, device=s.device)[None, :] != rows[:, None]  # (b, n)
    # in_set[b, j, k]: k is in the denominator of the pair (anchor, j); never
    # empty, as it holds every k ≠ i with d_ik ≥ d_ij, j itself included.
    in_set = (d_rows[:, None, :] >= d_rows[:, :, None]) & others[:, None, :]
    log_den = torch.logsumexp(s_rows[:, None, :].masked_fill(~in_set, float("-inf")), dim=2)
    terms = torch.where(others, log_den - s_rows, torch.zeros_like(s_rows))
    return terms.sum(1)


def rnc_loss(features: Tensor, labels: Tensor, temperature=2.0,
             reduction: str = "mean") -> Tensor:
    """RnC from the formula above; features (n, D), labels (n,) or (n, L);
    temperature a float or a 0-dim tensor.

    ``reduction="none"`` gives each anchor's mean over j ≠ i (n,); "mean"
    averages those (the authors' loss), "sum" adds them.
    """
    acc = stats_dtype(features.dtype)
    v = features.to(acc)
    n = v.shape[0]
    s = -torch.cdist(v, v, compute_mode="donot_use_mm_for_euclid_dist") / temperature
    d = label_distance(labels.to(acc))
    block = max(1, _BLOCK_ELEMENTS // (n * n))
    blocks = []
    for start in range(0, n, block):
        rows = torch.arange(start, min(start + block, n), device=v.device)
        blocks.append(checkpoint(_anchor_block, s, d, rows, use_reentrant=False))
    per_anchor = torch.cat(blocks) / (n - 1)
    return reduce_anchors(per_anchor, None, None, reduction)
