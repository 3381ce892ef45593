"""SupReMix as torch.library custom ops.

* ``pyclloss::supremix(z, labels, lam, inv_tau, gap) -> (lse, pos_sum, pos_count)``:
  per anchor the distance-weighted log-sum-exp over A_i, the sum of the
  positive logits and |P_i| (pyclloss.reference.supremix), for L2-normalised
  z. The kernels see only the Gram matrix G = z·zᵀ (every mixture logit is a
  combination of entries of G), so nothing n×n×D or larger exists.
* ``pyclloss::supremix_backward``: dz = (R + Rᵀ + A)·z from the coefficient
  matrices of the kernels (R: real pairs, both sides; A: the detached
  mixtures, anchor side only), recomputing G.

Kernels (``backend`` "cpp" or "triton", resolved by the caller):
``supremix_fwd(G, labels, lam, inv_tau, gap)`` and ``supremix_bwd(G, labels,
lam, inv_tau, gap, lse, grad_lse, grad_pos) -> (R, A)``, all in the
statistics dtype.
"""

import torch

from ..backends import kernel
from ..reference.info_nce import stats_dtype

Tensor = torch.Tensor
FAMILY = "supremix"
BACKENDS = ("cpp", "triton", "reference")


def _gram(z: Tensor) -> Tensor:
    zf = z.to(stats_dtype(z.dtype))
    return zf @ zf.T


@torch.library.custom_op("pyclloss::supremix", mutates_args=())
def supremix(z: Tensor, labels: Tensor, lam: Tensor, inv_tau: float, gap: float,
             backend: str) -> tuple[Tensor, Tensor, Tensor]:
    outs = kernel(backend, FAMILY, "supremix_fwd")(_gram(z), labels, lam, inv_tau, gap)
    return tuple(o.contiguous() for o in outs)


@supremix.register_fake
def _(z, labels, lam, inv_tau, gap, backend):
    row = z.new_empty(z.shape[0], dtype=stats_dtype(z.dtype))
    return row, torch.empty_like(row), torch.empty_like(row)


@torch.library.custom_op("pyclloss::supremix_backward", mutates_args=())
def supremix_backward(z: Tensor, labels: Tensor, lam: Tensor, lse: Tensor, grad_lse: Tensor,
                      grad_pos: Tensor, inv_tau: float, gap: float, backend: str) -> Tensor:
    zf = z.to(stats_dtype(z.dtype))
    real, mix = kernel(backend, FAMILY, "supremix_bwd")(
        zf @ zf.T, labels, lam, inv_tau, gap, lse, grad_lse.contiguous(), grad_pos.contiguous())
    return ((real + real.T + mix) @ zf).to(z.dtype)


@supremix_backward.register_fake
def _(z, labels, lam, lse, grad_lse, grad_pos, inv_tau, gap, backend):
    return torch.empty_like(z)


def _setup(ctx, inputs, output):
    z, labels, lam, inv_tau, gap, backend = inputs
    ctx.save_for_backward(z, labels, lam, output[0])
    ctx.args = (inv_tau, gap, backend)


def _backward(ctx, grad_lse, grad_pos, grad_count):
    z, labels, lam, lse = ctx.saved_tensors
    zeros = torch.zeros_like(lse)
    dz = supremix_backward(z, labels, lam, lse, zeros if grad_lse is None else grad_lse,
                           zeros if grad_pos is None else grad_pos, *ctx.args)
    return dz, None, None, None, None, None


supremix.register_autograd(_backward, setup_context=_setup)
