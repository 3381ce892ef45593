"""Rank-N-Contrast's row sums as torch.library custom ops.

* ``pyclloss::rnc_rows(sim, label_dist) -> (n,)``:
  ``row_i = Σ_{j≠i} [log Σ_{k≠i, d_ik ≥ d_ij} exp(s_ik) − s_ij]`` for the
  similarities s (n, n) and label distances d (n, n); the loss is their mean
  over n(n−1). The similarities come from a GEMM outside, so autograd takes
  the gradient from s to the features.
* ``pyclloss::rnc_rows_backward(sim, label_dist, grad_rows) -> d rows / d s``.

Kernels (``backend`` "cpp" or "triton"): ``rnc_fwd(s, d)`` and
``rnc_bwd(s, d, grad_rows)``. The C++ kernel sorts each row by d (O(n² log n)
in all, tie groups exact); the Triton kernel compares tiles of d directly.
"""

import torch

from ..backends import kernel

Tensor = torch.Tensor
FAMILY = "rnc"
BACKENDS = ("cpp", "triton", "reference")


@torch.library.custom_op("pyclloss::rnc_rows", mutates_args=())
def rnc_rows(sim: Tensor, label_dist: Tensor, backend: str) -> Tensor:
    return kernel(backend, FAMILY, "rnc_fwd")(sim.contiguous(), label_dist.contiguous())


@rnc_rows.register_fake
def _(sim, label_dist, backend):
    return sim.new_empty(sim.shape[0])


@torch.library.custom_op("pyclloss::rnc_rows_backward", mutates_args=())
def rnc_rows_backward(sim: Tensor, label_dist: Tensor, grad_rows: Tensor, backend: str) -> Tensor:
    return kernel(backend, FAMILY, "rnc_bwd")(sim.contiguous(), label_dist.contiguous(),
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
