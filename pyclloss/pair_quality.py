"""Pair-quality tools: which samples and pairs deserve how much weight.

* :func:`quality_weights`: GenView-style per-sample weights from a quality
  score, to pass as ``weights=`` to any InfoNCE-family loss;
* :class:`DBPM`: dynamic bad pair mining, a per-sample loss memory over the
  epochs that finds the noisy and faulty positive pairs and down-weights them;
* :class:`DirectPredictor`: DirectPred's linear predictor, set from the running
  correlation of its inputs instead of trained by gradient;
* :func:`cacr_loss` / :class:`CACRLoss`: contrastive attraction and repulsion,
  its repulsion in fused kernels (the ``cacr`` op family);
* :func:`amcl_loss` / :class:`AMCLLoss`: adaptive multi-head contrastive
  learning on the fused ``amcl`` kernels (top-k hardest negatives, pair
  temperatures from a temperature network);
* :func:`dcl_loss` / :class:`DCLLoss`: debiased contrastive loss (Chuang et al.),
* :func:`hcl_loss` / :class:`HCLLoss`: hard-negative contrastive loss (Robinson et al.),
* :func:`decoupled_nt_xent` / :class:`DecoupledNTXentLoss`: decoupled NT-Xent
  (Yeh et al.), optionally von Mises-Fisher weighted, the last three on the
  InfoNCE core's per-row statistics.

The dense specifications are ``pyclloss.reference.pair_quality`` and
``pyclloss.reference.cacr``; docs/pair_quality.md has the formulas.
"""

import math
import numbers
from typing import NamedTuple, Optional, Tuple, Union

import torch
import torch.nn.functional as F
from torch import nn

from . import _checks, distributed
from ._stats import reduce_anchors, stats_dtype
from .backends import resolve
from .info_nce import _backend as _info_nce_backend
from .info_nce import _Distributable
from .ops import amcl as amcl_ops
from .ops import cacr as cacr_ops
from .ops import info_nce as core
from .ops.unit_rows import unit_rows
from .reference import cacr as cacr_reference
from .reference import pair_quality as reference

Tensor = torch.Tensor


def _integer(name: str, value, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    return int(value)


def _real(name: str, value, low: float = -math.inf, high: float = math.inf,
          high_open: bool = False) -> float:
    """A finite real hyper-parameter in [low, high] (or [low, high))."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a real number, got {type(value).__name__}")
    value = float(value)
    above_high = value >= high if high_open else value > high
    # comparisons rather than math.isfinite, which torch.compile cannot trace (NaN fails both)
    if not -math.inf < value < math.inf or value < low or above_high:
        bound = f"[{low}, {high})" if high_open else f"[{low}, {high}]"
        raise ValueError(f"{name} must be finite and in {bound}, got {value}")
    return value


def _vector(name: str, x, length: int = None) -> Tensor:
    """A 1-D floating tensor of finite values (of ``length`` entries if given)."""
    if not isinstance(x, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if not x.dtype.is_floating_point:
        raise TypeError(f"{name} must be a floating-point tensor, got {x.dtype}")
    if x.dim() != 1 or x.shape[0] == 0 or (length is not None and x.shape[0] != length):
        expected = "(n,) with n >= 1" if length is None else f"({length},)"
        raise ValueError(f"{name} must have shape {expected}, got {tuple(x.shape)}")
    _checks.finite(name, x)
    return x


# -------------------------------------------------------------------- quality weights


def quality_weights(scores: Tensor, gamma=1.0) -> Tensor:
    """GenView's per-sample loss weights ``w_i = B·softmax_i(γ·q_i)`` (detached).

    ``scores`` (B,): a quality score per sample (GenView: the foreground
    similarity minus the background similarity of the two views). The weights
    are positive, sum to B (so a weighted mean ``Σ w_i L_i / Σ w_i`` is the plain
    ``mean_i w_i L_i``) and favour the samples of higher score; γ sets how
    strongly. Returned in float32 (float64 for float64 scores); pass them as
    ``weights=`` to any InfoNCE-family loss::

        w = pyclloss.pair_quality.quality_weights(fg_sim - bg_sim)
        loss = pyclloss.nt_xent(z1, z2, weights=w)
    """
    scores = _vector("scores", scores)
    acc = stats_dtype(scores.dtype)
    gamma = _checks.scalar("gamma", gamma, scores.device, acc).detach()
    logits = gamma * scores.detach().to(acc)
    _checks.require(torch.isfinite(logits), "gamma * scores must be finite")
    return scores.shape[0] * torch.softmax(logits, dim=0)


# ------------------------------------------------------------------------------ DBPM

# Relative spread of the memory below which DBPM treats it as equal.
_RESOLUTION = 1e-12


class DBPM(nn.Module):
    """Dynamic bad pair mining (Lan et al., ICLR 2024) around any per-sample loss.

    ``forward(per_sample_loss, indices)`` takes the batch's per-sample losses
    L_i (B,) and their data-set indices (B,); in training mode it records the
    detached L_i in the memory; it returns ``mean_i w_i·L_i`` with w_i = 1 except
    for the samples flagged at the start of the epoch, which get the Gaussian
    density ``w_i = N(μ, σ²).pdf(L_i)`` (detached). Call :meth:`end_epoch` once
    after each epoch.

    The memory (tensors sized by the data set, kept in ``state_dict``) holds,
    per sample, the epoch-weighted sum ``Σ_e ((e+1)/max_epochs)·L^(e)`` of its
    losses over the closed epochs and how many epochs recorded it; its mean
    m_i (:attr:`memory`) is the authors' training-behaviour statistic. From the
    end of epoch ``warmup_epochs − 1`` on, each :meth:`end_epoch` takes μ, σ
    (population) of the m_i and flags a sample noisy if m_i ≤ μ − cut_noisy·σ,
    faulty if m_i ≥ μ + cut_faulty·σ (:attr:`noisy_indices`,
    :attr:`faulty_indices`). docs/pair_quality.md lists where this differs
    from the authors' dictionary-based code.
    """

    def __init__(self, num_samples: int, max_epochs: int, warmup_epochs: int = 50,
                 cut_noisy: float = 2.0, cut_faulty: float = 3.0):
        super().__init__()
        self.num_samples = _integer("num_samples", num_samples, 1)
        self.max_epochs = _integer("max_epochs", max_epochs, 1)
        self.warmup_epochs = _integer("warmup_epochs", warmup_epochs, 0)
        self.cut_noisy = _real("cut_noisy", cut_noisy, low=0.0)
        self.cut_faulty = _real("cut_faulty", cut_faulty, low=0.0)
        n, f64 = self.num_samples, torch.float64
        self.register_buffer("weighted_loss_sum", torch.zeros(n, dtype=f64))
        self.register_buffer("epochs_recorded", torch.zeros(n, dtype=torch.int64))
        self.register_buffer("epoch_loss", torch.zeros(n, dtype=f64))
        self.register_buffer("epoch_seen", torch.zeros(n, dtype=torch.bool))
        self.register_buffer("epoch", torch.zeros((), dtype=torch.int64))
        self.register_buffer("mu", torch.zeros((), dtype=f64))
        self.register_buffer("sigma", torch.zeros((), dtype=f64))
        self.register_buffer("noisy", torch.zeros(n, dtype=torch.bool))
        self.register_buffer("faulty", torch.zeros(n, dtype=torch.bool))

    def extra_repr(self) -> str:
        return (f"num_samples={self.num_samples}, max_epochs={self.max_epochs}, "
                f"warmup_epochs={self.warmup_epochs}, cut_noisy={self.cut_noisy}, "
                f"cut_faulty={self.cut_faulty}")

    @property
    def memory(self) -> Tensor:
        """m_i (num_samples,): the mean epoch-weighted loss of each sample over the
        closed epochs; NaN for a sample no closed epoch recorded."""
        total = self.weighted_loss_sum
        count = self.epochs_recorded.to(total.dtype)
        return torch.where(count > 0, total / count.clamp_min(1), torch.full_like(total, math.nan))

    @property
    def noisy_indices(self) -> Tensor:
        return self.noisy.nonzero().squeeze(1)

    @property
    def faulty_indices(self) -> Tensor:
        return self.faulty.nonzero().squeeze(1)

    def _check_batch(self, per_sample_loss, indices) -> Tensor:
        per_sample_loss = _vector("per_sample_loss", per_sample_loss)
        b, device = per_sample_loss.shape[0], per_sample_loss.device
        if device != self.epoch_loss.device:
            raise ValueError(f"per_sample_loss is on {device} but the DBPM memory is on "
                             f"{self.epoch_loss.device}; move the module with .to()")
        indices = _checks.labels("indices", indices, b, device)
        _checks.require((indices >= 0) & (indices < self.num_samples),
                        f"indices must index the data set of {self.num_samples} samples "
                        f"(0 <= index < {self.num_samples})",
                        lambda: f"{indices.min().item()}..{indices.max().item()}")
        return indices

    def weights(self, per_sample_loss: Tensor, indices: Tensor) -> Tensor:
        """The detached weights w_i (B,) of ``forward``, in float64."""
        indices = self._check_batch(per_sample_loss, indices)
        return self._weights(per_sample_loss.detach().to(self.mu.dtype), indices)

    def _weights(self, loss: Tensor, indices: Tensor) -> Tensor:
        flagged = self.noisy[indices] | self.faulty[indices]  # only ever set with σ > 0
        z = (loss - self.mu) / self.sigma
        density = torch.exp(-0.5 * z.square()) / (self.sigma * math.sqrt(2 * math.pi))
        return torch.where(flagged, density, torch.ones_like(loss))

    def forward(self, per_sample_loss: Tensor, indices: Tensor) -> Tensor:
        indices = self._check_batch(per_sample_loss, indices)
        loss = per_sample_loss.detach().to(self.mu.dtype)
        if self.training:
            # a sample seen twice in an epoch keeps one of its losses
            self.epoch_loss[indices] = loss
            self.epoch_seen[indices] = True
        weights = self._weights(loss, indices).to(per_sample_loss.dtype)
        return (weights * per_sample_loss).mean()

    @torch.no_grad()
    def end_epoch(self) -> None:
        """Closes the epoch: folds its losses into the memory and, once the
        warm-up is over, flags the noisy and faulty samples for the next one."""
        factor = (self.epoch.item() + 1) / self.max_epochs
        seen = self.epoch_seen
        self.weighted_loss_sum += torch.where(seen, factor * self.epoch_loss,
                                              torch.zeros_like(self.epoch_loss))
        self.epochs_recorded += seen.to(self.epochs_recorded.dtype)
        self.epoch_seen.zero_()
        self.epoch += 1
        if self.epoch.item() >= self.warmup_epochs:
            self._flag()

    def _flag(self) -> None:
        m = self.memory
        known = ~torch.isnan(m)
        if not bool(known.any()):
            return
        values = m[known]
        mu, sigma = values.mean(), values.std(correction=0)
        # a spread at the rounding level of μ (equal memories): no sample stands out
        sigma = torch.where(sigma <= _RESOLUTION * mu.abs(), torch.zeros_like(sigma), sigma)
        self.mu.copy_(mu)
        self.sigma.copy_(sigma)
        if sigma.item() == 0:
            self.noisy.zero_()
            self.faulty.zero_()
            return
        self.noisy.copy_(known & (m <= self.mu - self.cut_noisy * self.sigma))
        self.faulty.copy_(known & (m >= self.mu + self.cut_faulty * self.sigma))


# ------------------------------------------------------------------------- DirectPred


class DirectPredictor(nn.Module):
    """DirectPred's linear predictor (Tian et al., ICML 2021), no gradient training.

    ``forward(*views)`` maps each (N, dim) view through the weight W (returns
    one tensor for one view, a tuple otherwise). In training mode each call then
    updates the running correlation of its inputs (all views together, detached):
    ``F ← ρ·F + (1 − ρ)·mean_n f_n f_nᵀ`` (the first call sets F to the batch's
    correlation), and every ``freq`` calls (the first included) sets
    ``W = U·diag(p)·Uᵀ`` from ``F = U·diag(s)·Uᵀ`` with
    ``p = max(√(max(s, 0)/max(s)) + eps, 1e-4)``. The prediction of a call uses
    the weight from before that call's update; W starts as the identity. W and
    F are buffers (saved in ``state_dict``), not parameters; the gradient
    reaches the inputs. Use it as the predictor of a BYOL/SimSiam-style
    negative-cosine loss.
    """

    def __init__(self, dim: int, rho: float = 0.3, eps: float = 0.01, freq: int = 1):
        super().__init__()
        self.dim = _integer("dim", dim, 1)
        self.rho = _real("rho", rho, 0.0, 1.0, high_open=True)
        self.eps = _real("eps", eps)
        self.freq = _integer("freq", freq, 1)
        self.register_buffer("weight", torch.eye(self.dim))
        self.register_buffer("correlation", torch.zeros(self.dim, self.dim))
        self.register_buffer("steps", torch.zeros((), dtype=torch.int64))

    def extra_repr(self) -> str:
        return f"dim={self.dim}, rho={self.rho}, eps={self.eps}, freq={self.freq}"

    def _check_views(self, views) -> None:
        if not views:
            raise TypeError("DirectPredictor needs at least one view (N, dim)")
        for i, v in enumerate(views):
            name = f"views[{i}]"
            _checks.features(name, v)
            if v.shape[1] != self.dim:
                raise ValueError(f"{name} must have {self.dim} features, got {v.shape[1]}")
            if v.device != self.weight.device:
                raise ValueError(f"{name} is on {v.device} but the predictor is on "
                                 f"{self.weight.device}; move the module with .to()")

    def forward(self, *views: Tensor) -> Union[Tensor, Tuple[Tensor, ...]]:
        self._check_views(views)
        weight = self.weight.clone()  # the update below must not change what backward saved
        predictions = tuple(v @ weight.to(v.dtype).T for v in views)
        if self.training:
            self._update(torch.cat([v.detach().to(self.weight.dtype) for v in views]))
        return predictions[0] if len(predictions) == 1 else predictions

    @torch.no_grad()
    def _update(self, f: Tensor) -> None:
        batch = f.T @ f / f.shape[0]
        if self.steps.item() == 0:
            self.correlation.copy_(batch)
        else:
            self.correlation.mul_(self.rho).add_((1 - self.rho) * batch)
        if self.steps.item() % self.freq == 0:
            self.weight.copy_(self._weight_from_correlation())
        self.steps += 1

    def _weight_from_correlation(self) -> Tensor:
        # float64: the eigenvectors of near-degenerate spectra are ill-conditioned
        s, u = torch.linalg.eigh(self.correlation.double())
        top = s.max()
        scaled = s.clamp_min(0) / top if top > 0 else torch.zeros_like(s)
        p = (scaled.sqrt() + self.eps).clamp_min(1e-4)
        return ((u * p) @ u.T).to(self.weight.dtype)


# ------------------------------------------------------------- DCL, HCL, decoupled
#
# The SimCLR-pair losses whose negatives' term is a function of per-row log-sum-
# exps: one pass of the fused InfoNCE core (two for HCL) over the unit rows of
# cat(z1, z2) with each sample's two rows as the positives and ``neg_only``
# gives, per row, the LSE of the scaled logits over the 2B − 2 negatives and
# the positive logit; the rest is O(B) work in log space. The N×N logits are
# built by ``backend="reference"`` only.


class _Pairs(NamedTuple):
    """The unit rows of cat(z1, z2) and how a loss call meets their negatives."""
    z: Tensor  # (2B, D) local rows, view-major
    ids: Tensor  # (2B,) each row's sample id over the global batch
    tau: Tensor  # the temperature (replicated over the ranks)
    negatives: int  # M: negatives per row, 2·(global B) − 2
    weights: Optional[Tensor]  # (2B,) or None
    reduction: str
    backend: str
    exchange: Optional[distributed.Exchange]
    layout: Optional[distributed.Layout]  # of the samples (B rows of z1 on each rank)


def _pairs(z1, z2, temperature, weights, reduction, backend, gather_distributed, process_group,
           strategy, **scalars) -> Tuple[_Pairs, Optional[Tensor]]:
    """Checks a call; returns its _Pairs and the checked weights (B,). ``scalars``:
    the loss's hyper-parameters, which every rank of a process group must share."""
    _checks.features("z1", z1)
    _checks.features("z2", z2)
    _checks.same_kind("z2", z2, "z1", z1, same_rows=True)
    reduction = _checks.reduction(reduction)
    b, device, acc = z1.shape[0], z1.device, stats_dtype(z1.dtype)
    weights = _checks.weights("weights", weights, b, device, acc)
    tau = _checks.temperature("temperature", temperature, device, acc)
    exchange = distributed.exchange(gather_distributed, process_group, strategy)
    backend = _info_nce_backend(backend, z1)
    z = unit_rows([z1, z2], backend)
    pair_weights = torch.cat([weights, weights]) if weights is not None else None
    if exchange is None:
        samples, layout, ids = b, None, torch.arange(b, device=device).repeat(2)
    else:
        layout = exchange.layout(b, z, reduction, temperature=tau, **scalars)
        samples, tau = layout.total, exchange.replicated(tau)
        ids = layout.ids(device).repeat(2)
    if samples < 2:
        raise ValueError(f"z1 needs at least 2 samples (rows) over the batch, got {samples}: "
                         f"a row's negatives are the other samples' rows")
    return _Pairs(z, ids, tau, 2 * samples - 2, pair_weights, reduction, backend, exchange,
                  layout), weights


def _negative_lse(p: _Pairs, factor: float = 1.0) -> Tuple[Tensor, Tensor]:
    """Per row: LSE over its negatives of factor·s/t, and its positive factor·s/t."""
    scale = factor / p.tau
    if p.exchange is not None:
        lse, pos, _ = core.row_stats(p.exchange, p.z, p.ids, p.z, p.ids, p.layout.times(2),
                                     scale, True, True, p.backend)
        return lse, pos
    lse, pos, _, _ = core.infonce_fwd(p.z, p.z, scale, p.ids, p.ids, 0, True, False, p.backend)
    return lse, pos


def _reduce(p: _Pairs, per_row: Tensor) -> Tensor:
    return distributed.reduce(p.exchange, per_row, None, p.weights, p.reduction)


def dcl_loss(z1: Tensor, z2: Tensor, temperature=0.5, tau_plus=0.1, *,
             weights: Optional[Tensor] = None, reduction: str = "mean", backend: str = "auto",
             gather_distributed: bool = False, process_group=None,
             strategy: str = "all_gather") -> Tensor:
    """Debiased contrastive loss (Chuang et al., NeurIPS 2020); equals the authors'
    ``chingyaoc/DCL`` on the normalised views.

    Rows of normalised cat(z1, z2) (2B×D), row i with positive logit p_i (its
    other view) and the M = 2B − 2 other rows as negatives:
    ``Ng_i = max((Σ_j e^{s_ij/t} − τ⁺·M·e^{p_i}) / (1 − τ⁺), M·e^{−1/t})``,
    ``L_i = log(1 + Ng_i·e^{−p_i})``, computed from log Σ_j e^{s_ij/t} (one
    pass of the fused core) in log space. τ⁺ = 0 gives NT-Xent.

    Args:
        z1, z2: (B, D) the two views' embeddings.
        temperature: t > 0, a float or a 0-dim tensor (gets a gradient).
        tau_plus: the class prior τ⁺ in [0, 1).
        weights: optional (B,) per-sample weights, applied to both views.
        reduction: "mean" (over the 2B rows), "sum", or "none" (2B,).
        gather_distributed, process_group, strategy: over a process group as
            one batch (``pyclloss.nt_xent``; docs/distributed.md).
    """
    tau_plus = _real("tau_plus", tau_plus, 0.0, 1.0, high_open=True)
    p, w = _pairs(z1, z2, temperature, weights, reduction, backend, gather_distributed,
                  process_group, strategy, tau_plus=tau_plus)
    if p.backend == "reference" and p.exchange is None:
        return reference.dcl_loss(z1, z2, p.tau, tau_plus, w, p.reduction)
    lse, pos = _negative_lse(p)
    return _reduce(p, reference.debiased_loss(pos, lse, p.negatives, p.tau, tau_plus))


def hcl_loss(z1: Tensor, z2: Tensor, temperature=0.5, tau_plus=0.1, beta=1.0, *,
             weights: Optional[Tensor] = None, reduction: str = "mean", backend: str = "auto",
             gather_distributed: bool = False, process_group=None,
             strategy: str = "all_gather") -> Tensor:
    """Hard-negative contrastive loss (Robinson et al., ICLR 2021); equals the
    authors' ``joshr17/HCL`` on the normalised views.

    :func:`dcl_loss` with the negatives' sum tilted towards the hard ones,
    ``Σ_j e^{s_ij/t}`` → ``M·Σ_j e^{(1+β)s_ij/t} / Σ_j e^{βs_ij/t}``: two passes
    of the fused core (scales (1+β)/t and β/t; one when β = 0, which gives DCL).
    β ≥ 0 is the concentration; the other arguments as :func:`dcl_loss`.
    """
    tau_plus = _real("tau_plus", tau_plus, 0.0, 1.0, high_open=True)
    beta = _real("beta", beta, low=0.0)
    p, w = _pairs(z1, z2, temperature, weights, reduction, backend, gather_distributed,
                  process_group, strategy, tau_plus=tau_plus, beta=beta)
    if p.backend == "reference" and p.exchange is None:
        return reference.hcl_loss(z1, z2, p.tau, tau_plus, beta, w, p.reduction)
    lse, pos = _negative_lse(p, 1 + beta)
    if beta > 0:
        lse = lse + math.log(p.negatives) - _negative_lse(p, beta)[0]
    per_row = reference.debiased_loss(pos / (1 + beta), lse, p.negatives, p.tau, tau_plus)
    return _reduce(p, per_row)


def _vmf_weights(p: _Pairs, z1: Tensor, z2: Tensor, sigma: float) -> Tensor:
    """DCLW's von Mises-Fisher weights (B,), detached: ``2 − B·softmax_i(c_i/σ)``
    with c_i = ⟨ẑ¹_i, ẑ²_i⟩, the softmax over the global batch (each rank
    gathers the B cosines only)."""
    acc = p.tau.dtype
    cosine = (F.normalize(z1.detach().to(acc), dim=1)
              * F.normalize(z2.detach().to(acc), dim=1)).sum(1)
    every = cosine if p.exchange is None else p.exchange.all_rows(cosine, p.layout)
    weights = 2 - every.shape[0] * torch.softmax(every / sigma, dim=0)
    return weights if p.exchange is None else weights[p.ids[:z1.shape[0]]]


def _decoupled(p: _Pairs, positive_weights: Optional[Tensor]) -> Tensor:
    """Per row ``−w_i·p_i + LSE_neg(s/t)`` with the weights w (2B,) of the rows
    (1 when None; they may carry a gradient), reduced."""
    lse, pos = _negative_lse(p)
    if positive_weights is not None:
        pos = pos * positive_weights.to(pos.dtype)
    return _reduce(p, lse - pos)


def decoupled_nt_xent(z1: Tensor, z2: Tensor, temperature=0.1, weight: str = "none", sigma=0.5,
                      *, weights: Optional[Tensor] = None, reduction: str = "mean",
                      backend: str = "auto", gather_distributed: bool = False,
                      process_group=None, strategy: str = "all_gather") -> Tensor:
    """Decoupled contrastive learning (Yeh et al., ECCV 2022); equals lightly's
    ``DCLLoss`` (``weight="none"``) and ``DCLWLoss`` (``weight="vmf"``).

    NT-Xent without the positive in the denominator: row i of normalised
    cat(z1, z2), ``L_i = −w_i·p_i + LSE_{j ∉ {i, i±B}} s_ij/t`` (one pass of
    the fused core), w = 1, or with ``weight="vmf"`` the von Mises-Fisher
    weights ``w_i = 2 − B·softmax_i(⟨ẑ¹_i, ẑ²_i⟩/σ)`` (detached, the same for
    both views; over a process group the softmax runs over the global batch).
    The other arguments as :func:`dcl_loss`.
    """
    if weight not in ("none", "vmf"):
        raise ValueError(f"weight must be 'none' or 'vmf', got {weight!r}")
    sigma = _real("sigma", sigma)
    if not sigma > 0:
        raise ValueError(f"sigma must be > 0, got {sigma}")
    p, w = _pairs(z1, z2, temperature, weights, reduction, backend, gather_distributed,
                  process_group, strategy, sigma=sigma)
    if p.backend == "reference" and p.exchange is None:
        return reference.decoupled_nt_xent(z1, z2, p.tau, weight, sigma, w, p.reduction)
    vmf = _vmf_weights(p, z1, z2, sigma) if weight == "vmf" else None
    return _decoupled(p, torch.cat([vmf, vmf]) if vmf is not None else None)


class DCLLoss(_Distributable):
    """Debiased contrastive loss; ``forward(z1, z2, weights=None)``. See
    :func:`dcl_loss`."""

    def __init__(self, temperature: float = 0.5, tau_plus: float = 0.1,
                 reduction: str = "mean", backend: str = "auto", *,
                 gather_distributed: bool = False, process_group=None,
                 strategy: str = "all_gather"):
        super().__init__(reduction, backend, gather_distributed, process_group, strategy)
        self.temperature, self.tau_plus = temperature, tau_plus

    def forward(self, z1: Tensor, z2: Tensor, weights: Optional[Tensor] = None) -> Tensor:
        return dcl_loss(z1, z2, self.temperature, self.tau_plus, weights=weights,
                        reduction=self.reduction, backend=self.backend, **self.distributed)


class HCLLoss(_Distributable):
    """Hard-negative contrastive loss; ``forward(z1, z2, weights=None)``. See
    :func:`hcl_loss`."""

    def __init__(self, temperature: float = 0.5, tau_plus: float = 0.1, beta: float = 1.0,
                 reduction: str = "mean", backend: str = "auto", *,
                 gather_distributed: bool = False, process_group=None,
                 strategy: str = "all_gather"):
        super().__init__(reduction, backend, gather_distributed, process_group, strategy)
        self.temperature, self.tau_plus, self.beta = temperature, tau_plus, beta

    def forward(self, z1: Tensor, z2: Tensor, weights: Optional[Tensor] = None) -> Tensor:
        return hcl_loss(z1, z2, self.temperature, self.tau_plus, self.beta, weights=weights,
                        reduction=self.reduction, backend=self.backend, **self.distributed)


class DecoupledNTXentLoss(_Distributable):
    """Decoupled NT-Xent (DCL/DCLW of Yeh et al.); ``forward(z1, z2, weights=None)``.
    See :func:`decoupled_nt_xent`."""

    def __init__(self, temperature: float = 0.1, weight: str = "none", sigma: float = 0.5,
                 reduction: str = "mean", backend: str = "auto", *,
                 gather_distributed: bool = False, process_group=None,
                 strategy: str = "all_gather"):
        super().__init__(reduction, backend, gather_distributed, process_group, strategy)
        self.temperature, self.weight, self.sigma = temperature, weight, sigma

    def forward(self, z1: Tensor, z2: Tensor, weights: Optional[Tensor] = None) -> Tensor:
        return decoupled_nt_xent(z1, z2, self.temperature, self.weight, self.sigma,
                                 weights=weights, reduction=self.reduction, backend=self.backend,
                                 **self.distributed)
# ------------------------------------------------------------------------------ CACR


def _cacr_views(views) -> Tuple[Tensor, ...]:
    for k, z in enumerate(views):
        _checks.features(f"z{k + 1}", z)
        if k:
            _checks.same_kind(f"z{k + 1}", z, "z1", views[0], same_rows=True)
    if views[0].shape[0] < 2:
        raise ValueError(f"z1 needs at least 2 samples (the repulsion's negatives), got "
                         f"{views[0].shape[0]}")
    return tuple(views)


def cacr_loss(z1: Tensor, z2: Tensor, *more_views: Tensor, attraction_temperature=1.0,
              repulsion_temperature=1.0, alpha=1.0, beta=1.0, normalize: bool = True,
              weights=None, reduction: str = "mean", backend: str = "auto",
              gather_distributed: bool = False, process_group=None) -> Tensor:
    """CACR, contrastive attraction and repulsion (Zheng et al., NeurIPS 2021).

    Views z¹…z^V (B, D), V ≥ 2, L2-normalised first unless ``normalize=False``.
    Per sample i, with c_xy = ‖z^x_i − z^y_i‖² and d_ij = ‖z^x_i − z^y_j‖²:

        L_i = α·mean_x Σ_{y≠x} softmax_y(τ⁺·c_xy)·c_xy
              − β·mean_{x<y} Σ_{j≠i} softmax_j(−τ⁻·d_ij)·d_ij

    The "temperatures" multiply the costs, as in the authors' code (larger is
    sharper). The softmax weights are not detached. The repulsion runs in the
    fused kernels (``pyclloss.ops.cacr``: no B×B matrix, near distances exact
    in float32); the attraction is O(V²·B·D) torch.

    Args:
        z1, z2, *more_views: (B, D) views of the same B samples, B >= 2.
        attraction_temperature, repulsion_temperature: τ⁺, τ⁻ >= 0 (floats).
        alpha, beta: weights of the attraction and the repulsion (floats).
        normalize: L2-normalise each view first (the authors' encoder does).
        weights: optional (B,) per-sample weights >= 0 ("mean" is Σ w L / Σ w).
        reduction: "mean", "sum" or "none" ((B,) per-sample losses).
        backend: "auto", "cpp", "triton" (float32 statistics: not for float64
            inputs, which "auto" gives the reference kernels) or "reference".
        gather_distributed, process_group: run over a torch.distributed group:
            the anchors stay local, each later view's rows are gathered from
            every rank (docs/distributed.md: the loss of the global batch,
            gradients of the sum over ranks).
    """
    views = _cacr_views((z1, z2) + tuple(more_views))
    tau_pos = _checks.fixed_real("attraction_temperature", attraction_temperature,
                                 nonnegative=True)
    tau_neg = _checks.fixed_real("repulsion_temperature", repulsion_temperature,
                                 nonnegative=True)
    alpha, beta = _checks.fixed_real("alpha", alpha), _checks.fixed_real("beta", beta)
    if not isinstance(normalize, bool):
        raise TypeError(f"normalize must be a bool, got {type(normalize).__name__}")
    reduction = _checks.reduction(reduction)
    b, device, acc = z1.shape[0], z1.device, stats_dtype(z1.dtype)
    weights = _checks.weights("weights", weights, b, device, acc)
    ex = distributed.exchange(gather_distributed, process_group, "all_gather")
    requested = backend
    backend = resolve(backend, device, cacr_ops.KERNELS.backends)
    if requested == "auto" and backend == "triton" and acc == torch.float64:
        backend = "reference"  # the Triton kernels keep float32 statistics
    if backend == "reference" and ex is None:
        return cacr_reference.cacr_loss(
            *views, attraction_temperature=tau_pos, repulsion_temperature=tau_neg, alpha=alpha,
            beta=beta, normalize=normalize, weights=weights, reduction=reduction)
    z = [F.normalize(v.to(acc), dim=1) if normalize else v.to(acc) for v in views]
    offset, sizes = 0, None
    if ex is not None:
        layout = ex.layout(b, z1, reduction, attraction_temperature=tau_pos,
                           repulsion_temperature=tau_neg)
        offset, sizes = layout.offset, layout.sizes
    pairs = cacr_reference.view_pairs(len(z))
    repulsion = 0
    for x, y in pairs:
        others = z[y] if ex is None else distributed.all_gather_with_grad(z[y], ex.group, sizes)
        repulsion = repulsion + cacr_ops.cacr_repulsion(z[x], others, tau_neg, offset, backend)[0]
    per_sample = alpha * cacr_reference.attraction(z, tau_pos) - beta * repulsion / len(pairs)
    return distributed.reduce(ex, per_sample, None, weights, reduction)


class CACRLoss(nn.Module):
    """CACR (contrastive attraction and repulsion); ``forward(z1, z2, *more_views,
    weights=None)``. See :func:`pyclloss.pair_quality.cacr_loss`."""

    def __init__(self, attraction_temperature: float = 1.0, repulsion_temperature: float = 1.0,
                 alpha: float = 1.0, beta: float = 1.0, normalize: bool = True,
                 reduction: str = "mean", backend: str = "auto",
                 gather_distributed: bool = False, process_group=None):
        super().__init__()
        self.attraction_temperature = attraction_temperature
        self.repulsion_temperature = repulsion_temperature
        self.alpha, self.beta, self.normalize = alpha, beta, normalize
        self.reduction, self.backend = reduction, backend
        self.gather_distributed, self.process_group = gather_distributed, process_group

    def forward(self, z1: Tensor, z2: Tensor, *more_views: Tensor, weights=None) -> Tensor:
        return cacr_loss(z1, z2, *more_views, attraction_temperature=self.attraction_temperature,
                         repulsion_temperature=self.repulsion_temperature, alpha=self.alpha,
                         beta=self.beta, normalize=self.normalize, weights=weights,
                         reduction=self.reduction, backend=self.backend,
                         gather_distributed=self.gather_distributed,
                         process_group=self.process_group)

# ------------------------------------------------------------------------------ AMCL


def _amcl_features(z1, z2) -> None:
    for name, z in (("z1", z1), ("z2", z2)):
        _checks.features(name, z, ndims=(3,), min_rows=2)
    _checks.same_kind("z2", z2, "z1", z1)
    if z2.shape != z1.shape:
        raise ValueError(f"z2 must have z1's shape {tuple(z1.shape)} (B, heads, D), "
                         f"got {tuple(z2.shape)}")


def _amcl_temperatures(tau_min, tau_max) -> Tuple[float, float]:
    tau_min = _real("tau_min", tau_min, low=0.0)
    if tau_min == 0:
        raise ValueError("tau_min must be > 0 (the loss takes log τ), got 0.0")
    return tau_min, _real("tau_max", tau_max, low=tau_min)


def _amcl_phi(temperature_net, z: Tensor) -> Tensor:
    """φ(z) (n, h) in z's dtype, the network fed its parameters' dtype."""
    params = next(iter(temperature_net.parameters()), None) \
        if isinstance(temperature_net, nn.Module) else None
    phi = temperature_net(z if params is None else z.to(params.dtype))
    if not isinstance(phi, Tensor) or phi.dim() != 2 or phi.shape[0] != z.shape[0] \
            or phi.shape[1] == 0 or not phi.dtype.is_floating_point:
        got = tuple(phi.shape) if isinstance(phi, Tensor) else type(phi).__name__
        raise ValueError(f"temperature_net must map (n, D) rows to floating (n, h) outputs, "
                         f"got {got} for input {tuple(z.shape)}")
    return phi.to(z.dtype)


def amcl_loss(z1: Tensor, z2: Tensor, temperature_net, tau_min=1e-5, tau_max=2.0, beta=0.01,
              topk=100, weights=None, reduction="mean", backend="auto",
              gather_distributed=False, process_group=None) -> Tensor:
    """AMCL (adaptive multi-head contrastive learning), the authors' ``AMCLNTXentLoss``.

    z1, z2 (B, C, D): C heads, each L2-normalised here. Per head, on the 2B rows
    z = cat(z1, z2), pair temperatures ``τ_aj = τ_min + (τ_max − τ_min)·σ(−φ_a·φ_j)``
    from the ``temperature_net`` φ (shared by the heads, applied to each
    normalised row), and for anchor a with positive p and K its
    k = min(topk, 2B − 2) negatives of largest ``s_aj = z_a·z_j``:

        −s_ap/τ_ap + mean_K s_aj/τ_aj + β·((D/2)·log τ_ap + 1/τ_ap) − β·Σ_K (log τ_aj + 1/τ_aj)

    Sample i's loss is the mean of its two directions summed over the heads
    ((B,) with ``reduction="none"``; ``weights`` (B,) weigh them). The selection
    of K gets no gradient; z1, z2 and φ's parameters get theirs through s and τ.

    The fused backends (``cpp`` on the CPU, ``triton``) never build the 2B×2B
    matrices: a streaming top-k of s per row keeps (2B, k) indices, the loss
    and its gradient to z and φ(z) run over those pairs only, and autograd
    takes dφ on through the network. ``reference`` is the dense
    ``pyclloss.reference.pair_quality.amcl_loss``. docs/pair_quality.md has the
    formulas and the differences from the authors' code.

    ``gather_distributed=True`` (or a ``process_group``): the loss of the
    global batch, the rank-major concatenation of every rank's z1 and z2
    (docs/distributed.md: each rank returns the global value, or its own
    samples' losses with "none"; gradients follow DDP's convention). Each rank
    computes the whole global loss (no saving of work over one process).
    """
    _amcl_features(z1, z2)
    if not callable(temperature_net):
        raise TypeError(f"temperature_net must be callable (an nn.Module mapping (n, D) to "
                        f"(n, h)), got {type(temperature_net).__name__}")
    tau_min, tau_max = _amcl_temperatures(tau_min, tau_max)
    beta, topk = _real("beta", beta), _integer("topk", topk, 1)
    reduction = _checks.reduction(reduction)
    ex = distributed.exchange(gather_distributed, process_group, "all_gather")
    if ex is None:
        return _amcl(z1, z2, temperature_net, tau_min, tau_max, beta, topk, weights, reduction,
                     backend)
    # Every rank computes the loss of the global batch from the gathered views
    # (the work of one process holding it); its gradient to the gathered rows
    # is summed over the ranks on the way home, as docs/distributed.md says.
    b = z1.shape[0]
    _checks.weights("weights", weights, b, z1.device, stats_dtype(z1.dtype))
    layout = ex.layout(b, z1.reshape(b, -1), reduction, topk=topk,
                       weighted=float(weights is not None))
    views = [distributed.all_gather_with_grad(z, ex.group, layout.sizes) for z in (z1, z2)]
    weights = None if weights is None else ex.all_rows(weights, layout)
    per_sample = _amcl(*views, temperature_net, tau_min, tau_max, beta, topk, weights, "none",
                       backend)
    if reduction == "none":
        return per_sample[layout.offset:layout.offset + b]
    return reduce_anchors(per_sample, None, weights, reduction)


def _amcl(z1, z2, temperature_net, tau_min: float, tau_max: float, beta: float, topk: int,
          weights, reduction: str, backend: str) -> Tensor:
    """amcl_loss past the checks of the features and the hyper-parameters."""
    b, heads = z1.shape[:2]
    acc = stats_dtype(z1.dtype)
    weights = _checks.weights("weights", weights, b, z1.device, acc)
    backend = resolve(backend, z1.device, amcl_ops.KERNELS.backends)
    if backend == "reference":
        return reference.amcl_loss(z1, z2, temperature_net, tau_min, tau_max, beta, topk,
                                   weights, reduction)
    # head-major (heads, 2B, D): each head's rows contiguous, one copy forth and back
    z = F.normalize(torch.cat([z1, z2], dim=0).to(acc).transpose(0, 1).contiguous(), dim=-1)
    k = min(topk, 2 * b - 2)
    rows = 0
    for z_h in z.unbind(0):
        idx = amcl_ops.amcl_topk(z_h.detach(), k, backend)
        rows = rows + amcl_ops.amcl_rows(z_h, _amcl_phi(temperature_net, z_h), idx, tau_min,
                                         tau_max, beta, backend)
    return reduce_anchors((rows[:b] + rows[b:]) / 2, None, weights, reduction)


class AMCLLoss(nn.Module):
    """AMCL with its temperature network ``temperature_net``, the authors'
    ``Linear(dim, hidden) → ReLU → Linear(hidden, dim)`` (hidden = dim by
    default); ``forward(z1, z2, weights=None)`` with z1, z2 (B, num_heads, dim).
    See :func:`pyclloss.pair_quality.amcl_loss`."""

    def __init__(self, dim: int, num_heads: int = 3, beta: float = 0.01, tau_min: float = 1e-5,
                 tau_max: float = 2.0, topk: int = 100, hidden: int = None,
                 reduction: str = "mean", backend: str = "auto"):
        super().__init__()
        self.dim = _integer("dim", dim, 1)
        self.num_heads = _integer("num_heads", num_heads, 1)
        hidden = self.dim if hidden is None else _integer("hidden", hidden, 1)
        self.tau_min, self.tau_max = _amcl_temperatures(tau_min, tau_max)
        self.beta = _real("beta", beta)
        self.topk = _integer("topk", topk, 1)
        self.reduction, self.backend = _checks.reduction(reduction), backend
        self.temperature_net = nn.Sequential(nn.Linear(self.dim, hidden), nn.ReLU(),
                                             nn.Linear(hidden, self.dim))

    def extra_repr(self) -> str:
        return (f"dim={self.dim}, num_heads={self.num_heads}, beta={self.beta}, "
                f"tau_min={self.tau_min}, tau_max={self.tau_max}, topk={self.topk}")

    def forward(self, z1: Tensor, z2: Tensor, weights: Tensor = None) -> Tensor:
        _amcl_features(z1, z2)
        if tuple(z1.shape[1:]) != (self.num_heads, self.dim):
            raise ValueError(f"z1 must have shape (B, {self.num_heads}, {self.dim}), "
                             f"got {tuple(z1.shape)}")
        # the hyper-parameters were checked once, in __init__
        return _amcl(z1, z2, self.temperature_net, self.tau_min, self.tau_max, self.beta,
                     self.topk, weights, self.reduction, self.backend)
