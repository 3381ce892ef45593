"""The losses over torch.distributed against one process holding the global batch.

One spawn per world size (gloo on the CPU, 127.0.0.1) runs every loss with
both strategies and two backends (and CLIP in fp16) inside the workers, a
DDP-wrapped model and a group of one rank, and sends the results
back; the parent compares them with the single-process computation. Local
batch sizes differ between ranks. Per the gradient convention
(pyclloss.distributed): every rank returns the global loss, rank r's inputs
get W·∂L/∂x_r, shared scalars get dL/ds on every rank.
"""

import statistics
from typing import Callable, Dict, List, NamedTuple

import pytest
import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

import pyclloss
import pyclloss as fn
from pyclloss.tools.benchmark import peak_extra_bytes

from helpers import spawn_ranks

STRATEGIES = ("all_gather", "ring")
BACKENDS = ("cpp", "reference")
RTOL = 1e-5
DIM = 16
# the memory test: same local batch at every world size
MEMORY_ROWS, MEMORY_DIM = 256, 1024


class Case(NamedTuple):
    """A loss call on row tensors (split by rank along dim 0) and shared scalars;
    ``terms(rows, scalars)``: for the loss and per scalar, a bound on the size of
    the terms the value or the scalar's gradient sums (they cancel: the round-off
    is measured against them, not against a sum that can be tiny)."""
    call: Callable
    rows: Dict[str, torch.Tensor]
    scalars: Dict[str, float]
    differentiable: tuple
    terms: Callable
    rtol: float = RTOL  # fp32; fp16 gradients are rounded to fp16 (1 ulp ~ 5e-4)
    strategies: tuple = STRATEGIES


def _cosine_terms(t, rows=1):
    """Cosine logits l = c/t, |l| ≤ 1/t: a row's loss adds its LSE and a positive's
    logit, and its dL/dt sums G_j·l_j/t with Σ_j |G_j| ≤ 2. ``rows``: how many
    rows the reduction adds (1 for a mean)."""
    return {"loss": 2 * rows / t, "t": 2 * rows / t ** 2}


def _dot_terms(x, a, b, s, rows=1, bias=0.0):
    """Scaled dot products l = s·a_i·b_j + bias of the rows x[a], x[b]: ∂l/∂s =
    a_i·b_j, ∂l/∂bias = 1, and a_i's gradient sums s·G_ij·b_j over its row and
    column of G (Σ |G| ≤ 2 each)."""
    norm_a, norm_b = (float(x[key].norm(dim=1).max()) for key in (a, b))
    return {"loss": 2 * rows * (abs(s) * norm_a * norm_b + abs(bias)),
            "s": 2 * rows * norm_a * norm_b, "b": 2 * rows,
            a: 4 * rows * abs(s) * norm_b, b: 4 * rows * abs(s) * norm_a}


def _cases(sizes, seed: int) -> Dict[str, Case]:
    gen = torch.Generator().manual_seed(seed)
    n = sum(sizes)
    feats = lambda *shape: torch.randn(*shape, DIM, generator=gen)
    labels = torch.randint(0, 3, (n,), generator=gen)
    # each rank's queries point at a permutation of its own keys
    local_targets = torch.cat([torch.randperm(s, generator=gen) + sum(sizes[:r])
                               for r, s in enumerate(sizes)])
    queue = feats(7)  # MoCo's negatives: the same on every rank
    return {
        "nt_xent": Case(lambda x, s, o, **kw: fn.nt_xent(x["z1"], x["z2"], s["t"],
                                                         weights=x["w"], **kw),
                        {"z1": feats(n), "z2": feats(n), "w": torch.rand(n, generator=gen)},
                        {"t": 0.5}, ("z1", "z2"), lambda x, s: _cosine_terms(s["t"])),
        "pair_nt_xent": Case(lambda x, s, o, **kw: fn.pair_nt_xent(x["z"], x["y"], s["t"], **kw),
                             {"z": feats(n), "y": labels}, {"t": 0.2}, ("z",),
                             lambda x, s: _cosine_terms(s["t"])),
        "supcon": Case(lambda x, s, o, **kw: fn.supcon(x["z"], x["y"], s["t"], 0.5, **kw),
                       {"z": feats(n), "y": labels}, {"t": 0.1}, ("z",),
                       lambda x, s: _cosine_terms(s["t"])),
        "supcon_views": Case(lambda x, s, o, **kw: pyclloss.SupConLoss(s["t"], **kw)(
                                 x["z"], None, x["w"]),
                             {"z": feats(n, 2), "w": torch.rand(n, generator=gen)}, {"t": 0.3},
                             ("z",), lambda x, s: _cosine_terms(s["t"])),
        "info_nce": Case(lambda x, s, o, **kw: fn.info_nce(x["q"], x["k"], s["t"], x["t"] - o,
                                                           reduction="sum", **kw),
                         {"q": feats(n), "k": feats(n), "t": local_targets}, {"t": 0.07},
                         ("q", "k"), lambda x, s: _cosine_terms(s["t"], len(x["q"]))),
        "info_nce_own_key": Case(lambda x, s, o, **kw: fn.info_nce(
                                     x["q"], x["k"], s["t"], x["t"] - o, queue,
                                     in_batch_negatives=False, **kw),
                                 {"q": feats(n), "k": feats(n), "t": local_targets},
                                 {"t": 0.2}, ("q", "k"),
                                 lambda x, s: _cosine_terms(s["t"])),
        "clip": Case(lambda x, s, o, **kw: fn.clip_loss(x["i"], x["x"], s["s"], **kw),
                     {"i": feats(n), "x": feats(n)}, {"s": 5.0}, ("i", "x"),
                     lambda x, s: _dot_terms(x, "i", "x", s["s"])),
        "clip_fp16": Case(lambda x, s, o, **kw: fn.clip_loss(x["i"].half(), x["x"].half(),
                                                             s["s"], **kw),
                          {"i": feats(n), "x": feats(n)}, {"s": 5.0}, ("i", "x"),
                          lambda x, s: _dot_terms(x, "i", "x", s["s"]), rtol=2e-3),
        "siglip": Case(lambda x, s, o, **kw: pyclloss.SigLipLoss(**kw)(x["i"], x["x"], s["s"],
                                                                      s["b"]),
                       {"i": feats(n), "x": feats(n)}, {"s": 4.0, "b": -2.0}, ("i", "x"),
                       # a row sums its sigmoid terms over every key
                       lambda x, s: _dot_terms(x, "i", "x", s["s"], len(x["x"]), s["b"])),
        "gated": Case(lambda x, s, o, **kw: fn.gated_info_nce(x["q"], x["k"], x["g"], x["y"],
                                                              x["p"], x["y"], s["t"], **kw),
                      {"q": feats(n), "k": feats(n), "g": torch.rand(n, DIM, generator=gen),
                       "y": labels, "p": torch.randint(0, 3, (n,), generator=gen)},
                      {"t": 0.2}, ("q", "k", "g"), lambda x, s: _cosine_terms(s["t"])),
    }


def _run(case: Case, start: int, stop: int, backend: str, device="cpu", **kw):
    """Loss and the gradients of its differentiable inputs and scalars (on the CPU)."""
    x = {k: v[start:stop].to(device).requires_grad_(k in case.differentiable)
         for k, v in case.rows.items()}
    s = {k: torch.tensor(v, device=device, requires_grad=True) for k, v in case.scalars.items()}
    loss = case.call(x, s, start, backend=backend, **kw)
    loss.backward()
    grads = {k: x[k].grad.cpu() for k in case.differentiable}
    grads.update({k: v.grad.cpu() for k, v in s.items()})
    return loss.detach().cpu(), grads


class _Towers(nn.Module):
    """Two linear towers and CLIP's learnable log logit scale."""

    def __init__(self, seed: int):
        super().__init__()
        torch.manual_seed(seed)
        self.image, self.text = nn.Linear(DIM, 8), nn.Linear(DIM, 8)
        self.log_scale = nn.Parameter(torch.tensor(1.5))

    def forward(self, images, texts):
        return self.image(images), self.text(texts), self.log_scale.exp()


def _tower_grads(model: nn.Module, case: Case, start: int, stop: int, **kw):
    """Parameter gradients of CLIP on the rows start:stop through ``model``."""
    model.zero_grad()
    fn.clip_loss(*model(case.rows["i"][start:stop], case.rows["x"][start:stop]),
                 backend="cpp", **kw).backward()
    return {name: p.grad.clone() for name, p in model.named_parameters()}


def _memory_losses(rank: int) -> Dict[str, Callable]:
    """The losses of the memory test on this rank's rows (MEMORY_ROWS × MEMORY_DIM
    per tensor)."""
    gen = torch.Generator().manual_seed(rank)
    feats = lambda: torch.randn(MEMORY_ROWS, MEMORY_DIM, generator=gen).requires_grad_()
    z1, z2, q, k = feats(), feats(), feats(), feats()
    gates = torch.rand(MEMORY_ROWS, MEMORY_DIM, generator=gen).requires_grad_()
    y = torch.randint(0, 8, (MEMORY_ROWS,), generator=gen)
    return {"nt_xent": lambda **kw: fn.nt_xent(z1, z2, **kw),
            "gated": lambda **kw: fn.gated_info_nce(q, k, gates, y, (y + 1) % 8, **kw)}


def _peak_extra_bytes(loss: Callable, strategy: str) -> List[int]:
    """Peak resident growth over one forward and backward of ``loss``, for three
    calls after a first that also sets up the process group's buffers."""
    peaks = []
    for _ in range(4):
        dist.barrier()
        peaks.append(peak_extra_bytes(
            lambda: loss(backend="cpp", gather_distributed=True, strategy=strategy).backward()))
    return peaks[1:]


def _global_batch_results(rank, device, sizes, seed):
    """Every case on this rank's rows (and, on the CPU, the tests beyond the cases)."""
    on_gpu = device.type == "cuda"
    start, stop = sum(sizes[:rank]), sum(sizes[:rank + 1])
    results = {}
    for name, case in _cases(sizes, seed).items():
        for strategy in case.strategies:
            for backend in ("auto",) if on_gpu else BACKENDS:
                results[name, strategy, backend] = _run(
                    case, start, stop, backend, device, gather_distributed=True,
                    strategy=strategy)
    if not on_gpu:
        _cpu_only_results(results, sizes, seed, start, stop, rank)
    return results


def _cpu_only_results(results, sizes, seed, start, stop, rank):
    local_clip = _cases(sizes, seed)["clip"]
    ddp = DistributedDataParallel(_Towers(seed))
    alone = [dist.new_group([r]) for r in range(dist.get_world_size())][rank]
    for strategy in STRATEGIES:
        results["ddp", strategy] = _tower_grads(ddp, local_clip, start, stop,
                                                gather_distributed=True, strategy=strategy)
        results["alone", strategy] = _run(local_clip, start, stop, "cpp",
                                          process_group=alone, strategy=strategy)
    results["clip_none"] = fn.clip_loss(local_clip.rows["i"][start:stop],
                                        local_clip.rows["x"][start:stop], 5.0, reduction="none",
                                        gather_distributed=True, strategy="ring")
    gated = _cases(sizes, seed)["gated"]
    for reduction in ("none", "sum"):
        results["gated", reduction] = gated.call(
            {k: v[start:stop] for k, v in gated.rows.items()}, gated.scalars, start,
            reduction=reduction, gather_distributed=True, strategy="ring")
    for name in MOCO_MODULES:
        results[name] = _moco_steps(name, sizes, seed, start, stop, rank,
                                    gather_distributed=True)
    results["memory"] = {(name, s): _peak_extra_bytes(loss, s)
                         for name, loss in _memory_losses(rank).items() for s in STRATEGIES}


# ------------------------------------------------------------------ MoCo's queue

MOCO_MODULES = ("MoCoLoss", "FTMoCoLoss")
MOCO_QUEUE, MOCO_STEPS = 20, 3  # the global batches (12 to 18 keys) wrap around the queue


def _moco_batches(sizes, seed):
    """(queries, keys) of the global batch at each step."""
    gen = torch.Generator().manual_seed(seed + 1)
    return [(torch.randn(sum(sizes), DIM, generator=gen), torch.randn(sum(sizes), DIM,
                                                                      generator=gen))
            for _ in range(MOCO_STEPS)]


def _moco_steps(name, sizes, seed, start, stop, rank, **kw):
    """(loss, dq, queue, queue_ptr) after each step of the MoCo module ``name`` on
    the rows start:stop. Each rank builds its module from its own seed: the
    first distributed call gives every rank the queue of rank 0."""
    torch.manual_seed(seed + rank)
    module = getattr(pyclloss, name)(DIM, MOCO_QUEUE, 0.2, backend="cpp", **kw)
    steps = []
    for step, (q, k) in enumerate(_moco_batches(sizes, seed)):
        torch.manual_seed(seed + 1000 + step)  # FTMoCoLoss: the same mix on every rank
        q = q[start:stop].clone().requires_grad_()
        loss = module(q, k[start:stop])
        loss.backward()
        steps.append((loss.detach(), q.grad, module.queue.clone(), int(module.queue_ptr)))
    return steps


WORLD_SIZES = {2: (5, 7), 3: (6, 3, 5), 4: (4, 6, 5, 3)}


@pytest.fixture(scope="module")
def spawned(tmp_path_factory):
    seed = int(torch.randint(0, 2**31, ()))
    runs = {}
    for world, sizes in WORLD_SIZES.items():
        out_dir = str(tmp_path_factory.mktemp(f"world{world}"))
        runs[world] = (seed, spawn_ranks(world, out_dir, _global_batch_results, sizes, seed))
    return runs


def _assert_close(actual, expected, what, rtol=RTOL, floor=0.0):
    """Max error relative to the largest magnitude of ``expected``, or ``floor``."""
    err = (actual.double() - expected.double()).abs().max()
    scale = expected.double().abs().max().clamp_min(floor)
    assert err <= rtol * scale, f"{what}: max error {err:.3g} vs max |value| {scale:.3g}"


LOSSES = ["nt_xent", "pair_nt_xent", "supcon", "supcon_views", "info_nce", "info_nce_own_key",
          "clip", "clip_fp16", "siglip", "gated"]
RUNS = [(name, strategy) for name in LOSSES
        for strategy in _cases((1,), 0)[name].strategies]


def _assert_matches(per_rank, sizes, seed, name, strategy, backend, device="cpu"):
    world = len(sizes)
    case = _cases(sizes, seed)[name]
    loss, grads = _run(case, 0, sum(sizes), backend, device)
    terms = case.terms(case.rows, case.scalars)
    for rank, results in enumerate(per_rank):
        got_loss, got_grads = results[name, strategy, backend]
        _assert_close(got_loss, loss, f"rank {rank} loss", case.rtol, floor=terms["loss"])
        start, stop = sum(sizes[:rank]), sum(sizes[:rank + 1])
        for key in case.differentiable:
            _assert_close(got_grads[key] / world, grads[key][start:stop], f"rank {rank} d{key}",
                          case.rtol, floor=terms.get(key, 0.0))
        for key in case.scalars:
            _assert_close(got_grads[key], grads[key], f"rank {rank} d{key}", case.rtol,
                          floor=terms[key])


@pytest.mark.parametrize("world", sorted(WORLD_SIZES))
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name, strategy", RUNS)
def test_matches_the_global_batch(spawned, world, backend, strategy, name):
    seed, per_rank = spawned[world]
    _assert_matches(per_rank, WORLD_SIZES[world], seed, name, strategy, backend)


@pytest.mark.gpu
def test_nccl_matches_the_global_batch(tmp_path):
    """NCCL on every GPU here (at least 2), the GPU kernels that "auto" picks."""
    world = torch.cuda.device_count()
    if world < 2:
        pytest.skip("needs 2 or more GPUs")
    sizes = tuple(5 + (r % 3) for r in range(world))
    seed = int(torch.randint(0, 2**31, ()))
    per_rank = spawn_ranks(world, str(tmp_path), _global_batch_results, sizes, seed, on_gpu=True)
    for name, strategy in RUNS:
        _assert_matches(per_rank, sizes, seed, name, strategy, "auto", "cuda")


@pytest.mark.parametrize("world", sorted(WORLD_SIZES))
@pytest.mark.parametrize("strategy", STRATEGIES)
def test_ddp_parameters_get_the_global_batch_gradient(spawned, world, strategy):
    """No world-size factor: after DDP's averaging, every parameter (the
    learnable logit scale included) has the single-process gradient."""
    seed, per_rank = spawned[world]
    sizes = WORLD_SIZES[world]
    case = _cases(sizes, seed)["clip"]
    towers = _Towers(seed)
    single = _tower_grads(towers, case, 0, sum(sizes))
    with torch.no_grad():  # the logits s·a·b are their own derivatives in log s
        images, texts, scale = towers(case.rows["i"], case.rows["x"])
        terms = {"log_scale": _dot_terms({"i": images, "x": texts}, "i", "x",
                                         float(scale))["loss"]}
    for rank, results in enumerate(per_rank):
        for name, grad in single.items():
            _assert_close(results["ddp", strategy]["module." + name], grad, f"rank {rank} {name}",
                          floor=terms.get(name, 0.0))


@pytest.mark.parametrize("world", sorted(WORLD_SIZES))
@pytest.mark.parametrize("strategy", STRATEGIES)
def test_a_group_of_one_rank_is_the_local_batch(spawned, world, strategy):
    """process_group= picks the group: each rank alone in its own group."""
    seed, per_rank = spawned[world]
    sizes = WORLD_SIZES[world]
    case = _cases(sizes, seed)["clip"]
    terms = case.terms(case.rows, case.scalars)
    for rank, results in enumerate(per_rank):
        start, stop = sum(sizes[:rank]), sum(sizes[:rank + 1])
        loss, grads = _run(case, start, stop, "cpp")
        got_loss, got_grads = results["alone", strategy]
        _assert_close(got_loss, loss, f"rank {rank} loss", floor=terms["loss"])
        for key, grad in grads.items():
            _assert_close(got_grads[key], grad, f"rank {rank} d{key}", floor=terms.get(key, 0.0))


@pytest.mark.parametrize("world", sorted(WORLD_SIZES))
def test_reduction_none_gives_the_local_anchors(spawned, world):
    seed, per_rank = spawned[world]
    sizes = WORLD_SIZES[world]
    cases = _cases(sizes, seed)
    clip, gated = cases["clip"], cases["gated"]
    full = fn.clip_loss(clip.rows["i"], clip.rows["x"], 5.0, reduction="none")
    gated_full = gated.call(gated.rows, gated.scalars, 0, reduction="none")
    gated_sum = gated.call(gated.rows, gated.scalars, 0, reduction="sum")
    n = sum(sizes)
    clip_terms = clip.terms(clip.rows, clip.scalars)["loss"]
    # an anchor's sum over its (up to n) positives, and the sum over the anchors
    anchor_terms = _cosine_terms(gated.scalars["t"], n)["loss"]
    for rank, results in enumerate(per_rank):
        mine = slice(sum(sizes[:rank]), sum(sizes[:rank + 1]))
        _assert_close(results["clip_none"], full[mine], f"rank {rank}", floor=clip_terms)
        # the gated ring: each local anchor's sum over its positives on every rank
        _assert_close(results["gated", "none"], gated_full[mine], f"rank {rank} gated",
                      floor=anchor_terms)
        _assert_close(results["gated", "sum"], gated_sum, f"rank {rank} gated sum",
                      floor=n * anchor_terms)


# one rank's travelling keys, fp32: NT-Xent's both views, the gated loss's keys
MEMORY_BLOCKS = {"nt_xent": 2 * MEMORY_ROWS * MEMORY_DIM * 4, "gated": MEMORY_ROWS * MEMORY_DIM * 4}


@pytest.mark.parametrize("name", sorted(MEMORY_BLOCKS))
def test_ring_memory_does_not_grow_with_world_size(spawned, name):
    """Same local batch on every rank count: the ring's peak extra memory stays
    (from 3 ranks on; 2 ranks never hold a second foreign block), all_gather's
    grows by W blocks and more."""
    block = MEMORY_BLOCKS[name]
    # The median over every rank's calls: with the timing of the transfers, a
    # call's peak varies by a block either way (on a loaded machine one rank
    # measured a block more in all its calls); a structural growth shows in
    # every call.
    peak = {s: {w: statistics.median(m for r in spawned[w][1] for m in r["memory"][name, s])
                for w in WORLD_SIZES} for s in STRATEGIES}
    ring, gathered = peak["ring"], peak["all_gather"]
    slack = block / 4
    assert ring[4] <= ring[3] + slack, (ring, block)
    assert ring[4] <= ring[2] + 2 * block + slack, (ring, block)
    assert gathered[4] >= gathered[3] + 2 * block, (gathered, block)  # the measure can fail


@pytest.mark.parametrize("world", sorted(WORLD_SIZES))
@pytest.mark.parametrize("name", MOCO_MODULES)
def test_moco_queue_is_shared_and_the_loss_is_the_global_batchs(spawned, world, name):
    """Keys are gathered from every rank before they are enqueued (MoCo's
    concat_all_gather): every rank holds the single process's queue, and the
    loss and gradients are those of the global batch."""
    seed, per_rank = spawned[world]
    sizes = WORLD_SIZES[world]
    single = _moco_steps(name, sizes, seed, 0, sum(sizes), 0)
    for rank, results in enumerate(per_rank):
        mine = slice(sum(sizes[:rank]), sum(sizes[:rank + 1]))
        for step, ((loss, dq, queue, ptr), (want_loss, want_dq, want_queue, want_ptr)) in \
                enumerate(zip(results[name], single)):
            what = f"rank {rank} step {step}"
            _assert_close(loss, want_loss, f"{what} loss")
            _assert_close(dq / world, want_dq[mine], f"{what} dq")
            _assert_close(queue, want_queue, f"{what} queue")
            assert ptr == want_ptr, f"{what} queue pointer"


def test_bad_arguments():
    z = torch.randn(4, 8)
    with pytest.raises(ValueError, match="strategy"):
        fn.nt_xent(z, z, strategy="tree")
    with pytest.raises(TypeError, match="gather_distributed"):
        fn.clip_loss(z, z, 1.0, gather_distributed=1)


def test_without_a_process_group_it_is_one_process():
    """gather_distributed=True before init_process_group: world size 1, as in lightly."""
    assert not dist.is_initialized()
    z1, z2, y = torch.randn(6, 8), torch.randn(6, 8), torch.randint(0, 3, (6,))
    queue = torch.randn(5, 8)
    calls = {
        "nt_xent": lambda **kw: fn.nt_xent(z1, z2, **kw),
        "supcon": lambda **kw: pyclloss.SupConLoss(**kw)(z1, y),
        "info_nce": lambda **kw: fn.info_nce(z1, z2, queue=queue, in_batch_negatives=False, **kw),
        "clip": lambda **kw: fn.clip_loss(z1, z2, 5.0, **kw),
        "gated": lambda **kw: fn.gated_info_nce(z1, z2, torch.sigmoid(z2), y, (y + 1) % 3, **kw),
    }
    for name, call in calls.items():
        for strategy in STRATEGIES:
            assert torch.equal(call(gather_distributed=True, strategy=strategy), call()), name
    for name in MOCO_MODULES:
        alone, gathering = (_moco_steps(name, (6,), 0, 0, 6, 0, gather_distributed=flag)
                            for flag in (False, True))
        for step, (a, b) in enumerate(zip(alone, gathering)):
            assert all(torch.equal(x, y) for x, y in zip(a[:3], b[:3])), (name, step)


# ------------------------------------------------- ranks that call with different arguments

def _mismatched_calls(rank, device):
    """What each call raised on this rank (or "no error"): the last rank changes
    one argument of each call; the final call agrees everywhere."""
    z = torch.randn(4, DIM, generator=torch.Generator().manual_seed(0))
    odd = int(rank == dist.get_world_size() - 1)
    narrow = z[:, odd:]  # one feature fewer on the last rank
    y = torch.arange(4) % 2
    on = {"gather_distributed": True}
    calls = {
        "feature size": lambda: fn.nt_xent(narrow, narrow, **on),
        "dtype": lambda: fn.clip_loss(z.double() if odd else z, z.double() if odd else z, 5.0,
                                      **on),
        "temperature": lambda: fn.supcon(z, y, 0.2 if odd else 0.1, **on),
        "base_temperature": lambda: fn.supcon(z, y, 0.1, 0.3 if odd else 0.5, **on),
        "logit_bias": lambda: fn.siglip_loss(z, z, 5.0, -1.0 if odd else -2.0, **on),
        "strategy": lambda: fn.pair_nt_xent(z, y, strategy="ring" if odd else "all_gather", **on),
        "reduction": lambda: fn.info_nce(z, z, reduction="sum" if odd else "mean", **on),
        "gated feature size": lambda: fn.gated_info_nce(narrow, narrow, torch.sigmoid(narrow),
                                                        y, 1 - y, **on),
        "moco temperature": lambda: pyclloss.MoCoLoss(DIM, 8, 0.3 if odd else 0.2, **on)(z, z),
        "ft_moco feature size": lambda: pyclloss.FTMoCoLoss(DIM - odd, 8, **on)(narrow, narrow),
        "agreeing": lambda: fn.nt_xent(z, z, **on),
    }
    outcome = {}
    for name, call in calls.items():
        try:
            call()
            outcome[name] = "no error"
        except ValueError as error:
            outcome[name] = str(error)
    return outcome


# the field each mismatch names
MISMATCHES = {"feature size": "feature size", "dtype": "dtype", "temperature": "temperature",
              "base_temperature": "base_temperature", "logit_bias": "logit_bias",
              "strategy": "strategy", "reduction": "reduction",
              "gated feature size": "feature size", "moco temperature": "temperature",
              "ft_moco feature size": "feature size"}


def test_mismatched_arguments_raise_the_same_error_on_every_rank(tmp_path):
    """A feature size, dtype, strategy, reduction or scalar that differs between
    ranks is one ValueError on every rank, before a collective it would break
    (gloo aborts the process on mismatched sizes); the group stays usable."""
    world = 3
    per_rank = spawn_ranks(world, str(tmp_path), _mismatched_calls)
    for call, field in MISMATCHES.items():
        messages = {outcome[call] for outcome in per_rank}
        assert len(messages) == 1, (call, messages)
        message = messages.pop()
        assert f"\n  {field}: " in message and f"on rank {world - 1}" in message, (call, message)
    assert all(outcome["agreeing"] == "no error" for outcome in per_rank)
