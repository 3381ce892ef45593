"""pyclloss: fused contrastive-learning losses for PyTorch.

Functions (``pyclloss.nt_xent`` ...) and modules (``pyclloss.NTXentLoss`` ...)
of the InfoNCE family, gated subspaces, embedding mixup, sorting networks and
pair-quality losses,
each with ``backend="auto" | "cpp" | "cuda" | "triton" | "reference"``;
``pyclloss.backends()`` says which backends are available here.
"""

from .backends import CompiledKernelsWarning, backends, warn_if_extension_unusable
from .ft_moco import FTMoCoLoss, ft_moco_loss
from .gated import HydraLoss, gated_info_nce
from .info_nce import (
    ClipLoss,
    InfoNCELoss,
    MoCoLoss,
    NTXentLoss,
    PairNTXentLoss,
    SigLipLoss,
    SupConLoss,
    clip_loss,
    info_nce,
    nt_xent,
    pair_nt_xent,
    siglip_loss,
    supcon,
)
from .pair_quality import (
    AMCLLoss,
    CACRLoss,
    DCLLoss,
    DecoupledNTXentLoss,
    HCLLoss,
    amcl_loss,
    cacr_loss,
    dcl_loss,
    decoupled_nt_xent,
    hcl_loss,
)
from .rnc import RnCLoss, rnc_loss
from .sorting import (
    DiffSortNet,
    GroCoLoss,
    diff_sort,
    diff_sort_apply,
    groco_loss,
    soft_rank,
    soft_top_k_mask,
)
from .supremix import SupReMixLoss, supremix_loss

__version__ = "0.1.0"

warn_if_extension_unusable()

__all__ = [
    "backends",
    "CompiledKernelsWarning",
    "clip_loss",
    "info_nce",
    "nt_xent",
    "pair_nt_xent",
    "siglip_loss",
    "supcon",
    "ClipLoss",
    "InfoNCELoss",
    "MoCoLoss",
    "NTXentLoss",
    "PairNTXentLoss",
    "SigLipLoss",
    "SupConLoss",
    "diff_sort",
    "diff_sort_apply",
    "groco_loss",
    "soft_rank",
    "soft_top_k_mask",
    "DiffSortNet",
    "GroCoLoss",
    "ft_moco_loss",
    "FTMoCoLoss",
    "gated_info_nce",
    "HydraLoss",
    "supremix_loss",
    "rnc_loss",
    "SupReMixLoss",
    "RnCLoss",
    "dcl_loss",
    "hcl_loss",
    "decoupled_nt_xent",
    "DCLLoss",
    "HCLLoss",
    "DecoupledNTXentLoss",
    "cacr_loss",
    "CACRLoss",
    "amcl_loss",
    "AMCLLoss",
]
