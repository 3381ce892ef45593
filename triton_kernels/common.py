"""Helpers shared by the Triton kernels of every family: tile configurations and
the autotuner, the JIT options of the tile kernels, numerically careful scalar
functions, the product with a gradient tile, and the launchers' checks.

Each family's kernel module imports only triton, torch and this module (and
``tuning`` for recorded configurations): the kernels are leaves.
"""

import os

import torch
import triton
import triton.language as tl

Tensor = torch.Tensor

_INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"

# Chunk of the feature dimension per tl.dot and the widest gradient slice of
# the autotuned tile kernels (ft_moco, gated).
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


# The autotuner of the tile kernels without recorded configurations (ft_moco,
# gated), keyed on D (it appends the tensors' dtypes itself).
_autotune = triton.autotune(configs=_configs(), key=["D"])
_jit = triton.jit(do_not_specialize=["N", "M", "exclude_offset"])


# ------------------------------------------------------------------ device helpers


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


def _row_grid(n: int):
    return lambda meta: (triton.cdiv(n, meta["BLOCK_M"]),)
