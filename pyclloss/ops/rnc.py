"""Rank-N-Contrast's row sums and feature distances as torch.library custom ops.

* ``pyclloss::rnc_rows(sim, label_dist) -> (n,)``:
  ``row_i = Σ_{j≠i} [log Σ_{k≠i, d_ik ≥ d_ij} exp(s_ik) − s_ij]`` for the
  similarities s (n, n) and label distances d (n, n); the loss is their mean
  over n(n−1). The similarities are ``−rnc_distances(v) / τ``, so autograd
  takes the gradient from s to the features and τ.
* ``pyclloss::rnc_rows_backward(sim, label_dist, grad_rows) -> d rows / d s``.
* ``pyclloss::rnc_distances(features) -> (n, n)``: ``‖v_i − v_j‖₂`` from the
  differences themselves, with its backward ``pyclloss::rnc_distances_backward``.
  The GEMM form ``|v_i|² + |v_j|² − 2·v_i·v_j`` loses the small distances,
  which decide RnC's ranking, to cancellation in float32 (rows far from the
  origin, near-duplicates); a difference of two close floats is exact.

Kernels (``backend`` "cpp" or "triton"): ``rnc_fwd(s, d)``,
``rnc_bwd(s, d, grad_rows)``, ``rnc_distances_fwd(v)`` and
``rnc_distances_bwd(v, w) = Σ_j w_ij (v_i − v_j)`` (n, D). The C++ kernel
sorts each row by d (O(n² log n) in all, tie groups exact); the Triton kernel
compares tiles of d directly. Distances are O(n²·D) either way.
"""

import torch

from ..backends import KernelFamily, compiled, lazy_module, module
from ..reference import rnc as reference

Tensor = torch.Tensor


def _triton_kernels():
    from ..triton_kernels import rnc as kernels  # Triton loads on first use

    return kernels


KERNELS = KernelFamily(
    "rnc", cpp=compiled("rnc_fwd", "rnc_bwd", "rnc_distances_fwd", "rnc_distances_bwd"),
    triton=lazy_module(_triton_kernels), reference=module(reference))


@torch.library.custom_op("pyclloss::rnc_rows", mutates_args=())
def rnc_rows(sim: Tensor, label_dist: Tensor, backend: str) -> Tensor:
    return KERNELS.kernel(backend, "rnc_fwd")(sim.contiguous(), label_dist.contiguous())


@rnc_rows.register_fake
def _(sim, label_dist, backend):
    return sim.new_empty(sim.shape[0])


@torch.library.custom_op("pyclloss::rnc_rows_backward", mutates_args=())
def rnc_rows_backward(sim: Tensor, label_dist: Tensor, grad_rows: Tensor, backend: str) -> Tensor:
    return KERNELS.kernel(backend, "rnc_bwd")(sim.contiguous(), label_dist.contiguous(),
                                              grad_rows.contiguous())


@rnc_rows_backward.register_fake
def _(sim, label_dist, grad_rows, backend):
    return torch.empty_like(sim)


def _setup(ctx, inputs, output):
    sim, label_dist, backend = inputs
    ctx.save_for_backward(sim, label_dist)
    ctx.backend = backend


def _backward(ctx, grad_rows):
    sim, label_dist = ctx.saved_tensors
    return rnc_rows_backward(sim, label_dist, grad_rows, ctx.backend), None, None


rnc_rows.register_autograd(_backward, setup_context=_setup)


@torch.library.custom_op("pyclloss::rnc_distances", mutates_args=())
def rnc_distances(features: Tensor, backend: str) -> Tensor:
    return KERNELS.kernel(backend, "rnc_distances_fwd")(features.contiguous())


@rnc_distances.register_fake
def _(features, backend):
    return features.new_empty(features.shape[0], features.shape[0])


@torch.library.custom_op("pyclloss::rnc_distances_backward", mutates_args=())
def rnc_distances_backward(features: Tensor, dist: Tensor, grad_dist: Tensor,
                           backend: str) -> Tensor:
    """d/dv_i of Σ_ij G_ij ‖v_i − v_j‖ = Σ_j (G_ij + G_ji)(v_i − v_j) / ‖v_i − v_j‖;
    a zero distance contributes 0 (the subgradient torch.cdist uses)."""
    weights = torch.where(dist > 0, (grad_dist + grad_dist.T) / dist, torch.zeros_like(dist))
    return KERNELS.kernel(backend, "rnc_distances_bwd")(features.contiguous(), weights)


@rnc_distances_backward.register_fake
def _(features, dist, grad_dist, backend):
    return torch.empty_like(features)


def _setup_distances(ctx, inputs, output):
    features, backend = inputs
    ctx.save_for_backward(features, output)
    ctx.backend = backend


def _distances_backward(ctx, grad_dist):
    features, dist = ctx.saved_tensors
    return rnc_distances_backward(features, dist, grad_dist, ctx.backend), None


rnc_distances.register_autograd(_distances_backward, setup_context=_setup_distances)
