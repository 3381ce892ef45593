"""The drop-in adapters (pyclloss.compat) against the peers' own modules: same
signatures, and called exactly as each peer's training code calls its loss,
the same values and gradients (each skipped when its peer is not installed)."""

import inspect

import pytest
import torch
import torch.distributed as dist

from pyclloss.tools import peers
from pyclloss.compat import lightly as compat_lightly
from pyclloss.compat import open_clip as compat_open_clip
from pyclloss.compat import pml as compat_pml

from helpers import fused_backends, peer_or_skip, spawn_ranks

BACKENDS = ["reference"] + [b for b in fused_backends("cpu") if b == "cpp"]


def _pml():
    pml = pytest.importorskip("pytorch_metric_learning")
    for part in ("distances", "losses", "miners", "reducers", "regularizers"):
        pytest.importorskip(f"pytorch_metric_learning.{part}")
    return pml


def _signature(fn, drop=("backend",)):
    return [(p.name, p.default, p.kind) for p in inspect.signature(fn).parameters.values()
            if p.name not in drop]


def _assert_same_signatures(theirs, ours):
    for method in ("__init__", "forward"):
        assert _signature(getattr(ours, method)) == _signature(getattr(theirs, method)), method


def _leaves(*tensors):
    return [t.detach().clone().requires_grad_() for t in tensors]


def _assert_same(loss_a, loss_b, leaves_a, leaves_b, rtol=1e-6, atol=1e-9):
    """Equal values, and equal gradients on every leaf (None where the peer's is None)."""
    torch.testing.assert_close(loss_a, loss_b, rtol=rtol, atol=atol)
    for a, b in zip(leaves_a, leaves_b):
        if b.grad is None:
            assert a.grad is None or not a.grad.any()
        else:
            torch.testing.assert_close(a.grad, b.grad, rtol=max(rtol, 1e-5), atol=atol)


# ---------------------------------------------------------------- open_clip


def test_open_clip_signatures():
    theirs = peer_or_skip(peers.open_clip_losses)
    _assert_same_signatures(theirs.ClipLoss, compat_open_clip.ClipLoss)
    _assert_same_signatures(theirs.SigLipLoss, compat_open_clip.SigLipLoss)


def _open_clip_model_out(n=12, d=16, bias=True):
    """What an open_clip model returns: normalised features, exp'd scale, bias."""
    x, y = torch.randn(n, d, dtype=torch.float64), torch.randn(n, d, dtype=torch.float64)
    out = {"image_features": torch.nn.functional.normalize(x, dim=-1),
           "text_features": torch.nn.functional.normalize(y, dim=-1),
           "logit_scale": torch.tensor(2.5, dtype=torch.float64).exp()}
    if bias:
        out["logit_bias"] = torch.tensor(-10.0, dtype=torch.float64)
    return out


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name,bias", [("ClipLoss", False), ("ClipLoss", True),
                                       ("SigLipLoss", True)])
def test_open_clip_losses_in_open_clips_training_step(backend, name, bias):
    theirs = getattr(peer_or_skip(peers.open_clip_losses), name)()
    ours = getattr(compat_open_clip, name)(backend=backend)
    model_out = _open_clip_model_out(bias=bias)
    keys = list(model_out)
    leaves_a, leaves_b = _leaves(*model_out.values()), _leaves(*model_out.values())
    # open_clip's train_one_epoch: losses = loss(**model_out, output_dict=True)
    loss_a = ours(**dict(zip(keys, leaves_a)), output_dict=True)
    loss_b = theirs(**dict(zip(keys, leaves_b)), output_dict=True)
    assert set(loss_a) == set(loss_b) == {"contrastive_loss"}
    sum(loss_a.values()).backward()
    sum(loss_b.values()).backward()
    _assert_same(loss_a["contrastive_loss"], loss_b["contrastive_loss"], leaves_a, leaves_b)


def test_open_clip_positional_call_and_siglip_without_bias():
    losses = peer_or_skip(peers.open_clip_losses)
    out = _open_clip_model_out(bias=False)
    args = list(out.values())
    torch.testing.assert_close(compat_open_clip.ClipLoss()(*args), losses.ClipLoss()(*args))
    torch.testing.assert_close(compat_open_clip.SigLipLoss()(*args, None),
                               losses.SigLipLoss()(*args, None))


def test_open_clip_settings_it_cannot_reproduce_raise():
    with pytest.raises(NotImplementedError, match="gather_with_grad=True"):
        compat_open_clip.ClipLoss(rank=0, world_size=2)
    with pytest.raises(NotImplementedError, match="horovod"):
        compat_open_clip.ClipLoss(use_horovod=True)
    with pytest.raises(ValueError, match="dist_impl"):
        compat_open_clip.SigLipLoss(dist_impl="allreduce")
    with pytest.raises(ValueError, match="process group"):
        compat_open_clip.ClipLoss(gather_with_grad=True, rank=0, world_size=2)(
            *_open_clip_model_out(bias=False).values())


# ------------------------------------------------------------------ lightly


def test_lightly_signatures():
    _assert_same_signatures(peer_or_skip(peers.lightly_ntxent), compat_lightly.NTXentLoss)


@pytest.mark.parametrize("backend", BACKENDS)
def test_lightly_simclr_step(backend):
    theirs = peer_or_skip(peers.lightly_ntxent)(temperature=0.5)
    ours = compat_lightly.NTXentLoss(temperature=0.5, backend=backend)
    z0, z1 = torch.randn(10, 32, dtype=torch.float64), torch.randn(10, 32, dtype=torch.float64)
    leaves_a, leaves_b = _leaves(z0, z1), _leaves(z0, z1)
    loss_a, loss_b = ours(*leaves_a), theirs(*leaves_b)  # lightly's SimCLR: criterion(z0, z1)
    loss_a.backward()
    loss_b.backward()
    _assert_same(loss_a, loss_b, leaves_a, leaves_b)


@pytest.mark.parametrize("backend", BACKENDS)
def test_lightly_memory_bank_over_steps_that_fill_and_restart_the_bank(backend):
    """One seed gives both the same bank; over steps (the fourth reaches the
    end of the bank, the last is an evaluation that must not enqueue) the
    losses, gradients, banks and pointers stay the same."""
    peer = peer_or_skip(peers.lightly_ntxent)
    size = (10, 8)
    torch.manual_seed(7)
    theirs = peer(0.2, size)
    torch.manual_seed(7)
    ours = compat_lightly.NTXentLoss(0.2, size, backend=backend)
    torch.testing.assert_close(ours.memory_bank.bank, theirs.memory_bank.bank, rtol=0, atol=0)
    for step in range(5):
        z0, z1 = torch.randn(3, 8), torch.randn(3, 8)
        training = step < 4
        leaves_a = [z0.clone().requires_grad_(training), z1.clone().requires_grad_(training)]
        leaves_b = [z0.clone().requires_grad_(training), z1.clone().requires_grad_(training)]
        loss_a, loss_b = ours(*leaves_a), theirs(*leaves_b)
        if training:
            loss_a.backward()
            loss_b.backward()
        _assert_same(loss_a, loss_b, leaves_a, leaves_b, rtol=2e-5, atol=1e-6)
        torch.testing.assert_close(ours.memory_bank.bank, theirs.memory_bank.bank)
        assert int(ours.memory_bank.bank_ptr) == int(theirs.memory_bank.bank_ptr)
    assert int(ours.memory_bank.bank_ptr) == 0  # 3, 6, 9, then the bank's end: back to 0


def test_lightly_bank_size_without_the_feature_size_is_refused_at_construction():
    peer = peer_or_skip(peers.lightly_ntxent)
    with pytest.raises(ValueError):
        peer(0.1, 4096)
    with pytest.raises(ValueError, match=r"memory_bank_size .*\(4096, 128\)"):
        compat_lightly.NTXentLoss(0.1, 4096)
    with pytest.raises(ValueError, match="temperature"):
        compat_lightly.NTXentLoss(0.0)


def test_lightly_dcl_signatures():
    theirs = peer_or_skip(peers.lightly_dcl)
    _assert_same_signatures(theirs.DCLLoss, compat_lightly.DCLLoss)
    _assert_same_signatures(theirs.DCLWLoss, compat_lightly.DCLWLoss)


# lightly's DCLW weights re-wrap a tensor in torch.tensor(), which warns
@pytest.mark.filterwarnings("ignore:To copy construct from a tensor")
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("name, args", [
    ("DCLLoss", ()), ("DCLLoss", (0.07,)), ("DCLWLoss", (0.2, 0.3)),
    # lightly's docstring example: a weight function with a gradient
    ("DCLLoss", (0.1, lambda a, b: torch.sum((a - b) ** 2, dim=1))),
])
def test_lightly_dcl_step(backend, dtype, name, args):
    theirs = getattr(peer_or_skip(peers.lightly_dcl), name)(*args)
    ours = getattr(compat_lightly, name)(*args, backend=backend)
    z0, z1 = torch.randn(11, 16, dtype=dtype), torch.randn(11, 16, dtype=dtype)
    leaves_a, leaves_b = _leaves(z0, z1), _leaves(z0, z1)
    loss_a, loss_b = ours(*leaves_a), theirs(*leaves_b)
    loss_a.backward()
    loss_b.backward()
    fp32 = dtype == torch.float32
    _assert_same(loss_a.to(dtype), loss_b, leaves_a, leaves_b, rtol=2e-5 if fp32 else 1e-9,
                 atol=1e-6 if fp32 else 1e-11)


def test_the_two_view_loss_points_pml_users_to_the_pair_loss():
    import pyclloss

    with pytest.raises(TypeError, match="PairNTXentLoss"):
        pyclloss.NTXentLoss(0.07)(torch.randn(8, 4), torch.randint(0, 3, (8,)))


# ------------------------------------------------------ pytorch-metric-learning


def test_pml_signatures():
    losses = _pml().losses
    _assert_same_signatures(losses.NTXentLoss, compat_pml.NTXentLoss)
    _assert_same_signatures(losses.SupConLoss, compat_pml.SupConLoss)


def _reducers():
    reducers = _pml().reducers
    return {"default": None, "mean": reducers.MeanReducer(), "sum": reducers.SumReducer(),
            "avg_non_zero": reducers.AvgNonZeroReducer(),
            "threshold": reducers.ThresholdReducer(low=0.5, high=2.5)}


LABELS = {
    "classes": lambda n: torch.randint(0, 4, (n,)),
    "pairs": lambda n: torch.arange(n) // 2,
    "no_positive": lambda n: torch.arange(n),
    "one_class": lambda n: torch.zeros(n, dtype=torch.long),
}


def _pml_step(ours, theirs, embeddings, *args, **kwargs):
    """loss = loss_func(embeddings, labels, ...); loss.backward(), for both."""
    leaves_a, leaves_b = _leaves(embeddings), _leaves(embeddings)
    extra_a = {k: (v.detach().clone().requires_grad_() if k == "ref_emb" else v)
               for k, v in kwargs.items()}
    extra_b = {k: (v.detach().clone().requires_grad_() if k == "ref_emb" else v)
               for k, v in kwargs.items()}
    loss_a, loss_b = ours(*leaves_a, *args, **extra_a), theirs(*leaves_b, *args, **extra_b)
    loss_a.backward()
    loss_b.backward()
    if "ref_emb" in kwargs:
        leaves_a.append(extra_a["ref_emb"])
        leaves_b.append(extra_b["ref_emb"])
    _assert_same(loss_a, loss_b, leaves_a, leaves_b)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", ["NTXentLoss", "SupConLoss"])
@pytest.mark.parametrize("labels", list(LABELS))
def test_pml_losses_on_labels_with_every_reducer(backend, name, labels):
    losses = _pml().losses
    for reducer_name, reducer in _reducers().items():
        kwargs = {} if reducer is None else {"reducer": reducer}
        x, y = torch.randn(14, 8, dtype=torch.float64), LABELS[labels](14)
        _pml_step(getattr(compat_pml, name)(0.2, backend=backend, **kwargs),
                  getattr(losses, name)(0.2, **kwargs), x, y)


@pytest.mark.parametrize("name", ["NTXentLoss", "SupConLoss"])
@pytest.mark.parametrize("miner", ["MultiSimilarityMiner", "TripletMarginMiner", "PairMarginMiner"])
def test_pml_losses_on_a_miners_pairs(name, miner):
    pml = _pml()
    mine = getattr(pml.miners, miner)()
    x, y = torch.randn(20, 8, dtype=torch.float64), torch.randint(0, 3, (20,))
    # pml's training loop: hard_pairs = miner(embeddings, labels); loss_func(embeddings, labels, hard_pairs)
    hard_pairs = mine(x, y)
    _pml_step(getattr(compat_pml, name)(0.1), getattr(pml.losses, name)(0.1), x, y, hard_pairs)
    # an indices_tuple without labels
    _pml_step(getattr(compat_pml, name)(0.1), getattr(pml.losses, name)(0.1), x, None,
              hard_pairs)


@pytest.mark.parametrize("name", ["NTXentLoss", "SupConLoss"])
def test_pml_losses_against_reference_embeddings(name):
    pml = _pml()
    x, y = torch.randn(9, 8, dtype=torch.float64), torch.randint(0, 3, (9,))
    ref, ref_y = torch.randn(13, 8, dtype=torch.float64), torch.randint(0, 3, (13,))
    _pml_step(getattr(compat_pml, name)(0.1), getattr(pml.losses, name)(0.1), x, y,
              ref_emb=ref, ref_labels=ref_y)
    # ref_emb without ref_labels: the embeddings' labels, an anchor not its own positive
    same_size = torch.randn(9, 8, dtype=torch.float64)
    _pml_step(getattr(compat_pml, name)(0.1), getattr(pml.losses, name)(0.1), x, y,
              ref_emb=same_size)


def test_pml_settings_it_cannot_reproduce_raise():
    pml = _pml()
    with pytest.raises(NotImplementedError, match="DoNothingReducer"):
        compat_pml.SupConLoss(reducer=pml.reducers.DoNothingReducer())
    with pytest.raises(NotImplementedError, match="cosine similarity only"):
        compat_pml.NTXentLoss(distance=pml.distances.LpDistance())
    with pytest.raises(NotImplementedError, match="embedding_regularizer"):
        compat_pml.NTXentLoss(embedding_regularizer=pml.regularizers.LpRegularizer())
    with pytest.raises(ValueError, match="cannot both be None"):
        compat_pml.NTXentLoss()(torch.randn(4, 3))
    with pytest.raises(ValueError, match="labels must have shape"):
        compat_pml.SupConLoss()(torch.randn(4, 3), torch.zeros(5, dtype=torch.long))
    # the default distance, passed explicitly, is fine
    compat_pml.NTXentLoss(distance=pml.distances.CosineSimilarity())


# ------------------------------------------------------------- distributed


def _distributed_adapters(rank, device, seed):
    """On each rank: open_clip's and lightly's losses and the adapters on this
    rank's slice of one global batch; values and gradients."""
    open_clip, lightly = peers.open_clip_losses(), peers.lightly_ntxent()
    lightly_dcl = peers.lightly_dcl()
    world, rows, dim = dist.get_world_size(), 5, 8
    gen = torch.Generator().manual_seed(seed)
    images, texts = (torch.nn.functional.normalize(torch.randn(world * rows, dim, generator=gen),
                                                   dim=1) for _ in range(2))
    local = slice(rank * rows, (rank + 1) * rows)
    group = {"rank": rank, "world_size": world}
    configs = {
        "clip": lambda m: m.ClipLoss(gather_with_grad=True, **group),
        "clip_local": lambda m: m.ClipLoss(local_loss=True, gather_with_grad=True, **group),
        **{f"siglip_{impl}": (lambda m, impl=impl: m.SigLipLoss(dist_impl=impl, **group))
           for impl in ("bidir", "shift", "reduce", "gather")},
        "lightly": lambda m: m(0.5, gather_distributed=True),
        "lightly_dcl": lambda m: m.DCLLoss(0.1, gather_distributed=True),
        "lightly_dclw": lambda m: m.DCLWLoss(0.2, 0.5, gather_distributed=True),
    }
    peer_modules = {"lightly": (lightly, compat_lightly.NTXentLoss),
                    "lightly_dcl": (lightly_dcl, compat_lightly),
                    "lightly_dclw": (lightly_dcl, compat_lightly)}
    results = {}
    for name, make in configs.items():
        theirs, ours = peer_modules.get(name, (open_clip, compat_open_clip))
        for who, module in (("theirs", theirs), ("ours", ours)):
            x, y = images[local].clone().requires_grad_(), texts[local].clone().requires_grad_()
            scale = torch.tensor(4.0, requires_grad=True)
            bias = torch.tensor(-3.0, requires_grad=True)
            loss_fn = make(module)
            if name.startswith("lightly"):
                loss = loss_fn(x, y)
            elif name.startswith("clip"):
                loss = loss_fn(x, y, scale, output_dict=True)["contrastive_loss"]
            else:
                loss = loss_fn(x, y, scale, bias, output_dict=True)["contrastive_loss"]
            loss.backward()
            results[name, who] = {"loss": loss.detach(), "x": x.grad, "y": y.grad,
                                  "scale": scale.grad, "bias": bias.grad}
    return results


def test_adapters_over_torch_distributed_equal_the_peers(tmp_path):
    peer_or_skip(peers.open_clip_losses)
    peer_or_skip(peers.lightly_ntxent)
    per_rank = spawn_ranks(2, str(tmp_path), _distributed_adapters, 11)
    names = {name for name, _ in per_rank[0]}
    for name in sorted(names):
        for what in ("loss", "x", "y", "scale", "bias"):
            ours = [r[name, "ours"][what] for r in per_rank]
            theirs = [r[name, "theirs"][what] for r in per_rank]
            if theirs[0] is None:
                continue
            if what in ("scale", "bias") and name != "clip":
                # each rank's loss is its own anchors' mean: open_clip leaves every
                # rank its own part of the scalars' gradient, pyclloss their mean
                # (what DDP's averaging makes of both)
                ours, theirs = [torch.stack(ours).mean()], [torch.stack(theirs).mean()]
            for a, b in zip(ours, theirs):
                torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=f"{name} {what}")
