"""Every "equals X" of the README and the docstrings, against X's own code:
pytorch-metric-learning, lightly and open_clip (each skipped when not
installed), diffsort, and the papers' code that is not a package, written out
in the tests as the authors wrote it: SupContrast's SupConLoss, the
feature-transformation MoCo of Zhu et al. and Rank-N-Contrast's RnCLoss
(tests/test_rnc.py). Ordinary batches and the edge cases: all labels
equal, one or two samples, tau = 1e-3, (B, V, D) inputs, weights. Where a
peer's convention differs from ours, the test pins the documented difference
on the peer's own output."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import pyclloss
from pyclloss.tools import peers

from helpers import authors_rnc, fused_backends, peer_or_skip

# float64 inputs: the reference and the C++ kernels take them.
BACKENDS = ["reference"] + [b for b in fused_backends("cpu") if b == "cpp"]
TINY = torch.finfo(torch.float64).tiny


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


def _pml():
    return peer_or_skip(peers.pml_losses)


def _pml_per_element(loss, x, y):
    """A pytorch-metric-learning loss without its reducer: (losses, anchor indices),
    empty when the peer returns its zero loss."""
    reducers = pytest.importorskip("pytorch_metric_learning.reducers")
    loss.reducer = reducers.DoNothingReducer()
    out = loss(x, y)["loss"]
    if not torch.is_tensor(out["losses"]):  # the peer's "no pairs" zero
        return torch.zeros(0, dtype=x.dtype), torch.zeros(0, dtype=torch.long)
    indices = out["indices"]
    return out["losses"], indices[0] if isinstance(indices, tuple) else indices


def _clustered(n, d, spread=0.05, dtype=torch.float64):
    """Rows within a few degrees of one direction: at tau = 1e-3 every logit gap
    stays below ~100, where every peer's arithmetic is exact."""
    return torch.randn(d, dtype=dtype) + spread * torch.randn(n, d, dtype=dtype)


LABEL_CASES = {  # name -> labels
    "five classes": torch.arange(24) % 5,
    "two classes": torch.arange(31) % 2,
    "all distinct": torch.arange(9),
    "all equal": torch.zeros(8, dtype=torch.long),
    "singletons and pairs": torch.tensor([0, 0, 1, 2, 3, 3, 3, 4]),
    "two, equal": torch.tensor([3, 3]),
    "two, different": torch.tensor([0, 1]),
    "one": torch.tensor([0]),
}


# ------------------------------------------------------ pytorch-metric-learning NTXentLoss


def _rows(n, d, tau):
    """Random rows; clustered ones at tau = 1e-3 (see _clustered)."""
    return _clustered(n, d) if tau < 0.01 else torch.randn(n, d, dtype=torch.float64)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", LABEL_CASES)
@pytest.mark.parametrize("tau", [0.1, 1e-3])
def test_pair_nt_xent_equals_pytorch_metric_learning(backend, case, tau):
    losses = _pml()
    y = LABEL_CASES[case]
    x = _rows(len(y), 16, tau)
    res = _grad_pair(lambda e: pyclloss.pair_nt_xent(e, y, tau, backend=backend),
                     lambda e: losses.NTXentLoss(temperature=tau)(e, y), x)
    _assert_same(*res)


@pytest.mark.parametrize("backend", BACKENDS)
def test_pair_nt_xent_differs_from_pml_below_its_floor(backend):
    """The documented difference: pml takes log(p + tiny) of each pair's
    probability p, so a pair with p < ~1e-308 (float64; ~1e-38 in float32) has
    its loss capped at -log(tiny) = 708.4 (87.3); ours is -log p."""
    losses = _pml()
    y = torch.arange(10).repeat(2)  # every anchor: one positive pair
    x = torch.randn(20, 16, dtype=torch.float64)
    x[10] = -x[0]  # the pair (0, 10) opposite: at tau = 1e-3 a loss of ~1000 nats or more
    ours = pyclloss.pair_nt_xent(x, y, 1e-3, reduction="none", backend=backend)
    theirs, anchors = _pml_per_element(losses.NTXentLoss(temperature=1e-3), x, y)
    assert (ours > -torch.log(torch.tensor(TINY, dtype=torch.float64))).any()
    torch.testing.assert_close(theirs, -torch.log(torch.exp(-ours[anchors]) + TINY),
                               rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("backend", BACKENDS)
def test_nt_xent_equals_pml_with_view_labels_and_weights(backend):
    losses = _pml()
    b = 13
    z1, z2 = torch.randn(b, 8, dtype=torch.float64), torch.randn(b, 8, dtype=torch.float64)
    y = torch.cat([torch.arange(b), torch.arange(b)])
    res = _grad_pair(lambda a, c: pyclloss.nt_xent(a, c, 0.5, backend=backend),
                     lambda a, c: losses.NTXentLoss(0.5)(torch.cat([a, c]), y), z1, z2)
    _assert_same(*res)
    # weights: the weighted mean of pml's per-anchor losses (each anchor has one pair)
    w = torch.rand(b, dtype=torch.float64) * 3
    per_pair, anchors = _pml_per_element(losses.NTXentLoss(0.5), torch.cat([z1, z2]), y)
    w_rows = torch.cat([w, w])[anchors]
    expected = (w_rows * per_pair).sum() / w_rows.sum()
    torch.testing.assert_close(pyclloss.nt_xent(z1, z2, 0.5, weights=w, backend=backend),
                               expected, rtol=1e-10, atol=1e-12)


# ------------------------------------------------------- pytorch-metric-learning SupConLoss


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", [c for c in LABEL_CASES if c != "all equal"])
@pytest.mark.parametrize("tau", [0.1, 1e-3])
def test_supcon_equals_pytorch_metric_learning(backend, case, tau):
    losses = _pml()
    y = LABEL_CASES[case]
    x = _rows(len(y), 12, tau)
    res = _grad_pair(lambda e: pyclloss.supcon(e, y, tau, backend=backend),
                     lambda e: losses.SupConLoss(temperature=tau)(e, y), x)
    _assert_same(*res)


@pytest.mark.parametrize("backend", BACKENDS)
def test_supcon_views_equal_pml_on_the_concatenated_views(backend):
    losses = _pml()
    x, y = torch.randn(7, 3, 12, dtype=torch.float64), torch.arange(7) % 3
    res = _grad_pair(lambda e: pyclloss.supcon(e, y, 0.1, backend=backend),
                     lambda e: losses.SupConLoss(0.1)(torch.cat(e.unbind(1)), y.repeat(3)), x)
    _assert_same(*res)


@pytest.mark.parametrize("backend", BACKENDS)
def test_supcon_differs_from_pml_where_documented(backend):
    """Two documented differences. (1) A batch without any negative pair (all
    labels equal): pml returns 0, we return SupContrast's loss (the positives
    are still pulled together). (2) pml's AvgNonZeroReducer leaves out of the
    mean the anchors whose loss is exactly 0 in floating point (at small tau, a
    positive that dominates every other term); we average over every anchor
    with a positive. Per anchor the two are equal."""
    losses = _pml()
    y = torch.zeros(6, dtype=torch.long)
    x = torch.randn(6, 12, dtype=torch.float64)
    assert losses.SupConLoss(0.1)(x, y).item() == 0
    torch.testing.assert_close(pyclloss.supcon(x, y, 0.1, backend=backend),
                               supcontrast(F.normalize(x, dim=1)[:, None], y, 0.1, 0.1))

    y = torch.tensor([0, 0, 1, 1, 2, 2, 3, 3])
    x = torch.randn(8, 12, dtype=torch.float64)
    x[1] = x[0]  # anchors 0 and 1: a positive at similarity 1, every other term ~e^-400 of it
    x[3] = -x[2]  # anchors 2 and 3: a positive at similarity -1, a loss far from 0
    per_anchor = pyclloss.supcon(x, y, 1e-3, reduction="none", backend=backend)
    theirs, anchors = _pml_per_element(losses.SupConLoss(temperature=1e-3), x, y)
    torch.testing.assert_close(per_anchor[anchors], theirs, rtol=1e-9, atol=1e-12)
    zero = theirs == 0
    assert zero.any() and not zero.all()  # the case exists in this batch
    assert losses.SupConLoss(temperature=1e-3)(x, y).item() == pytest.approx(
        theirs[~zero].mean().item(), rel=1e-12)
    torch.testing.assert_close(pyclloss.supcon(x, y, 1e-3, backend=backend), per_anchor.mean())


# ------------------------------------------------------------------- SupContrast


def supcontrast_per_anchor(features, labels, temperature, base_temperature):
    """SupContrast's ``SupConLoss(temperature, contrast_mode="all",
    base_temperature)`` (HobbitLong/SupContrast, losses.py, with its fix for
    anchors without a positive), stopped before its final ``.mean()``: the loss
    of every anchor, view-major, (V·B,). ``features`` (B, V, D) are unit rows,
    as its callers pass them; ``labels`` None is SimCLR."""
    batch_size, views = features.shape[:2]
    if labels is None:
        mask = torch.eye(batch_size, dtype=features.dtype)
    else:
        labels = labels.contiguous().view(-1, 1)
        mask = torch.eq(labels, labels.T).to(features.dtype)
    contrast_feature = torch.cat(torch.unbind(features, dim=1), dim=0)
    anchor_dot_contrast = torch.div(contrast_feature @ contrast_feature.T, temperature)
    logits_max, _ = torch.max(anchor_dot_contrast, dim=1, keepdim=True)
    logits = anchor_dot_contrast - logits_max.detach()
    mask = mask.repeat(views, views)
    logits_mask = torch.scatter(torch.ones_like(mask), 1,
                                torch.arange(batch_size * views).view(-1, 1), 0)
    mask = mask * logits_mask
    exp_logits = torch.exp(logits) * logits_mask
    log_prob = logits - torch.log(exp_logits.sum(1, keepdim=True))
    mask_pos_pairs = mask.sum(1)
    mask_pos_pairs = torch.where(mask_pos_pairs < 1e-6, 1, mask_pos_pairs)
    mean_log_prob_pos = (mask * log_prob).sum(1) / mask_pos_pairs
    return -(temperature / base_temperature) * mean_log_prob_pos


def supcontrast(features, labels, temperature, base_temperature):
    """SupContrast's loss: the mean over every anchor."""
    return supcontrast_per_anchor(features, labels, temperature, base_temperature).mean()


SUPCONTRAST_CASES = {  # name -> (B, V, labels or None)
    "SimCLR": (9, 2, None),
    "labels": (12, 2, torch.arange(12) % 4),
    "all labels equal": (6, 2, torch.zeros(6, dtype=torch.long)),
    "three views": (5, 3, torch.tensor([0, 1, 0, 2, 2])),
    "one sample, two views": (1, 2, None),
    "two samples": (2, 2, torch.tensor([0, 1])),
}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", SUPCONTRAST_CASES)
@pytest.mark.parametrize("tau, tau_b", [(0.1, 0.07), (1e-3, 1e-3)])
def test_supcon_equals_supcontrast(backend, case, tau, tau_b):
    b, views, y = SUPCONTRAST_CASES[case]
    x = _rows(b * views, 10, tau).view(b, views, 10)
    res = _grad_pair(lambda e: pyclloss.supcon(e, y, tau, tau_b, backend=backend),
                     lambda e: supcontrast(F.normalize(e, dim=2), y, tau, tau_b), x)
    _assert_same(*res, rtol=1e-7)


@pytest.mark.parametrize("backend", BACKENDS)
def test_supcon_weights_weigh_supcontrasts_anchor_losses(backend):
    x, y = torch.randn(8, 2, 10, dtype=torch.float64), torch.arange(8) % 3
    w = torch.rand(8, dtype=torch.float64)
    per_anchor = supcontrast_per_anchor(F.normalize(x, dim=2), y, 0.1, 0.1)
    w_rows = w.repeat(2)  # view-major, as the anchors
    torch.testing.assert_close(pyclloss.supcon(x, y, 0.1, weights=w, backend=backend),
                               (w_rows * per_anchor).sum() / w_rows.sum(), rtol=1e-10, atol=0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_supcon_leaves_anchors_without_a_positive_out_of_the_mean(backend):
    """The documented difference: SupContrast counts an anchor without a positive
    as a 0 in its mean, we leave it out (as pml does); its terms are the same."""
    y = LABEL_CASES["singletons and pairs"]
    x = torch.randn(len(y), 1, 10, dtype=torch.float64)
    per_anchor = supcontrast_per_anchor(F.normalize(x, dim=2), y, 0.1, 0.1)
    has_positive = (y[:, None] == y[None, :]).sum(1) > 1
    assert not has_positive.all()
    torch.testing.assert_close(pyclloss.supcon(x[:, 0], y, 0.1, reduction="none",
                                               backend=backend), per_anchor)
    torch.testing.assert_close(pyclloss.supcon(x[:, 0], y, 0.1, backend=backend),
                               per_anchor[has_positive].mean())
    torch.testing.assert_close(supcontrast(F.normalize(x, dim=2), y, 0.1, 0.1),
                               per_anchor.sum() / len(y))


# ------------------------------------------------------------------------- lightly


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("b", [1, 2, 17])
@pytest.mark.parametrize("tau", [0.5, 1e-3])
def test_nt_xent_equals_lightly(backend, b, tau):
    ntxent = peer_or_skip(peers.lightly_ntxent)
    z1, z2 = torch.randn(b, 32, dtype=torch.float64), torch.randn(b, 32, dtype=torch.float64)
    res = _grad_pair(lambda a, c: pyclloss.nt_xent(a, c, tau, backend=backend),
                     lambda a, c: ntxent(temperature=tau)(a, c), z1, z2)
    _assert_same(*res, rtol=1e-7)


# ----------------------------------------------------------------------- open_clip


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("n", [1, 2, 29])
@pytest.mark.parametrize("scale", [20.0, 1000.0])
def test_clip_and_siglip_equal_open_clip(backend, n, scale):
    oc = peer_or_skip(peers.open_clip_losses)
    img = nn.functional.normalize(torch.randn(n, 24, dtype=torch.float64), dim=1)
    txt = nn.functional.normalize(torch.randn(n, 24, dtype=torch.float64), dim=1)
    scale = torch.tensor(scale, dtype=torch.float64)
    res = _grad_pair(lambda a, b, s: pyclloss.clip_loss(a, b, s, backend=backend),
                     lambda a, b, s: oc.ClipLoss()(a, b, s), img, txt, scale)
    _assert_same(*res, rtol=1e-7)
    bias = torch.tensor(-10.0, dtype=torch.float64)
    res = _grad_pair(lambda a, b, s, c: pyclloss.siglip_loss(a, b, s, c, backend=backend),
                     lambda a, b, s, c: oc.SigLipLoss()(a, b, s, c), img, txt, scale, bias)
    _assert_same(*res, rtol=1e-7)


# ------------------------------------------------------------------------ diffsort


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("network", ["odd_even", "bitonic"])
@pytest.mark.parametrize("rows, n", [(1, 2), (2, 3), (2, 8)])
@pytest.mark.parametrize("steepness", [10.0, 1000.0])
def test_diff_sort_net_equals_diffsort(backend, network, rows, n, steepness):
    diffsort = peer_or_skip(peers.diffsort_net)
    x = torch.randn(rows, n, dtype=torch.float64)
    ours_net = pyclloss.sorting.DiffSortNet(network, n, steepness, backend=backend)
    theirs_net = diffsort(network, n, steepness=steepness)
    # its network is a plain list of float32 matrices, which .to() does not reach
    theirs_net.sorting_network = [[m.double() for m in layer]
                                  for layer in theirs_net.sorting_network]
    gs, gp = torch.randn_like(x), torch.randn(rows, n, n, dtype=torch.float64)
    results = []
    for net in (ours_net, theirs_net):
        leaf = x.clone().requires_grad_()
        sorted_x, perm = net(leaf)
        ((sorted_x * gs).sum() + (perm * gp).sum()).backward()
        results.append((sorted_x.detach(), perm.detach(), leaf.grad))
    for ours, theirs in zip(*results):
        torch.testing.assert_close(ours, theirs, rtol=1e-9, atol=1e-9)


# ------------------------------------------------- feature-transformation MoCo (Zhu et al.)


def authors_ft_moco(q, k, queue, pos_mask, neg_mask, indices, temperature, postmix_norm):
    """Zhu et al.'s ``RGBMoCo_dropmix_norm.forward`` (DTennant/CL-Visualizing-
    Feature-Transformation, memory/mem_moco.py; mix_target "posneg", norm_target
    "pos") with its trainer's cross-entropy against label 0. ``pos_mask`` is
    their mask after ``expolation_mask`` added 1; q, k and the queue are unit
    rows, as their encoder and memory give them."""
    k = k.detach()
    queue = queue.clone().detach()
    q_mix = pos_mask * q + (1 - pos_mask) * k
    k_mix = pos_mask * k + (1 - pos_mask) * q
    q, k = q_mix, k_mix
    queue = neg_mask * queue + (1 - neg_mask) * queue[indices]
    if postmix_norm:
        q, k = F.normalize(q, dim=1), F.normalize(k, dim=1)
    pos = torch.bmm(q.view(len(q), 1, -1), k.view(len(q), -1, 1)).view(len(q), 1)
    neg = torch.mm(queue, q.transpose(1, 0)).transpose(0, 1)
    logits = torch.div(torch.cat((pos, neg), dim=1), temperature)
    return F.cross_entropy(logits, torch.zeros(len(q), dtype=torch.long))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("n", [1, 2, 9])
@pytest.mark.parametrize("dim_mask", ["none", "pos"])  # their scalar or per-element pos mask
@pytest.mark.parametrize("postmix_norm", [False, True])
@pytest.mark.parametrize("tau", [0.2, 1e-3])
def test_ft_moco_equals_the_authors_code(backend, n, dim_mask, postmix_norm, tau):
    d, size = 8, 13
    q_raw, k_raw, queue_raw = (_rows(rows, d, tau) for rows in (n, n, size))
    beta = torch.distributions.Beta(torch.tensor(2.0, dtype=torch.float64),
                                    torch.tensor(2.0, dtype=torch.float64))
    lam_pos = 1 + (beta.sample((n, d)) if dim_mask == "pos" else beta.sample())
    lam_neg, perm = beta.sample(), torch.randperm(size)
    k_unit, queue_unit = F.normalize(k_raw, dim=1), F.normalize(queue_raw, dim=1)
    res = _grad_pair(
        lambda q: pyclloss.ft_moco_loss(q, k_raw, queue_raw, lam_pos, lam_neg, perm, tau,
                                        normalize_mixed=postmix_norm, backend=backend),
        lambda q: authors_ft_moco(F.normalize(q, dim=1), k_unit, queue_unit, lam_pos, lam_neg,
                                  perm, tau, postmix_norm), q_raw)
    _assert_same(*res, rtol=1e-7)


# --------------------------------------------------------- Rank-N-Contrast (Zha et al.)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("b", [1, 2, 7])
@pytest.mark.parametrize("label_dims", [1, 3])
@pytest.mark.parametrize("tau", [2.0, 1e-3])
def test_rnc_equals_the_authors_code(backend, b, label_dims, tau):
    features = _rows(2 * b, 5, tau).view(b, 2, 5)
    labels = torch.randint(0, 4, (b, label_dims)).double()  # ties included
    res = _grad_pair(lambda f: pyclloss.rnc_loss(f, labels, tau, backend=backend),
                     lambda f: authors_rnc(f, labels, tau), features)
    _assert_same(*res, rtol=1e-7)
