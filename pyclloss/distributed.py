"""Losses over a torch.distributed process group, as one big batch: the
generic machinery, which knows no op family.

Each rank holds its local rows; the loss is that of a single process holding
the global batch (the rank-major concatenation of the local batches). Two
strategies bring the other ranks' keys to the local anchors:

* ``"all_gather"``: every rank gathers all key blocks (open_clip's local-loss
  pattern); the gathered keys' gradient is summed over ranks and sliced home.
  Memory O(global batch · D) per rank.
* ``"ring"``: key blocks (with their labels) rotate one rank forward per step,
  the transfer of the next block overlapping the fused kernel on the current
  one; row statistics merge exactly (logaddexp, +). In backward the keys rotate
  again and each block's key gradient travels with it, back to its owner. No
  rank holds more than two key blocks: memory O(local batch · D) per rank.

Gradient convention (that of DDP, open_clip and lightly): every rank returns
the global loss L, and the gradients are those of the sum of the returned
losses over the W ranks. Rank r's embeddings get W·∂L/∂x_r, so once DDP has
averaged the parameter gradients over ranks, every parameter holds exactly the
single-process gradient dL/dθ. Scalars every rank holds (temperature,
logit_scale, logit_bias) are averaged over ranks inside backward: their
gradient is dL/ds on every rank already, and DDP's averaging keeps it so.

A call's first collective (``Exchange.layout``) gathers the row counts with
what every rank must share (feature size, dtype, strategy, reduction, the
scalars); a mismatch raises the same ValueError on every rank. Without an
initialised process group a loss runs on one process. See docs/distributed.md.

What a family's kernels do with a key block (its row statistics over the ring
or the gathered keys) lives with the family, in ``pyclloss.ops.<family>``,
built on ``ring_forward``, ``ring_backward`` and ``ring_pair_stats``.
"""

from typing import Callable, Dict, List, NamedTuple, Optional, Sequence, Tuple

import torch
import torch.distributed as dist

from ._checks import FLOAT_DTYPES, REDUCTIONS
from ._stats import reduce_anchors, stats_dtype

Tensor = torch.Tensor
STRATEGIES = ("all_gather", "ring")


# ------------------------------------------------------------ collectives with autograd


def _gather_rows(x: Tensor, sizes: Sequence[int], group) -> Tensor:
    """Rank-major concatenation of every rank's ``x`` (``sizes[r]`` rows on rank r)."""
    most = max(sizes)
    padded = x.new_zeros((most,) + tuple(x.shape[1:]))
    padded[:x.shape[0]] = x
    parts = [torch.empty_like(padded) for _ in sizes]
    dist.all_gather(parts, padded, group=group)
    return torch.cat([part[:n] for part, n in zip(parts, sizes)])


class _AllGather(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, sizes, group):
        ctx.sizes, ctx.group = sizes, group
        return _gather_rows(x.contiguous(), sizes, group)

    @staticmethod
    def backward(ctx, grad):
        # every rank's loss touches every row: sum the contributions, keep ours
        grad = grad.contiguous().clone()
        dist.all_reduce(grad, group=ctx.group)
        rank = dist.get_rank(ctx.group)
        start = sum(ctx.sizes[:rank])
        return grad[start:start + ctx.sizes[rank]], None, None


def all_gather_with_grad(x: Tensor, group=None, sizes: Optional[Sequence[int]] = None) -> Tensor:
    """Rank-major concatenation of every rank's rows of ``x``; the gradient of the
    result is summed over ranks and each rank's slice flows back to its ``x``.

    Local row counts may differ between ranks; ``sizes`` (rows on every rank)
    saves the collective that finds them. Any loss that pairs local anchors
    with the global key set can be built on this.
    """
    group = group if group is not None else dist.group.WORLD
    if sizes is None:
        sizes = row_counts(x.shape[0], x.device, group)
    return _AllGather.apply(x, tuple(sizes), group)


class _SumOverRanks(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        total = x.clone()
        dist.all_reduce(total, group=group)
        return total

    @staticmethod
    def backward(ctx, grad):
        grad = grad.clone()
        dist.all_reduce(grad, group=ctx.group)
        return grad, None


class _Replicated(torch.autograd.Function):
    """Identity on a value every rank holds; its gradient is averaged over ranks."""

    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return x.clone()

    @staticmethod
    def backward(ctx, grad):
        grad = grad.clone()
        dist.all_reduce(grad, group=ctx.group)
        return grad / dist.get_world_size(ctx.group), None


def _gather_small(mine: Tensor, group) -> Tensor:
    """(W, F) table of every rank's small tensor ``mine`` (F,), on the host."""
    parts = [torch.empty_like(mine) for _ in range(dist.get_world_size(group))]
    dist.all_gather(parts, mine, group=group)
    return torch.stack(parts).cpu()


def row_counts(n: int, device: torch.device, group) -> Tuple[int, ...]:
    """Rows on every rank (one small all_gather)."""
    counts = _gather_small(torch.tensor([n], dtype=torch.int64, device=device), group)
    return tuple(int(c) for c in counts[:, 0])


# --------------------------------------------- what every rank of a call must agree on

# A call's record: rows, then the fields every rank must share, then the bits
# (float64 viewed as int64) of up to _MAX_SCALARS named scalars.
_AGREED = ("feature size", "dtype", "strategy", "reduction")
_MAX_SCALARS = 3


def _call_record(n: int, features: Tensor, strategy: str, reduction: str,
                 scalars: Dict[str, object]) -> Tensor:
    """This rank's record of a loss call, int64 on the features' device (no host sync)."""
    device = features.device
    head = torch.tensor([n, features.shape[-1], FLOAT_DTYPES.index(features.dtype),
                         STRATEGIES.index(strategy), REDUCTIONS.index(reduction)],
                        dtype=torch.int64, device=device)
    values = [torch.as_tensor(v, dtype=torch.float64, device=device).detach().reshape(())
              for v in scalars.values()]
    values += [torch.zeros((), dtype=torch.float64, device=device)] * (_MAX_SCALARS - len(values))
    return torch.cat([head, torch.stack(values).view(torch.int64)])


def _as_float64(bits: int) -> float:
    return torch.tensor(bits, dtype=torch.int64).view(torch.float64).item()


def _disagreements(table: Tensor, scalar_names: Sequence[str]) -> List[str]:
    """One line per field of the records (W, F) that differs between ranks."""
    shown = {"dtype": lambda i: str(FLOAT_DTYPES[i]), "strategy": lambda i: repr(STRATEGIES[i]),
             "reduction": lambda i: repr(REDUCTIONS[i])}
    fields = [(name, 1 + i, shown.get(name, str)) for i, name in enumerate(_AGREED)]
    fields += [(name, 1 + len(_AGREED) + i, lambda bits: f"{_as_float64(bits):.7g}")
               for i, name in enumerate(scalar_names)]
    lines = []
    for name, column, show in fields:
        ranks_of = {}
        for rank, value in enumerate(table[:, column].tolist()):
            ranks_of.setdefault(value, []).append(str(rank))
        if len(ranks_of) == 1:
            continue
        labels = [show(value) for value in ranks_of]
        if len(set(labels)) < len(labels):  # scalars that differ in the last digits
            labels = [repr(_as_float64(value)) for value in ranks_of]
        lines.append(f"{name}: " + "; ".join(
            f"{label} on rank{'s' if len(ranks) > 1 else ''} {', '.join(ranks)}"
            for label, ranks in zip(labels, ranks_of.values())))
    return lines


# ------------------------------------------------------------------------- the ring


class _Ring:
    """Point-to-point rotation of tensors one rank forward around the group."""

    def __init__(self, group):
        self.group = group
        self.world = dist.get_world_size(group)
        self.rank = dist.get_rank(group)
        self.send_to = dist.get_global_rank(group, (self.rank + 1) % self.world)
        self.recv_from = dist.get_global_rank(group, (self.rank - 1) % self.world)

    def owner(self, step: int) -> int:
        """Rank whose block this rank holds after ``step`` rotations."""
        return (self.rank - step) % self.world

    def start(self, tensors: Sequence[Tensor], rows: int, tag: int = 0):
        """Send ``tensors`` on, receive the previous rank's (``rows`` rows each).
        Transfers in flight together get distinct ``tag``s."""
        sent = [t.contiguous() for t in tensors]
        received = [t.new_empty((rows,) + tuple(t.shape[1:])) for t in sent]
        ops = []
        for i, (out, into) in enumerate(zip(sent, received)):
            ops.append(dist.P2POp(dist.isend, out, self.send_to, self.group, tag + i))
            ops.append(dist.P2POp(dist.irecv, into, self.recv_from, self.group, tag + i))
        # the sent tensors stay referenced until the transfer is finished
        return received, (dist.batch_isend_irecv(ops), sent)


def _finish(transfer) -> None:
    requests, _ = transfer
    for request in requests:
        request.wait()


def ring_forward(ring: _Ring, block: Sequence[Tensor], sizes: Sequence[int],
                  visit: Callable[[int, Sequence[Tensor]], None]) -> None:
    """Call ``visit(step, block)`` on every rank's block, the local one first,
    receiving the next block while ``visit`` runs."""
    for step in range(ring.world):
        last = step + 1 == ring.world
        if not last:
            incoming, transfer = ring.start(block, sizes[ring.owner(step + 1)])
        visit(step, block)
        if not last:
            _finish(transfer)
            block, transfer = incoming, None  # the block sent on is no longer needed


def ring_backward(ring: _Ring, block: Sequence[Tensor], sizes: Sequence[int], need_dk: bool,
                   visit: Callable[[int, Sequence[Tensor]], Tuple[Tensor, ...]]):
    """Sum ``visit(step, block) = (dq, dk, *others)`` over every rank's block.

    dq and the other gradients (of the anchor side and the scalars) stay here,
    summed in the statistics dtype. Each block's dk accumulates along the ring
    (received from the previous visitor while the next block is computed) and
    arrives at its owner after the last visit. Returns (dq, dk of the local
    block, *others).
    """
    totals, in_flight = None, None
    for step in range(ring.world):
        last = step + 1 == ring.world
        if not last:
            incoming, transfer = ring.start(block, sizes[ring.owner(step + 1)])
        dq, dk, *others = visit(step, block)
        here = (dq, *others)
        if totals is None:
            totals = [g.to(stats_dtype(g.dtype), copy=True) for g in here]
        else:
            for total, g in zip(totals, here):
                total.add_(g)
        dq = here = None  # no block-sized temporary outlives its step
        if need_dk:
            dk = dk.to(stats_dtype(dk.dtype))
            if in_flight is not None:
                (earlier,), acc_transfer = in_flight
                _finish(acc_transfer)
                in_flight = acc_transfer = None  # frees the gradient we sent
                dk = earlier.add_(dk)
            if ring.world > 1:
                in_flight = ring.start([dk], sizes[ring.owner(step + 1)], tag=len(block))
            home = dk
        if not last:
            _finish(transfer)
            block, transfer = incoming, None
    if need_dk and in_flight is not None:
        (home,), acc_transfer = in_flight
        _finish(acc_transfer)
    return totals[0], home if need_dk else None, *totals[1:]


class _RingPairStats(torch.autograd.Function):
    """(pos_count, loss_sum) of a pairwise multi-positive form for the local anchors
    against every rank's keys: NEG_b = LSE over the negatives, merged over the key
    blocks, then a second rotation sums Σ_{n∈P_b} softplus(NEG_b − l_bn).

    ``pairs`` holds the form's kernels on one key block (a family's adapter:
    ``neg_stats``, ``pair_terms``, ``grads``); ``anchors`` are its anchor-side
    tensors, the ones that get a gradient first: ``pairs.grads`` returns
    (d anchors[0], dk, d anchors[1], ...).
    """

    @staticmethod
    def forward(ctx, pairs, ring, sizes, k, k_labels, *anchors):
        ctx.set_materialize_grads(False)
        dt = stats_dtype(k.dtype)
        neg_lse = torch.full((anchors[0].shape[0],), float("-inf"), dtype=dt, device=k.device)
        pos_count, loss_sum, sigmoid_sum = (torch.zeros_like(neg_lse) for _ in range(3))

        def visit_negatives(step, block):
            lse, count = pairs.neg_stats(anchors, step, block)
            torch.logaddexp(neg_lse, lse, out=neg_lse)
            pos_count.add_(count)

        def visit_positives(step, block):
            loss, sigmoid = pairs.pair_terms(anchors, step, block, neg_lse)
            loss_sum.add_(loss)
            sigmoid_sum.add_(sigmoid)

        ring_forward(ring, (k, k_labels), sizes, visit_negatives)
        ring_forward(ring, (k, k_labels), sizes, visit_positives)
        ctx.save_for_backward(k, k_labels, neg_lse, sigmoid_sum, *anchors)
        ctx.pairs, ctx.ring, ctx.sizes = pairs, ring, sizes
        ctx.mark_non_differentiable(pos_count)
        return pos_count, loss_sum

    @staticmethod
    def backward(ctx, _, g_loss_sum):
        k, k_labels, neg_lse, sigmoid_sum, *anchors = ctx.saved_tensors
        if g_loss_sum is None:
            return (None,) * (5 + len(anchors))
        need_dk = ctx.needs_input_grad[3]
        # d loss_sum / d neg_lse = sigmoid_sum: the negatives' coefficient
        neg_coef = (g_loss_sum * sigmoid_sum).contiguous()
        pos_coef = (-g_loss_sum).contiguous()

        def visit(step, block):
            return ctx.pairs.grads(anchors, step, block, neg_lse, neg_coef, pos_coef, need_dk)

        d_first, dk, *d_rest = ring_backward(ctx.ring, (k, k_labels), ctx.sizes, need_dk, visit)
        d_anchors = [g.to(a.dtype) for g, a in zip((d_first, *d_rest), anchors)]
        d_anchors += [None] * (len(anchors) - len(d_anchors))
        return (None, None, None, dk.to(k.dtype) if need_dk else None, None, *d_anchors)


# ------------------------------------------------------------------ what the losses use


class Layout(NamedTuple):
    """Rows of one tensor on every rank of the group, and this rank's index."""
    sizes: Tuple[int, ...]
    rank: int

    @property
    def offset(self) -> int:
        """Global index of this rank's first row."""
        return sum(self.sizes[:self.rank])

    @property
    def total(self) -> int:
        return sum(self.sizes)

    def times(self, factor: int) -> "Layout":
        """The layout of ``factor`` rows per row (views stacked per rank)."""
        return Layout(tuple(factor * n for n in self.sizes), self.rank)

    def ids(self, device: torch.device) -> Tensor:
        """Global indices of this rank's rows."""
        return torch.arange(self.offset, self.offset + self.sizes[self.rank], device=device)


class Exchange:
    """How one loss call meets the other ranks' rows: through ``strategy`` in ``group``."""

    def __init__(self, group, strategy: str):
        self.group, self.strategy = group, strategy
        self.rank = dist.get_rank(group)
        if self.rank < 0:
            raise ValueError("process_group does not contain this process")
        self.ring = _Ring(group) if strategy == "ring" else None

    def layout(self, n: int, features: Tensor, reduction: str, **scalars) -> Layout:
        """The rows (``n`` here) on every rank, the call's first collective.

        The same small all_gather checks that every rank calls with the same
        feature size and dtype (of ``features``), strategy, ``reduction`` and
        named ``scalars`` (temperature, ...; at most three): a mismatch
        raises the same ValueError on every rank, before any collective that
        it would break.
        """
        record = _call_record(n, features, self.strategy, reduction, scalars)
        table = _gather_small(record, self.group)
        differences = _disagreements(table, list(scalars))
        if differences:
            raise ValueError("the ranks of the process group called the loss with different "
                             "arguments (every rank must pass the same feature size, dtype, "
                             "strategy, reduction and scalars):\n  " + "\n  ".join(differences))
        return Layout(tuple(table[:, 0].tolist()), self.rank)

    def all_rows(self, x: Tensor, layout: Layout) -> Tensor:
        """Every rank's rows of ``x``, rank-major, without gradient (MoCo's
        concat_all_gather, with uneven row counts)."""
        return _gather_rows(x.detach().contiguous(), layout.sizes, self.group)

    def replicated(self, value: Tensor) -> Tensor:
        """A scalar every rank holds; its gradient becomes the mean over ranks."""
        return _Replicated.apply(value, self.group) if value.requires_grad else value

    def gather(self, keys: Tensor, key_labels: Tensor, layout: Layout) -> Tuple[Tensor, Tensor]:
        """Every rank's keys (gradient routed home) and key labels, rank-major."""
        return (all_gather_with_grad(keys, self.group, layout.sizes),
                _gather_rows(key_labels, layout.sizes, self.group))

    def sum(self, local: Tensor) -> Tensor:
        """The sum over ranks, on every rank; gradients as in the module docstring."""
        return _SumOverRanks.apply(local, self.group)

    def reduce(self, per_anchor: Tensor, valid: Optional[Tensor], weights: Optional[Tensor],
               reduction: str) -> Tensor:
        """``reduce_anchors`` over the global batch: "mean" and "sum" over every
        rank's anchors (the same value on every rank); "none" keeps the local anchors."""
        local = reduce_anchors(per_anchor, valid, weights, "none" if reduction == "none"
                               else "sum")
        if reduction != "mean":
            return local if reduction == "none" else self.sum(local)
        weight = self.sum(reduce_anchors(torch.ones_like(per_anchor), valid, weights, "sum"))
        return self.sum(local / weight.clamp_min(torch.finfo(weight.dtype).tiny))


def ring_pair_stats(pairs, exchange: Exchange, layout: Layout, keys: Tensor,
                    key_labels: Tensor, *anchors: Tensor) -> Tuple[Tensor, Tensor]:
    """(pos_count, loss_sum) of a pairwise multi-positive form (``_RingPairStats``)
    for the local anchors against every rank's keys, by the ring."""
    return _RingPairStats.apply(pairs, exchange.ring, layout.sizes, keys, key_labels, *anchors)


def reduce(exchange: Optional[Exchange], per_anchor: Tensor, valid: Optional[Tensor],
           weights: Optional[Tensor], reduction: str) -> Tensor:
    """``reduce_anchors`` over the local batch (``exchange`` None), or over the global one."""
    if exchange is None:
        return reduce_anchors(per_anchor, valid, weights, reduction)
    return exchange.reduce(per_anchor, valid, weights, reduction)


def over_ranks(exchange: Optional[Exchange], local: Tensor) -> Tensor:
    """Sum of a reduced term over the ranks (the term itself on one process)."""
    return local if exchange is None else exchange.sum(local)


def loss_arguments(gather_distributed: bool, process_group, strategy: str) -> dict:
    """The keyword-only distributed arguments of the losses, for a module to keep."""
    return {"gather_distributed": gather_distributed, "process_group": process_group,
            "strategy": strategy}


def exchange(gather_distributed: bool, process_group, strategy: str) -> Optional[Exchange]:
    """The Exchange of a loss call, or None when it runs on the local batch only.

    Distributed when ``gather_distributed`` is True or a ``process_group`` is
    given (default group: the world). Without an initialised process group
    there is one process, as in lightly: the loss runs on the local batch.
    """
    if not isinstance(gather_distributed, bool):
        raise TypeError(f"gather_distributed must be a bool, got {type(gather_distributed).__name__}")
    if strategy not in STRATEGIES:
        raise ValueError(f"strategy must be one of {STRATEGIES}, got {strategy!r}")
    if not gather_distributed and process_group is None:
        return None
    if not dist.is_available() or not dist.is_initialized():
        return None  # world size 1
    return Exchange(process_group if process_group is not None else dist.group.WORLD, strategy)
