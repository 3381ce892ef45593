"""Triton kernels of the fused InfoNCE core (contract: docs/fused_core.md).

FlashAttention-style streaming: a program owns a block of rows (queries, or keys
for the column statistics and dk), walks the other side in tiles, rebuilds each
logit tile with ``tl.dot`` (fp32 accumulation) and reduces it on the fly. Masks
come from the label vectors and ``exclude_offset`` inside the kernel; nothing
N×M is ever stored. The backward recomputes the logit tiles: one kernel for dq
(programs over row blocks), one for dk (programs over key blocks), no atomics.
Gradients of the scalar scale and bias come from per-row partial sums reduced by
torch in a fixed order: results are deterministic for a given tile config (the
autotuner picks one per D and dtype; another config rounds differently).

The five Python entry points take and return exactly what the dense reference
``pyclloss.reference.info_nce`` does. ``scale`` and ``bias`` are read from device
memory inside the kernels (no host sync, so the calls are CUDA-graph safe).
"""

import os
from typing import Optional

import torch
import triton
import triton.language as tl

Tensor = torch.Tensor

_INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"

# Chunk of the feature dimension per tl.dot (the reduction of a logit tile) and
# the widest slice of dq/dk one program accumulates; a wider D splits the
# gradient over several programs, each recomputing the logit tiles.
_MAX_BLOCK_D = 64
_MAX_BLOCK_D_OUT = 128


def _configs():
    if _INTERPRET:
        return [triton.Config({"BLOCK_M": 32, "BLOCK_N": 32}, num_warps=4, num_stages=1)]
    shapes = [  # BLOCK_M, BLOCK_N, num_warps, num_stages
        (128, 64, 4, 3), (128, 64, 8, 3), (64, 128, 4, 3),
        (64, 64, 4, 2), (64, 64, 4, 4), (128, 128, 8, 3),
    ]
    if os.environ.get("PYCLLOSS_TRITON_AUTOTUNE") == "0":
        # one compile per kernel and D (test runs over many sizes): the first tile
        shapes = shapes[:1]
    return [triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=w, num_stages=s)
            for bm, bn, w, s in shapes]


# Keyed on D only (the autotuner appends the tensors' dtypes itself): the best
# tile does not depend on N or M, and the flag variants share one tuning.
_autotune = triton.autotune(configs=_configs(), key=["D"])
_jit = triton.jit(do_not_specialize=["N", "M", "exclude_offset"])


# ----------------------------------------------------------------------- tile helpers


@triton.jit
def _dot_tile(a_ptr, b_ptr, offs_a, offs_b, n_a, n_b, D,
              BLOCK_A: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_D: tl.constexpr,
              DOT_PRECISION: tl.constexpr):
    """<a_i, b_j> for a (BLOCK_A, BLOCK_B) tile in fp32; rows out of range read 0."""
    offs_d = tl.arange(0, BLOCK_D)
    a_rows = a_ptr + offs_a.to(tl.int64)[:, None] * D
    b_rows = b_ptr + offs_b.to(tl.int64)[:, None] * D
    a_in = (offs_a < n_a)[:, None]
    b_in = (offs_b < n_b)[:, None]
    acc = tl.zeros((BLOCK_A, BLOCK_B), dtype=tl.float32)
    for d0 in range(0, D, BLOCK_D):
        d_in = (d0 + offs_d < D)[None, :]
        a = tl.load(a_rows + d0 + offs_d[None, :], mask=a_in & d_in, other=0.0)
        b = tl.load(b_rows + d0 + offs_d[None, :], mask=b_in & d_in, other=0.0)
        acc = tl.dot(a, tl.trans(b), acc, input_precision=DOT_PRECISION)
    return acc


@triton.jit
def _pair_masks(offs_m, offs_n, N, M, q_labels_ptr, k_labels_ptr, exclude_offset,
                HAS_LABELS: tl.constexpr, HAS_EXCLUDE: tl.constexpr):
    """(valid, kept, pos) tiles: in range; in range and not excluded; positive."""
    valid = (offs_m < N)[:, None] & (offs_n < M)[None, :]
    kept = valid
    if HAS_EXCLUDE:
        kept = kept & (offs_n[None, :] != offs_m[:, None] + exclude_offset)
    if HAS_LABELS:
        q_lab = tl.load(q_labels_ptr + offs_m, mask=offs_m < N, other=0)
        k_lab = tl.load(k_labels_ptr + offs_n, mask=offs_n < M, other=0)
        pos = kept & (q_lab[:, None] == k_lab[None, :])
    else:
        pos = tl.zeros(kept.shape, dtype=tl.int1)
    return valid, kept, pos


@triton.jit
def _softplus(x):
    # log1p(exp(-|x|)) without losing the small values: log(u) * e / (u - 1).
    e = tl.exp(-tl.abs(x))
    u = 1.0 + e
    rounded_away = u == 1.0
    log1p_e = tl.where(rounded_away, e, tl.log(u) * (e / tl.where(rounded_away, 1.0, u - 1.0)))
    return tl.maximum(x, 0.0) + log1p_e


@triton.jit
def _sigmoid(x):
    e = tl.exp(-tl.abs(x))
    return tl.where(x >= 0, 1.0 / (1.0 + e), e / (1.0 + e))


@triton.jit
def _masked_softmax(logits, lse, coef, mask):
    """coef * exp(logits - lse) on mask, exactly 0 elsewhere and where coef is 0."""
    active = mask & (coef != 0)
    return tl.where(active, coef * tl.exp(tl.where(active, logits - lse, 0.0)), 0.0)


@triton.jit
def _grad_tile(dot, scale, bias, offs_m, offs_n, N, M, q_labels_ptr, k_labels_ptr,
               exclude_offset, row_lse_ptr, row_coef_ptr, col_lse_ptr, col_coef_ptr,
               pos_coef_ptr, pair_lse_ptr,
               SIGLIP: tl.constexpr, HAS_LABELS: tl.constexpr, HAS_EXCLUDE: tl.constexpr,
               NEG_ONLY: tl.constexpr, ROW_TERM: tl.constexpr, COL_TERM: tl.constexpr,
               POS_TERM: tl.constexpr, HAS_PAIR_LSE: tl.constexpr):
    """dL/dlogit for one tile (G of docs/fused_core.md); exactly 0 outside the range."""
    logits = scale * dot
    valid, kept, pos = _pair_masks(offs_m, offs_n, N, M, q_labels_ptr, k_labels_ptr,
                                   exclude_offset, HAS_LABELS, HAS_EXCLUDE)
    row_in = offs_m < N
    col_in = offs_n < M
    grad = tl.zeros(dot.shape, dtype=tl.float32)
    if SIGLIP:
        row_coef = tl.load(row_coef_ptr + offs_m, mask=row_in, other=0.0)
        neg_z = tl.where(pos, -1.0, 1.0)
        grad = tl.where(valid, row_coef[:, None] * neg_z * _sigmoid(neg_z * (logits + bias)), 0.0)
    else:
        if ROW_TERM:
            den = kept & ~pos if NEG_ONLY else kept
            row_lse = tl.load(row_lse_ptr + offs_m, mask=row_in, other=0.0)
            row_coef = tl.load(row_coef_ptr + offs_m, mask=row_in, other=0.0)
            grad += _masked_softmax(logits, row_lse[:, None], row_coef[:, None], den)
        if COL_TERM:
            col_lse = tl.load(col_lse_ptr + offs_n, mask=col_in, other=0.0)
            col_coef = tl.load(col_coef_ptr + offs_n, mask=col_in, other=0.0)
            grad += _masked_softmax(logits, col_lse[None, :], col_coef[None, :], kept)
        if POS_TERM:
            pos_coef = tl.load(pos_coef_ptr + offs_m, mask=row_in, other=0.0)
            pos_term = tl.where(pos, pos_coef[:, None], 0.0)
            if HAS_PAIR_LSE:
                pair_lse = tl.load(pair_lse_ptr + offs_m, mask=row_in, other=0.0)
                pos_term = pos_term * _sigmoid(pair_lse[:, None] - logits)
            grad += pos_term
    return grad


@triton.jit
def _grad_dot(grad, x, acc, DOT_PRECISION: tl.constexpr):
    """acc + grad @ x with grad (fp32) cast to x's dtype for the tensor cores.

    Gradient entries are often far below 1 (coefficients of 1/N), under fp16's
    normal range: for fp16 each row of grad is divided by its largest
    magnitude before the cast and the product multiplied back, so they keep
    fp16's relative precision instead of underflowing. bf16 has fp32's range."""
    if x.dtype == tl.float16:
        row_max = tl.max(tl.abs(grad), axis=1)
        # rows below 1e-30 would overflow 1/row_max; their products are 0 in fp16 anyway
        row_max = tl.where(row_max > 1e-30, row_max, 1.0)
        unit_rows = (grad * (1.0 / row_max)[:, None]).to(tl.float16)
        return acc + tl.dot(unit_rows, x) * row_max[:, None]
    return tl.dot(grad.to(x.dtype), x, acc, input_precision=DOT_PRECISION)


# --------------------------------------------------------------------- forward kernels


@_autotune
@_jit
def _row_lse_kernel(q_ptr, k_ptr, scale_ptr, q_labels_ptr, k_labels_ptr,
                    lse_ptr, pos_sum_ptr, pos_count_ptr, N, M, D, exclude_offset,
                    HAS_LABELS: tl.constexpr, HAS_EXCLUDE: tl.constexpr,
                    NEG_ONLY: tl.constexpr, BLOCK_D: tl.constexpr,
                    DOT_PRECISION: tl.constexpr, BLOCK_M: tl.constexpr,
                    BLOCK_N: tl.constexpr):
    """Online LSE of each row over its den set, plus the positives' sum and count.

    Also serves the column statistics, launched with q and k swapped."""
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    scale = tl.load(scale_ptr)
    run_max = tl.full((BLOCK_M,), float("-inf"), dtype=tl.float32)
    run_sum = tl.zeros((BLOCK_M,), dtype=tl.float32)
    pos_sum = tl.zeros((BLOCK_M,), dtype=tl.float32)
    pos_count = tl.zeros((BLOCK_M,), dtype=tl.float32)
    for start_n in range(0, M, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        logits = scale * _dot_tile(q_ptr, k_ptr, offs_m, offs_n, N, M, D,
                                   BLOCK_M, BLOCK_N, BLOCK_D, DOT_PRECISION)
        _, kept, pos = _pair_masks(offs_m, offs_n, N, M, q_labels_ptr, k_labels_ptr,
                                   exclude_offset, HAS_LABELS, HAS_EXCLUDE)
        den = kept & ~pos if NEG_ONLY else kept
        masked = tl.where(den, logits, float("-inf"))
        new_max = tl.maximum(run_max, tl.max(masked, axis=1))
        # A row that has seen nothing yet keeps max -inf; shift by 0 there so
        # that no -inf - -inf appears and its sum stays exactly 0.
        shift = tl.where(new_max == float("-inf"), 0.0, new_max)
        run_sum = run_sum * tl.exp(run_max - shift) + tl.sum(tl.exp(masked - shift[:, None]), axis=1)
        run_max = new_max
        if HAS_LABELS:
            pos_sum += tl.sum(tl.where(pos, logits, 0.0), axis=1)
            pos_count += tl.sum(pos.to(tl.float32), axis=1)
    row_in = offs_m < N
    tl.store(lse_ptr + offs_m, run_max + tl.log(run_sum), mask=row_in)
    if HAS_LABELS:
        tl.store(pos_sum_ptr + offs_m, pos_sum, mask=row_in)
        tl.store(pos_count_ptr + offs_m, pos_count, mask=row_in)


@_autotune
@_jit
def _pair_kernel(q_ptr, k_ptr, scale_ptr, q_labels_ptr, k_labels_ptr, neg_lse_ptr,
                 loss_sum_ptr, sigmoid_sum_ptr, N, M, D, exclude_offset,
                 HAS_EXCLUDE: tl.constexpr, BLOCK_D: tl.constexpr,
                 DOT_PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """Sums over each row's positives of softplus / sigmoid(neg_lse_i - l_ij)."""
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    row_in = offs_m < N
    scale = tl.load(scale_ptr)
    neg_lse = tl.load(neg_lse_ptr + offs_m, mask=row_in, other=0.0)
    loss_sum = tl.zeros((BLOCK_M,), dtype=tl.float32)
    sigmoid_sum = tl.zeros((BLOCK_M,), dtype=tl.float32)
    for start_n in range(0, M, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        logits = scale * _dot_tile(q_ptr, k_ptr, offs_m, offs_n, N, M, D,
                                   BLOCK_M, BLOCK_N, BLOCK_D, DOT_PRECISION)
        _, _, pos = _pair_masks(offs_m, offs_n, N, M, q_labels_ptr, k_labels_ptr,
                                exclude_offset, True, HAS_EXCLUDE)
        margin = neg_lse[:, None] - logits
        loss_sum += tl.sum(tl.where(pos, _softplus(margin), 0.0), axis=1)
        sigmoid_sum += tl.sum(tl.where(pos, _sigmoid(margin), 0.0), axis=1)
    tl.store(loss_sum_ptr + offs_m, loss_sum, mask=row_in)
    tl.store(sigmoid_sum_ptr + offs_m, sigmoid_sum, mask=row_in)


@_autotune
@_jit
def _siglip_kernel(q_ptr, k_ptr, scale_ptr, bias_ptr, q_labels_ptr, k_labels_ptr,
                   row_loss_ptr, N, M, D,
                   HAS_LABELS: tl.constexpr, BLOCK_D: tl.constexpr,
                   DOT_PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """row_loss_i = sum_j softplus(-z_ij (l_ij + b)), z = +1 on positives, -1 elsewhere."""
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    scale = tl.load(scale_ptr)
    bias = tl.load(bias_ptr)
    row_loss = tl.zeros((BLOCK_M,), dtype=tl.float32)
    for start_n in range(0, M, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        logits = scale * _dot_tile(q_ptr, k_ptr, offs_m, offs_n, N, M, D,
                                   BLOCK_M, BLOCK_N, BLOCK_D, DOT_PRECISION)
        valid, _, pos = _pair_masks(offs_m, offs_n, N, M, q_labels_ptr, k_labels_ptr,
                                    0, HAS_LABELS, False)
        neg_z = tl.where(pos, -1.0, 1.0)
        row_loss += tl.sum(tl.where(valid, _softplus(neg_z * (logits + bias)), 0.0), axis=1)
    tl.store(row_loss_ptr + offs_m, row_loss, mask=offs_m < N)


# -------------------------------------------------------------------- backward kernels


@_autotune
@_jit
def _dq_kernel(q_ptr, k_ptr, scale_ptr, bias_ptr, q_labels_ptr, k_labels_ptr,
               row_lse_ptr, row_coef_ptr, col_lse_ptr, col_coef_ptr, pos_coef_ptr, pair_lse_ptr,
               dq_ptr, row_dscale_ptr, row_dbias_ptr, N, M, D, exclude_offset,
               SIGLIP: tl.constexpr, HAS_LABELS: tl.constexpr, HAS_EXCLUDE: tl.constexpr,
               NEG_ONLY: tl.constexpr, ROW_TERM: tl.constexpr, COL_TERM: tl.constexpr,
               POS_TERM: tl.constexpr, HAS_PAIR_LSE: tl.constexpr,
               BLOCK_D: tl.constexpr, BLOCK_D_OUT: tl.constexpr,
               DOT_PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """dq[rows, d slice] = s * G @ k; the d-slice-0 program also writes the rows'
    sums of G * dot (for dscale) and, for SigLIP, of G (for dbias)."""
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.program_id(1) * BLOCK_D_OUT + tl.arange(0, BLOCK_D_OUT)
    d_in = (offs_d < D)[None, :]
    scale = tl.load(scale_ptr)
    bias = tl.load(bias_ptr) if SIGLIP else 0.0
    dq = tl.zeros((BLOCK_M, BLOCK_D_OUT), dtype=tl.float32)
    row_dscale = tl.zeros((BLOCK_M,), dtype=tl.float32)
    row_dbias = tl.zeros((BLOCK_M,), dtype=tl.float32)
    for start_n in range(0, M, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        dot = _dot_tile(q_ptr, k_ptr, offs_m, offs_n, N, M, D,
                        BLOCK_M, BLOCK_N, BLOCK_D, DOT_PRECISION)
        grad = _grad_tile(dot, scale, bias, offs_m, offs_n, N, M, q_labels_ptr, k_labels_ptr,
                          exclude_offset, row_lse_ptr, row_coef_ptr, col_lse_ptr, col_coef_ptr,
                          pos_coef_ptr, pair_lse_ptr, SIGLIP, HAS_LABELS, HAS_EXCLUDE,
                          NEG_ONLY, ROW_TERM, COL_TERM, POS_TERM, HAS_PAIR_LSE)
        row_dscale += tl.sum(grad * dot, axis=1)
        if SIGLIP:
            row_dbias += tl.sum(grad, axis=1)
        k_slice = tl.load(k_ptr + offs_n.to(tl.int64)[:, None] * D + offs_d[None, :],
                          mask=(offs_n < M)[:, None] & d_in, other=0.0)
        dq = _grad_dot(grad, k_slice, dq, DOT_PRECISION)
    row_in = offs_m < N
    tl.store(dq_ptr + offs_m.to(tl.int64)[:, None] * D + offs_d[None, :],
             (scale * dq).to(dq_ptr.dtype.element_ty), mask=row_in[:, None] & d_in)
    if tl.program_id(1) == 0:
        tl.store(row_dscale_ptr + offs_m, row_dscale, mask=row_in)
        if SIGLIP:
            tl.store(row_dbias_ptr + offs_m, row_dbias, mask=row_in)


@_autotune
@_jit
def _dk_kernel(q_ptr, k_ptr, scale_ptr, bias_ptr, q_labels_ptr, k_labels_ptr,
               row_lse_ptr, row_coef_ptr, col_lse_ptr, col_coef_ptr, pos_coef_ptr, pair_lse_ptr,
               dk_ptr, N, M, D, exclude_offset,
               SIGLIP: tl.constexpr, HAS_LABELS: tl.constexpr, HAS_EXCLUDE: tl.constexpr,
               NEG_ONLY: tl.constexpr, ROW_TERM: tl.constexpr, COL_TERM: tl.constexpr,
               POS_TERM: tl.constexpr, HAS_PAIR_LSE: tl.constexpr,
               BLOCK_D: tl.constexpr, BLOCK_D_OUT: tl.constexpr,
               DOT_PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """dk[keys, d slice] = s * G^T @ q, streaming row tiles past a block of keys."""
    offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_d = tl.program_id(1) * BLOCK_D_OUT + tl.arange(0, BLOCK_D_OUT)
    d_in = (offs_d < D)[None, :]
    scale = tl.load(scale_ptr)
    bias = tl.load(bias_ptr) if SIGLIP else 0.0
    dk = tl.zeros((BLOCK_N, BLOCK_D_OUT), dtype=tl.float32)
    for start_m in range(0, N, BLOCK_M):
        offs_m = start_m + tl.arange(0, BLOCK_M)
        dot = _dot_tile(q_ptr, k_ptr, offs_m, offs_n, N, M, D,
                        BLOCK_M, BLOCK_N, BLOCK_D, DOT_PRECISION)
        grad = _grad_tile(dot, scale, bias, offs_m, offs_n, N, M, q_labels_ptr, k_labels_ptr,
                          exclude_offset, row_lse_ptr, row_coef_ptr, col_lse_ptr, col_coef_ptr,
                          pos_coef_ptr, pair_lse_ptr, SIGLIP, HAS_LABELS, HAS_EXCLUDE,
                          NEG_ONLY, ROW_TERM, COL_TERM, POS_TERM, HAS_PAIR_LSE)
        q_slice = tl.load(q_ptr + offs_m.to(tl.int64)[:, None] * D + offs_d[None, :],
                          mask=(offs_m < N)[:, None] & d_in, other=0.0)
        dk = _grad_dot(tl.trans(grad), q_slice, dk, DOT_PRECISION)
    tl.store(dk_ptr + offs_n.to(tl.int64)[:, None] * D + offs_d[None, :],
             (scale * dk).to(dk_ptr.dtype.element_ty), mask=(offs_n < M)[:, None] & d_in)


# ------------------------------------------------------------------------ launchers

_SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _check(q: Tensor, k: Tensor, q_labels, k_labels):
    if q.dtype not in _SUPPORTED_DTYPES or k.dtype != q.dtype:
        raise TypeError(f"q and k must share a dtype among {_SUPPORTED_DTYPES}, "
                        f"got {q.dtype} and {k.dtype}")
    if q.dim() != 2 or k.dim() != 2 or q.shape[1] != k.shape[1]:
        raise ValueError(f"q (N, D) and k (M, D) expected, got {tuple(q.shape)} and {tuple(k.shape)}")
    if (q_labels is None) != (k_labels is None):
        raise ValueError("q_labels and k_labels must be both given or both None")


def _block_d(d: int, cap: int) -> int:
    # tl.dot needs every dimension >= 16.
    return max(16, min(triton.next_power_of_2(d), cap))


def _or_empty(t: Optional[Tensor], dtype: torch.dtype, like: Tensor) -> Tensor:
    """An absent optional input travels as an empty tensor of its usual dtype
    (its constexpr flag keeps the kernel off it), so that the autotune key, D
    and the tensors' dtypes, is the same for every combination of flags."""
    return like.new_empty(0, dtype=dtype) if t is None else t.contiguous()


def _shared_args(q, k, q_labels, k_labels, exclude_offset):
    """Arguments and constexprs that every kernel takes the same way."""
    labels = [_or_empty(t, torch.int64, q) for t in (q_labels, k_labels)]
    sizes = (q.shape[0], k.shape[0], q.shape[1])
    meta = dict(
        HAS_LABELS=q_labels is not None,
        HAS_EXCLUDE=exclude_offset is not None,
        BLOCK_D=_block_d(q.shape[1], _MAX_BLOCK_D),
        # Exact fp32 products: fp32 results must match float64 closely.
        DOT_PRECISION="ieee" if q.dtype == torch.float32 else "tf32",
    )
    return labels, sizes, 0 if exclude_offset is None else exclude_offset, meta


def _row_grid(n: int):
    return lambda meta: (triton.cdiv(n, meta["BLOCK_M"]),)


def _row_lse(q, k, scale, q_labels, k_labels, exclude_offset, neg_only):
    labels, (n, m, d), offset, meta = _shared_args(q, k, q_labels, k_labels, exclude_offset)
    lse, pos_sum, pos_count = (torch.zeros(n, dtype=torch.float32, device=q.device)
                               for _ in range(3))
    if n > 0:
        _row_lse_kernel[_row_grid(n)](
            q.contiguous(), k.contiguous(), scale, *labels, lse, pos_sum, pos_count,
            n, m, d, offset, NEG_ONLY=neg_only and meta["HAS_LABELS"], **meta)
    return lse, pos_sum, pos_count


def infonce_fwd(q, k, scale, q_labels, k_labels, exclude_offset, neg_only, col_stats):
    _check(q, k, q_labels, k_labels)
    if col_stats and neg_only:
        raise ValueError("col_stats cannot be combined with neg_only")
    row_lse, pos_sum, pos_count = _row_lse(q, k, scale, q_labels, k_labels,
                                           exclude_offset, neg_only)
    if col_stats:
        # Column j's set is every row but j - exclude_offset: the row LSE of the
        # swapped problem with the opposite offset.
        swapped_offset = None if exclude_offset is None else -exclude_offset
        col_lse, _, _ = _row_lse(k, q, scale, None, None, swapped_offset, False)
    else:
        col_lse = row_lse.new_empty(0)
    return row_lse, pos_sum, pos_count, col_lse


def infonce_pair_fwd(q, k, scale, q_labels, k_labels, exclude_offset, neg_lse):
    _check(q, k, q_labels, k_labels)
    if q_labels is None:
        raise ValueError("infonce_pair_fwd needs q_labels and k_labels")
    labels, (n, m, d), offset, meta = _shared_args(q, k, q_labels, k_labels, exclude_offset)
    del meta["HAS_LABELS"]
    loss_sum, sigmoid_sum = (torch.empty(n, dtype=torch.float32, device=q.device)
                             for _ in range(2))
    if n > 0:
        _pair_kernel[_row_grid(n)](
            q.contiguous(), k.contiguous(), scale, *labels, neg_lse.contiguous(),
            loss_sum, sigmoid_sum, n, m, d, offset, **meta)
    return loss_sum, sigmoid_sum


def siglip_fwd(q, k, scale, bias, q_labels, k_labels):
    _check(q, k, q_labels, k_labels)
    labels, (n, m, d), _, meta = _shared_args(q, k, q_labels, k_labels, None)
    del meta["HAS_EXCLUDE"]
    row_loss = torch.empty(n, dtype=torch.float32, device=q.device)
    if n > 0:
        _siglip_kernel[_row_grid(n)](q.contiguous(), k.contiguous(), scale, bias, *labels,
                                     row_loss, n, m, d, **meta)
    return row_loss


def _backward(q, k, scale, bias, q_labels, k_labels, exclude_offset, neg_only,
              row_lse, row_coef, col_lse, col_coef, pos_coef, pair_lse, need_dk):
    """dq, dk (empty unless need_dk), and the per-row partial sums of G * dot
    and, for SigLIP (bias given), of G."""
    q, k = q.contiguous(), k.contiguous()
    labels, (n, m, d), offset, meta = _shared_args(q, k, q_labels, k_labels, exclude_offset)
    siglip = bias is not None
    vectors = [_or_empty(t, torch.float32, q)
               for t in (bias, row_lse, row_coef, col_lse, col_coef, pos_coef, pair_lse)]
    block_d_out = _block_d(d, _MAX_BLOCK_D_OUT)
    meta.update(
        SIGLIP=siglip, NEG_ONLY=neg_only and meta["HAS_LABELS"],
        ROW_TERM=row_coef is not None, COL_TERM=col_coef is not None,
        POS_TERM=pos_coef is not None and meta["HAS_LABELS"],
        HAS_PAIR_LSE=pair_lse is not None, BLOCK_D_OUT=block_d_out)
    d_slices = triton.cdiv(d, block_d_out)

    dq = torch.empty_like(q)
    row_partials = torch.zeros(2, n, dtype=torch.float32, device=q.device)
    if n > 0:
        grid = lambda meta: (triton.cdiv(n, meta["BLOCK_M"]), d_slices)  # noqa: E731
        _dq_kernel[grid](q, k, scale, *vectors[:1], *labels, *vectors[1:], dq, *row_partials,
                         n, m, d, offset, **meta)
    dk = k.new_empty(0)
    if need_dk:
        dk = torch.empty_like(k)
        if m > 0:
            grid = lambda meta: (triton.cdiv(m, meta["BLOCK_N"]), d_slices)  # noqa: E731
            _dk_kernel[grid](q, k, scale, *vectors[:1], *labels, *vectors[1:], dk,
                             n, m, d, offset, **meta)
    return dq, dk, row_partials


def infonce_bwd(q, k, scale, q_labels, k_labels, exclude_offset, neg_only,
                row_lse, row_coef, col_lse, col_coef, pos_coef, pair_lse, need_dk):
    _check(q, k, q_labels, k_labels)
    dq, dk, row_partials = _backward(
        q, k, scale, None, q_labels, k_labels, exclude_offset, neg_only,
        row_lse if row_coef is not None else None, row_coef,
        col_lse if col_coef is not None else None, col_coef,
        pos_coef, pair_lse if pos_coef is not None else None, need_dk)
    return dq, dk, row_partials[0].sum()


def siglip_bwd(q, k, scale, bias, q_labels, k_labels, row_coef, need_dk):
    _check(q, k, q_labels, k_labels)
    dq, dk, row_partials = _backward(q, k, scale, bias, q_labels, k_labels, None, False,
                                     None, row_coef, None, None, None, None, need_dk)
    return dq, dk, row_partials[0].sum(), row_partials[1].sum()
