"""The fused gated-subspace (Hydra / SimLAP) loss as torch.library custom ops.

``gated_pair_loss`` runs the two forward kernels of docs/gated_info_nce.md
(``gated_fwd``: each anchor's LSE over its negatives; ``gated_pair_fwd``: the
softplus terms of its positives given that LSE) and returns O(B) statistics;
its backward is one ``gated_bwd`` call that recomputes the logit tiles. Every
op takes the concrete backend name last. Fake kernels make them traceable by
torch.compile.
"""

from typing import Tuple

import torch

from .. import distributed
from .._stats import stats_dtype
from ..backends import KernelFamily, compiled, lazy_module, module
from ..reference import gated_info_nce as reference

Tensor = torch.Tensor


def _triton_kernels():
    from ..triton_kernels import gated_info_nce as kernels  # Triton loads on first use

    return kernels


_COMPILED = compiled("gated_fwd", "gated_pair_fwd", "gated_bwd")
# On the GPU ``auto`` tries Triton first: its tiles use tensor cores, the CUDA
# kernels are scalar float32.
KERNELS = KernelFamily("gated_info_nce", cpp=_COMPILED, triton=lazy_module(_triton_kernels),
                       cuda=_COMPILED, reference=module(reference))


def _run(backend: str, name: str, *args):
    return KERNELS.kernel(backend, name)(*args)


@torch.library.custom_op("pyclloss::gated_pair_loss", mutates_args=())
def gated_pair_loss(q: Tensor, k: Tensor, gates: Tensor, scale: Tensor, labels: Tensor,
                    partner_labels: Tensor, key_labels: Tensor,
                    backend: str) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    """Per anchor b: (loss_sum, neg_lse, pos_count, sigmoid_sum) with
    loss_sum_b = Σ_{n∈P_b} softplus(neg_lse_b − l_bn), neg_lse_b = LSE_{n∉X_b} l_bn,
    sigmoid_sum_b = Σ_{n∈P_b} sigmoid(neg_lse_b − l_bn)."""
    labels_ = (labels, partner_labels, key_labels)
    neg_lse, pos_count = _run(backend, "gated_fwd", q, k, gates, scale, *labels_)
    loss_sum, sigmoid_sum = _run(backend, "gated_pair_fwd", q, k, gates, scale, *labels_,
                                 neg_lse.contiguous())
    return tuple(t.contiguous() for t in (loss_sum, neg_lse, pos_count, sigmoid_sum))


@gated_pair_loss.register_fake
def _(q, k, gates, scale, labels, partner_labels, key_labels, backend):
    row = q.new_empty(q.shape[0], dtype=stats_dtype(q.dtype))
    return row, torch.empty_like(row), torch.empty_like(row), torch.empty_like(row)


def _setup(ctx, inputs, output):
    q, k, gates, scale, labels, partner_labels, key_labels, backend = inputs
    _, neg_lse, _, sigmoid_sum = output
    ctx.save_for_backward(q, k, gates, scale, labels, partner_labels, key_labels, neg_lse,
                          sigmoid_sum)
    ctx.backend = backend


def _backward(ctx, g_loss_sum, g_neg_lse, g_pos_count, g_sigmoid_sum):
    q, k, gates, scale, labels, partner_labels, key_labels, neg_lse, sigmoid_sum = ctx.saved_tensors
    zero = torch.zeros_like(neg_lse)
    g_loss_sum = zero if g_loss_sum is None else g_loss_sum
    # loss_sum depends on neg_lse too: d loss_sum_b / d neg_lse_b = sigmoid_sum_b.
    neg_coef = g_loss_sum * sigmoid_sum + (zero if g_neg_lse is None else g_neg_lse)
    dq, dk, dgates, dscale = torch.ops.pyclloss.gated_bwd(
        q, k, gates, scale, labels, partner_labels, key_labels, neg_lse, neg_coef.contiguous(),
        (-g_loss_sum).contiguous(), ctx.needs_input_grad[1], ctx.backend)
    return (dq, dk if ctx.needs_input_grad[1] else None, dgates, dscale, None, None, None, None)


gated_pair_loss.register_autograd(_backward, setup_context=_setup)


@torch.library.custom_op("pyclloss::gated_bwd", mutates_args=())
def gated_bwd(q: Tensor, k: Tensor, gates: Tensor, scale: Tensor, labels: Tensor,
              partner_labels: Tensor, key_labels: Tensor, neg_lse: Tensor, neg_coef: Tensor,
              pos_coef: Tensor, need_dk: bool,
              backend: str) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    """dq, dk, dgates, dscale of Σ_bn G_bn·l_bn (docs/gated_info_nce.md)."""
    outs = _run(backend, "gated_bwd", q, k, gates, scale, labels, partner_labels, key_labels,
                neg_lse, neg_coef, pos_coef, need_dk)
    return tuple(o.contiguous() for o in outs)


@gated_bwd.register_fake
def _(q, k, gates, scale, labels, partner_labels, key_labels, neg_lse, neg_coef, pos_coef,
      need_dk, backend):
    dk = torch.empty_like(k) if need_dk else k.new_empty(0)
    return (torch.empty_like(q), dk, torch.empty_like(gates),
            q.new_empty((), dtype=stats_dtype(q.dtype)))


# --------------------------------------------------------------- over a process group


class _RingPairs:
    """The kernels on one key block for ``distributed.ring_pair_stats``
    (docs/gated_info_nce.md). Anchors: (q, gates, scale, labels, partner_labels);
    exclusions come from the labels alone."""

    def __init__(self, backend: str):
        self.backend = backend

    def neg_stats(self, anchors, step, block):
        q, gates, scale, labels, partners = anchors
        return _run(self.backend, "gated_fwd", q, block[0], gates, scale, labels, partners,
                    block[1])

    def pair_terms(self, anchors, step, block, neg_lse):
        q, gates, scale, labels, partners = anchors
        return _run(self.backend, "gated_pair_fwd", q, block[0], gates, scale, labels, partners,
                    block[1], neg_lse)

    def grads(self, anchors, step, block, neg_lse, neg_coef, pos_coef, need_dk):
        q, gates, scale, labels, partners = anchors
        return gated_bwd(q, block[0], gates, scale, labels, partners, block[1], neg_lse, neg_coef,
                         pos_coef, need_dk, self.backend)


def ring_pair_stats(exchange: distributed.Exchange, q: Tensor, gates: Tensor, labels: Tensor,
                    partner_labels: Tensor, keys: Tensor, key_labels: Tensor,
                    layout: distributed.Layout, scale: Tensor,
                    backend: str) -> Tuple[Tensor, Tensor]:
    """(pos_count, loss_sum) of the local anchors (with their gates) against every
    rank's keys, by the ring: the keys and key labels travel, the gates stay
    with their anchors."""
    return distributed.ring_pair_stats(_RingPairs(backend), exchange, layout, keys.contiguous(),
                                       key_labels, q.contiguous(), gates.contiguous(), scale,
                                       labels, partner_labels)
