"""SupReMix: every fused backend against the reference on fresh random inputs
(values and gradients, odd sizes, fp32/fp16/bf16), the reference against the
mixtures materialised as the authors do, float64 gradcheck, the custom-op
contract and bad input."""

import pytest
import torch
import torch.nn.functional as F
from helpers import (assert_close_rel, assert_same_value_and_grad, check_against_reference,
                     fused_backends, skip_unfaithful)

import pyclloss
from pyclloss.ops import supremix as ops
from pyclloss.reference import supremix as ref

CPU_BACKENDS = fused_backends("cpu")
# The Triton interpreter is slow: small sizes only.
SIZES = {"cpp": (2, 3, 17, 50), "triton": (3, 13)}
GRADCHECK_BACKENDS = [b for b in ("reference", "cpp") if pyclloss.backends()[b].available]


def make_inputs(n, d=12, label_range=8.0, integer_labels=True):
    """z, labels (ties, mix-pos pairs and labels farther apart than the gap), λ."""
    z = torch.randn(n, d)
    t = torch.rand(n) * label_range
    t = t.floor() if integer_labels else t
    lam = torch.distributions.Beta(2.0, 8.0).sample((n, n))
    return z, t, lam


def explicit_mixtures_loss(z, t, lam, tau, tau_b, gap):
    """The loss with every mixture built as a vector (n, n, n, D): the
    construction of the authors' code, with one shift for all logits."""
    z = F.normalize(z, dim=1)
    n = z.shape[0]
    zd = z.detach()
    losses = []
    for i in range(n):
        logits, weights, positive = [], [], []
        for c in range(n):
            if c != i:
                logits.append(z[i] @ z[c])
                weights.append(abs(t[i] - t[c]) + 1)
                positive.append(bool(t[c] == t[i]))
        for k in range(n):
            if t[k] != t[i]:
                m = lam[i, k] * zd[i] + (1 - lam[i, k]) * zd[k]
                label = lam[i, k] * t[i] + (1 - lam[i, k]) * t[k]
                logits.append(z[i] @ m)
                weights.append(abs(t[i] - label) + 1)
                positive.append(False)
        for j in range(n):
            for k in range(n):
                if t[j] < t[i] < t[k] and t[i] - t[j] < gap and t[k] - t[i] < gap:
                    alpha = (t[k] - t[i]) / (t[k] - t[j])
                    logits.append(z[i] @ (alpha * zd[j] + (1 - alpha) * zd[k]))
                    weights.append(torch.ones(()))
                    positive.append(True)
        logits = torch.stack(logits) / tau
        lse = torch.logsumexp(logits + torch.stack(weights).log(), 0)
        pos = torch.tensor(positive)
        if pos.any():
            losses.append(-(tau / tau_b) * (logits[pos] - lse).mean())
    return torch.stack(losses).mean()


@pytest.mark.parametrize("integer_labels", [True, False])
def test_reference_equals_explicit_mixtures(integer_labels):
    z, t, lam = make_inputs(9, d=5, integer_labels=integer_labels)
    z, t, lam = z.double(), t.double(), lam.double()
    assert_same_value_and_grad(lambda v: explicit_mixtures_loss(v, t, lam, 0.5, 0.7, 3.0),
                               lambda v: ref.supremix_loss(v, t, lam, 0.5, 0.7, 3.0), z, 1e-12)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("integer_labels", [True, False])
def test_backend_matches_reference(backend, dtype, integer_labels):
    skip_unfaithful(backend, dtype)
    for n in SIZES[backend]:
        z, t, lam = make_inputs(n, integer_labels=integer_labels)
        check_against_reference(
            lambda z, t, lam: pyclloss.supremix_loss(z, t, lam, 0.3, 0.5, 4.0, backend=backend),
            lambda z, t, lam: ref.supremix_loss(z, t, lam, 0.3, 0.5, 4.0),
            [z, t, lam], dtype, f"{backend} n={n}")


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("reduction", ["sum", "none"])
def test_reductions(backend, reduction):
    z, t, lam = make_inputs(SIZES[backend][-1])
    check_against_reference(
        lambda z: pyclloss.supremix_loss(z, t, lam, reduction=reduction, backend=backend),
        lambda z: ref.supremix_loss(z, t.double(), lam.double(), reduction=reduction),
        [z], torch.float32, f"{backend} {reduction}")


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_temperature_gradients(backend):
    z, t, lam = make_inputs(SIZES[backend][-1])
    check_against_reference(
        lambda z, tau, tau_b: pyclloss.supremix_loss(z, t, lam, tau, tau_b, backend=backend),
        lambda z, tau, tau_b: ref.supremix_loss(z, t.double(), lam.double(), tau, tau_b),
        [z, torch.tensor(0.4), torch.tensor(0.6)], torch.float32, f"{backend} temperatures")


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_low_temperature_is_finite(backend):
    z, t, lam = make_inputs(SIZES[backend][-1])
    check_against_reference(
        lambda z: pyclloss.supremix_loss(z, t, lam, 0.01, 0.01, backend=backend),
        lambda z: ref.supremix_loss(z, t.double(), lam.double(), 0.01, 0.01),
        [z], torch.float32, f"{backend} tau=0.01")


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_autocast_keeps_float32_arithmetic(backend):
    # Under bf16 autocast a Gram matrix z·zᵀ comes out in bf16 while labels
    # and λ stay float32: the fused backends compute in float32 all the same,
    # forward and backward (here run inside the autocast region too).
    z, t, lam = make_inputs(SIZES[backend][-1])
    plain = z.clone().requires_grad_()
    expected = pyclloss.supremix_loss(plain, t, lam, backend=backend)
    expected.backward()
    leaf = z.clone().requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = pyclloss.supremix_loss(leaf, t, lam, backend=backend)
        loss.backward()
    assert loss.dtype == torch.float32 and leaf.grad.dtype == torch.float32
    assert_close_rel(loss, expected, 1e-6, "value")
    assert_close_rel(leaf.grad, plain.grad, 1e-6, "grad")


@pytest.mark.parametrize("backend", ["reference"] + CPU_BACKENDS)
def test_anchors_without_positives_are_left_out(backend):
    # Labels 10 apart: no same-label sample, no mix-pos pair within the gap.
    n = 6
    z = torch.randn(n, 4, requires_grad=True)
    t = torch.arange(n) * 10.0
    lam = torch.full((n, n), 0.2)
    loss = pyclloss.supremix_loss(z, t, lam, backend=backend)
    loss.backward()
    assert loss.item() == 0.0
    assert torch.equal(z.grad, torch.zeros_like(z))
    per_anchor = pyclloss.supremix_loss(z, torch.tensor([0.0, 0, 30, 40, 50, 60]), lam,
                                        reduction="none", backend=backend)
    assert (per_anchor[2:] == 0).all() and (per_anchor[:2] > 0).all()


def test_module_draws_lambda_from_beta():
    z, t, _ = make_inputs(11)
    loss_fn = pyclloss.SupReMixLoss(temperature=0.4, backend="reference")
    torch.manual_seed(3)
    loss = loss_fn(z, t)
    torch.manual_seed(3)
    lam = torch.distributions.Beta(torch.tensor(2.0), torch.tensor(8.0)).sample((11, 11))
    assert_close_rel(loss, ref.supremix_loss(z, t, lam, 0.4, 0.5), 1e-6, "module")


@pytest.mark.parametrize("beta", [(0.0, 1.0), 2.0, (1.0, 2.0, 3.0)])
def test_module_rejects_bad_beta(beta):
    with pytest.raises(ValueError, match="beta must be two numbers > 0"):
        pyclloss.SupReMixLoss(beta=beta)


# ------------------------------------------------------------- the op contract


@pytest.mark.parametrize("backend", GRADCHECK_BACKENDS)
def test_gradcheck_float64_real_pairs(backend):
    # The mixtures are detached, so the gradient is not the derivative of the
    # loss wherever a mixture exists; with one label there is none (every
    # other sample is a positive), and the gradient is a true derivative.
    # With mixtures, the float64 comparison with the reference's autograd
    # (test_backend_matches_reference) checks the stop-gradient semantics.
    z = torch.randn(7, 4, dtype=torch.float64, requires_grad=True)
    tau = torch.tensor(0.5, dtype=torch.float64, requires_grad=True)
    t, lam = torch.zeros(7, dtype=torch.float64), torch.rand(7, 7, dtype=torch.float64)
    assert torch.autograd.gradcheck(
        lambda z, tau: pyclloss.supremix_loss(z, t, lam, tau, 0.3, reduction="none",
                                              backend=backend), (z, tau))


@pytest.mark.parametrize("backend", [b for b in CPU_BACKENDS if b == "cpp"])
def test_opcheck(backend):
    z, t, lam = make_inputs(9)
    z = F.normalize(z, dim=1).requires_grad_(True)
    scale = torch.tensor(2.0, requires_grad=True)
    torch.library.opcheck(ops.supremix, (z, t, lam, scale, 4.0, backend))
    lse = ops.supremix(z.detach(), t, lam, scale.detach(), 4.0, backend)[0]
    g = torch.randn(9)
    torch.library.opcheck(ops.supremix_backward,
                          (z.detach(), t, lam, lse, g, g, scale.detach(), 4.0, backend))


@pytest.mark.skipif("cpp" not in CPU_BACKENDS, reason="C++ extension not built")
def test_torch_compile_has_no_graph_break():
    compiled = torch.compile(lambda z, t, lam: pyclloss.supremix_loss(z, t, lam, backend="cpp"),
                             fullgraph=True, backend="aot_eager")
    z, t, lam = make_inputs(9)
    z.requires_grad_(True)
    loss = compiled(z, t, lam)
    loss.backward()
    assert_close_rel(loss, ref.supremix_loss(z.detach().double(), t, lam), 1e-5, "compiled")
    assert torch.isfinite(z.grad).all()


# ------------------------------------------------------------------- bad input


@pytest.mark.parametrize("change, error, words", [
    (dict(z=torch.randn(1, 4)), ValueError, "z needs at least 2 rows"),
    (dict(z=torch.randn(5)), ValueError, "z must have shape"),
    (dict(z=torch.full((5, 4), float("nan"))), ValueError, "z contains NaN"),
    (dict(t=torch.zeros(4)), ValueError, "t must have shape (5,)"),
    (dict(t=torch.tensor([0.0, 1, 2, 3, float("inf")])), ValueError, "t contains NaN or Inf"),
    (dict(lam_neg=torch.rand(5, 4)), ValueError, "lam_neg must have shape (5, 5)"),
    (dict(lam_neg=torch.ones(5, 5, dtype=torch.long)), TypeError, "lam_neg must be a floating"),
    (dict(lam_neg=torch.full((5, 5), 1.5)), ValueError, "lam_neg must lie in [0, 1]"),
    (dict(temperature=0.0), ValueError, "temperature must be"),
    (dict(temperature=torch.tensor([0.5, 1.0])), ValueError, "temperature must be a scalar"),
    (dict(gap=torch.tensor(5.0, requires_grad=True)), ValueError, "gap must be a fixed"),
    (dict(base_temperature=-1.0), ValueError, "base_temperature must be"),
    (dict(gap=0), ValueError, "gap must be"),
    (dict(reduction="avg"), ValueError, "reduction must be one of"),
    (dict(backend="cuda_graph"), ValueError, "backend must be one of"),
])
def test_bad_input(change, error, words):
    args = dict(z=torch.randn(5, 4), t=torch.arange(5.0), lam_neg=torch.rand(5, 5))
    args.update(change)
    with pytest.raises(error) as info:
        pyclloss.supremix_loss(**args)
    assert words in str(info.value)
