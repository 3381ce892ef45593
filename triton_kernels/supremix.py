"""Triton kernels of SupReMix (semantics of pyclloss.reference.supremix; the
kernel contract of pyclloss.ops.supremix).

One program per anchor i reads row i of the Gram matrix G. Real and mix-neg
columns are 1-D blocks of that row; the mix-pos pairs are (j-block × k-block)
tiles masked by "j is a lower, k an upper neighbour within the gap", with
α = (t_k − t_i)/(t_k − t_j) and logit (α·G_ij + (1−α)·G_ik)/τ built in the
tile. Nothing n×n×n is stored.

Forward: the shift is the largest real (c ≠ i) or mix-neg logit, which bounds
every mix-pos logit (a convex combination of real ones); then one pass sums
(and sums the logits weighted by their terms: the mean logit, for the
temperature's gradient).
Backward: for a block of columns c, the coefficient R_ic of the real pair,
the mix-neg part of A_ic, and the mix-pos parts of A_ic: Σ_k coef·α over the
tiles where c is the lower side, Σ_j coef·(1−α) where c is the upper side.
Each block of A is stored once (no read-modify-write); the anchor's own entry
A_ii (from the mix-negs) comes back as a separate vector.
"""

import torch
import triton
import triton.language as tl

Tensor = torch.Tensor


def _block(n: int) -> int:
    return max(16, min(64, triton.next_power_of_2(n)))


@triton.jit
def _mix_pos_tile(t_ptr, g_row_ptr, ti, j, k, n, inv_tau, gap):
    """(pair mask, α, logit) of the mix-pos pairs (j, k) of one anchor; off the
    pairs α = 0 and logit = -inf (exp gives 0)."""
    tj = tl.load(t_ptr + j, mask=j < n, other=0.0)
    tk = tl.load(t_ptr + k, mask=k < n, other=0.0)
    gj = tl.load(g_row_ptr + j, mask=j < n, other=0.0)
    gk = tl.load(g_row_ptr + k, mask=k < n, other=0.0)
    lower = (j < n) & (tj < ti) & (ti - tj < gap)
    upper = (k < n) & (tk > ti) & (tk - ti < gap)
    pair = lower[:, None] & upper[None, :]
    span = tl.where(pair, tk[None, :] - tj[:, None], 1.0)
    alpha = tl.where(pair, (tk[None, :] - ti) / span, 0.0)
    logit = (alpha * gj[:, None] + (1.0 - alpha) * gk[None, :]) * inv_tau
    return pair, alpha, tl.where(pair, logit, float("-inf"))


@triton.jit
def _columns(g_row_ptr, t_ptr, lam_row_ptr, i, c, n, ti, g_self, inv_tau):
    """Masks (real, positive), logits, weights and λ of the columns c."""
    valid = c < n
    g = tl.load(g_row_ptr + c, mask=valid, other=0.0)
    tc = tl.load(t_ptr + c, mask=valid, other=0.0)
    lam = tl.load(lam_row_ptr + c, mask=valid, other=0.0)
    real = valid & (c != i)
    neg = valid & (tc != ti)
    # -inf off the columns: exp gives 0 there
    real_logit = tl.where(real, g * inv_tau, float("-inf"))
    neg_logit = tl.where(neg, (lam * g_self + (1.0 - lam) * g) * inv_tau, float("-inf"))
    real_weight = tl.abs(ti - tc) + 1.0
    neg_weight = (1.0 - lam) * tl.abs(ti - tc) + 1.0
    return real, real & (tc == ti), real_logit, neg_logit, real_weight, neg_weight, lam


@triton.jit
def _anchor(g_ptr, t_ptr, lam_ptr, scale_ptr, n):
    """This program's anchor i: its rows of G and λ, t_i, G_ii and 1/τ."""
    i = tl.program_id(0)
    g_row_ptr = g_ptr + i * n
    ti = tl.load(t_ptr + i)
    return i, g_row_ptr, lam_ptr + i * n, ti, tl.load(g_row_ptr + i), tl.load(scale_ptr)


@triton.jit
def _supremix_fwd_kernel(g_ptr, t_ptr, lam_ptr, scale_ptr, lse_ptr, pos_sum_ptr, pos_count_ptr,
                         mean_logit_ptr, n, gap, BLOCK: tl.constexpr):
    i, g_row_ptr, lam_row_ptr, ti, g_self, inv_tau = _anchor(g_ptr, t_ptr, lam_ptr, scale_ptr, n)
    offs = tl.arange(0, BLOCK)

    shift = float("-inf")
    for start in range(0, n, BLOCK):
        _, _, real_l, neg_l, _, _, _ = _columns(
            g_row_ptr, t_ptr, lam_row_ptr, i, start + offs, n, ti, g_self, inv_tau)
        shift = tl.maximum(shift, tl.maximum(tl.max(real_l), tl.max(neg_l)))

    total = 0.0
    weighted = 0.0  # Σ w·e^(l − shift)·l, for the mean logit
    pos_sum = 0.0
    pos_count = 0.0
    for start in range(0, n, BLOCK):
        _, pos, real_l, neg_l, real_w, neg_w, _ = _columns(
            g_row_ptr, t_ptr, lam_row_ptr, i, start + offs, n, ti, g_self, inv_tau)
        real_term = real_w * tl.exp(real_l - shift)
        neg_term = neg_w * tl.exp(neg_l - shift)
        total += tl.sum(real_term + neg_term)
        weighted += tl.sum(tl.where(real_term > 0, real_term * real_l, 0.0) +
                           tl.where(neg_term > 0, neg_term * neg_l, 0.0))
        pos_sum += tl.sum(tl.where(pos, real_l, 0.0))
        pos_count += tl.sum(pos.to(tl.float32))
    for j_start in range(0, n, BLOCK):
        for k_start in range(0, n, BLOCK):
            pair, _, logit = _mix_pos_tile(t_ptr, g_row_ptr, ti, j_start + offs,
                                           k_start + offs, n, inv_tau, gap)
            term = tl.where(pair, tl.exp(logit - shift), 0.0)
            total += tl.sum(tl.sum(term, axis=1), axis=0)
            weighted += tl.sum(tl.sum(tl.where(pair, term * logit, 0.0), axis=1), axis=0)
            pos_sum += tl.sum(tl.sum(tl.where(pair, logit, 0.0), axis=1), axis=0)
            pos_count += tl.sum(tl.sum(pair.to(tl.float32), axis=1), axis=0)
    tl.store(lse_ptr + i, shift + tl.log(total))
    tl.store(pos_sum_ptr + i, pos_sum)
    tl.store(pos_count_ptr + i, pos_count)
    tl.store(mean_logit_ptr + i, weighted / total)


@triton.jit
def _supremix_bwd_kernel(g_ptr, t_ptr, lam_ptr, scale_ptr, lse_ptr, grad_lse_ptr, grad_pos_ptr,
                         real_ptr, mix_ptr, mix_diag_ptr, n, gap, BLOCK: tl.constexpr):
    i, g_row_ptr, lam_row_ptr, ti, g_self, inv_tau = _anchor(g_ptr, t_ptr, lam_ptr, scale_ptr, n)
    lse = tl.load(lse_ptr + i)
    g_lse = tl.load(grad_lse_ptr + i)
    g_pos = tl.load(grad_pos_ptr + i)
    offs = tl.arange(0, BLOCK)

    self_coef = 0.0
    for start in range(0, n, BLOCK):
        c = start + offs
        real, pos, real_l, neg_l, real_w, neg_w, lam = _columns(
            g_row_ptr, t_ptr, lam_row_ptr, i, c, n, ti, g_self, inv_tau)
        real_coef = g_lse * real_w * tl.exp(real_l - lse) + tl.where(pos, g_pos, 0.0)
        tl.store(real_ptr + i * n + c, tl.where(real, real_coef * inv_tau, 0.0), mask=c < n)
        neg_coef = g_lse * neg_w * tl.exp(neg_l - lse)
        self_coef += tl.sum(neg_coef * lam)
        mix = neg_coef * (1.0 - lam)
        # c as the lower side j of a pair: Σ over the uppers k of coef·α
        for k_start in range(0, n, BLOCK):
            pair, alpha, logit = _mix_pos_tile(t_ptr, g_row_ptr, ti, c, k_start + offs, n,
                                               inv_tau, gap)
            coef = tl.where(pair, g_lse * tl.exp(logit - lse) + g_pos, 0.0)
            mix += tl.sum(coef * alpha, axis=1)
        # c as the upper side k: Σ over the lowers j of coef·(1−α)
        for j_start in range(0, n, BLOCK):
            pair, alpha, logit = _mix_pos_tile(t_ptr, g_row_ptr, ti, j_start + offs, c, n,
                                               inv_tau, gap)
            coef = tl.where(pair, g_lse * tl.exp(logit - lse) + g_pos, 0.0)
            mix += tl.sum(coef * (1.0 - alpha), axis=0)
        tl.store(mix_ptr + i * n + c, mix * inv_tau, mask=c < n)
    tl.store(mix_diag_ptr + i, self_coef * inv_tau)


def _check(gram: Tensor, labels: Tensor, lam: Tensor, scale: Tensor) -> int:
    n = gram.shape[0]
    if gram.shape != (n, n) or lam.shape != (n, n) or labels.shape != (n,):
        raise ValueError(f"supremix: gram (n, n), labels (n,), lam (n, n) expected, got "
                         f"{tuple(gram.shape)}, {tuple(labels.shape)}, {tuple(lam.shape)}")
    if any(x.dtype != torch.float32 for x in (gram, labels, lam, scale)):
        raise TypeError(f"supremix: the Triton kernels take float32 gram, labels, lam and scale, "
                        f"got {gram.dtype}, {labels.dtype}, {lam.dtype}, {scale.dtype}")
    return n


def supremix_fwd(gram: Tensor, labels: Tensor, lam: Tensor, scale: Tensor,
                 gap: float) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    n = _check(gram, labels, lam, scale)
    lse, pos_sum, pos_count, mean_logit = (gram.new_empty(n) for _ in range(4))
    _supremix_fwd_kernel[(n,)](gram.contiguous(), labels.contiguous(), lam.contiguous(), scale,
                               lse, pos_sum, pos_count, mean_logit, n, gap, BLOCK=_block(n))
    return lse, pos_sum, pos_count, mean_logit


def supremix_bwd(gram: Tensor, labels: Tensor, lam: Tensor, scale: Tensor, gap: float,
                 lse: Tensor, grad_lse: Tensor, grad_pos: Tensor) -> tuple[Tensor, Tensor]:
    n = _check(gram, labels, lam, scale)
    real, mix = gram.new_empty(n, n), gram.new_empty(n, n)
    mix_diag = gram.new_empty(n)
    _supremix_bwd_kernel[(n,)](gram.contiguous(), labels.contiguous(), lam.contiguous(), scale,
                               lse.contiguous(), grad_lse.contiguous(), grad_pos.contiguous(),
                               real, mix, mix_diag, n, gap, BLOCK=_block(n))
    mix.diagonal().add_(mix_diag)
    return real, mix
