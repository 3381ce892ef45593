"""Differentiable sorting networks and GroCo: every backend against the
reference, the reference against diffsort, GroCo against the authors'
formulation written with diffsort."""

import os

import torch

if not torch.cuda.is_available():
    # Before triton is imported anywhere: Triton kernels run on the CPU interpreter.
    os.environ.setdefault("TRITON_INTERPRET", "1")

import functools
import gc
import importlib.util
import tracemalloc

import pytest
import torch.nn.functional as F

import pyclloss
import pyclloss.sorting as S
from pyclloss.ops import sorting as ops
from pyclloss.reference import sorting as ref

diffsort = pytest.importorskip("diffsort")

NETWORKS = ref.NETWORKS
DISTRIBUTIONS = ref.DISTRIBUTIONS
SIZES = (2, 3, 5, 8, 11, 16, 33)
HAS_CUDA = torch.cuda.is_available()
HAS_CPP = pyclloss.backends()["cpp"].available
HAS_TRITON = importlib.util.find_spec("triton") is not None
TRITON_DEVICE = "cuda" if HAS_CUDA else "cpu"

needs_cpp = pytest.mark.skipif(not HAS_CPP, reason="pyclloss._C is not built")
needs_triton = pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed")
needs_cuda = pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU")
needs_cuda_kernels = pytest.mark.skipif(not (HAS_CUDA and pyclloss.backends()["cuda"].available),
                                        reason="needs a CUDA GPU and the CUDA build")


class BackendKernels:
    """The kernels of one backend with the reference's signatures (ops._run)."""

    def __init__(self, backend):
        self.backend = backend

    def __getattr__(self, name):
        return functools.partial(ops._run, self.backend, name)


def assert_close(actual, expected, tol):
    """Max abs error within tol relative to the larger of 1 and max |expected|."""
    actual, expected = actual.double().cpu(), expected.double().cpu()
    assert actual.shape == expected.shape
    scale = max(1.0, expected.abs().max().item()) if expected.numel() else 1.0
    err = (actual - expected).abs().max().item() if expected.numel() else 0.0
    assert err <= tol * scale, f"max abs error {err:.3g} > {tol:.1g} * {scale:.3g}"


def diffsort_sort(x, network, steepness, distribution, art_lambda=0.25):
    sorter = diffsort.DiffSortNet(network, x.shape[1], steepness=steepness,
                                  distribution=distribution, art_lambda=art_lambda)
    # The network is a plain list of matrices: .to() does not move or cast it.
    sorter.sorting_network = [[m.to(x) for m in layer] for layer in sorter.sorting_network]
    return sorter(x)


def random_cotangents(x, seed):
    g = torch.Generator().manual_seed(seed)
    b, n = x.shape
    return (torch.randn(b, n, generator=g, dtype=torch.float64).to(x),
            torch.randn(b, n, n, generator=g, dtype=torch.float64).to(x))


def random_inputs(rows, n, seed):
    """x, v and the cotangents of sorted and P of a kernel test (float64, CPU)."""
    x = torch.randn(rows, n, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))
    return (x, torch.randn_like(x), *random_cotangents(x, seed))


def sort_and_grad(fn, x, grad_sorted, grad_perm):
    x = x.detach().clone().requires_grad_(True)
    sorted_x, perm = fn(x)
    (grad_x,) = torch.autograd.grad((sorted_x * grad_sorted).sum() + (perm * grad_perm).sum(), x)
    return sorted_x.detach(), perm.detach(), grad_x


def kernel_results(kernels, x, v, gs, gp, args):
    """Every kernel of a backend on the same inputs."""
    return (
        *kernels.sort_forward(x, *args),
        kernels.sort_backward(x, gs, gp, *args),
        kernels.sort_backward(x, gs, None, *args),
        kernels.sort_backward(x, None, gp, *args),
        kernels.apply_forward(x, v, *args),
        *kernels.apply_backward(x, v, gs, *args),
    )


# ------------------------------------------------------------- reference vs diffsort


@pytest.mark.parametrize("network", NETWORKS)
@pytest.mark.parametrize("distribution", DISTRIBUTIONS)
def test_reference_matches_diffsort(network, distribution):
    for seed, n in enumerate(SIZES):
        x = torch.randn(3, n, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))
        gs, gp = random_cotangents(x, seed)
        ours = sort_and_grad(lambda t: ref.sort_forward(t, network, 3.0, distribution, 0.25),
                             x, gs, gp)
        theirs = sort_and_grad(lambda t: diffsort_sort(t, network, 3.0, distribution), x, gs, gp)
        # diffsort's gaussian backward keeps sigma = 1/steepness in float32: ~1e-7 relative.
        for a, b in zip(ours, theirs):
            assert_close(a, b, 1e-6)


@pytest.mark.parametrize("network", NETWORKS)
@pytest.mark.parametrize("distribution", DISTRIBUTIONS)
def test_reference_backward_is_the_vjp_of_its_forward(network, distribution):
    args = (network, 2.0, distribution, 0.25)
    for seed, n in enumerate((1, 2, 5, 11)):
        x = torch.randn(2, n, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))
        gs, gp = random_cotangents(x, seed)
        _, _, grad_auto = sort_and_grad(lambda t: ref.sort_forward(t, *args), x, gs, gp)
        assert_close(ref.sort_backward(x, gs, gp, *args), grad_auto, 1e-12)

        v = torch.randn_like(x)
        xx, vv = x.clone().requires_grad_(True), v.clone().requires_grad_(True)
        out = (ref.sort_forward(xx, *args)[1] @ vv[:, :, None])[:, :, 0]
        gx, gv = torch.autograd.grad((out * gs).sum(), (xx, vv), allow_unused=True,
                                     materialize_grads=True)
        assert_close(ref.apply_forward(x, v, *args), out.detach(), 1e-12)
        got_x, got_v = ref.apply_backward(x, v, gs, *args)
        assert_close(got_x, gx, 1e-12)
        assert_close(got_v, gv, 1e-12)


def test_network_depths():
    for n in SIZES:
        assert len(ref.network_layers("odd_even", n)) == n
        k = (n - 1).bit_length()
        assert len(ref.network_layers("bitonic", n)) == k * (k + 1) // 2


# ------------------------------------------------------------------ fused backends


@needs_cpp
@pytest.mark.parametrize("network", NETWORKS)
@pytest.mark.parametrize("distribution", DISTRIBUTIONS)
def test_cpp_kernels_match_reference(network, distribution):
    cpp = BackendKernels("cpp")
    args = (network, 3.0, distribution, 0.25)
    for seed, n in enumerate((1,) + SIZES):
        x, v, gs, gp = random_inputs(1 if n == 1 else 4, n, seed)
        expected = kernel_results(ref, x, v, gs, gp, args)
        for a, b in zip(kernel_results(cpp, x, v, gs, gp, args), expected):
            assert_close(a, b, 1e-11)
        # float32 arithmetic against the float64 reference: the error grows with the
        # depth (33 layers) as diffsort's own float32 error does
        x32, v32, gs32, gp32 = (t.float() for t in (x, v, gs, gp))
        for a, b in zip(kernel_results(cpp, x32, v32, gs32, gp32, args), expected):
            assert a.dtype == torch.float32
            assert_close(a, b, 5e-5)


@needs_cpp
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_cpp_half_inputs(dtype):
    x = torch.randn(6, 11, dtype=torch.float64)
    v = torch.randn_like(x)
    gs, gp = random_cotangents(x, 0)
    args = ("odd_even", 5.0, "cauchy", 0.25)
    low = [t.to(dtype) for t in (x, v, gs, gp)]
    got = kernel_results(BackendKernels("cpp"), *low, args)
    # the oracle on the same rounded inputs: what remains is float32 arithmetic
    # and the outputs' rounding, half a unit of the low precision
    expected = kernel_results(ref, *[t.double() for t in low], args)
    for a, b in zip(got, expected):
        assert a.dtype == dtype
        assert_close(a, b, torch.finfo(dtype).eps)


def _triton_cases():
    # Small: the interpreter runs every op in numpy.
    cases = []
    for i, (network, distribution) in enumerate(
            (nw, d) for nw in NETWORKS for d in DISTRIBUTIONS):
        cases.append((network, distribution, (2, 3, 5, 11)[i % 4]))
    return cases + [("odd_even", "cauchy", 16), ("bitonic", "cauchy", 33)]


@needs_triton
@pytest.mark.parametrize("network,distribution,n", _triton_cases())
def test_triton_kernels_match_reference(network, distribution, n):
    tri = BackendKernels("triton")
    args = (network, 3.0, distribution, 0.25)
    x = torch.randn(3, n, dtype=torch.float64, generator=torch.Generator().manual_seed(n))
    v = torch.randn_like(x)
    gs, gp = random_cotangents(x, n)
    expected = kernel_results(ref, x, v, gs, gp, args)
    inputs = [t.float().to(TRITON_DEVICE) for t in (x, v, gs, gp)]
    for a, b in zip(kernel_results(tri, *inputs, args), expected):
        assert a.dtype == torch.float32
        assert_close(a, b, 1e-5)


@needs_triton
def test_triton_float64_and_float16():
    tri = BackendKernels("triton")
    args = ("bitonic", 4.0, "cauchy", 0.25)
    x = torch.randn(2, 6, dtype=torch.float64)
    v = torch.randn_like(x)
    gs, gp = random_cotangents(x, 1)
    expected = kernel_results(ref, x, v, gs, gp, args)
    for dtype, tol in ((torch.float64, 1e-12), (torch.float16, 3e-2)):
        inputs = [t.to(dtype).to(TRITON_DEVICE) for t in (x, v, gs, gp)]
        for a, b in zip(kernel_results(tri, *inputs, args), expected):
            assert a.dtype == dtype
            assert_close(a, b, tol)


def _backends():
    out = ["reference"]
    if HAS_CPP:
        out.append("cpp")
    return out


@pytest.mark.parametrize("backend", _backends())
@pytest.mark.parametrize("network", NETWORKS)
def test_public_api_matches_diffsort_fp32(backend, network):
    for seed, n in enumerate(SIZES):
        x = torch.randn(5, n, generator=torch.Generator().manual_seed(seed))
        gs, gp = random_cotangents(x, seed)
        ours = sort_and_grad(lambda t: S.diff_sort(t, network, backend=backend), x, gs, gp)
        theirs = sort_and_grad(lambda t: diffsort_sort(t, network, 10.0, "cauchy"), x, gs, gp)
        for a, b in zip(ours, theirs):
            assert_close(a, b, 1e-5)


@pytest.mark.parametrize("backend", _backends())
def test_module_matches_diffsort_module(backend):
    x = torch.randn(4, 9)
    ours = S.DiffSortNet("bitonic", 9, steepness=7.0, distribution="logistic_phi",
                         backend=backend)(x)
    theirs = diffsort.DiffSortNet("bitonic", 9, steepness=7.0, distribution="logistic_phi")(x)
    for a, b in zip(ours, theirs):
        assert_close(a, b, 1e-5)


# ---------------------------------------------------------------------- properties


@pytest.mark.parametrize("backend", _backends())
@pytest.mark.parametrize("network", NETWORKS)
def test_perm_is_doubly_stochastic_and_sorts_x(backend, network):
    for distribution in DISTRIBUTIONS:
        x = torch.randn(4, 13, dtype=torch.float64)
        sorted_x, perm = S.diff_sort(x, network, 2.0, distribution, backend=backend)
        ones = torch.ones(4, 13, dtype=torch.float64)
        assert_close(perm.sum(2), ones, 1e-12)
        assert_close(perm.sum(1), ones, 1e-12)
        assert bool((perm >= 0).all())
        assert_close(sorted_x, (x[:, None, :] @ perm)[:, 0], 1e-12)


@pytest.mark.parametrize("backend", _backends())
@pytest.mark.parametrize("network", NETWORKS)
@pytest.mark.parametrize("distribution", DISTRIBUTIONS)
def test_hard_sort_limit(backend, network, distribution):
    n = 33
    g = torch.Generator().manual_seed(3)
    # distinct values spaced by >= 1: at steepness 1e6 every comparator is decided
    x = torch.stack([torch.randperm(n, generator=g) for _ in range(3)]).double()
    x = x + 0.1 * torch.rand(x.shape, generator=g, dtype=torch.float64)
    sorted_x, perm = S.diff_sort(x, network, 1e6, distribution, backend=backend)
    hard = F.one_hot(x.argsort(1).argsort(1), n).double()
    assert_close(perm, hard, 1e-4)
    assert_close(sorted_x, x.sort(1).values, 1e-4)
    assert_close(S.soft_rank(x, network, 1e6, distribution, backend=backend),
                 x.argsort(1).argsort(1).double() + 1, 1e-4)


@pytest.mark.parametrize("backend", _backends())
def test_soft_rank_and_top_k_are_expectations_under_perm(backend):
    x = torch.randn(5, 12, dtype=torch.float64, requires_grad=True)
    _, perm = S.diff_sort(x, "bitonic", 3.0, "reciprocal", backend="reference")
    ranks = S.soft_rank(x, "bitonic", 3.0, "reciprocal", backend=backend)
    assert_close(ranks, perm @ torch.arange(1, 13, dtype=torch.float64), 1e-12)
    top = S.soft_top_k_mask(x, 4, "bitonic", 3.0, "reciprocal", backend=backend)
    assert_close(top, perm[:, :, -4:].sum(2), 1e-12)
    assert_close(top.sum(1), torch.full((5,), 4.0, dtype=torch.float64), 1e-12)
    w = torch.randn(5, 12, dtype=torch.float64)
    g_ours = torch.autograd.grad((top * w).sum(), x)[0]
    g_ref = torch.autograd.grad((perm[:, :, -4:].sum(2) * w).sum(), x)[0]
    assert_close(g_ours, g_ref, 1e-12)


def test_diff_sort_apply_broadcasts_v_and_differentiates_it():
    x = torch.randn(3, 7, dtype=torch.float64)
    v = torch.randn(7, dtype=torch.float64, requires_grad=True)
    out = S.diff_sort_apply(x, v, backend="reference")
    _, perm = S.diff_sort(x, backend="reference")
    assert_close(out, perm @ v.detach(), 1e-12)
    (gv,) = torch.autograd.grad(out.sum(), v)
    assert_close(gv, perm.sum(1).sum(0), 1e-12)


# ----------------------------------------------------------------- gradcheck, opcheck


@pytest.mark.parametrize("backend", _backends())
@pytest.mark.parametrize("network,distribution", [("odd_even", "cauchy"),
                                                  ("bitonic", "logistic_phi"),
                                                  ("bitonic", "gaussian"),
                                                  ("odd_even", "optimal")])
def test_gradcheck(backend, network, distribution):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 5, dtype=torch.float64, generator=g).requires_grad_(True)
    v = torch.randn(2, 5, dtype=torch.float64, generator=g).requires_grad_(True)
    kw = {"network": network, "steepness": 2.0, "distribution": distribution, "backend": backend}
    assert torch.autograd.gradcheck(lambda t: S.diff_sort(t, **kw), (x,))
    assert torch.autograd.gradcheck(lambda t: S.diff_sort(t, **kw)[0], (x,))
    assert torch.autograd.gradcheck(lambda t: S.diff_sort(t, **kw)[1], (x,))
    assert torch.autograd.gradcheck(lambda t, u: S.diff_sort_apply(t, u, **kw), (x, v))


@pytest.mark.parametrize("backend", _backends())
def test_opcheck(backend):
    x = torch.randn(3, 6, requires_grad=True)
    v = torch.randn(3, 6, requires_grad=True)
    args = ("bitonic", 5.0, "cauchy", 0.25, backend)
    torch.library.opcheck(ops.diff_sort, (x, *args))
    torch.library.opcheck(ops.diff_sort_apply, (x, v, *args))
    gs, gp = torch.randn(3, 6), torch.randn(3, 6, 6)
    torch.library.opcheck(ops.diff_sort_backward, (x.detach(), gs, gp, *args))
    torch.library.opcheck(ops.diff_sort_backward, (x.detach(), None, gp, *args))
    torch.library.opcheck(ops.diff_sort_apply_backward, (x.detach(), v.detach(), gs, *args))


def test_only_sorted_used_skips_perm_gradient():
    # the gradient through the values alone equals the reference with grad_perm = None
    x = torch.randn(4, 9, dtype=torch.float64, requires_grad=True)
    w = torch.randn(4, 9, dtype=torch.float64)
    (g,) = torch.autograd.grad((S.diff_sort(x)[0] * w).sum(), x)
    expected = ref.sort_backward(x.detach(), w, None, "odd_even", 10.0, "cauchy", 0.25)
    assert_close(g, expected, 1e-12)


# --------------------------------------------------------------------------- GroCo


def groco_with_diffsort(pos_sim, neg_sim, steepness, num_neg):
    """The authors' formulation (learning_by_sorting, losses/groco.py): the BCE on
    the positive-rank sums and on the negative-rank sums, averaged."""
    pos = pos_sim.float().sort(dim=1).values
    neg = neg_sim.float().topk(num_neg, dim=1).values.flip(1)
    sims = torch.cat([neg, pos], dim=1)
    _, perm = diffsort_sort(sims, "odd_even", steepness, "cauchy")
    target = torch.eye(sims.shape[1]).expand_as(perm)
    pred_pos = perm[:, :, num_neg:].sum(2, keepdim=True).clip(0, 1)
    pred_neg = perm[:, :, :num_neg].sum(2, keepdim=True).clip(0, 1)
    tgt_pos = target[:, :, num_neg:].sum(2, keepdim=True).clip(0, 1)
    tgt_neg = target[:, :, :num_neg].sum(2, keepdim=True).clip(0, 1)
    return (F.binary_cross_entropy(pred_pos, tgt_pos) + F.binary_cross_entropy(pred_neg, tgt_neg)) / 2


def _groco_inputs(anchors, n_pos, seed):
    # The authors' setting: cosine similarities, the anchor itself masked with -inf.
    g = torch.Generator().manual_seed(seed)
    z = F.normalize(torch.randn(anchors, 16, generator=g), dim=1).requires_grad_(True)
    views = [F.normalize(torch.randn(anchors, 16, generator=g), dim=1) for _ in range(n_pos)]
    return z, views


def _groco_sims(z, views):
    pos_sim = torch.stack([(z * v).sum(1) for v in views], dim=1)
    neg_sim = (z @ z.T).masked_fill(torch.eye(z.shape[0], dtype=torch.bool, device=z.device), float("-inf"))
    return pos_sim, neg_sim


@pytest.mark.parametrize("backend", _backends() + (["triton"] if HAS_TRITON and not HAS_CUDA else []))
@pytest.mark.parametrize("n_pos", [1, 2, 3])
def test_groco_matches_authors_formulation(backend, n_pos):
    anchors = 6 if backend == "triton" else 24
    z, views = _groco_inputs(anchors, n_pos, n_pos)
    loss = S.groco_loss(*_groco_sims(z, views), steepness=1.0, num_neg=5 if anchors == 6 else 10,
                        backend=backend)
    (g,) = torch.autograd.grad(loss, z)
    expected = groco_with_diffsort(*_groco_sims(z, views), 1.0, 5 if anchors == 6 else 10)
    (g_expected,) = torch.autograd.grad(expected, z)
    assert loss.dtype == torch.float32
    assert abs(loss.item() - expected.item()) <= 1e-6
    assert_close(g, g_expected, 1e-5)


@pytest.mark.parametrize("backend", _backends())
def test_groco_module_and_steepness(backend):
    pos = torch.rand(8, 2, dtype=torch.float64, requires_grad=True)
    neg = torch.rand(8, 30, dtype=torch.float64, requires_grad=True)
    loss = S.GroCoLoss(steepness=4.0, num_neg=10, backend=backend)(pos, neg)
    expected = groco_with_diffsort(pos.double(), neg.double(), 4.0, 10)
    assert abs(loss.item() - expected.item()) <= 1e-5
    grads = torch.autograd.grad(loss, (pos, neg))
    grads_expected = torch.autograd.grad(expected, (pos, neg))
    for a, b in zip(grads, grads_expected):
        assert_close(a, b, 1e-5)
    assert torch.autograd.gradcheck(
        lambda p, q: S.groco_loss(p, q, 4.0, 10, backend), (pos, neg))


# ------------------------------------------------------------------------ bad input


@pytest.mark.parametrize("call,error,match", [
    (lambda: S.diff_sort(torch.randn(3, 0)), ValueError, "n >= 1"),
    (lambda: S.diff_sort(torch.randn(5)), ValueError, "x must be 2-D"),
    (lambda: S.diff_sort(torch.randn(2, 3, 4)), ValueError, "x must be 2-D"),
    (lambda: S.diff_sort(torch.tensor([[1.0, float("nan")]])), ValueError, "x contains NaN"),
    (lambda: S.diff_sort(torch.tensor([[1.0, float("inf")]])), ValueError, "x contains NaN"),
    (lambda: S.diff_sort(torch.ones(2, 3, dtype=torch.long)), TypeError, "x must be a floating"),
    (lambda: S.diff_sort([[1.0, 2.0]]), TypeError, "x must be a torch.Tensor"),
    (lambda: S.diff_sort(torch.randn(2, 3), network="bubble"), ValueError, "network must be"),
    (lambda: S.diff_sort(torch.randn(2, 3), distribution="laplace"), ValueError,
     "distribution must be"),
    (lambda: S.diff_sort(torch.randn(2, 3), steepness=0.0), ValueError, "steepness must be > 0"),
    (lambda: S.diff_sort(torch.randn(2, 3), steepness=-1.0), ValueError, "steepness must be > 0"),
    (lambda: S.diff_sort(torch.randn(2, 3), steepness="10"), TypeError, "steepness must be"),
    (lambda: S.diff_sort(torch.randn(2, 3), steepness=float("nan")), ValueError, "steepness"),
    (lambda: S.diff_sort(torch.randn(2, 3), backend="gpu"), ValueError, "backend must be"),
    # not built here, or built and given CPU tensors
    (lambda: S.diff_sort(torch.randn(2, 3), backend="cuda"), (RuntimeError, ValueError),
     "backend='cuda' (is not available|cannot run on cpu)"),
    (lambda: S.diff_sort_apply(torch.randn(2, 3), torch.randn(4)), ValueError, "v must have shape"),
    (lambda: S.diff_sort_apply(torch.randn(2, 3), torch.tensor([1.0, float("nan"), 0.0])),
     ValueError, "v contains NaN"),
    (lambda: S.soft_top_k_mask(torch.randn(2, 3), 4), ValueError, "k must be in"),
    (lambda: S.soft_top_k_mask(torch.randn(2, 3), 1.5), TypeError, "k must be an int"),
    (lambda: S.DiffSortNet("odd_even", 0), ValueError, "size must be"),
    (lambda: S.DiffSortNet("odd_even", 4)(torch.randn(2, 5)), ValueError, "4 columns"),
    (lambda: S.groco_loss(torch.rand(4, 2), torch.rand(4, 5), num_neg=10), ValueError,
     "num_neg must be in"),
    (lambda: S.groco_loss(torch.rand(4, 2), torch.rand(3, 20)), ValueError, "same number"),
    (lambda: S.groco_loss(torch.rand(4), torch.rand(4, 20)), ValueError, "pos_sim must be 2-D"),
    (lambda: S.groco_loss(torch.rand(4, 2), torch.full((4, 20), float("nan"))), ValueError,
     "neg_sim contains NaN"),
    (lambda: S.groco_loss(torch.rand(4, 2), torch.full((4, 20), float("-inf"))), ValueError,
     "fewer than num_neg"),
    (lambda: S.groco_loss(torch.rand(4, 2), torch.rand(4, 20), steepness=0), ValueError,
     "steepness must be > 0"),
])
def test_bad_input(call, error, match):
    with pytest.raises(error, match=match):
        call()


@needs_triton
def test_triton_rejects_perm_too_large_for_registers():
    with pytest.raises(ValueError, match="triton' returns P for n <="):
        S.diff_sort(torch.randn(1, 200), backend="triton")


def _cpu_backends():
    return _backends() + (["triton"] if HAS_TRITON and not HAS_CUDA else [])


@pytest.mark.parametrize("backend", _cpu_backends())
@pytest.mark.parametrize("network", NETWORKS)
def test_one_wire_and_empty_batch(backend, network):
    # No comparator at all: the ops must still return fresh tensors, never
    # their input (a custom op may not alias it).
    x = torch.randn(3, 1, requires_grad=True)
    sorted_x, perm = S.diff_sort(x, network, backend=backend)
    assert_close(sorted_x, x.detach(), 0)
    assert_close(perm, torch.ones(3, 1, 1), 0)
    (2 * sorted_x.sum() + perm.sum()).backward()
    assert_close(x.grad, torch.full((3, 1), 2.0), 0)
    assert_close(S.DiffSortNet(network, 1, backend=backend)(x)[0], x.detach(), 0)
    assert_close(S.soft_rank(x, network, backend=backend), torch.ones(3, 1), 0)
    args = (network, 5.0, "cauchy", 0.25, backend)
    gs, gp = torch.randn(3, 1), torch.randn(3, 1, 1)
    torch.library.opcheck(ops.diff_sort, (x, *args))
    torch.library.opcheck(ops.diff_sort_backward, (x.detach(), gs, gp, *args))
    torch.library.opcheck(ops.diff_sort_backward, (x.detach(), gs, None, *args))
    torch.library.opcheck(ops.diff_sort_apply, (x, torch.randn(3, 1), *args))
    empty_sorted, empty_perm = S.diff_sort(torch.randn(0, 4), network, backend=backend)
    assert empty_sorted.shape == (0, 4) and empty_perm.shape == (0, 4, 4)


def _network_caches():
    return [ops._comparators, ops._lane_tables]


@needs_triton
def test_triton_kernels_keep_the_reference_logistic_phi_eps():
    # Kernel modules import nothing of the reference: the constant is a copy.
    from pyclloss.triton_kernels import sorting as triton_sorting
    assert triton_sorting._PHI_EPS.value == ref.LOGISTIC_PHI_EPS


def test_network_caches_are_bounded():
    # Every backend caches the networks it was given in its own form: a few
    # row lengths at most, however many a program sorts.
    for n in range(2, 3 * ref.CACHED_NETWORKS + 2):
        for backend in _cpu_backends():
            S.soft_rank(torch.randn(1, n), backend=backend)
    for cached in _network_caches():
        assert 0 < cached.cache_info().currsize <= ref.CACHED_NETWORKS


@needs_cpp
def test_a_long_row_leaves_no_network_behind_in_python_objects():
    # The odd-even network of n wires is n²/2 comparator tuples (about 600 MiB
    # at n = 3000): the caches hold compact tensors, never the tuples.
    S.soft_rank(torch.randn(1, 3), backend="cpp")
    gc.collect()
    tracemalloc.start()
    try:
        S.soft_rank(torch.randn(1, 509), backend="cpp")
        gc.collect()
        retained, _ = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert retained < 1 << 20, f"{retained / 2**20:.1f} MiB kept"


# ------------------------------------------------------------------------------ GPU


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("network", NETWORKS)
@pytest.mark.parametrize("distribution", DISTRIBUTIONS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_triton_gpu_all_sizes(network, distribution, dtype):
    tri = BackendKernels("triton")
    args = (network, 3.0, distribution, 0.25)
    for seed, n in enumerate(SIZES + (64, 100)):
        x, v, gs, gp = random_inputs(37, n, seed)
        expected = kernel_results(ref, x, v, gs, gp, args)
        inputs = [t.to(dtype).cuda() for t in (x, v, gs, gp)]
        tol = 1e-12 if dtype == torch.float64 else 1e-5
        for a, b in zip(kernel_results(tri, *inputs, args), expected):
            assert_close(a, b, tol)


@pytest.mark.gpu
@needs_cuda
def test_groco_gpu_matches_authors_formulation():
    z, views = _groco_inputs(64, 2, 0)
    loss = S.groco_loss(*_groco_sims(z.cuda(), [v.cuda() for v in views]), backend="auto")
    (g,) = torch.autograd.grad(loss, z)
    expected = groco_with_diffsort(*_groco_sims(z, views), 1.0, 10)
    (g_expected,) = torch.autograd.grad(expected, z)
    assert abs(loss.item() - expected.item()) <= 1e-6
    assert_close(g, g_expected, 1e-5)


def _cuda_backends():
    return [b for b in ("cuda", "triton") if pyclloss.backends()[b].available]


@pytest.mark.gpu
@needs_cuda_kernels
@pytest.mark.parametrize("network", NETWORKS)
@pytest.mark.parametrize("distribution", DISTRIBUTIONS)
def test_cuda_kernels_match_reference(network, distribution):
    cuda = BackendKernels("cuda")
    args = (network, 3.0, distribution, 0.25)
    # one wire, odd sizes, a power of two, more wires than lanes, the largest P
    for seed, n in enumerate((1, 2, 5, 16, 33, 128)):
        inputs = [t.cuda() for t in random_inputs(37, n, seed)]
        expected = kernel_results(ref, *inputs, args)
        # float32: up to ~5e-5 for logistic_phi (slope unbounded at d = 0) and
        # optimal (kinks), whatever the implementation
        for dtype, tol in ((torch.float64, 1e-12), (torch.float32, 1e-4)):
            for a, b in zip(kernel_results(cuda, *(t.to(dtype) for t in inputs), args), expected):
                assert a.dtype == dtype and a.is_cuda
                assert_close(a, b, tol)


@pytest.mark.gpu
@needs_cuda_kernels
@pytest.mark.parametrize("network", NETWORKS)
def test_cuda_apply_kernels_on_long_rows(network):
    cuda = BackendKernels("cuda")
    args = (network, 2.0, "cauchy", 0.25)
    for n in (129, 300):
        x = torch.randn(5, n, dtype=torch.float64)
        v, g = torch.randn_like(x), torch.randn_like(x)
        expected = (ref.apply_forward(x, v, *args), *ref.apply_backward(x, v, g, *args))
        got = (cuda.apply_forward(x.cuda(), v.cuda(), *args),
               *cuda.apply_backward(x.cuda(), v.cuda(), g.cuda(), *args))
        for a, b in zip(got, expected):
            assert_close(a, b, 1e-12)


@pytest.mark.gpu
@needs_cuda_kernels
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("network", NETWORKS)
def test_cuda_half_inputs(dtype, network):
    for n in (11, 32):
        x = torch.randn(40, n, dtype=torch.float64)
        v = torch.randn_like(x)
        gs, gp = random_cotangents(x, n)
        args = (network, 5.0, "cauchy", 0.25)
        low = [t.to(dtype) for t in (x, v, gs, gp)]
        # the reference on the rounded inputs: only the outputs' rounding differs
        expected = kernel_results(ref, *(t.double() for t in low), args)
        got = kernel_results(BackendKernels("cuda"), *(t.cuda() for t in low), args)
        for a, b in zip(got, expected):
            assert a.dtype == dtype
            assert_close(a, b, 1e-2)


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("backend", _cuda_backends())
@pytest.mark.parametrize("network", NETWORKS)
@pytest.mark.parametrize("distribution", DISTRIBUTIONS)
def test_gpu_backends_match_diffsort(backend, network, distribution):
    for seed, n in enumerate((11, 32, 33)):
        x = torch.randn(64, n, dtype=torch.float64,
                        generator=torch.Generator().manual_seed(seed)).cuda()
        gs, gp = (t.cuda() for t in random_cotangents(x.cpu(), seed))
        # float64: logistic_phi's slope is unbounded at d = 0, so float32 results
        # of any two implementations differ by more than rounding there.
        # float32, float16, bfloat16: the benchmark's cauchy, against diffsort in
        # float32 on the same rounded inputs.
        cases = [(torch.float64, 1e-6)]
        if distribution == "cauchy":  # few cases: every one is a Triton compile
            cases += [(torch.float32, 2e-5), (torch.float16, 1e-2), (torch.bfloat16, 1e-2)]
        for dtype, tol in cases:
            inputs = [t.to(dtype) for t in (x, gs, gp)]
            ours = sort_and_grad(
                lambda t: S.diff_sort(t, network, 5.0, distribution, 0.25, backend), *inputs)
            theirs = sort_and_grad(
                lambda t: diffsort_sort(t, network, 5.0, distribution),
                *(t.to(torch.promote_types(dtype, torch.float32)) for t in inputs))
            for a, b in zip(ours, theirs):
                assert a.dtype == dtype and a.is_cuda
                assert_close(a, b, tol)


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("backend", _cuda_backends())
def test_gpu_p_free_mode(backend):
    x = torch.randn(50, 13, dtype=torch.float64, device="cuda", requires_grad=True)
    v = torch.randn(50, 13, dtype=torch.float64, device="cuda", requires_grad=True)
    w = torch.randn(50, 13, dtype=torch.float64, device="cuda")
    _, perm = S.diff_sort(x, "bitonic", 3.0, "logistic", backend="reference")
    expected = {
        "apply": (perm @ v[:, :, None])[:, :, 0],
        "rank": perm @ torch.arange(1, 14, dtype=torch.float64, device="cuda"),
        "top": perm[:, :, -4:].sum(2),
    }
    got = {
        "apply": S.diff_sort_apply(x, v, "bitonic", 3.0, "logistic", backend=backend),
        "rank": S.soft_rank(x, "bitonic", 3.0, "logistic", backend=backend),
        "top": S.soft_top_k_mask(x, 4, "bitonic", 3.0, "logistic", backend=backend),
    }
    for key, out in got.items():
        assert_close(out, expected[key], 1e-12)
        grads = torch.autograd.grad((out * w).sum(), (x, v), allow_unused=True,
                                    materialize_grads=True)
        grads_expected = torch.autograd.grad((expected[key] * w).sum(), (x, v),
                                             allow_unused=True, materialize_grads=True,
                                             retain_graph=True)
        for a, b in zip(grads, grads_expected):
            assert_close(a, b, 1e-12)


@pytest.mark.gpu
@needs_cuda_kernels
@pytest.mark.parametrize("network,distribution", [("odd_even", "cauchy"),
                                                  ("bitonic", "logistic_phi"),
                                                  ("bitonic", "gaussian"),
                                                  ("odd_even", "optimal")])
def test_cuda_gradcheck_and_opcheck(network, distribution):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 7, dtype=torch.float64, generator=g).cuda().requires_grad_(True)
    v = torch.randn(3, 7, dtype=torch.float64, generator=g).cuda().requires_grad_(True)
    kw = {"network": network, "steepness": 2.0, "distribution": distribution, "backend": "cuda"}
    assert torch.autograd.gradcheck(lambda t: S.diff_sort(t, **kw), (x,))
    assert torch.autograd.gradcheck(lambda t: S.diff_sort(t, **kw)[0], (x,))
    assert torch.autograd.gradcheck(lambda t: S.diff_sort(t, **kw)[1], (x,))
    assert torch.autograd.gradcheck(lambda t, u: S.diff_sort_apply(t, u, **kw), (x, v))
    args = (network, 2.0, distribution, 0.25, "cuda")
    xf, vf = x.detach().float(), v.detach().float()
    torch.library.opcheck(ops.diff_sort, (xf.requires_grad_(True), *args))
    torch.library.opcheck(ops.diff_sort_apply, (xf, vf.requires_grad_(True), *args))
    gs, gp = torch.randn_like(xf), torch.randn(3, 7, 7, device="cuda")
    torch.library.opcheck(ops.diff_sort_backward, (xf.detach(), gs, gp, *args))
    torch.library.opcheck(ops.diff_sort_backward, (xf.detach(), gs, None, *args))
    torch.library.opcheck(ops.diff_sort_apply_backward, (xf.detach(), vf.detach(), gs, *args))


@pytest.mark.gpu
@needs_cuda_kernels
def test_cuda_backend_choice_and_limits():
    small, wide = torch.randn(2, 8, device="cuda"), torch.randn(2, 200, device="cuda")
    assert S._resolve_backend("auto", small, needs_perm=True) == "cuda"
    assert S._resolve_backend("auto", wide, needs_perm=False) == "cuda"
    assert S._resolve_backend("auto", wide, needs_perm=True) == "reference"
    with pytest.raises(ValueError, match="cuda' returns P for n <= 128"):
        S.diff_sort(wide, backend="cuda")
    with pytest.raises(ValueError, match="cuda' takes rows of n <= 1024"):
        S.soft_rank(torch.randn(2, 1025, device="cuda"), backend="cuda")
    for network in NETWORKS:
        sorted_x, perm = S.diff_sort(small[:, :1], network, backend="cuda")
        assert_close(sorted_x, small[:, :1], 0)
        assert_close(perm, torch.ones(2, 1, 1), 0)
        empty_sorted, empty_perm = S.diff_sort(torch.randn(0, 4, device="cuda"), network,
                                               backend="cuda")
        assert empty_sorted.shape == (0, 4) and empty_perm.shape == (0, 4, 4)


@pytest.mark.gpu
@needs_cuda_kernels
def test_cuda_ops_reject_bad_tensors():
    x = torch.randn(2, 4, device="cuda")
    pairs = ops._comparators("odd_even", 4, x.device)
    with pytest.raises(RuntimeError, match="comparators must be a contiguous int32"):
        torch.ops.pyclloss_C.diff_sort_fwd(x, pairs.cpu(), 1.0, 3, 0.25)
    with pytest.raises(RuntimeError, match="comparators must be a contiguous int32"):
        torch.ops.pyclloss_C.diff_sort_fwd(x, pairs.long(), 1.0, 3, 0.25)
    with pytest.raises(RuntimeError, match="rows of 1 to 128 values"):
        torch.ops.pyclloss_C.diff_sort_fwd(torch.randn(2, 129, device="cuda"),
                                           ops._comparators("odd_even", 129, x.device),
                                           1.0, 3, 0.25)
    with pytest.raises(RuntimeError, match="grad_perm must be a contiguous"):
        torch.ops.pyclloss_C.diff_sort_bwd(x, None, torch.randn(2, 4, 3, device="cuda"), pairs,
                                           1.0, 3, 0.25)
    with pytest.raises(RuntimeError, match="v must be a contiguous"):
        torch.ops.pyclloss_C.diff_sort_apply_fwd(x, x.double(), pairs, 1.0, 3, 0.25)
    with pytest.raises(RuntimeError, match="unknown distribution code"):
        torch.ops.pyclloss_C.diff_sort_apply_fwd(x, x, pairs, 1.0, 9, 0.25)
