"""MoCo with feature transformation (Zhu et al., ICCV 2021): positive
extrapolation and negative interpolation of the queue, as a function and as
a module on MoCo's queue."""

import torch
import torch.nn.functional as F

from . import _checks
from ._stats import reduce_anchors, stats_dtype
from .backends import resolve
from .info_nce import MoCoLoss
from .ops import ft_moco as ops
from .reference import ft_moco as reference

Tensor = torch.Tensor


def _mixing_coefficient(name: str, value, shapes, device: torch.device,
                        dtype: torch.dtype) -> Tensor:
    """A finite mixing coefficient: a number or 0-dim tensor, or a tensor of one of
    ``shapes``; detached, in ``dtype``."""
    if not isinstance(value, torch.Tensor) or value.dim() == 0:
        return _checks.scalar(name, value, device, dtype).detach()
    if not value.dtype.is_floating_point:
        raise TypeError(f"{name} must be a floating tensor, got {value.dtype}")
    if tuple(value.shape) not in shapes:
        forms = " or ".join(str(s) for s in shapes)
        raise ValueError(f"{name} must be a scalar or have shape {forms}, got {tuple(value.shape)}")
    if value.device != device:
        raise ValueError(f"{name} is on {value.device} but the features are on {device}")
    _checks.finite(name, value)
    return value.detach().to(dtype)


def ft_moco_loss(q: Tensor, k: Tensor, queue: Tensor, lam_pos, lam_neg, perm: Tensor,
                 temperature=0.2, *, normalize: bool = True, normalize_mixed: bool = False,
                 reduction: str = "mean", backend: str = "auto") -> Tensor:
    """MoCo's InfoNCE with feature transformation ("Improving Contrastive Learning
    by Visualizing Feature Transformation", Zhu et al., ICCV 2021).

    Positive extrapolation ``q̂ = λ_p·q + (1−λ_p)·k``, ``k̂ = λ_p·k + (1−λ_p)·q``
    (the key is detached first, as in the authors' code, so q gets a gradient
    through both); negative interpolation of the queue
    ``Q̂_j = λ_n·Q_j + (1−λ_n)·Q_π(j)``; ``L_i = CE([q̂_i·k̂_i, q̂_i·Q̂ᵀ] / τ, 0)``.
    The paper samples one λ_p = 1 + Beta(2, 2) and one λ_n ~ Beta(1.6, 1.6) per
    step and π = randperm(K) (:class:`pyclloss.FTMoCoLoss` does). The fused
    backends never build the N×K logits: the Triton kernels blend Q_j and
    Q_π(j) inside their key tiles, the C++ backend builds Q̂ (K×D) once per
    step for the InfoNCE core (see :mod:`pyclloss.ops.ft_moco`).

    Args:
        q: (N, D) queries. k: (N, D) keys (detached inside).
        queue: (K, D) negatives (detached; cast to q's dtype).
        lam_pos: λ_p, a number / 0-dim tensor, or per sample (N,) or per
            element (N, D) (the code's ``dim_mask`` variants).
        lam_neg: λ_n, a number / 0-dim tensor, or per queue row (K,) (the
            code's per-element λ_n of its ``dim_mask`` "neg"/"both" is not
            supported). Mixing coefficients get no gradient.
        perm: (K,) integer queue indices π (a permutation in the paper).
        temperature: τ > 0 (float or 0-dim tensor, which gets a gradient).
        normalize: L2-normalise q, k and the queue before mixing (the paper's
            encoder outputs and queue are unit vectors). The mixed features are
            not normalised again unless ``normalize_mixed`` (the code's
            ``postmix_norm``: q̂ and k̂ only).
        reduction: "mean", "sum" or "none" (N,).
    """
    _checks.features("q", q)
    _checks.features("k", k)
    _checks.same_kind("k", k, "q", q, same_rows=True)
    queue = _checks.features("queue", queue).to(q.dtype)
    _checks.same_kind("queue", queue, "q", q)
    (n, d), size, device = q.shape, queue.shape[0], q.device
    dt = stats_dtype(q.dtype)
    lam_pos = _mixing_coefficient("lam_pos", lam_pos, [(n,), (n, d)], device, dt)
    lam_neg = _mixing_coefficient("lam_neg", lam_neg, [(size,)], device, dt)
    perm = _checks.index_targets("perm", perm, size, size, device)
    reduction = _checks.reduction(reduction)
    tau = _checks.temperature("temperature", temperature, device, dt)
    backend = resolve(backend, device, implemented=ops.KERNELS.backends)
    if backend == "reference":
        return reference.ft_moco_loss(q, k, queue, lam_pos, lam_neg, perm, tau,
                                      normalize, normalize_mixed, reduction)
    anchors, keys = q.to(dt), k.detach().to(dt)
    if normalize:
        anchors, keys = F.normalize(anchors, dim=1), F.normalize(keys, dim=1)
    q_hat, k_hat = reference.extrapolate_pair(anchors, keys, lam_pos)
    if normalize_mixed:
        q_hat, k_hat = F.normalize(q_hat, dim=1), F.normalize(k_hat, dim=1)
    scale = 1 / tau
    pos = scale * (q_hat * k_hat).sum(1)
    negatives = queue.detach().contiguous()
    weights = ops.interpolation_weights(negatives, lam_neg, perm, normalize)
    neg_lse = ops.negatives_lse(q_hat.to(q.dtype).contiguous(), negatives, *weights,
                                perm, scale, backend)
    return reduce_anchors(torch.logaddexp(pos, neg_lse) - pos, None, None, reduction)


class FTMoCoLoss(MoCoLoss):
    """MoCo with feature transformation (Zhu et al., ICCV 2021): positive
    extrapolation and negative interpolation; ``forward(query, key)``.

    Each call samples, as the authors' training script does, one
    ``λ_p = 1 + Beta(pos_alpha, pos_alpha)``, one ``λ_n ~ Beta(neg_alpha,
    neg_alpha)`` and a permutation π of the queue (:meth:`sample_mix`, from
    torch's random generator), computes :func:`pyclloss.ft_moco_loss` against
    the queue, then enqueues the untransformed keys.

    Args:
        dim, queue_size: as :class:`MoCoLoss`. temperature: τ (0.2).
        pos_alpha, neg_alpha: the Beta parameters (2.0 and 1.6 in the paper).
        normalize_mixed: normalise q̂ and k̂ after mixing (off in the paper).
        gather_distributed, process_group: as :class:`MoCoLoss` (the mean over
            every rank's queries, one queue on every rank). Each rank draws its
            own mix from its own generator, as the authors' script does.
    """

    def __init__(self, dim: int, queue_size: int = 65536, temperature: float = 0.2,
                 pos_alpha: float = 2.0, neg_alpha: float = 1.6, normalize_mixed: bool = False,
                 backend: str = "auto", *, gather_distributed: bool = False,
                 process_group=None):
        super().__init__(dim, queue_size, temperature, backend,
                         gather_distributed=gather_distributed, process_group=process_group)
        for name, alpha in (("pos_alpha", pos_alpha), ("neg_alpha", neg_alpha)):
            if not isinstance(alpha, (int, float)) or not alpha > 0:
                raise ValueError(f"{name} must be a number > 0, got {alpha!r}")
        self.pos_alpha, self.neg_alpha = float(pos_alpha), float(neg_alpha)
        self.normalize_mixed = normalize_mixed

    def sample_mix(self):
        """(λ_p, λ_n, π) for one step: two 0-dim float32 tensors and a (K,) permutation."""
        device = self.queue.device
        lam_pos = (1 + self._symmetric_beta(self.pos_alpha)).to(device)
        lam_neg = self._symmetric_beta(self.neg_alpha).to(device)
        return lam_pos, lam_neg, torch.randperm(self.queue.shape[0], device=device)

    @staticmethod
    def _symmetric_beta(alpha: float) -> Tensor:
        concentration = torch.tensor(alpha)
        return torch.distributions.Beta(concentration, concentration).sample()

    def forward(self, query: Tensor, key: Tensor) -> Tensor:
        exchange, layout = self._join(key)
        lam_pos, lam_neg, perm = self.sample_mix()
        per_query = ft_moco_loss(query, key, self.queue, lam_pos, lam_neg, perm,
                                 self.temperature, normalize_mixed=self.normalize_mixed,
                                 reduction="none", backend=self.backend)
        return self._mean_and_enqueue(per_query, key, exchange, layout)
