"""open_clip's ``ClipLoss`` and ``SigLipLoss``, same arguments and semantics::

    from open_clip.loss import ClipLoss, SigLipLoss            # before
    from pyclloss.compat.open_clip import ClipLoss, SigLipLoss  # after

One process (``world_size=1``, open_clip's default) is exact for every
argument. Over ``torch.distributed`` (``world_size > 1``, the default process
group, whose rank and size must be ``rank`` and ``world_size``):

* ``ClipLoss(gather_with_grad=True)``: every rank's loss and feature gradients
  are open_clip's, with ``local_loss`` either way. ``gather_with_grad=False``
  (open_clip's default) gives each rank only the gradient through its own
  features; pyclloss always computes the global batch's gradient, so that
  setting raises ``NotImplementedError`` (pass ``gather_with_grad=True``:
  same loss, the global gradient). ``use_horovod`` raises too.
* ``SigLipLoss``: every ``dist_impl`` ("bidir", "shift", "reduce", "gather";
  the first two run pyclloss's ring, the others its all_gather).

With ``local_loss=True`` and for ``SigLipLoss``, each rank's loss is its own
anchors' mean, as in open_clip; the gradient of a learnable ``logit_scale`` /
``logit_bias`` is then already averaged over the ranks (open_clip leaves each
rank its own part), which is what DDP's gradient averaging makes of both.
``cache_labels`` has nothing to cache here and is accepted as is.
"""

from typing import Optional

import torch
import torch.distributed as dist
from torch import nn

from ..info_nce import clip_loss, siglip_loss

Tensor = torch.Tensor

# open_clip's SigLIP exchanges -> pyclloss's strategies
SIGLIP_STRATEGIES = {"bidir": "ring", "shift": "ring", "reduce": "all_gather",
                     "gather": "all_gather"}


def _check_group(rank: int, world_size: int) -> None:
    """open_clip's rank and world_size must describe the default process group."""
    if not dist.is_available() or not dist.is_initialized():
        raise ValueError(f"world_size={world_size} needs an initialised torch.distributed "
                         "process group")
    actual = (dist.get_rank(), dist.get_world_size())
    if actual != (rank, world_size):
        raise ValueError(f"rank={rank}, world_size={world_size} do not match the process group "
                         f"(rank {actual[0]} of {actual[1]})")


def _output(loss: Tensor, output_dict: bool):
    return {"contrastive_loss": loss} if output_dict else loss


class ClipLoss(nn.Module):
    """open_clip's ``ClipLoss``: ``forward(image_features, text_features,
    logit_scale, logit_bias=None, output_dict=False)`` (:func:`pyclloss.clip_loss`).

    ``logit_bias`` shifts every logit of a row alike, which softmax ignores: the
    loss does not change and the bias gets a zero gradient, as in open_clip.
    ``backend`` is pyclloss's (keyword only).
    """

    def __init__(self, local_loss: bool = False, gather_with_grad: bool = False,
                 cache_labels: bool = False, rank: int = 0, world_size: int = 1,
                 use_horovod: bool = False, *, backend: str = "auto"):
        super().__init__()
        if use_horovod:
            raise NotImplementedError("use_horovod=True: pyclloss runs over torch.distributed "
                                      "only")
        if world_size > 1 and not gather_with_grad:
            raise NotImplementedError(
                "gather_with_grad=False with world_size > 1: open_clip then gives each rank the "
                "gradient through its own features only, pyclloss the global batch's; pass "
                "gather_with_grad=True (the same loss, the global gradient)")
        self.local_loss, self.gather_with_grad = local_loss, gather_with_grad
        self.cache_labels, self.use_horovod = cache_labels, use_horovod
        self.rank, self.world_size, self.backend = rank, world_size, backend

    def forward(self, image_features: Tensor, text_features: Tensor, logit_scale,
                logit_bias=None, output_dict: bool = False):
        distributed = self.world_size > 1
        if distributed:
            _check_group(self.rank, self.world_size)
        local = distributed and self.local_loss
        loss = clip_loss(image_features, text_features, logit_scale,
                         reduction="none" if local else "mean", backend=self.backend,
                         gather_distributed=distributed)
        if local:
            loss = loss.mean()
        if logit_bias is not None:
            loss = loss + 0 * logit_bias  # in the graph with its (zero) gradient
        return _output(loss, output_dict)


class SigLipLoss(nn.Module):
    """open_clip's ``SigLipLoss``: ``forward(image_features, text_features,
    logit_scale, logit_bias, output_dict=False)`` (:func:`pyclloss.siglip_loss`;
    ``logit_bias=None`` is no bias). ``backend`` is pyclloss's (keyword only).
    """

    def __init__(self, cache_labels: bool = False, rank: int = 0, world_size: int = 1,
                 dist_impl: Optional[str] = None, *, backend: str = "auto"):
        super().__init__()
        dist_impl = dist_impl or "bidir"
        if dist_impl not in SIGLIP_STRATEGIES:
            raise ValueError(f"dist_impl must be one of {tuple(SIGLIP_STRATEGIES)}, got "
                             f"{dist_impl!r}")
        self.cache_labels, self.rank, self.world_size = cache_labels, rank, world_size
        self.dist_impl, self.backend = dist_impl, backend

    def forward(self, image_features: Tensor, text_features: Tensor, logit_scale, logit_bias,
                output_dict: bool = False):
        bias = 0.0 if logit_bias is None else logit_bias
        if self.world_size == 1:
            loss = siglip_loss(image_features, text_features, logit_scale, bias,
                               backend=self.backend)
            return _output(loss, output_dict)
        _check_group(self.rank, self.world_size)
        # each local image against every rank's texts, summed; over the local images
        rows = siglip_loss(image_features, text_features, logit_scale, bias, reduction="none",
                           backend=self.backend, gather_distributed=True,
                           strategy=SIGLIP_STRATEGIES[self.dist_impl])
        return _output(rows.sum() / image_features.shape[0], output_dict)
