"""Differentiable sorting networks and the GroCo loss.

Sorting networks relaxed as in Petersen et al. (ICML 2021, ICLR 2022; the
``diffsort`` package): every comparator mixes its two wires with a weight
alpha = f(steepness · (b - a)), which makes the sorted values and the
permutation matrix P (rows = inputs, columns = ranks, ascending,
``sorted = x @ P``) differentiable. Values and gradients equal, up to
rounding, those of ``diffsort.DiffSortNet(network, n, steepness=...,
art_lambda=..., distribution=...)`` for the same arguments.

GroCo (Shvetsova et al., ICCV 2023) sorts, per anchor, its hardest negative
similarities below its positive ones and penalises, with a binary
cross-entropy, every input's probability of landing on the wrong side.

Backends (``backend=``): ``auto`` picks the C++ kernel on CPU tensors (the
reference when the extension is not built) and, on CUDA tensors, the CUDA
kernel, else Triton; ``reference``, ``cpp``, ``cuda``, ``triton`` ask for one.
The fused kernels that form P take rows of up to 128 values (CUDA, Triton);
the CUDA ``diff_sort_apply`` rows of up to 1024. ``auto`` passes larger rows
on to the next backend.
"""

import numbers

import torch
import torch.nn.functional as F
from torch import nn

from . import _checks
from .backends import BACKENDS, resolve
from .ops import sorting as ops
from .reference.sorting import DISTRIBUTIONS, NETWORKS

Tensor = torch.Tensor

__all__ = [
    "DiffSortNet",
    "GroCoLoss",
    "diff_sort",
    "diff_sort_apply",
    "groco_loss",
    "soft_rank",
    "soft_top_k_mask",
]

def _triton_max_sort_size() -> int:
    from .triton_kernels.sorting import MAX_SORT_SIZE
    return MAX_SORT_SIZE


def _check_backend_name(backend) -> None:
    """Early check for the modules, which resolve per call."""
    if not isinstance(backend, str) or backend not in ("auto",) + BACKENDS:
        raise ValueError(f"backend must be one of {('auto',) + BACKENDS}, got {backend!r}")


def _max_wires(name: str, needs_perm: bool):
    """The largest row a backend takes (None: any); P (n×n per row) is held on chip."""
    if name == "cuda":
        return ops.CUDA_MAX_SORT_WIRES if needs_perm else ops.CUDA_MAX_APPLY_WIRES
    if name == "triton" and needs_perm:
        return _triton_max_sort_size()
    return None


def _resolve_backend(backend: str, x: Tensor, needs_perm: bool,
                     implemented: tuple = ops.KERNELS.backends) -> str:
    """The concrete backend for x; ``needs_perm``: the op returns P. ``auto``
    passes rows too large for a backend on to the next one."""
    name = resolve(backend, x.device, implemented, family=ops.KERNELS.name, dtype=x.dtype,
                   size=int(x.shape[-1]) if x.is_cuda else 0)
    n, limit = x.shape[1], _max_wires(name, needs_perm)
    if limit is None or n <= limit:
        return name
    if backend == "auto":
        return _resolve_backend(backend, x, needs_perm, tuple(b for b in implemented if b != name))
    if needs_perm:
        raise ValueError(f"backend {name!r} returns P for n <= {limit}, got n = {n}; "
                         "use diff_sort_apply or another backend")
    raise ValueError(f"backend {name!r} takes rows of n <= {limit}, got n = {n}; "
                     "use another backend")


# ------------------------------------------------------------------ validation


def _check_rows(x, name: str) -> None:
    if not isinstance(x, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if not x.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got {x.dtype}")
    if x.dim() != 2:
        raise ValueError(f"{name} must be 2-D (batch, n), got shape {tuple(x.shape)}")
    _checks.finite(name, x)


def _check_relaxation(network, steepness, distribution, art_lambda) -> None:
    if network not in NETWORKS:
        raise ValueError(f"network must be one of {NETWORKS}, got {network!r}")
    if distribution not in DISTRIBUTIONS:
        raise ValueError(f"distribution must be one of {DISTRIBUTIONS}, got {distribution!r}")
    for name, value in (("steepness", steepness), ("art_lambda", art_lambda)):
        if isinstance(value, bool) or not isinstance(value, numbers.Real):
            raise TypeError(f"{name} must be a real number, got {type(value).__name__}")
    _checks.scalar("art_lambda", art_lambda, torch.device("cpu"), torch.float64)
    _checks.positive("steepness", steepness, torch.device("cpu"), torch.float64)


def _check_sort_input(x, network, steepness, distribution, art_lambda) -> None:
    _check_rows(x, "x")
    if x.shape[1] == 0:
        raise ValueError("x must have at least one column (n >= 1), got n = 0")
    _check_relaxation(network, steepness, distribution, art_lambda)


# ------------------------------------------------------------------ public API


def diff_sort(x: Tensor, network: str = "odd_even", steepness: float = 10.0,
              distribution: str = "cauchy", art_lambda: float = 0.25,
              backend: str = "auto") -> tuple[Tensor, Tensor]:
    """Relaxed ascending sort of the rows of ``x`` (B, n).

    Returns ``(sorted, P)``: ``sorted`` (B, n) and the relaxed permutation
    matrix ``P`` (B, n, n), rows = inputs, columns = ranks, ``sorted = x @ P``;
    each row of P sums to 1 (P is doubly stochastic).

    network: ``"odd_even"`` (n layers) or ``"bitonic"`` (k(k+1)/2 layers,
    k = ceil(log2 n); other sizes drop the comparators of the padding wires).
    distribution: the comparator relaxation f with alpha = f(steepness·(b−a)):
    ``logistic``, ``logistic_phi`` (uses ``art_lambda``), ``gaussian``,
    ``cauchy``, ``reciprocal``, ``optimal``. Larger ``steepness`` is closer to
    the hard sort. Arithmetic in float32 (float64 for float64 inputs);
    outputs in x's dtype.
    """
    _check_sort_input(x, network, steepness, distribution, art_lambda)
    return _sort(x, network, steepness, distribution, art_lambda, backend)


def _sort(x, network, steepness, distribution, art_lambda, backend):
    backend = _resolve_backend(backend, x, needs_perm=True)
    return ops.diff_sort(x, network, float(steepness), distribution, float(art_lambda), backend)


def _apply(x, v, network, steepness, distribution, art_lambda, backend):
    backend = _resolve_backend(backend, x, needs_perm=False)
    v = v.to(x.dtype).expand(x.shape)
    return ops.diff_sort_apply(x, v, network, float(steepness), distribution, float(art_lambda),
                               backend)


def diff_sort_apply(x: Tensor, v: Tensor, network: str = "odd_even", steepness: float = 10.0,
                    distribution: str = "cauchy", art_lambda: float = 0.25,
                    backend: str = "auto") -> Tensor:
    """``P @ v`` per row without forming P: ``v`` holds a value per rank, (n,)
    or (B, n); the result (B, n) is, for every input, the expectation of v at
    the rank it lands in. O(n·layers) per row. Differentiable in x and v.
    Arguments as ``diff_sort``."""
    _check_sort_input(x, network, steepness, distribution, art_lambda)
    if not isinstance(v, Tensor):
        raise TypeError(f"v must be a torch.Tensor, got {type(v).__name__}")
    if not v.is_floating_point():
        raise TypeError(f"v must be a floating-point tensor, got {v.dtype}")
    n = x.shape[1]
    if v.shape not in ((n,), tuple(x.shape)):
        raise ValueError(f"v must have shape ({n},) or {tuple(x.shape)}, got {tuple(v.shape)}")
    if v.device != x.device:
        raise ValueError(f"v must be on x's device {x.device}, got {v.device}")
    _checks.finite("v", v)
    return _apply(x, v, network, steepness, distribution, art_lambda, backend)


def soft_rank(x: Tensor, network: str = "odd_even", steepness: float = 10.0,
              distribution: str = "cauchy", art_lambda: float = 0.25,
              backend: str = "auto") -> Tensor:
    """Expected rank of every input, 1-based ascending (1 = smallest; as
    ``torchsort.soft_rank`` and ``scipy.stats.rankdata``): ``P @ [1, ..., n]``."""
    _check_sort_input(x, network, steepness, distribution, art_lambda)
    ranks = torch.arange(1, x.shape[1] + 1, dtype=x.dtype, device=x.device)
    return _apply(x, ranks, network, steepness, distribution, art_lambda, backend)


def soft_top_k_mask(x: Tensor, k: int, network: str = "odd_even", steepness: float = 10.0,
                    distribution: str = "cauchy", art_lambda: float = 0.25,
                    backend: str = "auto") -> Tensor:
    """Probability that every input lands among the ``k`` largest of its row:
    ``P @ [0, ..., 0, 1, ..., 1]`` (k ones); each row sums to k."""
    _check_sort_input(x, network, steepness, distribution, art_lambda)
    n = x.shape[1]
    if isinstance(k, bool) or not isinstance(k, numbers.Integral):
        raise TypeError(f"k must be an int, got {type(k).__name__}")
    if not 0 <= k <= n:
        raise ValueError(f"k must be in [0, n] = [0, {n}], got {k}")
    top = (torch.arange(n, device=x.device) >= n - k).to(x.dtype)
    return _apply(x, top, network, steepness, distribution, art_lambda, backend)


class DiffSortNet(nn.Module):
    """``diffsort.DiffSortNet`` as a module on the fused kernels: forward(x)
    with x (B, size) returns ``(sorted, P)`` (see ``diff_sort``)."""

    def __init__(self, network: str, size: int, steepness: float = 10.0,
                 distribution: str = "cauchy", art_lambda: float = 0.25, backend: str = "auto"):
        super().__init__()
        _check_relaxation(network, steepness, distribution, art_lambda)
        if isinstance(size, bool) or not isinstance(size, numbers.Integral):
            raise TypeError(f"size must be an int, got {type(size).__name__}")
        if size < 1:
            raise ValueError(f"size must be >= 1, got {size}")
        _check_backend_name(backend)
        self.network, self.size = network, int(size)
        self.steepness, self.distribution, self.art_lambda = steepness, distribution, art_lambda
        self.backend = backend

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        _check_sort_input(x, self.network, self.steepness, self.distribution, self.art_lambda)
        if x.shape[1] != self.size:
            raise ValueError(f"x must have {self.size} columns (size), got {x.shape[1]}")
        return _sort(x, self.network, self.steepness, self.distribution, self.art_lambda,
                     self.backend)

    def extra_repr(self) -> str:
        return (f"network={self.network!r}, size={self.size}, steepness={self.steepness}, "
                f"distribution={self.distribution!r}, backend={self.backend!r}")


# ------------------------------------------------------------------------ GroCo


def groco_loss(pos_sim: Tensor, neg_sim: Tensor, steepness: float = 1.0, num_neg: int = 10,
               backend: str = "auto") -> Tensor:
    """GroCo (Shvetsova et al., "Learning by Sorting", ICCV 2023).

    pos_sim (B, P): each anchor's similarities to its positives; neg_sim (B, M):
    its similarities to negatives, M >= num_neg (entries masked with -inf, as
    the authors mask the anchor itself, are allowed while every row keeps
    num_neg finite ones). Per anchor the ``num_neg`` largest negatives
    (ascending) are placed below the positives (ascending) and relaxed-sorted
    (odd-even network, cauchy); q_i is the probability that input i lands in
    a positive rank, and the loss is the mean over anchors and inputs of
    ``BCE(clip(q_i, 0, 1), [i is a positive])``. Computed in float32 (float64
    for float64 inputs); gradients flow to both similarity tensors.
    """
    for name, sim in (("pos_sim", pos_sim), ("neg_sim", neg_sim)):
        if not isinstance(sim, Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(sim).__name__}")
        if not sim.is_floating_point():
            raise TypeError(f"{name} must be a floating-point tensor, got {sim.dtype}")
        if sim.dim() != 2:
            raise ValueError(f"{name} must be 2-D (anchors, similarities), got shape "
                             f"{tuple(sim.shape)}")
    if pos_sim.shape[0] != neg_sim.shape[0]:
        raise ValueError(f"pos_sim and neg_sim must have the same number of anchors, got "
                         f"{pos_sim.shape[0]} and {neg_sim.shape[0]}")
    if pos_sim.device != neg_sim.device:
        raise ValueError("pos_sim and neg_sim must be on the same device")
    if isinstance(num_neg, bool) or not isinstance(num_neg, numbers.Integral):
        raise TypeError(f"num_neg must be an int, got {type(num_neg).__name__}")
    if not 0 <= num_neg <= neg_sim.shape[1]:
        raise ValueError(f"num_neg must be in [0, neg_sim.shape[1]] = [0, {neg_sim.shape[1]}], "
                         f"got {num_neg}")
    if num_neg + pos_sim.shape[1] == 0:
        raise ValueError("nothing to sort: pos_sim has no columns and num_neg = 0")
    _check_relaxation("odd_even", steepness, "cauchy", 0.25)
    _checks.finite("pos_sim", pos_sim)
    _checks.require(~torch.isnan(neg_sim) & (neg_sim != float("inf")),
                    "neg_sim contains NaN or +Inf")

    acc = torch.float64 if torch.float64 in (pos_sim.dtype, neg_sim.dtype) else torch.float32
    hardest = neg_sim.to(acc).topk(num_neg, dim=1).values.flip(1)
    _checks.require(torch.isfinite(hardest),
                    f"neg_sim: some row has fewer than num_neg = {num_neg} finite entries")
    sims = torch.cat([hardest, pos_sim.to(acc).sort(dim=1).values], dim=1)
    is_pos = (torch.arange(sims.shape[1], device=sims.device) >= num_neg).to(acc)
    q = _apply(sims, is_pos, "odd_even", steepness, "cauchy", 0.25, backend)
    return F.binary_cross_entropy(q.clamp(0, 1), is_pos.expand_as(q))


class GroCoLoss(nn.Module):
    """Module form of ``groco_loss``: forward(pos_sim, neg_sim)."""

    def __init__(self, steepness: float = 1.0, num_neg: int = 10, backend: str = "auto"):
        super().__init__()
        _check_relaxation("odd_even", steepness, "cauchy", 0.25)
        if isinstance(num_neg, bool) or not isinstance(num_neg, numbers.Integral) or num_neg < 0:
            raise ValueError(f"num_neg must be an int >= 0, got {num_neg!r}")
        _check_backend_name(backend)
        self.steepness, self.num_neg, self.backend = steepness, int(num_neg), backend

    def forward(self, pos_sim: Tensor, neg_sim: Tensor) -> Tensor:
        return groco_loss(pos_sim, neg_sim, self.steepness, self.num_neg, self.backend)

    def extra_repr(self) -> str:
        return f"steepness={self.steepness}, num_neg={self.num_neg}, backend={self.backend!r}"
