"""lightly's ``NTXentLoss``, same arguments and semantics::

    from lightly.loss import NTXentLoss              # before
    from pyclloss.compat.lightly import NTXentLoss   # after

``NTXentLoss(temperature=0.5, memory_bank_size=0, gather_distributed=False)``,
``forward(out0, out1)``:

* without a memory bank, SimCLR's NT-Xent (:func:`pyclloss.nt_xent`); with
  ``gather_distributed`` every rank's samples are negatives, each rank's loss
  is the mean over its own anchors and the gradients follow lightly's gather
  (pyclloss's convention: DDP then averages them to the global batch's);
* with ``memory_bank_size=(K, D)``, MoCo's form (:func:`pyclloss.info_nce`
  with ``in_batch_negatives=False``): each ``out0`` row against its own
  ``out1`` row and the bank. As in lightly, the bank starts as K random unit
  vectors (drawn the same way, so one seed gives lightly's bank), the
  normalised ``out1`` rows are enqueued after each call whose ``out0``
  requires grad (every rank's with ``gather_distributed``), and a batch that
  reaches the end of the bank fills it up and starts again at the front.

``DCLLoss(temperature=0.1, weight_fn=None, gather_distributed=False)`` and
``DCLWLoss(temperature=0.1, sigma=0.5, gather_distributed=False)``,
``forward(out0, out1)``: decoupled NT-Xent (:func:`pyclloss.decoupled_nt_xent`)
on the fused core, the mean over both views' rows; ``weight_fn(out0, out1)``
(called, as in lightly, on the normalised views, once per direction) weighs
each row's positive logit and may carry a gradient; DCLW's von Mises-Fisher
weights. With ``gather_distributed`` every rank's samples are negatives, the
weights come from the local batch and each rank's loss is the mean over its
own rows, as in lightly.

``backend`` is pyclloss's (keyword only).
"""

from functools import partial
from typing import Callable, Optional, Sequence, Union

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from .. import distributed
from ..info_nce import info_nce, nt_xent
from ..pair_quality import _decoupled, _pairs
from ..reference.pair_quality import von_mises_fisher_weights

Tensor = torch.Tensor


class MemoryBank(nn.Module):
    """lightly's memory bank: ``bank`` (K, D) unit rows and ``bank_ptr`` (1,),
    buffers that are not saved in the state dict, as lightly's."""

    def __init__(self, size: Union[int, Sequence[int]], gather_distributed: bool = False):
        super().__init__()
        size = (size,) if isinstance(size, int) else tuple(size)
        if size != (0,) and (len(size) != 2 or not all(isinstance(s, int) and s > 0
                                                       for s in size)):
            raise ValueError(
                f"memory_bank_size must be 0 (no bank) or a (num_features, dim) pair of positive "
                f"ints, got {size if len(size) > 1 else size[0]!r}; e.g. memory_bank_size="
                f"({size[0]}, 128)")
        self.size, self.gather_distributed = size, gather_distributed
        self.register_buffer("bank", torch.empty(size), persistent=False)
        self.register_buffer("bank_ptr", torch.zeros(1, dtype=torch.long), persistent=False)
        if len(size) == 2:
            with torch.no_grad():
                self.bank.copy_(F.normalize(torch.randn(size), dim=-1))

    @torch.no_grad()
    def enqueue(self, keys: Tensor) -> None:
        """Writes ``keys`` from the pointer on; a batch that reaches the end fills
        the bank up and the pointer starts again at 0."""
        if self.gather_distributed and dist.is_available() and dist.is_initialized():
            keys = distributed.all_gather_with_grad(keys.detach(), dist.group.WORLD)
        start, size = int(self.bank_ptr), self.size[0]
        stop = min(start + keys.shape[0], size)
        self.bank[start:stop] = keys[:stop - start].to(self.bank.dtype)
        self.bank_ptr[0] = 0 if stop == size else stop


class NTXentLoss(nn.Module):
    """lightly's ``NTXentLoss`` (module docstring)."""

    def __init__(self, temperature: float = 0.5, memory_bank_size: Union[int, Sequence[int]] = 0,
                 gather_distributed: bool = False, *, backend: str = "auto"):
        super().__init__()
        if not isinstance(temperature, (int, float, torch.Tensor)) or not temperature > 1e-8:
            raise ValueError(f"temperature must be a number > 1e-8, got {temperature!r}")
        self.memory_bank = MemoryBank(memory_bank_size, gather_distributed)
        self.temperature, self.gather_distributed = temperature, gather_distributed
        self.backend = backend

    def forward(self, out0: Tensor, out1: Tensor) -> Tensor:
        if self.memory_bank.size == (0,):
            return nt_xent(out0, out1, self.temperature, reduction="none",
                           backend=self.backend,
                           gather_distributed=self.gather_distributed).mean()
        loss = info_nce(out0, out1, self.temperature, queue=self.memory_bank.bank.clone(),
                        in_batch_negatives=False, backend=self.backend)
        if out0.requires_grad:
            self.memory_bank.enqueue(F.normalize(out1.detach(), dim=1))
        return loss


class DCLLoss(nn.Module):
    """lightly's ``DCLLoss`` (module docstring)."""

    def __init__(self, temperature: float = 0.1,
                 weight_fn: Optional[Callable[[Tensor, Tensor], Tensor]] = None,
                 gather_distributed: bool = False, *, backend: str = "auto"):
        super().__init__()
        if gather_distributed and not dist.is_available():
            raise ValueError("gather_distributed is True but torch.distributed is not available")
        self.temperature, self.weight_fn = temperature, weight_fn
        self.gather_distributed, self.backend = gather_distributed, backend

    def forward(self, out0: Tensor, out1: Tensor) -> Tensor:
        pairs, _ = _pairs(out0, out1, self.temperature, None, "none", self.backend,
                          self.gather_distributed, None, "all_gather")
        weights = None
        if self.weight_fn:
            out0, out1 = F.normalize(out0, dim=1), F.normalize(out1, dim=1)
            weights = torch.cat([self.weight_fn(out0, out1), self.weight_fn(out1, out0)])
        return _decoupled(pairs, weights).mean()


class DCLWLoss(DCLLoss):
    """lightly's ``DCLWLoss``: :class:`DCLLoss` with the von Mises-Fisher weights."""

    def __init__(self, temperature: float = 0.1, sigma: float = 0.5,
                 gather_distributed: bool = False, *, backend: str = "auto"):
        super().__init__(temperature, partial(von_mises_fisher_weights, sigma=sigma),
                         gather_distributed, backend=backend)
