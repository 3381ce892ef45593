"""torch.compile(fullgraph=True, dynamic=True) traces every loss and the sorting
functions, with their scalars passed in as Python floats (which compile makes symbolic) and batch sizes that
change without a recompile; the compiled values and gradients are the eager
ones. Under compile the value checks become device-side assertions."""

import pytest
import torch
from torch._dynamo.testing import CompileCounterWithBackend

import pyclloss
from pyclloss import sorting

from helpers import fused_backends

BACKENDS = ["reference"] + [b for b in fused_backends("cpu") if b == "cpp"]
D = 6
AMCL_NET = torch.nn.Sequential(torch.nn.Linear(D, D), torch.nn.ReLU(), torch.nn.Linear(D, D))


def _squares(*tensors):
    return sum(t.square().sum() for t in tensors)


def _features(n, d=D):
    return torch.randn(n, d, requires_grad=True)


# name -> (loss(*inputs, backend), inputs(n)); floats among the inputs are the
# scalar hyper-parameters, passed as arguments so that compile sees them as such.
CASES = {
    "nt_xent": (lambda a, b, t, backend: pyclloss.nt_xent(a, b, t, backend=backend),
                lambda n: [_features(n), _features(n), 0.5]),
    "pair_nt_xent": (lambda x, y, t, backend: pyclloss.pair_nt_xent(x, y, t, backend=backend),
                     lambda n: [_features(n), torch.arange(n) % 3, 0.1]),
    "supcon": (lambda x, y, w, t, tb, backend: pyclloss.supcon(x, y, t, tb, weights=w,
                                                               backend=backend),
               lambda n: [_features(n), torch.arange(n) % 3, torch.rand(n), 0.1, 0.2]),
    "supcon_views": (lambda x, t, backend: pyclloss.supcon(x, None, t, backend=backend),
                     lambda n: [torch.randn(n, 2, D, requires_grad=True), 0.3]),
    "info_nce": (lambda q, k, t, backend: pyclloss.info_nce(q, k, t, backend=backend),
                 lambda n: [_features(n), _features(n + 2), 0.07]),
    "clip_loss": (lambda a, b, s, backend: pyclloss.clip_loss(a, b, s, backend=backend),
                  lambda n: [_features(n), _features(n), torch.tensor(5.0, requires_grad=True)]),
    "siglip_loss": (lambda a, b, s, c, backend: pyclloss.siglip_loss(a, b, s, c,
                                                                     backend=backend),
                    lambda n: [_features(n), _features(n), 3.0, -1.0]),
    "gated_info_nce": (
        lambda q, k, g, y, p, t, backend: pyclloss.gated_info_nce(q, k, g, y, p, temperature=t,
                                                                  backend=backend),
        lambda n: [_features(n), _features(n), torch.rand(n, D, requires_grad=True),
                   torch.arange(n) % 3, (torch.arange(n) + 1) % 3, 0.2]),
    "ft_moco_loss": (
        lambda q, k, queue, perm, lp, ln, t, backend: pyclloss.ft_moco_loss(
            q, k, queue, lp, ln, perm, t, backend=backend),
        lambda n: [_features(n), torch.randn(n, D), torch.randn(2 * n, D), torch.randperm(2 * n),
                   1.4, 0.6, 0.2]),
    "supremix_loss": (
        lambda z, t, lam, tau, tau_b, gap, backend: pyclloss.supremix_loss(
            z, t, lam, tau, tau_b, gap, backend=backend),
        lambda n: [_features(n), torch.arange(n) * 1.0, torch.rand(n, n), 0.5, 0.7, 3.0]),
    "rnc_loss": (lambda x, y, t, backend: pyclloss.rnc_loss(x, y, t, backend=backend),
                 lambda n: [_features(n), torch.randn(n), 2.0]),
    "amcl_loss": (lambda z1, z2, backend: pyclloss.amcl_loss(
        z1, z2, AMCL_NET, tau_min=0.05, beta=0.2, topk=3, backend=backend),
        lambda n: [torch.randn(n, 2, D, requires_grad=True), torch.randn(n, 2, D)]),
    # the sorting outputs' sums are constants: their squares have gradients
    "soft_rank": (lambda x, s, backend: _squares(sorting.soft_rank(x, steepness=s,
                                                                   backend=backend)),
                  lambda n: [torch.randn(3, n, requires_grad=True), 5.0]),
    "diff_sort": (lambda x, s, backend: _squares(*sorting.diff_sort(x, "bitonic", s,
                                                                    backend=backend)),
                  lambda n: [torch.randn(3, n, requires_grad=True), 5.0]),
    "soft_top_k_mask": (lambda x, backend: _squares(sorting.soft_top_k_mask(x, 2,
                                                                            backend=backend)),
                        lambda n: [torch.randn(3, n, requires_grad=True)]),
    "groco_loss": (lambda p, q, s, backend: sorting.groco_loss(p, q, s, 3, backend=backend),
                   lambda n: [torch.randn(n, 2, requires_grad=True),
                              torch.randn(n, 5, requires_grad=True), 2.0]),
}


# The reference RnC walks its anchors in blocks sized from n (a Python loop,
# which bounds its memory), so compile specialises it on n: it recompiles for
# a new batch size, and still traces as one graph.
SPECIALISED_ON_N = {("rnc_loss", "reference")}


def _run(loss, inputs, backend):
    value = loss(*inputs, backend)
    leaves = [x for x in inputs if isinstance(x, torch.Tensor) and x.requires_grad]
    grads = torch.autograd.grad(value, leaves)
    return value.detach(), grads


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", CASES)
def test_compiles_with_dynamic_shapes_and_equals_eager(name, backend):
    loss, inputs_of = CASES[name]
    counter = CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(loss, backend=counter, fullgraph=True, dynamic=True)
    compiles = []
    for n in (8, 11):
        inputs = inputs_of(n)
        value, grads = _run(compiled, inputs, backend)
        expected, expected_grads = _run(loss, inputs, backend)
        torch.testing.assert_close(value, expected, rtol=1e-5, atol=1e-6)
        for grad, expected_grad in zip(grads, expected_grads):
            torch.testing.assert_close(grad, expected_grad, rtol=1e-4, atol=1e-6)
        compiles.append(counter.frame_count)
    assert compiles[0] > 0
    if (name, backend) not in SPECIALISED_ON_N:
        assert compiles[1] == compiles[0]  # the second batch size: no recompile


@pytest.mark.parametrize("backend", BACKENDS)
def test_inductor_runs_the_losses_and_their_device_side_checks(backend):
    """Inductor lowers the checks to device-side assertions: a bad scalar or weight
    fails the compiled call with the eager message, a good one gives the eager loss."""
    torch._dynamo.reset()
    nt_xent = torch.compile(
        lambda a, b, t, w: pyclloss.nt_xent(a, b, t, weights=w, backend=backend),
        fullgraph=True, dynamic=True)
    z1, z2, w = torch.randn(8, D), torch.randn(8, D), torch.rand(8)
    torch.testing.assert_close(nt_xent(z1, z2, torch.tensor(0.5), w),
                               pyclloss.nt_xent(z1, z2, 0.5, weights=w, backend=backend))
    for bad in (float("inf"), float("nan"), 0.0, -1.0):
        with pytest.raises(RuntimeError, match="temperature must be a finite number > 0"):
            nt_xent(z1, z2, torch.tensor(bad), w)
    with pytest.raises(RuntimeError, match="weights must be finite and >= 0"):
        nt_xent(z1, z2, torch.tensor(0.5), torch.full((8,), float("nan")))
    with pytest.raises(RuntimeError, match="weights must be finite and >= 0, with a finite sum"):
        nt_xent(z1, z2, torch.tensor(0.5), torch.full((8,), 3e38))

    siglip = torch.compile(lambda a, b, s, c: pyclloss.siglip_loss(a, b, s, c, backend=backend),
                           fullgraph=True, dynamic=True)
    torch.testing.assert_close(siglip(z1, z2, torch.tensor(3.0), torch.tensor(-1.0)),
                               pyclloss.siglip_loss(z1, z2, 3.0, -1.0, backend=backend))
    with pytest.raises(RuntimeError, match="logit_bias must be finite"):
        siglip(z1, z2, torch.tensor(3.0), torch.tensor(float("nan")))
    with pytest.raises(RuntimeError, match="logit_scale must be > 0 and finite"):
        siglip(z1, z2, torch.tensor(float("inf")), torch.tensor(-1.0))


def test_a_bad_float_under_compile_fails_with_the_message():
    """A NaN float cannot stay symbolic: compile specialises on it, and the
    assertion fails while tracing, with the same message."""
    torch._dynamo.reset()
    compiled = torch.compile(lambda a, b, t: pyclloss.nt_xent(a, b, t, backend="reference"),
                             fullgraph=True, dynamic=True)
    x = torch.randn(5, D)
    compiled(x, x, 0.5)
    with pytest.raises(RuntimeError, match="temperature must be a finite number > 0"):
        compiled(x, x, float("nan"))
