"""Input validation shared by the public entry points.

Every message names the argument and the expected form. Value checks that
need a device sync (finiteness, positivity of a tensor) are skipped while
torch.compile traces, where they would break the graph.
"""

import math
import numbers
from typing import Optional, Sequence

import torch

Tensor = torch.Tensor

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
REDUCTIONS = ("mean", "sum", "none")


def _tracing() -> bool:
    return torch.compiler.is_compiling()


def features(name: str, x, ndims: Sequence[int] = (2,), min_rows: int = 1) -> Tensor:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name} must be float16, bfloat16, float32 or float64, got {x.dtype}")
    if x.dim() not in ndims:
        shapes = " or ".join({2: "(N, D)", 3: "(B, V, D)"}[d] for d in ndims)
        raise ValueError(f"{name} must have shape {shapes}, got {tuple(x.shape)}")
    if x.shape[0] < min_rows:
        raise ValueError(f"{name} needs at least {min_rows} rows, got {x.shape[0]}")
    if x.shape[-1] == 0:
        raise ValueError(f"{name} has an empty feature dimension: {tuple(x.shape)}")
    if not _tracing() and x.device.type != "meta" and not all_finite(x):
        raise ValueError(f"{name} contains NaN or Inf")
    return x


def all_finite(x: torch.Tensor) -> bool:
    """Whether every entry is finite. A NaN or Inf entry makes the sum NaN or Inf,
    so a finite sum settles it in one reduction; only an overflowing sum needs
    the full scan (which costs ~30× more)."""
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    return bool(torch.isfinite(x.sum(dtype=acc))) or bool(torch.isfinite(x).all())


def same_kind(name: str, x: Tensor, ref_name: str, ref: Tensor, same_rows: bool = False) -> None:
    if x.device != ref.device:
        raise ValueError(f"{name} is on {x.device} but {ref_name} is on {ref.device}")
    if x.dtype != ref.dtype:
        raise TypeError(f"{name} has dtype {x.dtype} but {ref_name} has {ref.dtype}")
    if x.shape[-1] != ref.shape[-1]:
        raise ValueError(
            f"{name} has feature dimension {x.shape[-1]} but {ref_name} has {ref.shape[-1]}")
    if same_rows and x.shape[0] != ref.shape[0]:
        raise ValueError(f"{name} has {x.shape[0]} rows but {ref_name} has {ref.shape[0]}")


def labels(name: str, y, n: int, device: torch.device) -> Tensor:
    if not isinstance(y, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor of integer labels, got {type(y).__name__}")
    if y.dtype.is_floating_point or y.dtype.is_complex or y.dtype == torch.bool:
        raise TypeError(f"{name} must hold integers, got {y.dtype}")
    if y.dim() != 1 or y.shape[0] != n:
        raise ValueError(f"{name} must have shape ({n},), got {tuple(y.shape)}")
    if y.device != device:
        raise ValueError(f"{name} is on {y.device} but the features are on {device}")
    return y.to(torch.int64).contiguous()


def index_targets(name: str, t, n: int, m: int, device: torch.device) -> Tensor:
    t = labels(name, t, n, device)
    if not _tracing() and n > 0 and bool(((t < 0) | (t >= m)).any()):
        raise ValueError(f"{name} must index the {m} keys (0 <= target < {m})")
    return t


def scalar(name: str, value, device: torch.device, dtype: torch.dtype) -> Tensor:
    """A finite scalar of any sign (float, or 0-dim floating tensor, which keeps
    its autograd graph)."""
    if isinstance(value, torch.Tensor):
        if value.numel() != 1:
            raise ValueError(f"{name} must be a scalar, got shape {tuple(value.shape)}")
        if not value.dtype.is_floating_point:
            raise TypeError(f"{name} must be a floating tensor, got {value.dtype}")
        return value.reshape(()).to(device=device, dtype=dtype)
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a number, got {type(value).__name__}")
    if not math.isfinite(value):
        raise ValueError(f"{name} must be finite, got {value}")
    return torch.tensor(float(value), device=device, dtype=dtype)


def positive(name: str, value, device: torch.device, dtype: torch.dtype) -> Tensor:
    """A scalar > 0, as :func:`scalar`."""
    result = scalar(name, value, device, dtype)
    if isinstance(value, torch.Tensor):
        if not _tracing() and not bool(value.detach().reshape(()) > 0):
            raise ValueError(f"{name} must be > 0, got {value.item()}")
    elif not value > 0:
        raise ValueError(f"{name} must be a finite number > 0, got {value}")
    return result


def float_tensor(name: str, x, shape: tuple, device: torch.device) -> Tensor:
    """A floating tensor of exactly ``shape`` on the features' ``device``."""
    if not isinstance(x, torch.Tensor) or not x.dtype.is_floating_point:
        raise TypeError(f"{name} must be a floating torch.Tensor of shape {shape}")
    if tuple(x.shape) != shape:
        raise ValueError(f"{name} must have shape {shape}, got {tuple(x.shape)}")
    if x.device != device:
        raise ValueError(f"{name} is on {x.device} but the features are on {device}")
    return x


def weights(name: str, w: Optional[Tensor], n: int, device: torch.device) -> Optional[Tensor]:
    if w is None:
        return None
    float_tensor(name, w, (n,), device)
    if not _tracing() and not bool((torch.isfinite(w) & (w >= 0)).all()):
        raise ValueError(f"{name} must be finite and >= 0")
    return w.detach()


def reduction(value: str) -> str:
    if value not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {value!r}")
    return value
