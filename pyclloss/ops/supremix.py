"""SupReMix as torch.library custom ops.

* ``pyclloss::supremix(z, labels, lam, scale, gap) -> (lse, pos_sum, pos_count)``:
  per anchor the distance-weighted log-sum-exp over A_i, the sum of the
  positive logits and |P_i| (pyclloss.reference.supremix), for L2-normalised
  z and logits scaled by ``scale`` = 1/τ (a 0-dim tensor; it gets a gradient). The kernels see only the Gram matrix G = z·zᵀ (every mixture logit is a
  combination of entries of G), so nothing n×n×D or larger exists.
* ``pyclloss::supremix_backward``: dz = (R + Rᵀ + A)·z from the coefficient
  matrices of the kernels (R: real pairs, both sides; A: the detached
  mixtures, anchor side only), recomputing G. Every logit is linear in the
  scale, so d/d scale = Σ_i [g_lse_i·(mean logit)_i + g_pos_i·pos_sum_i] / scale
  from the forward's softmax-weighted mean logits.

Kernels (``backend`` "cpp" or "triton", resolved by the caller):
``supremix_fwd(G, labels, lam, scale, gap) -> (lse, pos_sum, pos_count,
mean_logit)`` and ``supremix_bwd(G, labels, lam, scale, gap, lse, grad_lse,
grad_pos) -> (R, A)``, all in the statistics dtype; ``scale`` (1/τ) is a
0-dim tensor, read on the device by the Triton kernels (no host sync).
"""

import torch

from .._stats import stats_dtype
from ..backends import KernelFamily, compiled, lazy_module, module
from ..reference import supremix as reference

Tensor = torch.Tensor


def _triton_kernels():
    from ..triton_kernels import supremix as kernels  # Triton loads on first use

    return kernels


KERNELS = KernelFamily("supremix", cpp=compiled("supremix_fwd", "supremix_bwd"),
                       triton=lazy_module(_triton_kernels), reference=module(reference))


def _stats_matmul(a: Tensor, b: Tensor) -> Tensor:
    """a @ b in the operands' dtype: autocast would run it in bf16/fp16 while
    the kernels' other inputs stay in the statistics dtype."""
    with torch.autocast(a.device.type, enabled=False):
        return a @ b


def _gram(z: Tensor) -> Tensor:
    zf = z.to(stats_dtype(z.dtype))
    return _stats_matmul(zf, zf.T)


@torch.library.custom_op("pyclloss::supremix", mutates_args=())
def supremix(z: Tensor, labels: Tensor, lam: Tensor, scale: Tensor, gap: float,
             backend: str) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(lse, pos_sum, pos_count, mean_logit); the last two get no gradient."""
    outs = KERNELS.kernel(backend, "supremix_fwd")(_gram(z), labels, lam, scale.detach(), gap)
    return tuple(o.contiguous() for o in outs)


@supremix.register_fake
def _(z, labels, lam, scale, gap, backend):
    row = z.new_empty(z.shape[0], dtype=stats_dtype(z.dtype))
    return row, torch.empty_like(row), torch.empty_like(row), torch.empty_like(row)


@torch.library.custom_op("pyclloss::supremix_backward", mutates_args=())
def supremix_backward(z: Tensor, labels: Tensor, lam: Tensor, lse: Tensor, grad_lse: Tensor,
                      grad_pos: Tensor, scale: Tensor, gap: float, backend: str) -> Tensor:
    zf = z.to(stats_dtype(z.dtype))
    real, mix = KERNELS.kernel(backend, "supremix_bwd")(
        _stats_matmul(zf, zf.T), labels, lam, scale, gap, lse, grad_lse.contiguous(),
        grad_pos.contiguous())
    return _stats_matmul(real + real.T + mix, zf).to(z.dtype)


@supremix_backward.register_fake
def _(z, labels, lam, lse, grad_lse, grad_pos, scale, gap, backend):
    return torch.empty_like(z)


def _setup(ctx, inputs, output):
    z, labels, lam, scale, gap, backend = inputs
    lse, pos_sum, pos_count, mean_logit = output
    ctx.mark_non_differentiable(pos_count, mean_logit)
    ctx.save_for_backward(z, labels, lam, scale, lse, pos_sum, mean_logit)
    ctx.gap, ctx.backend = gap, backend


def _backward(ctx, grad_lse, grad_pos, grad_count, grad_mean_logit):
    z, labels, lam, scale, lse, pos_sum, mean_logit = ctx.saved_tensors
    zeros = torch.zeros_like(lse)
    grad_lse = zeros if grad_lse is None else grad_lse
    grad_pos = zeros if grad_pos is None else grad_pos
    dz = supremix_backward(z, labels, lam, lse, grad_lse, grad_pos, scale, ctx.gap, ctx.backend)
    dscale = ((grad_lse * mean_logit + grad_pos * pos_sum).sum() / scale).to(scale.dtype)
    return dz, None, None, dscale, None, None


supremix.register_autograd(_backward, setup_context=_setup)
