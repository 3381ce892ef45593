"""DCL, HCL and decoupled NT-Xent on the fused InfoNCE core (pyclloss.pair_quality)
against the float64 reference (pyclloss.reference.pair_quality, itself tested
against the authors' code in test_pair_quality.py): values and gradients per
backend and dtype, odd sizes, weights and reductions, tiny temperatures,
gradcheck, torch.compile, bad input, and over a gloo process group against
one process holding the global batch."""

import tempfile

import pytest
import torch

import pyclloss
from pyclloss import pair_quality
from pyclloss.reference import pair_quality as ref
from pyclloss.tools.benchmark import peak_extra_bytes

from helpers import fused_backends

F64 = torch.float64
BACKENDS = fused_backends("cpu")

# name -> (fused function, reference function, hyper-parameters after the temperature)
LOSSES = {
    "dcl": (pyclloss.dcl_loss, ref.dcl_loss, (0.1,)),
    "dcl prior 0": (pyclloss.dcl_loss, ref.dcl_loss, (0.0,)),
    "hcl": (pyclloss.hcl_loss, ref.hcl_loss, (0.1, 0.7)),
    "hcl beta 0": (pyclloss.hcl_loss, ref.hcl_loss, (0.2, 0.0)),
    "decoupled": (pyclloss.decoupled_nt_xent, ref.decoupled_nt_xent, ()),
    "decoupled vmf": (pyclloss.decoupled_nt_xent, ref.decoupled_nt_xent, ("vmf", 0.3)),
}
# the four losses, without the special cases τ⁺ = 0 and β = 0
MAIN = ["dcl", "hcl", "decoupled", "decoupled vmf"]
TOLERANCE = {F64: 1e-9, torch.float32: 2e-5, torch.float16: 1e-2, torch.bfloat16: 5e-2}


def _views(b, d, dtype=F64, spread=None):
    """Two views; with ``spread``, rows clustered around one direction, each
    second view near its first (the logits' spread stays moderate at tiny t)."""
    if spread is None:
        return torch.randn(b, d).to(dtype), torch.randn(b, d).to(dtype)
    center = torch.randn(d)
    z1 = center + spread * torch.randn(b, d)
    return z1.to(dtype), (z1 + 0.2 * spread * torch.randn(b, d)).to(dtype)


def _value_and_grads(fn, z1, z2, **kw):
    """The loss and the gradients of (z1, z2); per-row losses ("none") are
    differentiated against fixed random weights of the rows."""
    a, c = z1.detach().clone().requires_grad_(), z2.detach().clone().requires_grad_()
    loss = fn(a, c, **kw)
    if loss.dim() == 1:
        row_weights = torch.rand(loss.shape, generator=torch.Generator().manual_seed(0))
        (loss * row_weights.to(loss.dtype)).sum().backward()
    else:
        loss.backward()
    return loss.detach(), a.grad, c.grad


def _assert_close(actual, expected, rtol, what):
    """Max error relative to the largest magnitude of ``expected``."""
    err = (actual.double() - expected.double()).abs().max()
    # d = 1: the true gradients are zero and the computed ones round-off
    scale = expected.double().abs().max().clamp_min(1e-3)
    assert torch.isfinite(actual).all(), what
    assert err <= rtol * scale, f"{what}: max error {err:.3g} vs max |value| {scale:.3g}"


def _assert_matches_reference(name, backend, z1, z2, t, rtol, **kw):
    fused, reference, args = LOSSES[name]
    ours = _value_and_grads(lambda a, c, **k: fused(a, c, t, *args, backend=backend, **k),
                            z1, z2, **kw)
    # the oracle: the reference in float64 on the same (rounded) inputs
    theirs = _value_and_grads(lambda a, c, **k: reference(a, c, t, *args, **k),
                              z1.double(), z2.double(), **kw)
    # The losses see normalised rows, so a row's gradient scales as 1/|z_i| and
    # so does its round-off (d = 1: true gradients zero, computed ones
    # eps/|z_i|). Weighted by |z_i|, every row's error is in the loss's units.
    norms = [torch.ones(()), z1.double().norm(dim=1, keepdim=True),
             z2.double().norm(dim=1, keepdim=True)]
    for got, want, norm, what in zip(ours, theirs, norms, ("loss", "dz1", "dz2")):
        _assert_close(got.double() * norm, want * norm, rtol,
                      f"{name} {backend} {z1.dtype} {what}")


def _dtypes(backend):
    if backend == "cpp":
        return [F64, torch.float32, torch.float16, torch.bfloat16]
    # Triton has no float64 kernels; its CPU interpreter computes bfloat16 wrongly
    # (the InfoNCE core's own bfloat16 tests run on the GPU only)
    return [torch.float32, torch.float16]


@pytest.mark.parametrize("name", LOSSES)
@pytest.mark.parametrize("backend, dtype", [(b, d) for b in BACKENDS for d in _dtypes(b)])
def test_values_and_gradients(name, backend, dtype):
    b, d = (13, 37) if backend == "cpp" else (5, 16)
    z1, z2 = _views(b, d, dtype)
    _assert_matches_reference(name, backend, z1, z2, 0.3, TOLERANCE[dtype])


@pytest.mark.parametrize("name", MAIN)
@pytest.mark.parametrize("b, d", [(2, 1), (3, 5), (65, 3)])
def test_odd_sizes(name, b, d):
    _assert_matches_reference(name, "cpp", *_views(b, d), 0.5, 1e-9)


@pytest.mark.parametrize("name", MAIN)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_weights_and_reductions(name, reduction):
    weights = torch.rand(9, dtype=F64) * 2
    weights[3] = 0
    _assert_matches_reference(name, "cpp", *_views(9, 8), 0.2, 1e-9, weights=weights,
                              reduction=reduction)


@pytest.mark.parametrize("name", MAIN)
@pytest.mark.parametrize("t", [1e-3, 1e-5])
def test_tiny_temperature_stays_finite(name, t):
    """Logits of ~1/t = 1e5: no exponential of a logit is formed."""
    z1, z2 = _views(11, 8, spread=0.05)
    _assert_matches_reference(name, "cpp", z1, z2, t, 1e-8)
    for dtype in (torch.float32, torch.bfloat16):
        loss, g1, g2 = _value_and_grads(lambda a, c: LOSSES[name][0](
            a, c, t, *LOSSES[name][2], backend="cpp"), z1.to(dtype), z2.to(dtype))
        assert torch.isfinite(loss) and torch.isfinite(g1).all() and torch.isfinite(g2).all()


def test_temperature_gradient():
    z1, z2 = _views(6, 5)
    for name, (fused, reference, args) in LOSSES.items():
        grads = []
        for fn in (lambda a, c, t: fused(a, c, t, *args, backend="cpp"),
                   lambda a, c, t: reference(a, c, t, *args)):
            t = torch.tensor(0.4, dtype=F64, requires_grad=True)
            fn(z1, z2, t).backward()
            grads.append(t.grad)
        torch.testing.assert_close(grads[0], grads[1], rtol=1e-9, atol=1e-12, msg=name)


def test_the_floor_binds():
    """τ⁺ near 1 with a strong positive: the estimate falls below DCL's floor
    M·e^{−1/t}, which then holds (and the estimate gets no gradient)."""
    z1 = torch.randn(6, 4, dtype=F64)
    z2 = z1 + 1e-3 * torch.randn(6, 4, dtype=F64)
    _assert_matches_reference("dcl", "cpp", z1, z2, 0.5, 1e-9)
    per_row = pyclloss.dcl_loss(z1, z2, 0.5, 0.99, reduction="none", backend="cpp")
    floor = torch.log1p(10 * torch.exp(torch.tensor(-2.0, dtype=F64) - 2.0))
    assert torch.allclose(per_row, floor.expand_as(per_row), rtol=1e-3)


@pytest.mark.parametrize("name", [n for n in LOSSES if n != "decoupled vmf"])
def test_gradcheck(name):
    """(DCLW's weights are detached, as lightly's: not a function's gradient.)"""
    fused, _, args = LOSSES[name]
    z1, z2 = _views(4, 3)
    t = torch.tensor(0.6, dtype=F64, requires_grad=True)
    assert torch.autograd.gradcheck(
        lambda a, c, s: fused(a, c, s, *args, backend="cpp"),
        (z1.requires_grad_(), z2.requires_grad_(), t))


def test_modules_equal_the_functions():
    z1, z2 = _views(7, 6)
    w = torch.rand(7, dtype=F64)
    pairs = [(pyclloss.DCLLoss(0.3, 0.2, "sum"), pyclloss.dcl_loss(z1, z2, 0.3, 0.2, weights=w,
                                                                   reduction="sum")),
             (pyclloss.HCLLoss(0.3, 0.2, 0.5), pyclloss.hcl_loss(z1, z2, 0.3, 0.2, 0.5,
                                                                 weights=w)),
             (pyclloss.DecoupledNTXentLoss(0.3, "vmf", 0.4),
              pyclloss.decoupled_nt_xent(z1, z2, 0.3, "vmf", 0.4, weights=w))]
    for module, expected in pairs:
        torch.testing.assert_close(module(z1, z2, w), expected)


def test_compile_fullgraph():
    """The temperature as an argument (symbolic); τ⁺ and β are fixed numbers."""
    compiled = torch.compile(lambda a, c, t: pyclloss.hcl_loss(a, c, t, 0.1, 0.5, backend="cpp"),
                             fullgraph=True, dynamic=True)
    for b in (5, 8):
        z1, z2 = _views(b, 6, torch.float32)
        eager = _value_and_grads(lambda a, c: pyclloss.hcl_loss(a, c, 0.3, 0.1, 0.5,
                                                                backend="cpp"), z1, z2)
        got = _value_and_grads(lambda a, c: compiled(a, c, 0.3), z1, z2)
        for x, y in zip(got, eager):
            torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-6)


def test_no_quadratic_buffer():
    """N = 4096 rows: the N×N logits alone would be 64 MiB in float32."""
    z1, z2 = (torch.randn(2048, 32, requires_grad=True) for _ in range(2))
    for fn in (pyclloss.dcl_loss, pyclloss.hcl_loss, pyclloss.decoupled_nt_xent):
        fn(z1, z2, backend="cpp").backward()  # warm-up: allocator, thread pools
        peak = peak_extra_bytes(lambda: fn(z1, z2, backend="cpp").backward())
        assert peak < 16 * 2**20, f"{fn.__name__}: {peak / 2**20:.1f} MiB"


@pytest.mark.parametrize("call, error, match", [
    (lambda z: pyclloss.dcl_loss(z, z, tau_plus=1.0), ValueError, "tau_plus"),
    (lambda z: pyclloss.dcl_loss(z, z, tau_plus=-0.1), ValueError, "tau_plus"),
    (lambda z: pyclloss.hcl_loss(z, z, beta=-1.0), ValueError, "beta"),
    (lambda z: pyclloss.hcl_loss(z, z, beta=float("inf")), ValueError, "beta"),
    (lambda z: pyclloss.decoupled_nt_xent(z, z, sigma=0.0), ValueError, "sigma"),
    (lambda z: pyclloss.decoupled_nt_xent(z, z, weight="cosine"), ValueError, "weight"),
    (lambda z: pyclloss.dcl_loss(z, z, 0.0), ValueError, "temperature"),
    (lambda z: pyclloss.hcl_loss(z, z[:, :3]), ValueError, "z2"),
    (lambda z: pyclloss.dcl_loss(z[:1], z[:1]), ValueError, "z1 needs at least 2 samples"),
    (lambda z: pyclloss.decoupled_nt_xent(z, z, weights=-torch.ones(4)), ValueError, "weights"),
    (lambda z: pyclloss.dcl_loss(z, z, reduction="avg"), ValueError, "reduction"),
    (lambda z: pyclloss.dcl_loss(z, z * float("nan")), ValueError, "z2"),
])
def test_bad_input(call, error, match):
    with pytest.raises(error, match=match):
        call(torch.randn(4, 5))


# ------------------------------------------------------------------ distributed

SIZES = (3, 5)  # local batches of the two ranks
DIST_LOSSES = {
    "dcl": lambda a, c, t, **kw: pyclloss.dcl_loss(a, c, t, 0.1, **kw),
    "hcl": lambda a, c, t, **kw: pyclloss.hcl_loss(a, c, t, 0.1, 0.8, **kw),
    "decoupled vmf": lambda a, c, t, **kw: pyclloss.decoupled_nt_xent(a, c, t, "vmf", 0.5,
                                                                      **kw),
}


def _global_batch(seed):
    gen = torch.Generator().manual_seed(seed)
    n = sum(SIZES)
    return torch.randn(n, 8, generator=gen), torch.randn(n, 8, generator=gen), \
        torch.rand(n, generator=gen)


def _dist_run(loss, z1, z2, w, **kw):
    z1, z2 = z1.clone().requires_grad_(), z2.clone().requires_grad_()
    t = torch.tensor(0.3, requires_grad=True)
    value = loss(z1, z2, t, weights=w, backend="cpp", **kw)
    value.backward()
    return value.detach(), z1.grad, z2.grad, t.grad


def _ranks_results(rank, device, seed):
    start, stop = sum(SIZES[:rank]), sum(SIZES[:rank + 1])
    z1, z2, w = (x[start:stop] for x in _global_batch(seed))
    return {(name, strategy): _dist_run(loss, z1, z2, w, gather_distributed=True,
                                        strategy=strategy)
            for name, loss in DIST_LOSSES.items() for strategy in ("all_gather", "ring")}


def test_distributed_matches_the_global_batch():
    """World size 2 over gloo: every rank returns the global loss, rank r's
    inputs get W·∂L/∂x_r, the temperature dL/dt (docs/distributed.md)."""
    from helpers import spawn_ranks

    seed = int(torch.randint(0, 2**31, ()))
    with tempfile.TemporaryDirectory() as out_dir:
        per_rank = spawn_ranks(len(SIZES), out_dir, _ranks_results, seed)
    z1, z2, w = _global_batch(seed)
    for name, loss in DIST_LOSSES.items():
        value, g1, g2, gt = _dist_run(loss, z1, z2, w)
        for rank, results in enumerate(per_rank):
            start, stop = sum(SIZES[:rank]), sum(SIZES[:rank + 1])
            for strategy in ("all_gather", "ring"):
                got = results[name, strategy]
                what = f"{name} {strategy} rank {rank}"
                _assert_close(got[0], value, 1e-5, what)
                _assert_close(got[1] / len(SIZES), g1[start:stop], 1e-5, what + " dz1")
                _assert_close(got[2] / len(SIZES), g2[start:stop], 1e-5, what + " dz2")
                _assert_close(got[3], gt, 1e-5, what + " dt")
