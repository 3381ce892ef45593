"""Triton kernels of AMCL, one head (semantics of pyclloss.reference.pair_quality's
``amcl_loss``; the kernel contract of pyclloss.ops.amcl).

Top-k: one program per block of rows walks the key tiles, s from tl.dot in
IEEE float32 (TF32 would reorder near neighbours). Each similarity and its
column become one int64 key, order-preserving float bits above and the
complemented column below, so that a plain integer sort orders by s
descending with ties to the lower column. The running best KPAD keys of a row
(KPAD = k rounded up to a power of two) merge with a tile of KPAD keys by the
bitonic step: the elementwise max of the best (descending) and the tile
(ascending) holds the KPAD largest of both, sorted again. O(n·KPAD) state.

Rows: one program per anchor a reads its k + 1 pairs (column 0 the positive,
then ``idx[a]``) in chunks, the rows z_j and φ_j loaded in registers, never a
gathered (n, k, D) tensor. The backward adds c·z_a to dz_j (and c·φ_a to dφ_j)
with atomics, float32 (the order of the additions is not fixed).
"""

import torch
import triton
import triton.language as tl

from .common import _sigmoid

Tensor = torch.Tensor

_BLOCK_M = 16  # rows per top-k program
_BLOCK_K = 16  # pairs per chunk of the row kernels
_NO_KEY = tl.constexpr(-(2 ** 63))  # below every real key: self, positive, padding


@triton.jit
def _keys(s, cols):
    """int64 keys ordered as (s descending, column ascending)."""
    bits = s.to(tl.int32, bitcast=True)
    ordered = tl.where(bits < 0, bits ^ 0x7FFFFFFF, bits)  # signed order of the floats
    return (ordered.to(tl.int64) << 32) | (0x7FFFFFFF - cols).to(tl.int64)


@triton.jit
def _topk_kernel(z_ptr, idx_ptr, n, d, k, BLOCK_M: tl.constexpr, KPAD: tl.constexpr,
                 BLOCK_D: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < n
    partner = (rows + n // 2) % n
    lanes = tl.arange(0, KPAD)
    best = tl.full([BLOCK_M, KPAD], _NO_KEY, tl.int64)
    for start in range(0, n, KPAD):
        cols = start + lanes
        s = tl.zeros([BLOCK_M, KPAD], tl.float32)
        for d0 in range(0, d, BLOCK_D):
            e = d0 + tl.arange(0, BLOCK_D)
            a = tl.load(z_ptr + rows.to(tl.int64)[:, None] * d + e[None, :],
                        mask=row_ok[:, None] & (e < d)[None, :], other=0.0)
            b = tl.load(z_ptr + cols.to(tl.int64)[:, None] * d + e[None, :],
                        mask=(cols < n)[:, None] & (e < d)[None, :], other=0.0)
            s = tl.dot(a, tl.trans(b), s, input_precision="ieee")
        negative = ((cols < n)[None, :] & (cols[None, :] != rows[:, None])
                    & (cols[None, :] != partner[:, None]))
        tile = tl.sort(tl.where(negative, _keys(s, cols[None, :]), _NO_KEY))
        best = tl.sort(tl.maximum(best, tile), descending=True)
    chosen = 0x7FFFFFFF - (best & 0x7FFFFFFF)
    tl.store(idx_ptr + rows.to(tl.int64)[:, None] * k + lanes[None, :], chosen,
             mask=row_ok[:, None] & (lanes < k)[None, :])


@triton.jit
def _pairs(z_ptr, phi_ptr, idx_ptr, a, c, n, d, h, k, e_d, e_h):
    """Column c of row a's pair list (0: the positive, then idx[a]): the rows
    z_j, φ_j (zero off the list) and whether each c is on it."""
    on = c <= k
    listed = tl.load(idx_ptr + a * k + c - 1, mask=(c >= 1) & on, other=0)
    j = tl.where(c == 0, (a + n // 2) % n, listed)
    z_j = tl.load(z_ptr + j[:, None] * d + e_d[None, :], mask=on[:, None] & (e_d < d)[None, :],
                  other=0.0)
    phi_j = tl.load(phi_ptr + j[:, None] * h + e_h[None, :],
                    mask=on[:, None] & (e_h < h)[None, :], other=0.0)
    return j, z_j, phi_j, on


@triton.jit
def _tau(g, tau_min, tau_max):
    """τ = τ_min + (τ_max − τ_min)·σ(−g) and dτ/dg."""
    sig = _sigmoid(-g)
    span = tau_max - tau_min
    return tau_min + span * sig, -span * sig * (1.0 - sig)


@triton.jit
def _rows_fwd_kernel(z_ptr, phi_ptr, idx_ptr, rows_ptr, n, d, h, k, tau_min, tau_max, beta,
                     BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_H: tl.constexpr):
    a = tl.program_id(0).to(tl.int64)
    e_d, e_h = tl.arange(0, BLOCK_D), tl.arange(0, BLOCK_H)
    z_a = tl.load(z_ptr + a * d + e_d, mask=e_d < d, other=0.0)
    phi_a = tl.load(phi_ptr + a * h + e_h, mask=e_h < h, other=0.0)
    total = tl.zeros([BLOCK_K], tl.float32)
    for c0 in range(0, k + 1, BLOCK_K):
        c = c0 + tl.arange(0, BLOCK_K)
        _, z_j, phi_j, on = _pairs(z_ptr, phi_ptr, idx_ptr, a, c, n, d, h, k, e_d, e_h)
        s = tl.sum(z_j * z_a[None, :], axis=1)
        tau, _ = _tau(tl.sum(phi_j * phi_a[None, :], axis=1), tau_min, tau_max)
        positive = -s / tau + beta * (0.5 * d * tl.log(tau) + 1.0 / tau)
        negative = s / (k * tau) - beta * (tl.log(tau) + 1.0 / tau)
        total += tl.where(on, tl.where(c == 0, positive, negative), 0.0)
    tl.store(rows_ptr + a, tl.sum(total, axis=0))


@triton.jit
def _rows_bwd_kernel(z_ptr, phi_ptr, idx_ptr, grad_rows_ptr, dz_ptr, dphi_ptr, n, d, h, k,
                     tau_min, tau_max, beta, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr,
                     BLOCK_H: tl.constexpr):
    a = tl.program_id(0).to(tl.int64)
    e_d, e_h = tl.arange(0, BLOCK_D), tl.arange(0, BLOCK_H)
    z_a = tl.load(z_ptr + a * d + e_d, mask=e_d < d, other=0.0)
    phi_a = tl.load(phi_ptr + a * h + e_h, mask=e_h < h, other=0.0)
    grad = tl.load(grad_rows_ptr + a)
    dz_a = tl.zeros([BLOCK_D], tl.float32)
    dphi_a = tl.zeros([BLOCK_H], tl.float32)
    for c0 in range(0, k + 1, BLOCK_K):
        c = c0 + tl.arange(0, BLOCK_K)
        j, z_j, phi_j, on = _pairs(z_ptr, phi_ptr, idx_ptr, a, c, n, d, h, k, e_d, e_h)
        s = tl.sum(z_j * z_a[None, :], axis=1)
        tau, dtau_dg = _tau(tl.sum(phi_j * phi_a[None, :], axis=1), tau_min, tau_max)
        inv = 1.0 / tau
        ds = tl.where(c == 0, -inv, inv / k)
        dtau = tl.where(c == 0, s * inv * inv + beta * (0.5 * d * inv - inv * inv),
                        -s * inv * inv / k - beta * (inv - inv * inv))
        c_s = tl.where(on, grad * ds, 0.0)
        c_g = tl.where(on, grad * dtau * dtau_dg, 0.0)
        dz_a += tl.sum(c_s[:, None] * z_j, axis=0)
        dphi_a += tl.sum(c_g[:, None] * phi_j, axis=0)
        tl.atomic_add(dz_ptr + j[:, None] * d + e_d[None, :], c_s[:, None] * z_a[None, :],
                      mask=on[:, None] & (e_d < d)[None, :])
        tl.atomic_add(dphi_ptr + j[:, None] * h + e_h[None, :], c_g[:, None] * phi_a[None, :],
                      mask=on[:, None] & (e_h < h)[None, :])
    tl.atomic_add(dz_ptr + a * d + e_d, dz_a, mask=e_d < d)
    tl.atomic_add(dphi_ptr + a * h + e_h, dphi_a, mask=e_h < h)


def _check(z: Tensor, phi: Tensor = None) -> None:
    for name, x in (("z", z), ("phi", phi)):
        if x is not None and (x.dim() != 2 or x.dtype != torch.float32):
            raise TypeError(f"amcl: the Triton kernels take float32 (n, ·) {name}, got "
                            f"{x.dtype} of shape {tuple(x.shape)}")


def _block(width: int) -> int:
    return max(16, triton.next_power_of_2(width))


def amcl_topk(z: Tensor, k: int) -> Tensor:
    _check(z)
    n, d = z.shape
    if not 1 <= k <= min(n - 2, 256):
        raise ValueError(f"amcl: the Triton backend takes topk <= 256 (k = min(topk, n − 2) "
                         f"must be in [1, {min(n - 2, 256)}], got {k})")
    idx = torch.empty(n, k, dtype=torch.int64, device=z.device)
    _topk_kernel[(triton.cdiv(n, _BLOCK_M),)](z.contiguous(), idx, n, d, k, BLOCK_M=_BLOCK_M,
                                             KPAD=_block(k), BLOCK_D=min(64, _block(d)))
    return idx


def _row_args(z: Tensor, phi: Tensor, idx: Tensor):
    _check(z, phi)
    (n, d), h, k = z.shape, phi.shape[1], idx.shape[1]
    blocks = dict(BLOCK_K=_BLOCK_K, BLOCK_D=_block(d), BLOCK_H=_block(h))
    return (n, d, h, k), blocks


def amcl_fwd(z: Tensor, phi: Tensor, idx: Tensor, tau_min: float, tau_max: float,
             beta: float) -> Tensor:
    sizes, blocks = _row_args(z, phi, idx)
    rows = z.new_empty(sizes[0])
    _rows_fwd_kernel[(sizes[0],)](z.contiguous(), phi.contiguous(), idx.contiguous(), rows,
                                  *sizes, tau_min, tau_max, beta, **blocks)
    return rows


def amcl_bwd(z: Tensor, phi: Tensor, idx: Tensor, grad_rows: Tensor, tau_min: float,
             tau_max: float, beta: float) -> tuple[Tensor, Tensor]:
    sizes, blocks = _row_args(z, phi, idx)
    dz, dphi = torch.zeros_like(z), torch.zeros_like(phi)
    _rows_bwd_kernel[(sizes[0],)](z.contiguous(), phi.contiguous(), idx.contiguous(),
                                  grad_rows.to(torch.float32).contiguous(), dz, dphi, *sizes,
                                  tau_min, tau_max, beta, **blocks)
    return dz, dphi
