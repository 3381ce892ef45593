"""Triton kernels of Rank-N-Contrast (semantics of pyclloss.reference.rnc; the
kernel contract of pyclloss.ops.rnc).

Sorting every row is awkward in Triton, so these kernels compare tiles of
the label distances directly, which is exact with ties by construction: one
program per anchor i walks (j-block × k-block) tiles of the mask
``k ≠ i and d_ik ≥ d_ij`` with an online log-sum-exp per j (running max and
sum). That is O(n²) work per anchor, O(n³) in all (the C++ kernel's sort is
O(n² log n)), and O(n) registers per program; the n×n×n mask is never stored.

Forward: row_i = Σ_{j≠i} [logD_ij − s_ij], and logD (n, n) for the backward.
Backward: d row_i / d s_ik = Σ_{j≠i, d_ij ≤ d_ik} exp(s_ik − logD_ij) − 1,
each term <= 1 (k is in the set of every such j).

Feature distances ‖v_i − v_j‖ come from the differences inside each tile
(never |v_i|² + |v_j|² − 2·v_i·v_j, which loses small distances to
cancellation in float32), one program per (anchor, block of rows); their
backward Σ_j w_ij (v_i − v_j) one program per (anchor, block of columns).
"""

import torch
import triton
import triton.language as tl

Tensor = torch.Tensor


def _block(n: int) -> int:
    return max(16, min(64, triton.next_power_of_2(n)))


@triton.jit
def _row_entries(ptr, i, n, cols, mask):
    """Entries ``cols`` of row i of an (n, n) matrix, 0 off ``mask``."""
    return tl.load(ptr + i * n + cols, mask=mask, other=0.0)


@triton.jit
def _rnc_fwd_kernel(s_ptr, d_ptr, rows_ptr, log_den_ptr, n, BLOCK: tl.constexpr):
    i = tl.program_id(0)
    offs = tl.arange(0, BLOCK)
    row = 0.0
    for j_start in range(0, n, BLOCK):
        j = j_start + offs
        d_j = _row_entries(d_ptr, i, n, j, j < n)
        s_j = _row_entries(s_ptr, i, n, j, j < n)
        run_max = tl.full([BLOCK], float("-inf"), tl.float32)
        run_sum = tl.zeros([BLOCK], tl.float32)
        for k_start in range(0, n, BLOCK):
            k = k_start + offs
            other_k = (k < n) & (k != i)
            d_k = _row_entries(d_ptr, i, n, k, other_k)
            s_k = _row_entries(s_ptr, i, n, k, other_k)
            in_set = other_k[None, :] & (d_k[None, :] >= d_j[:, None])
            tile = tl.where(in_set, s_k[None, :], float("-inf"))
            new_max = tl.maximum(run_max, tl.max(tile, axis=1))
            # -inf - -inf would be NaN: an empty set so far keeps sum 0
            finite = new_max > float("-inf")
            rescale = tl.where(finite, tl.exp(run_max - new_max), 0.0)
            terms = tl.where(in_set & finite[:, None], tl.exp(tile - new_max[:, None]), 0.0)
            run_sum = run_sum * rescale + tl.sum(terms, axis=1)
            run_max = new_max
        log_den = run_max + tl.log(run_sum)
        tl.store(log_den_ptr + i * n + j, log_den, mask=j < n)
        row += tl.sum(tl.where((j < n) & (j != i), log_den - s_j, 0.0))
    tl.store(rows_ptr + i, row)


@triton.jit
def _rnc_bwd_kernel(s_ptr, d_ptr, log_den_ptr, grad_rows_ptr, grad_s_ptr, n,
                    BLOCK: tl.constexpr):
    i = tl.program_id(0)
    offs = tl.arange(0, BLOCK)
    g = tl.load(grad_rows_ptr + i)
    for k_start in range(0, n, BLOCK):
        k = k_start + offs
        other_k = (k < n) & (k != i)
        d_k = _row_entries(d_ptr, i, n, k, k < n)
        s_k = _row_entries(s_ptr, i, n, k, k < n)
        acc = tl.zeros([BLOCK], tl.float32)
        for j_start in range(0, n, BLOCK):
            j = j_start + offs
            other_j = (j < n) & (j != i)
            d_j = _row_entries(d_ptr, i, n, j, other_j)
            log_den_j = _row_entries(log_den_ptr, i, n, j, other_j)
            in_pair = other_j[:, None] & (d_j[:, None] <= d_k[None, :])
            ratio = tl.exp(tl.where(in_pair, s_k[None, :] - log_den_j[:, None], float("-inf")))
            acc += tl.sum(ratio, axis=0)
        tl.store(grad_s_ptr + i * n + k, tl.where(other_k, g * (acc - 1.0), 0.0), mask=k < n)


@triton.jit
def _distances_kernel(v_ptr, dist_ptr, n, D, BLOCK_J: tl.constexpr, BLOCK_D: tl.constexpr):
    i = tl.program_id(0).to(tl.int64)
    j = tl.program_id(1) * BLOCK_J + tl.arange(0, BLOCK_J)
    sq = tl.zeros([BLOCK_J], tl.float32)
    for d_start in range(0, D, BLOCK_D):
        cols = d_start + tl.arange(0, BLOCK_D)
        v_i = tl.load(v_ptr + i * D + cols, mask=cols < D, other=0.0)
        v_j = tl.load(v_ptr + j.to(tl.int64)[:, None] * D + cols[None, :],
                      mask=(j < n)[:, None] & (cols < D)[None, :], other=0.0)
        diff = v_i[None, :] - v_j
        sq += tl.sum(diff * diff, axis=1)
    tl.store(dist_ptr + i * n + j, tl.sqrt(sq), mask=j < n)


@triton.jit
def _distances_bwd_kernel(v_ptr, w_ptr, grad_ptr, n, D, BLOCK_J: tl.constexpr,
                          BLOCK_D: tl.constexpr):
    i = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    v_i = tl.load(v_ptr + i * D + cols, mask=cols < D, other=0.0)
    acc = tl.zeros([BLOCK_D], tl.float32)
    for j_start in range(0, n, BLOCK_J):
        j = j_start + tl.arange(0, BLOCK_J)
        w = tl.load(w_ptr + i * n + j, mask=j < n, other=0.0)
        v_j = tl.load(v_ptr + j.to(tl.int64)[:, None] * D + cols[None, :],
                      mask=(j < n)[:, None] & (cols < D)[None, :], other=0.0)
        acc += tl.sum(w[:, None] * (v_i[None, :] - v_j), axis=0)
    tl.store(grad_ptr + i * D + cols, acc, mask=cols < D)


def _check(s: Tensor, d: Tensor) -> int:
    n = s.shape[0]
    if s.shape != (n, n) or d.shape != (n, n):
        raise ValueError(f"rnc: s and d must be (n, n), got {tuple(s.shape)} and {tuple(d.shape)}")
    if s.dtype != torch.float32 or d.dtype != torch.float32:
        raise TypeError(f"rnc: the Triton kernels take float32 s and d, got {s.dtype}, {d.dtype}")
    return n


def _forward(s: Tensor, d: Tensor) -> tuple[Tensor, Tensor]:
    n = _check(s, d)
    rows, log_den = s.new_empty(n), s.new_empty(n, n)
    _rnc_fwd_kernel[(n,)](s.contiguous(), d.contiguous(), rows, log_den, n, BLOCK=_block(n))
    return rows, log_den


def rnc_fwd(s: Tensor, d: Tensor) -> Tensor:
    return _forward(s, d)[0]


def rnc_bwd(s: Tensor, d: Tensor, grad_rows: Tensor) -> Tensor:
    _, log_den = _forward(s, d)
    n = s.shape[0]
    grad_s = torch.empty_like(s)
    _rnc_bwd_kernel[(n,)](s.contiguous(), d.contiguous(), log_den, grad_rows.contiguous(), grad_s,
                          n, BLOCK=_block(n))
    return grad_s


def _check_features(v: Tensor) -> tuple[int, int]:
    if v.dim() != 2 or v.dtype != torch.float32:
        raise TypeError(f"rnc: the Triton kernels take float32 (n, D) features, got "
                        f"{v.dtype} of shape {tuple(v.shape)}")
    return v.shape


def _feature_block(d: int) -> int:
    return max(16, min(64, triton.next_power_of_2(d)))


def rnc_distances_fwd(v: Tensor) -> Tensor:
    n, d = _check_features(v)
    dist = v.new_empty(n, n)
    block_j = _block(n)
    _distances_kernel[(n, triton.cdiv(n, block_j))](v.contiguous(), dist, n, d, BLOCK_J=block_j,
                                                     BLOCK_D=_feature_block(d))
    return dist


def rnc_distances_bwd(v: Tensor, w: Tensor) -> Tensor:
    n, d = _check_features(v)
    grad = torch.empty_like(v)
    block_d = _feature_block(d)
    _distances_bwd_kernel[(n, triton.cdiv(d, block_d))](v.contiguous(), w.contiguous(), grad, n,
                                                         d, BLOCK_J=_block(n), BLOCK_D=block_d)
    return grad
