"""Unit rows: the cpp kernels (concatenation and normalisation in one pass)
against torch's own ``normalize(cat(parts))`` and its autograd, on random and
hard rows; the reference kernels against the same; the op's registration."""

import pytest
import torch
import torch.nn.functional as F

import pyclloss
from helpers import check_against_reference
from pyclloss.ops.unit_rows import KERNELS, unit_rows, unit_rows_op
from pyclloss.reference import unit_rows as reference

DTYPES = [torch.float64, torch.float32, torch.float16, torch.bfloat16]
needs_cpp = pytest.mark.skipif(not pyclloss.backends()["cpp"].available,
                               reason="the C++ extension is not built")


def torch_unit_rows(*parts):
    """What the losses ran before these kernels: torch's cat and normalize."""
    return F.normalize(torch.cat(parts), dim=-1)


def gradient_terms(parts):
    """grad_magnitudes for check_against_reference: part i's gradient rows sum
    terms of size |g|/n (g the cotangent row, n the row's norm), which cancel
    where the row's own direction is projected out (all of it when D = 1)."""
    norms = torch.cat(parts).double().norm(dim=1).clamp_min(1e-12)

    def sizes(probe):
        per_row = probe.abs().amax(1).cpu() / norms
        return {i: part.max().item() for i, part in
                enumerate(per_row.split([p.shape[0] for p in parts]))}
    return sizes


def _parts(sizes, d, scales=None):
    scales = scales or [1.0] * len(sizes)
    return [s * torch.randn(n, d, dtype=torch.float64) for n, s in zip(sizes, scales)]


@needs_cpp
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("sizes, d", [([37, 5], 19), ([64], 128), ([3, 1, 11], 7), ([9, 9], 1)])
def test_cpp_equals_torch_normalize(dtype, sizes, d):
    parts = _parts(sizes, d, scales=[10.0 ** (3 * i - 2) for i in range(len(sizes))])
    check_against_reference(lambda *p: unit_rows(list(p), "cpp"), torch_unit_rows, parts, dtype,
                            f"unit_rows {sizes}x{d} {dtype}", gradient_terms(parts))


@needs_cpp
def test_an_empty_part_adds_no_rows_and_gets_an_empty_gradient():
    a, empty, b = (torch.randn(n, 7, requires_grad=True) for n in (3, 0, 4))
    y = unit_rows([a, empty, b], "cpp")
    torch.testing.assert_close(y, torch_unit_rows(a, b))
    y.sum().backward()
    assert empty.grad.shape == (0, 7) and a.grad.shape == (3, 7)


@needs_cpp
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_rows_at_the_clamp_and_zero_rows(dtype):
    """Rows below ε = 1e-12 are divided by ε (a constant: gradient g/ε), rows
    just above it by their norm; an all-zero row gives 0 and the gradient g/ε."""
    x = torch.randn(6, 16, dtype=torch.float64)
    x = x / x.norm(dim=1, keepdim=True) * torch.tensor([[1e-14], [5e-13], [3e-12], [1e-11], [1.0],
                                                        [0.0]], dtype=torch.float64)
    check_against_reference(lambda p: unit_rows([p], "cpp"), torch_unit_rows, [x], dtype,
                            f"unit_rows at the clamp {dtype}", gradient_terms([x]))


@needs_cpp
def test_rows_whose_squares_overflow_float32_are_unit_rows():
    """Norms accumulate in float64: a float32 row of entries near 1e20 (squares
    beyond float32's range) is normalised, where torch's float32 norm is inf."""
    x = torch.randn(4, 32, dtype=torch.float64) * 1e20
    x.requires_grad_()
    y = unit_rows([x.detach().float().requires_grad_()], "cpp")
    expected = F.normalize(x, dim=-1)
    torch.testing.assert_close(y.double(), expected.detach(), rtol=0, atol=4e-7)
    assert torch.isfinite(y).all()


@needs_cpp
@pytest.mark.parametrize("dtype", DTYPES)
def test_cpp_kernels_equal_the_reference_kernels(dtype):
    """The contract outputs, norms included, and the backward kernel."""
    parts = [p.to(dtype) for p in _parts([23, 8], 33)]
    grad = torch.randn(31, 33, dtype=torch.float64).to(dtype)
    rows, norms = KERNELS.kernel("cpp", "unit_rows_fwd")(parts)
    ref_rows, ref_norms = reference.unit_rows_fwd(parts)
    tol = dict(rtol=2 * torch.finfo(dtype).eps, atol=2 * torch.finfo(dtype).eps)
    torch.testing.assert_close(rows, ref_rows, **tol)
    assert norms.dtype == ref_norms.dtype == (torch.float64 if dtype == torch.float64
                                              else torch.float32)
    torch.testing.assert_close(norms, ref_norms, rtol=1e-6 if dtype != torch.float64 else 1e-14,
                               atol=0)
    grads = KERNELS.kernel("cpp", "unit_rows_bwd")(parts, norms, grad)
    ref_grads = reference.unit_rows_bwd(parts, ref_norms, grad)
    assert [g.shape for g in grads] == [p.shape for p in parts]
    for g, r in zip(grads, ref_grads):
        torch.testing.assert_close(g, r, rtol=4 * torch.finfo(dtype).eps,
                                   atol=4 * torch.finfo(dtype).eps * r.abs().max().item())


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_reference_kernels_are_the_gradient_of_torch_normalize(dtype):
    parts = [p.to(dtype) for p in _parts([12, 7], 10, scales=[1.0, 1e-13])]
    check_against_reference(lambda *p: unit_rows_op(list(p), "reference")[0], torch_unit_rows,
                            parts, dtype, f"reference unit_rows {dtype}", gradient_terms(parts))


@needs_cpp
def test_op_registration():
    parts = [torch.randn(5, 6, dtype=torch.float64, requires_grad=True),
             torch.randn(3, 6, dtype=torch.float64, requires_grad=True)]
    torch.library.opcheck(unit_rows_op, (parts, "cpp"))


@needs_cpp
def test_parts_that_do_not_stack_are_refused():
    with pytest.raises(RuntimeError, match="parts must be 2-D CPU tensors of one dtype and width"):
        unit_rows([torch.randn(3, 4), torch.randn(3, 5)], "cpp")
    with pytest.raises(RuntimeError, match="parts must be 2-D CPU tensors of one dtype and width"):
        unit_rows([torch.randn(3, 4), torch.randn(3, 4, dtype=torch.float64)], "cpp")
    with pytest.raises(RuntimeError, match="parts must be float64, float32, float16 or bfloat16"):
        unit_rows([torch.ones(3, 4, dtype=torch.long)], "cpp")


@needs_cpp
@pytest.mark.parametrize("cut", ["halves", "reversed", "partial", "strided"])
def test_views_of_one_batch(cut):
    """Parts that are consecutive row blocks of one tensor (z.chunk(2)) are
    normalised as that tensor, others part by part: the same values and
    gradients either way."""
    base = torch.randn(10, 6, dtype=torch.float64, requires_grad=True)
    expected_base = base.detach().clone().requires_grad_()
    take = {"halves": lambda z: [z[:4], z[4:]], "reversed": lambda z: [z[4:], z[:4]],
            "partial": lambda z: [z[:3], z[3:7]], "strided": lambda z: [z[::2], z[1::2]]}[cut]
    weights = torch.randn(sum(p.shape[0] for p in take(base)), 6, dtype=torch.float64)
    (unit_rows(take(base), "cpp") * weights).sum().backward()
    (torch_unit_rows(*take(expected_base)) * weights).sum().backward()
    torch.testing.assert_close(base.grad, expected_base.grad, rtol=1e-13, atol=1e-13)
