"""Which backends exist here, how ``backend="auto"`` chooses, and where each
op family's kernels are (the kernel registry, declared by ``KernelFamily`` in
the family's ops module).

Backends: ``"cpp"`` (compiled C++ CPU kernels), ``"cuda"`` (compiled CUDA
kernels), ``"triton"`` (Triton kernels; CUDA tensors, or CPU tensors under
``TRITON_INTERPRET=1``), ``"reference"`` (plain PyTorch, always available).
``auto`` picks, on CUDA tensors, the first of an op family's GPU backends (in
the order the family lists them: fastest measured or expected first) that is
available; on CPU tensors the C++ kernels; else the reference. It never fails
for lack of a compiled piece, nor falls back silently: a
``CompiledKernelsWarning`` (once) says why, as ``import pyclloss`` does when
the extension is missing or was built against another torch. Asking
explicitly for a missing backend raises.
"""

import functools
import importlib
import os
import warnings
from types import ModuleType
from typing import Callable, Dict, NamedTuple, Optional, Tuple

import torch

BACKENDS = ("cpp", "cuda", "triton", "reference")
REBUILD = ("build it against the installed torch: pip install --no-build-isolation --no-deps "
           "--force-reinstall <pyclloss source tree or sdist> (-e for a development tree)")


class Availability(NamedTuple):
    available: bool
    reason: str


class CompiledKernelsWarning(UserWarning):
    """``backend="auto"`` runs the plain-PyTorch reference where compiled kernels
    should run (the extension is missing or was built against another torch)."""


@functools.lru_cache(maxsize=None)
def _compiled():
    """The compiled extension module, or an ImportError saying why it cannot
    run here and how to fix it. An extension built against another torch is
    refused even when it loads: its kernels would call into a different ABI."""
    try:
        ext = importlib.import_module("pyclloss._C")
    except ModuleNotFoundError as exc:
        if exc.name != "pyclloss._C":
            raise
        return ImportError(f"pyclloss._C is not built here; {REBUILD}")
    except ImportError as exc:
        return ImportError(f"pyclloss._C does not load ({exc}); {REBUILD}")
    built = getattr(ext, "built_with_torch", lambda: "an unknown version")()
    if built != torch.__version__:
        return ImportError(f"pyclloss._C was built against torch {built}, this is torch "
                           f"{torch.__version__}; {REBUILD}")
    return ext


def extension_status() -> str:
    """The torch the compiled extension was built against, or why it cannot run."""
    ext = _compiled()
    if isinstance(ext, Exception):
        return str(ext)
    return f"built against torch {ext.built_with_torch()} (this torch)"


def _triton_interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


@functools.lru_cache(maxsize=None)
def _triton_import_error():
    try:
        importlib.import_module("triton")
    except ImportError as exc:
        return f"triton is not installed ({exc})"
    return None


def _availability(name: str) -> Availability:
    ext = _compiled()
    if name == "reference":
        return Availability(True, "plain PyTorch")
    if name == "cpp":
        if isinstance(ext, Exception):
            return Availability(False, str(ext))
        omp = "OpenMP" if ext.built_with_openmp() else "no OpenMP"
        return Availability(True, f"compiled C++ kernels ({omp}, {torch.get_num_threads()} threads)")
    if name == "cuda":
        if isinstance(ext, Exception):
            return Availability(False, str(ext))
        if not ext.built_with_cuda():
            return Availability(False, "extension built without CUDA")
        if not torch.cuda.is_available():
            return Availability(False, "no CUDA device")
        return Availability(True, f"compiled CUDA kernels on {torch.cuda.get_device_name()}")
    if name == "triton":
        error = _triton_import_error()
        if error:
            return Availability(False, error)
        if torch.cuda.is_available():
            return Availability(True, f"Triton on {torch.cuda.get_device_name()}")
        if _triton_interpreting():
            return Availability(True, "Triton interpreter on the CPU (TRITON_INTERPRET=1)")
        return Availability(False, "no CUDA device (set TRITON_INTERPRET=1 to interpret on the CPU)")
    raise ValueError(f"backend must be one of {('auto',) + BACKENDS}, got {name!r}")


def backends() -> Dict[str, Availability]:
    """Availability of every backend here, with the reason: ``{name: (available, reason)}``."""
    return {name: _availability(name) for name in BACKENDS}


def _runs_on(name: str, device: torch.device) -> bool:
    if name == "cpp":
        return device.type == "cpu"
    if name == "cuda":
        return device.type == "cuda"
    if name == "triton":
        return device.type == "cuda" or (device.type == "cpu" and _triton_interpreting())
    return True


def _fused_on(device: torch.device) -> Tuple[str, ...]:
    return ("cuda", "triton") if device.type == "cuda" else ("cpp",)


_warned = set()


def warn_fallback(device_type: str, fused: Tuple[str, ...]) -> None:
    """Warns, once per message, that ``auto`` runs the reference on
    ``device_type`` tensors, with why each of the ``fused`` backends cannot."""
    why = "; ".join(f"{name}: {_availability(name).reason}" for name in fused)
    message = (f"backend='auto' runs the plain-PyTorch reference backend on {device_type} "
               f"tensors (O(N^2) memory, slower) because {why}")
    if message not in _warned:
        _warned.add(message)
        warnings.warn(message, CompiledKernelsWarning, stacklevel=3)


def warn_if_extension_unusable() -> None:
    """The warning ``import pyclloss`` gives when the compiled extension is
    missing or was built against another torch."""
    if isinstance(_compiled(), Exception):
        warn_fallback("cpu", ("cpp",))


def _constant_when_traced(fn):
    """``torch.compiler.assume_constant_result`` without its import of
    ``torch._dynamo`` (seconds, and this module loads with ``import pyclloss``):
    that decorator only sets this attribute, which Dynamo reads when it traces
    a call, so a trace bakes the choice in with no graph break."""
    fn._dynamo_marked_constant = True
    return fn


def _measured_fastest(family, device, dtype, size) -> Optional[str]:
    if family is None or dtype is None or device.type != "cuda":
        return None
    from .triton_kernels import tuning  # reads only torch and the json file

    return tuning.preferred_backend(family, dtype, size, tuning.card_key(device))


@_constant_when_traced
def resolve(backend: str, device: torch.device, implemented: Tuple[str, ...] = BACKENDS, *,
            family: Optional[str] = None, dtype: Optional[torch.dtype] = None,
            size: int = 0) -> str:
    """The concrete backend that runs for tensors on ``device``, among the
    backends an op family has kernels for (``implemented``, in its order of
    preference on the GPU). On a GPU, ``auto`` first takes the backend measured
    fastest on this card model for the ``family`` at this ``dtype`` and
    ``size`` (D, or n for sorting) when triton_kernels/tuned.json records one."""
    if not isinstance(backend, str):
        raise TypeError(f"backend must be a string, got {type(backend).__name__}")
    if backend == "auto":
        fused = tuple(n for n in implemented if n in _fused_on(device))
        measured = _measured_fastest(family, device, dtype, size)
        if measured in fused:
            fused = (measured,) + tuple(n for n in fused if n != measured)
        for name in fused:
            if _availability(name).available and _runs_on(name, device):
                return name
        if fused:
            warn_fallback(device.type, fused)
        return "reference"
    available, reason = _availability(backend)
    if backend not in implemented:
        raise ValueError(f"backend={backend!r} has no kernels for this op; use one of "
                         f"{('auto',) + implemented}")
    if not available:
        raise RuntimeError(f"backend={backend!r} is not available: {reason}")
    if not _runs_on(backend, device):
        raise ValueError(f"backend={backend!r} cannot run on {device.type} tensors")
    return backend


# ------------------------------------------------------------------ the kernel registry


class CompiledOps(NamedTuple):
    """Kernels of the compiled extension: ``torch.ops.pyclloss_C.<op>`` by kernel
    name (one op serves the CPU and, where registered, CUDA tensors)."""
    ops: Dict[str, str]

    def kernel(self, name: str):
        _compiled()  # loading the extension registers torch.ops.pyclloss_C
        return getattr(torch.ops.pyclloss_C, self.ops[name])

    def has(self, name: str) -> bool:
        return name in self.ops


class ModuleKernels(NamedTuple):
    """Kernels that are the functions of a Python module, got from ``load``
    when first run (Triton takes seconds to import)."""
    load: Callable[[], ModuleType]

    def kernel(self, name: str):
        return getattr(self.load(), name)

    def has(self, name: str) -> bool:
        return hasattr(self.load(), name)


def compiled(*names: str, **renamed: str) -> CompiledOps:
    """The compiled ops ``names``, and ``kernel=op`` for kernels whose op has another name."""
    return CompiledOps({**{name: name for name in names}, **renamed})


def module(loaded: ModuleType) -> ModuleKernels:
    """The functions of an imported module (the reference)."""
    return ModuleKernels(lambda: loaded)


def lazy_module(load: Callable[[], ModuleType]) -> ModuleKernels:
    """The functions of the module ``load()`` imports on first use (a Triton module)."""
    return ModuleKernels(load)


_FAMILIES: Dict[str, "KernelFamily"] = {}


class KernelFamily:
    """Where the kernels of one op family are, backend by backend, declared once
    in the family's ops module: ``KernelFamily("rnc", cpp=compiled(...),
    triton=lazy_module(...), reference=module(...))``. The backends come in
    the family's order of preference on the GPU, which ``auto`` follows.
    ``pyclloss info`` lists every declared family."""

    def __init__(self, name: str, **where):
        unknown = [backend for backend in where if backend not in BACKENDS]
        if unknown or "reference" not in where:
            raise ValueError(f"op family {name!r}: backends must be among {BACKENDS} and "
                             f"include the reference, got {tuple(where)}")
        self.name, self._where = name, where
        _FAMILIES[name] = self

    @property
    def backends(self) -> Tuple[str, ...]:
        """The backends with kernels, in order of preference on the GPU."""
        return tuple(self._where)

    def kernel(self, backend: str, name: str):
        """The kernel ``name`` in a concrete backend."""
        return self._where[backend].kernel(name)

    def has(self, backend: str, name: str) -> bool:
        """Whether ``backend`` has the (optional) kernel ``name``."""
        return backend in self._where and self._where[backend].has(name)


def families() -> Dict[str, KernelFamily]:
    """Every declared op family (those of ``import pyclloss``), by name."""
    return dict(_FAMILIES)
