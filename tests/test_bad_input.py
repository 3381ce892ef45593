"""Bad input raises ValueError/TypeError naming the argument; nothing returns NaN."""

import re

import pytest
import torch

import pyclloss

X = torch.randn(6, 4)
Y = torch.randint(0, 2, (6,))


@pytest.mark.parametrize("call, error, word", [
    (lambda: pyclloss.nt_xent(X, torch.randn(5, 4)), ValueError, "z2"),
    (lambda: pyclloss.nt_xent(X, torch.randn(6, 3)), ValueError, "feature dimension"),
    (lambda: pyclloss.nt_xent(X, X.double()), TypeError, "z2"),
    (lambda: pyclloss.nt_xent(X, X, temperature=0.0), ValueError, "temperature"),
    (lambda: pyclloss.nt_xent(X, X, temperature=-1.0), ValueError, "temperature"),
    (lambda: pyclloss.nt_xent(X, X, temperature=torch.tensor(-0.1)), ValueError, "temperature"),
    (lambda: pyclloss.nt_xent(X, X, temperature="hot"), TypeError, "temperature"),
    (lambda: pyclloss.nt_xent(X.long(), X.long()), TypeError, "z1"),
    (lambda: pyclloss.nt_xent(X.tolist(), X), TypeError, "z1"),
    (lambda: pyclloss.nt_xent(torch.randn(6), X), ValueError, "z1"),
    (lambda: pyclloss.nt_xent(torch.randn(0, 4), torch.randn(0, 4)), ValueError, "z1"),
    (lambda: pyclloss.nt_xent(X, X, reduction="avg"), ValueError, "reduction"),
    (lambda: pyclloss.nt_xent(X, X, weights=torch.ones(5)), ValueError, "weights"),
    (lambda: pyclloss.nt_xent(X, X, weights=-torch.ones(6)), ValueError, "weights"),
    (lambda: pyclloss.supcon(X, Y[:5]), ValueError, "labels"),
    (lambda: pyclloss.supcon(X, Y.float()), TypeError, "labels"),
    (lambda: pyclloss.supcon(X), ValueError, "labels"),
    (lambda: pyclloss.supcon(torch.randn(2, 2, 2, 2)), ValueError, "features"),
    (lambda: pyclloss.supcon(torch.randn(0, 4), Y[:0]), ValueError, "features"),
    (lambda: pyclloss.supcon(X, Y, base_temperature=0), ValueError, "base_temperature"),
    (lambda: pyclloss.pair_nt_xent(torch.randn(0, 4), Y[:0]), ValueError, "embeddings"),
    (lambda: pyclloss.info_nce(X, X[:3]), ValueError, "key"),
    (lambda: pyclloss.info_nce(X, X, targets=torch.full((6,), 6)), ValueError, "targets"),
    (lambda: pyclloss.info_nce(X, X, queue=torch.randn(3, 5)), ValueError, "queue"),
    (lambda: pyclloss.clip_loss(X, X, logit_scale=0.0), ValueError, "logit_scale"),
    (lambda: pyclloss.clip_loss(X, X[:4], logit_scale=1.0), ValueError, "text_features"),
    (lambda: pyclloss.siglip_loss(X, X, 10.0, torch.zeros(2)), ValueError, "logit_bias"),
    (lambda: pyclloss.siglip_loss(X, X, 10.0, float("nan")), ValueError, "logit_bias"),
    (lambda: pyclloss.clip_loss(X, X, logit_scale=float("inf")), ValueError, "logit_scale"),
    (lambda: pyclloss.nt_xent(X, X, backend="gpu"), ValueError, "backend"),
    (lambda: pyclloss.nt_xent(X, X, backend=3), TypeError, "backend"),
    (lambda: pyclloss.MoCoLoss(dim=0), ValueError, "dim"),
])
def test_bad_input_names_the_argument(call, error, word):
    with pytest.raises(error, match=word):
        call()


NAN, INF = float("nan"), float("inf")
QUEUE, PERM = torch.randn(5, 4), torch.randperm(5)


@pytest.mark.parametrize("call, message", [
    # tensor-valued scalars get the finiteness check of the float ones
    (lambda: pyclloss.siglip_loss(X, X, 10.0, torch.tensor(NAN)), "logit_bias must be finite"),
    (lambda: pyclloss.clip_loss(X, X, torch.tensor(INF)), "logit_scale must be > 0 and finite"),
    (lambda: pyclloss.siglip_loss(X, X, torch.tensor(NAN), 0.0), "logit_scale must be > 0"),
    (lambda: pyclloss.nt_xent(X, X, torch.tensor(INF)), "temperature must be a finite number"),
    (lambda: pyclloss.supcon(X, Y, 0.1, torch.tensor(INF)), "base_temperature must be a finite"),
    (lambda: pyclloss.ft_moco_loss(X, X, QUEUE, torch.tensor(NAN), 0.5, PERM),
     "lam_pos must be finite"),
    (lambda: pyclloss.ft_moco_loss(X, X, QUEUE, 1.5, torch.tensor(NAN), PERM),
     "lam_neg must be finite"),
    # a float temperature that is 0 (or whose reciprocal overflows) in the input's dtype
    (lambda: pyclloss.nt_xent(X, X, 1e-46), "got 1e-46, which is 0.0 in float32"),
    (lambda: pyclloss.info_nce(X, X, 1e-40), "temperature must be a finite number > 0 with a "
                                            "finite reciprocal, got 1e-40, which is"),
    (lambda: pyclloss.supcon(X, Y, torch.tensor(1e-46, dtype=torch.float64)),
     "temperature must be a finite number > 0 with a finite reciprocal, got 1e-46"),
    (lambda: pyclloss.clip_loss(X, X, 1e300), "logit_scale must be > 0 and finite, got 1e+300, "
                                              "which is inf in float32"),
    # weights whose sum overflows the loss's dtype would give inf / inf = NaN
    (lambda: pyclloss.nt_xent(X, X, weights=torch.full((6,), 3e38)),
     "weights must be finite and >= 0, with a finite sum in float32"),
    (lambda: pyclloss.supcon(X, Y, weights=torch.full((6,), 1e39, dtype=torch.float64)),
     "weights must be finite and >= 0, with a finite sum in float32"),
    (lambda: pyclloss.info_nce(X, X, weights=torch.full((6,), NAN)), "weights must be finite"),
])
def test_bad_scalars_and_weights_are_rejected(call, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        call()


def test_large_finite_weights_still_work():
    w = torch.full((6,), 1e37)
    torch.testing.assert_close(pyclloss.nt_xent(X, X, weights=w), pyclloss.nt_xent(X, X))


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_input_is_rejected(bad):
    x = X.clone()
    x[2, 1] = bad
    with pytest.raises(ValueError, match="z1 contains NaN or Inf"):
        pyclloss.nt_xent(x, X)
    with pytest.raises(ValueError, match="features contains NaN or Inf"):
        pyclloss.supcon(x, Y)


def test_devices_must_match():
    meta = torch.randn(6, 4, device="meta")
    with pytest.raises(ValueError, match="z2 is on meta"):
        pyclloss.nt_xent(X, meta)


def test_unavailable_backend_is_a_clear_error():
    available = pyclloss.backends()
    if not available["cuda"].available:
        with pytest.raises(RuntimeError, match="backend='cuda' is not available"):
            pyclloss.nt_xent(X, X, backend="cuda")
    if available["cpp"].available and not torch.cuda.is_available():
        # the C++ kernels only take CPU tensors: asking for them elsewhere is refused
        from pyclloss.backends import resolve
        with pytest.raises(ValueError, match="cannot run on cuda"):
            resolve("cpp", torch.device("cuda"))


def test_backends_report():
    report = pyclloss.backends()
    assert set(report) == {"cpp", "cuda", "triton", "reference"}
    assert report["reference"].available
    for available, reason in report.values():
        assert isinstance(available, bool) and reason


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
def test_all_finite_is_exact(dtype):
    """The one-reduction finiteness check: a bad entry anywhere is found, and a sum
    that overflows on finite entries is not mistaken for one."""
    from pyclloss._checks import all_finite

    x = torch.randn(37, 5).to(dtype)
    assert all_finite(x)
    for bad in (float("nan"), float("inf"), -float("inf")):
        y = x.clone()
        y[int(torch.randint(0, 37, ())), int(torch.randint(0, 5, ()))] = bad
        assert not all_finite(y)
    huge = torch.full((8,), torch.finfo(dtype).max, dtype=dtype)
    assert all_finite(huge)


# ------------------------- the C++ ops of the families other than InfoNCE
# (test_info_nce_kernels.py checks InfoNCE's)


def _short_argument_calls():
    """(op, arguments with one of them one entry short, its name): each op
    must name the argument, never read past it."""
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


@pytest.mark.skipif(not pyclloss.backends()["cpp"].available, reason="C++ extension not built")
@pytest.mark.parametrize("op,args,name", _short_argument_calls(),
                         ids=[f"{op}-{name}" for op, _, name in _short_argument_calls()])
def test_short_arguments_are_named(op, args, name):
    import pyclloss._C  # noqa: F401  (registers torch.ops.pyclloss_C)

    with pytest.raises(RuntimeError, match=rf"\b{name} must be"):
        getattr(torch.ops.pyclloss_C, op)(*[a.contiguous() if isinstance(a, torch.Tensor) else a for a in args])
