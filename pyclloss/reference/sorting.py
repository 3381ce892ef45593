"""Plain-PyTorch differentiable sorting networks (diffsort semantics): the spec.

A sorting network is a list of layers; a layer is a list of comparators on
disjoint wires. A comparator ``(lo, hi)`` receives ``a = y[lo]``, ``b = y[hi]``
and writes the relaxed minimum to wire ``lo`` and the relaxed maximum to wire
``hi``::

    alpha   = f(b - a)                       (f: the relaxation, see ``relaxation``)
    y'[lo]  = alpha * a + (1 - alpha) * b
    y'[hi]  = (1 - alpha) * a + alpha * b

The same alpha mixes columns ``lo`` and ``hi`` of the running permutation matrix
``P`` (rows = inputs, columns = ranks; ``P`` starts as the identity), so that
``sorted = x @ P``. Every relaxation here satisfies ``f(-d) = 1 - f(d)``, which
is why a descending comparator of a bitonic network is simply a comparator with
``lo > hi``.

Two layers, like the other reference modules:

* the kernel-level functions ``sort_forward``, ``sort_backward``,
  ``apply_forward``, ``apply_backward`` with the exact semantics of the fused
  kernels (the ``reference`` backend, the ground truth of every kernel test);
  the backwards are explicit vector-Jacobian products;
* the forwards are written with differentiable torch ops, so autograd through
  them checks the explicit backwards.
"""

import math
from typing import Optional

import torch

Tensor = torch.Tensor
Layer = tuple[tuple[int, int], ...]

NETWORKS = ("odd_even", "bitonic")
# The order is the integer code the kernels receive.
DISTRIBUTIONS = ("logistic", "logistic_phi", "gaussian", "cauchy", "reciprocal", "optimal")

# Added to |d| before the power of the logistic_phi relaxation (as diffsort).
LOGISTIC_PHI_EPS = 1e-10

# Networks each backend keeps in its own compact form (index tensors), least
# recently used out first: an odd-even network has n²/2 comparators.
CACHED_NETWORKS = 4


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """Dtype of the comparator arithmetic for an input dtype."""
    return torch.float64 if dtype == torch.float64 else torch.float32


# ------------------------------------------------------------------------ networks


def _odd_even_layers(n: int) -> list[Layer]:
    # n layers of neighbour comparators, alternately starting at wire 0 and 1.
    return [tuple((i, i + 1) for i in range(layer % 2, n - 1, 2)) for layer in range(n)]


def _bitonic_layers(n: int) -> list[Layer]:
    # Bitonic sorter on 2^k wires; the first 2^k - n wires are padding and every
    # comparator touching one of them is dropped (diffsort's layout, which sorts
    # exactly in the hard limit).
    blocks = max(n - 1, 0).bit_length()
    size = 1 << blocks
    pad = size - n
    layers = []
    for block in range(blocks):
        for step in range(block + 1):
            span = 1 << (block - step)
            layer = []
            for start in range(0, size, 2 * span):
                for a in range(start, start + span):
                    b = a + span
                    if a < pad:
                        continue
                    descending = (a >> (block + 1)) & 1
                    lo, hi = (b, a) if descending else (a, b)
                    layer.append((lo - pad, hi - pad))
            layers.append(tuple(layer))
    return layers


def network_layers(network: str, n: int) -> tuple[Layer, ...]:
    """The comparator layers ``((lo, hi), ...)`` of ``network`` on ``n`` wires.
    Not cached: as Python tuples they take ~130 bytes a comparator."""
    if network == "odd_even":
        return tuple(_odd_even_layers(n))
    if network == "bitonic":
        return tuple(_bitonic_layers(n))
    raise ValueError(f"network must be one of {NETWORKS}, got {network!r}")


def _layer_index(layers, device):
    return [
        (torch.tensor([c[0] for c in layer], dtype=torch.long, device=device),
         torch.tensor([c[1] for c in layer], dtype=torch.long, device=device))
        for layer in layers if layer
    ]


# ---------------------------------------------------------------------- relaxations


def relaxation(d: Tensor, distribution: str, steepness: float, art_lambda: float) -> Tensor:
    """alpha = f(d), d = b - a, the weight of ``a`` in the minimum."""
    v = steepness * d
    if distribution == "logistic":
        return torch.sigmoid(v)
    if distribution == "logistic_phi":
        return torch.sigmoid(v / (d.abs() + LOGISTIC_PHI_EPS) ** art_lambda)
    if distribution == "gaussian":
        return 0.5 * (1.0 + torch.erf(v / math.sqrt(2.0)))
    if distribution == "cauchy":
        return torch.atan(v) / math.pi + 0.5
    if distribution == "reciprocal":
        return 0.5 * (v / (2.0 + v.abs()) + 1.0)
    if distribution == "optimal":
        tail = v.abs() > 0.25
        v_tail = torch.where(tail, v, torch.ones_like(v))  # keeps 1/v finite off the tails
        return torch.where(tail, (v_tail > 0).to(v.dtype) - 1.0 / (16.0 * v_tail), v + 0.5)
    raise ValueError(f"distribution must be one of {DISTRIBUTIONS}, got {distribution!r}")


def relaxation_grad(d: Tensor, distribution: str, steepness: float, art_lambda: float) -> Tensor:
    """d alpha / d d."""
    v = steepness * d
    if distribution == "logistic":
        s = torch.sigmoid(v)
        return steepness * s * (1.0 - s)
    if distribution == "logistic_phi":
        r = d.abs() + LOGISTIC_PHI_EPS
        s = torch.sigmoid(v / r ** art_lambda)
        dz = steepness * r ** (-art_lambda) * (1.0 - art_lambda * d.abs() / r)
        return s * (1.0 - s) * dz
    if distribution == "gaussian":
        return steepness * torch.exp(-0.5 * v * v) / math.sqrt(2.0 * math.pi)
    if distribution == "cauchy":
        return steepness / (math.pi * (1.0 + v * v))
    if distribution == "reciprocal":
        return steepness / (2.0 + v.abs()) ** 2
    if distribution == "optimal":
        tail = v.abs() > 0.25
        v_tail = torch.where(tail, v, torch.ones_like(v))
        return steepness * torch.where(tail, 1.0 / (16.0 * v_tail * v_tail), torch.ones_like(v))
    raise ValueError(f"distribution must be one of {DISTRIBUTIONS}, got {distribution!r}")


# ------------------------------------------------------------------------- kernels


def _mix(t: Tensor, lo: Tensor, hi: Tensor, alpha: Tensor) -> Tensor:
    """One comparator layer applied along the last dim of ``t``. The 2×2 pair
    block [[alpha, 1-alpha], [1-alpha, alpha]] is symmetric, so this is also its
    transpose (what the backward applies to adjoints)."""
    a, b = t[..., lo], t[..., hi]
    out = t.clone()
    out[..., lo] = alpha * a + (1 - alpha) * b
    out[..., hi] = (1 - alpha) * a + alpha * b
    return out


def sort_forward(x: Tensor, network: str, steepness: float, distribution: str,
                 art_lambda: float) -> tuple[Tensor, Tensor]:
    """(sorted, P) of the rows of x (B, n): ascending, ``sorted = x @ P``."""
    acc = compute_dtype(x.dtype)
    # Fresh, contiguous tensors even without a comparator (n = 1): never x
    # itself nor a broadcast view.
    y = x.to(acc, copy=True)
    b, n = y.shape
    perm = torch.eye(n, dtype=acc, device=x.device).repeat(b, 1, 1)
    for lo, hi in _layer_index(network_layers(network, n), x.device):
        alpha = relaxation(y[:, hi] - y[:, lo], distribution, steepness, art_lambda)
        y = _mix(y, lo, hi, alpha)
        perm = _mix(perm, lo, hi, alpha[:, None, :])
    return y.to(x.dtype), perm.to(x.dtype)


def _layer_states(y: Tensor, network: str, steepness: float, distribution: str,
                  art_lambda: float):
    """Per layer: wire indices, the layer's input values, alpha, d alpha / d(b - a)."""
    states = []
    for lo, hi in _layer_index(network_layers(network, y.shape[1]), y.device):
        d = y[:, hi] - y[:, lo]
        alpha = relaxation(d, distribution, steepness, art_lambda)
        states.append((lo, hi, y, alpha, relaxation_grad(d, distribution, steepness, art_lambda)))
        y = _mix(y, lo, hi, alpha)
    return states


def _backward_through_layers(states, grad_values: Tensor, grad_alpha_perm) -> Tensor:
    """Reverse sweep of the value chain; ``grad_alpha_perm[i]`` is the adjoint of
    layer i's alphas from the permutation matrix (0 when P has no gradient)."""
    g = grad_values
    for i in reversed(range(len(states))):
        lo, hi, y, alpha, dalpha = states[i]
        grad_alpha = (y[:, lo] - y[:, hi]) * (g[:, lo] - g[:, hi]) + grad_alpha_perm[i]
        g = _mix(g, lo, hi, alpha)
        g_d = grad_alpha * dalpha
        g = g.index_add(1, hi, g_d).index_add(1, lo, -g_d)
    return g


def sort_backward(x: Tensor, grad_sorted: Optional[Tensor], grad_perm: Optional[Tensor],
                  network: str, steepness: float, distribution: str, art_lambda: float) -> Tensor:
    """Gradient of x given the gradients of ``sorted`` and ``P`` (either may be None)."""
    acc = compute_dtype(x.dtype)
    b, n = x.shape
    states = _layer_states(x.to(acc), network, steepness, distribution, art_lambda)
    g_values = (grad_sorted.to(acc, copy=True) if grad_sorted is not None  # never an alias
                else x.new_zeros(b, n, dtype=acc))

    grad_alpha_perm = [0.0] * len(states)
    if grad_perm is not None:
        # P before each layer, then the adjoint of P after each layer, backwards.
        perm_in = []
        perm = torch.eye(n, dtype=acc, device=x.device).expand(b, n, n)
        for lo, hi, _, alpha, _ in states:
            perm_in.append(perm)
            perm = _mix(perm, lo, hi, alpha[:, None, :])
        g_perm = grad_perm.to(acc)
        for i in reversed(range(len(states))):
            lo, hi, _, alpha, _ = states[i]
            p = perm_in[i]
            grad_alpha_perm[i] = ((p[..., lo] - p[..., hi]) * (g_perm[..., lo] - g_perm[..., hi])).sum(1)
            g_perm = _mix(g_perm, lo, hi, alpha[:, None, :])

    return _backward_through_layers(states, g_values, grad_alpha_perm).to(x.dtype)


def apply_forward(x: Tensor, v: Tensor, network: str, steepness: float, distribution: str,
                  art_lambda: float) -> Tensor:
    """P @ v per row: v (B, n) a value per rank, the result (B, n) its expectation
    at each input."""
    _, perm = sort_forward(x.to(compute_dtype(x.dtype)), network, steepness, distribution, art_lambda)
    return (perm @ v.to(perm.dtype)[:, :, None])[:, :, 0].to(x.dtype)


def apply_backward(x: Tensor, v: Tensor, grad_out: Tensor, network: str, steepness: float,
                   distribution: str, art_lambda: float) -> tuple[Tensor, Tensor]:
    """(grad x, grad v) of ``apply_forward``: dP = grad_out ⊗ v, dv = Pᵀ grad_out."""
    acc = compute_dtype(x.dtype)
    g, vv = grad_out.to(acc), v.to(acc)
    _, perm = sort_forward(x.to(acc), network, steepness, distribution, art_lambda)
    grad_x = sort_backward(x.to(acc), None, g[:, :, None] * vv[:, None, :],
                           network, steepness, distribution, art_lambda)
    grad_v = (perm.transpose(1, 2) @ g[:, :, None])[:, :, 0]
    return grad_x.to(x.dtype), grad_v.to(v.dtype)
