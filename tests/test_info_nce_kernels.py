"""The InfoNCE family's kernels (infonce_fwd, infonce_pair_fwd, infonce_bwd,
siglip_fwd, siglip_bwd) of every backend against the dense float64 reference
of docs/fused_core.md, by the tolerance rule of tests/helpers.py, on fresh
random inputs: every mask flag, every gradient term, empty sets, low
temperature, tiny coefficients and bad arguments.

Backends: the C++ CPU kernels; the Triton kernels, under the interpreter on CPU
tensors without CUDA (small sizes, fp32 and fp16: the interpreter computes bf16
tl.dot wrongly); the CUDA kernels (marked gpu). Sizes are odd (not multiples of
the tiles), N = 1 and 2, M != N, D from 3 (unaligned rows) past the kernels'
feature chunks.
"""

import math
from itertools import product

import pytest
import torch

from helpers import (HAS_CUDA, absolute_coefficients, check_outputs, infonce_pair_fwd_oracle,
                     infonce_self_bwd_oracle, near_copies, random_labels, unit_rows)
from pyclloss._stats import stats_dtype
from pyclloss.backends import backends
from pyclloss.reference import info_nce as ref

F64, F32, F16, BF16 = torch.float64, torch.float32, torch.float16, torch.bfloat16


def _cuda_kernels_built():
    try:
        import pyclloss._C as C
    except ImportError:
        return False
    return C.built_with_cuda()


AVAILABLE = {"cpp": backends()["cpp"].available, "triton": backends()["triton"].available,
             "cuda": HAS_CUDA and _cuda_kernels_built()}
MARKS = {
    "cpp": [pytest.mark.skipif(not AVAILABLE["cpp"], reason="C++ extension not built")],
    "triton": [pytest.mark.skipif(not AVAILABLE["triton"], reason="Triton not available"),
               # the interpreter evaluates log(0) for empty sets and padding rows in numpy
               pytest.mark.filterwarnings("ignore:divide by zero:RuntimeWarning")],
    "cuda": [pytest.mark.gpu, pytest.mark.skipif(
        not AVAILABLE["cuda"], reason="needs a CUDA GPU and the extension built with CUDA")],
}


class Kernels:
    """One backend's kernels and the device of its tensors."""

    def __init__(self, name):
        self.name = name
        if name == "triton":
            from pyclloss.triton_kernels import info_nce as ops

            self.device = "cuda" if HAS_CUDA else "cpu"
        else:
            import pyclloss._C  # noqa: F401  (registers torch.ops.pyclloss_C)

            ops, self.device = torch.ops.pyclloss_C, "cuda" if name == "cuda" else "cpu"
        self.ops = ops

    def __getattr__(self, op):
        return getattr(self.ops, op)


# Per backend: the dtypes and (N, M, D) it is checked at. The interpreter is
# slow, so Triton gets small grids; the GPU gets sizes that span many tiles.
DTYPES = {"cpp": [F64, F32, F16, BF16], "triton": [F32, F16], "cuda": [F32, F16, BF16]}
SHAPES = {
    "cpp": [(1, 1, 3), (2, 2, 129), (37, 300, 3), (300, 37, 129), (130, 1100, 17)],
    "triton": [(1, 1, 3), (2, 37, 33), (37, 2, 3), (100, 37, 33), (37, 255, 3)],
    "cuda": [(1, 1, 3), (2, 2, 129), (2, 5, 512), (37, 37, 3), (37, 53, 129), (53, 37, 512),
             (1000, 1000, 129), (1000, 777, 512), (777, 1000, 3), (200, 150, 600)],
}
BWD_SHAPES = dict(SHAPES, triton=[(1, 1, 3), (2, 37, 33), (100, 37, 3)])


def grid(*axes):
    """pytest parameters (backend, *values): each axis maps a backend to its values."""
    params = []
    for name, marks in MARKS.items():
        for values in product(*(axis[name] if isinstance(axis, dict) else axis for axis in axes)):
            ids = "-".join([name] + [str(v).replace("torch.", "") for v in values])
            params.append(pytest.param(name, *values, marks=marks, id=ids))
    return params


def each_backend(*names):
    return [pytest.param(n, marks=MARKS[n], id=n) for n in names or MARKS]


# ------------------------------------------------------------------ problems


class Problem:
    """Random unit rows q (N×D) and k (M×D) in a dtype, labels from a few classes,
    and the scale and bias in the statistics dtype, on a backend's device."""

    def __init__(self, backend, n, m, d, dtype, labels=True, classes=3, scale=14.0):
        self.kernels = Kernels(backend)
        device = self.kernels.device
        self.q, self.k = unit_rows(n, d, dtype, device), unit_rows(m, d, dtype, device)
        self.stats = stats_dtype(dtype)
        self.scale = torch.tensor(scale, dtype=self.stats, device=device)
        self.bias = torch.tensor(-2.5, dtype=self.stats, device=device)
        self.q_labels = random_labels(n, classes, device) if labels else None
        self.k_labels = random_labels(m, classes, device) if labels else None

    def randn(self, size):
        return torch.randn(size, dtype=F64).to(self.q.device, self.stats)

    def inputs(self):
        return self.q, self.k, self.scale

    def run(self, op, *args):
        return getattr(self.kernels, op)(*self.inputs(), *args)

    def ref(self, op, *args):
        """The reference on float64 copies of the inputs."""
        args = [a.double() if torch.is_tensor(a) and a.is_floating_point() else a for a in args]
        return getattr(ref, op)(self.q.double(), self.k.double(), self.scale.double(), *args)

    def check(self, op, *args, magnitudes=None):
        """The kernel's outputs against the reference by the rule."""
        got = self.run(op, *args)
        got = got if isinstance(got, tuple) else (got,)
        assert all(g.device == self.q.device for g in got)
        check_outputs(got, ORACLES.get(op, getattr(ref, op)), [*self.inputs(), *args],
                      f"{self.kernels.name} {op}", magnitudes)
        return got

    def grad_magnitudes(self, grad, dot):
        """The sizes of the terms each gradient sums, from ``grad``, the sizes of
        the terms of the dense G (``term_sizes``), and dot:
        s |G| |k| for dq, s |G|ᵀ |q| for dk, |G dot| for dscale, |G| for dbias.
        G, an exp or sigmoid of logits up to s, carries relative errors of about
        (1 + s) units of the statistics dtype: so do results kept in it."""
        q, k, s = self.q.double(), self.k.double(), abs(float(self.scale))
        size = grad.abs() * (1 + s)
        input_size = size if self.q.dtype == self.stats else grad.abs()
        return {0: s * (input_size @ k.abs()).max().item() if size.numel() else 0.0,
                1: s * (input_size.T @ q.abs()).max().item() if size.numel() else 0.0,
                2: (size * dot.abs()).sum().item(), 3: size.sum().item()}


ORACLES = {"infonce_pair_fwd": infonce_pair_fwd_oracle}


# (labels, exclude_offset, neg_only, col_stats); offsets "half" and "beyond"
# are resolved against N (a shifted diagonal, and one past every key).
FWD_MODES = {
    "plain": (False, None, False, False),
    "clip": (False, None, False, True),
    "self_excluded": (False, 0, False, True),
    "supcon": (True, 0, False, True),
    "negatives": (True, 0, True, False),
    "negatives_all_keys": (True, None, True, False),
    "shifted": (True, -2, False, True),
    "shifted_negatives": (True, "half", True, False),
    "out_of_range": (True, "beyond", False, False),
}


def resolve_offset(offset, n):
    return {"half": n // 2, "beyond": n + 1000}.get(offset, offset)


def check_fwd(p, exclude_offset, neg_only, col_stats):
    want_count = p.ref("infonce_fwd", p.q_labels, p.k_labels, exclude_offset, neg_only,
                       col_stats)[2]
    # The LSEs and the positive sums add logits up to s: their magnitudes.
    s, n, m = abs(float(p.scale)), p.q.shape[0], p.k.shape[0]
    lse = s + math.log(max(n, m, 2))
    count = want_count.max().item() if n else 0.0
    got = p.check("infonce_fwd", p.q_labels, p.k_labels, exclude_offset, neg_only, col_stats,
                  magnitudes={0: lse, 1: s * max(1.0, count), 3: lse})
    assert torch.equal(got[2].double().cpu(), want_count.cpu()), "pos_count is an exact count"
    assert all(t.dtype == p.stats for t in got)
    assert got[3].shape == ((p.k.shape[0],) if col_stats else (0,))
    return got


def check_pair(p, exclude_offset):
    neg_lse = p.ref("infonce_fwd", p.q_labels, p.k_labels, exclude_offset, True, False)[0]
    count = p.ref("infonce_fwd", p.q_labels, p.k_labels, exclude_offset, False, False)[2]
    pairs = max([1.0, *count.tolist()])
    per_pair = 2 * abs(float(p.scale)) + math.log(max(p.k.shape[0], 2))  # one softplus term
    return p.check("infonce_pair_fwd", p.q_labels, p.k_labels, exclude_offset,
                   neg_lse.to(p.stats), magnitudes={0: per_pair * pairs, 1: pairs})


def bwd_args(p, exclude_offset, neg_only, terms):
    """infonce_bwd's arguments after the inputs, without need_dk: statistics from
    the reference forward, random coefficients with some exact zeros, and 0
    where an LSE is -inf (as the losses' autograd produces them)."""
    n, m = p.q.shape[0], p.k.shape[0]
    stats = p.ref("infonce_fwd", p.q_labels, p.k_labels, exclude_offset, neg_only, not neg_only)
    row_lse, col_lse = stats[0].to(p.stats), stats[3].to(p.stats)

    def coef(length, lse=None):
        c = p.randn(length)
        c[torch.rand(length) < 0.2] = 0
        return c if lse is None else torch.where(torch.isinf(lse), 0.0, c).to(p.stats)

    pair_lse = row_lse + p.randn(n)
    pair_lse[:1] = -math.inf
    return (p.q_labels, p.k_labels, exclude_offset, neg_only,
            row_lse if "row" in terms else None, coef(n, row_lse) if "row" in terms else None,
            col_lse if "col" in terms else None, coef(m, col_lse) if "col" in terms else None,
            coef(n) if "pos" in terms else None, pair_lse if "pair" in terms else None)


def term_sizes(p, args):
    """The sizes of the terms of G (helpers.absolute_coefficients) and the dots."""
    return p.ref("infonce_grad_logits", *args[:4], *absolute_coefficients(*args[4:]))


def check_bwd_args(p, args, need_dk):
    grad, dot = term_sizes(p, args)
    dq, dk, dscale = p.check("infonce_bwd", *args, need_dk,
                             magnitudes=p.grad_magnitudes(grad, dot))
    assert dq.dtype == p.q.dtype and dk.dtype == p.q.dtype and dscale.dtype == p.stats
    assert dk.shape == (p.k.shape if need_dk else (0,))
    return dq, dk, dscale


def check_bwd(p, exclude_offset, neg_only, terms, need_dk=True):
    neg_only = neg_only and "col" not in terms  # column statistics exist only without it
    return check_bwd_args(p, bwd_args(p, exclude_offset, neg_only, terms), need_dk)


def siglip_grad(p, row_coef):
    """G and dot of SigLIP: G = row_coef (-z) sigmoid(-z (l + b))."""
    q, k = p.q.double(), p.k.double()
    dot = q @ k.T
    z = ref._siglip_sign(q, k, p.q_labels, p.k_labels, F64)
    logits = p.scale.double() * dot + p.bias.double()
    return row_coef.double()[:, None] * -z * torch.sigmoid(-z * logits), dot


def check_siglip(p, need_dks=(True, False), row_coef=None):
    # A term softplus(-x), x = ±(s·dot + b), carries x's rounding, up to
    # (s + |b|) units, times sigmoid(-x) <= softplus(-x): a row's sum of terms
    # has relative errors of (1 + s + |b|) units even where it is tiny.
    value = p.ref("siglip_fwd", p.bias, p.q_labels, p.k_labels)
    cond = 1 + abs(float(p.scale)) + abs(float(p.bias))
    p.check("siglip_fwd", p.bias, p.q_labels, p.k_labels,
            magnitudes={0: cond * value.abs().max().item() if value.numel() else 0.0})
    if row_coef is None:
        row_coef = p.randn(p.q.shape[0])
        row_coef[:1] = 0
    magnitudes = p.grad_magnitudes(*siglip_grad(p, row_coef))
    for need_dk in need_dks:
        dq, dk, _, _ = p.check("siglip_bwd", p.bias, p.q_labels, p.k_labels, row_coef, need_dk,
                               magnitudes=magnitudes)
        assert dq.dtype == p.q.dtype and dk.shape == (p.k.shape if need_dk else (0,))


# --------------------------------------------------------------- every backend


@pytest.mark.parametrize("backend, dtype, shape, mode", grid(DTYPES, SHAPES, list(FWD_MODES)))
def test_infonce_fwd(backend, dtype, shape, mode):
    labels, offset, neg_only, col_stats = FWD_MODES[mode]
    p = Problem(backend, *shape, dtype, labels)
    check_fwd(p, resolve_offset(offset, shape[0]), neg_only, col_stats)


@pytest.mark.parametrize("backend, dtype, shape, offset", grid(DTYPES, SHAPES, [None, 0, -3]))
def test_infonce_pair_fwd(backend, dtype, shape, offset):
    check_pair(Problem(backend, *shape, dtype), offset)


# (terms, labels, exclude_offset, neg_only): each term alone and together, with
# and without labels and exclusion, pair_lse, neg_only. dk is skipped where N > M.
BWD_CASES = {
    "row": (("row",), True, 0, False),
    "row_negatives": (("row",), True, 0, True),
    "col": (("col",), False, None, False),
    "pos": (("pos",), True, 5, False),
    "pos_pair": (("pos", "pair"), True, -3, False),
    "row_col_pos": (("row", "col", "pos"), True, 0, False),
    "row_pos_pair_negatives": (("row", "pos", "pair"), True, -3, True),
    "all_terms": (("row", "col", "pos", "pair"), True, None, False),
    "none": ((), False, None, False),
}


@pytest.mark.parametrize("backend, dtype, shape, case", grid(DTYPES, BWD_SHAPES, list(BWD_CASES)))
def test_infonce_bwd(backend, dtype, shape, case):
    terms, labels, offset, neg_only = BWD_CASES[case]
    p = Problem(backend, *shape, dtype, labels)
    check_bwd(p, offset, neg_only, terms, need_dk=shape[0] <= shape[1])


@pytest.mark.parametrize("backend, dtype, shape, labels", grid(DTYPES, SHAPES, [False, True]))
def test_siglip(backend, dtype, shape, labels):
    check_siglip(Problem(backend, *shape, dtype, labels))


LOW_TEMPERATURE = {"cpp": (70, 600, 33), "triton": (100, 37, 33), "cuda": (300, 300, 64)}


@pytest.mark.parametrize("backend, dtype", grid({"cpp": [F32, F16], "triton": [F32, F16],
                                                 "cuda": [F32, F16, BF16]}))
def test_low_temperature(backend, dtype):
    """scale = 100 (τ = 0.01) on near-duplicate q and k: the online LSE stays
    finite and accurate, and so do the gradients."""
    n, m, d = LOW_TEMPERATURE[backend]
    p = Problem(backend, n, m, d, dtype, scale=100.0)
    p.k = near_copies(p.q, m)
    row_lse, pos_sum, _, col_lse = check_fwd(p, 0, False, True)
    assert torch.isfinite(row_lse).all() and torch.isfinite(col_lse).all()
    assert torch.isfinite(pos_sum).all()
    check_pair(p, 0)
    grads = check_bwd(p, 0, False, ("row", "col", "pos", "pair"))
    assert all(torch.isfinite(g).all() for g in grads)
    check_siglip(p, need_dks=(True,))


SPREAD = {"cpp": (300, 530, 33), "triton": (37, 100, 33), "cuda": (300, 300, 64)}


@pytest.mark.parametrize("backend, dtype", grid({"cpp": [F64, F32], "triton": [F32],
                                                 "cuda": [F32]}))
def test_logits_spread_over_hundreds(backend, dtype):
    """Rows of norm 4 at scale 14: logits over about ±220, where most of a
    row's softmax is below 2^-60 and G of the rest reaches the subnormal range
    (the CPU kernels leave such probabilities out of G): statistics and
    gradients by the rule."""
    n, m, d = SPREAD[backend]
    p = Problem(backend, n, m, d, dtype)
    p.q, p.k = 4 * p.q, 4 * p.k
    check_fwd(p, 0, False, True)
    check_bwd(p, 0, False, ("row", "col", "pos", "pair"))


@pytest.mark.parametrize("backend, dtype", grid({"cpp": [F16, BF16], "triton": [F32, F16],
                                                 "cuda": [F16, BF16]}))
def test_tiny_coefficients(backend, dtype):
    """Coefficients of 1e-6 (1/N of a large N) make G far below fp16's normal
    range: the kernels keep the gradients' relative precision (they scale G
    before rounding it for the second product) instead of underflowing."""
    n, m, d = (700, 600, 64) if backend == "cuda" else (37, 100, 33)
    p = Problem(backend, n, m, d, dtype)
    args = list(bwd_args(p, 0, False, ("row", "col", "pos", "pair")))
    for index in (5, 7, 8):  # row_coef, col_coef, pos_coef
        args[index] = args[index] * 1e-6
    check_bwd_args(p, args, True)
    check_siglip(p, need_dks=(True,), row_coef=1e-6 * p.randn(n))


@pytest.mark.parametrize("backend", each_backend())
def test_empty_sets_are_minus_inf(backend):
    """Rows with nothing in their set end at exactly -inf, and 0 coefficients
    there give exactly 0 gradients, not NaN."""
    # One row that excludes its only key: every LSE is over an empty set.
    p = Problem(backend, 1, 1, 5, F32, labels=False)
    row_lse, pos_sum, pos_count, col_lse = p.run("infonce_fwd", None, None, 0, False, True)
    assert torch.isneginf(row_lse).all() and torch.isneginf(col_lse).all()
    assert pos_sum.item() == 0 and pos_count.item() == 0
    # neg_only with every key a positive: the negatives' LSE is empty.
    p = Problem(backend, 37, 37, 33, F32, classes=1)
    row_lse = check_fwd(p, 0, True, False)[0]
    assert torch.isneginf(row_lse).all()
    loss_sum, sigmoid_sum = p.run("infonce_pair_fwd", p.q_labels, p.k_labels, 0, row_lse)
    assert not loss_sum.any() and not sigmoid_sum.any()
    zeros = torch.zeros_like(row_lse)
    dq, dk, dscale = p.run("infonce_bwd", p.q_labels, p.k_labels, 0, True, row_lse, zeros, None,
                           None, None, None, True)
    assert not dq.any() and not dk.any() and dscale.item() == 0.0


@pytest.mark.parametrize("backend", each_backend())
def test_zero_coef_on_minus_inf_rows_and_columns_is_zero(backend):
    # Rows 0 and 1 have only positives: their neg_only LSE is -inf, and with a
    # zero coefficient they contribute exactly nothing.
    p = Problem(backend, 4, 3, 6, F32)
    dev = p.q.device
    p.q_labels, p.k_labels = torch.tensor([7, 7, 1, 2], device=dev), torch.tensor([7, 7, 7],
                                                                                    device=dev)
    row_lse = p.run("infonce_fwd", p.q_labels, p.k_labels, None, True, False)[0]
    assert torch.isinf(row_lse[:2]).all() and torch.isfinite(row_lse[2:]).all()
    row_coef = torch.tensor([0.0, 0.0, 1.0, 0.5], device=dev)
    args = (p.q_labels, p.k_labels, None, True, row_lse, row_coef, None, None, None, None)
    dq = check_bwd_args(p, args, True)[0]
    assert not dq[:2].any()
    # Columns: a key with no rows at all has col_lse -inf.
    p = Problem(backend, 2, 5, 6, F32, labels=False)
    col_lse = p.run("infonce_fwd", None, None, 0, False, True)[3]
    col_lse[4] = -math.inf
    col_coef = torch.tensor([1.0, 1.0, 1.0, 1.0, 0.0], device=dev)
    dq, dk, _ = p.run("infonce_bwd", None, None, 0, False, None, None, col_lse, col_coef, None,
                      None, True)
    assert torch.isfinite(dq).all() and not dk[4].any()


@pytest.mark.parametrize("backend", each_backend())
def test_labels_beyond_int32_keep_their_identity(backend):
    """Labels that differ only above 32 bits must stay different classes."""
    p = Problem(backend, 90, 70, 9, F32)
    p.q_labels, p.k_labels = p.q_labels * (1 << 40) - 5, p.k_labels * (1 << 40) - 5
    check_fwd(p, 0, False, True)
    check_bwd(p, 0, False, ("row", "pos", "pair"))


# ----------------------------------------------------------------- C++ kernels


@pytest.mark.parametrize("backend", each_backend("cpp"))
def test_fwd_many_row_groups(backend):
    """More row blocks than column-statistic groups: groups span several blocks."""
    check_fwd(Problem(backend, 4200, 40, 3, F32), 0, False, True)


@pytest.mark.parametrize("backend", each_backend("cpp"))
def test_results_do_not_depend_on_thread_count(backend):
    p = Problem(backend, 300, 1100, 33, F32)
    args = bwd_args(p, 0, False, ("row", "col", "pos"))

    def run():
        return p.run("infonce_fwd", *args[:3], False, True) + p.run("infonce_bwd", *args, True)

    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        single = run()
        torch.set_num_threads(max(2, threads))
        multi = run()
    finally:
        torch.set_num_threads(threads)
    for a, b in zip(single, multi):
        assert torch.equal(a, b)


@pytest.mark.parametrize("backend", each_backend("cpp"))
def test_cpp_bad_arguments_raise_clear_errors(backend):
    p = Problem(backend, 5, 6, 4, F32)
    q, k, s, ql, kl = p.q, p.k, p.scale, p.q_labels, p.k_labels
    ops = p.kernels
    with pytest.raises(RuntimeError, match="col_stats cannot be combined with neg_only"):
        ops.infonce_fwd(q, k, s, ql, kl, None, True, True)
    with pytest.raises(RuntimeError, match="must be given together"):
        ops.infonce_fwd(q, k, s, ql, None, None, False, False)
    with pytest.raises(RuntimeError, match="scale must be a 0-dim CPU tensor of dtype Float"):
        ops.infonce_fwd(q, k, s.double(), None, None, None, False, False)
    with pytest.raises(RuntimeError, match="same feature size"):
        ops.infonce_fwd(q, k[:, :3].contiguous(), s, None, None, None, False, False)
    with pytest.raises(RuntimeError, match="contiguous"):
        ops.infonce_fwd(q.t().contiguous().t(), k, s, None, None, None, False, False)
    with pytest.raises(RuntimeError, match="same dtype"):
        ops.infonce_fwd(q, k.double(), s, None, None, None, False, False)
    with pytest.raises(RuntimeError, match="float64, float32, float16 or bfloat16"):
        ops.infonce_fwd(q.int(), k.int(), s, None, None, None, False, False)
    with pytest.raises(RuntimeError, match="k_labels must be a contiguous int64 CPU vector of length 6"):
        ops.infonce_fwd(q, k, s, ql, kl[:5], None, False, False)
    with pytest.raises(RuntimeError, match="row_lse and row_coef must be given together"):
        ops.infonce_bwd(q, k, s, ql, kl, None, False, torch.zeros(5), None, None, None, None,
                        None, True)
    with pytest.raises(RuntimeError, match="col_coef must be a contiguous Float CPU vector of length 6"):
        ops.infonce_bwd(q, k, s, ql, kl, None, False, None, None, torch.zeros(6), torch.zeros(5),
                        None, None, True)
    with pytest.raises(RuntimeError, match="neg_lse must be"):
        ops.infonce_pair_fwd(q, k, s, ql, kl, None, torch.zeros(5, dtype=torch.float64))
    with pytest.raises(RuntimeError, match="bias must be a 0-dim CPU tensor"):
        ops.siglip_fwd(q, k, s, torch.zeros(1), None, None)


# ---------------------------------------------------------------- CUDA kernels


@pytest.mark.parametrize("dtype", [F32, F16, BF16], ids=str)
@pytest.mark.parametrize("backend", each_backend("cuda"))
def test_cuda_backward_is_deterministic(backend, dtype):
    p = Problem(backend, 1000, 900, 129, dtype)
    args = bwd_args(p, 0, False, ("row", "col", "pos"))
    first, second = p.run("infonce_bwd", *args, True), p.run("infonce_bwd", *args, True)
    assert all(torch.equal(a, b) for a, b in zip(first, second))


@pytest.mark.parametrize("backend", each_backend("cuda"))
def test_cuda_bad_arguments_raise(backend):
    p = Problem(backend, 4, 4, 8, F32, labels=False)
    q, scale, ops = p.q, p.scale, p.kernels
    with pytest.raises(RuntimeError, match="col_stats"):
        ops.infonce_fwd(q, q, scale, None, None, None, True, True)
    with pytest.raises(RuntimeError, match="scale"):
        ops.infonce_fwd(q, q, torch.tensor([1.0, 2.0], device=q.device), None, None, None, False,
                        False)
    with pytest.raises(RuntimeError, match="together"):
        ops.infonce_fwd(q, q, scale, torch.zeros(4, dtype=torch.long, device=q.device), None,
                        None, False, False)
    with pytest.raises(RuntimeError, match="dtype"):
        ops.infonce_fwd(q, q.half(), scale, None, None, None, False, False)
    with pytest.raises(RuntimeError, match="contiguous"):
        wide = unit_rows(8, 8, F32, q.device)
        ops.infonce_fwd(wide.t(), wide, scale, None, None, None, False, False)


@pytest.mark.parametrize("backend", each_backend("cuda"))
def test_cuda_empty_key_set_gives_minus_infinity(backend):
    p = Problem(backend, 5, 0, 16, F32, labels=False, scale=2.0)
    row_lse, pos_sum, _, col_lse = p.run("infonce_fwd", None, None, None, False, True)
    assert torch.all(row_lse == -math.inf) and not pos_sum.any() and col_lse.shape == (0,)
    dq, dk, dscale = p.run("infonce_bwd", None, None, None, False, row_lse,
                           torch.zeros_like(row_lse), None, None, None, None, True)
    assert not dq.any() and dk.shape == (0, 16) and dscale.item() == 0


# -------------------------------------------------------------- Triton kernels


@pytest.mark.parametrize("backend", each_backend("triton"))
def test_triton_bad_input(backend):
    p = Problem(backend, 4, 5, 3, F32)
    with pytest.raises(TypeError, match="dtype"):
        p.kernels.infonce_fwd(p.q, p.k.half(), p.scale, None, None, None, False, False)
    with pytest.raises(ValueError, match="neg_only"):
        p.run("infonce_fwd", p.q_labels, p.k_labels, None, True, True)
    with pytest.raises(ValueError, match="labels"):
        p.run("infonce_fwd", p.q_labels, None, None, False, False)


def run_all(p, fwd_offset=0, pair_offset=-1):
    check_fwd(p, fwd_offset, False, True)
    check_pair(p, pair_offset)
    check_bwd(p, 0, False, ("row", "col", "pos", "pair"))
    check_siglip(p, need_dks=(True,))


@pytest.mark.parametrize("shape", [(37, 45, 129), (5, 7, 300)], ids=str)
@pytest.mark.parametrize("dtype", DTYPES["triton"], ids=str)
@pytest.mark.parametrize("backend", each_backend("triton"))
def test_triton_wide_features(backend, dtype, shape):
    """D over several dot chunks and several dq/dk slices, with a ragged last one."""
    run_all(Problem(backend, *shape, dtype))


@pytest.mark.gpu
@pytest.mark.skipif(not (HAS_CUDA and AVAILABLE["triton"]), reason="needs CUDA and Triton")
class TestTritonGPU:
    """The Triton checks compiled, at sizes that span many tiles, bf16 included."""

    @pytest.mark.parametrize("dtype", [F32, F16, BF16], ids=str)
    def test_all_kernels(self, dtype):
        for labels, offset, neg_only, col_stats in FWD_MODES.values():
            p = Problem("triton", 1000, 1537, 128, dtype, labels=labels)
            check_fwd(p, resolve_offset(offset, 1000), neg_only, col_stats)
        p = Problem("triton", 1000, 1537, 128, dtype, classes=50)
        check_pair(p, 3)
        for terms, *_ in BWD_CASES.values():
            check_bwd(p, 0, True, terms)
        check_bwd(p, None, False, ("row", "col", "pos", "pair"), need_dk=False)
        check_siglip(p, need_dks=(True,))

    @pytest.mark.parametrize("dtype", [F32, BF16], ids=str)
    @pytest.mark.parametrize("shape", [(1, 1, 3), (257, 129, 129), (300, 1001, 512)], ids=str)
    def test_feature_sizes(self, shape, dtype):
        run_all(Problem("triton", *shape, dtype))

    def test_low_temperature_fp16(self):
        p = Problem("triton", 1000, 1537, 128, F16, scale=100.0)
        check_fwd(p, 0, False, True)
        check_bwd(p, 0, False, ("row", "col", "pos", "pair"))

    def test_cuda_graph_capture(self):
        """scale is read on the device: the kernels capture and replay in a graph."""
        from pyclloss.triton_kernels import info_nce as tri

        p = Problem("triton", 513, 700, 64, F16)
        args = (p.q_labels, p.k_labels, 0, False, True)
        expected = tri.infonce_fwd(p.q, p.k, p.scale, *args)[0].clone()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            row_lse = tri.infonce_fwd(p.q, p.k, p.scale, *args)[0]
        p.scale.mul_(0.5)
        graph.replay()
        p.scale.mul_(2.0)
        assert not torch.allclose(row_lse, expected)
        graph.replay()
        torch.testing.assert_close(row_lse, expected, rtol=0, atol=0)


@pytest.fixture
def tri():
    from pyclloss.triton_kernels import info_nce

    return info_nce


@pytest.mark.parametrize("flat_loop", [True, False])
@pytest.mark.parametrize("dtype", DTYPES["triton"], ids=str)
@pytest.mark.parametrize("backend", each_backend("triton"))
def test_triton_row_chunks_and_loop_forms(backend, dtype, flat_loop, tri, monkeypatch):
    """Chunked column statistics in forward and G chunks in backward (dk summed
    over chunks) give the results of one chunk, with either loop form of the kernel."""
    from pyclloss.triton_kernels import tuning

    monkeypatch.setattr(tri, "CHUNK_ROWS", 32)
    monkeypatch.setattr(tri, "CHUNK_BYTES", 1)
    monkeypatch.setattr(tri, "COLUMN_STATS_BYTES", 1)
    monkeypatch.setattr(tuning, "CHOSEN", {})
    candidates = tri._candidates
    monkeypatch.setattr(tri, "_candidates", lambda dtype, d: [
        c for c in candidates(dtype, d) if c["FLAT_LOOP"] == flat_loop][:1])
    run_all(Problem(backend, 100, 45, 33, dtype), fwd_offset=3, pair_offset=0)
    assert all(entry["config"]["FLAT_LOOP"] == flat_loop for entry in tuning.CHOSEN.values())


@pytest.mark.parametrize("chunk_rows", [None, 32])
@pytest.mark.parametrize("backend", each_backend("triton"))
def test_triton_clip_work_is_eight_nmd(backend, chunk_rows, tri, monkeypatch):
    """A CLIP forward+backward does 8·N·M·D operations in all: the tiles once in
    forward (row and column statistics together), once in backward, and the two
    products with G; row chunks add nothing."""
    import pyclloss

    if chunk_rows:
        monkeypatch.setattr(tri, "CHUNK_ROWS", chunk_rows)
        monkeypatch.setattr(tri, "CHUNK_BYTES", 1)
        monkeypatch.setattr(tri, "COLUMN_STATS_BYTES", 1)
    flops = []
    launch, mm = tri._Tiles.launch, tri._mm_fp32

    def counting_launch(self, kernel_name, r0, r1, *args, **kwargs):
        flops.append(2 * (r1 - r0) * self.m * self.d)
        return launch(self, kernel_name, r0, r1, *args, **kwargs)

    def counting_mm(a, b, acc=None):
        flops.append(2 * a.shape[0] * a.shape[1] * b.shape[1])
        return mm(a, b, acc)

    monkeypatch.setattr(tri._Tiles, "launch", counting_launch)
    monkeypatch.setattr(tri, "_mm_fp32", counting_mm)
    n, d = 100, 33
    device = Kernels(backend).device
    img = unit_rows(n, d, F32, device).requires_grad_()
    txt = unit_rows(n, d, F32, device).requires_grad_()
    pyclloss.clip_loss(img, txt, 14.0, backend="triton").backward()
    assert sum(flops) == 8 * n * n * d


@pytest.mark.parametrize("dtype", DTYPES["triton"], ids=str)
@pytest.mark.parametrize("case", ["row", "col", "pos", "pos_pair", "all_terms"])
@pytest.mark.parametrize("exclude_offset,neg_only", [(0, False), (0, True), (None, False),
                                                     (3, False)])
@pytest.mark.parametrize("backend", each_backend("triton"))
def test_triton_self_bwd_is_dq_plus_dk(backend, dtype, case, exclude_offset, neg_only, tri,
                                       monkeypatch):
    """q = k = z: the chunks of G + Gᵀ times z give the reference's dq + dk
    (row chunks included)."""
    monkeypatch.setattr(tri, "CHUNK_ROWS", 32)
    monkeypatch.setattr(tri, "CHUNK_BYTES", 1)
    p = Problem(backend, 70, 70, 33, dtype)
    p.k, p.k_labels = p.q, p.q_labels
    terms = BWD_CASES[case][0]
    args = bwd_args(p, exclude_offset, neg_only and "col" not in terms, terms)
    grad, dot = term_sizes(p, args)
    size = p.grad_magnitudes(grad + grad.T, dot)

    got = tri.infonce_self_bwd(p.q, p.scale, *args)
    check_outputs(got, infonce_self_bwd_oracle, [p.q, p.scale, *args], "infonce_self_bwd",
                  {0: size[0], 1: size[2]})


@pytest.mark.parametrize("n", [1, 37, 100])
@pytest.mark.parametrize("labels,exclude_offset,neg_only",
                         [(False, 0, False), (True, 0, False), (True, 0, True),
                          (True, None, False), (True, None, True)])
@pytest.mark.parametrize("dtype", DTYPES["triton"], ids=str)
@pytest.mark.parametrize("backend", each_backend("triton"))
def test_triton_self_forward_takes_the_upper_triangle(backend, dtype, labels, exclude_offset,
                                                      neg_only, n, tri, monkeypatch):
    """q = k: the row statistics from the upper triangle of tiles (each read by
    rows and by columns) equal the reference's, over several row chunks too."""
    monkeypatch.setattr(tri, "CHUNK_ROWS", 32)
    monkeypatch.setattr(tri, "COLUMN_STATS_BYTES", 1)
    launched = []
    launch = tri._Tiles.launch

    def spy(self, name, r0, r1, vectors, outputs, **flags):
        launched.append(flags.get("SELF_STATS", False))
        return launch(self, name, r0, r1, vectors, outputs, **flags)

    monkeypatch.setattr(tri._Tiles, "launch", spy)
    p = Problem(backend, n, n, 33, dtype, labels=labels, classes=1 if n == 37 else 3)
    p.k, p.k_labels = p.q, p.q_labels
    check_fwd(p, exclude_offset, neg_only, False)
    assert launched and all(launched)


@pytest.mark.parametrize("backend", each_backend("triton"))
def test_triton_self_forward_needs_one_tensor_and_symmetric_pairs(backend, tri):
    """Equal values in two tensors, or an exclusion off the diagonal, take the full grid."""
    p = Problem(backend, 40, 40, 16, F32)
    assert not tri._same_rows(p.q, p.q.clone())
    assert tri._same_rows(p.q, p.q)
    check_fwd(p, 3, False, False)
