"""What ``pyclloss bench`` measures: one workload per loss, declared with its
family, inputs, call, peers and the memory a dense implementation needs, and
the peer implementations it is compared with.

Adding a loss to the benchmark is one ``WORKLOADS`` entry; adding a peer, one
``PEERS`` entry (its loader is in ``pyclloss.tools.peers``). Every workload
computes, for each implementation, the same scalar from the same inputs
(tests/test_benchmark.py checks it), so the columns of a table compare.
"""

from dataclasses import dataclass, field
from typing import Callable, Dict, Optional, Tuple

from . import peers

SORT_SIZE = 16  # values per row of the diff_sort rows
GATED_CLASSES = 100
FT_MOCO_QUERIES = 256  # queries against a queue of N rows
DEFAULT_SIZES = (1024, 2048, 4096, 8192, 16384)


@dataclass(frozen=True)
class Peer:
    """An implementation users already have: ``load()`` returns it or raises
    ``peers.PeerUnavailable``; ``color`` is its line in the plots."""
    load: Callable
    color: str
    cuda_only: bool = False


PEERS: Dict[str, Peer] = {
    "pml": Peer(peers.pml_losses, "tab:orange"),
    "lightly": Peer(peers.lightly_ntxent, "tab:red"),
    "open_clip": Peer(peers.open_clip_losses, "tab:brown"),
    "inf_cl": Peer(peers.inf_cl_loss, "tab:pink", cuda_only=True),
    "diffsort": Peer(peers.diffsort_net, "tab:olive"),
}


@dataclass(frozen=True)
class Workload:
    """One loss at N rows of D features.

    ``inputs(n, d, draw)`` builds the leaf tensors (those that require grad get
    a gradient) and other arguments, drawing random tensors with ``draw(*shape)``
    (float, the run's dtype and device) and ``draw.integers(high, n)``;
    ``fused(a, backend)`` and ``peers[name](loaded peer, a)`` return the call
    computing the scalar to differentiate. ``dense_bytes[impl](n, d)``
    estimates what an implementation that builds N×N (or larger) tensors
    needs, so that cells beyond the memory budget are skipped.
    """
    family: str
    inputs: Callable[[int, int, "Draw"], Dict]
    fused: Callable[[Dict, str], Callable]
    peers: Dict[str, Callable[[object, Dict], Callable]] = field(default_factory=dict)
    dense_bytes: Dict[str, Callable[[int, int], float]] = field(default_factory=dict)
    note: str = ""  # the inputs' shape, where it is not (N, D)
    sizes: Tuple[int, ...] = DEFAULT_SIZES  # values of N without --sizes
    in_default_run: bool = True  # measured by a plain `pyclloss bench`
    # the InfoNCE core's losses: the report adds the fused backend's effective
    # rate, 8·N²·D over its time, against a square matmul in the same process
    rated: bool = False


class Draw:
    """Random inputs of one configuration, from a generator seeded with N."""

    def __init__(self, n: int, device: str, dtype):
        import torch

        self.gen = torch.Generator(device="cpu").manual_seed(n)
        self.device, self.dtype = device, dtype

    def __call__(self, *shape):
        import torch

        return torch.randn(*shape, generator=self.gen).to(device=self.device, dtype=self.dtype)

    def uniform(self, *shape):
        import torch

        return torch.rand(*shape, generator=self.gen).to(device=self.device, dtype=self.dtype)

    def integers(self, high: int, n: int):
        import torch

        return torch.randint(0, high, (n,), generator=self.gen).to(self.device)

    def permutation(self, n: int):
        import torch

        return torch.randperm(n, generator=self.gen).to(self.device)


def _pyclloss():
    import pyclloss

    return pyclloss


def _dense(per_n_squared: float) -> Callable[[int, int], float]:
    """A dense implementation's bytes: ``per_n_squared`` bytes per (row, row) pair."""
    return lambda n, d: per_n_squared * n * n


# -------------------------------------------------------------- inputs


def _labelled_rows(n, d, draw: Draw) -> Dict:
    return {"x": draw(n, d).requires_grad_(), "labels": draw.integers(max(2, n // 8), n)}


def _weighted_rows(n, d, draw: Draw) -> Dict:
    return {"x": draw(n, d).requires_grad_(), "w": draw(n, d)}


def _image_text_pairs(n, d, draw: Draw) -> Dict:
    import torch

    unit = lambda: torch.nn.functional.normalize(draw(n, d), dim=1).requires_grad_()
    return {"img": unit(), "txt": unit(),
            "scale": torch.tensor(1 / 0.07, device=draw.device),
            "bias": torch.tensor(-10.0, device=draw.device)}


def _sort_rows(n, d, draw: Draw) -> Dict:
    return {"x": draw(n, SORT_SIZE).requires_grad_(), "w": draw(n, SORT_SIZE),
            "wp": draw(n, SORT_SIZE, SORT_SIZE)}


def _gated_rows(n, d, draw: Draw) -> Dict:
    labels = draw.integers(GATED_CLASSES, n)
    return {"q": draw(n, d).requires_grad_(), "k": draw(n, d).requires_grad_(),
            "gates": draw.uniform(n, d).requires_grad_(), "labels": labels,
            "partners": labels[draw.permutation(n)]}


def _regression_rows(classes: int) -> Callable[[int, int, Draw], Dict]:
    def inputs(n, d, draw: Draw) -> Dict:
        return {"x": draw(n, d).requires_grad_(), "y": draw.integers(classes, n).float()}
    return inputs


def _cacr_views(n, d, draw: Draw) -> Dict:
    return {"z1": draw(n, d).requires_grad_(), "z2": draw(n, d).requires_grad_()}


def _supremix_rows(n, d, draw: Draw) -> Dict:
    import torch

    rows = _regression_rows(64)(n, d, draw)  # ages
    with torch.random.fork_rng(devices=[]):  # the same λ for every implementation
        torch.manual_seed(n)
        rows["lam"] = torch.distributions.Beta(2.0, 8.0).sample((n, n)).to(draw.device)
    return rows


def _moco_queue(n, d, draw: Draw) -> Dict:
    import torch

    queries = min(n, FT_MOCO_QUERIES)
    return {"q": draw(queries, d).requires_grad_(), "k": draw(queries, d),
            "queue": torch.nn.functional.normalize(draw(n, d), dim=1),
            "perm": draw.permutation(n)}


# AMCL: heads per sample and the negatives kept per row
AMCL_HEADS, AMCL_TOPK = 3, 100


def _amcl_views(n, d, draw: Draw) -> Dict:
    """N = 2B rows: two views (B, heads, D) and the temperature network's
    weights (Linear(D, D) → ReLU → Linear(D, D)), leaves that get gradients."""
    b = n // 2
    scale = d ** -0.5
    return {"z1": draw(b, AMCL_HEADS, d).requires_grad_(),
            "z2": draw(b, AMCL_HEADS, d).requires_grad_(),
            **{name: (scale * draw(*shape)).requires_grad_() for name, shape in
               (("w1", (d, d)), ("b1", (d,)), ("w2", (d, d)), ("b2", (d,)))}}


def _amcl(a: Dict, backend: str) -> Callable:
    import torch.nn.functional as F

    def net(x):
        return F.linear(F.relu(F.linear(x, a["w1"], a["b1"])), a["w2"], a["b2"])

    return lambda: _pyclloss().amcl_loss(a["z1"], a["z2"], net, topk=AMCL_TOPK, backend=backend)


# ------------------------------------------------------------ the calls


def _sorted_and_p(sort, a: Dict) -> Callable:
    def objective():
        values, p = sort(a["x"])
        return (values * a["w"]).sum() + (p * a["wp"]).sum()
    return objective


def _views(a: Dict):
    """NT-Xent's two views: the first and second half of the rows."""
    b = a["x"].shape[0] // 2
    return a["x"][:b], a["x"][b:2 * b]


def _pml_nt_xent(pml, a: Dict) -> Callable:
    """pml's labelled form of NT-Xent: both views' rows, a view's label its sample."""
    import torch

    x, b = a["x"], a["x"].shape[0] // 2
    views = torch.cat([torch.arange(b)] * 2).to(x.device)
    loss = pml.NTXentLoss(temperature=0.5)
    return lambda: loss(x[:2 * b], views)


def _lightly_nt_xent(ntxent_class, a: Dict) -> Callable:
    loss = ntxent_class(temperature=0.5)
    return lambda: loss(*_views(a))


def _pml_supcon(pml, a: Dict) -> Callable:
    loss = pml.SupConLoss(temperature=0.1)
    return lambda: loss(a["x"], a["labels"])


def _inf_cl_clip(one_way, a: Dict) -> Callable:
    img, txt, scale = a["img"], a["txt"], a["scale"]
    return lambda: (one_way(img, txt, scale=scale) + one_way(txt, img, scale=scale)) / 2


def _open_clip_clip(open_clip, a: Dict) -> Callable:
    loss = open_clip.ClipLoss()
    return lambda: loss(a["img"], a["txt"], a["scale"])


def _open_clip_siglip(open_clip, a: Dict) -> Callable:
    loss = open_clip.SigLipLoss()
    return lambda: loss(a["img"], a["txt"], a["scale"], a["bias"])


def _diffsort(net_class, a: Dict) -> Callable:
    net = net_class("odd_even", SORT_SIZE, steepness=10.0, distribution="cauchy")
    return _sorted_and_p(net.to(a["x"].device), a)


def _pyclloss_diff_sort(a: Dict, backend: str) -> Callable:
    sort = lambda x: _pyclloss().diff_sort(x, "odd_even", 10.0, "cauchy", backend=backend)
    return _sorted_and_p(sort, a)


def _unit_rows(a: Dict, backend: str) -> Callable:
    from pyclloss.ops.unit_rows import unit_rows

    return lambda: (unit_rows(list(_views(a)), backend) * a["w"]).sum()


# ------------------------------------------------------------ the registry

# dense InfoNCE-family implementations: logits, masks, softmax and their gradients
_LOGITS = _dense(4.0 * 6)

WORKLOADS: Dict[str, Workload] = {
    "supcon": Workload(
        "info_nce", _labelled_rows,
        lambda a, backend: lambda: _pyclloss().supcon(a["x"], a["labels"], 0.1,
                                                      backend=backend),
        peers={"pml": _pml_supcon},
        rated=True,
        dense_bytes={"reference": _LOGITS, "pml": _dense(4.0 * 8)}),
    "nt_xent": Workload(
        "info_nce", _labelled_rows,
        lambda a, backend: lambda: _pyclloss().nt_xent(*_views(a), 0.5, backend=backend),
        peers={"pml": _pml_nt_xent, "lightly": _lightly_nt_xent},
        rated=True,
        # pml's NTXentLoss with labels builds a (positive pairs × negative pairs)
        # matrix: about 16·n³ bytes (measured: 2.1 GiB at n = 512)
        dense_bytes={"reference": _LOGITS, "lightly": _LOGITS,
                     "pml": lambda n, d: 16.0 * n ** 3}),
    "clip": Workload(
        "info_nce", _image_text_pairs,
        lambda a, backend: lambda: _pyclloss().clip_loss(a["img"], a["txt"], a["scale"],
                                                         backend=backend),
        peers={"open_clip": _open_clip_clip, "inf_cl": _inf_cl_clip},
        rated=True,
        dense_bytes={"reference": _LOGITS, "open_clip": _LOGITS}),
    "siglip": Workload(
        "info_nce", _image_text_pairs,
        lambda a, backend: lambda: _pyclloss().siglip_loss(a["img"], a["txt"], a["scale"],
                                                           a["bias"], backend=backend),
        peers={"open_clip": _open_clip_siglip},
        rated=True,
        dense_bytes={"reference": _LOGITS, "open_clip": _LOGITS}),
    "diff_sort": Workload(
        "sorting", _sort_rows, _pyclloss_diff_sort, peers={"diffsort": _diffsort},
        # diffsort keeps several (N, n, n) tensors per layer (n layers of odd-even)
        dense_bytes={impl: lambda n, d: 4.0 * 6 * n * SORT_SIZE ** 3
                     for impl in ("reference", "diffsort")},
        note=f"N rows of {SORT_SIZE} values, odd-even, cauchy"),
    "gated": Workload(
        "gated_info_nce", _gated_rows,
        lambda a, backend: lambda: _pyclloss().gated_info_nce(
            a["q"], a["k"], a["gates"], a["labels"], a["partners"], backend=backend),
        # the B×N×K gated keys, normalised, and their gradients
        dense_bytes={"reference": lambda n, d: 4.0 * 4 * n * n * d},
        note=f"B = N anchors, K = D, {GATED_CLASSES} classes"),
    "supremix": Workload(
        "supremix", _supremix_rows,
        lambda a, backend: lambda: _pyclloss().supremix_loss(a["x"], a["y"], a["lam"],
                                                             backend=backend),
        # the reference keeps about ten n×n×n tensors alive
        dense_bytes={"reference": lambda n, d: 4.0 * 10 * n ** 3},
        note="labels in [0, 64), gap 5, λ ~ Beta(2, 8)", sizes=(128, 256, 512),
        in_default_run=False),
    "rnc": Workload(
        "rnc", _regression_rows(100),
        lambda a, backend: lambda: _pyclloss().rnc_loss(a["x"], a["y"], backend=backend),
        # the reference's (anchors, j, k) blocks of 2^23 elements, plus O(n²)
        dense_bytes={"reference": lambda n, d: 4.0 * (3 * 2 ** 23 + 8 * n * n)},
        note="labels in [0, 100)", sizes=(512, 1024, 2048), in_default_run=False),
    "ft_moco": Workload(
        "ft_moco", _moco_queue,
        lambda a, backend: lambda: _pyclloss().ft_moco_loss(a["q"], a["k"], a["queue"], 1.4,
                                                            0.3, a["perm"], 0.2,
                                                            backend=backend),
        # the reference's N_q×K logits and softmax
        dense_bytes={"reference": lambda n, d: 4.0 * 6 * min(n, FT_MOCO_QUERIES) * n},
        note=f"a queue of N rows, {FT_MOCO_QUERIES} queries", sizes=(4096, 16384, 65536),
        in_default_run=False),
    # ------------------------------------ DCL, HCL, decoupled: pair quality on the core
    "dcl": Workload(
        "info_nce", _labelled_rows,
        lambda a, backend: lambda: _pyclloss().dcl_loss(*_views(a), 0.5, 0.1, backend=backend),
        dense_bytes={"reference": _LOGITS}, note="N rows = N/2 pairs, τ⁺ = 0.1",
        in_default_run=False),
    "hcl": Workload(
        "info_nce", _labelled_rows,
        lambda a, backend: lambda: _pyclloss().hcl_loss(*_views(a), 0.5, 0.1, 1.0,
                                                        backend=backend),
        # the logits at two scales, each masked and soft-maxed
        dense_bytes={"reference": _dense(4.0 * 10)}, note="N rows = N/2 pairs, τ⁺ = 0.1, β = 1",
        in_default_run=False),
    "decoupled": Workload(
        "info_nce", _labelled_rows,
        lambda a, backend: lambda: _pyclloss().decoupled_nt_xent(*_views(a), 0.1, "vmf",
                                                                 backend=backend),
        dense_bytes={"reference": _LOGITS}, note="N rows = N/2 pairs, von Mises-Fisher weights",
        in_default_run=False),
    # CACR: two views of N rows each; the repulsion is the N×N part.
    "cacr": Workload(
        "cacr", _cacr_views,
        lambda a, backend: lambda: _pyclloss().cacr_loss(a["z1"], a["z2"], backend=backend),
        # the reference's distances, logits, weights and their products
        dense_bytes={"reference": _dense(4.0 * 8)},
        note="two views of N rows (N×N distances)", sizes=(1024, 2048, 4096),
        in_default_run=False),
    "amcl": Workload(
        "amcl", _amcl_views, _amcl,
        # per head, the reference's N×N similarities, temperatures, masks and their gradients
        dense_bytes={"reference": lambda n, d: 4.0 * 12 * AMCL_HEADS * n * n},
        note=f"N = 2B rows, {AMCL_HEADS} heads, top-{AMCL_TOPK} negatives",
        sizes=(1024, 2048, 4096), in_default_run=False),
    # the normalisation before the cosine losses' kernels, not a loss
    "unit_rows": Workload(
        "unit_rows", _weighted_rows, _unit_rows,
        note="normalize(cat(z1, z2)), z1 and z2 the halves of the N rows, weighted sum",
        sizes=(4096, 16384, 65536), in_default_run=False),
}


def inputs(loss: str, n: int, d: int, device: str, dtype) -> Dict:
    """The inputs of one configuration (the same for every implementation)."""
    return WORKLOADS[loss].inputs(n, d, Draw(n, device, dtype))


def loss_call(loss: str, impl: str, a: Dict) -> Callable:
    """The call computing the scalar to differentiate, with ``impl`` (a backend or a peer)."""
    workload = WORKLOADS[loss]
    if impl in workload.peers:
        return workload.peers[impl](PEERS[impl].load(), a)
    return workload.fused(a, impl)


def estimated_bytes(loss: str, impl: str, n: int, d: int) -> float:
    """What ``impl`` needs if it builds dense tensors, else 0."""
    dense: Optional[Callable] = WORKLOADS[loss].dense_bytes.get(impl)
    return dense(n, d) if dense else 0.0
