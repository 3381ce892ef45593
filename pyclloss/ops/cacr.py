"""CACR's repulsion statistics as torch.library custom ops.

* ``pyclloss::cacr_repulsion(anchors, others, temperature, offset) -> (mean, lse)``:
  for anchors a (n, D) against the other view's rows b (m, D), anchor i
  paired with row ``i + offset`` of b (left out),
  ``mean_i = Σ_{j ≠ i+offset} softmax_j(−τ·d_ij)·d_ij`` with ``d_ij = ‖a_i − b_j‖²``,
  and ``lse_i`` the log-sum-exp of −τ·d_i· that the backward recomputes the
  weights from. ``mean`` is differentiable (the softmax weights' Jacobian
  included); ``lse`` is a saved statistic and gets no gradient.
* ``pyclloss::cacr_repulsion_backward(...) -> (grad_anchors, grad_others)``.

Kernels (``backend`` "cpp", "triton" or "reference"; semantics in
``pyclloss.reference.cacr``): ``cacr_repulsion_fwd`` and ``cacr_repulsion_bwd``
stream tiles of b with an online softmax (running max, Σe, Σe·d) and never
hold an n×m buffer. Distances come from a GEMM with the near pairs, which the
GEMM form loses to cancellation, recomputed from the differences; rows far
from the origin are centred first (``_centered``). They take the statistics
dtype (float32 or float64; Triton float32).
"""

from typing import Tuple

import torch

from ..backends import KernelFamily, compiled, lazy_module, module
from ..reference import cacr as reference

Tensor = torch.Tensor


def _triton_kernels():
    from ..triton_kernels import cacr as kernels  # Triton loads on first use

    return kernels


KERNELS = KernelFamily(
    "cacr", cpp=compiled("cacr_repulsion_fwd", "cacr_repulsion_bwd"),
    triton=lazy_module(_triton_kernels), reference=module(reference))


def _centered(anchors: Tensor, others: Tensor) -> Tuple[Tensor, Tensor]:
    """Both row sets less a common c: the distances and their gradients do not
    change, but the kernels' GEMM forms then cancel on the rows' spread, not
    on their offset from the origin. c_k is the others' mean in the features
    where it exceeds 8 standard deviations, 0 elsewhere: subtracting c_k from
    a value within a factor 2 of it is exact (Sterbenz), so no difference
    a_i − b_j changes for the rows within 4 standard deviations."""
    mean = others.mean(0)
    far = mean.abs() > 8 * others.std(0, correction=0)
    c = torch.where(far, mean, torch.zeros_like(mean))
    return (anchors - c).contiguous(), (others - c).contiguous()


@torch.library.custom_op("pyclloss::cacr_repulsion", mutates_args=())
def cacr_repulsion(anchors: Tensor, others: Tensor, temperature: float, offset: int,
                   backend: str) -> Tuple[Tensor, Tensor]:
    mean, lse = KERNELS.kernel(backend, "cacr_repulsion_fwd")(
        *_centered(anchors, others), temperature, offset)
    return mean, lse


@cacr_repulsion.register_fake
def _(anchors, others, temperature, offset, backend):
    return anchors.new_empty(anchors.shape[0]), anchors.new_empty(anchors.shape[0])


@torch.library.custom_op("pyclloss::cacr_repulsion_backward", mutates_args=())
def cacr_repulsion_backward(anchors: Tensor, others: Tensor, mean: Tensor, lse: Tensor,
                            grad: Tensor, temperature: float, offset: int,
                            backend: str) -> Tuple[Tensor, Tensor]:
    grad_anchors, grad_others = KERNELS.kernel(backend, "cacr_repulsion_bwd")(
        *_centered(anchors, others), mean.contiguous(), lse.contiguous(), grad.contiguous(),
        temperature, offset)
    return grad_anchors, grad_others


@cacr_repulsion_backward.register_fake
def _(anchors, others, mean, lse, grad, temperature, offset, backend):
    return torch.empty_like(anchors), torch.empty_like(others)


def _setup(ctx, inputs, output):
    anchors, others, temperature, offset, backend = inputs
    mean, lse = output
    ctx.save_for_backward(anchors, others, mean, lse)
    ctx.mark_non_differentiable(lse)
    ctx.temperature, ctx.offset, ctx.backend = temperature, offset, backend


def _backward(ctx, grad_mean, grad_lse):
    anchors, others, mean, lse = ctx.saved_tensors
    grad_anchors, grad_others = cacr_repulsion_backward(
        anchors, others, mean, lse, grad_mean, ctx.temperature, ctx.offset, ctx.backend)
    return grad_anchors, grad_others, None, None, None


cacr_repulsion.register_autograd(_backward, setup_context=_setup)
