"""Custom ops of the differentiable sorting networks.

* ``pyclloss::diff_sort(x, ...) -> (sorted, P)``: the relaxed sort of the rows
  of x (B, n) and its permutation matrix, ``sorted = x @ P``.
* ``pyclloss::diff_sort_apply(x, v, ...) -> P @ v`` per row, without forming P
  (O(n·L) per row instead of O(n²·L)).

Each op has a fake kernel and an autograd formula; the backwards are custom
ops themselves, so ``torch.compile`` traces forward and backward without graph
breaks. ``backend`` is one of ``reference``, ``cpp``, ``cuda``, ``triton``
(already resolved by the caller); the backward runs on the forward's backend.
"""

from functools import lru_cache
from typing import NamedTuple, Optional

import torch

from ..backends import KernelFamily, compiled, lazy_module, module
from ..reference import sorting as reference

Tensor = torch.Tensor

# kMaxSortWires and kMaxApplyWires of csrc/include/pyclloss/sorting_cuda.h: the
# CUDA kernels form P for rows of up to 128 values, P v for up to 1024.
CUDA_MAX_SORT_WIRES = 128
CUDA_MAX_APPLY_WIRES = 1024


def _triton_kernels():
    from ..triton_kernels import sorting as kernels  # Triton loads on first use

    return kernels


# The compiled ops (csrc/cpu/sorting.cpp, csrc/cuda/sorting.cu) of each kernel.
_COMPILED = compiled(sort_forward="diff_sort_fwd", sort_backward="diff_sort_bwd",
                     apply_forward="diff_sort_apply_fwd", apply_backward="diff_sort_apply_bwd")
KERNELS = KernelFamily("sorting", reference=module(reference), cpp=_COMPILED, cuda=_COMPILED,
                       triton=lazy_module(_triton_kernels))


@lru_cache(maxsize=reference.CACHED_NETWORKS)
def _comparators(network: str, n: int, device: torch.device) -> Tensor:
    """The network as the compiled kernels take it: (lo, hi) int32 pairs, layer after layer."""
    pairs = [pair for layer in reference.network_layers(network, n) for pair in layer]
    return torch.tensor(pairs, dtype=torch.int32).reshape(-1, 2).to(device)


class _LaneTables(NamedTuple):
    """The network as the Triton kernels take it: the wires in a power-of-two
    block of ``lanes`` lanes, and per layer and lane the partner lane and a
    sign (+1: the lane receives the relaxed minimum, -1: the maximum, 0:
    untouched), int32 (max(layers, 1), lanes)."""
    partner: Tensor
    sign: Tensor
    layers: int
    lanes: int


@lru_cache(maxsize=reference.CACHED_NETWORKS)
def _lane_tables(network: str, n: int, device: torch.device) -> _LaneTables:
    lanes = 1 << max(n - 1, 0).bit_length()
    layers = reference.network_layers(network, n)
    partner = torch.arange(lanes, dtype=torch.int32).repeat(max(len(layers), 1), 1)
    sign = torch.zeros_like(partner)
    for i, layer in enumerate(layers):
        for lo, hi in layer:
            partner[i, lo], partner[i, hi] = hi, lo
            sign[i, lo], sign[i, hi] = 1, -1
    return _LaneTables(partner.to(device), sign.to(device), len(layers), lanes)


def _run(backend: str, name: str, *args):
    """Kernel ``name`` of a backend with the reference's signature: tensors, then
    (network, steepness, distribution, art_lambda). The fused kernels take the
    network in their own form (comparator pairs, lane tables) on x's device and
    the distribution as its code."""
    run = KERNELS.kernel(backend, name)
    if backend == "reference":
        return run(*args)
    *tensors, network, steepness, distribution, art_lambda = args
    x = tensors[0]
    form = _lane_tables if backend == "triton" else _comparators
    return run(*tensors, form(network, x.shape[1], x.device), steepness,
               reference.DISTRIBUTIONS.index(distribution), art_lambda)


def _contiguous(t: Optional[Tensor]) -> Optional[Tensor]:
    return t.contiguous() if t is not None else None


# ------------------------------------------------------------------- diff_sort


@torch.library.custom_op("pyclloss::diff_sort", mutates_args=())
def diff_sort(x: Tensor, network: str, steepness: float, distribution: str, art_lambda: float,
              backend: str) -> tuple[Tensor, Tensor]:
    return _run(backend, "sort_forward", x.contiguous(), network, steepness, distribution,
                art_lambda)


@diff_sort.register_fake
def _(x, network, steepness, distribution, art_lambda, backend):
    rows, n = x.shape
    return x.new_empty(rows, n), x.new_empty(rows, n, n)


@torch.library.custom_op("pyclloss::diff_sort_backward", mutates_args=())
def diff_sort_backward(x: Tensor, grad_sorted: Optional[Tensor], grad_perm: Optional[Tensor],
                       network: str, steepness: float, distribution: str, art_lambda: float,
                       backend: str) -> Tensor:
    return _run(backend, "sort_backward", x.contiguous(), _contiguous(grad_sorted),
                _contiguous(grad_perm), network, steepness, distribution, art_lambda)


@diff_sort_backward.register_fake
def _(x, grad_sorted, grad_perm, network, steepness, distribution, art_lambda, backend):
    return torch.empty_like(x)


def _setup_diff_sort(ctx, inputs, output):
    x, network, steepness, distribution, art_lambda, backend = inputs
    ctx.save_for_backward(x)
    ctx.args = (network, steepness, distribution, art_lambda, backend)
    # An output nobody used gets None rather than zeros: the gradient of P is
    # the expensive part of the backward.
    ctx.set_materialize_grads(False)


def _diff_sort_grad(ctx, grad_sorted, grad_perm):
    (x,) = ctx.saved_tensors
    if grad_sorted is None and grad_perm is None:
        return (None,) * 6
    grad_x = diff_sort_backward(x, grad_sorted, grad_perm, *ctx.args)
    return grad_x, None, None, None, None, None


diff_sort.register_autograd(_diff_sort_grad, setup_context=_setup_diff_sort)


# ------------------------------------------------------------- diff_sort_apply


@torch.library.custom_op("pyclloss::diff_sort_apply", mutates_args=())
def diff_sort_apply(x: Tensor, v: Tensor, network: str, steepness: float, distribution: str,
                    art_lambda: float, backend: str) -> Tensor:
    return _run(backend, "apply_forward", x.contiguous(), v.contiguous(), network, steepness,
                distribution, art_lambda)


@diff_sort_apply.register_fake
def _(x, v, network, steepness, distribution, art_lambda, backend):
    return torch.empty_like(x)


@torch.library.custom_op("pyclloss::diff_sort_apply_backward", mutates_args=())
def diff_sort_apply_backward(x: Tensor, v: Tensor, grad_out: Tensor, network: str,
                             steepness: float, distribution: str, art_lambda: float,
                             backend: str) -> tuple[Tensor, Tensor]:
    return _run(backend, "apply_backward", x.contiguous(), v.contiguous(), grad_out.contiguous(),
                network, steepness, distribution, art_lambda)


@diff_sort_apply_backward.register_fake
def _(x, v, grad_out, network, steepness, distribution, art_lambda, backend):
    return torch.empty_like(x), torch.empty_like(v)


def _setup_apply(ctx, inputs, output):
    x, v, network, steepness, distribution, art_lambda, backend = inputs
    ctx.save_for_backward(x, v)
    ctx.args = (network, steepness, distribution, art_lambda, backend)


def _apply_grad(ctx, grad_out):
    x, v = ctx.saved_tensors
    grad_x, grad_v = diff_sort_apply_backward(x, v, grad_out, *ctx.args)
    return grad_x, grad_v, None, None, None, None, None


diff_sort_apply.register_autograd(_apply_grad, setup_context=_setup_apply)
