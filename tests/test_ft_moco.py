"""Feature-transformation MoCo: every fused backend against the formulas of
pyclloss.reference.ft_moco (values and gradients of q and the temperature) on
fresh random inputs at odd sizes, every form of the mixing coefficients, the
custom-op contract (gradcheck, opcheck), the module, and bad input."""

import pytest
import torch
import torch.nn.functional as F

import pyclloss
from pyclloss._stats import stats_dtype
from pyclloss.ops import ft_moco as ops
from pyclloss.reference import ft_moco as ref
from pyclloss.reference import info_nce as ref_info_nce

from helpers import assert_close_rel, check_against_reference, check_outputs, fused_backends

CPU_BACKENDS = fused_backends("cpu")
# (N, K): the Triton interpreter is slow and gets small sizes only.
SIZES = {"cpp": [(1, 3), (2, 5), (37, 300), (130, 517)], "triton": [(2, 5), (19, 45)]}
DIM = 24


def _lam_pos(form, n, d):
    if form == "scalar":
        return 1 + torch.rand(()).item()
    return 1 + torch.rand(n) if form == "row" else 1 + torch.rand(n, d)


def _lam_neg(form, size):
    return torch.rand(()).item() if form == "scalar" else torch.rand(size)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("lam_pos_form,lam_neg_form",
                         [("scalar", "scalar"), ("row", "row"), ("element", "scalar")])
def test_matches_reference(backend, dtype, lam_pos_form, lam_neg_form):
    if backend == "triton" and dtype == torch.bfloat16:
        pytest.skip("the Triton interpreter computes bf16 tl.dot wrongly")
    for n, size in SIZES[backend]:
        q, k, queue = torch.randn(n, DIM), torch.randn(n, DIM), torch.randn(size, DIM)
        lam_pos, lam_neg = _lam_pos(lam_pos_form, n, DIM), _lam_neg(lam_neg_form, size)
        perm = torch.randperm(size)
        temp = torch.tensor(0.2)
        check_against_reference(
            lambda q, k, queue, t: pyclloss.ft_moco_loss(q, k, queue, lam_pos, lam_neg, perm, t,
                                                         backend=backend),
            lambda q, k, queue, t: ref.ft_moco_loss(q, k, queue, torch.as_tensor(lam_pos),
                                                    torch.as_tensor(lam_neg), perm, t),
            [q, k, queue, temp], dtype, f"ft_moco N={n} K={size}")


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("reduction", ["sum", "none"])
def test_unnormalized_and_normalize_mixed(backend, reduction):
    n, size = SIZES[backend][-1]
    q, k, queue = torch.randn(n, DIM) / 4, torch.randn(n, DIM) / 4, torch.randn(size, DIM) / 4
    perm, lam_neg = torch.randperm(size), torch.rand(size)
    for normalize, normalize_mixed in ((False, False), (True, True)):
        kwargs = dict(normalize=normalize, normalize_mixed=normalize_mixed)
        check_against_reference(
            lambda q: pyclloss.ft_moco_loss(q, k, queue, 1.5, lam_neg, perm, 0.1,
                                            reduction=reduction, backend=backend, **kwargs),
            lambda q: ref.ft_moco_loss(q, k.double(), queue.double(), torch.tensor(1.5), lam_neg,
                                       perm, 0.1, reduction=reduction, **kwargs),
            [q], torch.float32, f"ft_moco {kwargs}")


@pytest.mark.parametrize("backend", ["reference"] + CPU_BACKENDS)
def test_no_transformation_is_moco(backend):
    """λ_p = λ_n = 1 leaves q, k and the queue as they are: MoCo's InfoNCE, each
    query against its own key and the queue."""
    n, size = SIZES.get(backend, SIZES["cpp"])[-1]
    q, k, queue = torch.randn(n, DIM), torch.randn(n, DIM), torch.randn(size, DIM)
    loss = pyclloss.ft_moco_loss(q, k, queue, 1.0, 1.0, torch.randperm(size), 0.2,
                                 backend=backend)
    check_outputs(loss, lambda q, k, queue: torch.stack([
        ref_info_nce.info_nce(q[i:i + 1], k[i:i + 1], 0.2, queue=queue) for i in range(n)]).mean(),
        [q, k, queue], "λ = 1")


@pytest.mark.parametrize("backend", ["reference"] + CPU_BACKENDS)
def test_gradient_reaches_q_through_both_mixed_views(backend):
    """The key is detached before mixing: k gets no gradient, q gets one through
    k̂ = λk + (1−λ)q as well (the positive logit's derivative by q is
    (λ·k̂ + (1−λ)·q̂)/τ, not λ·k̂/τ)."""
    dtype = torch.float32 if backend == "triton" else torch.float64  # no float64 in Triton
    q = torch.randn(1, DIM, dtype=dtype, requires_grad=True)
    k = torch.randn(1, DIM, dtype=dtype, requires_grad=True)
    queue = torch.randn(3, DIM, dtype=dtype)
    lam, tau = 1.5, 0.5
    loss = pyclloss.ft_moco_loss(q, k, queue, lam, 1.0, torch.arange(3), tau, normalize=False,
                                 reduction="sum", backend=backend)
    loss.backward()
    assert k.grad is None

    def expected(q, k, queue):
        q_hat, k_hat = lam * q + (1 - lam) * k, lam * k + (1 - lam) * q
        logits = torch.cat([(q_hat * k_hat).sum(1, keepdim=True), q_hat @ queue.T], 1) / tau
        prob = torch.softmax(logits, 1)[0]
        d_pos = (lam * k_hat + (1 - lam) * q_hat) / tau
        d_neg = prob[1:] @ queue * lam / tau
        return (prob[0] - 1) * d_pos + d_neg

    check_outputs(q.grad, expected, [q, k, queue], "dL/dq")


GRADCHECK_BACKENDS = [b for b in ("reference", "cpp") if pyclloss.backends()[b].available]


def _op_inputs(dtype, n=7, size=11):
    q_hat = torch.randn(n, DIM, dtype=dtype, requires_grad=True)
    queue = torch.randn(size, DIM, dtype=dtype)
    scale = torch.tensor(3.0, dtype=stats_dtype(dtype), requires_grad=True)
    perm = torch.randperm(size)
    weights = ops.interpolation_weights(queue, torch.rand(size), perm, normalize=True)
    return q_hat, queue, weights, perm, scale


@pytest.mark.parametrize("backend", GRADCHECK_BACKENDS)
def test_gradcheck_float64(backend):
    q_hat, queue, weights, perm, scale = _op_inputs(torch.float64)
    assert torch.autograd.gradcheck(
        lambda q, s: ops.negatives_lse(q, queue, *weights, perm, s, backend), (q_hat, scale))
    q, k = torch.randn(5, DIM, dtype=torch.float64, requires_grad=True), torch.randn(5, DIM)
    tau = torch.tensor(0.3, dtype=torch.float64, requires_grad=True)
    lam_pos, lam_neg = 1 + torch.rand(5, dtype=torch.float64), torch.rand(11)
    assert torch.autograd.gradcheck(
        lambda q, t: pyclloss.ft_moco_loss(q, k.double(), queue, lam_pos, lam_neg, perm, t,
                                           backend=backend), (q, tau))


ON_THE_FLY = [b for b in ["reference"] + CPU_BACKENDS if b not in ops.MATERIALIZING]
MATERIALIZING = [b for b in ["reference"] + CPU_BACKENDS if b in ops.MATERIALIZING]


@pytest.mark.parametrize("backend", ON_THE_FLY)
def test_opcheck_on_the_fly(backend):
    q_hat, queue, weights, perm, scale = _op_inputs(torch.float32)
    torch.library.opcheck(ops.ft_moco_neg_lse, (q_hat, queue, *weights, perm, scale, backend))
    lse = ops.ft_moco_neg_lse(q_hat.detach(), queue, *weights, perm, scale.detach(), backend)
    torch.library.opcheck(ops.ft_moco_neg_lse_bwd, (q_hat.detach(), queue, *weights, perm,
                                                    scale.detach(), lse, torch.rand(7), backend))


@pytest.mark.parametrize("backend", ["reference"] + MATERIALIZING)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.float16, torch.bfloat16])
def test_interpolate_queue(backend, dtype):
    _, queue, weights, perm, _ = _op_inputs(dtype, size=517)
    mixed = ops.ft_moco_interpolate_queue(queue, *weights, perm, backend)
    unit = F.normalize(queue.double(), dim=1)
    lam = weights[0].double() * queue.double().norm(dim=1)  # λ_n back from the weights
    expected = lam[:, None] * unit + (1 - lam[:, None]) * unit[perm]
    assert mixed.dtype == stats_dtype(dtype)
    assert_close_rel(mixed, expected, 1e-6, "Q̂")
    torch.library.opcheck(ops.ft_moco_interpolate_queue, (queue, *weights, perm, backend))


@pytest.mark.parametrize("backend", MATERIALIZING)
def test_interpolate_queue_rejects_bad_perm(backend):
    _, queue, weights, perm, _ = _op_inputs(torch.float32)
    with pytest.raises(RuntimeError, match="perm must index the 11 queue rows"):
        ops.ft_moco_interpolate_queue(queue, *weights, perm + 1, backend)


@pytest.mark.parametrize("backend", ["reference"] + CPU_BACKENDS)
def test_module_samples_the_paper_mix_and_enqueues_the_keys(backend):
    # The module enqueues the keys in place before the caller's backward.
    module = pyclloss.FTMoCoLoss(dim=DIM, queue_size=50, backend=backend)
    q, k = torch.randn(6, DIM, requires_grad=True), torch.randn(6, DIM)
    before = module.queue.clone()
    state = torch.get_rng_state()
    lam_pos, lam_neg, perm = module.sample_mix()
    assert 1 <= lam_pos.item() <= 2 and 0 <= lam_neg.item() <= 1
    assert torch.equal(perm.sort().values, torch.arange(50))
    torch.set_rng_state(state)
    loss = module(q, k)
    loss.backward()

    def expected(q, k, queue):
        q = q.detach().requires_grad_()
        value = ref.ft_moco_loss(q, k, queue, lam_pos, lam_neg, perm)
        value.backward()
        return value, q.grad

    check_outputs((loss, q.grad), expected, [q, k, before], "module")
    assert torch.allclose(module.queue[:6], F.normalize(k, dim=1))
    assert torch.equal(module.queue[6:], before[6:])


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("normalize", [True, False])
def test_inputs_changed_in_place_before_backward(backend, normalize):
    # MoCo enqueues into its queue between the loss and its backward; the
    # gradient is that of the values the forward saw.
    n, size = SIZES[backend][1]
    q, k = torch.randn(n, DIM), torch.randn(n, DIM)
    queue, lam_neg, perm = torch.randn(size, DIM), torch.rand(size), torch.randperm(size)
    grads = []
    for change in (False, True):
        leaf = q.clone().requires_grad_()
        args = [t.clone() for t in (queue, lam_neg, perm)]
        loss = pyclloss.ft_moco_loss(leaf, k, args[0], 1.5, args[1], args[2], 0.2,
                                     normalize=normalize, backend=backend)
        if change:
            args[0].mul_(-3).add_(1)
            args[1].mul_(0.5)
            args[2].copy_(args[2].flip(0))
        loss.backward()
        grads.append(leaf.grad)
    assert torch.equal(grads[1], grads[0])


@pytest.mark.parametrize("kwargs,error,match", [
    (dict(lam_pos=torch.ones(3)), ValueError, "lam_pos must be a scalar or have shape"),
    (dict(lam_pos=float("nan")), ValueError, "lam_pos must be finite"),
    (dict(lam_neg=torch.ones(4, DIM)), ValueError, "lam_neg must be a scalar or have shape"),
    (dict(lam_neg=torch.tensor([0.5] * 8 + [float("inf")])), ValueError, "lam_neg contains"),
    (dict(lam_neg=torch.ones(9, dtype=torch.long)), TypeError, "lam_neg must be a floating"),
    (dict(perm=torch.arange(8)), ValueError, r"perm must have shape \(9,\)"),
    (dict(perm=torch.arange(9) + 1), ValueError, "perm must index the 9 keys"),
    (dict(perm=torch.arange(9.0)), TypeError, "perm must hold integers"),
    (dict(queue=torch.randn(9, DIM + 1)), ValueError, "queue has feature dimension"),
    (dict(k=torch.randn(4, DIM)), ValueError, "k has 4 rows but q has 5"),
    (dict(temperature=0.0), ValueError, "temperature must be a finite number > 0"),
    (dict(backend="cuda"), ValueError, "has no kernels for this op"),
])
def test_bad_input(kwargs, error, match):
    args = dict(q=torch.randn(5, DIM), k=torch.randn(5, DIM), queue=torch.randn(9, DIM),
                lam_pos=1.5, lam_neg=0.5, perm=torch.randperm(9), temperature=0.2)
    backend = kwargs.pop("backend", "auto")
    args.update(kwargs)
    with pytest.raises(error, match=match):
        pyclloss.ft_moco_loss(**args, backend=backend)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_strided_inputs_equal_contiguous_ones(backend):
    q, k, queue = torch.randn(DIM, 7).T, torch.randn(DIM, 7).T, torch.randn(DIM, 11).T
    args = (1.4, torch.rand(11), torch.randperm(11), 0.2)
    for normalize_mixed in (False, True):
        expected = pyclloss.ft_moco_loss(q.contiguous(), k.contiguous(), queue.contiguous(),
                                         *args, normalize_mixed=normalize_mixed,
                                         backend="reference")
        actual = pyclloss.ft_moco_loss(q, k, queue, *args, normalize_mixed=normalize_mixed,
                                       backend=backend)
        assert_close_rel(actual, expected, 1e-5, "strided")


def test_module_bad_alpha():
    with pytest.raises(ValueError, match="neg_alpha must be a number > 0"):
        pyclloss.FTMoCoLoss(dim=4, queue_size=8, neg_alpha=0)


@pytest.mark.parametrize("backend", ["reference"] + CPU_BACKENDS)
def test_torch_compile_has_no_graph_break(backend):
    q, k, queue = torch.randn(9, DIM, requires_grad=True), torch.randn(9, DIM), torch.randn(33, DIM)
    lam_neg, perm = torch.rand(33), torch.randperm(33)
    loss_fn = lambda q: pyclloss.ft_moco_loss(q, k, queue, 1.3, lam_neg, perm, backend=backend)  # noqa: E731
    loss = torch.compile(loss_fn, fullgraph=True, backend="aot_eager")(q)
    loss.backward()
    check_outputs(loss, lambda q, k, queue, lam_neg: ref.ft_moco_loss(
        q, k, queue, torch.tensor(1.3), lam_neg, perm), [q, k, queue, lam_neg], "compiled")
    assert torch.isfinite(q.grad).all() and q.grad.abs().sum() > 0


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
def test_triton_on_gpu(dtype):
    """Compiled Triton kernels at sizes spanning many tiles, bf16 included."""
    n, size, dim = 256, 4099, 128
    q, k = torch.randn(n, dim, device="cuda"), torch.randn(n, dim, device="cuda")
    queue = torch.randn(size, dim, device="cuda")
    lam_neg, perm = torch.rand(size, device="cuda"), torch.randperm(size, device="cuda")
    temp = torch.tensor(0.2, device="cuda")
    check_against_reference(
        lambda q, k, queue, t: pyclloss.ft_moco_loss(q, k, queue, 1.4, lam_neg, perm, t),
        lambda q, k, queue, t: ref.ft_moco_loss(q, k, queue, torch.tensor(1.4), lam_neg, perm, t),
        [q, k, queue, temp], dtype, f"ft_moco on the GPU, {dtype}")
