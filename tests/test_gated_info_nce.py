"""The gated-subspace (Hydra / SimLAP) loss: every fused backend's kernels and
losses against the dense float64 reference, on fresh random inputs."""

import pytest
import torch
import torch.nn.functional as F

import pyclloss
from pyclloss.ops import gated_info_nce as gated_ops
from pyclloss.reference import gated_info_nce as ref

from helpers import HAS_CUDA, check_against_reference, check_outputs, fused_backends

DTYPES = [torch.float64, torch.float32, torch.float16, torch.bfloat16]

# (B, N, K): below, at and across the C++ kernels' 64 x 512 tiles, never multiples.
SHAPES = [(1, 1, 3), (2, 2, 5), (37, 530, 19), (130, 70, 129)]
# Triton under the interpreter is slow: small shapes, across its 32 x 32 tiles.
TRITON_SHAPES = [(1, 1, 3), (37, 45, 19)]


def _kernel_dtypes(backend):
    if backend == "triton":  # no float64 in tl.dot; the interpreter gets bf16 dots wrong
        return [torch.float32, torch.float16]
    return DTYPES


def _cases():
    for backend in fused_backends("cpu"):
        shapes = TRITON_SHAPES if backend == "triton" else SHAPES
        for dtype in _kernel_dtypes(backend):
            for shape in shapes:
                yield pytest.param(backend, dtype, shape, id=f"{backend}-{dtype}-{shape}")


def _problem(b, n, k, dtype, classes=4, device="cpu", scale=5.0):
    q = torch.randn(b, k, dtype=torch.float64).to(device=device, dtype=dtype)
    keys = torch.randn(n, k, dtype=torch.float64).to(device=device, dtype=dtype)
    gates = torch.rand(b, k, dtype=torch.float64).to(device=device, dtype=dtype)
    labels = torch.randint(0, classes, (b,), device=device)
    partner = torch.randint(0, classes, (b,), device=device)
    key_labels = torch.randint(0, classes, (n,), device=device)
    stats = torch.float64 if dtype == torch.float64 else torch.float32
    s = torch.tensor(scale, dtype=stats, device=device)
    return q, keys, gates, s, labels, partner, key_labels


def _runner(backend):
    """Calls kernel `name` of this family in `backend`."""
    return lambda name, *args: gated_ops.KERNELS.kernel(backend, name)(*args)


def _f64(*tensors):
    return [t.to(torch.float64) for t in tensors]


def _close(actual, expected, tol):
    """|actual - expected| <= tol * max|expected| (elementwise bound, relative to the scale)."""
    assert actual.shape == expected.shape
    actual = actual.to(torch.float64)
    assert torch.isfinite(actual).all() == torch.isfinite(expected).all()
    finite = torch.isfinite(expected)
    assert torch.equal(actual[~finite], expected[~finite])
    bound = tol * max(1.0, float(expected[finite].abs().max()) if finite.any() else 1.0)
    torch.testing.assert_close(actual[finite], expected[finite], rtol=0, atol=bound)


def _magnitudes(outputs, scale):
    """Each result's size, at least 1, times (1 + s) for results kept in the
    statistics dtype: exps and sigmoids of logits up to s carry relative errors
    of about (1 + s) units of it."""
    def size(t):
        finite = t[torch.isfinite(t)]
        return max(1.0, finite.abs().max().item() if finite.numel() else 0.0)

    s = abs(float(scale))
    return {i: size(t) * (1 + s if t.dtype == scale.dtype else 1) for i, t in enumerate(outputs)}


# ------------------------------------------------------------------ kernels


@pytest.mark.parametrize("backend, dtype, shape", list(_cases()))
def test_kernels_match_reference(backend, dtype, shape):
    q, k, g, s, y, p, ky = _problem(*shape, dtype)
    run = _runner(backend)
    inputs = [q, k, g, s, y, p, ky]
    fwd = run("gated_fwd", *inputs)
    neg_lse, pos_count = fwd
    assert neg_lse.dtype == s.dtype
    want_count = check_outputs(fwd, ref.gated_fwd, inputs, "gated_fwd", _magnitudes(fwd, s))[1]
    assert torch.equal(pos_count.double(), want_count), "pos_count is an exact count"

    pair = run("gated_pair_fwd", *inputs, neg_lse)
    check_outputs(pair, ref.gated_pair_fwd, [*inputs, neg_lse], "gated_pair_fwd",
                  _magnitudes(pair, s))

    neg_coef = torch.randn_like(neg_lse)
    pos_coef = torch.randn_like(neg_lse)
    pos_coef[0] = 0  # a zero coefficient contributes exactly nothing
    args = [*inputs, neg_lse, neg_coef, pos_coef, True]
    got = run("gated_bwd", *args)
    for name, actual, original in zip(("dq", "dk", "dgates"), got, (q, k, g)):
        assert actual.dtype == original.dtype, name
    check_outputs(got, ref.gated_bwd, args, "gated_bwd", _magnitudes(got, s))
    no_dk = run("gated_bwd", q, k, g, s, y, p, ky, neg_lse, neg_coef, pos_coef, False)
    assert no_dk[1].numel() == 0
    torch.testing.assert_close(no_dk[0], got[0], rtol=0, atol=0)


def test_kernels_handle_clamped_norms_and_empty_sets():
    """Gated norms at zero (a closed gate row, a zero key), anchors without
    negatives (-inf LSE) and without positives: same as the reference, no NaN."""
    for backend in fused_backends("cpu"):
        q, k, g, s, y, p, ky = _problem(5, 7, 6, torch.float32)
        g[1] = 0  # |q_1 g_1| = 0 and |k_n g_1| = 0 for every key
        k[2] = 0
        y[:] = 0
        ky[:] = torch.tensor([0, 0, 1, 1, 2, 2, 3])
        p[:] = torch.tensor([1, 1, 2, 3, 0])  # anchor 4: partner = own class
        y[3] = 2  # anchor 3: own 2, partner 3 -> negatives 0, 0, 1, 1
        y[2] = 3  # anchor 2: own 3, partner 2
        run = _runner(backend)
        f64 = _f64(q, k, g, s)
        want_neg, _ = ref.gated_fwd(*f64, y, p, ky)
        neg_lse, _ = run("gated_fwd", q, k, g, s, y, p, ky)
        _close(neg_lse, want_neg, 2e-5)
        want_loss, _ = ref.gated_pair_fwd(*f64, y, p, ky, want_neg)
        loss_sum, _ = run("gated_pair_fwd", q, k, g, s, y, p, ky, neg_lse)
        _close(loss_sum, want_loss, 2e-5)
        coef = torch.randn_like(neg_lse)
        want = ref.gated_bwd(*f64, y, p, ky, want_neg, coef.double(), -coef.double(), True)
        got = run("gated_bwd", q, k, g, s, y, p, ky, neg_lse, coef, -coef, True)
        for actual, expected in zip(got, want):
            assert torch.isfinite(actual).all(), backend
            _close(actual, expected.to(torch.float64), 2e-5)


# ------------------------------------------------------------------- the loss


def _loss_inputs(b, n, k, dtype, device="cpu", classes=4):
    q, keys, gates, _, y, p, ky = _problem(b, n, k, dtype, classes, device)
    temperature = torch.tensor(0.2, dtype=torch.float64, device=device)
    return [t.requires_grad_() for t in (q, keys, gates, temperature)], (y, p, ky)


def _loss_and_grads(backend, leaves, labels, reduction="mean"):
    loss = pyclloss.gated_info_nce(*leaves[:3], *labels, leaves[3], reduction=reduction,
                                   backend=backend)
    # the same weights for every dtype: drawn in float64 under the caller's seed
    weights = torch.randn(loss.shape, dtype=torch.float64).to(loss) if loss.dim() else None
    grads = torch.autograd.grad(loss, leaves, weights)
    return loss, grads


LOSS_BACKENDS = [(b, s) for b in fused_backends("cpu")
                 for s in (TRITON_SHAPES[1:] if b == "triton" else [(2, 2, 5), (70, 600, 33)])]


@pytest.mark.parametrize("backend, shape", LOSS_BACKENDS)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_loss_and_gradients_match_reference(backend, shape, reduction):
    leaves, labels = _loss_inputs(*shape, torch.float32)
    torch.manual_seed(1)
    loss, grads = _loss_and_grads(backend, leaves, labels, reduction)
    leaves64 = [t.detach().double().requires_grad_() for t in leaves]
    torch.manual_seed(1)
    want, want_grads = _loss_and_grads("reference", leaves64, labels, reduction)
    assert loss.dtype == torch.float32
    _close(loss.detach(), want.detach(), 2e-5)
    for got, expected in zip(grads, want_grads):
        _close(got, expected, 2e-5)


def test_reference_is_the_papers_formula():
    """The reference against the authors' form: gated, normalised vectors,
    −log(e^{l_p} / (e^{l_p} + Σ_neg e^{l_n})) per positive pair, mean over pairs."""
    (q, k, g, tau), (y, p, ky) = _loss_inputs(9, 11, 6, torch.float64, classes=3)
    gq = F.normalize(q * g, dim=1)
    gk = F.normalize(torch.einsum("nk,bk->bnk", k, g), dim=2)
    logits = torch.einsum("bk,bnk->bn", gq, gk) / tau
    pos = p[:, None] == ky[None, :]
    neg = ~((y[:, None] == ky[None, :]) | pos)
    neg_sum = (logits.exp() * neg).sum(1, keepdim=True)
    pair = torch.log(logits.exp() + neg_sum) - logits
    want = (pair * pos).sum() / pos.sum()
    got = pyclloss.gated_info_nce(q, k, g, y, p, ky, tau, backend="reference")
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("backend", ["cpp", "reference"])
def test_gradcheck_float64(backend):
    if backend not in fused_backends("cpu") + ["reference"]:
        pytest.skip(f"{backend} not available")
    leaves, labels = _loss_inputs(6, 9, 5, torch.float64)
    fn = lambda q, k, g, t: pyclloss.gated_info_nce(q, k, g, *labels, t, backend=backend)  # noqa: E731
    assert torch.autograd.gradcheck(fn, leaves)


def test_no_positive_pairs_gives_zero_and_finite_gradients():
    for backend in fused_backends("cpu") + ["reference"]:
        leaves, (y, p, ky) = _loss_inputs(4, 5, 3, torch.float32)
        p = torch.full_like(p, 7)  # no key of class 7: no positives anywhere
        loss, grads = _loss_and_grads(backend, leaves, (y, p, ky))
        assert float(loss.detach()) == 0.0
        assert all(torch.equal(gr, torch.zeros_like(gr)) for gr in grads), backend


@pytest.mark.parametrize("backend", ["cpp", "reference"])
def test_opcheck(backend):
    if backend not in fused_backends("cpu") + ["reference"]:
        pytest.skip(f"{backend} not available")
    q, k, g, s, y, p, ky = _problem(5, 7, 4, torch.float64)
    args = (q.requires_grad_(), k.requires_grad_(), g.requires_grad_(), s.requires_grad_(), y, p,
            ky, backend)
    torch.library.opcheck(torch.ops.pyclloss.gated_pair_loss, args)


# ----------------------------------------------------------------- HydraLoss


def test_hydra_loss_combines_info_nce_and_gated_term():
    torch.manual_seed(3)
    b, dim = 12, 8
    module = pyclloss.HydraLoss(num_classes=5, dim=dim, beta=0.5, embed_dim=16, mlp_dim=32)
    q = torch.randn(b, dim, requires_grad=True)
    k = torch.randn(b, dim)
    labels = torch.randint(0, 5, (b,))
    partner = labels[torch.randperm(b)]
    loss = module(q, k, labels, partner_labels=partner)
    gates = module.gates(labels, partner)
    gated = pyclloss.gated_info_nce(q, k, gates, labels, partner, temperature=0.2,
                                    backend="reference")
    contrast = pyclloss.info_nce(q, k, 0.2, backend="reference")
    torch.testing.assert_close(loss, (contrast + 0.5 * gated) / 1.5, rtol=1e-5, atol=1e-6)
    loss.backward()
    assert q.grad is not None and torch.isfinite(q.grad).all()
    assert module.class_embedding.weight.grad.abs().sum() > 0
    assert module.gate_mlp[-1].weight.grad.abs().sum() > 0
    assert ((gates > 0) & (gates < 1)).all()


def test_hydra_loss_draws_partners_from_the_batch():
    torch.manual_seed(4)
    module = pyclloss.HydraLoss(num_classes=3, dim=4, beta=1.0, embed_dim=8, mlp_dim=8)
    q, k = torch.randn(6, 4), torch.randn(6, 4)
    loss = module(q, k, torch.tensor([0, 0, 1, 1, 2, 2]))
    assert torch.isfinite(loss) and loss >= 0


def test_hydra_loss_without_the_gated_term_is_info_nce():
    module = pyclloss.HydraLoss(num_classes=3, dim=4, beta=0.0, embed_dim=8, mlp_dim=8)
    q, k = torch.randn(6, 4), torch.randn(6, 4)
    expected = pyclloss.info_nce(q, k, 0.2, backend="reference")
    torch.testing.assert_close(module(q, k, torch.tensor([0, 0, 1, 1, 2, 2])), expected)


@pytest.mark.parametrize("labels, partners, match", [
    ([0, 1, 3], None, "labels must be class indices"),
    ([0, 1, -1], None, "labels must be class indices"),
    ([0, 1, 2], [0, 5, 1], "partner_labels must be class indices"),
])
def test_hydra_loss_names_bad_class_indices(labels, partners, match):
    module = pyclloss.HydraLoss(num_classes=3, dim=4, embed_dim=8, mlp_dim=8)
    q = torch.randn(3, 4)
    with pytest.raises(ValueError, match=match):
        module(q, q, torch.tensor(labels),
               partner_labels=None if partners is None else torch.tensor(partners))


# ----------------------------------------------------------------- bad input


def _good():
    q, k, g, _, y, p, ky = _problem(4, 5, 3, torch.float32)
    return dict(q=q, k=k, gates=g, labels=y, partner_labels=p, key_labels=ky)


@pytest.mark.parametrize("change, error, match", [
    (dict(q=torch.randn(4)), ValueError, "q must have shape"),
    (dict(k=torch.randn(5, 4)), ValueError, "feature dimension"),
    (dict(k=torch.randn(5, 3, dtype=torch.float64)), TypeError, "dtype"),
    (dict(gates=torch.rand(3, 3)), ValueError, r"gates must have shape \(4, 3\), got \(3, 3\)"),
    (dict(gates=torch.ones(4, 3, dtype=torch.long)), TypeError, "gates must be a floating"),
    (dict(gates=torch.full((4, 3), float("nan"))), ValueError, "gates contains NaN"),
    (dict(labels=torch.zeros(3, dtype=torch.long)), ValueError, "labels must have shape"),
    (dict(partner_labels=torch.zeros(4)), TypeError, "partner_labels must hold integers"),
    (dict(key_labels=torch.zeros(4, dtype=torch.long)), ValueError, "key_labels must have shape"),
    (dict(key_labels=None), ValueError, "key_labels is required"),
    (dict(temperature=0.0), ValueError, "temperature"),
    (dict(reduction="max"), ValueError, "reduction"),
    # not built here (RuntimeError) or not for CPU tensors (ValueError)
    (dict(backend="cuda"), (RuntimeError, ValueError), "backend='cuda'"),
])
def test_bad_input(change, error, match):
    args = {**_good(), **change}
    with pytest.raises(error, match=match):
        pyclloss.gated_info_nce(**args)


# ---------------------------------------------------------------------- GPU


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_gpu_backends_match_reference(dtype):
    assert HAS_CUDA
    for backend in fused_backends("cuda"):
        leaves, labels = _loss_inputs(300, 700, 129, dtype, device="cuda")
        check_against_reference(
            lambda q, k, g, t: pyclloss.gated_info_nce(q, k, g, *labels, t, backend=backend),
            lambda q, k, g, t: pyclloss.gated_info_nce(q, k, g, *labels, t, backend="reference"),
            leaves, dtype, f"{backend} {dtype}")
