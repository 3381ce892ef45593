"""Custom ops of the feature-transformation MoCo loss.

* ``pyclloss::ft_moco_neg_lse(q_hat, queue, lam_neg, perm, scale) -> neg_lse``:
  per row of q̂ (N×D), ``LSE_j s·<q̂_i, Q̂_j>`` over the interpolated queue
  ``Q̂_j = lam_neg_j·Q_j + (1 − lam_neg_j)·Q_perm(j)`` (K×D, never stored by the
  Triton kernels, built once in the accumulation type by the C++ ones);
  float32 statistics (float64 for float64 inputs).
* ``pyclloss::ft_moco_neg_lse_bwd``: its backward, ``(dq_hat, dscale)``. The
  queue, ``lam_neg`` and ``perm`` get no gradient.

``lam_neg`` is a (K,) vector in the statistics dtype (a scalar λ_n expanded),
``perm`` an int64 (K,) vector of queue row indices. ``backend`` is a concrete
backend among ``BACKENDS``, already resolved by the caller; the backward runs
on the forward's backend. The kernels of each backend have the signatures of
``pyclloss.reference.ft_moco``.
"""

import torch

from ..backends import kernel
from ..reference.info_nce import stats_dtype

Tensor = torch.Tensor
FAMILY = "ft_moco"
BACKENDS = ("cpp", "triton", "reference")


@torch.library.custom_op("pyclloss::ft_moco_neg_lse", mutates_args=())
def ft_moco_neg_lse(q_hat: Tensor, queue: Tensor, lam_neg: Tensor, perm: Tensor, scale: Tensor,
                    backend: str) -> Tensor:
    """LSE of each row of q̂ against the interpolated queue (N,)."""
    run = kernel(backend, FAMILY, "ft_moco_neg_lse")
    return run(q_hat.contiguous(), queue.contiguous(), lam_neg.contiguous(), perm.contiguous(),
               scale).contiguous()


@ft_moco_neg_lse.register_fake
def _(q_hat, queue, lam_neg, perm, scale, backend):
    return q_hat.new_empty(q_hat.shape[0], dtype=stats_dtype(q_hat.dtype))


@torch.library.custom_op("pyclloss::ft_moco_neg_lse_bwd", mutates_args=())
def ft_moco_neg_lse_bwd(q_hat: Tensor, queue: Tensor, lam_neg: Tensor, perm: Tensor,
                        scale: Tensor, neg_lse: Tensor, grad: Tensor,
                        backend: str) -> tuple[Tensor, Tensor]:
    """dq̂ and dscale of sum_i grad_i·neg_lse_i."""
    run = kernel(backend, FAMILY, "ft_moco_neg_lse_bwd")
    dq, dscale = run(q_hat.contiguous(), queue.contiguous(), lam_neg.contiguous(),
                     perm.contiguous(), scale, neg_lse.contiguous(), grad.contiguous())
    return dq.contiguous(), dscale.contiguous()


@ft_moco_neg_lse_bwd.register_fake
def _(q_hat, queue, lam_neg, perm, scale, neg_lse, grad, backend):
    return torch.empty_like(q_hat), q_hat.new_empty((), dtype=stats_dtype(q_hat.dtype))


def _setup(ctx, inputs, output):
    q_hat, queue, lam_neg, perm, scale, backend = inputs
    ctx.save_for_backward(q_hat, queue, lam_neg, perm, scale, output)
    ctx.backend = backend


def _backward(ctx, grad):
    q_hat, queue, lam_neg, perm, scale, neg_lse = ctx.saved_tensors
    dq, dscale = ft_moco_neg_lse_bwd(q_hat, queue, lam_neg, perm, scale, neg_lse, grad,
                                     ctx.backend)
    return dq, None, None, None, dscale, None


ft_moco_neg_lse.register_autograd(_backward, setup_context=_setup)
