"""Triton kernels of the gated-subspace (Hydra / SimLAP) loss (contract:
docs/gated_info_nce.md).

A program owns a block of anchors (or of keys, for dk) and walks the other side
in tiles. The gated logit l_bn = s·<q_b⊙g_b, k_n⊙g_b> / (‖q_b⊙g_b‖·‖k_n⊙g_b‖)
comes from two ``tl.dot`` tiles over the same keys, a·kᵀ with a = q⊙g² and
(g²)·(k⊙k)ᵀ, so the B×N×K tensor of gated keys is never formed. The backward
recomputes both tiles and multiplies the gradient coefficients into k and k⊙k
(dq, dgates; programs over anchor blocks) or into a and g² (dk; programs over
key blocks): no atomics. The operands are prepared once in float32 and the
dots run in IEEE float32, so every input dtype gets float32 statistics.
"""

import torch
import triton
import triton.language as tl

from .common import _SUPPORTED_DTYPES, _autotune, _block_d, _sigmoid, _softplus

Tensor = torch.Tensor

EPS = 1e-12  # gated norms are clamped below at EPS, as F.normalize does
_EPS = tl.constexpr(EPS)
_MAX_BLOCK_D = 64  # feature chunk of a tile's dot products and of a gradient slice

_jit = triton.jit(do_not_specialize=["B", "N"])


@triton.jit
def _dot_tile(a_ptr, b_ptr, offs_a, offs_b, n_a, n_b, D,
              BLOCK_A: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_D: tl.constexpr):
    """<a_i, b_j> for a (BLOCK_A, BLOCK_B) tile of float32 rows; rows out of range read 0."""
    offs_d = tl.arange(0, BLOCK_D)
    a_rows = a_ptr + offs_a.to(tl.int64)[:, None] * D
    b_rows = b_ptr + offs_b.to(tl.int64)[:, None] * D
    acc = tl.zeros((BLOCK_A, BLOCK_B), dtype=tl.float32)
    for d0 in range(0, D, BLOCK_D):
        d_in = (d0 + offs_d < D)[None, :]
        a = tl.load(a_rows + d0 + offs_d[None, :], mask=(offs_a < n_a)[:, None] & d_in, other=0.0)
        b = tl.load(b_rows + d0 + offs_d[None, :], mask=(offs_b < n_b)[:, None] & d_in, other=0.0)
        acc = tl.dot(a, tl.trans(b), acc, input_precision="ieee")
    return acc


@triton.jit
def _gated_logits(dot, sq_norm, anchor_scale):
    """Logits and the clamped inverse key norms 1/max(‖k⊙g‖, EPS) of a tile."""
    inv_norm = 1.0 / tl.maximum(tl.sqrt(sq_norm), _EPS)
    return dot * anchor_scale * inv_norm, inv_norm


@triton.jit
def _masks(own, partner, key, valid):
    """(positive, negative) tiles from broadcast label tiles."""
    pos = valid & (partner == key)
    neg = valid & (own != key) & (partner != key)
    return pos, neg


@triton.jit
def _gradient(logits, inv_norm, anchor_scale, neg_lse, neg_coef, pos_coef, pos, neg):
    """(G, numerator coefficient G·s/(‖q⊙g‖‖k⊙g‖), key-norm coefficient
    G·l/(2‖k⊙g‖²), 0 where that norm is clamped) of a tile; a term is active only
    where its coefficient is nonzero."""
    neg_on = neg & (neg_coef != 0)
    pos_on = pos & (pos_coef != 0)
    softmax = tl.exp(tl.where(neg_on, logits - neg_lse, 0.0))
    grad = tl.where(neg_on, neg_coef * softmax, 0.0)
    grad += tl.where(pos_on, pos_coef * _sigmoid(tl.where(pos_on, neg_lse - logits, 0.0)), 0.0)
    norm_coef = tl.where(inv_norm < 1.0 / _EPS, 0.5 * grad * logits * inv_norm * inv_norm, 0.0)
    return grad, grad * anchor_scale * inv_norm, norm_coef


@_autotune  # BLOCK_M, BLOCK_N per D and dtype (one fixed tile under the interpreter)
@_jit
def _forward_kernel(a_ptr, gsq_ptr, k_ptr, ksq_ptr, anchor_scale_ptr, own_ptr, partner_ptr,
                    key_ptr, neg_lse_ptr, out0_ptr, out1_ptr, B, N, D,
                    PAIRS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                    BLOCK_D: tl.constexpr):
    """PAIRS=False: out0 = LSE over negatives, out1 = positive count.
    PAIRS=True: out0 = Σ_pos softplus(neg_lse − l), out1 = Σ_pos sigmoid(neg_lse − l)."""
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    row_in = offs_m < B
    anchor_scale = tl.load(anchor_scale_ptr + offs_m, mask=row_in, other=0.0)[:, None]
    own = tl.load(own_ptr + offs_m, mask=row_in, other=0)[:, None]
    partner = tl.load(partner_ptr + offs_m, mask=row_in, other=0)[:, None]
    if PAIRS:
        neg_lse = tl.load(neg_lse_ptr + offs_m, mask=row_in, other=0.0)[:, None]
    run_max = tl.full((BLOCK_M,), float("-inf"), tl.float32)
    acc0 = tl.zeros((BLOCK_M,), tl.float32)
    acc1 = tl.zeros((BLOCK_M,), tl.float32)
    for n0 in range(0, N, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        col_in = offs_n < N
        dot = _dot_tile(a_ptr, k_ptr, offs_m, offs_n, B, N, D, BLOCK_M, BLOCK_N, BLOCK_D)
        sq = _dot_tile(gsq_ptr, ksq_ptr, offs_m, offs_n, B, N, D, BLOCK_M, BLOCK_N, BLOCK_D)
        logits, _ = _gated_logits(dot, sq, anchor_scale)
        key = tl.load(key_ptr + offs_n, mask=col_in, other=0)[None, :]
        pos, neg = _masks(own, partner, key, row_in[:, None] & col_in[None, :])
        if PAIRS:
            margin = tl.where(pos, neg_lse - logits, 0.0)
            acc0 += tl.sum(tl.where(pos, _softplus(margin), 0.0), 1)
            acc1 += tl.sum(tl.where(pos, _sigmoid(margin), 0.0), 1)
        else:
            masked = tl.where(neg, logits, float("-inf"))
            new_max = tl.maximum(run_max, tl.max(masked, 1))
            # a row with no negatives yet keeps (-inf, 0): shift by 0 instead of -inf
            shift = tl.where(new_max == float("-inf"), 0.0, new_max)
            acc0 = acc0 * tl.exp(run_max - shift) + tl.sum(tl.exp(masked - shift[:, None]), 1)
            run_max = new_max
            acc1 += tl.sum(pos.to(tl.float32), 1)
    if not PAIRS:
        empty = run_max == float("-inf")
        acc0 = tl.where(empty, float("-inf"), run_max + tl.log(tl.where(empty, 1.0, acc0)))
    tl.store(out0_ptr + offs_m, acc0, mask=row_in)
    tl.store(out1_ptr + offs_m, acc1, mask=row_in)


@_autotune
@_jit
def _anchor_grad_kernel(q_ptr, g_ptr, a_ptr, gsq_ptr, k_ptr, ksq_ptr, norm_ptr, anchor_scale_ptr,
                        own_ptr, partner_ptr, key_ptr, neg_lse_ptr, neg_coef_ptr, pos_coef_ptr,
                        dq_ptr, dg_ptr, dlogit_ptr, B, N, D,
                        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                        BLOCK_DO: tl.constexpr):
    """dq and dgates for a block of anchors and a slice of features:
    dq = g²⊙(H·k − c⊙q), dg = 2g⊙(q⊙(H·k) − c⊙q²/2 − T·(k⊙k)),
    c_b = Σ_n G_bn l_bn / ‖q_b⊙g_b‖² (0 when clamped); program (0, 0) of each
    anchor block also stores Σ_n G_bn l_bn (for dscale)."""
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_o = tl.program_id(1) * BLOCK_DO + tl.arange(0, BLOCK_DO)
    row_in = offs_m < B
    out_in = offs_o < D
    anchor_scale = tl.load(anchor_scale_ptr + offs_m, mask=row_in, other=0.0)[:, None]
    own = tl.load(own_ptr + offs_m, mask=row_in, other=0)[:, None]
    partner = tl.load(partner_ptr + offs_m, mask=row_in, other=0)[:, None]
    neg_lse = tl.load(neg_lse_ptr + offs_m, mask=row_in, other=0.0)[:, None]
    neg_coef = tl.load(neg_coef_ptr + offs_m, mask=row_in, other=0.0)[:, None]
    pos_coef = tl.load(pos_coef_ptr + offs_m, mask=row_in, other=0.0)[:, None]
    h_k = tl.zeros((BLOCK_M, BLOCK_DO), tl.float32)
    t_ksq = tl.zeros((BLOCK_M, BLOCK_DO), tl.float32)
    dlogit = tl.zeros((BLOCK_M,), tl.float32)
    for n0 in range(0, N, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        col_in = offs_n < N
        dot = _dot_tile(a_ptr, k_ptr, offs_m, offs_n, B, N, D, BLOCK_M, BLOCK_N, BLOCK_D)
        sq = _dot_tile(gsq_ptr, ksq_ptr, offs_m, offs_n, B, N, D, BLOCK_M, BLOCK_N, BLOCK_D)
        logits, inv_norm = _gated_logits(dot, sq, anchor_scale)
        key = tl.load(key_ptr + offs_n, mask=col_in, other=0)[None, :]
        pos, neg = _masks(own, partner, key, row_in[:, None] & col_in[None, :])
        grad, dot_coef, norm_coef = _gradient(logits, inv_norm, anchor_scale, neg_lse, neg_coef,
                                              pos_coef, pos, neg)
        dlogit += tl.sum(grad * logits, 1)
        cols = offs_n.to(tl.int64)[:, None] * D + offs_o[None, :]
        tile_in = col_in[:, None] & out_in[None, :]
        k_slice = tl.load(k_ptr + cols, mask=tile_in, other=0.0)
        ksq_slice = tl.load(ksq_ptr + cols, mask=tile_in, other=0.0)
        h_k = tl.dot(dot_coef, k_slice, h_k, input_precision="ieee")
        t_ksq = tl.dot(norm_coef, ksq_slice, t_ksq, input_precision="ieee")
    norm = tl.load(norm_ptr + offs_m, mask=row_in, other=1.0)
    c = tl.where(norm > _EPS, dlogit / (norm * norm), 0.0)[:, None]
    rows = offs_m.to(tl.int64)[:, None] * D + offs_o[None, :]
    out_mask = row_in[:, None] & out_in[None, :]
    q = tl.load(q_ptr + rows, mask=out_mask, other=0.0)
    g = tl.load(g_ptr + rows, mask=out_mask, other=0.0)
    tl.store(dq_ptr + rows, (g * g * (h_k - c * q)).to(dq_ptr.dtype.element_ty), mask=out_mask)
    dg = 2.0 * g * (q * h_k - 0.5 * c * q * q - t_ksq)
    tl.store(dg_ptr + rows, dg.to(dg_ptr.dtype.element_ty), mask=out_mask)
    if tl.program_id(1) == 0:
        tl.store(dlogit_ptr + offs_m, dlogit, mask=row_in)


@_autotune
@_jit
def _key_grad_kernel(k_ptr, ksq_ptr, a_ptr, gsq_ptr, anchor_scale_ptr, own_ptr, partner_ptr,
                     key_ptr, neg_lse_ptr, neg_coef_ptr, pos_coef_ptr, dk_ptr, B, N, D,
                     BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                     BLOCK_DO: tl.constexpr):
    """dk = Hᵀ·a − 2k⊙(Tᵀ·g²) for a block of keys and a slice of features, over
    key-major tiles (rows: keys, columns: anchors)."""
    offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_o = tl.program_id(1) * BLOCK_DO + tl.arange(0, BLOCK_DO)
    key_in = offs_n < N
    out_in = offs_o < D
    key = tl.load(key_ptr + offs_n, mask=key_in, other=0)[:, None]
    h_a = tl.zeros((BLOCK_N, BLOCK_DO), tl.float32)
    t_gsq = tl.zeros((BLOCK_N, BLOCK_DO), tl.float32)
    for m0 in range(0, B, BLOCK_M):
        offs_m = m0 + tl.arange(0, BLOCK_M)
        row_in = offs_m < B
        anchor_scale = tl.load(anchor_scale_ptr + offs_m, mask=row_in, other=0.0)[None, :]
        neg_lse = tl.load(neg_lse_ptr + offs_m, mask=row_in, other=0.0)[None, :]
        neg_coef = tl.load(neg_coef_ptr + offs_m, mask=row_in, other=0.0)[None, :]
        pos_coef = tl.load(pos_coef_ptr + offs_m, mask=row_in, other=0.0)[None, :]
        own = tl.load(own_ptr + offs_m, mask=row_in, other=0)[None, :]
        partner = tl.load(partner_ptr + offs_m, mask=row_in, other=0)[None, :]
        dot = _dot_tile(k_ptr, a_ptr, offs_n, offs_m, N, B, D, BLOCK_N, BLOCK_M, BLOCK_D)
        sq = _dot_tile(ksq_ptr, gsq_ptr, offs_n, offs_m, N, B, D, BLOCK_N, BLOCK_M, BLOCK_D)
        logits, inv_norm = _gated_logits(dot, sq, anchor_scale)
        pos, neg = _masks(own, partner, key, key_in[:, None] & row_in[None, :])
        _, dot_coef, norm_coef = _gradient(logits, inv_norm, anchor_scale, neg_lse,
                                           neg_coef, pos_coef, pos, neg)
        rows = offs_m.to(tl.int64)[:, None] * D + offs_o[None, :]
        tile_in = row_in[:, None] & out_in[None, :]
        h_a = tl.dot(dot_coef, tl.load(a_ptr + rows, mask=tile_in, other=0.0), h_a,
                     input_precision="ieee")
        t_gsq = tl.dot(norm_coef, tl.load(gsq_ptr + rows, mask=tile_in, other=0.0), t_gsq,
                       input_precision="ieee")
    keys = offs_n.to(tl.int64)[:, None] * D + offs_o[None, :]
    out_mask = key_in[:, None] & out_in[None, :]
    k = tl.load(k_ptr + keys, mask=out_mask, other=0.0)
    tl.store(dk_ptr + keys, (h_a - 2.0 * k * t_gsq).to(dk_ptr.dtype.element_ty), mask=out_mask)


# ----------------------------------------------------------------------- entry points


class _Operands:
    """float32 rows the tiles are built from: a = q⊙g², g², k, k⊙k, the
    clamped anchor norms max(‖q⊙g‖, EPS) and s / those norms."""

    def __init__(self, q, k, gates, scale):
        if q.dtype not in _SUPPORTED_DTYPES or k.dtype != q.dtype or gates.dtype != q.dtype:
            raise TypeError(f"q, k and gates must share a dtype among {_SUPPORTED_DTYPES}, got "
                            f"{q.dtype}, {k.dtype} and {gates.dtype}")
        self.q, self.gates, self.k = q.float(), gates.float(), k.float().contiguous()
        self.gate_sq = self.gates * self.gates
        self.a = self.q * self.gate_sq
        self.k_sq = self.k * self.k
        self.norm = (self.q * self.gates).norm(dim=1).clamp_min(EPS)
        self.anchor_scale = (scale.float() / self.norm).contiguous()
        self.b, self.d = q.shape
        self.n = k.shape[0]
        self.block_d = _block_d(self.d, _MAX_BLOCK_D)


def _forward(ops: _Operands, labels, partner_labels, key_labels, neg_lse, pairs):
    out0 = torch.empty(ops.b, device=ops.q.device, dtype=torch.float32)
    out1 = torch.empty_like(out0)
    grid = lambda meta: (triton.cdiv(ops.b, meta["BLOCK_M"]),)  # noqa: E731
    _forward_kernel[grid](ops.a, ops.gate_sq, ops.k, ops.k_sq, ops.anchor_scale, labels,
                          partner_labels, key_labels, neg_lse if pairs else out0, out0, out1,
                          ops.b, ops.n, ops.d, PAIRS=pairs, BLOCK_D=ops.block_d)
    return out0, out1


def gated_fwd(q, k, gates, scale, labels, partner_labels, key_labels):
    ops = _Operands(q, k, gates, scale)
    return _forward(ops, labels, partner_labels, key_labels, None, False)


def gated_pair_fwd(q, k, gates, scale, labels, partner_labels, key_labels, neg_lse):
    ops = _Operands(q, k, gates, scale)
    return _forward(ops, labels, partner_labels, key_labels, neg_lse, True)


def gated_bwd(q, k, gates, scale, labels, partner_labels, key_labels, neg_lse, neg_coef,
              pos_coef, need_dk):
    ops = _Operands(q, k, gates, scale)
    dq, dgates = torch.empty_like(q), torch.empty_like(gates)
    dlogit = torch.empty(ops.b, device=q.device, dtype=torch.float32)
    out_slices = triton.cdiv(ops.d, ops.block_d)
    anchor_grid = lambda meta: (triton.cdiv(ops.b, meta["BLOCK_M"]), out_slices)  # noqa: E731
    _anchor_grad_kernel[anchor_grid](
        ops.q, ops.gates, ops.a, ops.gate_sq, ops.k, ops.k_sq, ops.norm, ops.anchor_scale,
        labels, partner_labels, key_labels, neg_lse, neg_coef, pos_coef, dq, dgates, dlogit,
        ops.b, ops.n, ops.d, BLOCK_D=ops.block_d, BLOCK_DO=ops.block_d)
    dk = torch.empty_like(k) if need_dk else k.new_empty(0)
    if need_dk:
        key_grid = lambda meta: (triton.cdiv(ops.n, meta["BLOCK_N"]), out_slices)  # noqa: E731
        _key_grad_kernel[key_grid](
            ops.k, ops.k_sq, ops.a, ops.gate_sq, ops.anchor_scale, labels, partner_labels,
            key_labels, neg_lse, neg_coef, pos_coef, dk, ops.b, ops.n, ops.d,
            BLOCK_D=ops.block_d, BLOCK_DO=ops.block_d)
    return dq, dk, dgates, dlogit.sum() / scale
