"""Unit rows as a torch.library custom op: the L2 normalisation of the rows of
several parts stacked in order, ``normalize(cat(parts))``, which the
cosine-similarity losses apply before the fused core.

* ``pyclloss::unit_rows(parts, backend) -> (rows, norms)``: rows (N, D) in the
  parts' dtype and the clamped norms (N,) in the statistics dtype (a saved
  statistic, no gradient); semantics in ``pyclloss.reference.unit_rows``.
* ``pyclloss::unit_rows_backward(parts, norms, grad, backend) -> grads``.

The cpp kernels do the concatenation and the normalisation in one pass on
the calling thread (csrc/cpu/unit_rows.cpp): torch's ``cat`` and
``normalize`` and their backward run about a dozen parallel regions over
N×D, each of which, on a machine with a busy core, can wait for a
descheduled thread. The other backends run torch's ops (``unit_rows``).
"""

from typing import List, Tuple

import torch
import torch.nn.functional as F

from .._stats import stats_dtype
from ..backends import KernelFamily, compiled, module
from ..reference import unit_rows as reference

Tensor = torch.Tensor

KERNELS = KernelFamily("unit_rows", cpp=compiled("unit_rows_fwd", "unit_rows_bwd"),
                       reference=module(reference))


@torch.library.custom_op("pyclloss::unit_rows", mutates_args=())
def unit_rows_op(parts: List[Tensor], backend: str) -> Tuple[Tensor, Tensor]:
    rows, norms = KERNELS.kernel(backend, "unit_rows_fwd")(parts)
    return rows, norms


@unit_rows_op.register_fake
def _(parts, backend):
    n = sum(part.shape[0] for part in parts)
    first = parts[0]
    return first.new_empty(n, first.shape[1]), first.new_empty(n, dtype=stats_dtype(first.dtype))


@torch.library.custom_op("pyclloss::unit_rows_backward", mutates_args=())
def unit_rows_backward(parts: List[Tensor], norms: Tensor, grad: Tensor,
                       backend: str) -> List[Tensor]:
    return [g.contiguous() for g in KERNELS.kernel(backend, "unit_rows_bwd")(
        parts, norms, grad.contiguous())]


@unit_rows_backward.register_fake
def _(parts, norms, grad, backend):
    return [torch.empty_like(part) for part in parts]


def _setup(ctx, inputs, output):
    parts, backend = inputs
    ctx.save_for_backward(*parts, output[1])
    ctx.mark_non_differentiable(output[1])
    ctx.backend = backend


def _backward(ctx, grad_rows, grad_norms):
    *parts, norms = ctx.saved_tensors
    return unit_rows_backward(parts, norms, grad_rows, ctx.backend), None


unit_rows_op.register_autograd(_backward, setup_context=_setup)


def _whole(parts: List[Tensor]) -> List[Tensor]:
    """``[base]`` when the parts are consecutive row blocks that make up one
    contiguous tensor (``z.chunk(2)`` of a batch of both views), else ``parts``:
    the gradient then reaches the base directly instead of through one
    slice backward per part, each a full-size zero fill and copy."""
    base = parts[0]._base
    if base is None or len(parts) < 2 or base.dim() != 2 or not base.is_contiguous():
        return parts
    row_bytes = base.shape[1] * base.element_size()
    address = base.data_ptr()
    for part in parts:
        if (part._base is not base or part.shape[1] != base.shape[1]
                or not part.is_contiguous() or part.data_ptr() != address):
            return parts
        address += part.shape[0] * row_bytes
    return [base] if address == base.data_ptr() + base.shape[0] * row_bytes else parts


def unit_rows(parts: List[Tensor], backend: str) -> Tensor:
    """``normalize(cat(parts))`` in the statistics dtype, returned in the parts'
    dtype, contiguous: through the cpp kernels on ``backend="cpp"``, through
    torch's ops on the others (whose devices have their own fused kernels)."""
    parts = _whole(parts)
    if backend == "cpp":
        return unit_rows_op(parts, backend)[0]
    x = torch.cat(parts) if len(parts) > 1 else parts[0]
    return F.normalize(x.to(stats_dtype(x.dtype)), dim=-1).to(x.dtype).contiguous()
