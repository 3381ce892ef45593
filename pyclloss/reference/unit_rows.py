"""Plain-PyTorch unit rows: the spec of the L2 normalisation that the
cosine-similarity losses apply before the fused core, and of the kernels'
contract (``pyclloss.ops.unit_rows``), for parts x = cat(parts) (N, D):

* ``unit_rows_fwd(parts) -> (rows, norms)``: ``rows_i = x_i / n_i`` in the
  input dtype, ``n_i = max(‖x_i‖, ε)`` (ε = 1e-12, as torch's ``normalize``)
  in the statistics dtype, the norm accumulated in float64 so that no finite
  row overflows it;
* ``unit_rows_bwd(parts, norms, grad) -> grads``: the gradient of
  ``Σ grad·rows`` with respect to each part,
  ``dx_i = (g_i − x_i·(g_i·x_i)/n_i²) / n_i``, or ``g_i / ε`` where the norm is
  clamped (a constant then).
"""

from typing import List, Tuple

import torch

from .._stats import stats_dtype

Tensor = torch.Tensor

EPSILON = 1e-12


def unit_rows_fwd(parts: List[Tensor]) -> Tuple[Tensor, Tensor]:
    x = torch.cat(parts)
    acc = x.to(stats_dtype(x.dtype))
    norms = torch.linalg.vector_norm(acc, dim=-1, dtype=torch.float64).clamp_min(EPSILON)
    norms = norms.to(acc.dtype)
    return (acc / norms[:, None]).to(x.dtype), norms


def unit_rows_bwd(parts: List[Tensor], norms: Tensor, grad: Tensor) -> List[Tensor]:
    grads, start = [], 0
    for part in parts:
        rows = slice(start, start + part.shape[0])
        start = rows.stop
        x, g, n = part.double(), grad[rows].double(), norms[rows].double()
        clamped = norms[rows] <= EPSILON  # in the norms' dtype, as the kernels compare
        along = torch.where(clamped, torch.zeros_like(n), (g * x).sum(-1) / n / n)
        grads.append(((g - x * along[:, None]) / n[:, None]).to(grad.dtype))
    return grads
