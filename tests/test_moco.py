"""MoCo: ``MoCoLoss`` against MoCo's own formula (its builder's logits and
queue, written out below), lightly's ``NTXentLoss`` with a memory bank, and
``ft_moco_loss`` without transformation; ``info_nce``'s choice of negatives."""

import math

import pytest
import torch
import torch.nn.functional as F

import pyclloss
from pyclloss.tools import peers

from helpers import fused_backends, peer_or_skip

BACKENDS = ["reference"] + fused_backends("cpu")
N, K, DIM, STEPS, TAU = 8, 24, 16, 4, 0.2  # 4 batches of 8 wrap around the queue of 24
RTOL = 1e-5


def _assert_close(actual, expected, what):
    err = (actual.double() - expected.double()).abs().max().item()
    bound = RTOL * max(1.0, expected.double().abs().max().item())
    assert err <= bound, f"{what}: max error {err:.3g} > {bound:.3g}"


# ------------------------------------------------------------- MoCo's builder, as the oracle

def moco_builder_logits(q, k, queue, temperature):
    """MoCo's logits (moco/builder.py, MoCo.forward) of normalised q, k (N, C) and
    its queue (C, K): the positive first, then the queue; target 0."""
    l_pos = torch.einsum("nc,nc->n", q, k).unsqueeze(-1)
    l_neg = torch.einsum("nc,ck->nk", q, queue.clone().detach())
    return torch.cat([l_pos, l_neg], dim=1) / temperature


class MoCoBuilderQueue:
    """The loss side of MoCo's builder: normalised encoder outputs, the logits
    above, cross-entropy against 0, then _dequeue_and_enqueue of the keys."""

    def __init__(self, queue_rows, temperature):
        self.queue = queue_rows.T.clone()  # MoCo keeps the queue as (dim, K)
        self.ptr, self.temperature = 0, temperature

    def __call__(self, q, k):
        q, k = F.normalize(q, dim=1), F.normalize(k, dim=1)
        logits = moco_builder_logits(q, k, self.queue, self.temperature)
        labels = torch.zeros(logits.shape[0], dtype=torch.long)
        self._dequeue_and_enqueue(k.detach())
        return F.cross_entropy(logits, labels)

    def _dequeue_and_enqueue(self, keys):
        batch_size = keys.shape[0]
        assert self.queue.shape[1] % batch_size == 0  # as MoCo requires
        self.queue[:, self.ptr:self.ptr + batch_size] = keys.T
        self.ptr = (self.ptr + batch_size) % self.queue.shape[1]


def _steps():
    return [(torch.randn(N, DIM), torch.randn(N, DIM)) for _ in range(STEPS)]


@pytest.mark.parametrize("backend", BACKENDS)
def test_identical_vectors_give_log_of_queue_size_plus_one(backend):
    """Every logit equal: MoCo's softmax runs over the own key and the K queued
    keys, log(K + 1); the other keys of the batch are not negatives."""
    moco = pyclloss.MoCoLoss(DIM, K, TAU, backend=backend)
    e = F.normalize(torch.randn(1, DIM), dim=1)
    moco.queue.copy_(e.expand(K, DIM))
    loss = moco(e.expand(N, DIM), e.expand(N, DIM))
    assert abs(loss.item() - math.log(K + 1)) <= RTOL * math.log(K + 1), loss.item()


@pytest.mark.parametrize("backend", BACKENDS)
def test_moco_loss_equals_mocos_builder(backend):
    moco = pyclloss.MoCoLoss(DIM, K, TAU, backend=backend)
    oracle = MoCoBuilderQueue(moco.queue, TAU)
    for step, (q, k) in enumerate(_steps()):
        ours, theirs = q.clone().requires_grad_(), q.clone().requires_grad_()
        loss, expected = moco(ours, k), oracle(theirs, k)  # MoCo's keys carry no gradient
        loss.backward()
        expected.backward()
        _assert_close(loss, expected, f"step {step} loss")
        _assert_close(ours.grad, theirs.grad, f"step {step} dq")
        _assert_close(moco.queue, oracle.queue.T, f"step {step} queue")
        assert int(moco.queue_ptr) == oracle.ptr


@pytest.mark.parametrize("backend", BACKENDS)
def test_moco_loss_equals_ft_moco_loss_without_transformation(backend):
    """λ_p = λ_n = 1 leaves q, k and the queue as they are: the same loss."""
    moco = pyclloss.MoCoLoss(DIM, K, TAU, backend=backend)
    q, k = torch.randn(N, DIM), torch.randn(N, DIM)
    queue = moco.queue.clone()
    ours, theirs = q.clone().requires_grad_(), q.clone().requires_grad_()
    loss = moco(ours, k)
    expected = pyclloss.ft_moco_loss(theirs, k, queue, 1.0, 1.0, torch.randperm(K), TAU,
                                     backend=backend)
    loss.backward()
    expected.backward()
    _assert_close(loss, expected, "loss")
    _assert_close(ours.grad, theirs.grad, "dq")


@pytest.mark.parametrize("backend", BACKENDS)
def test_moco_loss_equals_lightly_memory_bank(backend):
    """lightly's NTXentLoss with memory_bank_size: the own key and the bank as
    negatives, then the keys enqueued; gradients to the queries and the keys."""
    ntxent = peer_or_skip(peers.lightly_ntxent)
    moco = pyclloss.MoCoLoss(DIM, K, TAU, backend=backend)
    lightly = ntxent(temperature=TAU, memory_bank_size=(K, DIM))
    lightly.memory_bank.bank.copy_(moco.queue)
    for step, (q, k) in enumerate(_steps()):
        ours = [x.clone().requires_grad_() for x in (q, k)]
        theirs = [x.clone().requires_grad_() for x in (q, k)]
        loss, expected = moco(*ours), lightly(*theirs)
        loss.backward()
        expected.backward()
        _assert_close(loss, expected, f"step {step} loss")
        for name, a, b in zip("qk", ours, theirs):
            _assert_close(a.grad, b.grad, f"step {step} d{name}")
        _assert_close(moco.queue, lightly.memory_bank.bank, f"step {step} queue")


# --------------------------------------------------------- info_nce: which keys are negatives

def _with_in_batch_negatives(q, k, queue, targets, temperature):
    """Every key and the queue in each softmax (ESimCSE's in-batch + queue form)."""
    q, keys = F.normalize(q, dim=1), F.normalize(torch.cat([k, queue]), dim=1)
    return F.cross_entropy(q @ keys.T / temperature, targets, reduction="none")


def _own_key_and_queue(q, k, queue, targets, temperature):
    """MoCo: each query's own key, then the queue."""
    q, k, queue = (F.normalize(x, dim=1) for x in (q, k, queue))
    logits = moco_builder_logits(q, k[targets], queue.T, temperature)
    return F.cross_entropy(logits, torch.zeros_like(targets), reduction="none")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("in_batch_negatives, oracle", [
    (True, _with_in_batch_negatives), (False, _own_key_and_queue)])
def test_info_nce_negatives(backend, in_batch_negatives, oracle):
    """Per-anchor losses and the gradients of query, key and temperature, with
    permuted targets into more keys than queries."""
    q, k, queue = torch.randn(N, DIM), torch.randn(N + 3, DIM), torch.randn(K, DIM)
    targets, coef = torch.randperm(N + 3)[:N], torch.rand(N)
    ours = [x.clone().requires_grad_() for x in (q, k, torch.tensor(TAU))]
    theirs = [x.clone().requires_grad_() for x in (q, k, torch.tensor(TAU))]
    loss = pyclloss.info_nce(ours[0], ours[1], ours[2], targets, queue, reduction="none",
                             in_batch_negatives=in_batch_negatives, backend=backend)
    expected = oracle(theirs[0], theirs[1], queue, targets, theirs[2])
    (loss * coef).sum().backward()
    (expected * coef).sum().backward()
    _assert_close(loss, expected, "loss")
    for name, a, b in zip(("query", "key", "temperature"), ours, theirs):
        _assert_close(a.grad, b.grad, f"d{name}")


def test_info_nce_default_keeps_in_batch_negatives():
    q, k, queue = torch.randn(N, DIM), torch.randn(N, DIM), torch.randn(K, DIM)
    expected = _with_in_batch_negatives(q, k, queue, torch.arange(N), TAU).mean()
    _assert_close(pyclloss.info_nce(q, k, TAU, queue=queue), expected, "default")
    module = pyclloss.InfoNCELoss(TAU, in_batch_negatives=False)
    _assert_close(module(q, k, queue=queue),
                  _own_key_and_queue(q, k, queue, torch.arange(N), TAU).mean(), "module")


def test_info_nce_switch_bad_input():
    q = torch.randn(N, DIM)
    with pytest.raises(ValueError, match="in_batch_negatives=False needs a queue"):
        pyclloss.info_nce(q, q, in_batch_negatives=False)
    with pytest.raises(TypeError, match="in_batch_negatives must be a bool"):
        pyclloss.info_nce(q, q, queue=q, in_batch_negatives=1)
