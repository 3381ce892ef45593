"""The fused InfoNCE core as torch.library custom ops.

Three differentiable ops (``infonce_fwd``, ``infonce_pair_fwd``,
``siglip_fwd``) return O(N) statistics; their backward is one more custom op
per family (``infonce_bwd``, ``siglip_bwd``) that recomputes the logit tiles,
or, when one tensor is passed as both q and k, ``infonce_self_bwd``.
Every op takes the concrete backend name last; the kernels of each backend
follow docs/fused_core.md. Fake kernels make them traceable by torch.compile.

Over a process group (``pyclloss.distributed``), ``row_stats``,
``pair_stats`` and ``siglip_rows`` give the same statistics for the local
anchors against every rank's keys, gathered or passed around the ring.
"""

from typing import List, Optional, Tuple

import torch

from .. import distributed
from .._stats import stats_dtype
from ..backends import KernelFamily, compiled, lazy_module, module
from ..reference import info_nce as reference

Tensor = torch.Tensor


def _triton_kernels():
    from ..triton_kernels import info_nce as kernels  # Triton loads on first use

    return kernels


_COMPILED = ("infonce_fwd", "infonce_pair_fwd", "infonce_bwd", "siglip_fwd", "siglip_bwd")
# infonce_self_bwd is optional: backends without it add infonce_bwd's dq and dk.
KERNELS = KernelFamily("info_nce", cpp=compiled(*_COMPILED, "infonce_self_bwd"),
                       cuda=compiled(*_COMPILED),
                       triton=lazy_module(_triton_kernels), reference=module(reference))


def _run(backend: str, name: str, *args):
    return KERNELS.kernel(backend, name)(*args)


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
    unordered tile pair once, as does Triton's; the other backends add
    infonce_bwd's dq and dk."""
    coefs = _contiguous(row_lse, row_coef, col_lse, col_coef, pos_coef, pair_lse)
    args = (scale, q_labels, k_labels, exclude_offset, neg_only)
    if KERNELS.has(backend, "infonce_self_bwd"):
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


# --------------------------------------------------------------- over a process group


def _self_offset(self_keys: bool, step: int) -> Optional[int]:
    """Exclusion offset of the block visited at ``step``: the diagonal of the local block."""
    return 0 if self_keys and step == 0 else None


def _ring_row_stats(q, k, scale, q_labels, k_labels, self_keys, neg_only, ring, sizes, backend):
    dt = stats_dtype(q.dtype)
    row_lse = torch.full((q.shape[0],), float("-inf"), dtype=dt, device=q.device)
    pos_sum, pos_count = torch.zeros_like(row_lse), torch.zeros_like(row_lse)

    def visit(step, block):
        lse, p_sum, p_count, _ = infonce_fwd(q, block[0], scale, q_labels, block[1],
                                             _self_offset(self_keys, step), neg_only, False,
                                             backend)
        torch.logaddexp(row_lse, lse, out=row_lse)
        pos_sum.add_(p_sum)
        pos_count.add_(p_count)

    distributed.ring_forward(ring, (k, k_labels), sizes, visit)
    return row_lse, pos_sum, pos_count


def _ring_infonce_backward(ctx, row_lse, row_coef, pos_coef, pair_lse, neg_only):
    q, k, scale, q_labels, k_labels = ctx.saved_tensors[:5]
    need_dk = ctx.needs_input_grad[1]

    def visit(step, block):
        return infonce_bwd(q, block[0], scale, q_labels, block[1],
                           _self_offset(ctx.self_keys, step), neg_only,
                           row_lse if row_coef is not None else None, row_coef, None, None,
                           pos_coef, pair_lse, need_dk, ctx.backend)

    dq, dk, dscale = distributed.ring_backward(ctx.ring, (k, k_labels), ctx.sizes, need_dk, visit)
    return dq.to(q.dtype), dk.to(k.dtype) if need_dk else None, dscale


class _RingRowStats(torch.autograd.Function):
    """(row_lse, pos_sum, pos_count) of local anchors against every rank's keys."""

    @staticmethod
    def forward(ctx, q, k, scale, q_labels, k_labels, self_keys, neg_only, ring, sizes, backend):
        ctx.set_materialize_grads(False)
        row_lse, pos_sum, pos_count = _ring_row_stats(q, k, scale, q_labels, k_labels,
                                                      self_keys, neg_only, ring, sizes, backend)
        ctx.save_for_backward(q, k, scale, q_labels, k_labels, row_lse)
        ctx.self_keys, ctx.neg_only, ctx.ring, ctx.sizes = self_keys, neg_only, ring, sizes
        ctx.backend = backend
        ctx.mark_non_differentiable(pos_count)
        return row_lse, pos_sum, pos_count

    @staticmethod
    def backward(ctx, g_row_lse, g_pos_sum, _):
        row_lse = ctx.saved_tensors[5]
        dq, dk, dscale = _ring_infonce_backward(ctx, row_lse, g_row_lse, g_pos_sum, None,
                                                ctx.neg_only)
        return dq, dk, dscale, None, None, None, None, None, None, None


class _RingPairs:
    """pair_nt_xent's kernels on one key block, for ``distributed.ring_pair_stats``.
    Anchors: (z, scale, labels); the keys are the anchors, each anchor's own row
    excluded."""

    def __init__(self, backend: str):
        self.backend = backend

    def neg_stats(self, anchors, step, block):
        z, scale, labels = anchors
        neg_lse, _, pos_count, _ = infonce_fwd(z, block[0], scale, labels, block[1],
                                               _self_offset(True, step), True, False,
                                               self.backend)
        return neg_lse, pos_count

    def pair_terms(self, anchors, step, block, neg_lse):
        z, scale, labels = anchors
        return infonce_pair_fwd(z, block[0], scale, labels, block[1], _self_offset(True, step),
                                neg_lse, self.backend)

    def grads(self, anchors, step, block, neg_lse, neg_coef, pos_coef, need_dk):
        z, scale, labels = anchors
        return infonce_bwd(z, block[0], scale, labels, block[1], _self_offset(True, step), True,
                           neg_lse, neg_coef, None, None, pos_coef, neg_lse, need_dk,
                           self.backend)


class _RingSiglipRows(torch.autograd.Function):
    """SigLIP row losses of local anchors against every rank's keys (neighbour exchange)."""

    @staticmethod
    def forward(ctx, q, k, scale, bias, q_labels, k_labels, ring, sizes, backend):
        rows = torch.zeros(q.shape[0], dtype=stats_dtype(q.dtype), device=q.device)

        def visit(step, block):
            rows.add_(siglip_fwd(q, block[0], scale, bias, q_labels, block[1], backend))

        distributed.ring_forward(ring, (k, k_labels), sizes, visit)
        ctx.save_for_backward(q, k, scale, bias, q_labels, k_labels)
        ctx.ring, ctx.sizes, ctx.backend = ring, sizes, backend
        return rows

    @staticmethod
    def backward(ctx, g_rows):
        q, k, scale, bias, q_labels, k_labels = ctx.saved_tensors
        need_dk = ctx.needs_input_grad[1]
        g_rows = g_rows.contiguous()

        def visit(step, block):
            return siglip_bwd(q, block[0], scale, bias, q_labels, block[1], g_rows, need_dk,
                              ctx.backend)

        dq, dk, dscale, dbias = distributed.ring_backward(ctx.ring, (k, k_labels), ctx.sizes,
                                                          need_dk, visit)
        return (dq.to(q.dtype), dk.to(k.dtype) if need_dk else None, dscale, dbias,
                None, None, None, None, None)


def row_stats(exchange: distributed.Exchange, q: Tensor, q_labels: Tensor, keys: Tensor,
              key_labels: Tensor, layout: distributed.Layout, scale: Tensor, self_keys: bool,
              neg_only: bool, backend: str) -> Tuple[Tensor, Tensor, Tensor]:
    """``infonce_fwd``'s (row_lse, pos_sum, pos_count) of the local anchors
    against the keys of every rank (``self_keys``: the keys are the anchors,
    each anchor's own row excluded)."""
    if exchange.ring is not None:
        return _RingRowStats.apply(q, keys, scale, q_labels, key_labels, self_keys, neg_only,
                                   exchange.ring, layout.sizes, backend)
    all_keys, all_labels = exchange.gather(keys, key_labels, layout)
    offset = layout.offset if self_keys else None
    return infonce_fwd(q, all_keys, scale, q_labels, all_labels, offset, neg_only, False,
                       backend)[:3]


def pair_stats(exchange: distributed.Exchange, z: Tensor, labels: Tensor,
               layout: distributed.Layout, scale: Tensor, backend: str) -> Tuple[Tensor, Tensor]:
    """(pos_count, loss_sum) of the pairwise form: the local rows as anchors,
    every rank's rows as keys."""
    if exchange.ring is not None:
        return distributed.ring_pair_stats(_RingPairs(backend), exchange, layout, z, labels, z,
                                           scale, labels)
    all_z, all_labels = exchange.gather(z, labels, layout)
    neg_lse, _, pos_count, _ = infonce_fwd(z, all_z, scale, labels, all_labels, layout.offset,
                                           True, False, backend)
    loss_sum, _ = infonce_pair_fwd(z, all_z, scale, labels, all_labels, layout.offset, neg_lse,
                                   backend)
    return pos_count, loss_sum


def siglip_rows(exchange: distributed.Exchange, q: Tensor, q_labels: Tensor, keys: Tensor,
                key_labels: Tensor, layout: distributed.Layout, scale: Tensor, bias: Tensor,
                backend: str) -> Tensor:
    """SigLIP row losses of the local anchors against every rank's keys."""
    if exchange.ring is not None:
        return _RingSiglipRows.apply(q, keys, scale, bias, q_labels, key_labels, exchange.ring,
                                     layout.sizes, backend)
    all_keys, all_labels = exchange.gather(keys, key_labels, layout)
    return siglip_fwd(q, all_keys, scale, bias, q_labels, all_labels, backend)
