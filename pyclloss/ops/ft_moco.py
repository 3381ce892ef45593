"""Custom ops of the feature-transformation MoCo loss: the log-sum-exp of each
mixed query q̂_i (N×D) over the interpolated queue
``Q̂_j = a_j·Q_j + b_j·Q_perm(j)`` (K×D), ``neg_lse_i = LSE_j s·<q̂_i, Q̂_j>``,
without the N×K logits. The per-row weights (:func:`interpolation_weights`)
are ``a = λ_n``, ``b = 1 − λ_n``, each divided by its row's norm when the queue
is to be normalised, so no backend writes a normalised copy of the queue.

Two designs, picked per backend by :func:`negatives_lse` after measuring:

* on the fly (``triton``; ``reference`` as the dense spec):
  ``pyclloss::ft_moco_neg_lse`` and its backward ``pyclloss::ft_moco_neg_lse_bwd``
  blend Q_j and Q_perm(j) inside every key tile and never store Q̂. On a GPU
  that saves a K×D write and read per pass. The backward works on a copy of
  the queue, weights and π taken at the forward: MoCo overwrites its queue in
  place before the backward runs.
* materialised (``cpp``): ``pyclloss::ft_moco_interpolate_queue`` builds Q̂ in
  the accumulation type in one pass; the InfoNCE core's ops
  (``pyclloss.ops.info_nce``) take it from there, and autograd keeps Q̂ for
  the backward. The CPU core copies its key operand into its own layout on
  every call anyway, so tiles built on the fly cannot save that pass; keeping
  Q̂ was faster than rebuilding it in the backward (1.02× to 1.36× at
  N = 256, D = 128, K = 4096 to 65536; bench/results/cpu-ft_moco.md).

Weights are (K,) vectors in the statistics dtype (float32, float64 for
float64 inputs), ``perm`` an int64 (K,) vector of queue row indices; none of
them, nor the queue, gets a gradient. The kernels of each backend have the
signatures of ``pyclloss.reference.ft_moco``.
"""

import torch

from .._stats import stats_dtype
from ..backends import KernelFamily, compiled, lazy_module, module
from ..reference import ft_moco as reference
from . import info_nce as core

Tensor = torch.Tensor


def _triton_kernels():
    from ..triton_kernels import ft_moco as kernels  # Triton loads on first use

    return kernels


# The C++ backend builds Q̂ (one op); Triton blends it inside the key tiles.
KERNELS = KernelFamily("ft_moco", cpp=compiled("ft_moco_interpolate_queue"),
                       triton=lazy_module(_triton_kernels), reference=module(reference))
MATERIALIZING = ("cpp",)


def interpolation_weights(queue: Tensor, lam_neg: Tensor, perm: Tensor, normalize: bool):
    """(a, b) of Q̂_j = a_j·Q_j + b_j·Q_perm(j) for λ_n of shape () or (K,), in the
    statistics dtype; ``normalize`` divides each row by its norm first (as
    F.normalize, eps 1e-12)."""
    dtype = stats_dtype(queue.dtype)
    lam = lam_neg.to(dtype).expand(queue.shape[0])
    if not normalize:
        return lam.contiguous(), (1 - lam).contiguous()
    inv_norm = 1 / torch.linalg.vector_norm(queue, dim=1, dtype=dtype).clamp_min(1e-12)
    return lam * inv_norm, (1 - lam) * inv_norm[perm]


def negatives_lse(q_hat: Tensor, queue: Tensor, own_weight: Tensor, partner_weight: Tensor,
                  perm: Tensor, scale: Tensor, backend: str) -> Tensor:
    """``neg_lse`` (N,) in the statistics dtype, differentiable in q̂ and scale."""
    if backend in MATERIALIZING:
        mixed = ft_moco_interpolate_queue(queue, own_weight, partner_weight, perm, backend)
        return core.infonce_fwd(q_hat.to(mixed.dtype), mixed, scale, None, None, None, False,
                                False, backend)[0]
    return ft_moco_neg_lse(q_hat, queue, own_weight, partner_weight, perm, scale, backend)


def _contiguous(*tensors):
    return [t.contiguous() for t in tensors]


# ---------------------------------------------------------- materialised queue


@torch.library.custom_op("pyclloss::ft_moco_interpolate_queue", mutates_args=())
def ft_moco_interpolate_queue(queue: Tensor, own_weight: Tensor, partner_weight: Tensor,
                              perm: Tensor, backend: str) -> Tensor:
    """Q̂ (K×D) in the statistics dtype."""
    run = KERNELS.kernel(backend, "ft_moco_interpolate_queue")
    return run(*_contiguous(queue, own_weight, partner_weight, perm)).contiguous()


@ft_moco_interpolate_queue.register_fake
def _(queue, own_weight, partner_weight, perm, backend):
    return torch.empty_like(queue, dtype=stats_dtype(queue.dtype))


# ------------------------------------------------------------- queue on the fly


@torch.library.custom_op("pyclloss::ft_moco_neg_lse", mutates_args=())
def ft_moco_neg_lse(q_hat: Tensor, queue: Tensor, own_weight: Tensor, partner_weight: Tensor,
                    perm: Tensor, scale: Tensor, backend: str) -> Tensor:
    """LSE of each row of q̂ against the interpolated queue (N,)."""
    run = KERNELS.kernel(backend, "ft_moco_neg_lse")
    return run(*_contiguous(q_hat, queue, own_weight, partner_weight, perm), scale).contiguous()


@ft_moco_neg_lse.register_fake
def _(q_hat, queue, own_weight, partner_weight, perm, scale, backend):
    return q_hat.new_empty(q_hat.shape[0], dtype=stats_dtype(q_hat.dtype))


@torch.library.custom_op("pyclloss::ft_moco_neg_lse_bwd", mutates_args=())
def ft_moco_neg_lse_bwd(q_hat: Tensor, queue: Tensor, own_weight: Tensor, partner_weight: Tensor,
                        perm: Tensor, scale: Tensor, neg_lse: Tensor, grad: Tensor,
                        backend: str) -> tuple[Tensor, Tensor]:
    """dq̂ and dscale of sum_i grad_i·neg_lse_i."""
    run = KERNELS.kernel(backend, "ft_moco_neg_lse_bwd")
    dq, dscale = run(*_contiguous(q_hat, queue, own_weight, partner_weight, perm), scale,
                     *_contiguous(neg_lse, grad))
    return dq.contiguous(), dscale.contiguous()


@ft_moco_neg_lse_bwd.register_fake
def _(q_hat, queue, own_weight, partner_weight, perm, scale, neg_lse, grad, backend):
    return torch.empty_like(q_hat), q_hat.new_empty((), dtype=stats_dtype(q_hat.dtype))


def _setup(ctx, inputs, output):
    q_hat, queue, own_weight, partner_weight, perm, scale, backend = inputs
    # MoCo overwrites its queue in place between the loss and its backward
    # (the enqueue), and λ_n or π may be reused buffers: the backward keeps
    # copies of what the forward saw (one K×D copy until the backward).
    mixing = (t.clone() for t in (queue, own_weight, partner_weight, perm))
    ctx.save_for_backward(q_hat, *mixing, scale, output)
    ctx.backend = backend


def _backward(ctx, grad):
    *tensors, neg_lse = ctx.saved_tensors
    dq, dscale = ft_moco_neg_lse_bwd(*tensors, neg_lse, grad, ctx.backend)
    return dq, None, None, None, None, dscale, None


ft_moco_neg_lse.register_autograd(_backward, setup_context=_setup)
