"""Triton kernels of the fused InfoNCE core (contract: docs/fused_core.md).

One kernel, ``_tiles_kernel``, walks the N×M logit matrix the way a GEMM does:
program (i, s) owns row block i and the s-th contiguous range of key tiles,
and for each tile accumulates ``q_i · k_jᵀ`` over D in ``BLOCK_D`` chunks (one
flat, software-pipelined loop over tile × chunk), then runs an epilogue on the
fp32 tile. What the epilogue does is the pass:

- ``_LSE``: online log-sum-exp of each row over its denominator set, the
  positives' sum and count, and (``COL_STATS``) each key column's max and
  sum-of-exp over the block's rows — all four statistics from one tile pass;
- ``_PAIR`` / ``_SIGLIP``: row sums of softplus / sigmoid terms;
- ``_GRAD``: the logit gradient G of the tile (docs/fused_core.md), written to
  a row chunk of G in the operands' dtype (fp16: scaled by a power of two
  that keeps it in range, _fp16_grad_scale), plus
  per-row Σ G·dot (and Σ G); with ``SELF_GRAD`` (q and k the same rows) the
  tiles of G + Gᵀ, so that one product gives the whole gradient.

Partial statistics (per range of key tiles, per row block) are merged by
torch in a fixed order, so results are deterministic for a given tile
configuration. The backward materialises G one chunk of rows at a time (at
most ``CHUNK_BYTES``) and hands the two products, dq = s·G·k and
dk = s·Gᵀ·q, to torch's matmul (cuBLAS on the GPU): 8·N·M·D operations in all
for the forward and backward together (the tiles once in forward, once in
backward, the two products), with peak extra memory one G chunk plus an fp32
dk when several chunks accumulate into it.

Operand precision: fp16/bf16 tiles run on the tensor cores with fp32
accumulation; fp32 tiles use TF32 exactly when torch allows it for matmuls
(``torch.backends.cuda.matmul``), else three TF32 products per tile (``tf32x3``,
fp32-level accuracy). The products with G follow torch's own setting.

The five entry points take and return exactly what the dense reference
``pyclloss.reference.info_nce`` does. ``scale`` and ``bias`` are read from device
memory (no host sync, so the calls are CUDA-graph safe).
"""

from typing import Optional

import torch
import triton
import triton.language as tl

from . import tuning
from .common import (
    _INTERPRET,
    _block_d,
    _check,
    _jit,
    _masked_softmax,
    _sigmoid,
    _softplus,
)

Tensor = torch.Tensor

# Largest row chunk of G the backward materialises, and the largest buffer of
# per-row-block column statistics the forward keeps, in bytes.
CHUNK_BYTES = 64 << 20
COLUMN_STATS_BYTES = 32 << 20
CHUNK_ROWS = 256  # chunks are a multiple of this many rows (of any row block)

# The passes of the tiles kernel (constexprs: the compiler reads only those globals).
_LSE, _PAIR, _SIGLIP, _GRAD = (tl.constexpr(i) for i in range(4))


# ----------------------------------------------------------------------- tile helpers


@triton.jit
def _dot_tile(a_ptr, b_ptr, offs_a, offs_b, n_a, n_b, D,
              BLOCK_A: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_D: tl.constexpr,
              DOT_PRECISION: tl.constexpr):
    """<a_i, b_j> for a (BLOCK_A, BLOCK_B) tile in fp32; rows out of range read 0."""
    acc = tl.zeros((BLOCK_A, BLOCK_B), dtype=tl.float32)
    for d0 in range(0, D, BLOCK_D):
        acc = _dot_chunk(a_ptr, b_ptr, offs_a, offs_b, d0, n_a, n_b, D, acc, BLOCK_D,
                         DOT_PRECISION)
    return acc


@triton.jit
def _dot_chunk(a_ptr, b_ptr, offs_a, offs_b, d0, n_a, n_b, D, acc,
               BLOCK_D: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """acc + the features [d0, d0 + BLOCK_D) of <a_i, b_j>."""
    offs_d = d0 + tl.arange(0, BLOCK_D)
    d_in = (offs_d < D)[None, :]
    a = tl.load(a_ptr + offs_a.to(tl.int64)[:, None] * D + offs_d[None, :],
                mask=(offs_a < n_a)[:, None] & d_in, other=0.0)
    b = tl.load(b_ptr + offs_b.to(tl.int64)[:, None] * D + offs_d[None, :],
                mask=(offs_b < n_b)[:, None] & d_in, other=0.0)
    return tl.dot(a, tl.trans(b), acc, input_precision=DOT_PRECISION)


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
def _online_lse(run_max, run_sum, masked, AXIS: tl.constexpr):
    """The running (max, sum of exp(x - max)) after one more tile of masked logits.

    A lane that has seen nothing yet keeps max -inf; it shifts by 0 instead so
    that no -inf - -inf appears and its sum stays exactly 0."""
    new_max = tl.maximum(run_max, tl.max(masked, axis=AXIS))
    shift = tl.where(new_max == float("-inf"), 0.0, new_max)
    tile_sum = tl.sum(tl.exp(masked - tl.expand_dims(shift, AXIS)), axis=AXIS)
    return new_max, run_sum * tl.exp(run_max - shift) + tile_sum


# ------------------------------------------------------------------------- the kernel


@triton.jit
def _epilogue(dot, offs_m, offs_n, pid_m, row0, on_diagonal, N, M, scale, bias, neg_lse,
              q_labels_ptr, k_labels_ptr, exclude_offset, row_lse_ptr, row_coef_ptr,
              col_lse_ptr, col_coef_ptr, pos_coef_ptr, pair_lse_ptr, grad_ptr, col_part_ptr,
              acc0, acc1, acc2, acc3,
              PASS: tl.constexpr, SIGLIP: tl.constexpr, HAS_LABELS: tl.constexpr,
              HAS_EXCLUDE: tl.constexpr, NEG_ONLY: tl.constexpr, COL_STATS: tl.constexpr,
              ROW_TERM: tl.constexpr, COL_TERM: tl.constexpr, POS_TERM: tl.constexpr,
              HAS_PAIR_LSE: tl.constexpr, SELF_GRAD: tl.constexpr, SELF_STATS: tl.constexpr,
              BLOCK_N: tl.constexpr):
    """The pass's work on one finished fp32 tile of dot products (rows offs_m of
    the range, below N; keys offs_n); returns the updated row accumulators (see
    _tiles_kernel)."""
    row_in = offs_m < N
    col_in = offs_n < M
    logits = scale * dot
    if PASS == _GRAD:
        grad = _grad_tile(dot, scale, bias, offs_m, offs_n, N, M, q_labels_ptr, k_labels_ptr,
                          exclude_offset, row_lse_ptr, row_coef_ptr, col_lse_ptr, col_coef_ptr,
                          pos_coef_ptr, pair_lse_ptr, SIGLIP, HAS_LABELS, HAS_EXCLUDE,
                          NEG_ONLY, ROW_TERM, COL_TERM, POS_TERM, HAS_PAIR_LSE)
        acc0 += tl.sum(grad * dot, axis=1)
        if SIGLIP:
            acc1 += tl.sum(grad, axis=1)
        if SELF_GRAD:
            # q = k: row a of G + Gᵀ also needs G_ba, the gradient of the same
            # logit seen from row b: b (a key here, at a global index) brings
            # its row statistics and labels, a (a row of the range) its column
            # statistics; a is excluded when a = b + offset.
            grad += tl.trans(_grad_tile(
                tl.trans(dot), scale, bias, offs_n, offs_m, M, N, k_labels_ptr, q_labels_ptr,
                exclude_offset - 2 * row0, row_lse_ptr - row0, row_coef_ptr - row0,
                col_lse_ptr + row0, col_coef_ptr + row0, pos_coef_ptr - row0,
                pair_lse_ptr - row0, SIGLIP, HAS_LABELS, HAS_EXCLUDE, NEG_ONLY, ROW_TERM,
                COL_TERM, POS_TERM, HAS_PAIR_LSE))
        tl.store(grad_ptr + offs_m.to(tl.int64)[:, None] * M + offs_n[None, :],
                 grad.to(grad_ptr.dtype.element_ty),
                 mask=row_in[:, None] & col_in[None, :])
    else:
        valid, kept, pos = _pair_masks(offs_m, offs_n, N, M, q_labels_ptr, k_labels_ptr,
                                       exclude_offset, HAS_LABELS, HAS_EXCLUDE)
        if PASS == _LSE:
            den = kept & ~pos if NEG_ONLY else kept
            acc0, acc1 = _online_lse(acc0, acc1, tl.where(den, logits, float("-inf")), 1)
            if HAS_LABELS:
                acc2 += tl.sum(tl.where(pos, logits, 0.0), axis=1)
                acc3 += tl.sum(pos.to(tl.float32), axis=1)
            if COL_STATS:
                col_max, col_sum = _online_lse(
                    tl.full((BLOCK_N,), float("-inf"), dtype=tl.float32),
                    tl.zeros((BLOCK_N,), dtype=tl.float32),
                    tl.where(kept, logits, float("-inf")), 0)
                col_row = col_part_ptr + pid_m.to(tl.int64) * 2 * M + offs_n
                tl.store(col_row, col_max, mask=col_in)
                tl.store(col_row + M, col_sum, mask=col_in)
            if SELF_STATS:
                # q = k, symmetric pairs: this tile, read by columns, is the
                # tile of the key rows' own statistics (the diagonal tile once).
                col_den = den & ~on_diagonal
                col_max, col_sum = _online_lse(
                    tl.full((BLOCK_N,), float("-inf"), dtype=tl.float32),
                    tl.zeros((BLOCK_N,), dtype=tl.float32),
                    tl.where(col_den, logits, float("-inf")), 0)
                col_pos = pos & ~on_diagonal
                col_row = col_part_ptr + pid_m.to(tl.int64) * 4 * M + offs_n
                tl.store(col_row, col_max, mask=col_in)
                tl.store(col_row + M, col_sum, mask=col_in)
                tl.store(col_row + 2 * M, tl.sum(tl.where(col_pos, logits, 0.0), axis=0),
                         mask=col_in)
                tl.store(col_row + 3 * M, tl.sum(col_pos.to(tl.float32), axis=0), mask=col_in)
        if PASS == _PAIR:
            margin = neg_lse[:, None] - logits
            acc0 += tl.sum(tl.where(pos, _softplus(margin), 0.0), axis=1)
            acc1 += tl.sum(tl.where(pos, _sigmoid(margin), 0.0), axis=1)
        if PASS == _SIGLIP:
            neg_z = tl.where(pos, -1.0, 1.0)
            acc0 += tl.sum(tl.where(valid, _softplus(neg_z * (logits + bias)), 0.0), axis=1)
    return acc0, acc1, acc2, acc3


@_jit
def _tiles_kernel(q_ptr, k_ptr, scale_ptr, bias_ptr, q_labels_ptr, k_labels_ptr,
                  row_lse_ptr, row_coef_ptr, col_lse_ptr, col_coef_ptr, pos_coef_ptr,
                  pair_lse_ptr, grad_ptr, row_part_ptr, col_part_ptr,
                  row0, N, M, D, exclude_offset,
                  PASS: tl.constexpr, SIGLIP: tl.constexpr, HAS_LABELS: tl.constexpr,
                  HAS_EXCLUDE: tl.constexpr, NEG_ONLY: tl.constexpr, COL_STATS: tl.constexpr,
                  ROW_TERM: tl.constexpr, COL_TERM: tl.constexpr, POS_TERM: tl.constexpr,
                  HAS_PAIR_LSE: tl.constexpr, SELF_GRAD: tl.constexpr,
                  SELF_STATS: tl.constexpr, DOT_PRECISION: tl.constexpr,
                  BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                  FLAT_LOOP: tl.constexpr):
    """One row block of a range of N rows × one range of key tiles; see the
    module docstring for PASS. q and the per-row vectors point at the range's
    first row, which is row row0 of the whole problem (only SELF_GRAD needs to
    know: its transposed half reads the whole row vectors). Indexing the whole
    vectors at global rows instead cost registers (and spills at 128×64).

    Row accumulators (_LSE: running max, sum, positives' sum and count; _PAIR:
    softplus and sigmoid sums; _SIGLIP: loss sum; _GRAD: Σ G·dot, Σ G) go to
    row_part[split, 0..3, N]; _LSE's column partials to col_part[row
    block, 0..1, M] (max, sum) — with SELF_STATS, the key rows' statistics
    from the upper triangle, col_part[row block, 0..3, M]; _GRAD's tiles to
    grad[N, M], with
    SELF_GRAD (q and k the same rows) the tiles of G + Gᵀ. _PAIR reads neg_lse
    from row_lse_ptr.

    FLAT_LOOP runs tiles × feature chunks as one loop (the compiler pipelines
    the loads across tile boundaries, as in a persistent matmul); otherwise a
    loop over tiles holds the loop over feature chunks."""
    pid_m = tl.program_id(0)
    pid_s = tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    scale = tl.load(scale_ptr)
    bias = 0.0
    if SIGLIP:
        bias = tl.load(bias_ptr)
    neg_lse = tl.zeros((BLOCK_M,), dtype=tl.float32)
    if PASS == _PAIR:
        neg_lse = tl.load(row_lse_ptr + offs_m, mask=offs_m < N, other=0.0)

    # SELF_STATS walks the upper triangle only: from the block's own tile on
    # (BLOCK_M = BLOCK_N, and the range starts at a multiple of both).
    own_tile = (row0 + pid_m * BLOCK_M) // BLOCK_N if SELF_STATS else 0
    n_tiles = tl.cdiv(M, BLOCK_N)
    per_split = tl.cdiv(n_tiles - own_tile, tl.num_programs(1))
    first_tile = own_tile + pid_s * per_split
    tiles = tl.maximum(tl.minimum(per_split, n_tiles - first_tile), 0)
    d_chunks = tl.cdiv(D, BLOCK_D)

    acc0 = tl.zeros((BLOCK_M,), dtype=tl.float32)
    if PASS == _LSE:
        acc0 = tl.full((BLOCK_M,), float("-inf"), dtype=tl.float32)
    acc1 = tl.zeros((BLOCK_M,), dtype=tl.float32)
    acc2 = tl.zeros((BLOCK_M,), dtype=tl.float32)
    acc3 = tl.zeros((BLOCK_M,), dtype=tl.float32)
    if FLAT_LOOP:
        dot = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for step in range(0, tiles * d_chunks):
            tile = first_tile + step // d_chunks
            chunk = step % d_chunks
            offs_n = tile * BLOCK_N + tl.arange(0, BLOCK_N)
            dot = _dot_chunk(q_ptr, k_ptr, offs_m, offs_n, chunk * BLOCK_D, N, M, D, dot,
                             BLOCK_D, DOT_PRECISION)
            if chunk == d_chunks - 1:
                acc0, acc1, acc2, acc3 = _epilogue(
                    dot, offs_m, offs_n, pid_m, row0, tile == own_tile, N, M, scale, bias, neg_lse,
                    q_labels_ptr, k_labels_ptr, exclude_offset, row_lse_ptr, row_coef_ptr,
                    col_lse_ptr, col_coef_ptr, pos_coef_ptr, pair_lse_ptr, grad_ptr,
                    col_part_ptr, acc0, acc1, acc2, acc3, PASS, SIGLIP, HAS_LABELS,
                    HAS_EXCLUDE, NEG_ONLY, COL_STATS, ROW_TERM, COL_TERM, POS_TERM,
                    HAS_PAIR_LSE, SELF_GRAD, SELF_STATS, BLOCK_N)
                dot = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    else:
        for tile in range(first_tile, first_tile + tiles):
            offs_n = tile * BLOCK_N + tl.arange(0, BLOCK_N)
            dot = _dot_tile(q_ptr, k_ptr, offs_m, offs_n, N, M, D, BLOCK_M, BLOCK_N, BLOCK_D,
                            DOT_PRECISION)
            acc0, acc1, acc2, acc3 = _epilogue(
                dot, offs_m, offs_n, pid_m, row0, tile == own_tile, N, M, scale, bias, neg_lse,
                q_labels_ptr, k_labels_ptr, exclude_offset, row_lse_ptr, row_coef_ptr,
                col_lse_ptr, col_coef_ptr, pos_coef_ptr, pair_lse_ptr, grad_ptr, col_part_ptr,
                acc0, acc1, acc2, acc3, PASS, SIGLIP, HAS_LABELS, HAS_EXCLUDE, NEG_ONLY,
                COL_STATS, ROW_TERM, COL_TERM, POS_TERM, HAS_PAIR_LSE, SELF_GRAD, SELF_STATS,
                BLOCK_N)

    row_in = offs_m < N
    part = row_part_ptr + pid_s.to(tl.int64) * 4 * N + offs_m
    tl.store(part, acc0, mask=row_in)
    tl.store(part + N, acc1, mask=row_in)
    tl.store(part + 2 * N, acc2, mask=row_in)
    tl.store(part + 3 * N, acc3, mask=row_in)


# ------------------------------------------------------------------------ launchers

def _candidates(dtype: torch.dtype, d: int):
    """Tile configurations worth timing for the tiles kernel (first: the default)."""
    if _INTERPRET:
        return [dict(BLOCK_M=32, BLOCK_N=32, BLOCK_D=32, FLAT_LOOP=flat, num_warps=4,
                     num_stages=1) for flat in (True, False)]
    return _gpu_candidates(dtype, d)


def _gpu_candidates(dtype: torch.dtype, d: int):
    """The candidates on a GPU. All compile for sm_90 within its shared memory,
    and all but the last two of each list without register spills in the forward
    and gradient passes (tests/triton_sm90.py checks; 128×128 tiles spill in the
    gradient pass's epilogue)."""
    if dtype == torch.float32:  # 4-byte operands: narrower feature chunks
        shapes = [(128, 64, 32, 8, 3, True), (128, 64, 64, 8, 2, True),
                  (64, 64, 32, 4, 3, True), (64, 64, 64, 4, 2, True),
                  (128, 64, 32, 8, 3, False), (128, 128, 32, 8, 3, True)]
    else:
        shapes = [(128, 64, 64, 8, 3, True), (128, 64, 128, 8, 2, True),
                  (128, 64, 32, 8, 4, True), (64, 64, 64, 4, 3, True),
                  (128, 64, 64, 8, 3, False), (128, 128, 64, 8, 3, True)]
    configs = []
    for bm, bn, bd, warps, stages, flat in shapes:
        config = dict(BLOCK_M=bm, BLOCK_N=bn, BLOCK_D=_block_d(d, bd), FLAT_LOOP=flat,
                      num_warps=warps, num_stages=stages)
        if config not in configs:
            configs.append(config)
    return configs


def _programs_wanted(device: torch.device) -> int:
    """How many programs a launch should have to fill the GPU (two per SM)."""
    if _INTERPRET or device.type != "cuda":
        return 3  # a few splits, so the merges are exercised
    return 2 * torch.cuda.get_device_properties(device).multi_processor_count


# The per-row / per-key vectors the passes read (docs/fused_core.md's names),
# and the kernel's flags, off unless a launch sets them.
_ROW_VECTORS = ("row_lse", "row_coef", "pos_coef", "pair_lse")
_KEY_VECTORS = ("col_lse", "col_coef")
_FLAGS = ("SIGLIP", "NEG_ONLY", "COL_STATS", "ROW_TERM", "COL_TERM", "POS_TERM", "HAS_PAIR_LSE",
          "SELF_GRAD", "SELF_STATS")


class _Tiles:
    """The shared arguments of one problem, and launches of the tiles kernel over
    a range of its rows (a chunk: the rows [r0, r1) against every key)."""

    def __init__(self, q, k, scale, q_labels, k_labels, exclude_offset, bias=None):
        self.q, self.k = q.contiguous(), k.contiguous()
        self.scale, self.bias = scale, bias
        self.q_labels, self.k_labels = q_labels, k_labels
        self.exclude_offset = exclude_offset
        self.n, self.m, self.d = q.shape[0], k.shape[0], q.shape[1]
        self.device = q.device
        self.precision = tuning.dot_precision(q.dtype)
        self.precision_key = tuning.precision_key(q.dtype)
        self.empty = q.new_empty(0, dtype=torch.float32)

    def vector(self, t: Optional[Tensor], r0: int = 0) -> Tensor:
        """An optional per-key vector, or a per-row one from row r0 on (a view);
        an absent one travels as an empty tensor that the kernel's flags keep
        it off."""
        return self.empty if t is None else t.contiguous()[r0:]

    def splits(self, rows: int, block_m: int, block_n: int) -> int:
        row_blocks = triton.cdiv(rows, block_m)
        tiles = max(1, triton.cdiv(self.m, block_n))
        return max(1, min(tiles, triton.cdiv(_programs_wanted(self.device), row_blocks)))

    def launch(self, kernel_name: str, r0: int, r1: int, vectors: dict, outputs: dict, **flags):
        """Runs the tiles kernel on rows [r0, r1); returns the row partials
        (splits, 4, r1 - r0) and the column partials (row blocks, 2, M) if asked for."""
        rows = r1 - r0
        per_row = {name: self.vector(vectors.get(name), r0) for name in _ROW_VECTORS}
        per_key = {name: self.vector(vectors.get(name)) for name in _KEY_VECTORS}
        args = dict(
            q_ptr=self.q[r0:], k_ptr=self.k, scale_ptr=self.scale,
            bias_ptr=self.bias if self.bias is not None else self.empty,
            q_labels_ptr=self.vector(self.q_labels, r0), k_labels_ptr=self.vector(self.k_labels),
            **{f"{name}_ptr": t for name, t in {**per_row, **per_key}.items()},
            grad_ptr=outputs.get("grad", self.empty),
            row0=r0, N=rows, M=self.m, D=self.d,
            # pair (i, j) is excluded when j = i + offset: i counts from the range's start
            exclude_offset=0 if self.exclude_offset is None else self.exclude_offset + r0,
            HAS_LABELS=self.q_labels is not None,
            HAS_EXCLUDE=self.exclude_offset is not None,
            DOT_PRECISION=self.precision, **{**dict.fromkeys(_FLAGS, False), **flags})
        buffers = {}

        def run(config):
            # a recorded configuration of another feature size may chunk D wider than needed
            config = dict(config, BLOCK_D=min(config["BLOCK_D"], _block_d(self.d, 1 << 16)))
            if flags.get("SELF_STATS"):  # the triangle's tiles are square
                config["BLOCK_M"] = config["BLOCK_N"]
            block_m, block_n = config["BLOCK_M"], config["BLOCK_N"]
            splits = self.splits(rows, block_m, block_n)
            buffers["row"] = torch.empty(splits, 4, rows, dtype=torch.float32, device=self.device)
            buffers["col"] = self.empty
            if flags.get("COL_STATS"):
                buffers["col"] = torch.empty(triton.cdiv(rows, block_m), 2, self.m,
                                             dtype=torch.float32, device=self.device)
            if flags.get("SELF_STATS"):  # the lower triangle's entries stay empty sets
                buffers["col"] = torch.zeros(triton.cdiv(rows, block_m), 4, self.m,
                                             dtype=torch.float32, device=self.device)
                buffers["col"][:, 0] = float("-inf")
            _tiles_kernel[(triton.cdiv(rows, block_m), splits)](
                row_part_ptr=buffers["row"], col_part_ptr=buffers["col"], **args, **config)

        config = tuning.choose(kernel_name, self.precision_key, self.d,
                               _candidates(self.q.dtype, self.d), run)
        run(config)
        return buffers["row"], buffers["col"]

    def row_chunks(self, bytes_per_row: int, budget: int):
        """Row ranges [r0, r1) of at most ``budget`` bytes at ``bytes_per_row``
        (a multiple of CHUNK_ROWS rows, at least CHUNK_ROWS)."""
        rows = max(CHUNK_ROWS, budget // max(1, bytes_per_row) // CHUNK_ROWS * CHUNK_ROWS)
        return [(r0, min(self.n, r0 + rows)) for r0 in range(0, self.n, rows)]


def _merge(maxes: Tensor, sums: Tensor):
    """Partial (max, sum of exp(x - max)) pairs merged along dim 0, in a fixed
    order, into one (shift, sum) pair; shift 0 and sum 0 where every partial is empty."""
    top = maxes.amax(0)
    shift = torch.where(torch.isneginf(top), torch.zeros_like(top), top)
    return shift, (sums * torch.exp(maxes - shift)).sum(0)


def _lse(shift: Tensor, total: Tensor) -> Tensor:
    return shift + torch.log(total)  # -inf for an empty set


def _same_rows(q: Tensor, k: Tensor) -> bool:
    """q and k are one tensor's rows (the self-similarity losses pass z twice)."""
    return (q.data_ptr() == k.data_ptr() and q.shape == k.shape and q.stride() == k.stride()
            and q.dtype == k.dtype)


def infonce_fwd(q, k, scale, q_labels, k_labels, exclude_offset, neg_only, col_stats):
    _check(q, k, q_labels, k_labels)
    if col_stats and neg_only:
        raise ValueError("col_stats cannot be combined with neg_only")
    tiles = _Tiles(q, k, scale, q_labels, k_labels, exclude_offset)
    n, m = tiles.n, tiles.m
    # q = k with symmetric pairs (one label vector, self or no exclusion): the
    # upper triangle of tiles gives every row's statistics, half the work.
    self_stats = (not col_stats and _same_rows(q, k) and exclude_offset in (None, 0)
                  and (q_labels is None or _same_rows(q_labels[:, None], k_labels[:, None])))
    zeros = lambda size: torch.zeros(size, dtype=torch.float32, device=q.device)  # noqa: E731
    rows = [zeros(n) for _ in range(4)]  # (shift, sum) of the row partials, positives' sum, count
    col = [zeros(m) for _ in range(4)]  # the same from the column partials
    # Column partials take 8 (16 with self_stats) bytes per key for each block of
    # rows (64 rows at least): chunk the rows to keep them under COLUMN_STATS_BYTES.
    chunks = tiles.row_chunks(16 * m // 64, COLUMN_STATS_BYTES) if n > 0 and m > 0 else []
    for r0, r1 in chunks:
        row_part, col_part = tiles.launch(
            "info_nce.lse", r0, r1, {}, {}, PASS=_LSE,
            NEG_ONLY=neg_only and q_labels is not None, COL_STATS=col_stats,
            SELF_STATS=self_stats)
        rows[0][r0:r1], rows[1][r0:r1] = _merge(row_part[:, 0], row_part[:, 1])
        rows[2][r0:r1], rows[3][r0:r1] = row_part[:, 2].sum(0), row_part[:, 3].sum(0)
        if col_stats or self_stats:
            col[:2] = _merge(torch.cat([col[0][None], col_part[:, 0]]),
                             torch.cat([col[1][None], col_part[:, 1]]))
        if self_stats:
            col[2] += col_part[:, 2].sum(0)
            col[3] += col_part[:, 3].sum(0)
    if self_stats:  # each row: its own tiles' partials and, read by columns, the others'
        shift, total = _merge(torch.stack([rows[0], col[0]]), torch.stack([rows[1], col[1]]))
        return _lse(shift, total), rows[2] + col[2], rows[3] + col[3], rows[0].new_empty(0)
    col_lse = _lse(col[0], col[1]) if col_stats else rows[0].new_empty(0)
    return _lse(rows[0], rows[1]), rows[2], rows[3], col_lse


def infonce_pair_fwd(q, k, scale, q_labels, k_labels, exclude_offset, neg_lse):
    _check(q, k, q_labels, k_labels)
    if q_labels is None:
        raise ValueError("infonce_pair_fwd needs q_labels and k_labels")
    tiles = _Tiles(q, k, scale, q_labels, k_labels, exclude_offset)
    loss_sum, sigmoid_sum = (torch.zeros(tiles.n, dtype=torch.float32, device=q.device)
                             for _ in range(2))
    if tiles.n > 0 and tiles.m > 0:
        row, _ = tiles.launch("info_nce.pair", 0, tiles.n, {"row_lse": neg_lse}, {},
                              PASS=_PAIR)
        loss_sum, sigmoid_sum = row[:, 0].sum(0), row[:, 1].sum(0)
    return loss_sum, sigmoid_sum


def siglip_fwd(q, k, scale, bias, q_labels, k_labels):
    _check(q, k, q_labels, k_labels)
    tiles = _Tiles(q, k, scale, q_labels, k_labels, None, bias)
    if tiles.n == 0 or tiles.m == 0:
        return torch.zeros(tiles.n, dtype=torch.float32, device=q.device)
    row, _ = tiles.launch("info_nce.siglip", 0, tiles.n, {}, {}, PASS=_SIGLIP, SIGLIP=True)
    return row[:, 0].sum(0)


def _fp16_grad_scale(coefs, self_grad: bool, device: torch.device) -> Tensor:
    """The power of two that G is scaled by before it is stored in fp16
    (docs/gpu.md), as a 0-dim tensor (no host sync): it brings the bound
    |G| <= the sum of the coefficients' largest magnitudes (each term of G is
    a coefficient times a probability or a sigmoid; twice that for G + Gᵀ)
    to at most 2^15."""
    bound = sum(c.abs().amax() for c in coefs if c is not None and c.numel())
    if not torch.is_tensor(bound):
        return torch.ones((), dtype=torch.float32, device=device)
    bound = bound.float() * (2 if self_grad else 1)
    grad_scale = torch.exp2(torch.floor(15 - torch.log2(bound)))
    usable = torch.isfinite(grad_scale) & (grad_scale > 0)
    return torch.where(usable, grad_scale, torch.ones_like(grad_scale))


def _backward(q, k, scale, bias, q_labels, k_labels, exclude_offset, neg_only,
              row_lse, row_coef, col_lse, col_coef, pos_coef, pair_lse, need_dk,
              self_grad=False):
    """dq, dk (empty unless need_dk), and the sums of G·dot and, for SigLIP
    (bias given), of G: G in row chunks from the tiles kernel, then the two
    products through torch's matmul, accumulated in fp32. ``self_grad`` (q and k
    the same rows): the chunks hold G + Gᵀ, and dq = s·(G + Gᵀ)·q is the whole
    gradient, one product instead of two."""
    tiles = _Tiles(q, k, scale, q_labels, k_labels, exclude_offset, bias)
    n, m = tiles.n, tiles.m
    grad_scale = None
    if q.dtype == torch.float16:
        grad_scale = _fp16_grad_scale((row_coef, col_coef, pos_coef), self_grad, q.device)
        row_coef, col_coef, pos_coef = (None if c is None else c * grad_scale
                                        for c in (row_coef, col_coef, pos_coef))
    out_scale = scale if grad_scale is None else scale / grad_scale
    dq = torch.zeros_like(tiles.q)
    dk = torch.zeros(k.shape, dtype=torch.float32, device=k.device) if need_dk else None
    sums = torch.zeros(2, dtype=torch.float32, device=q.device)
    chunks = tiles.row_chunks(m * q.element_size(), CHUNK_BYTES) if n > 0 and m > 0 else []
    if chunks:
        grad_buffer = torch.empty(chunks[0][1] - chunks[0][0], m, dtype=q.dtype,
                                  device=q.device)
    flags = dict(PASS=_GRAD, SIGLIP=bias is not None, NEG_ONLY=neg_only and q_labels is not None,
                 ROW_TERM=row_coef is not None, COL_TERM=col_coef is not None,
                 POS_TERM=pos_coef is not None and q_labels is not None,
                 HAS_PAIR_LSE=pair_lse is not None, SELF_GRAD=self_grad)
    vectors = dict(row_lse=row_lse, row_coef=row_coef, col_lse=col_lse, col_coef=col_coef,
                   pos_coef=pos_coef, pair_lse=pair_lse)
    for r0, r1 in chunks:
        grad = grad_buffer[: r1 - r0]
        row_part, _ = tiles.launch("info_nce.grad", r0, r1, vectors, {"grad": grad}, **flags)
        sums += row_part[:, :2].sum((0, 2))
        dq[r0:r1] = _mm_fp32(grad, tiles.k).mul_(out_scale)
        if need_dk:
            dk = _mm_fp32(grad.t(), tiles.q[r0:r1], dk)
    grad = grad_buffer = None  # freed before dk's cast allocates: not both at the peak
    dk = dk.mul_(out_scale).to(k.dtype) if need_dk else k.new_empty(0)
    return dq, dk, sums if grad_scale is None else sums / grad_scale


# cuBLAS can return fp32 products of 16-bit operands (torch's out_dtype, CUDA only);
# where this torch lacks it, the 16-bit product is widened instead (one more rounding).
_fp32_output = {"available": True}


def _mm_fp32(a: Tensor, b: Tensor, acc: Optional[Tensor] = None) -> Tensor:
    """a @ b, or acc + a @ b for an fp32 acc, in fp32: 16-bit operands keep their
    fp32 accumulation instead of a rounding to 16 bits where cuBLAS offers it."""
    if a.dtype == torch.float32:
        return torch.mm(a, b) if acc is None else acc.addmm_(a, b)
    if a.is_cuda and _fp32_output["available"]:
        try:
            return (torch.mm(a, b, out_dtype=torch.float32) if acc is None
                    else torch.addmm(acc, a, b, out_dtype=torch.float32))
        except (TypeError, RuntimeError, NotImplementedError):
            _fp32_output["available"] = False
    product = torch.mm(a, b).float() if a.is_cuda else torch.mm(a.float(), b.float())
    return product if acc is None else acc.add_(product)


def infonce_bwd(q, k, scale, q_labels, k_labels, exclude_offset, neg_only,
                row_lse, row_coef, col_lse, col_coef, pos_coef, pair_lse, need_dk):
    _check(q, k, q_labels, k_labels)
    dq, dk, sums = _backward(
        q, k, scale, None, q_labels, k_labels, exclude_offset, neg_only,
        row_lse if row_coef is not None else None, row_coef,
        col_lse if col_coef is not None else None, col_coef,
        pos_coef, pair_lse if pos_coef is not None else None, need_dk)
    return dq, dk, sums[0]


def infonce_self_bwd(z, scale, q_labels, k_labels, exclude_offset, neg_only,
                     row_lse, row_coef, col_lse, col_coef, pos_coef, pair_lse):
    """infonce_bwd with q = k = z: (dq + dk, dscale) from the chunks of G + Gᵀ and
    one product with z (6·N²·D operations with the forward instead of 8)."""
    _check(z, z, q_labels, k_labels)
    dz, _, sums = _backward(
        z, z, scale, None, q_labels, k_labels, exclude_offset, neg_only,
        row_lse if row_coef is not None else None, row_coef,
        col_lse if col_coef is not None else None, col_coef,
        pos_coef, pair_lse if pos_coef is not None else None, False, self_grad=True)
    return dz, sums[0]


def siglip_bwd(q, k, scale, bias, q_labels, k_labels, row_coef, need_dk):
    _check(q, k, q_labels, k_labels)
    dq, dk, sums = _backward(q, k, scale, bias, q_labels, k_labels, None, False,
                             None, row_coef, None, None, None, None, need_dk)
    return dq, dk, sums[0].clone(), sums[1].clone()  # results must not alias
