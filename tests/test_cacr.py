"""CACR: the fused repulsion kernels (cpp, Triton) and pyclloss.cacr_loss against
the float64 reference on fresh random inputs (values and gradients, every
dtype, odd sizes, 2 and 3 views, near-duplicate rows and rows far from the
origin, weights, reductions), float64 gradcheck, the custom-op contract,
torch.compile, bad input, two gloo ranks against the global batch, and the
trainer's ``--loss cacr``. The
reference itself is checked against the authors' code in test_pair_quality."""

import json
import math

import pytest
import torch
from helpers import (assert_close_rel, check_against_reference, fused_backends, skip_unfaithful,
                     spawn_ranks)

import pyclloss
from pyclloss.ops import cacr as ops
from pyclloss.reference import cacr as ref

CPU_BACKENDS = fused_backends("cpu")
# Odd sizes over several tiles of each kernel (cpp: 64 x 256; Triton: 32 x 32,
# the interpreter is slow).
SIZES = {"cpp": (2, 3, 70, 301), "triton": (3, 37)}
GRADCHECK_BACKENDS = [b for b in ("reference", "cpp") if pyclloss.backends()[b].available]
CPP = pytest.mark.skipif("cpp" not in CPU_BACKENDS, reason="C++ extension not built")
KW = dict(attraction_temperature=0.7, repulsion_temperature=1.6, alpha=0.8, beta=1.3)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("views", [2, 3])
def test_backend_matches_reference(backend, dtype, views):
    skip_unfaithful(backend, dtype)
    for b in SIZES[backend]:
        zs = [torch.randn(b, 19) for _ in range(views)]
        check_against_reference(lambda *z: pyclloss.cacr_loss(*z, **KW, backend=backend),
                                lambda *z: ref.cacr_loss(*z, **KW), zs, dtype,
                                f"{backend} B={b} V={views}")


def _repulsion_term_sizes(anchors, others, coef):
    """Sizes of the terms the repulsion's gradients add: the kernels form
    sum_j G_ij (a_i - b_j) as (sum_j G_ij) a_i - sum_j G_ij b_j, whose terms are
    |G||a| and |G||b| (larger than the result for rows off the sphere)."""
    a, b = anchors.double(), others.double()
    tau = KW["repulsion_temperature"]
    mean, lse = ref.cacr_repulsion_fwd(a, b, tau, 0)
    g = ref.repulsion_coefficients(a, b, mean, lse, coef, tau, 0).abs()
    return {0: 2 * (g.sum(1)[:, None] * a.abs() + g @ b.abs()).max().item(),
            1: 2 * (g.sum(0)[:, None] * b.abs() + g.T @ a.abs()).max().item()}


def _loss_term_sizes(zs, normalize, per_sample):
    """Sizes of the terms the loss adds, per sample: α·attraction and −β·repulsion,
    weighted as the reduction weighs the samples."""
    z = torch.stack(zs).double()
    if normalize:
        z = torch.nn.functional.normalize(z, dim=-1)
    attraction = ref.attraction(z, KW["attraction_temperature"]).abs()
    repulsion = ref.cacr_repulsion_fwd(z[0], z[1], KW["repulsion_temperature"], 0)[0].abs()
    return per_sample * (KW["alpha"] * attraction + KW["beta"] * repulsion)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_weights_reductions_and_unnormalized(backend, reduction):
    b = SIZES[backend][-1]
    zs = [torch.randn(b, 6) for _ in range(2)]
    w = torch.rand(b)
    per_sample = {"mean": w / w.sum(), "sum": w, "none": torch.ones(b)}[reduction].double()
    for normalize in (True, False):
        kw = dict(KW, normalize=normalize, weights=w, reduction=reduction)
        # Unit rows: the default magnitudes; rows off the sphere: the terms' sizes.
        sizes = None if normalize else (
            lambda probe: _repulsion_term_sizes(*zs, KW["beta"] * per_sample * probe.abs().cpu()))
        # a sum over samples: its terms, not the sum, set the round-off
        terms = _loss_term_sizes(zs, normalize, per_sample)
        terms = (terms.max() if reduction == "none" else terms.sum()).item()
        check_against_reference(lambda *z: pyclloss.cacr_loss(*z, **kw, backend=backend),
                                lambda *z: ref.cacr_loss(*z, **kw), zs, torch.float32,
                                f"{backend} {reduction} normalize={normalize}", sizes, terms)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("offset", [0, 5, 11])
def test_kernels_with_an_offset(backend, offset):
    # anchors paired with rows [offset, offset + n) of the others: the
    # distributed layout (local anchors against every rank's rows)
    a, b = torch.randn(SIZES[backend][-1] - 11, 9), torch.randn(SIZES[backend][-1], 9)
    grad = torch.randn(a.shape[0])
    mean, lse = ops.cacr_repulsion(a, b, 1.4, offset, backend)
    exact_mean, exact_lse = ref.cacr_repulsion_fwd(a.double(), b.double(), 1.4, offset)
    assert_close_rel(mean, exact_mean, 1e-5, "mean")
    assert_close_rel(lse, exact_lse, 1e-5, "lse")
    grads = ops.cacr_repulsion_backward(a, b, mean, lse, grad, 1.4, offset, backend)
    exact = ref.cacr_repulsion_bwd(a.double(), b.double(), exact_mean, exact_lse, grad.double(),
                                   1.4, offset)
    for actual, expected, name in zip(grads, exact, ("anchors", "others")):
        assert_close_rel(actual, expected, 1e-5, f"grad {name}")


def test_reference_backward_kernel_is_the_autograd_derivative():
    a = torch.randn(9, 4, dtype=torch.float64, requires_grad=True)
    b = torch.randn(14, 4, dtype=torch.float64, requires_grad=True)
    grad = torch.randn(9, dtype=torch.float64)
    mean, lse = ref.cacr_repulsion_fwd(a, b, 0.8, 3)
    expected = torch.autograd.grad(mean, (a, b), grad)
    actual = ref.cacr_repulsion_bwd(a.detach(), b.detach(), mean.detach(), lse.detach(), grad,
                                    0.8, 3)
    for x, y in zip(actual, expected):
        assert_close_rel(x, y, 1e-12, "reference backward")


def _hard_rows(case, b, dim=24):
    """Rows whose distances the GEMM form |a|² + |b|² − 2a·b loses in float32."""
    if case == "far_from_origin":
        return [300 + torch.randn(b, dim) for _ in range(2)]
    rows = torch.randn(b, dim)
    return [rows, rows + 1e-3 * torch.randn_like(rows)]


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("case", ["far_from_origin", "near_duplicates"])
@pytest.mark.parametrize("normalize", [True, False])
def test_float32_small_distances_are_exact(backend, case, normalize):
    # The same float32 values in float64 are the truth: the fused float32
    # loss and gradients stay within 5e-5 of it (the float32 reference's own
    # error is about 1e-5). Sharp weights (τ⁻ = 50 after normalisation) make
    # the loss depend on the small distances.
    zs = _hard_rows(case, SIZES[backend][-1])
    kw = dict(repulsion_temperature=50.0 if normalize else 1.0, normalize=normalize)
    exact = [z.double().requires_grad_() for z in zs]
    expected = ref.cacr_loss(*exact, **kw)
    expected.backward()
    fused = [z.clone().requires_grad_() for z in zs]
    actual = pyclloss.cacr_loss(*fused, **kw, backend=backend)
    actual.backward()
    assert_close_rel(actual, expected, 5e-5, "value")
    for f, e in zip(fused, exact):
        err = (f.grad.double() - e.grad).abs().max()
        assert err <= 5e-5 * e.grad.abs().max(), f"gradient error {err:.2e}"


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_extreme_temperatures_and_equal_rows(backend):
    # τ⁻ = 0 (uniform weights) and a sharp τ⁻; at τ⁻ = 1e4 the weights magnify a
    # float32 rounding δ of d by τ⁻·δ (about 1e-3 here), which bounds any float32
    # kernel: finite, and the reference's value within that. A batch of equal rows
    # (every distance 0) gives 0 and a finite gradient.
    b = SIZES[backend][-1]
    zs = [torch.randn(b, 5) for _ in range(2)]
    for tau in (0.0, 30.0):
        check_against_reference(
            lambda *z: pyclloss.cacr_loss(*z, repulsion_temperature=tau, backend=backend),
            lambda *z: ref.cacr_loss(*z, repulsion_temperature=tau), zs, torch.float32,
            f"{backend} tau={tau}")
    fused = [z.clone().requires_grad_() for z in zs]
    loss = pyclloss.cacr_loss(*fused, repulsion_temperature=1e4, backend=backend)
    loss.backward()
    assert_close_rel(loss, ref.cacr_loss(*[z.double() for z in zs], repulsion_temperature=1e4),
                     1e-3, "tau=1e4")
    assert all(torch.isfinite(z.grad).all() for z in fused)
    same = torch.ones(b, 5, requires_grad=True)
    loss = pyclloss.cacr_loss(same, same, backend=backend)
    loss.backward()
    assert loss.item() == 0 and torch.isfinite(same.grad).all()


def test_module_equals_function():
    zs = [torch.randn(6, 4) for _ in range(3)]
    w = torch.rand(6)
    assert_close_rel(pyclloss.CACRLoss(**KW, backend="reference")(*zs, weights=w),
                     pyclloss.cacr_loss(*zs, **KW, weights=w, backend="reference"), 0, "module")


# ------------------------------------------------------------- the op contract


@pytest.mark.parametrize("backend", GRADCHECK_BACKENDS)
def test_gradcheck_float64(backend):
    zs = [torch.randn(7, 3, dtype=torch.float64, requires_grad=True) for _ in range(3)]
    assert torch.autograd.gradcheck(
        lambda *z: pyclloss.cacr_loss(*z, **KW, reduction="none", backend=backend), zs)


@CPP
def test_opcheck():
    a, b = torch.randn(9, 5), torch.randn(13, 5)
    torch.library.opcheck(ops.cacr_repulsion, (a.requires_grad_(True), b.requires_grad_(True),
                                               1.3, 2, "cpp"))
    mean, lse = ops.cacr_repulsion(a.detach(), b.detach(), 1.3, 2, "cpp")
    torch.library.opcheck(ops.cacr_repulsion_backward,
                          (a.detach(), b.detach(), mean, lse, torch.randn(9), 1.3, 2, "cpp"))


@CPP
def test_cpp_results_do_not_depend_on_the_thread_count():
    a, b = torch.randn(150, 33), torch.randn(300, 33)
    grad = torch.randn(150)
    threads = torch.get_num_threads()
    results = []
    try:
        for count in (1, 2):
            torch.set_num_threads(count)
            mean, lse = ops.cacr_repulsion(a, b, 0.9, 7, "cpp")
            results.append((mean, lse, *ops.cacr_repulsion_backward(a, b, mean, lse, grad, 0.9, 7,
                                                                    "cpp")))
    finally:
        torch.set_num_threads(threads)
    for one, two in zip(*results):
        assert torch.equal(one, two)


@CPP
def test_torch_compile_has_no_graph_break():
    compiled = torch.compile(pyclloss.CACRLoss(**KW, backend="cpp"), fullgraph=True,
                             dynamic=True, backend="aot_eager")
    for b in (9, 12):
        zs = [torch.randn(b, 4, requires_grad=True) for _ in range(3)]
        loss = compiled(*zs)
        loss.backward()
        exact = [z.detach().double().requires_grad_() for z in zs]
        expected = ref.cacr_loss(*exact, **KW)
        expected.backward()
        assert_close_rel(loss, expected, 1e-5, "compiled")
        for z, e in zip(zs, exact):
            assert_close_rel(z.grad, e.grad, 1e-5, "compiled grad")


# ------------------------------------------------------------------- bad input


@pytest.mark.parametrize("change, error, words", [
    (dict(z1=torch.randn(1, 4), z2=torch.randn(1, 4)), ValueError, "at least 2 samples"),
    (dict(z1=torch.randn(5)), ValueError, "z1 must have shape"),
    (dict(z2=torch.randn(6, 4)), ValueError, "z2 has 6 rows but z1 has 5"),
    (dict(z2=torch.randn(5, 3)), ValueError, "z2 has feature dimension 3"),
    (dict(z2=torch.randn(5, 4).double()), TypeError, "z2 has dtype"),
    (dict(z1=torch.randint(0, 3, (5, 4))), TypeError, "z1 must be float16"),
    (dict(z2=torch.full((5, 4), float("nan"))), ValueError, "z2 contains NaN"),
    (dict(repulsion_temperature=-1.0), ValueError, "repulsion_temperature must be >= 0"),
    (dict(attraction_temperature=float("inf")), ValueError, "attraction_temperature must be"),
    (dict(beta=float("nan")), ValueError, "beta must be finite"),
    (dict(alpha="1"), TypeError, "alpha must be a number"),
    (dict(alpha=torch.tensor(1.0, requires_grad=True)), ValueError, "alpha must be a fixed"),
    (dict(normalize=1), TypeError, "normalize must be a bool"),
    (dict(weights=torch.rand(4)), ValueError, "weights must have shape (5,)"),
    (dict(weights=-torch.rand(5)), ValueError, "weights must be finite and >= 0"),
    (dict(reduction="batch"), ValueError, "reduction must be one of"),
    (dict(backend="gpu"), ValueError, "backend must be one of"),
    (dict(gather_distributed="yes"), TypeError, "gather_distributed must be a bool"),
])
def test_bad_input(change, error, words):
    args = dict(z1=torch.randn(5, 4), z2=torch.randn(5, 4))
    args.update(change)
    with pytest.raises(error) as info:
        pyclloss.cacr_loss(**args)
    assert words in str(info.value)


# ----------------------------------------------------------------- distributed

DIST_SIZES = (5, 7)


def _views(seed):
    gen = torch.Generator().manual_seed(seed)
    n = sum(DIST_SIZES)
    return [torch.randn(n, 8, generator=gen) for _ in range(3)], torch.rand(n, generator=gen)


DIST_BACKENDS = [b for b in ("cpp", "reference") if b in CPU_BACKENDS or b == "reference"]


def _distributed_body(rank, device, seed):
    zs, w = _views(seed)
    start = sum(DIST_SIZES[:rank])
    results = {}
    for backend in DIST_BACKENDS:
        local = [z[start:start + DIST_SIZES[rank]].clone().requires_grad_() for z in zs]
        loss = pyclloss.cacr_loss(*local, **KW, weights=w[start:start + DIST_SIZES[rank]],
                                  backend=backend, gather_distributed=True)
        loss.backward()
        results[backend] = loss.detach(), [z.grad for z in local]
    return results


def test_two_ranks_match_the_global_batch(tmp_path):
    # one spawn for every backend (starting the ranks costs seconds)
    seed = int(torch.randint(0, 2**31, ()))
    per_rank = spawn_ranks(2, str(tmp_path), _distributed_body, seed)
    zs, w = _views(seed)
    zs = [z.clone().requires_grad_() for z in zs]
    expected = pyclloss.cacr_loss(*zs, **KW, weights=w, backend="reference")
    expected.backward()
    for rank, results in enumerate(per_rank):
        start = sum(DIST_SIZES[:rank])
        for backend in DIST_BACKENDS:
            loss, grads = results[backend]
            assert_close_rel(loss, expected, 1e-5, f"{backend} rank {rank} loss")
            for z, g in zip(zs, grads):
                # gradients of the sum over ranks of the (equal) returned losses
                assert_close_rel(g, 2 * z.grad[start:start + DIST_SIZES[rank]], 1e-5,
                                 f"{backend} rank {rank} grad")


# --------------------------------------------------------------------- trainer


def test_trainer_learns_with_cacr_on_the_default_data(tmp_path, monkeypatch):
    from pyclloss.tools.train import main

    monkeypatch.chdir(tmp_path)
    summary_path = tmp_path / "summary.json"
    assert main(["--loss", "cacr", "--epochs", "2", "--batch-size", "128", "--width", "8",
                 "--threads", "1", "--quiet", "--summary", str(summary_path)]) == 0
    summary = json.loads(summary_path.read_text())
    losses = summary["epoch_losses"]
    assert len(losses) == 2 and all(math.isfinite(v) for v in losses)
    assert losses[1] < losses[0]  # the loss goes down
    for metric in ("knn_accuracy", "linear_probe_accuracy"):
        assert 0.3 < summary["evaluation"]["final"][metric] <= 1.0  # 10 classes: chance 0.1
