"""The C++ CPU kernels of the fused InfoNCE core (torch.ops.pyclloss_C) against
the dense float64 reference of docs/fused_core.md, on fresh random inputs, and
the argument checks of the other families' CPU ops."""

import math

import pytest
import torch
import torch.nn.functional as F

import pyclloss._C  # noqa: F401  (registers torch.ops.pyclloss_C)
from pyclloss._stats import stats_dtype
from pyclloss.reference import info_nce as ref

ops = torch.ops.pyclloss_C

DTYPES = [torch.float64, torch.float32, torch.float16, torch.bfloat16]
# Relative tolerances against the float64 reference. Statistics are computed
# in float32 for every non-float64 input (fp16/bf16 values are exact in fp32),
# so they all get float32's bound; dq and dk come back rounded to the input
# dtype, hence the looser bound for fp16/bf16 gradients.
STATS_TOL = {torch.float64: 1e-10, torch.float32: 1e-5, torch.float16: 1e-5, torch.bfloat16: 1e-5}
GRAD_TOL = {torch.float64: 1e-10, torch.float32: 1e-5, torch.float16: 1e-2, torch.bfloat16: 1e-2}

# (N, M, D): below, at and across the kernel's 64 x 512 tiles, never multiples.
SHAPES = [(1, 1, 3), (2, 2, 129), (37, 300, 3), (300, 37, 129), (130, 1100, 17)]


def _stats(dtype):
    return stats_dtype(dtype)


def _problem(n, m, d, dtype, labels=True, classes=4, seed=0, scale=14.0):
    g = torch.Generator().manual_seed(seed)
    q = F.normalize(torch.randn(n, d, generator=g, dtype=torch.float64), dim=1).to(dtype)
    k = F.normalize(torch.randn(m, d, generator=g, dtype=torch.float64), dim=1).to(dtype)
    q_labels = torch.randint(0, classes, (n,), generator=g) if labels else None
    k_labels = torch.randint(0, classes, (m,), generator=g) if labels else None
    return q, k, torch.tensor(scale, dtype=_stats(dtype)), q_labels, k_labels, g


def _f64(x):
    return None if x is None else x.to(torch.float64)


def _max(t):
    return float(t.max()) if t.numel() else 0.0


def _assert_close(actual, expected, atol, rtol=0.0):
    assert actual.shape == expected.shape
    actual, expected = actual.to(torch.float64), expected.to(torch.float64)
    assert not torch.isnan(actual).any(), "NaN in kernel output"
    torch.testing.assert_close(actual, expected, rtol=rtol, atol=float(atol))


def _check_fwd(q, k, s, ql, kl, offset, neg_only, col_stats):
    tol = STATS_TOL[q.dtype]
    got = ops.infonce_fwd(q, k, s, ql, kl, offset, neg_only, col_stats)
    want = ref.infonce_fwd(_f64(q), _f64(k), _f64(s), ql, kl, offset, neg_only, col_stats)
    for t in got:
        assert t.dtype == _stats(q.dtype)
    bound = float(s) + math.log(max(k.shape[0], q.shape[0], 2))
    row_lse, pos_sum, pos_count, col_lse = got
    _assert_close(row_lse, want[0], tol * bound)
    _assert_close(pos_sum, want[1], tol * float(s) * max(1.0, _max(want[2])))
    _assert_close(pos_count, want[2], 0.0)
    _assert_close(col_lse, want[3], tol * bound)
    return got


# ----------------------------------------------------------------- forward


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize(
    "labels, offset, neg_only, col_stats",
    [
        (False, None, False, False),
        (False, None, False, True),
        (True, 0, False, True),
        (True, 3, True, False),
        (True, -2, False, True),
        (True, 1000, False, False),  # out of range: nothing excluded
    ],
)
def test_infonce_fwd(dtype, shape, labels, offset, neg_only, col_stats):
    q, k, s, ql, kl, _ = _problem(*shape, dtype, labels)
    _check_fwd(q, k, s, ql, kl, offset, neg_only, col_stats)


def test_infonce_fwd_many_row_groups():
    # More row blocks than column-statistic groups: groups span several blocks.
    q, k, s, ql, kl, _ = _problem(4200, 40, 3, torch.float32)
    _check_fwd(q, k, s, ql, kl, 0, False, True)


def test_labels_beyond_int32_keep_their_identity():
    # Labels that differ only above 32 bits must stay different classes.
    q, k, s, ql, kl, g = _problem(90, 70, 9, torch.float32)
    ql, kl = ql * (1 << 40) - 5, kl * (1 << 40) - 5
    _check_fwd(q, k, s, ql, kl, 0, False, True)
    args = _bwd_args(q, k, s, ql, kl, 0, False, ("row", "pos", "pair"), g)
    got = ops.infonce_bwd(q, k, s, ql, kl, 0, False, *args.values(), True)
    f64_args = [_f64(v) for v in args.values()]
    want = ref.infonce_bwd(_f64(q), _f64(k), _f64(s), ql, kl, 0, False, *f64_args, True)
    grad_logits = ref.infonce_grad_logits(_f64(q), _f64(k), _f64(s), ql, kl, 0, False, *f64_args)
    _check_grads(q, k, s, got, want, grad_logits, True)


def test_infonce_fwd_empty_sets_are_minus_inf():
    # One row, one key, the pair excluded: every LSE is over an empty set.
    q, k, s, ql, kl, _ = _problem(1, 1, 5, torch.float32)
    row_lse, pos_sum, pos_count, col_lse = ops.infonce_fwd(q, k, s, ql, kl, 0, False, True)
    assert row_lse.item() == -math.inf and col_lse.item() == -math.inf
    assert pos_sum.item() == 0 and pos_count.item() == 0
    # neg_only with every key a positive: the negatives' LSE is empty.
    labels = torch.zeros(3, dtype=torch.long)
    q, k, s, *_ = _problem(3, 3, 5, torch.float32)
    row_lse = ops.infonce_fwd(q, k, s, labels, labels, None, True, False)[0]
    assert torch.equal(row_lse, torch.full((3,), -math.inf))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_low_temperature_stays_finite(dtype):
    q, k, s, ql, kl, _ = _problem(70, 600, 33, dtype, scale=100.0)
    row_lse, pos_sum, _, col_lse = _check_fwd(q, k, s, ql, kl, 0, False, True)
    assert torch.isfinite(row_lse).all() and torch.isfinite(col_lse).all()
    assert torch.isfinite(pos_sum).all()
    row_coef = torch.rand(70, generator=torch.Generator().manual_seed(1))
    dq, dk, dscale = ops.infonce_bwd(q, k, s, ql, kl, 0, False, row_lse, row_coef, col_lse,
                                     torch.ones(600), -torch.ones(70), None, True)
    assert torch.isfinite(dq).all() and torch.isfinite(dk).all() and torch.isfinite(dscale)


# --------------------------------------------------------------- pair forward


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("offset", [None, 0, -1])
def test_infonce_pair_fwd(dtype, shape, offset):
    q, k, s, ql, kl, g = _problem(*shape, dtype)
    neg_lse = ref.infonce_fwd(_f64(q), _f64(k), _f64(s), ql, kl, offset, True, False)[0]
    neg_lse = neg_lse.to(_stats(dtype))
    got = ops.infonce_pair_fwd(q, k, s, ql, kl, offset, neg_lse)
    want = ref.infonce_pair_fwd(_f64(q), _f64(k), _f64(s), ql, kl, offset, _f64(neg_lse))
    count = ref.infonce_fwd(_f64(q), _f64(k), _f64(s), ql, kl, offset, False, False)[2]
    per_pair = 2 * float(s) + math.log(max(shape[1], 2))  # bound on one softplus term
    _assert_close(got[0], want[0], STATS_TOL[dtype] * per_pair * max(1.0, _max(count)))
    _assert_close(got[1], want[1], STATS_TOL[dtype] * max(1.0, _max(count)))


def test_infonce_pair_fwd_minus_inf_neg_lse_gives_zero():
    q, k, s, ql, kl, _ = _problem(40, 50, 7, torch.float32)
    neg_lse = torch.full((40,), -math.inf)
    loss_sum, sigmoid_sum = ops.infonce_pair_fwd(q, k, s, ql, kl, None, neg_lse)
    assert torch.equal(loss_sum, torch.zeros(40)) and torch.equal(sigmoid_sum, torch.zeros(40))


# ------------------------------------------------------------------ backward

# (terms, labels, exclude_offset, neg_only): each term alone and together,
# with and without labels and exclusion, pair_lse, neg_only.
BWD_CASES = [
    (("row",), True, 0, False),
    (("row",), True, 0, True),
    (("col",), False, None, False),
    (("pos",), True, 5, False),
    (("pos", "pair"), True, -3, False),
    (("row", "col", "pos"), True, 0, False),
    (("row", "pos", "pair"), True, -3, True),
    ((), False, None, False),
]


def _bwd_args(q, k, s, ql, kl, offset, neg_only, terms, g):
    """Statistics from the reference forward and random coefficients, exactly 0
    where an LSE is -inf (as the losses' autograd produces them)."""
    n, m = q.shape[0], k.shape[0]
    st = _stats(q.dtype)
    stats = ref.infonce_fwd(_f64(q), _f64(k), _f64(s), ql, kl, offset, neg_only, not neg_only)
    row_lse, col_lse = stats[0].to(st), stats[3].to(st)

    def coef(length, lse):
        c = torch.randn(length, generator=g, dtype=torch.float64).to(st)
        c[torch.rand(length, generator=g) < 0.2] = 0  # some exact zeros
        return c.masked_fill(torch.isinf(lse), 0) if lse is not None else c

    args = dict(row_lse=None, row_coef=None, col_lse=None, col_coef=None, pos_coef=None,
                pair_lse=None)
    if "row" in terms:
        args.update(row_lse=row_lse, row_coef=coef(n, row_lse))
    if "col" in terms:
        args.update(col_lse=col_lse, col_coef=coef(m, col_lse))
    if "pos" in terms:
        args.update(pos_coef=coef(n, None))
    if "pair" in terms:
        args.update(pair_lse=(row_lse + torch.randn(n, generator=g).to(st)))
    return args


def _check_grads(q, k, s, got, want, grad_logits, need_dk):
    """dq, dk, dscale (and more) against the reference, with absolute bounds
    from |G| so that cancellation in the sums does not fail a correct kernel."""
    tol = GRAD_TOL[q.dtype]
    grad, dot = grad_logits
    mag = grad.abs()
    _assert_close(got[0], want[0], tol * float(s) * _max(mag @ _f64(k).abs()) + 1e-30)
    if need_dk:
        _assert_close(got[1], want[1], tol * float(s) * _max(mag.T @ _f64(q).abs()) + 1e-30)
    else:
        assert got[1].numel() == 0
    _assert_close(got[2], want[2], STATS_TOL[q.dtype] * (mag * dot.abs()).sum() + 1e-30)
    assert got[0].dtype == q.dtype and got[2].dtype == _stats(q.dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("terms, labels, offset, neg_only", BWD_CASES,
                         ids=lambda c: "+".join(c) if isinstance(c, tuple) else str(c))
def test_infonce_bwd(dtype, shape, terms, labels, offset, neg_only):
    q, k, s, ql, kl, g = _problem(*shape, dtype, labels, seed=sum(shape) + 7 * len(terms))
    args = _bwd_args(q, k, s, ql, kl, offset, neg_only, terms, g)
    need_dk = shape[0] != 300  # also cover need_dk=False
    got = ops.infonce_bwd(q, k, s, ql, kl, offset, neg_only, *args.values(), need_dk)
    f64_args = {name: _f64(v) for name, v in args.items()}
    want = ref.infonce_bwd(_f64(q), _f64(k), _f64(s), ql, kl, offset, neg_only,
                           *f64_args.values(), need_dk)
    grad_logits = ref.infonce_grad_logits(_f64(q), _f64(k), _f64(s), ql, kl, offset, neg_only,
                                          *f64_args.values())
    _check_grads(q, k, s, got, want, grad_logits, need_dk)


def test_infonce_bwd_zero_coef_on_minus_inf_rows_is_zero():
    # Rows 0 and 1 have only positives: neg_only LSE is -inf there. With a zero
    # coefficient they must contribute exactly nothing, not NaN.
    q, k, s, *_ = _problem(4, 3, 6, torch.float32)
    ql = torch.tensor([7, 7, 1, 2])
    kl = torch.tensor([7, 7, 7])
    row_lse = ops.infonce_fwd(q, k, s, ql, kl, None, True, False)[0]
    assert torch.isinf(row_lse[:2]).all() and torch.isfinite(row_lse[2:]).all()
    row_coef = torch.tensor([0.0, 0.0, 1.0, 0.5])
    dq, dk, dscale = ops.infonce_bwd(q, k, s, ql, kl, None, True, row_lse, row_coef, None, None,
                                     None, None, True)
    assert torch.equal(dq[:2], torch.zeros(2, 6))
    want = ref.infonce_bwd(_f64(q), _f64(k), _f64(s), ql, kl, None, True, _f64(row_lse),
                           _f64(row_coef), None, None, None, None, True)
    _assert_close(dq, want[0], 1e-5, rtol=1e-5)
    _assert_close(dk, want[1], 1e-5, rtol=1e-5)
    _assert_close(dscale, want[2], 1e-5, rtol=1e-5)
    # Columns: a key excluded from every row has col_lse -inf.
    q, k, s, *_ = _problem(2, 5, 6, torch.float32)
    col_lse = ops.infonce_fwd(q, k, s, None, None, 0, False, True)[3]
    col_lse[4] = -math.inf  # as if key 4 had no rows at all
    col_coef = torch.tensor([1.0, 1.0, 1.0, 1.0, 0.0])
    dq, dk, _ = ops.infonce_bwd(q, k, s, None, None, 0, False, None, None, col_lse, col_coef,
                                None, None, True)
    assert torch.isfinite(dq).all() and torch.equal(dk[4], torch.zeros(6))


# -------------------------------------------------------------------- SigLIP


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("labels", [True, False])
def test_siglip(dtype, shape, labels):
    q, k, s, ql, kl, g = _problem(*shape, dtype, labels, classes=3)
    bias = torch.tensor(-2.5, dtype=_stats(dtype))
    got = ops.siglip_fwd(q, k, s, bias, ql, kl)
    want = ref.siglip_fwd(_f64(q), _f64(k), _f64(s), _f64(bias), ql, kl)
    per_pair = float(s) + abs(float(bias)) + 1
    _assert_close(got, want, STATS_TOL[dtype] * per_pair * shape[1])

    row_coef = torch.randn(shape[0], generator=g, dtype=torch.float64).to(_stats(dtype))
    row_coef[0] = 0
    need_dk = shape[0] != 300
    got = ops.siglip_bwd(q, k, s, bias, ql, kl, row_coef, need_dk)
    want = ref.siglip_bwd(_f64(q), _f64(k), _f64(s), _f64(bias), ql, kl, _f64(row_coef), need_dk)
    dot, logits = ref._logits(_f64(q), _f64(k), _f64(s))
    z = ref._siglip_sign(_f64(q), _f64(k), ql, kl, torch.float64)
    grad = _f64(row_coef)[:, None] * torch.sigmoid(-z * (logits + float(bias)))
    _check_grads(q, k, s, got[:3], want[:3], (grad, dot), need_dk)
    _assert_close(got[3], want[3], STATS_TOL[dtype] * grad.abs().sum() + 1e-30)


# ------------------------------------------------------------ properties, errors


def test_results_do_not_depend_on_thread_count():
    q, k, s, ql, kl, g = _problem(300, 1100, 33, torch.float32)
    args = _bwd_args(q, k, s, ql, kl, 0, False, ("row", "col", "pos"), g)

    def run():
        return (ops.infonce_fwd(q, k, s, ql, kl, 0, False, True)
                + ops.infonce_bwd(q, k, s, ql, kl, 0, False, *args.values(), True))

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


def test_bad_inputs_raise_clear_errors():
    q, k, s, ql, kl, _ = _problem(5, 6, 4, torch.float32)
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


def _short_argument_calls():
    """(op, arguments with one of them one entry short, its name) for the ops
    of the other families: each must name the argument, never read past it."""
    n = 5
    sim, dist, rows = -torch.rand(n, n), torch.rand(n, n), torch.randn(n)
    gram, labels, lam, scale = torch.randn(n, n), torch.rand(n), torch.rand(n, n), torch.tensor(2.0)
    queue, weight, perm = torch.randn(n, 3), torch.rand(n), torch.randperm(n)
    x, pairs = torch.randn(2, n), torch.tensor([[0, 1], [2, 3]], dtype=torch.int32)
    sort = (pairs, 1.0, 3, 0.25)
    q, gates, codes, stats = torch.randn(n, 3), torch.rand(n, 3), torch.arange(n), torch.zeros(n)
    gated = (q, q, gates, scale, codes, codes, codes)
    return [
        ("rnc_fwd", (sim, dist[:-1]), "dist"),
        ("rnc_bwd", (sim, dist, rows[:-1]), "grad_rows"),
        ("rnc_distances_bwd", (queue, dist[:-1]), "weights"),
        ("supremix_fwd", (gram, labels[:-1], lam, scale, 1.0), "labels"),
        ("supremix_fwd", (gram, labels, lam[:-1], scale, 1.0), "lam"),
        ("supremix_fwd", (gram, labels, lam, scale[None], 1.0), "scale"),
        ("supremix_bwd", (gram, labels, lam, scale, 1.0, rows[:-1], rows, rows), "lse"),
        ("supremix_bwd", (gram, labels, lam, scale, 1.0, rows, rows[:-1], rows), "grad_lse"),
        ("supremix_bwd", (gram, labels, lam, scale, 1.0, rows, rows, rows[:-1]), "grad_pos"),
        ("ft_moco_interpolate_queue", (queue, weight[:-1], weight, perm), "own_weight"),
        ("ft_moco_interpolate_queue", (queue, weight, weight[:-1], perm), "partner_weight"),
        ("ft_moco_interpolate_queue", (queue, weight, weight, perm[:-1]), "perm"),
        ("diff_sort_bwd", (x, x[:, :-1], None, *sort), "grad_sorted"),
        ("diff_sort_bwd", (x, None, torch.randn(2, n, n - 1), *sort), "grad_perm"),
        ("diff_sort_apply_fwd", (x, x[:, :-1], *sort), "v"),
        ("diff_sort_apply_bwd", (x, x, x[:, :-1], *sort), "grad_out"),
        ("gated_fwd", (q, q, gates, scale, codes[:-1], codes, codes), "labels"),
        ("gated_pair_fwd", (*gated, stats[:-1]), "neg_lse"),
        ("gated_bwd", (*gated, stats, stats, stats[:-1], True), "pos_coef"),
    ]


@pytest.mark.parametrize("op,args,name", _short_argument_calls(),
                         ids=[f"{op}-{name}" for op, _, name in _short_argument_calls()])
def test_short_arguments_are_named(op, args, name):
    with pytest.raises(RuntimeError, match=rf"\b{name} must be"):
        getattr(ops, op)(*[a.contiguous() if isinstance(a, torch.Tensor) else a for a in args])
