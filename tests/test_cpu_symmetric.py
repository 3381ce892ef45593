"""The symmetric schedule of the C++ CPU kernels: q and k the same rows z
(NT-Xent over [z1; z2], SupCon, pair NT-Xent). infonce_fwd and
infonce_pair_fwd take it when k is q's memory; infonce_self_bwd (dq + dk of
infonce_bwd with q = k = z) always. Checked against the dense float64
reference and the general path on fresh random inputs, at sizes below, at and
across the 256-row blocks, and bit for bit across thread counts."""

import math
import os

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from helpers import (absolute_coefficients, check_outputs, infonce_pair_fwd_oracle,
                     infonce_self_bwd_oracle, unit_rows)

import pyclloss
import pyclloss._C  # noqa: F401  (registers torch.ops.pyclloss_C)
from pyclloss.reference import info_nce as ref

ops = torch.ops.pyclloss_C

DTYPES = [torch.float64, torch.float32, torch.float16, torch.bfloat16]
# (N, D): one block, a block and one row, an odd number of blocks (a block
# sits each round out), never multiples of the SIMD width.
SHAPES = [(1, 5), (2, 129), (255, 3), (257, 17), (700, 33)]
# (labels, exclude_offset, neg_only): labels "same" (SupCon), "partner"
# (NT-Xent: row i's positive is its other view), "other" (different label
# vectors for the query and key roles), or none.
MASKS = [
    (None, None, False),
    (None, 0, False),
    ("same", 0, False),
    ("partner", 0, False),
    ("same", 0, True),
    ("other", -1, False),
    ("other", 3, True),
    ("same", 10_000, False),  # out of range: nothing excluded
]


def _stats(dtype):
    return ref.stats_dtype(dtype)


def _f64(x):
    return None if x is None else x.to(torch.float64)


def _max(t):
    return float(t.max()) if t.numel() else 0.0


def _labels(kind, n):
    if kind is None:
        return None, None
    idx = torch.arange(n)
    if kind == "same":
        labels = torch.randint(0, 4, (n,))
        return labels, labels
    if kind == "partner":
        return torch.cat([idx[n // 2:], idx[: n // 2]]), idx
    return torch.randint(0, 3, (n,)), torch.randint(0, 3, (n,))


def _assert_close(actual, expected, atol):
    assert actual.shape == expected.shape
    actual, expected = actual.to(torch.float64), expected.to(torch.float64)
    assert not torch.isnan(actual).any(), "NaN in kernel output"
    torch.testing.assert_close(actual, expected, rtol=0.0, atol=float(atol))


def _problem(n, d, dtype, labels, scale=14.0):
    z = unit_rows(n, d, dtype)
    ql, kl = _labels(labels, n)
    return z, torch.tensor(scale, dtype=_stats(dtype)), ql, kl


def _grad_args(z, s, ql, kl, offset, neg_only, terms):
    """Statistics from the reference forward and random coefficients, exactly 0
    where an LSE is -inf (as the losses' autograd produces them)."""
    n, st = z.shape[0], _stats(z.dtype)
    row_lse = ref.infonce_fwd(_f64(z), _f64(z), _f64(s), ql, kl, offset, neg_only, False)[0]
    col_lse = ref.infonce_fwd(_f64(z), _f64(z), _f64(s), ql, kl, offset, False, True)[3]
    row_lse, col_lse = row_lse.to(st), col_lse.to(st)

    def coef(lse):
        c = torch.randn(n, dtype=torch.float64).to(st)
        c[torch.rand(n) < 0.2] = 0
        return c.masked_fill(torch.isinf(lse), 0) if lse is not None else c

    args = dict(row_lse=None, row_coef=None, col_lse=None, col_coef=None, pos_coef=None,
                pair_lse=None)
    if "row" in terms:
        args.update(row_lse=row_lse, row_coef=coef(row_lse))
    if "col" in terms:
        args.update(col_lse=col_lse, col_coef=coef(col_lse))
    if "pos" in terms and ql is not None:
        args.update(pos_coef=coef(None))
    if "pair" in terms and ql is not None:
        args.update(pair_lse=row_lse.masked_fill(torch.isinf(row_lse), 0) + torch.randn(n).to(st))
    return args


def _check_fwd(got, z, s, ql, kl, offset, neg_only):
    """By the rule of tests/helpers.py; the LSEs and positive sums add logits up to s."""
    count = ref.infonce_fwd(_f64(z), _f64(z), _f64(s), ql, kl, offset, neg_only, False)[2]
    lse = float(s) + math.log(max(z.shape[0], 2))
    check_outputs(got, lambda z, *args: ref.infonce_fwd(z, z, *args),
                  [z, s, ql, kl, offset, neg_only, False], "infonce_fwd of z",
                  {0: lse, 1: float(s) * max(1.0, _max(count)), 3: lse})
    assert torch.equal(got[2].double(), count), "pos_count is an exact count"
    assert got[3].numel() == 0


# ------------------------------------------------------------------ forward


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("labels, offset, neg_only", MASKS)
def test_infonce_fwd_of_z_against_itself(dtype, shape, labels, offset, neg_only):
    z, s, ql, kl = _problem(*shape, dtype, labels)
    symmetric = ops.infonce_fwd(z, z, s, ql, kl, offset, neg_only, False)
    _check_fwd(symmetric, z, s, ql, kl, offset, neg_only)
    general = ops.infonce_fwd(z, z.clone(), s, ql, kl, offset, neg_only, False)
    _check_fwd(general, z, s, ql, kl, offset, neg_only)  # the two paths agree as closely


def test_infonce_fwd_empty_sets_stay_minus_inf():
    # neg_only with every other row a positive, and a lone excluded row.
    z, s, _, _ = _problem(300, 4, torch.float32, None)
    labels = torch.zeros(300, dtype=torch.long)
    row_lse = ops.infonce_fwd(z, z, s, labels, labels, 0, True, False)[0]
    assert torch.equal(row_lse, torch.full((300,), -math.inf))
    row_lse = ops.infonce_fwd(z[:1], z[:1], s, None, None, 0, False, False)[0]
    assert row_lse.item() == -math.inf


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("labels, offset", [("same", 0), ("partner", 0), ("other", -2)])
def test_infonce_pair_fwd_of_z_against_itself(dtype, shape, labels, offset):
    z, s, ql, kl = _problem(*shape, dtype, labels)
    neg_lse = ref.infonce_fwd(_f64(z), _f64(z), _f64(s), ql, kl, offset, True, False)[0]
    neg_lse = neg_lse.to(_stats(dtype))
    got = ops.infonce_pair_fwd(z, z, s, ql, kl, offset, neg_lse)
    count = ref.infonce_fwd(_f64(z), _f64(z), _f64(s), ql, kl, offset, False, False)[2]
    pairs = max(1.0, _max(count))
    per_pair = 2 * float(s) + math.log(max(shape[0], 2))  # bound on one softplus term
    check_outputs(got, lambda z, *args: infonce_pair_fwd_oracle(z, z, *args),
                  [z, s, ql, kl, offset, neg_lse], "infonce_pair_fwd of z",
                  {0: per_pair * pairs, 1: pairs})


# ----------------------------------------------------------------- backward

# (terms, labels, exclude_offset, neg_only): each term alone and together,
# with the masks of the losses and an asymmetric one.
BWD_CASES = [
    (("row",), None, 0, False),
    (("col",), "same", 0, False),
    (("row", "pos"), "partner", 0, False),
    (("row", "col", "pos"), "same", 0, False),
    (("row", "pos", "pair"), "same", 0, True),
    (("pos", "pair"), "other", 3, True),
    (("row", "col", "pos", "pair"), "other", -1, False),
]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("terms, labels, offset, neg_only", BWD_CASES,
                         ids=lambda c: "+".join(c) if isinstance(c, tuple) else str(c))
def test_infonce_self_bwd_is_dq_plus_dk(dtype, shape, terms, labels, offset, neg_only):
    z, s, ql, kl = _problem(*shape, dtype, labels)
    args = _grad_args(z, s, ql, kl, offset, neg_only, terms)
    dz, dscale = ops.infonce_self_bwd(z, s, ql, kl, offset, neg_only, *args.values())
    terms_g, _ = ref.infonce_grad_logits(_f64(z), _f64(z), _f64(s), ql, kl, offset, neg_only,
                                         *absolute_coefficients(*map(_f64, args.values())))
    # The sizes of the terms dz and dscale sum: terms_g, the sizes of G's own
    # terms (helpers.absolute_coefficients), bounds every term of (G + G^T) z,
    # and a dot product's rounding scales with sum_d |z_id z_jd|.
    # G, an exp of logits up to s, carries relative errors of about (1 + s)
    # units of the statistics dtype: so do results kept in it.
    cond = 1 + float(s)
    mag = (terms_g + terms_g.T) * (cond if dtype == _stats(dtype) else 1)
    dot_scale = _f64(z).abs() @ _f64(z).abs().T
    check_outputs((dz, dscale), infonce_self_bwd_oracle,
                  [z, s, ql, kl, offset, neg_only, *args.values()], "infonce_self_bwd",
                  {0: float(s) * _max(mag @ _f64(z).abs()),
                   1: cond * (terms_g * dot_scale).sum().item()})
    assert dz.dtype == dtype and dscale.dtype == _stats(dtype)


def test_infonce_self_bwd_zero_coefficients_on_empty_rows_give_zero():
    # neg_only with all rows one class: every row's LSE is -inf, its
    # coefficient 0: exactly nothing flows, not NaN.
    z, s, _, _ = _problem(270, 6, torch.float32, None)
    labels = torch.zeros(270, dtype=torch.long)
    row_lse = ops.infonce_fwd(z, z, s, labels, labels, 0, True, False)[0]
    dz, dscale = ops.infonce_self_bwd(z, s, labels, labels, 0, True, row_lse,
                                      torch.zeros(270), None, None, None, None)
    assert torch.equal(dz, torch.zeros_like(z)) and dscale.item() == 0


@pytest.mark.parametrize("backend", ["reference", "cpp"])
def test_infonce_self_bwd_op_on_every_backend(backend):
    # Backends without a kernel of their own add infonce_bwd's dq and dk.
    z, s, ql, kl = _problem(290, 7, torch.float64, "partner")
    args = _grad_args(z, s, ql, kl, 0, False, ("row", "pos"))
    dz, dscale = torch.ops.pyclloss.infonce_self_bwd(z, s, ql, kl, 0, False, *args.values(),
                                                     backend)
    dq, dk, want_dscale = ref.infonce_bwd(z, z, s, ql, kl, 0, False, *args.values(), True)
    _assert_close(dz, dq + dk, 1e-12)
    _assert_close(dscale, want_dscale, 1e-10)
    torch.library.opcheck(torch.ops.pyclloss.infonce_self_bwd,
                          (z, s, ql, kl, 0, False, *args.values(), backend))


def test_which_backends_have_a_self_backward_of_their_own():
    from pyclloss.ops.info_nce import KERNELS

    have = {b for b in KERNELS.backends if KERNELS.has(b, "infonce_self_bwd")}
    assert have == {"cpp", "triton"}  # cuda and the reference add infonce_bwd's dq and dk


@pytest.mark.skipif(not pyclloss.backends()["triton"].available, reason="triton not installed")
def test_triton_self_bwd_op_is_dq_plus_dk():
    """Triton's G + Gᵀ backward (one product with z) under the interpreter."""
    z, s, ql, kl = _problem(70, 9, torch.float32, "partner")
    args = _grad_args(z, s, ql, kl, 0, False, ("row", "col", "pos"))
    dz, dscale = torch.ops.pyclloss.infonce_self_bwd(z, s, ql, kl, 0, False, *args.values(),
                                                     "triton")
    z64, s64 = z.double(), s.double()
    dq, dk, want_dscale = ref.infonce_bwd(z64, z64, s64, ql, kl, 0, False,
                                          *(a.double() if a is not None else None
                                            for a in args.values()), True)
    _assert_close(dz.double(), dq + dk, 1e-4 * max(1.0, _max((dq + dk).abs())))
    _assert_close(dscale.double(), want_dscale, 1e-4 * max(1.0, abs(want_dscale.item())))


# ------------------------------------------------- through autograd and losses


class _CoreOps(TorchDispatchMode):
    """Records the fused-core ops that run."""

    def __init__(self):
        super().__init__()
        self.names = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.namespace == "pyclloss":
            self.names.append(func.__name__.split(".")[0])
        return func(*args, **(kwargs or {}))


def _losses(x, labels, tau):
    b = x.shape[0] // 2
    return {
        "nt_xent": lambda backend: pyclloss.nt_xent(x[:b], x[b:], tau, backend=backend),
        "supcon": lambda backend: pyclloss.supcon(x, labels, tau, backend=backend),
        "pair_nt_xent": lambda backend: pyclloss.pair_nt_xent(x, labels, tau, backend=backend),
    }


@pytest.mark.parametrize("loss", ["nt_xent", "supcon", "pair_nt_xent"])
def test_self_similarity_losses_take_the_symmetric_backward(loss):
    x = torch.randn(600, 24, dtype=torch.float64, requires_grad=True)
    tau = torch.tensor(0.2, dtype=torch.float64, requires_grad=True)
    call = _losses(x, torch.randint(0, 6, (600,)), tau)[loss]
    grads = {}
    for backend in ("cpp", "reference"):
        with _CoreOps() as core:
            value = call(backend)
            grads[backend] = (value, *torch.autograd.grad(value, (x, tau)))
        if backend == "cpp":
            assert "infonce_self_bwd" in core.names and "infonce_bwd" not in core.names
    for got, want in zip(grads["cpp"], grads["reference"]):
        _assert_close(got, want, 1e-10 * max(1.0, _max(want.detach().abs())))


def test_clip_keeps_the_general_backward():
    x, y = torch.randn(40, 8, requires_grad=True), torch.randn(40, 8, requires_grad=True)
    with _CoreOps() as core:
        pyclloss.clip_loss(x, y, 10.0, backend="cpp").backward()
    assert "infonce_bwd" in core.names and "infonce_self_bwd" not in core.names


def test_same_memory_as_different_tensors_keeps_dq_and_dk_apart():
    # k shares q's memory but is another tensor without a gradient: the
    # forward may use the symmetric schedule, the backward must give dq alone.
    z = unit_rows(300, 9, torch.float64).requires_grad_()
    s = torch.tensor(5.0, dtype=torch.float64)
    labels = torch.randint(0, 3, (300,))
    lse, pos_sum, _, _ = torch.ops.pyclloss.infonce_fwd(z, z.detach(), s, labels, labels, 0,
                                                        False, False, "cpp")
    (dq,) = torch.autograd.grad((lse - pos_sum).sum(), z)
    q = z.detach().clone().requires_grad_()
    ref_lse, ref_pos, _, _ = ref.infonce_fwd(q, z.detach(), s, labels, labels, 0, False, False)
    (want,) = torch.autograd.grad((ref_lse - ref_pos).sum(), q)
    _assert_close(dq, want, 1e-10)


@pytest.mark.parametrize("loss", ["nt_xent", "supcon", "pair_nt_xent"])
def test_gradcheck_float64(loss):
    # Two blocks of rows, so that off-diagonal tiles and both accumulators count.
    x = torch.randn(260, 3, dtype=torch.float64, requires_grad=True)
    tau = torch.tensor(0.3, dtype=torch.float64, requires_grad=True)
    labels = torch.randint(0, 20, (260,))
    fn = lambda x, tau: _losses(x, labels, tau)[loss]("cpp")
    assert torch.autograd.gradcheck(fn, (x, tau), eps=1e-6, atol=1e-7, rtol=1e-5)


# ------------------------------------------------------------- thread counts


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_results_are_bit_identical_across_thread_counts(dtype):
    # Five blocks (an odd count) and every op of the symmetric schedule.
    z, s, ql, kl = _problem(1100, 20, dtype, "same")
    st = _stats(dtype)

    def run():
        row_lse, pos_sum, pos_count, _ = ops.infonce_fwd(z, z, s, ql, kl, 0, False, False)
        neg_lse = ops.infonce_fwd(z, z, s, ql, kl, 0, True, False)[0]
        pair = ops.infonce_pair_fwd(z, z, s, ql, kl, 0, neg_lse)
        coef = torch.linspace(-1, 1, z.shape[0], dtype=st)
        grads = ops.infonce_self_bwd(z, s, ql, kl, 0, False, row_lse, coef, row_lse, -coef,
                                     coef, neg_lse)
        return (row_lse, pos_sum, pos_count, neg_lse, *pair, *grads)

    threads = torch.get_num_threads()
    try:
        results = {}
        for count in (1, 2, 3, 4, 1):
            torch.set_num_threads(count)
            results[count] = run()
    finally:
        torch.set_num_threads(threads)
    for count, outs in results.items():
        for a, b in zip(outs, results[1]):
            assert torch.equal(a, b), f"{count} threads differ from one"


@pytest.mark.skipif(not hasattr(os, "sched_getaffinity") or len(os.sched_getaffinity(0)) < 2,
                    reason="needs Linux and two CPUs")
def test_workers_leave_every_affinity_as_it_was():
    # A worker that starts on another worker's CPU narrows its affinity to
    # move, then restores it: the calling thread's mask is unchanged after the
    # kernels, and a narrowed mask is kept (a worker bound there stays).
    z = torch.randn(600, 16, requires_grad=True)
    before = os.sched_getaffinity(0)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        for _ in range(3):
            pyclloss.nt_xent(z[:300], z[300:], 0.5, backend="cpp").backward()
        assert os.sched_getaffinity(0) == before
        one = {min(before)}
        os.sched_setaffinity(0, one)
        pyclloss.nt_xent(z[:300], z[300:], 0.5, backend="cpp").backward()
        assert os.sched_getaffinity(0) == one
    finally:
        os.sched_setaffinity(0, before)
        torch.set_num_threads(threads)
