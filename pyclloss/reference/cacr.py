"""Plain-PyTorch CACR (contrastive attraction and repulsion, Zheng et al.,
NeurIPS 2021): the spec of the loss and of the fused kernels' contract.

Kernels (the contract of ``pyclloss.ops.cacr``), for anchors a (n, D) and the
other view's rows b (m, D), anchor i paired with row ``i + offset`` of b
(itself in the other view, left out of its softmax):

* ``cacr_repulsion_fwd(a, b, τ, offset) -> (mean, lse)``:
  ``d_ij = ‖a_i − b_j‖²``, ``mean_i = Σ_{j ≠ i+offset} softmax_j(−τ·d_ij)·d_ij``
  and ``lse_i = LSE_{j ≠ i+offset}(−τ·d_ij)``, both (n,);
* ``cacr_repulsion_bwd(a, b, mean, lse, grad, τ, offset) -> (grad_a, grad_b)``:
  the gradient of ``Σ_i grad_i·mean_i`` (through the softmax weights too).

Here they are dense (n×m matrices); the loss is differentiated by autograd, the
backward kernel is the same derivative written out (a kernel runs without
autograd).
"""

import torch
import torch.nn.functional as F

from .._stats import reduce_anchors, stats_dtype

Tensor = torch.Tensor


def squared_distances(a: Tensor, b: Tensor) -> Tensor:
    """‖a_i − b_j‖² from the differences themselves (exact for near rows, where
    |a|² + |b|² − 2a·b cancels)."""
    return torch.cdist(a, b, compute_mode="donot_use_mm_for_euclid_dist").square()


def _others_mask(n: int, m: int, offset: int, device) -> Tensor:
    """(n, m): True where row j of the others is a negative of anchor i (j ≠ i + offset)."""
    rows = torch.arange(n, device=device)
    return torch.arange(m, device=device)[None, :] != (rows + offset)[:, None]


def _repulsion_stats(a: Tensor, b: Tensor, temperature, offset: int):
    d = squared_distances(a, b)
    other = _others_mask(a.shape[0], b.shape[0], offset, a.device)
    logits = (-temperature * d).masked_fill(~other, float("-inf"))
    weights = torch.softmax(logits, dim=1)
    mean = torch.where(other, weights * d, torch.zeros_like(d)).sum(1)
    return mean, torch.logsumexp(logits, dim=1)


def cacr_repulsion_fwd(a: Tensor, b: Tensor, temperature: float, offset: int):
    return _repulsion_stats(a, b, temperature, offset)


def repulsion_coefficients(a: Tensor, b: Tensor, mean: Tensor, lse: Tensor, grad: Tensor,
                           temperature: float, offset: int) -> Tensor:
    """(n, m): G_ij = g_i·w_ij·(1 − τ·(d_ij − mean_i)) = ∂(Σ_i g_i·mean_i)/∂d_ij,
    0 where j is not a negative of anchor i."""
    d = squared_distances(a, b)
    other = _others_mask(a.shape[0], b.shape[0], offset, a.device)
    w = torch.exp((-temperature * d - lse[:, None]).masked_fill(~other, float("-inf")))
    return grad[:, None] * w * (1 - temperature * (d - mean[:, None]))


def cacr_repulsion_bwd(a: Tensor, b: Tensor, mean: Tensor, lse: Tensor, grad: Tensor,
                       temperature: float, offset: int):
    """Written out (a custom op's kernel runs without autograd): with G of
    repulsion_coefficients, ∂d_ij/∂a_i = 2(a_i − b_j) = −∂d_ij/∂b_j."""
    g = repulsion_coefficients(a, b, mean, lse, grad, temperature, offset)
    return 2 * (g.sum(1)[:, None] * a - g @ b), 2 * (g.sum(0)[:, None] * b - g.T @ a)


def attraction(z, temperature) -> Tensor:
    """(B,): for views z (V of them, (B, D) each: a list or a (V, B, D) tensor),
    Σ_{y≠x} softmax_y(τ⁺·c_xy)·c_xy with c_xy = ‖z^x_i − z^y_i‖², averaged over x.
    O(V²·B·D) work, (B, D) temporaries: no kernel needed."""
    views = len(z)
    pair_cost = {(x, y): (z[x] - z[y]).square().sum(-1) for x, y in view_pairs(views)}
    zero = torch.zeros_like(pair_cost[0, 1])
    cost = torch.stack([torch.stack([zero if x == y else pair_cost[min(x, y), max(x, y)]
                                     for y in range(views)]) for x in range(views)])  # (V, V, B)
    other = ~torch.eye(views, dtype=torch.bool, device=cost.device)[:, :, None]
    logits = (temperature * cost).masked_fill(~other, float("-inf"))
    weights = torch.softmax(logits, dim=1)
    return torch.where(other, weights * cost, torch.zeros_like(cost)).sum(1).mean(0)


def view_pairs(views: int):
    """The repulsion's view pairs (x, y), x < y: anchors in the earlier view."""
    return [(x, y) for x in range(views) for y in range(x + 1, views)]


def cacr_loss(z1, z2, *more_views, attraction_temperature=1.0, repulsion_temperature=1.0,
              alpha=1.0, beta=1.0, normalize=True, weights=None, reduction="mean"):
    """CACR (Zheng et al., NeurIPS 2021), the authors' ``our_loss1 + our_loss2``.

    Views z¹…z^V (B, D), V ≥ 2, L2-normalised first unless ``normalize=False``
    (the authors' encoder ends in an L2 normalisation; their loss itself does
    not normalise). Per sample i:

    * attraction: α · mean_x Σ_{y≠x} softmax_y(τ⁺·c_xy,i)·c_xy,i, c = ‖z^x_i − z^y_i‖²
      (the farther positive weighs more);
    * repulsion: −β · mean_{x<y} Σ_{j≠i} softmax_j(−τ⁻·d_ij)·d_ij, d = ‖z^x_i − z^y_j‖²
      (anchors of view x against the other samples of each later view y; the
      nearer negative weighs more).

    The temperatures multiply the costs, as in the authors' code. The softmax
    weights are not detached. ``reduction="none"`` gives the (B,) per-sample
    losses; ``weights`` (B,) weigh them.
    """
    acc = stats_dtype(z1.dtype)
    z = torch.stack([z1, z2, *more_views]).to(acc)  # (V, B, D)
    if normalize:
        z = F.normalize(z, dim=-1)
    pairs = view_pairs(z.shape[0])
    repulsion = torch.stack([_repulsion_stats(z[x], z[y], repulsion_temperature, 0)[0]
                             for x, y in pairs]).mean(0)
    per_sample = alpha * attraction(z, attraction_temperature) - beta * repulsion
    return reduce_anchors(per_sample, None, weights, reduction)
