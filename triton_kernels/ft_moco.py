"""Triton kernels of the feature-transformation MoCo loss (pyclloss.ops.ft_moco).

The interpolated queue ``Q̂_j = a_j·Q_j + b_j·Q_π(j)`` is never stored: every
key tile loads its queue rows and their partner rows ``π(j)``, blends them in
fp32 with the per-row weights (λ_n and 1 − λ_n, over the row norms when the
queue is normalised) and feeds the blend to ``tl.dot``. Compared with materialising Q̂
first, that saves a K×D write and read per pass (the queue is usually the
largest operand: K = 65536 against N = 256). Streaming and numerics are the
InfoNCE core's (triton_kernels/info_nce.py): online log-sum-exp over key
tiles, fp32 accumulation, a backward that recomputes the tiles, per-row
partial sums for dscale reduced by torch in a fixed order, no atomics.

The two entry points take and return what ``pyclloss.reference.ft_moco``'s
kernels do.
"""

import torch
import triton
import triton.language as tl

from .common import (
    _MAX_BLOCK_D,
    _MAX_BLOCK_D_OUT,
    _autotune,
    _block_d,
    _check,
    _grad_dot,
    _jit,
    _masked_softmax,
    _row_grid,
)

Tensor = torch.Tensor


@triton.jit
def _blend(own_rows, partner_rows, own_w, partner_w, cols, row_in, col_in):
    """a·own + b·partner for a (rows, cols) slice, in the queue's dtype; 0 out of range."""
    mask = row_in[:, None] & col_in[None, :]
    own = tl.load(own_rows + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    partner = tl.load(partner_rows + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    blend = own_w[:, None] * own + partner_w[:, None] * partner
    return blend.to(own_rows.dtype.element_ty)


@triton.jit
def _mixed_key_tile(q_ptr, queue_ptr, own_w_ptr, partner_w_ptr, perm_ptr, offs_m, start_n,
                    N, K, D,
                    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                    DOT_PRECISION: tl.constexpr):
    """<q̂_i, Q̂_j> for the (BLOCK_M, BLOCK_N) tile of keys from start_n, in fp32,
    Q̂ blended on the fly; also the tile's queue rows, partner rows, weights
    and in-range mask, for the backward's product with Q̂."""
    offs_n = start_n + tl.arange(0, BLOCK_N)
    key_in = offs_n < K
    own_w = tl.load(own_w_ptr + offs_n, mask=key_in, other=0.0)
    partner_w = tl.load(partner_w_ptr + offs_n, mask=key_in, other=0.0)
    partner = tl.load(perm_ptr + offs_n, mask=key_in, other=0)
    own_rows = queue_ptr + offs_n.to(tl.int64)[:, None] * D
    partner_rows = queue_ptr + partner.to(tl.int64)[:, None] * D
    offs_d = tl.arange(0, BLOCK_D)
    q_rows = q_ptr + offs_m.to(tl.int64)[:, None] * D
    q_in = (offs_m < N)[:, None]
    dot = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for d0 in range(0, D, BLOCK_D):
        cols = d0 + offs_d
        a = tl.load(q_rows + cols[None, :], mask=q_in & (cols < D)[None, :], other=0.0)
        mixed = _blend(own_rows, partner_rows, own_w, partner_w, cols, key_in, cols < D)
        dot = tl.dot(a, tl.trans(mixed), dot, input_precision=DOT_PRECISION)
    return dot, own_rows, partner_rows, own_w, partner_w, key_in


@_autotune
@_jit
def _neg_lse_kernel(q_ptr, queue_ptr, own_w_ptr, partner_w_ptr, perm_ptr, scale_ptr, lse_ptr,
                    N, K, D,
                    BLOCK_D: tl.constexpr, DOT_PRECISION: tl.constexpr,
                    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """Online LSE of each row of q̂ over the interpolated queue."""
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    scale = tl.load(scale_ptr)
    run_max = tl.full((BLOCK_M,), float("-inf"), dtype=tl.float32)
    run_sum = tl.zeros((BLOCK_M,), dtype=tl.float32)
    for start_n in range(0, K, BLOCK_N):
        dot, _, _, _, _, key_in = _mixed_key_tile(
            q_ptr, queue_ptr, own_w_ptr, partner_w_ptr, perm_ptr, offs_m, start_n, N, K, D,
            BLOCK_M, BLOCK_N, BLOCK_D, DOT_PRECISION)
        logits = tl.where(key_in[None, :], scale * dot, float("-inf"))
        new_max = tl.maximum(run_max, tl.max(logits, axis=1))
        # every tile has a key in range, so new_max is finite from the first tile on
        run_sum = run_sum * tl.exp(run_max - new_max) + tl.sum(tl.exp(logits - new_max[:, None]),
                                                               axis=1)
        run_max = new_max
    tl.store(lse_ptr + offs_m, run_max + tl.log(run_sum), mask=offs_m < N)


@_autotune
@_jit
def _neg_lse_dq_kernel(q_ptr, queue_ptr, own_w_ptr, partner_w_ptr, perm_ptr, scale_ptr,
                       lse_ptr, coef_ptr, dq_ptr, row_dscale_ptr, N, K, D,
                       BLOCK_D: tl.constexpr, BLOCK_D_OUT: tl.constexpr,
                       DOT_PRECISION: tl.constexpr, BLOCK_M: tl.constexpr,
                       BLOCK_N: tl.constexpr):
    """dq̂[rows, d slice] = s·G @ Q̂, G_ij = coef_i·exp(l_ij − lse_i); the d-slice-0
    program also writes the rows' sums of G·dot (for dscale)."""
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.program_id(1) * BLOCK_D_OUT + tl.arange(0, BLOCK_D_OUT)
    row_in = offs_m < N
    scale = tl.load(scale_ptr)
    lse = tl.load(lse_ptr + offs_m, mask=row_in, other=0.0)
    coef = tl.load(coef_ptr + offs_m, mask=row_in, other=0.0)
    dq = tl.zeros((BLOCK_M, BLOCK_D_OUT), dtype=tl.float32)
    row_dscale = tl.zeros((BLOCK_M,), dtype=tl.float32)
    for start_n in range(0, K, BLOCK_N):
        dot, own_rows, partner_rows, own_w, partner_w, key_in = _mixed_key_tile(
            q_ptr, queue_ptr, own_w_ptr, partner_w_ptr, perm_ptr, offs_m, start_n, N, K, D,
            BLOCK_M, BLOCK_N, BLOCK_D, DOT_PRECISION)
        valid = row_in[:, None] & key_in[None, :]
        grad = _masked_softmax(scale * dot, lse[:, None], coef[:, None], valid)
        row_dscale += tl.sum(grad * dot, axis=1)
        mixed_slice = _blend(own_rows, partner_rows, own_w, partner_w, offs_d, key_in,
                             offs_d < D)
        dq = _grad_dot(grad, mixed_slice, dq, DOT_PRECISION)
    d_in = (offs_d < D)[None, :]
    tl.store(dq_ptr + offs_m.to(tl.int64)[:, None] * D + offs_d[None, :],
             (scale * dq).to(dq_ptr.dtype.element_ty), mask=row_in[:, None] & d_in)
    if tl.program_id(1) == 0:
        tl.store(row_dscale_ptr + offs_m, row_dscale, mask=row_in)


def _meta(q_hat: Tensor) -> dict:
    return dict(
        BLOCK_D=_block_d(q_hat.shape[1], _MAX_BLOCK_D),
        # Exact fp32 products: fp32 results must match float64 closely.
        DOT_PRECISION="ieee" if q_hat.dtype == torch.float32 else "tf32",
    )


def ft_moco_neg_lse(q_hat, queue, own_weight, partner_weight, perm, scale):
    _check(q_hat, queue, None, None)
    n, d = q_hat.shape
    lse = torch.empty(n, dtype=torch.float32, device=q_hat.device)
    if n > 0:
        _neg_lse_kernel[_row_grid(n)](q_hat.contiguous(), queue.contiguous(), own_weight,
                                      partner_weight, perm, scale, lse, n, queue.shape[0], d,
                                      **_meta(q_hat))
    return lse


def ft_moco_neg_lse_bwd(q_hat, queue, own_weight, partner_weight, perm, scale, neg_lse, grad):
    _check(q_hat, queue, None, None)
    n, d = q_hat.shape
    dq = torch.empty_like(q_hat)
    row_dscale = torch.zeros(n, dtype=torch.float32, device=q_hat.device)
    if n > 0:
        block_d_out = _block_d(d, _MAX_BLOCK_D_OUT)
        grid = lambda meta: (triton.cdiv(n, meta["BLOCK_M"]), triton.cdiv(d, block_d_out))  # noqa: E731
        _neg_lse_dq_kernel[grid](q_hat.contiguous(), queue.contiguous(), own_weight,
                                 partner_weight, perm, scale, neg_lse, grad, dq, row_dscale,
                                 n, queue.shape[0], d,
                                 BLOCK_D_OUT=block_d_out, **_meta(q_hat))
    return dq, row_dscale.sum()
