"""The implementations users already have, loaded for parity tests and benchmarks.

lightly and open_clip import torchvision at the top of their packages, which a
CPU-only environment often lacks; their loss files do not need it, so they are
loaded as single files with the package's other imports stubbed. Each loader
returns the loss class, or raises ``PeerUnavailable`` saying why.
"""

import importlib
import importlib.util
import sys
import types
from typing import Iterable, Tuple


class PeerUnavailable(ImportError):
    """A peer implementation is not installed or does not import here."""


def load_file_module(package: str, relpath: str, name: str,
                     stubs: Iterable[Tuple[str, types.ModuleType]] = ()) -> types.ModuleType:
    """One file of an installed package as a module, without importing the package;
    ``stubs`` stand in for the package modules the file imports."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise PeerUnavailable(f"{package} is not installed")
    path = f"{spec.submodule_search_locations[0]}/{relpath}"
    stubs = dict(stubs)
    saved = {key: sys.modules.get(key) for key in stubs}
    sys.modules.update(stubs)
    try:
        module_spec = importlib.util.spec_from_file_location(name, path)
        module = importlib.util.module_from_spec(module_spec)
        module_spec.loader.exec_module(module)
    except (ImportError, OSError) as exc:
        raise PeerUnavailable(f"{package}/{relpath} does not load here: {exc}") from exc
    finally:
        for key, value in saved.items():
            if value is None:
                sys.modules.pop(key, None)
            else:
                sys.modules[key] = value
    return module


def lightly_ntxent():
    """lightly's ``NTXentLoss`` with its memory bank (``memory_bank_size``), on
    one process: the memory bank's distributed gather (in the torchvision-bound
    ``lightly.models.utils``) is not loaded."""
    stubs = {name: types.ModuleType(name) for name in (
        "lightly", "lightly.utils", "lightly.models", "lightly.models.utils",
        "lightly.models.modules")}
    stubs["lightly.utils"].dist = load_file_module("lightly", "utils/dist.py", "lightly_dist")
    stubs["lightly.models"].utils = stubs["lightly.models.utils"]
    bank = load_file_module("lightly", "models/modules/memory_bank.py", "lightly_memory_bank",
                            stubs.items())
    stubs["lightly.models.modules.memory_bank"] = bank
    return load_file_module("lightly", "loss/ntx_ent_loss.py", "lightly_ntxent",
                            stubs.items()).NTXentLoss


def lightly_dcl():
    """lightly's ``loss/dcl_loss.py`` (``DCLLoss``, ``DCLWLoss``,
    ``negative_mises_fisher_weights``), loaded as one file."""
    stubs = {name: types.ModuleType(name) for name in ("lightly", "lightly.utils")}
    stubs["lightly.utils"].dist = load_file_module("lightly", "utils/dist.py", "lightly_dist")
    return load_file_module("lightly", "loss/dcl_loss.py", "lightly_dcl", stubs.items())


def open_clip_losses():
    """open_clip's loss module (``ClipLoss``, ``SigLipLoss``)."""
    return load_file_module("open_clip", "loss.py", "open_clip_loss")


def _import(module: str, what: str):
    try:
        return importlib.import_module(module)
    except Exception as exc:  # a broken peer is a missing column, not a failure
        raise PeerUnavailable(f"{what} does not import here ({type(exc).__name__}: {exc})") \
            from exc


def pml_losses():
    """pytorch-metric-learning's ``losses`` module."""
    return _import("pytorch_metric_learning.losses", "pytorch-metric-learning")


def diffsort_net():
    """diffsort's ``DiffSortNet``."""
    return _import("diffsort", "diffsort").DiffSortNet


def inf_cl_loss():
    """Inf-CL's ``cal_inf_loss`` (one direction of the CLIP loss per call; CUDA only)."""
    return _import("inf_cl", "Inf-CL (inf_cl)").cal_inf_loss
