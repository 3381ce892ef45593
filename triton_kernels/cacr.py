"""Triton kernels of CACR's repulsion (semantics of pyclloss.reference.cacr; the
kernel contract of pyclloss.ops.cacr).

Anchors a (n, D) against the other view's rows b (m, D), anchor i paired with
row i + offset of b (left out):

* forward, one program per block of anchors: tiles of d_ij = ‖a_i − b_j‖²
  streamed over b with an online softmax of −τ·d (running max, Σe, Σe·d);
  out mean_i = Σ_j w_ij·d_ij and lse_i;
* backward, G_ij = g_i·w_ij·(1 − τ·(d_ij − mean_i)) recomputed tile by tile
  from (mean, lse): one program per (block of a's rows, feature slice) for
  grad a = 2·(Σ_j G_ij·a_i − G·b), and per block of b's rows for
  grad b = 2·(Σ_i G_ij·b_j − Gᵀ·a). No n×m buffer.

Distances come from tl.dot (IEEE float32: TF32 would lose them); a tile that
holds a near pair (d below 1/8 of |a|² + |b|², where the GEMM form's
cancellation matters) is recomputed from the differences.
"""

import torch
import triton
import triton.language as tl

from .common import _block_d

Tensor = torch.Tensor

_BLOCK_M = 32
_BLOCK_N = 32
_BLOCK_D = 16  # feature chunk of the distance products and of the exact recomputation


@triton.jit
def _feature_chunk(ptr, rows, n, feats, D):
    """Features ``feats`` of ``rows`` of an (n, D) matrix, 0 outside it."""
    return tl.load(ptr + rows.to(tl.int64)[:, None] * D + feats[None, :],
                   mask=(rows < n)[:, None] & (feats < D)[None, :], other=0.0)


@triton.jit
def _distance_tile(x_ptr, y_ptr, x_sq_ptr, y_sq_ptr, rows, cols, n_x, n_y, D,
                   BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    """(rows × cols) ‖x_r − y_c‖² (0 outside the matrices)."""
    dots = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    for d0 in range(0, D, BLOCK_D):
        feats = d0 + tl.arange(0, BLOCK_D)
        x = _feature_chunk(x_ptr, rows, n_x, feats, D)
        y = _feature_chunk(y_ptr, cols, n_y, feats, D)
        dots = tl.dot(x, tl.trans(y), dots, input_precision="ieee")
    norms = (tl.load(x_sq_ptr + rows, mask=rows < n_x, other=0.0)[:, None]
             + tl.load(y_sq_ptr + cols, mask=cols < n_y, other=0.0)[None, :])
    dist = norms - 2.0 * dots
    near = dist < 0.125 * norms
    if tl.sum(near.to(tl.int32)) > 0:
        exact = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
        for d0 in range(0, D, BLOCK_D):
            feats = d0 + tl.arange(0, BLOCK_D)
            diff = (_feature_chunk(x_ptr, rows, n_x, feats, D)[:, None, :]
                    - _feature_chunk(y_ptr, cols, n_y, feats, D)[None, :, :])
            exact += tl.sum(diff * diff, axis=2)
        dist = tl.where(near, exact, dist)
    return dist


@triton.jit
def _cacr_fwd_kernel(a_ptr, b_ptr, a_sq_ptr, b_sq_ptr, mean_ptr, lse_ptr, n, m, D, tau, offset,
                BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    run_max = tl.full([BLOCK_M], float("-inf"), tl.float32)
    run_sum = tl.zeros([BLOCK_M], tl.float32)
    run_dist = tl.zeros([BLOCK_M], tl.float32)
    for j0 in range(0, m, BLOCK_N):
        cols = j0 + tl.arange(0, BLOCK_N)
        dist = _distance_tile(a_ptr, b_ptr, a_sq_ptr, b_sq_ptr, rows, cols, n, m, D, BLOCK_M,
                              BLOCK_N, BLOCK_D)
        other = (cols < m)[None, :] & (cols[None, :] != rows[:, None] + offset)
        logits = tl.where(other, -tau * dist, float("-inf"))
        new_max = tl.maximum(run_max, tl.max(logits, axis=1))
        # a row with only its excluded column so far keeps its sums at 0
        finite = new_max > float("-inf")
        shift = tl.where(finite, new_max, 0.0)
        rescale = tl.where(finite, tl.exp(run_max - shift), 0.0)
        e = tl.where(other, tl.exp(logits - shift[:, None]), 0.0)
        run_sum = run_sum * rescale + tl.sum(e, axis=1)
        run_dist = run_dist * rescale + tl.sum(e * dist, axis=1)
        run_max = new_max
    tl.store(mean_ptr + rows, run_dist / run_sum, mask=rows < n)
    tl.store(lse_ptr + rows, run_max + tl.log(run_sum), mask=rows < n)


@triton.jit
def _cacr_grad_kernel(x_ptr, y_ptr, x_sq_ptr, y_sq_ptr, mean_ptr, lse_ptr, grad_ptr, out_ptr,
                 n_x, n_y, D, tau, offset, ANCHORS_X: tl.constexpr, BLOCK_M: tl.constexpr,
                 BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DO: tl.constexpr):
    """grad x_p = 2·(Σ_q G_pq·x_p − Σ_q G_pq·y_q) for a block of x's rows and a
    slice of the features; the anchors are x's rows (ANCHORS_X) or y's."""
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    feats = tl.program_id(1) * BLOCK_DO + tl.arange(0, BLOCK_DO)
    row_ok, feat_ok = rows < n_x, feats < D
    if ANCHORS_X:
        mean_r = tl.load(mean_ptr + rows, mask=row_ok, other=0.0)
        lse_r = tl.load(lse_ptr + rows, mask=row_ok, other=0.0)
        grad_r = tl.load(grad_ptr + rows, mask=row_ok, other=0.0)
    acc = tl.zeros([BLOCK_M, BLOCK_DO], tl.float32)
    coef_sum = tl.zeros([BLOCK_M], tl.float32)
    for q0 in range(0, n_y, BLOCK_N):
        cols = q0 + tl.arange(0, BLOCK_N)
        col_ok = cols < n_y
        dist = _distance_tile(x_ptr, y_ptr, x_sq_ptr, y_sq_ptr, rows, cols, n_x, n_y, D,
                              BLOCK_M, BLOCK_N, BLOCK_D)
        if ANCHORS_X:
            other = row_ok[:, None] & col_ok[None, :] & (cols[None, :] != rows[:, None] + offset)
            mean, lse, grad = mean_r[:, None], lse_r[:, None], grad_r[:, None]
        else:
            other = row_ok[:, None] & col_ok[None, :] & (rows[:, None] != cols[None, :] + offset)
            mean = tl.load(mean_ptr + cols, mask=col_ok, other=0.0)[None, :]
            lse = tl.load(lse_ptr + cols, mask=col_ok, other=0.0)[None, :]
            grad = tl.load(grad_ptr + cols, mask=col_ok, other=0.0)[None, :]
        w = tl.exp(tl.where(other, -tau * dist - lse, float("-inf")))
        coef = grad * w * (1.0 - tau * (dist - mean))
        coef_sum += tl.sum(coef, axis=1)
        acc = tl.dot(coef, _feature_chunk(y_ptr, cols, n_y, feats, D), acc,
                     input_precision="ieee")
    x = _feature_chunk(x_ptr, rows, n_x, feats, D)
    tl.store(out_ptr + rows.to(tl.int64)[:, None] * D + feats[None, :],
             2.0 * (coef_sum[:, None] * x - acc), mask=row_ok[:, None] & feat_ok[None, :])


def _operands(a: Tensor, b: Tensor, offset: int):
    if a.dtype != torch.float32 or b.dtype != torch.float32:
        raise TypeError(f"cacr: the Triton kernels take float32 rows, got {a.dtype}, {b.dtype}")
    if a.dim() != 2 or b.dim() != 2 or a.shape[1] != b.shape[1]:
        raise ValueError(f"cacr: anchors (n, D) and others (m, D) expected, got "
                         f"{tuple(a.shape)} and {tuple(b.shape)}")
    if b.shape[0] < 2 or offset < 0 or offset + a.shape[0] > b.shape[0]:
        raise ValueError(f"cacr: offset ({offset}) + anchors ({a.shape[0]}) must be <= others "
                         f"({b.shape[0]}), and others needs at least 2 rows")
    a, b = a.contiguous(), b.contiguous()
    return a, b, a.square().sum(1), b.square().sum(1)


def cacr_repulsion_fwd(a: Tensor, b: Tensor, temperature: float, offset: int):
    a, b, a_sq, b_sq = _operands(a, b, offset)
    (n, d), m = a.shape, b.shape[0]
    mean, lse = a.new_empty(n), a.new_empty(n)
    _cacr_fwd_kernel[(triton.cdiv(n, _BLOCK_M),)](a, b, a_sq, b_sq, mean, lse, n, m, d,
                                             float(temperature), offset, BLOCK_M=_BLOCK_M,
                                             BLOCK_N=_BLOCK_N, BLOCK_D=_BLOCK_D)
    return mean, lse


def cacr_repulsion_bwd(a: Tensor, b: Tensor, mean: Tensor, lse: Tensor, grad: Tensor,
                       temperature: float, offset: int):
    a, b, a_sq, b_sq = _operands(a, b, offset)
    stats = [t.contiguous().float() for t in (mean, lse, grad)]
    d = a.shape[1]
    block_do = _block_d(d, 128)
    grads = []
    for x, y, x_sq, y_sq, anchors_x in ((a, b, a_sq, b_sq, True), (b, a, b_sq, a_sq, False)):
        out = torch.empty_like(x)
        grid = (triton.cdiv(x.shape[0], _BLOCK_M), triton.cdiv(d, block_do))
        _cacr_grad_kernel[grid](x, y, x_sq, y_sq, *stats, out, x.shape[0], y.shape[0], d,
                           float(temperature), offset, ANCHORS_X=anchors_x, BLOCK_M=_BLOCK_M,
                           BLOCK_N=_BLOCK_N, BLOCK_D=_BLOCK_D, BLOCK_DO=block_do)
        grads.append(out)
    return tuple(grads)
