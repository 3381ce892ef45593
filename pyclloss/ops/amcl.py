"""AMCL's hard-negative selection and per-row loss as torch.library custom ops.

One head: n = 2B unit rows z (view-major; row a's positive is p = (a + B) mod n)
and the temperature network's outputs φ (n, h).

* ``pyclloss::amcl_topk(z, k) -> (n, k) int64``: per row, the k negatives
  (neither a nor p) of largest ``s_aj = z_a·z_j``, ties to the lower index, in
  no particular order (the loss does not depend on it). A selection: no
  gradient.
* ``pyclloss::amcl_rows(z, phi, idx, tau_min, tau_max, beta) -> (n,)``: with
  ``τ_aj = τ_min + (τ_max − τ_min)·σ(−φ_a·φ_j)`` and K the columns ``idx[a]``,
  ``row_a = −s_ap/τ_ap + mean_K s/τ + β·((D/2)·log τ_ap + 1/τ_ap) − β·Σ_K (log τ + 1/τ)``.
  Its gradient to z and φ is ``pyclloss::amcl_rows_backward``; autograd
  carries dφ on through the temperature network.

Kernels (``backend`` "cpp" or "triton"): ``amcl_topk(z, k)``,
``amcl_fwd(z, phi, idx, tau_min, tau_max, beta)`` and
``amcl_bwd(z, phi, idx, grad_rows, tau_min, tau_max, beta) -> (dz, dphi)``.
None stores an n×n matrix or gathers the (n, k, D) rows of the selected
pairs: memory is O(n·k) for the indices plus O(n·(D + h)).
"""

from typing import Tuple

import torch

from ..backends import KernelFamily, compiled, lazy_module, module
from ..reference import pair_quality as reference

Tensor = torch.Tensor


def _triton_kernels():
    from ..triton_kernels import amcl as kernels  # Triton loads on first use

    return kernels


KERNELS = KernelFamily(
    "amcl", cpp=compiled("amcl_topk", "amcl_fwd", "amcl_bwd"),
    triton=lazy_module(_triton_kernels), reference=module(reference))


@torch.library.custom_op("pyclloss::amcl_topk", mutates_args=())
def amcl_topk(z: Tensor, k: int, backend: str) -> Tensor:
    return KERNELS.kernel(backend, "amcl_topk")(z.contiguous(), k)


@amcl_topk.register_fake
def _(z, k, backend):
    return z.new_empty(z.shape[0], k, dtype=torch.int64)


@torch.library.custom_op("pyclloss::amcl_rows", mutates_args=())
def amcl_rows(z: Tensor, phi: Tensor, idx: Tensor, tau_min: float, tau_max: float, beta: float,
              backend: str) -> Tensor:
    return KERNELS.kernel(backend, "amcl_fwd")(z.contiguous(), phi.contiguous(),
                                               idx.contiguous(), tau_min, tau_max, beta)


@amcl_rows.register_fake
def _(z, phi, idx, tau_min, tau_max, beta, backend):
    return z.new_empty(z.shape[0])


@torch.library.custom_op("pyclloss::amcl_rows_backward", mutates_args=())
def amcl_rows_backward(z: Tensor, phi: Tensor, idx: Tensor, grad_rows: Tensor, tau_min: float,
                       tau_max: float, beta: float, backend: str) -> Tuple[Tensor, Tensor]:
    return KERNELS.kernel(backend, "amcl_bwd")(z.contiguous(), phi.contiguous(),
                                               idx.contiguous(), grad_rows.contiguous(),
                                               tau_min, tau_max, beta)


@amcl_rows_backward.register_fake
def _(z, phi, idx, grad_rows, tau_min, tau_max, beta, backend):
    return torch.empty_like(z), torch.empty_like(phi)


def _setup(ctx, inputs, output):
    z, phi, idx, tau_min, tau_max, beta, backend = inputs
    ctx.save_for_backward(z, phi, idx)
    ctx.hyper = (tau_min, tau_max, beta, backend)


def _backward(ctx, grad_rows):
    z, phi, idx = ctx.saved_tensors
    dz, dphi = amcl_rows_backward(z, phi, idx, grad_rows, *ctx.hyper)
    return dz, dphi, None, None, None, None, None


amcl_rows.register_autograd(_backward, setup_context=_setup)
