"""The pair-quality losses and tools against their authors' code.

Each oracle below is the authors' released code, written out as they wrote it
(CACR-SSL's ``our_loss1``/``our_loss2``, the AMCL authors' ``AMCLNTXentLoss``,
``chingyaoc/DCL`` and ``joshr17/HCL``'s training criteria, the DBPM authors'
memory and re-weighting loop, GenView's ``calculate_weight``, luckmatters'
DirectPred ``Accumulator`` and ``compute_w_corr``), with only the device
handling and the float32 casts dropped: everything runs in float64. lightly's
DCLLoss/DCLWLoss are loaded from the installed package. Values and gradients,
the edge cases (a batch of 2, small temperatures, τ⁺ near its bounds, k at
least the number of negatives, all-equal features), gradcheck and bad input.
"""

import copy
import functools
import io

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from scipy.stats import norm
from torch import nn
from helpers import peer_or_skip

import pyclloss
from pyclloss.tools import peers
from pyclloss.pair_quality import DBPM, DirectPredictor, quality_weights
from pyclloss.reference import pair_quality as ref

F64 = torch.float64


def _randn(*shape):
    return torch.randn(*shape, dtype=F64)


def _views(b, d, spread=None):
    """Two views; with ``spread``, rows clustered around one direction and each
    second view near its first (at t = 1e-3 the logits then span ~100, not 2000)."""
    if spread is None:
        return _randn(b, d), _randn(b, d)
    z1 = _randn(d) + spread * _randn(b, d)
    return z1, z1 + 0.2 * spread * _randn(b, d)


def _grads(fn, *inputs):
    leaves = [x.clone().requires_grad_() for x in inputs]
    out = fn(*leaves)
    out.backward()
    return out.detach(), [x.grad for x in leaves]


def _assert_same(ours_fn, theirs_fn, *inputs, rtol=1e-9, atol=1e-11):
    a, ga = _grads(ours_fn, *inputs)
    b, gb = _grads(theirs_fn, *inputs)
    assert torch.isfinite(a) and torch.isfinite(b), (a, b)
    torch.testing.assert_close(a, b, rtol=rtol, atol=atol)
    for x, y in zip(ga, gb):
        assert torch.isfinite(x).all()
        torch.testing.assert_close(x, y, rtol=rtol, atol=atol)


# ------------------------------------------------------------------------------ CACR


def _cacr_authors(latent_codes_list, alpha=1.0, tau_pos=1.0, beta=1.0, tau_neg=1.0):
    """CACR-SSL small_scale_experiments/losses: our_loss1 + our_loss2 (choice='full',
    no debiasing), as the training script adds them."""
    loss1 = 0.0
    for x in range(len(latent_codes_list)):
        z_x = latent_codes_list[x]
        mask = list(range(len(latent_codes_list)))
        mask.pop(x)
        masked_z_x = torch.stack(latent_codes_list, dim=0)[mask]
        cost = (z_x - masked_z_x).norm(p=2, dim=-1).pow(2).transpose(1, 0).mul(alpha)
        dist = cost.mul(tau_pos / alpha)
        weights = torch.softmax(dist, dim=1)
        loss1 += (cost * weights).sum(1).mean()
    loss1 = loss1 / len(latent_codes_list)

    loss2, counter = 0.0, 0
    for x in range(len(latent_codes_list)):
        z_x = latent_codes_list[x]
        for y in range(x + 1, len(latent_codes_list)):
            z_y = latent_codes_list[y]
            cost = torch.norm(z_x[:, None] - z_y, dim=-1).pow(2).mul(-beta)
            cost = cost.masked_select(~torch.from_numpy(np.eye(cost.shape[0], dtype=bool))) \
                .view(cost.shape[0], cost.shape[0] - 1)
            dist = cost.mul(tau_neg / beta)
            weights = torch.softmax(dist, dim=1)
            loss2 += (cost * weights).sum(1).mean()
            counter += 1
    return loss1 + loss2 / counter


@pytest.mark.parametrize("views", [2, 3, 4])
@pytest.mark.parametrize("b", [2, 9])
@pytest.mark.parametrize("taus", [(1.0, 1.0), (0.3, 7.0)])
@pytest.mark.parametrize("alpha, beta", [(1.0, 1.0), (0.5, 2.0)])
def test_cacr_equals_authors(views, b, taus, alpha, beta):
    zs = [_randn(b, 16) for _ in range(views)]
    kw = dict(attraction_temperature=taus[0], repulsion_temperature=taus[1], alpha=alpha,
              beta=beta)
    # the authors' encoder normalises; their loss takes its output as it is
    _assert_same(lambda *z: ref.cacr_loss(*z, **kw),
                 lambda *z: _cacr_authors([F.normalize(v, dim=1) for v in z], alpha, taus[0],
                                          beta, taus[1]), *zs)
    _assert_same(lambda *z: ref.cacr_loss(*z, normalize=False, **kw),
                 lambda *z: _cacr_authors(list(z), alpha, taus[0], beta, taus[1]), *zs)


def test_cacr_two_views_closed_form():
    """Two views: mean ‖z¹_i − z²_i‖² − mean_i Σ_{j≠i} softmax_j(−d_ij)·d_ij."""
    z1, z2 = F.normalize(_randn(7, 5), dim=1), F.normalize(_randn(7, 5), dim=1)
    d = ((z1[:, None] - z2[None]) ** 2).sum(-1)
    off = ~torch.eye(7, dtype=torch.bool)
    w = torch.softmax((-d).masked_fill(~off, float("-inf")), dim=1)
    expected = ((z1 - z2) ** 2).sum(1).mean() - (w * d).masked_fill(~off, 0).sum(1).mean()
    torch.testing.assert_close(ref.cacr_loss(z1, z2), expected, rtol=1e-12, atol=1e-12)


def test_cacr_sharp_weights_and_equal_features():
    zs = [_randn(6, 8) for _ in range(3)]
    _assert_same(lambda *z: ref.cacr_loss(*z, attraction_temperature=1e3,
                                          repulsion_temperature=1e3, normalize=False),
                 lambda *z: _cacr_authors(list(z), 1.0, 1e3, 1.0, 1e3), *zs)
    same = [torch.ones(5, 4, dtype=F64) for _ in range(3)]
    _assert_same(lambda *z: ref.cacr_loss(*z), lambda *z: _cacr_authors(
        [F.normalize(v, dim=1) for v in z]), *same)
    assert ref.cacr_loss(*same) == 0


# ------------------------------------------------------------------------------ AMCL


class _TemperatureHeadAuthors(nn.Module):
    """The AMCL authors' TemperatureHead (``.float()`` casts left out)."""

    def __init__(self, phi, tau_min=1e-5, tau_max=2.0):
        super().__init__()
        self.tau_min, self.tau_max, self.phi = float(tau_min), float(tau_max), phi

    def score_to_temperature(self, score):
        return self.tau_min + (self.tau_max - self.tau_min) * torch.sigmoid(-score)

    def forward(self, z1, z2):
        return self.score_to_temperature((self.phi(z1) * self.phi(z2)).sum(dim=-1))


def _omega_authors(tau, dim):
    return 0.5 * float(dim) * torch.log(tau) + torch.reciprocal(tau)


class _AMCLNTXentAuthors(nn.Module):
    """The AMCL authors' amcl/losses.py AMCLNTXentLoss (``.float()`` casts left out)."""

    def __init__(self, dim, phi, num_heads, beta=0.01, tau_min=1e-5, tau_max=2.0, topk=100):
        super().__init__()
        self.num_heads, self.beta, self.topk, self.dim = num_heads, float(beta), topk, dim
        self.temperature = _TemperatureHeadAuthors(phi, tau_min, tau_max)

    def _pair_temperatures(self, anchor, negative):
        pa = self.temperature.phi(anchor)
        pn = self.temperature.phi(negative.reshape(-1, negative.size(-1)))
        pn = pn.reshape(negative.size(0), negative.size(1), -1)
        scores = torch.einsum("bd,bnd->bn", pa, pn)
        return self.temperature.score_to_temperature(scores)

    def _direction(self, anchor, positive, negatives):
        anchor = F.normalize(anchor, dim=-1)
        positive = F.normalize(positive, dim=-1)
        negatives = F.normalize(negatives, dim=-1)
        pos_sim = (anchor * positive).sum(-1)
        tau_pos = self.temperature(anchor, positive)
        sim_neg = (anchor[:, None, :] * negatives).sum(-1)
        tau_neg = self._pair_temperatures(anchor, negatives)
        k = min(self.topk, negatives.size(1))
        vals, idx = sim_neg.topk(k=k, dim=1, largest=True, sorted=False)
        tau_top = tau_neg.gather(1, idx)
        neg = (vals / tau_top).mean(dim=1)
        reg_pos = self.beta * _omega_authors(tau_pos, self.dim)
        reg_neg = self.beta * (torch.log(tau_top).sum(dim=1) + torch.reciprocal(tau_top).sum(dim=1))
        return (-pos_sim / tau_pos + neg + reg_pos - reg_neg).mean()

    def forward(self, z1, z2):
        b, c, d = z1.shape
        eye = torch.eye(b, dtype=torch.bool, device=z1.device)
        losses = []
        for h in range(c):
            a, p = z1[:, h], z2[:, h]
            same_view_other = z1[:, h].unsqueeze(0).expand(b, -1, -1)[~eye].view(b, b - 1, d)
            other_view_other = z2[:, h].unsqueeze(0).expand(b, -1, -1)[~eye].view(b, b - 1, d)
            neg_a = torch.cat([same_view_other, other_view_other], dim=1)
            neg_p = torch.cat([other_view_other, same_view_other], dim=1)
            losses.append(self._direction(a, p, neg_a))
            losses.append(self._direction(p, a, neg_p))
        return torch.stack(losses).view(c, 2).mean(dim=1).sum()


def _phi(d, hidden=None):
    hidden = d if hidden is None else hidden
    return nn.Sequential(nn.Linear(d, hidden), nn.ReLU(inplace=True), nn.Linear(hidden, d)).double()


@pytest.mark.parametrize("b, heads, topk", [(2, 1, 100), (9, 3, 5), (9, 3, 16), (6, 2, 100)])
@pytest.mark.parametrize("beta", [0.01, 0.5])
def test_amcl_equals_authors(b, heads, topk, beta):
    d = 12
    phi = _phi(d, hidden=7)
    theirs_phi = copy.deepcopy(phi)
    oracle = _AMCLNTXentAuthors(d, theirs_phi, heads, beta=beta, topk=topk)
    z1, z2 = _randn(b, heads, d), _randn(b, heads, d)
    _assert_same(lambda x, y: ref.amcl_loss(x, y, phi, beta=beta, topk=topk),
                 oracle, z1, z2)
    for p, q in zip(phi.parameters(), theirs_phi.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-9, atol=1e-11)


def test_amcl_tau_bounds_and_equal_features():
    d, b = 8, 5
    phi = _phi(d)
    with torch.no_grad():  # large φ scores: temperatures at both ends of [τ_min, τ_max]
        for p in phi.parameters():
            p.mul_(6)
    oracle = _AMCLNTXentAuthors(d, copy.deepcopy(phi), 2, tau_min=1e-3, tau_max=3.0)
    z1, z2 = _randn(b, 2, d), _randn(b, 2, d)
    _assert_same(lambda x, y: ref.amcl_loss(x, y, phi, tau_min=1e-3, tau_max=3.0), oracle,
                 z1, z2, rtol=1e-8)
    same = torch.ones(b, 2, d, dtype=F64)
    _assert_same(lambda x, y: ref.amcl_loss(x, y, phi), _AMCLNTXentAuthors(d, phi, 2), same, same)


# -------------------------------------------------------------------------- DCL / HCL


def _negative_mask_authors(batch_size):
    negative_mask = torch.ones((batch_size, 2 * batch_size), dtype=bool)
    for i in range(batch_size):
        negative_mask[i, i] = 0
        negative_mask[i, i + batch_size] = 0
    return torch.cat((negative_mask, negative_mask), 0)


def _dcl_hcl_authors(out_1, out_2, temperature, tau_plus, beta=None, shift=0.0):
    """chingyaoc/DCL main.py's debiased criterion (``beta=None``) and joshr17/HCL
    image/main.py's ``criterion`` with estimator='hard'. ``shift`` divides every
    exponential (and the floor) by e^shift, which leaves the loss unchanged and
    keeps e^{s/t} finite at small t; 0 is the authors' arithmetic verbatim."""
    batch_size = out_1.shape[0]
    out = torch.cat([out_1, out_2], dim=0)
    neg = torch.exp(torch.mm(out, out.t().contiguous()) / temperature - shift)
    neg = neg.masked_select(_negative_mask_authors(batch_size)).view(2 * batch_size, -1)
    pos = torch.exp(torch.sum(out_1 * out_2, dim=-1) / temperature - shift)
    pos = torch.cat([pos, pos], dim=0)
    N = batch_size * 2 - 2
    if beta is None:
        Ng = (-tau_plus * N * pos + neg.sum(dim=-1)) / (1 - tau_plus)
    else:
        imp = (beta * neg.log()).exp()
        reweight_neg = (imp * neg).sum(dim=-1) / imp.mean(dim=-1)
        Ng = (-tau_plus * N * pos + reweight_neg) / (1 - tau_plus)
    Ng = torch.clamp(Ng, min=N * np.e ** (-1 / temperature - shift))
    return (-torch.log(pos / (pos + Ng))).mean()


def _authors_on_unit_rows(t, tau_plus, beta=None, shift=0.0):
    """The authors' models L2-normalise their outputs; their criteria do not."""
    return lambda a, c: _dcl_hcl_authors(F.normalize(a, dim=1), F.normalize(c, dim=1), t,
                                         tau_plus, beta, shift)


@pytest.mark.parametrize("b", [2, 16])
@pytest.mark.parametrize("t", [0.5, 0.1])
@pytest.mark.parametrize("tau_plus", [0.0, 0.1, 0.5, 0.99])
def test_dcl_equals_authors(b, t, tau_plus):
    z1, z2 = _views(b, 24)
    _assert_same(lambda a, c: ref.dcl_loss(a, c, t, tau_plus), _authors_on_unit_rows(t, tau_plus),
                 z1, z2)


@pytest.mark.parametrize("b", [2, 16])
@pytest.mark.parametrize("t", [0.5, 0.1])
@pytest.mark.parametrize("tau_plus", [0.0, 0.1, 0.99])
@pytest.mark.parametrize("beta", [0.0, 1.0, 3.0])
def test_hcl_equals_authors(b, t, tau_plus, beta):
    z1, z2 = _views(b, 24)
    _assert_same(lambda a, c: ref.hcl_loss(a, c, t, tau_plus, beta),
                 _authors_on_unit_rows(t, tau_plus, beta), z1, z2)


def test_dcl_floor_binds_near_the_upper_prior():
    """τ⁺ near 1 with close views: the estimate falls below M·e^{−1/t} (or below 0)
    on every row, the floor holds, and only the positive carries a gradient."""
    z1, z2 = _views(8, 16, spread=0.3)
    _assert_same(lambda a, c: ref.dcl_loss(a, c, 0.5, 0.999),
                 _authors_on_unit_rows(0.5, 0.999), z1, z2)
    logits = F.normalize(torch.cat([z1, z2]), dim=1) @ F.normalize(torch.cat([z1, z2]), dim=1).T
    pos = torch.cat([logits.diagonal(8), logits.diagonal(8)]) / 0.5
    floor = np.log(14) - 2
    torch.testing.assert_close(ref.dcl_loss(z1, z2, 0.5, 0.999, reduction="none"),
                               F.softplus(floor - pos), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("loss", ["dcl", "hcl"])
@pytest.mark.parametrize("t", [1e-2, 1e-3])
def test_dcl_hcl_small_temperature(loss, t):
    """Finite in log space where the authors' e^{s/t} overflows; equal to their
    arithmetic with every exponential divided by e^{1/t}."""
    z1, z2 = _views(6, 16, spread=0.05)
    beta = 1.0 if loss == "hcl" else None
    fn = ((lambda a, c: ref.hcl_loss(a, c, t, 0.1, 1.0)) if loss == "hcl"
          else (lambda a, c: ref.dcl_loss(a, c, t, 0.1)))
    if t == 1e-3:
        with torch.no_grad():
            assert not torch.isfinite(_authors_on_unit_rows(t, 0.1, beta)(z1, z2))
    _assert_same(fn, _authors_on_unit_rows(t, 0.1, beta, shift=1 / t), z1, z2, rtol=1e-7,
                 atol=1e-9)


def test_hcl_and_dcl_reduce_to_nt_xent():
    from pyclloss.reference.info_nce import nt_xent
    z1, z2 = _views(10, 8)
    torch.testing.assert_close(ref.dcl_loss(z1, z2, 0.2, 0.0), nt_xent(z1, z2, 0.2))
    torch.testing.assert_close(ref.hcl_loss(z1, z2, 0.2, 0.0, 0.0), nt_xent(z1, z2, 0.2))
    torch.testing.assert_close(ref.hcl_loss(z1, z2, 0.2, 0.3, 0.0), ref.dcl_loss(z1, z2, 0.2, 0.3))


def test_dcl_hcl_equal_features():
    same = torch.ones(4, 6, dtype=F64)
    _assert_same(lambda a, c: ref.dcl_loss(a, c, 0.5, 0.1), _authors_on_unit_rows(0.5, 0.1),
                 same, same)
    _assert_same(lambda a, c: ref.hcl_loss(a, c, 0.5, 0.1, 1.0),
                 _authors_on_unit_rows(0.5, 0.1, 1.0), same, same)


# ------------------------------------------------------------------ decoupled (lightly)


@pytest.fixture(scope="module")
def lightly_dcl():
    return peer_or_skip(peers.lightly_dcl)


# lightly's DCLW weights re-wrap a tensor in torch.tensor(), which warns
LIGHTLY_WARNING = "ignore:To copy construct from a tensor"


@pytest.mark.filterwarnings(LIGHTLY_WARNING)
@pytest.mark.parametrize("b", [2, 17])
@pytest.mark.parametrize("t", [0.1, 1e-3])
@pytest.mark.parametrize("weight", ["none", "vmf"])
def test_decoupled_equals_lightly(lightly_dcl, b, t, weight):
    theirs = (lightly_dcl.DCLLoss(temperature=t) if weight == "none"
              else lightly_dcl.DCLWLoss(temperature=t, sigma=0.5))
    _assert_same(lambda a, c: ref.decoupled_nt_xent(a, c, t, weight), theirs, *_views(b, 16),
                 rtol=1e-9, atol=1e-10)


@pytest.mark.filterwarnings(LIGHTLY_WARNING)
def test_decoupled_vmf_weights_equal_lightly(lightly_dcl):
    z1, z2 = _views(9, 8)
    a, c = F.normalize(z1, dim=1), F.normalize(z2, dim=1)
    theirs = lightly_dcl.negative_mises_fisher_weights(a, c, sigma=0.3)
    torch.testing.assert_close(ref.von_mises_fisher_weights(z1, z2, 0.3), theirs)


# ------------------------------------------------------- weights, reduction, gradcheck


@functools.lru_cache(maxsize=None)
def _shared_phi(d):
    """One temperature network per width: every call of a test sees the same."""
    return _phi(d)


LOSSES = {  # name -> (loss(z1, z2, **kw), rows per sample)
    "cacr": (lambda a, c, **kw: ref.cacr_loss(a, c, a.flip(0) + 0.1 * c, **kw), 1),
    "amcl": (lambda a, c, **kw: ref.amcl_loss(a.view(a.shape[0], 2, -1), c.view(c.shape[0], 2, -1),
                                              _shared_phi(a.shape[1] // 2), topk=4, **kw), 1),
    "dcl": (lambda a, c, **kw: ref.dcl_loss(a, c, 0.3, 0.1, **kw), 2),
    "hcl": (lambda a, c, **kw: ref.hcl_loss(a, c, 0.3, 0.1, 1.0, **kw), 2),
    "decoupled": (lambda a, c, **kw: ref.decoupled_nt_xent(a, c, 0.3, **kw), 2),
    "decoupled vmf": (lambda a, c, **kw: ref.decoupled_nt_xent(a, c, 0.3, "vmf", **kw), 2),
}


@pytest.mark.parametrize("name", LOSSES)
def test_weights_and_reductions(name):
    fn, rows = LOSSES[name]
    b = 7
    z1, z2 = _views(b, 8)
    per = fn(z1, z2, reduction="none")
    assert per.shape == (rows * b,)
    torch.testing.assert_close(fn(z1, z2), per.mean())
    torch.testing.assert_close(fn(z1, z2, reduction="sum"), per.sum())
    w = torch.rand(b, dtype=F64) * 2
    w_rows = w.repeat(rows)
    torch.testing.assert_close(fn(z1, z2, weights=w), (w_rows * per).sum() / w_rows.sum())
    # integer weights: the mean over a batch with each sample repeated w times
    w = torch.tensor([1.0, 0, 2, 1, 3, 0, 1], dtype=F64)
    torch.testing.assert_close(fn(z1, z2, weights=w, reduction="sum"),
                               (w.repeat(rows) * per).sum())


@pytest.mark.parametrize("name", [n for n in LOSSES if n != "decoupled vmf"])
def test_gradcheck_float64(name):
    """(DCLW's weights are detached, as lightly's: not a function's gradient.)"""
    fn, _ = LOSSES[name]
    z1, z2 = _views(5, 6)
    assert torch.autograd.gradcheck(lambda a, c: fn(a, c), (z1.requires_grad_(),
                                                            z2.requires_grad_()))


def test_gradcheck_amcl_temperature_net():
    phi = _phi(4, hidden=3)
    names = [name for name, _ in phi.named_parameters()]
    z1, z2 = _randn(4, 1, 4), _randn(4, 1, 4)

    def loss(*weights):
        def net(x):
            return torch.func.functional_call(phi, dict(zip(names, weights)), (x,))
        return ref.amcl_loss(z1, z2, net, topk=3)

    assert torch.autograd.gradcheck(loss, tuple(p.detach().clone().requires_grad_()
                                                for p in phi.parameters()))


def test_decoupled_rejects_an_unknown_weight():
    with pytest.raises(ValueError, match="weight must be 'none' or 'vmf'"):
        ref.decoupled_nt_xent(*_views(3, 4), weight="cosine")


# ------------------------------------------------------------------ quality weights


def _genview_weights(sim_foreground, sim_background, gamma=1):
    """GenView mmpretrain/models/selfsup/mocov3.py MoCoV3.calculate_weight."""
    score = sim_foreground - sim_background
    score = torch.exp(gamma * score)
    loss_weight = score / score.sum() * score.shape[0]
    return score, loss_weight.detach()


@pytest.mark.parametrize("gamma", [1.0, 0.0, 4.0, -2.0])
def test_quality_weights_equal_genview(gamma):
    fg, bg = torch.rand(11, dtype=F64), torch.rand(11, dtype=F64)
    scores = (fg - bg).requires_grad_()
    w = quality_weights(scores, gamma)
    torch.testing.assert_close(w, _genview_weights(fg, bg, gamma)[1])
    assert not w.requires_grad and w.dtype == F64
    torch.testing.assert_close(w.sum(), torch.tensor(11.0, dtype=F64))
    half = quality_weights(scores.detach().half(), gamma)
    assert half.dtype == torch.float32


def test_quality_weights_stable_where_genview_overflows():
    scores = torch.tensor([800.0, 790.0, 0.0], dtype=F64)
    assert not torch.isfinite(_genview_weights(scores, torch.zeros(3, dtype=F64))[1]).all()
    torch.testing.assert_close(quality_weights(scores),
                               3 * torch.softmax(scores, 0), rtol=1e-12, atol=0)


def test_quality_weights_as_loss_weights():
    """GenView passes the weights to a weighted cross-entropy, mean over the batch:
    mean_i w_i·L_i, which is our weighted mean since Σ w = B."""
    z1, z2 = _views(6, 8)
    w = quality_weights(torch.randn(6, dtype=F64), 2.0)
    per = pyclloss.nt_xent(z1, z2, 0.2, reduction="none", backend="reference")
    torch.testing.assert_close(pyclloss.nt_xent(z1, z2, 0.2, weights=w, backend="reference"),
                               (torch.cat([w, w]) * per).mean())


@pytest.mark.parametrize("scores, gamma, error, match", [
    ([1.0, 2.0], 1.0, TypeError, "scores must be a torch.Tensor"),
    (torch.arange(3), 1.0, TypeError, "scores must be a floating-point tensor"),
    (torch.ones(2, 2), 1.0, ValueError, r"scores must have shape \(n,\)"),
    (torch.ones(0), 1.0, ValueError, r"scores must have shape \(n,\)"),
    (torch.tensor([1.0, float("nan")]), 1.0, ValueError, "scores contains NaN or Inf"),
    (torch.ones(3), "1", TypeError, "gamma must be a number"),
    (torch.ones(3), True, TypeError, "gamma must be a number"),
    (torch.ones(3), float("inf"), ValueError, "gamma must be finite"),
    (torch.tensor([3e38, 0.0]), 10.0, ValueError, "gamma \\* scores must be finite"),
])
def test_quality_weights_bad_input(scores, gamma, error, match):
    with pytest.raises(error, match=match):
        quality_weights(scores, gamma)


# ------------------------------------------------------------------------------ DBPM


class _DBPMAuthors:
    """The DBPM authors' models/dbpm_model.py simpleModel.fit: a dict memory of
    per-instance losses, the statistics at the start of each epoch after the
    warm-up, the Gaussian re-weighting of the flagged instances."""

    def __init__(self, num_samples, max_epochs, warm_epochs, cut_np, cut_fp):
        self.memory_module = dict([(k, []) for k in np.arange(num_samples)])
        self.max_epochs, self.warm_epochs = max_epochs, warm_epochs
        self.cut_np, self.cut_fp = cut_np, cut_fp
        self.np_index, self.fp_index = [], []

    def start_epoch(self, epoch):
        if epoch >= self.warm_epochs:
            epoch_weight = [(1 + i) / self.max_epochs for i in range(epoch)]
            instance_mean = {k: np.mean(np.array(v) * epoch_weight) for k, v in
                             sorted(self.memory_module.items(), key=lambda item: item[1])}
            mu = np.mean(list(instance_mean.values()))
            sd = np.std(list(instance_mean.values()))
            self.gaussian_norm = norm(mu, sd)
            np_bound = mu - self.cut_np * sd
            fp_bound = mu + self.cut_fp * sd
            self.np_index = [k for k in instance_mean.keys() if instance_mean[k] <= np_bound]
            self.fp_index = [k for k in instance_mean.keys() if instance_mean[k] >= fp_bound]
            self.mu, self.sd = mu, sd

    def step(self, epoch, pos_loss, index):
        for i in range(len(index)):
            self.memory_module[index[i].cpu().item()].append(pos_loss[i].cpu().item())
        if epoch >= self.warm_epochs:
            l = pos_loss.detach().cpu()
            w = self.gaussian_norm.pdf(l)
            for i in range(len(index)):
                _id = index[i].cpu().item()
                if _id in self.np_index:
                    pos_loss[i] *= w[i]
                elif _id in self.fp_index:
                    pos_loss[i] *= w[i]
        return torch.mean(pos_loss)


def _epoch_losses(n):
    """Per-sample losses with a stable character per sample: most near 3, two
    persistently low (noisy), two persistently high (faulty)."""
    base = 3 + 0.3 * torch.randn(n, dtype=F64)
    base[:2] = 0.5
    base[-2:] = 7.0
    return lambda: base + 0.1 * torch.randn(n, dtype=F64)


def _run_epochs(modules, oracle, n, batch, epochs, first_epoch=0):
    losses = _epoch_losses(n)
    for epoch in range(first_epoch, first_epoch + epochs):
        oracle.start_epoch(epoch)
        if epoch >= oracle.warm_epochs:
            for m in modules:
                assert sorted(m.noisy_indices.tolist()) == sorted(int(k) for k in oracle.np_index)
                assert sorted(m.faulty_indices.tolist()) == sorted(int(k) for k in oracle.fp_index)
                torch.testing.assert_close(m.mu.item(), float(oracle.mu), rtol=1e-12, atol=0)
                torch.testing.assert_close(m.sigma.item(), float(oracle.sd), rtol=1e-12, atol=0)
        current = losses()
        for idx in torch.randperm(n).split(batch):
            expected, (g_theirs,) = _grads(lambda x: oracle.step(epoch, x * 1, idx), current[idx])
            for m in modules:
                value, (g_ours,) = _grads(lambda x: m(x, idx), current[idx])
                torch.testing.assert_close(value, expected, rtol=1e-12, atol=1e-15)
                torch.testing.assert_close(g_ours, g_theirs, rtol=1e-12, atol=1e-15)
        for m in modules:
            m.end_epoch()


def test_dbpm_equals_authors():
    n, warm = 50, 3
    oracle = _DBPMAuthors(n, max_epochs=8, warm_epochs=warm, cut_np=2.0, cut_fp=2.0)
    dbpm = DBPM(n, max_epochs=8, warmup_epochs=warm, cut_noisy=2.0, cut_faulty=2.0)
    _run_epochs([dbpm], oracle, n, 16, 8)
    assert dbpm.noisy_indices.tolist() == [0, 1]
    assert dbpm.faulty_indices.tolist() == [48, 49]
    assert int(dbpm.epoch) == 8


def test_dbpm_state_dict_round_trip():
    n = 30
    oracle = _DBPMAuthors(n, max_epochs=9, warm_epochs=2, cut_np=1.5, cut_fp=1.5)
    dbpm = DBPM(n, max_epochs=9, warmup_epochs=2, cut_noisy=1.5, cut_faulty=1.5)
    _run_epochs([dbpm], oracle, n, 7, 4)
    buffer = io.BytesIO()
    torch.save(dbpm.state_dict(), buffer)
    buffer.seek(0)
    restored = DBPM(n, max_epochs=9, warmup_epochs=2, cut_noisy=1.5, cut_faulty=1.5)
    restored.load_state_dict(torch.load(buffer))
    for name in ("weighted_loss_sum", "epochs_recorded", "noisy", "faulty", "epoch", "mu", "sigma"):
        assert torch.equal(getattr(restored, name), getattr(dbpm, name)), name
    assert torch.equal(restored.memory, dbpm.memory)
    assert len(restored.faulty_indices) > 0
    _run_epochs([dbpm, restored], oracle, n, 7, 4, first_epoch=4)


def test_dbpm_memory_is_the_epoch_weighted_mean():
    dbpm = DBPM(4, max_epochs=10, warmup_epochs=100)
    idx = torch.tensor([2, 0])
    assert torch.isnan(dbpm.memory).all()
    for epoch, values in enumerate([[1.0, 2.0], [3.0, 5.0]]):
        dbpm(torch.tensor(values), idx)
        dbpm.end_epoch()
    # (1/E)·Σ_e ((e+1)/E_max)·L^(e): sample 2 saw 1 then 3, sample 0 saw 2 then 5
    expected = torch.tensor([(0.1 * 2 + 0.2 * 5) / 2, float("nan"), (0.1 * 1 + 0.2 * 3) / 2,
                             float("nan")], dtype=F64)
    torch.testing.assert_close(dbpm.memory, expected, equal_nan=True)
    dbpm.eval()  # evaluation records nothing
    dbpm(torch.tensor([100.0]), torch.tensor([1]))
    dbpm.end_epoch()
    assert torch.isnan(dbpm.memory[1])


def test_dbpm_equal_memory_flags_nothing():
    """σ = 0: no sample stands out (the authors' norm(μ, 0).pdf would be NaN)."""
    dbpm = DBPM(3, max_epochs=5, warmup_epochs=1)
    dbpm(torch.ones(3), torch.arange(3))
    dbpm.end_epoch()
    assert dbpm.sigma == 0 and not dbpm.noisy.any() and not dbpm.faulty.any()
    torch.testing.assert_close(dbpm(torch.full((3,), 2.0), torch.arange(3)), torch.tensor(2.0))


def test_dbpm_weights_method():
    dbpm = DBPM(5, max_epochs=4, warmup_epochs=0)
    dbpm.noisy[1] = True
    dbpm.mu.fill_(1.0)
    dbpm.sigma.fill_(0.5)
    loss = torch.tensor([1.0, 1.5, 2.0])
    w = dbpm.weights(loss, torch.tensor([0, 1, 2]))
    torch.testing.assert_close(w, torch.tensor([1.0, norm(1.0, 0.5).pdf(1.5), 1.0], dtype=F64))


@pytest.mark.parametrize("kwargs, error, match", [
    (dict(num_samples=0, max_epochs=3), ValueError, "num_samples must be >= 1"),
    (dict(num_samples=2.0, max_epochs=3), TypeError, "num_samples must be an int"),
    (dict(num_samples=4, max_epochs=0), ValueError, "max_epochs must be >= 1"),
    (dict(num_samples=4, max_epochs=3, warmup_epochs=-1), ValueError, "warmup_epochs must be >= 0"),
    (dict(num_samples=4, max_epochs=3, cut_noisy=-1.0), ValueError, "cut_noisy must be finite"),
    (dict(num_samples=4, max_epochs=3, cut_faulty=float("nan")), ValueError, "cut_faulty"),
    (dict(num_samples=4, max_epochs=3, cut_faulty="3"), TypeError, "cut_faulty must be a real"),
])
def test_dbpm_bad_arguments(kwargs, error, match):
    with pytest.raises(error, match=match):
        DBPM(**kwargs)


@pytest.mark.parametrize("loss, idx, error, match", [
    (torch.ones(2), torch.tensor([0, 4]), ValueError, "indices must index the data set of 4"),
    (torch.ones(2), torch.tensor([-1, 0]), ValueError, "indices must index the data set"),
    (torch.ones(2), torch.tensor([0.0, 1.0]), TypeError, "indices must hold integers"),
    (torch.ones(2), torch.tensor([0, 1, 2]), ValueError, r"indices must have shape \(2,\)"),
    (torch.ones(2), [0, 1], TypeError, "indices must be a torch.Tensor"),
    (torch.ones(2, 1), torch.tensor([0, 1]), ValueError, "per_sample_loss must have shape"),
    (torch.tensor([1.0, float("inf")]), torch.tensor([0, 1]), ValueError,
     "per_sample_loss contains NaN or Inf"),
    (torch.tensor([1, 2]), torch.tensor([0, 1]), TypeError, "per_sample_loss must be a floating"),
])
def test_dbpm_bad_batch(loss, idx, error, match):
    dbpm = DBPM(4, max_epochs=3)
    with pytest.raises(error, match=match):
        dbpm(loss, idx)
    assert not dbpm.epoch_seen.any()


# ------------------------------------------------------------------------ DirectPred


class _AccumulatorAuthors:
    """luckmatters ssl/real-dataset/byol_trainer.py Accumulator (dyn_lambda set)."""

    def __init__(self, dyn_lambda):
        self.dyn_lambda, self.cumulated, self.counter = dyn_lambda, None, 0

    def add_list(self, d_list):
        self.add(torch.cat(d_list, dim=0).mean(dim=0))

    def add(self, d):
        if self.cumulated is None:
            self.cumulated = d
        else:
            self.cumulated = self.dyn_lambda * self.cumulated + (1 - self.dyn_lambda) * d
        self.counter += 1

    def get(self):
        return self.cumulated.clone()


def _compute_w_corr_authors(M, dyn_eps, dyn_convert=2):
    """BYOLTrainer.compute_w_corr, balance_type='boost_scale', dyn_eps_inside=False,
    dyn_reg=None; torch.eig (removed from PyTorch) as torch.linalg.eig, real parts."""
    D, Q = torch.linalg.eig(M)
    D, Q = D.real, Q.real
    max_eig = D.max()
    eigen_values = D.clamp(0) / max_eig
    eigen_values = eigen_values.pow(1 / dyn_convert) + dyn_eps
    eigen_values = eigen_values.clamp(1e-4)
    return Q @ eigen_values.diag() @ Q.t()


@pytest.mark.parametrize("freq", [1, 3])
@pytest.mark.parametrize("rho, eps", [(0.3, 0.01), (0.8, -0.05)])
def test_direct_predictor_equals_authors(freq, rho, eps):
    """BYOLTrainer.update/regulate_predictor with predictor_reg='corr': predict both
    views with the current linear weight, accumulate the views' correlation,
    re-set the weight every ``freq`` iterations."""
    dim, b = 6, 10
    mix = _randn(dim, dim)  # correlated features with a spread of eigenvalues
    pred = DirectPredictor(dim, rho=rho, eps=eps, freq=freq).double()
    cum_corr, w = _AccumulatorAuthors(rho), torch.eye(dim, dtype=F64)
    for niter in range(7):
        f1, f2 = _randn(b, dim) @ mix, _randn(b, dim) @ mix
        p1, p2 = pred(f1, f2)
        torch.testing.assert_close(p1, f1 @ w.t(), rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(p2, f2 @ w.t(), rtol=1e-10, atol=1e-12)
        corrs = [torch.bmm(v.unsqueeze(2), v.unsqueeze(1)) for v in (f1, f2)]
        cum_corr.add_list(corrs)
        if niter % freq == 0:
            w = _compute_w_corr_authors(cum_corr.get(), eps)
        torch.testing.assert_close(pred.correlation, cum_corr.get(), rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(pred.weight, w, rtol=1e-9, atol=1e-10)


def test_direct_predictor_in_a_byol_loss():
    pred = DirectPredictor(8)
    assert list(pred.parameters()) == []
    z1, z2 = torch.randn(16, 8, requires_grad=True), torch.randn(16, 8, requires_grad=True)
    for _ in range(2):  # the second step predicts with a weight set from the first
        p1, p2 = pred(z1, z2)
        loss = (2 - 2 * F.cosine_similarity(p1, z2.detach()).mean()
                + 2 - 2 * F.cosine_similarity(p2, z1.detach()).mean())
        loss.backward()
    assert torch.isfinite(z1.grad).all() and z1.grad.abs().sum() > 0
    assert not torch.allclose(pred.weight, torch.eye(8))
    eigenvalues = torch.linalg.eigvalsh(pred.weight)
    assert eigenvalues.min() > 0 and eigenvalues.max() <= 1 + 0.01 + 1e-5
    state = pred.state_dict()
    assert set(state) == {"weight", "correlation", "steps"}
    fresh = DirectPredictor(8)
    fresh.load_state_dict(state)
    fresh.eval()
    before = fresh.weight.clone()
    torch.testing.assert_close(fresh(z1.detach()), z1.detach() @ before.T)
    assert torch.equal(fresh.weight, before)  # evaluation does not update


def test_direct_predictor_zero_features():
    """A zero correlation (max eigenvalue 0, where the authors divide 0 by 0): W = eps·I."""
    pred = DirectPredictor(4, eps=0.02)
    pred(torch.zeros(3, 4))
    torch.testing.assert_close(pred.weight, 0.02 * torch.eye(4))


@pytest.mark.parametrize("kwargs, error, match", [
    (dict(dim=0), ValueError, "dim must be >= 1"),
    (dict(dim=4, rho=1.0), ValueError, r"rho must be finite and in \[0.0, 1.0\)"),
    (dict(dim=4, rho=-0.1), ValueError, "rho must be"),
    (dict(dim=4, eps=float("nan")), ValueError, "eps must be finite"),
    (dict(dim=4, freq=0), ValueError, "freq must be >= 1"),
    (dict(dim=4, freq=1.5), TypeError, "freq must be an int"),
])
def test_direct_predictor_bad_arguments(kwargs, error, match):
    with pytest.raises(error, match=match):
        DirectPredictor(**kwargs)


@pytest.mark.parametrize("views, error, match", [
    ((), TypeError, "at least one view"),
    ((torch.ones(3, 5),), ValueError, r"views\[0\] must have 4 features"),
    ((torch.ones(3, 4), torch.ones(4)), ValueError, r"views\[1\] must have shape"),
    ((torch.ones(3, 4, dtype=torch.int64),), TypeError, r"views\[0\] must be float"),
    ((torch.full((3, 4), float("nan")),), ValueError, r"views\[0\] contains NaN"),
])
def test_direct_predictor_bad_input(views, error, match):
    pred = DirectPredictor(4)
    with pytest.raises(error, match=match):
        pred(*views)
    assert pred.steps == 0
