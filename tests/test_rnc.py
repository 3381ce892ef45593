"""Rank-N-Contrast: every fused backend against the reference on fresh random
inputs (values and gradients, odd sizes, ties, duplicates, fp32/fp16/bf16),
the reference against the authors' formulation, float64 gradcheck, the
custom-op contract and bad input."""

import pytest
import torch
from helpers import (assert_close_rel, assert_same_value_and_grad, authors_rnc,
                     check_against_reference, fused_backends, skip_unfaithful)

import pyclloss
from pyclloss.ops import rnc as ops
from pyclloss.reference import rnc as ref

CPU_BACKENDS = fused_backends("cpu")
# The Triton interpreter is slow: small sizes only.
SIZES = {"cpp": (2, 3, 17, 65), "triton": (3, 17)}
GRADCHECK_BACKENDS = [b for b in ("reference", "cpp") if pyclloss.backends()[b].available]


def make_labels(shape, ties):
    """Integers (many ties) or multiples of 1/64 (exact in every dtype, so
    float32 and float64 order the label distances alike)."""
    if ties:
        return torch.randint(0, 5, shape).float()
    return (torch.rand(shape) * 512).floor() / 64


@pytest.mark.parametrize("label_dims", [1, 3])
@pytest.mark.parametrize("ties", [True, False])
def test_reference_equals_authors_formulation(label_dims, ties):
    f = torch.randn(7, 2, 5, dtype=torch.float64)
    y = make_labels((7, label_dims), ties).double()
    assert_same_value_and_grad(lambda v: authors_rnc(v, y, 2.0),
                               lambda v: pyclloss.rnc_loss(v, y, 2.0, backend="reference"), f,
                               1e-12)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("ties", [True, False])
def test_backend_matches_reference(backend, dtype, ties):
    skip_unfaithful(backend, dtype)
    for n in SIZES[backend]:
        v = torch.randn(n, 10) * 2
        y = make_labels((n,), ties)
        check_against_reference(
            lambda v, y: pyclloss.rnc_loss(v, y, 1.5, backend=backend),
            lambda v, y: ref.rnc_loss(v, y, 1.5),
            [v, y], dtype, f"{backend} n={n}")


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_temperature_gradient(backend):
    v, y = torch.randn(SIZES[backend][-1], 6), make_labels((SIZES[backend][-1],), ties=True)
    check_against_reference(
        lambda v, tau: pyclloss.rnc_loss(v, y, tau, backend=backend),
        lambda v, tau: ref.rnc_loss(v, y.double(), tau),
        [v, torch.tensor(1.3)], torch.float32, f"{backend} temperature")


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("reduction", ["sum", "none"])
def test_views_label_dims_and_reductions(backend, reduction):
    f = torch.randn(9, 2, 6)
    y = make_labels((9, 2), ties=True)
    check_against_reference(
        lambda f: pyclloss.rnc_loss(f, y, reduction=reduction, backend=backend),
        lambda f: ref.rnc_loss(torch.cat([f[:, 0], f[:, 1]]), y.double().repeat(2, 1), 2.0,
                               reduction),
        [f], torch.float32, f"{backend} {reduction}")


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_one_label_and_duplicate_features(backend, dtype):
    # One label: every denominator is the whole row. Duplicated rows: zero
    # distances, whose gradient is 0 (torch.cdist's subgradient), never NaN.
    if backend == "triton" and dtype == torch.float64:
        pytest.skip("Triton: float32 statistics")
    v = torch.randn(6, 5)
    v = torch.cat([v, v[:3]])
    for y in (torch.zeros(9), make_labels((9,), ties=True)):
        check_against_reference(
            lambda v, y=y: pyclloss.rnc_loss(v, y, backend=backend),
            lambda v, y=y: ref.rnc_loss(v, y.double()),
            [v], dtype, f"{backend} duplicates")


def test_module_equals_function():
    f, y = torch.randn(6, 2, 4), torch.rand(6, 1)
    assert_close_rel(pyclloss.RnCLoss(temperature=3.0, backend="reference")(f, y),
                     pyclloss.rnc_loss(f, y, 3.0, backend="reference"), 0, "module")


# ------------------------------------------------------------- the op contract


@pytest.mark.parametrize("backend", GRADCHECK_BACKENDS)
def test_gradcheck_float64(backend):
    v = torch.randn(8, 3, dtype=torch.float64, requires_grad=True)
    y = make_labels((8,), ties=True).double()
    assert torch.autograd.gradcheck(
        lambda v: pyclloss.rnc_loss(v, y, 0.7, reduction="none", backend=backend), (v,))


@pytest.mark.parametrize("backend", [b for b in CPU_BACKENDS if b == "cpp"])
def test_opcheck(backend):
    s = -torch.rand(9, 9)
    d = ref.label_distance(make_labels((9,), ties=True))
    torch.library.opcheck(ops.rnc_rows, (s.requires_grad_(True), d, backend))
    torch.library.opcheck(ops.rnc_rows_backward, (s.detach(), d, torch.randn(9), backend))
    v = torch.randn(9, 5)
    torch.library.opcheck(ops.rnc_distances, (v.requires_grad_(True), backend))
    dist = ops.rnc_distances(v.detach(), backend)
    torch.library.opcheck(ops.rnc_distances_backward, (v.detach(), dist, torch.randn(9, 9),
                                                       backend))


@pytest.mark.skipif("cpp" not in CPU_BACKENDS, reason="C++ extension not built")
def test_torch_compile_has_no_graph_break():
    compiled = torch.compile(pyclloss.RnCLoss(backend="cpp"), fullgraph=True, backend="aot_eager")
    v, y = torch.randn(9, 4, requires_grad=True), make_labels((9,), ties=True)
    loss = compiled(v, y)
    loss.backward()
    assert_close_rel(loss, ref.rnc_loss(v.detach().double(), y.double()), 1e-5, "compiled")
    assert torch.isfinite(v.grad).all()


# ------------------------------------------------------------------- bad input


@pytest.mark.parametrize("change, error, words", [
    (dict(features=torch.randn(1, 4), labels=torch.zeros(1)), ValueError, "at least 2 samples"),
    (dict(features=torch.randn(5)), ValueError, "features must have shape"),
    (dict(features=torch.randint(0, 3, (5, 4))), TypeError, "features must be float16"),
    (dict(features=torch.full((5, 4), float("inf"))), ValueError, "features contains NaN"),
    (dict(labels=torch.zeros(4)), ValueError, "labels must have shape (5,) or (5, L)"),
    (dict(labels=torch.zeros(5, 2, 2)), ValueError, "labels must have shape"),
    (dict(labels=torch.tensor([0.0, 1, 2, 3, float("nan")])), ValueError, "labels contains NaN"),
    (dict(labels=[0, 1, 2, 3, 4]), TypeError, "labels must be a torch.Tensor"),
    (dict(temperature=-2.0), ValueError, "temperature must be"),
    (dict(temperature=torch.tensor([1.0, 2.0])), ValueError, "temperature must be a scalar"),
    (dict(reduction="mean_pairs"), ValueError, "reduction must be one of"),
    (dict(backend="gpu"), ValueError, "backend must be one of"),
])
def test_bad_input(change, error, words):
    args = dict(features=torch.randn(5, 4), labels=torch.arange(5.0))
    args.update(change)
    with pytest.raises(error) as info:
        pyclloss.rnc_loss(**args)
    assert words in str(info.value)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_features_with_a_large_common_offset(backend):
    """Distances of rows that share a large offset: the fused GEMM form must not
    lose them to cancellation (ReLU outputs, nearly collapsed features)."""
    v = 100 + 0.05 * torch.randn(17, 8)
    y = make_labels((17,), True)
    exact = v.double().requires_grad_()
    expected = pyclloss.rnc_loss(exact, y.double(), 2.0, backend="reference")
    expected.backward()
    fused = v.clone().requires_grad_()
    actual = pyclloss.rnc_loss(fused, y, 2.0, backend=backend)
    actual.backward()
    assert_close_rel(actual, expected, 1e-5, "value")
    assert_close_rel(fused.grad, exact.grad, 1e-3, "grad")


def _hard_float32_features(case, n, dim=8):
    """Rows whose small distances the GEMM form |a|² + |b|² − 2a·b loses in
    float32: two clusters far from the origin, or pairs of near-duplicates."""
    if case == "far_clusters":
        side = torch.where(torch.arange(n) < n // 2, 1000.0, -1000.0)
        return side[:, None] + torch.randn(n, dim)
    rows = torch.randn((n + 1) // 2, dim)
    return torch.cat([rows, rows + 1e-3 * torch.randn_like(rows)])[:n]


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("case", ["far_clusters", "near_duplicates"])
def test_float32_small_distances_are_exact(backend, case):
    # The same float32 values in float64 are the truth: the fused float32
    # loss and gradient stay within 1e-4 of it (relative to the largest entry).
    n = SIZES[backend][-1]
    v, y = _hard_float32_features(case, n), make_labels((n,), ties=False)
    exact = v.double().requires_grad_()
    expected = pyclloss.rnc_loss(exact, y.double(), 2.0, backend="reference")
    expected.backward()
    fused = v.clone().requires_grad_()
    actual = pyclloss.rnc_loss(fused, y, 2.0, backend=backend)
    actual.backward()
    assert abs(actual.item() - expected.item()) <= 1e-4 * abs(expected.item())
    grad_error = (fused.grad.double() - exact.grad).abs().max()
    assert grad_error <= 1e-4 * exact.grad.abs().max(), f"gradient error {grad_error:.2e}"


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_reference_at_low_temperature_is_finite_and_exact(dtype):
    # τ = 0.05: most exp(s_ik − max_k s_ik) underflow, so a pair whose whole
    # denominator set lies far below its row's maximum needs its own shift.
    # Features that follow the labels (what RnC trains towards): the pairs of
    # the farthest labels are also the farthest in feature space. The truth
    # is the same loss in float64 with every log-sum-exp written out.
    y = make_labels((12,), ties=True)
    v = y[:, None] + 0.1 * torch.randn(12, 6)
    leaf = v.to(dtype).clone().requires_grad_()
    loss = ref.rnc_loss(leaf, y.to(dtype), 0.05)
    loss.backward()
    exact = v.double().requires_grad_()
    s = -torch.cdist(exact, exact) / 0.05
    d = ref.label_distance(y.double())
    n, total = s.shape[0], 0.0
    for i in range(n):
        for j in range(n):
            if j != i:
                in_set = (d[i] >= d[i, j]) & (torch.arange(n) != i)
                total = total + torch.logsumexp(s[i][in_set], 0) - s[i, j]
    expected = total / (n * (n - 1))
    expected.backward()
    assert_close_rel(loss, expected, 1e-5, "value")
    assert_close_rel(leaf.grad, exact.grad, 1e-4, "grad")
