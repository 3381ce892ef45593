"""Drop-in parity with the implementations users already have:
pytorch-metric-learning, lightly and open_clip (each skipped when not installed)."""

import pytest
import torch
from torch import nn

import pyclloss
from pyclloss import peers

from conftest import fused_backends

# float64 inputs: the reference and the C++ kernels take them.
BACKENDS = ["reference"] + [b for b in fused_backends("cpu") if b == "cpp"]


def _grad_pair(loss_fn, peer_fn, *inputs):
    ours = [x.clone().requires_grad_() for x in inputs]
    theirs = [x.clone().requires_grad_() for x in inputs]
    a, b = loss_fn(*ours), peer_fn(*theirs)
    a.backward()
    b.backward()
    return a, b, ours, theirs


def _assert_same(a, b, ours, theirs, rtol=2e-5, atol=1e-6):
    assert torch.allclose(a.float(), b.float(), rtol=rtol, atol=atol), (a.item(), b.item())
    for x, y in zip(ours, theirs):
        assert torch.allclose(x.grad, y.grad, rtol=1e-4, atol=1e-6)



@pytest.mark.parametrize("backend", BACKENDS)
def test_pair_nt_xent_equals_pytorch_metric_learning(backend):
    losses = pytest.importorskip("pytorch_metric_learning.losses")
    for n, classes in ((24, 5), (31, 2), (9, 9)):
        x, y = torch.randn(n, 16, dtype=torch.float64), torch.randint(0, classes, (n,))
        res = _grad_pair(lambda e: pyclloss.pair_nt_xent(e, y, 0.1, backend=backend),
                         lambda e: losses.NTXentLoss(temperature=0.1)(e, y), x)
        _assert_same(*res)


@pytest.mark.parametrize("backend", BACKENDS)
def test_nt_xent_equals_pml_with_view_labels(backend):
    losses = pytest.importorskip("pytorch_metric_learning.losses")
    b = 13
    z1, z2 = torch.randn(b, 8, dtype=torch.float64), torch.randn(b, 8, dtype=torch.float64)
    y = torch.cat([torch.arange(b), torch.arange(b)])
    res = _grad_pair(lambda a, c: pyclloss.nt_xent(a, c, 0.5, backend=backend),
                     lambda a, c: losses.NTXentLoss(0.5)(torch.cat([a, c]), y), z1, z2)
    _assert_same(*res)


@pytest.mark.parametrize("backend", BACKENDS)
def test_supcon_equals_pytorch_metric_learning(backend):
    losses = pytest.importorskip("pytorch_metric_learning.losses")
    x, y = torch.randn(40, 12, dtype=torch.float64), torch.randint(0, 6, (40,))
    res = _grad_pair(lambda e: pyclloss.supcon(e, y, 0.1, backend=backend),
                     lambda e: losses.SupConLoss(temperature=0.1)(e, y), x)
    _assert_same(*res)


def _peer(loader):
    try:
        return loader()
    except peers.PeerUnavailable as exc:
        pytest.skip(str(exc))


def test_nt_xent_equals_lightly():
    ntxent = _peer(peers.lightly_ntxent)
    z1, z2 = torch.randn(17, 32, dtype=torch.float64), torch.randn(17, 32, dtype=torch.float64)
    for backend in BACKENDS:
        res = _grad_pair(lambda a, b: pyclloss.nt_xent(a, b, 0.5, backend=backend),
                         lambda a, b: ntxent(temperature=0.5)(a, b), z1, z2)
        _assert_same(*res)


@pytest.mark.parametrize("backend", BACKENDS)
def test_clip_and_siglip_equal_open_clip(backend):
    oc = _peer(peers.open_clip_losses)
    n = 29
    img = nn.functional.normalize(torch.randn(n, 24, dtype=torch.float64), dim=1)
    txt = nn.functional.normalize(torch.randn(n, 24, dtype=torch.float64), dim=1)
    scale = torch.tensor(20.0, dtype=torch.float64)
    res = _grad_pair(lambda a, b, s: pyclloss.clip_loss(a, b, s, backend=backend),
                     lambda a, b, s: oc.ClipLoss()(a, b, s), img, txt, scale)
    _assert_same(*res)
    bias = torch.tensor(-10.0, dtype=torch.float64)
    res = _grad_pair(lambda a, b, s, c: pyclloss.siglip_loss(a, b, s, c, backend=backend),
                     lambda a, b, s, c: oc.SigLipLoss()(a, b, s, c), img, txt, scale, bias)
    _assert_same(*res)
