"""AMCL on the fused kernels: every backend against the float64 dense reference
(values and gradients to z1, z2 and the temperature network's parameters,
fp64/fp32/fp16/bf16, odd sizes, all negatives, ties), the top-k selection
itself, weights and reductions, float64 gradcheck, the custom-op contract,
torch.compile and bad input. The reference itself is tested against the
authors' code in tests/test_pair_quality.py."""

import copy

import pytest
import torch
from helpers import assert_close_rel, fused_backends, skip_unfaithful
from torch import nn

import pyclloss
from pyclloss.ops import amcl as ops
from pyclloss.reference import pair_quality as ref

CPU_BACKENDS = fused_backends("cpu")
# The Triton interpreter is slow: small sizes only (B samples per view).
SIZES = {"cpp": (2, 3, 17, 33), "triton": (5,)}
HAS_CPP = "cpp" in CPU_BACKENDS
# τ_min away from 0 and a larger β: the τ terms weigh in the loss and its gradients.
HYPER = dict(tau_min=0.05, tau_max=2.0, beta=0.2)


# AMCL's stated precision against float64 per input dtype (its temperature
# network runs in float32 below float64, so the rounding rule of helpers does not apply)
TOL = {torch.float64: 1e-9, torch.float32: 1e-5, torch.float16: 1e-2, torch.bfloat16: 2e-2}


def make_net(dim, hidden=7):
    return nn.Sequential(nn.Linear(dim, hidden), nn.ReLU(), nn.Linear(hidden, dim))



def _pair(x):
    return x[0], x[1]


def check_against_reference(backend, z, net, dtype, what, views=_pair, weights=None,
                            reduction="mean", **hyper):
    """Loss and gradients (z, φ's parameters) of ``backend`` on ``z`` in ``dtype``
    (φ in the statistics dtype) against the float64 reference on the same
    values; ``views(z)`` gives (z1, z2)."""
    net_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    fused_net, ref_net = copy.deepcopy(net).to(net_dtype), copy.deepcopy(net).double()
    fused_z = z.to(dtype).detach().requires_grad_()
    ref_z = fused_z.detach().double().requires_grad_()
    hyper = {**HYPER, **hyper}
    out = pyclloss.amcl_loss(*views(fused_z), fused_net, weights=weights, reduction=reduction,
                             backend=backend, **hyper)
    expected = ref.amcl_loss(*views(ref_z), ref_net, weights=weights, reduction=reduction,
                             **hyper)
    tol = TOL[dtype]  # φ and the selection run in float32 below float64
    assert_close_rel(out, expected, tol, f"{what} value")
    probe = torch.randn_like(expected)
    (out.double() * probe).sum().backward()
    (expected * probe).sum().backward()
    assert_close_rel(fused_z.grad, ref_z.grad, tol, f"{what} grad of z1, z2")
    for (name, p), q in zip(fused_net.named_parameters(), ref_net.parameters()):
        assert_close_rel(p.grad, q.grad, tol, f"{what} grad of {name}")


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("topk", [3, 1000])
def test_backend_matches_reference(backend, dtype, topk):
    # topk = 1000 >= 2B − 2: every negative is selected
    skip_unfaithful(backend, dtype)
    for b in SIZES[backend]:
        check_against_reference(backend, torch.randn(2, b, 2, 6), make_net(6), dtype,
                                f"{backend} B={b} k={topk}", topk=topk)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_default_hyper_parameters_and_wide_network(backend):
    # τ_min = 1e-5, β = 0.01, k = 100 > 2B − 2 for the small B, and φ wider than D
    b = SIZES[backend][-1]
    check_against_reference(backend, torch.randn(2, b, 3, 5), make_net(5, 24), torch.float32,
                            backend,
                            tau_min=1e-5, beta=0.01, topk=100)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("case", ["duplicates", "all_equal"])
def test_ties(backend, case):
    # Exactly equal similarities around the k-th place: equal rows have equal
    # φ, so every choice among them gives the same loss, and the same gradient
    # to the rows they are copies of (not to each copy).
    b = SIZES[backend][-1]
    distinct = 3 if case == "duplicates" else 1
    rows = torch.arange(b) % distinct

    def views(base):
        return base[rows], base[(rows + 1) % distinct]

    check_against_reference(backend, torch.randn(distinct, 2, 4), make_net(4), torch.float32,
                            f"{backend} {case}", views, topk=4)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_weights_and_reductions(backend, reduction):
    if backend == "triton" and reduction != "none":
        pytest.skip("the Triton interpreter is slow: the per-sample losses cover its part")
    b = SIZES[backend][-1]
    check_against_reference(backend, torch.randn(2, b, 2, 5), make_net(5), torch.float32,
                            f"{backend} {reduction}", weights=torch.rand(b), reduction=reduction,
                            topk=4)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_topk_selects_the_most_similar_negatives(backend):
    # k columns of largest s, neither the row nor its positive, ties (the
    # duplicated rows) to the lower column; in no particular order.
    n, k = 2 * SIZES[backend][-1], 5
    z = nn.functional.normalize(torch.randn(n // 2, 4), dim=1).repeat(2, 1)[torch.randperm(n)]
    idx = ops.amcl_topk(z, k, backend)
    s = (z.double() @ z.double().T)
    rows = torch.arange(n)
    s[rows, rows] = s[rows, (rows + n // 2) % n] = float("-inf")
    # a stable sort of −s keeps equal similarities in column order
    expected = torch.sort(-s, dim=1, stable=True).indices[:, :k]
    assert torch.equal(idx.sort(dim=1).values, expected.sort(dim=1).values)


@pytest.mark.skipif(not HAS_CPP, reason="C++ extension not built")
def test_topk_of_long_rows():
    # n > 8k: the C++ scan starts from a bar estimated on a sample of the row.
    # Small integer features: every s is exact in any summation order, and
    # ties are everywhere (and duplicated rows).
    k = 6
    for z in (torch.randint(-3, 4, (200, 8)), torch.randint(-2, 3, (20, 8)).repeat(10, 1),
              torch.randint(0, 2, (300, 3))):
        z = z.float()
        n = z.shape[0]
        s = z.double() @ z.double().T
        rows = torch.arange(n)
        s[rows, rows] = s[rows, (rows + n // 2) % n] = float("-inf")
        expected = torch.sort(-s, dim=1, stable=True).indices[:, :k]
        idx = ops.amcl_topk(z, k, "cpp")
        assert torch.equal(idx.sort(dim=1).values, expected.sort(dim=1).values)


def test_module_equals_function():
    module = pyclloss.AMCLLoss(4, num_heads=2, topk=3, hidden=6, backend="reference")
    z1, z2, w = torch.randn(5, 2, 4), torch.randn(5, 2, 4), torch.rand(5)
    expected = pyclloss.amcl_loss(z1, z2, module.temperature_net, topk=3, weights=w,
                                  backend="reference")
    assert_close_rel(module(z1, z2, w), expected, 0, "module")
    assert [m.__class__ for m in module.temperature_net] == [nn.Linear, nn.ReLU, nn.Linear]
    assert module.temperature_net[0].out_features == 6


# ------------------------------------------------------------- the op contract


@pytest.mark.skipif(not HAS_CPP, reason="C++ extension not built")
def test_gradcheck_float64():
    z1 = torch.randn(4, 2, 3, dtype=torch.float64, requires_grad=True)
    z2 = torch.randn(4, 2, 3, dtype=torch.float64, requires_grad=True)
    w = torch.randn(3, 5, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(
        lambda z1, z2, w: pyclloss.amcl_loss(z1, z2, lambda x: torch.tanh(x @ w), topk=3,
                                             reduction="none", backend="cpp", **HYPER),
        (z1, z2, w))


@pytest.mark.skipif(not HAS_CPP, reason="C++ extension not built")
def test_opcheck():
    z = nn.functional.normalize(torch.randn(10, 4), dim=1)
    phi = torch.randn(10, 3)
    torch.library.opcheck(ops.amcl_topk, (z, 3, "cpp"))
    idx = ops.amcl_topk(z, 3, "cpp")
    torch.library.opcheck(ops.amcl_rows, (z.clone().requires_grad_(), phi.requires_grad_(), idx,
                                          0.05, 2.0, 0.2, "cpp"))
    torch.library.opcheck(ops.amcl_rows_backward, (z, phi.detach(), idx, torch.randn(10), 0.05,
                                                   2.0, 0.2, "cpp"))
    outside = idx.clone()
    outside[3, 1] = 10
    with pytest.raises(RuntimeError, match="idx must hold row indices in \\[0, 10\\)"):
        ops.amcl_rows(z, phi.detach(), outside, 0.05, 2.0, 0.2, "cpp")


@pytest.mark.skipif(not HAS_CPP, reason="C++ extension not built")
def test_torch_compile_has_no_graph_break():
    module = pyclloss.AMCLLoss(4, num_heads=2, topk=3, backend="cpp")
    compiled = torch.compile(module, fullgraph=True, dynamic=True, backend="aot_eager")
    z1, z2 = torch.randn(6, 2, 4, requires_grad=True), torch.randn(6, 2, 4)
    loss = compiled(z1, z2)
    loss.backward()
    expected = ref.amcl_loss(z1.detach().double(), z2.double(),
                             copy.deepcopy(module.temperature_net).double(), topk=3)
    assert_close_rel(loss, expected, 1e-5, "compiled")
    assert torch.isfinite(z1.grad).all()


# ------------------------------------------------------------------- bad input


def _wrong_width(x):
    return x[:, :1].repeat(1, 2)[:-1]


@pytest.mark.parametrize("change, error, words", [
    (dict(z1=torch.randn(4, 6)), ValueError, "z1 must have shape"),
    (dict(z1=torch.randn(1, 2, 3), z2=torch.randn(1, 2, 3)), ValueError,
     "z1 needs at least 2 rows"),
    (dict(z2=torch.randn(4, 3, 3)), ValueError, "z2 must have z1's shape"),
    (dict(z2=torch.randn(4, 2, 3).double()), TypeError, "z2 has dtype"),
    (dict(z1=torch.full((4, 2, 3), float("nan"))), ValueError, "z1 contains NaN"),
    (dict(temperature_net=3), TypeError, "temperature_net must be callable"),
    (dict(temperature_net=_wrong_width), ValueError, "temperature_net must map"),
    (dict(tau_min=0.0), ValueError, "tau_min must be > 0"),
    (dict(tau_min=-1.0), ValueError, "tau_min must be finite"),
    (dict(tau_max=1e-6), ValueError, "tau_max must be finite and in"),
    (dict(beta=float("inf")), ValueError, "beta must be finite"),
    (dict(topk=0), ValueError, "topk must be >= 1"),
    (dict(topk=2.5), TypeError, "topk must be an int"),
    (dict(weights=torch.ones(3)), ValueError, "weights must have shape (4,)"),
    (dict(reduction="batch"), ValueError, "reduction must be one of"),
    (dict(backend="gpu"), ValueError, "backend must be one of"),
    (dict(gather_distributed="yes"), TypeError, "gather_distributed must be a bool"),
])
def test_bad_input(change, error, words):
    args = dict(z1=torch.randn(4, 2, 3), z2=torch.randn(4, 2, 3), temperature_net=make_net(3))
    args.update(change)
    with pytest.raises(error) as info:
        pyclloss.amcl_loss(**args)
    assert words in str(info.value)


def test_without_a_process_group_it_is_one_process():
    z1, z2, net = torch.randn(5, 2, 3), torch.randn(5, 2, 3), make_net(3)
    assert_close_rel(pyclloss.amcl_loss(z1, z2, net, gather_distributed=True),
                     pyclloss.amcl_loss(z1, z2, net), 0, "one process")


def test_module_bad_input():
    with pytest.raises(ValueError, match="z1 must have shape \\(B, 2, 4\\)"):
        pyclloss.AMCLLoss(4, num_heads=2)(torch.randn(3, 3, 4), torch.randn(3, 3, 4))
    with pytest.raises(ValueError, match="tau_max must be"):
        pyclloss.AMCLLoss(4, tau_min=1.0, tau_max=0.5)


# ------------------------------------------------------------------ distributed

DISTRIBUTED_SIZES = (5, 4)  # local batch sizes of the two ranks


def _distributed_case(seed):
    """The global batch (every rank makes the same) and its temperature network."""
    gen = torch.Generator().manual_seed(seed)
    total = sum(DISTRIBUTED_SIZES)
    z1, z2 = (torch.randn(total, 2, 4, generator=gen, dtype=torch.float64) for _ in range(2))
    torch.manual_seed(seed)
    return z1, z2, torch.rand(total, generator=gen, dtype=torch.float64), make_net(4).double()


def _amcl_rank(rank, device, seed):
    """One rank: its rows of the global batch, the loss over the group, the gradients."""
    z1, z2, weights, net = _distributed_case(seed)
    start = sum(DISTRIBUTED_SIZES[:rank])
    rows = slice(start, start + DISTRIBUTED_SIZES[rank])
    results = {}
    for reduction in ("mean", "none"):
        local = [z[rows].clone().requires_grad_() for z in (z1, z2)]
        local_net = copy.deepcopy(net)
        loss = pyclloss.amcl_loss(*local, local_net, topk=5, weights=weights[rows],
                                  reduction=reduction, backend="cpp", gather_distributed=True,
                                  **HYPER)
        loss.sum().backward()
        results[reduction] = (loss.detach(), [x.grad for x in local],
                              [p.grad for p in local_net.parameters()])
    return results


@pytest.mark.skipif(not HAS_CPP, reason="C++ extension not built")
def test_gloo_world_of_two_is_the_global_batch(tmp_path):
    # DDP's convention: each rank's rows get W·∂L/∂z, the parameters ∂L/∂θ of
    # the value it returns (DDP averages them); with "none" each rank gets its
    # own samples' losses and the gradients of their sum over the ranks.
    from helpers import spawn_ranks

    seed, world = 7, len(DISTRIBUTED_SIZES)
    per_rank = spawn_ranks(world, str(tmp_path), _amcl_rank, seed)
    z1, z2, weights, net = _distributed_case(seed)
    for reduction in ("mean", "none"):
        views = [z.clone().requires_grad_() for z in (z1, z2)]
        global_net = copy.deepcopy(net)
        expected = ref.amcl_loss(*views, global_net, topk=5, weights=weights,
                                 reduction=reduction, **HYPER)
        expected.sum().backward()
        start = 0
        for rank, results in enumerate(per_rank):
            value, grads, net_grads = results[reduction]
            rows = slice(start, start + DISTRIBUTED_SIZES[rank])
            start = rows.stop
            scale = world if reduction == "mean" else 1
            what = f"rank {rank} {reduction}"
            assert_close_rel(value, expected if reduction == "mean" else expected[rows], 1e-9,
                             f"{what} value")
            for grad, view in zip(grads, views):
                assert_close_rel(grad, scale * view.grad[rows], 1e-9, f"{what} grad")
            if reduction == "mean":
                for grad, p in zip(net_grads, global_net.parameters()):
                    assert_close_rel(grad, p.grad, 1e-9, f"{what} network grad")
        if reduction == "none":
            # the parameters' gradients over the ranks add up to the global batch's
            for p, *grads in zip(global_net.parameters(), *(r["none"][2] for r in per_rank)):
                assert_close_rel(sum(grads), p.grad, 1e-9, "network grads over ranks")
