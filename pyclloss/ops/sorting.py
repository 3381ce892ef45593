"""Custom ops of the differentiable sorting networks.

* ``pyclloss::diff_sort(x, ...) -> (sorted, P)``: the relaxed sort of the rows
  of x (B, n) and its permutation matrix, ``sorted = x @ P``.
* ``pyclloss::diff_sort_apply(x, v, ...) -> P @ v`` per row, without forming P
  (O(n·L) per row instead of O(n²·L)).

Each op has a fake kernel and an autograd formula; the backwards are custom
ops themselves, so ``torch.compile`` traces forward and backward without graph
breaks. ``backend`` is one of ``reference``, ``cpp``, ``triton`` (already
resolved by the caller); the backward runs on the forward's backend.
"""

from functools import cache
from typing import Optional

import torch

from ..reference import sorting as reference

Tensor = torch.Tensor

BACKENDS = ("reference", "cpp", "triton")


@cache
def _comparators(network: str, n: int, device: torch.device) -> Tensor:
    """The network as the C++ kernels take it: (lo, hi) int32 pairs, layer after layer."""
    pairs = [pair for layer in reference.network_layers(network, n) for pair in layer]
    return torch.tensor(pairs, dtype=torch.int32).reshape(-1, 2).to(device)


class _CppKernels:
    """The C++ kernels of csrc/cpu/sorting.cpp with the reference's signatures."""

    @staticmethod
    def _code(distribution: str) -> int:
        return reference.DISTRIBUTIONS.index(distribution)

    def sort_forward(self, x, network, steepness, distribution, art_lambda):
        return torch.ops.pyclloss_C.diff_sort_fwd(
            x, _comparators(network, x.shape[1], x.device), steepness,
            self._code(distribution), art_lambda)

    def sort_backward(self, x, grad_sorted, grad_perm, network, steepness, distribution,
                      art_lambda):
        return torch.ops.pyclloss_C.diff_sort_bwd(
            x, grad_sorted, grad_perm, _comparators(network, x.shape[1], x.device), steepness,
            self._code(distribution), art_lambda)

    def apply_forward(self, x, v, network, steepness, distribution, art_lambda):
        return torch.ops.pyclloss_C.diff_sort_apply_fwd(
            x, v, _comparators(network, x.shape[1], x.device), steepness,
            self._code(distribution), art_lambda)

    def apply_backward(self, x, v, grad_out, network, steepness, distribution, art_lambda):
        return torch.ops.pyclloss_C.diff_sort_apply_bwd(
            x, v, grad_out, _comparators(network, x.shape[1], x.device), steepness,
            self._code(distribution), art_lambda)


_CPP_KERNELS = _CppKernels()


def _kernels(backend: str):
    if backend == "reference":
        return reference
    if backend == "cpp":
        import pyclloss._C  # noqa: F401  (registers torch.ops.pyclloss_C)
        return _CPP_KERNELS
    if backend == "triton":
        from ..triton_kernels import sorting as triton_sorting
        return triton_sorting
    raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")


def _contiguous(t: Optional[Tensor]) -> Optional[Tensor]:
    return t.contiguous() if t is not None else None


# ------------------------------------------------------------------- diff_sort


@torch.library.custom_op("pyclloss::diff_sort", mutates_args=())
def diff_sort(x: Tensor, network: str, steepness: float, distribution: str, art_lambda: float,
              backend: str) -> tuple[Tensor, Tensor]:
    return _kernels(backend).sort_forward(x.contiguous(), network, steepness, distribution,
                                          art_lambda)


@diff_sort.register_fake
def _(x, network, steepness, distribution, art_lambda, backend):
    rows, n = x.shape
    return x.new_empty(rows, n), x.new_empty(rows, n, n)


@torch.library.custom_op("pyclloss::diff_sort_backward", mutates_args=())
def diff_sort_backward(x: Tensor, grad_sorted: Optional[Tensor], grad_perm: Optional[Tensor],
                       network: str, steepness: float, distribution: str, art_lambda: float,
                       backend: str) -> Tensor:
    return _kernels(backend).sort_backward(x.contiguous(), _contiguous(grad_sorted),
                                           _contiguous(grad_perm), network, steepness,
                                           distribution, art_lambda)


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
    return _kernels(backend).apply_forward(x.contiguous(), v.contiguous(), network, steepness,
                                           distribution, art_lambda)


@diff_sort_apply.register_fake
def _(x, v, network, steepness, distribution, art_lambda, backend):
    return torch.empty_like(x)


@torch.library.custom_op("pyclloss::diff_sort_apply_backward", mutates_args=())
def diff_sort_apply_backward(x: Tensor, v: Tensor, grad_out: Tensor, network: str,
                             steepness: float, distribution: str, art_lambda: float,
                             backend: str) -> tuple[Tensor, Tensor]:
    return _kernels(backend).apply_backward(x.contiguous(), v.contiguous(), grad_out.contiguous(),
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
