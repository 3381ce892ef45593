"""The fused InfoNCE core as torch.library custom ops.

Three differentiable ops (``infonce_fwd``, ``infonce_pair_fwd``,
``siglip_fwd``) return O(N) statistics; their backward is one more custom op
per family (``infonce_bwd``, ``siglip_bwd``) that recomputes the logit tiles.
Every op takes the concrete backend name last; the kernels of each backend
follow docs/fused_core.md. Fake kernels make them traceable by torch.compile.
"""

from typing import List, Optional, Tuple

import torch

from .._stats import stats_dtype
from ..backends import KernelFamily, compiled, lazy_module, module
from ..reference import info_nce as reference

Tensor = torch.Tensor


def _triton_kernels():
    from ..triton_kernels import info_nce as kernels  # Triton loads on first use

    return kernels


_COMPILED = compiled("infonce_fwd", "infonce_pair_fwd", "infonce_bwd", "siglip_fwd", "siglip_bwd")
KERNELS = KernelFamily("info_nce", cpp=_COMPILED, cuda=_COMPILED,
                       triton=lazy_module(_triton_kernels), reference=module(reference))


def _run(backend: str, name: str, *args):
    return KERNELS.kernel(backend, name)(*args)


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


def _infonce_fwd_setup(ctx, inputs, output):
    q, k, scale, q_labels, k_labels, exclude_offset, neg_only, col_stats, backend = inputs
    row_lse, _, _, col_lse = output
    ctx.save_for_backward(q, k, scale, q_labels, k_labels, row_lse, col_lse if col_stats else None)
    ctx.exclude_offset, ctx.neg_only, ctx.backend = exclude_offset, neg_only, backend


def _infonce_fwd_backward(ctx, g_row_lse, g_pos_sum, g_pos_count, g_col_lse):
    q, k, scale, q_labels, k_labels, row_lse, col_lse = ctx.saved_tensors
    dq, dk, dscale = torch.ops.pyclloss.infonce_bwd(
        q, k, scale, q_labels, k_labels, ctx.exclude_offset, ctx.neg_only,
        row_lse if g_row_lse is not None else None, g_row_lse,
        col_lse if g_col_lse is not None and col_lse is not None else None,
        g_col_lse if col_lse is not None else None,
        g_pos_sum if q_labels is not None else None, None,
        ctx.needs_input_grad[1], ctx.backend)
    return dq, dk if ctx.needs_input_grad[1] else None, dscale, None, None, None, None, None, None


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


def _pair_backward(ctx, g_loss_sum, g_sigmoid_sum):
    q, k, scale, q_labels, k_labels, neg_lse, sigmoid_sum = ctx.saved_tensors
    if g_loss_sum is None:
        return (None,) * 8
    dq, dk, dscale = torch.ops.pyclloss.infonce_bwd(
        q, k, scale, q_labels, k_labels, ctx.exclude_offset, False, None, None, None, None,
        -g_loss_sum, neg_lse, ctx.needs_input_grad[1], ctx.backend)
    return (dq, dk if ctx.needs_input_grad[1] else None, dscale, None, None, None,
            g_loss_sum * sigmoid_sum, None)


infonce_pair_fwd.register_autograd(_pair_backward, setup_context=_pair_setup)


# ------------------------------------------------------------------ infonce_bwd


@torch.library.custom_op("pyclloss::infonce_bwd", mutates_args=())
def infonce_bwd(q: Tensor, k: Tensor, scale: Tensor, q_labels: Optional[Tensor],
                k_labels: Optional[Tensor], exclude_offset: Optional[int], neg_only: bool,
                row_lse: Optional[Tensor], row_coef: Optional[Tensor], col_lse: Optional[Tensor],
                col_coef: Optional[Tensor], pos_coef: Optional[Tensor], pair_lse: Optional[Tensor],
                need_dk: bool, backend: str) -> Tuple[Tensor, Tensor, Tensor]:
    """dq, dk, dscale of a loss whose logit gradient is G (docs/fused_core.md)."""
    contiguous = lambda t: t.contiguous() if t is not None else None
    coefs = [contiguous(t) for t in (row_lse, row_coef, col_lse, col_coef, pos_coef, pair_lse)]
    outs = _run(backend, "infonce_bwd", q, k, scale, q_labels, k_labels, exclude_offset, neg_only,
                *coefs, need_dk)
    return tuple(o.contiguous() for o in outs)


@infonce_bwd.register_fake
def _(q, k, scale, q_labels, k_labels, exclude_offset, neg_only, row_lse, row_coef, col_lse,
      col_coef, pos_coef, pair_lse, need_dk, backend):
    dk = torch.empty_like(k) if need_dk else k.new_empty(0)
    return torch.empty_like(q), dk, q.new_empty((), dtype=stats_dtype(q.dtype))


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
