"""The fused InfoNCE core as torch.library custom ops.

Three differentiable ops (``infonce_fwd``, ``infonce_pair_fwd``,
``siglip_fwd``) return O(N) statistics; their backward is one more custom op
per family (``infonce_bwd``, ``siglip_bwd``) that recomputes the logit tiles,
or, when one tensor is passed as both q and k, ``infonce_self_bwd``.
Every op takes the concrete backend name last; the kernels of each backend
follow docs/fused_core.md. Fake kernels make them traceable by torch.compile.
"""

from typing import List, Optional, Tuple

import torch

from ..backends import kernel
from ..reference.info_nce import stats_dtype

Tensor = torch.Tensor
FAMILY = "info_nce"
SELF_KERNELS = ("cpp",)  # backends with an infonce_self_bwd kernel of their own


def _run(backend: str, name: str, *args):
    return kernel(backend, FAMILY, name)(*args)


def _contiguous(*tensors: Optional[Tensor]) -> List[Optional[Tensor]]:
    return [t.contiguous() if t is not None else None for t in tensors]


# ------------------------------------------------------------------ infonce_fwd


@torch.library.custom_op("pyclloss::infonce_fwd", mutates_args=())
def infonce_fwd(q: Tensor, k: Tensor, scale: Tensor, q_labels: Optional[Tensor],
                k_labels: Optional[Tensor], exclude_offset: Optional[int], neg_only: bool,
                col_stats: bool, backend: str) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    """Row LSE over the denominator set, sum and count of positive logits, and
    (``col_stats``) column LSE. See docs/fused_core.md."""
    outs = _run(backend, "infonce_fwd", q, k, scale, q_labels, k_labels, exclude_offset,
                neg_only, col_stats)
    return tuple(o.contiguous() for o in outs)


@infonce_fwd.register_fake
def _(q, k, scale, q_labels, k_labels, exclude_offset, neg_only, col_stats, backend):
    dt = stats_dtype(q.dtype)
    n, m = q.shape[0], k.shape[0]
    row = q.new_empty(n, dtype=dt)
    return row, torch.empty_like(row), torch.empty_like(row), q.new_empty(m if col_stats else 0, dtype=dt)


def _core_bwd(ctx, q, k, scale, q_labels, k_labels, neg_only, *terms):
    """(dq, dk, dscale) through infonce_bwd, or (dz, None, dscale) through
    infonce_self_bwd when one tensor was passed as both q and k (``ctx.self``):
    autograd adds dq and dk into that tensor's gradient anyway."""
    if ctx.self:
        dz, dscale = torch.ops.pyclloss.infonce_self_bwd(
            q, scale, q_labels, k_labels, ctx.exclude_offset, neg_only, *terms, ctx.backend)
        return dz, None, dscale
    dq, dk, dscale = torch.ops.pyclloss.infonce_bwd(
        q, k, scale, q_labels, k_labels, ctx.exclude_offset, neg_only, *terms,
        ctx.needs_input_grad[1], ctx.backend)
    return dq, dk if ctx.needs_input_grad[1] else None, dscale


def _infonce_fwd_setup(ctx, inputs, output):
    q, k, scale, q_labels, k_labels, exclude_offset, neg_only, col_stats, backend = inputs
    row_lse, _, _, col_lse = output
    ctx.save_for_backward(q, k, scale, q_labels, k_labels, row_lse, col_lse if col_stats else None)
    ctx.exclude_offset, ctx.neg_only, ctx.backend = exclude_offset, neg_only, backend
    ctx.self = q is k


def _infonce_fwd_backward(ctx, g_row_lse, g_pos_sum, g_pos_count, g_col_lse):
    q, k, scale, q_labels, k_labels, row_lse, col_lse = ctx.saved_tensors
    dq, dk, dscale = _core_bwd(
        ctx, q, k, scale, q_labels, k_labels, ctx.neg_only,
        row_lse if g_row_lse is not None else None, g_row_lse,
        col_lse if g_col_lse is not None and col_lse is not None else None,
        g_col_lse if col_lse is not None else None,
        g_pos_sum if q_labels is not None else None, None)
    return dq, dk, dscale, None, None, None, None, None, None


infonce_fwd.register_autograd(_infonce_fwd_backward, setup_context=_infonce_fwd_setup)


# ------------------------------------------------------------- infonce_pair_fwd


@torch.library.custom_op("pyclloss::infonce_pair_fwd", mutates_args=())
def infonce_pair_fwd(q: Tensor, k: Tensor, scale: Tensor, q_labels: Tensor, k_labels: Tensor,
                     exclude_offset: Optional[int], neg_lse: Tensor,
                     backend: str) -> Tuple[Tensor, Tensor]:
    """Per row: sum over positives of softplus(neg_lse - l) and of sigmoid(neg_lse - l)."""
    outs = _run(backend, "infonce_pair_fwd", q, k, scale, q_labels, k_labels, exclude_offset,
                neg_lse)
    return tuple(o.contiguous() for o in outs)


@infonce_pair_fwd.register_fake
def _(q, k, scale, q_labels, k_labels, exclude_offset, neg_lse, backend):
    row = q.new_empty(q.shape[0], dtype=stats_dtype(q.dtype))
    return row, torch.empty_like(row)


def _pair_setup(ctx, inputs, output):
    q, k, scale, q_labels, k_labels, exclude_offset, neg_lse, backend = inputs
    ctx.save_for_backward(q, k, scale, q_labels, k_labels, neg_lse, output[1])
    ctx.exclude_offset, ctx.backend = exclude_offset, backend
    ctx.self = q is k


def _pair_backward(ctx, g_loss_sum, g_sigmoid_sum):
    q, k, scale, q_labels, k_labels, neg_lse, sigmoid_sum = ctx.saved_tensors
    if g_loss_sum is None:
        return (None,) * 8
    dq, dk, dscale = _core_bwd(ctx, q, k, scale, q_labels, k_labels, False, None, None, None,
                               None, -g_loss_sum, neg_lse)
    return dq, dk, dscale, None, None, None, g_loss_sum * sigmoid_sum, None


infonce_pair_fwd.register_autograd(_pair_backward, setup_context=_pair_setup)


# ------------------------------------------------------------------ infonce_bwd


@torch.library.custom_op("pyclloss::infonce_bwd", mutates_args=())
def infonce_bwd(q: Tensor, k: Tensor, scale: Tensor, q_labels: Optional[Tensor],
                k_labels: Optional[Tensor], exclude_offset: Optional[int], neg_only: bool,
                row_lse: Optional[Tensor], row_coef: Optional[Tensor], col_lse: Optional[Tensor],
                col_coef: Optional[Tensor], pos_coef: Optional[Tensor], pair_lse: Optional[Tensor],
                need_dk: bool, backend: str) -> Tuple[Tensor, Tensor, Tensor]:
    """dq, dk, dscale of a loss whose logit gradient is G (docs/fused_core.md)."""
    coefs = _contiguous(row_lse, row_coef, col_lse, col_coef, pos_coef, pair_lse)
    outs = _run(backend, "infonce_bwd", q, k, scale, q_labels, k_labels, exclude_offset, neg_only,
                *coefs, need_dk)
    return tuple(o.contiguous() for o in outs)


@infonce_bwd.register_fake
def _(q, k, scale, q_labels, k_labels, exclude_offset, neg_only, row_lse, row_coef, col_lse,
      col_coef, pos_coef, pair_lse, need_dk, backend):
    dk = torch.empty_like(k) if need_dk else k.new_empty(0)
    return torch.empty_like(q), dk, q.new_empty((), dtype=stats_dtype(q.dtype))


@torch.library.custom_op("pyclloss::infonce_self_bwd", mutates_args=())
def infonce_self_bwd(z: Tensor, scale: Tensor, q_labels: Optional[Tensor],
                     k_labels: Optional[Tensor], exclude_offset: Optional[int], neg_only: bool,
                     row_lse: Optional[Tensor], row_coef: Optional[Tensor],
                     col_lse: Optional[Tensor], col_coef: Optional[Tensor],
                     pos_coef: Optional[Tensor], pair_lse: Optional[Tensor],
                     backend: str) -> Tuple[Tensor, Tensor]:
    """infonce_bwd with q = k = z: (dq + dk, dscale). The cpp kernel computes each
    unordered tile pair once; the other backends add infonce_bwd's dq and dk."""
    coefs = _contiguous(row_lse, row_coef, col_lse, col_coef, pos_coef, pair_lse)
    args = (scale, q_labels, k_labels, exclude_offset, neg_only)
    if backend in SELF_KERNELS:
        dz, dscale = _run(backend, "infonce_self_bwd", z, *args, *coefs)
        return dz.contiguous(), dscale
    dq, dk, dscale = _run(backend, "infonce_bwd", z, z, *args, *coefs, True)
    return (dq + dk).contiguous(), dscale.contiguous()


@infonce_self_bwd.register_fake
def _(z, scale, q_labels, k_labels, exclude_offset, neg_only, row_lse, row_coef, col_lse,
      col_coef, pos_coef, pair_lse, backend):
    return torch.empty_like(z), z.new_empty((), dtype=stats_dtype(z.dtype))


# ---------------------------------------------------------------------- siglip


@torch.library.custom_op("pyclloss::siglip_fwd", mutates_args=())
def siglip_fwd(q: Tensor, k: Tensor, scale: Tensor, bias: Tensor, q_labels: Optional[Tensor],
               k_labels: Optional[Tensor], backend: str) -> Tensor:
    """Per row: sum_j -logsigmoid(z_ij (l_ij + b)), z = +1 on positives, else -1."""
    return _run(backend, "siglip_fwd", q, k, scale, bias, q_labels, k_labels).contiguous()


@siglip_fwd.register_fake
def _(q, k, scale, bias, q_labels, k_labels, backend):
    return q.new_empty(q.shape[0], dtype=stats_dtype(q.dtype))


def _siglip_setup(ctx, inputs, output):
    q, k, scale, bias, q_labels, k_labels, backend = inputs
    ctx.save_for_backward(q, k, scale, bias, q_labels, k_labels)
    ctx.backend = backend


def _siglip_backward(ctx, g_row):
    q, k, scale, bias, q_labels, k_labels = ctx.saved_tensors
    dq, dk, dscale, dbias = torch.ops.pyclloss.siglip_bwd(
        q, k, scale, bias, q_labels, k_labels, g_row.contiguous(), ctx.needs_input_grad[1],
        ctx.backend)
    return dq, dk if ctx.needs_input_grad[1] else None, dscale, dbias, None, None, None


siglip_fwd.register_autograd(_siglip_backward, setup_context=_siglip_setup)


@torch.library.custom_op("pyclloss::siglip_bwd", mutates_args=())
def siglip_bwd(q: Tensor, k: Tensor, scale: Tensor, bias: Tensor, q_labels: Optional[Tensor],
               k_labels: Optional[Tensor], row_coef: Tensor, need_dk: bool,
               backend: str) -> List[Tensor]:
    """dq, dk, dscale, dbias of the SigLIP row losses weighted by row_coef."""
    outs = _run(backend, "siglip_bwd", q, k, scale, bias, q_labels, k_labels, row_coef, need_dk)
    return [o.contiguous() for o in outs]


@siglip_bwd.register_fake
def _(q, k, scale, bias, q_labels, k_labels, row_coef, need_dk, backend):
    dk = torch.empty_like(k) if need_dk else k.new_empty(0)
    stat = q.new_empty((), dtype=stats_dtype(q.dtype))
    return [torch.empty_like(q), dk, stat, torch.empty_like(stat)]
