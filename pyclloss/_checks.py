"""Input validation shared by the public entry points.

Every message names the argument and the expected form; bad values raise
ValueError. While torch.compile traces, a value check cannot read a tensor on
the host without breaking the graph, so:

- scalars (temperatures, scales, biases, mixing coefficients, also when given
  as Python floats, which compile may turn symbolic), weights, index targets
  and the other small inputs are checked on the device by ``torch._assert_async``:
  a bad value fails the compiled call with a RuntimeError carrying the same
  message, without a host sync;
- the finiteness of the feature tensors themselves is not checked (it would add
  a pass over every input of every step); a NaN there gives a NaN loss.
"""

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


def finite(name: str, x: Tensor) -> None:
    """ValueError unless every entry of ``x`` is finite (a device-side assertion
    while tracing)."""
    message = f"{name} contains NaN or Inf"
    if _tracing():
        require(torch.isfinite(x), message)
    elif not all_finite(x):
        raise ValueError(message)


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


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


def require(ok: Tensor, message: str, given=None) -> None:
    """ValueError(message) unless every entry of the boolean tensor ``ok`` holds
    (``given()``, called on failure, says what was passed); while torch.compile
    traces, a device-side assertion with the same message. Meta tensors have no
    values to check."""
    if _tracing():
        torch._assert_async(ok.all(), message)
    elif ok.device.type != "meta" and not bool(ok.all()):
        raise ValueError(message if given is None else f"{message}, got {given()}")


def index_targets(name: str, t, n: int, m: int, device: torch.device) -> Tensor:
    t = labels(name, t, n, device)
    # formatting a size that compile keeps symbolic would specialise the graph on it
    keys = "the keys" if _tracing() else f"the {m} keys (0 <= target < {m})"
    require((t >= 0) & (t < m), f"{name} must index {keys}")
    return t


def _scalar_tensor(name: str, value, dtype: torch.dtype, device: torch.device) -> Tensor:
    """``value`` as a 0-dim tensor in ``dtype``: a one-element floating tensor stays
    where it is (and keeps its autograd graph); a number goes to the host in eager
    mode, where checking it costs no device sync, and to ``device`` while tracing."""
    if isinstance(value, torch.Tensor):
        if value.numel() != 1:
            raise ValueError(f"{name} must be a scalar, got shape {tuple(value.shape)}")
        if not value.dtype.is_floating_point:
            raise TypeError(f"{name} must be a floating tensor, got {value.dtype}")
        return value.reshape(()).to(dtype)
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a number, got {type(value).__name__}")
    if _tracing():  # value may be symbolic here
        return torch.tensor(value, dtype=dtype, device=device)
    return torch.tensor(float(value), dtype=dtype)


def _checked_scalar(name: str, value, device: torch.device, dtype: torch.dtype, ok,
                    requirement: str) -> Tensor:
    """The scalar ``value`` in ``dtype`` on ``device``, with ``ok(value in dtype)``
    required: the check sees what the kernels will see (1e-46 is 0 in float32)."""
    result = _scalar_tensor(name, value, dtype, device)

    def given():
        exact = value.item() if isinstance(value, torch.Tensor) else float(value)
        if bool(ok(torch.tensor(exact, dtype=torch.float64))):  # only the rounding fails
            return f"{exact}, which is {result.item()} in {_dtype_name(dtype)}"
        return exact

    require(ok(result.detach()), f"{name} must be {requirement}", given)
    return result.to(device)


def scalar(name: str, value, device: torch.device, dtype: torch.dtype) -> Tensor:
    """A finite scalar of any sign: a number, or a one-element floating tensor
    (which keeps its autograd graph)."""
    return _checked_scalar(name, value, device, dtype, torch.isfinite, "finite")


def positive(name: str, value, device: torch.device, dtype: torch.dtype) -> Tensor:
    """A finite scalar > 0, as :func:`scalar`."""
    return _checked_scalar(name, value, device, dtype, lambda v: torch.isfinite(v) & (v > 0),
                           "> 0 and finite")


def temperature(name: str, value, device: torch.device, dtype: torch.dtype) -> Tensor:
    """A temperature τ, as :func:`positive`, whose 1/τ (the kernels' scale) is finite too."""
    return _checked_scalar(name, value, device, dtype,
                           lambda v: torch.isfinite(v) & (v > 0) & torch.isfinite(1 / v),
                           "a finite number > 0 with a finite reciprocal")


def float_tensor(name: str, x, shape: tuple, device: torch.device) -> Tensor:
    """A floating tensor of exactly ``shape`` on the features' ``device``."""
    if not isinstance(x, torch.Tensor) or not x.dtype.is_floating_point:
        raise TypeError(f"{name} must be a floating torch.Tensor of shape {shape}")
    if tuple(x.shape) != shape:
        raise ValueError(f"{name} must have shape {shape}, got {tuple(x.shape)}")
    if x.device != device:
        raise ValueError(f"{name} is on {x.device} but the features are on {device}")
    return x


def weights(name: str, w: Optional[Tensor], n: int, device: torch.device,
            dtype: torch.dtype) -> Optional[Tensor]:
    """Per-anchor weights (n,) >= 0, detached; ``dtype`` is that of the loss
    terms they weigh, in which they and their sum (the mean's divisor) must
    be finite."""
    if w is None:
        return None
    float_tensor(name, w, (n,), device)
    w = w.detach()
    cast = w.to(dtype)
    require((torch.isfinite(cast) & (cast >= 0)).all() & torch.isfinite(cast.sum()),
            f"{name} must be finite and >= 0, with a finite sum in {_dtype_name(dtype)}")
    return w


def reduction(value: str) -> str:
    if value not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {value!r}")
    return value


def fixed_positive(name: str, value) -> float:
    """A hyper-parameter > 0 that gets no gradient, as a float (the ops take one)."""
    if isinstance(value, torch.Tensor) and value.requires_grad:
        raise ValueError(f"{name} must be a fixed number here (no gradient), got a tensor that "
                         f"requires grad")
    device = value.device if isinstance(value, torch.Tensor) else torch.device("cpu")
    positive(name, value, device, torch.float64)
    return float(value)


def fixed_real(name: str, value, nonnegative: bool = False) -> float:
    """A finite hyper-parameter (>= 0 if ``nonnegative``) that gets no gradient,
    as a float (the ops take one); checked on the device while compiling."""
    if isinstance(value, torch.Tensor) and value.requires_grad:
        raise ValueError(f"{name} must be a fixed number (no gradient), got a tensor that "
                         f"requires grad")
    ok = (lambda v: torch.isfinite(v) & (v >= 0)) if nonnegative else torch.isfinite
    _checked_scalar(name, value, torch.device("cpu"), torch.float64, ok,
                    ">= 0 and finite" if nonnegative else "finite")
    return float(value)


def real_labels(name: str, y, n: int, device: torch.device, dtype: torch.dtype,
                multi_dim: bool = False) -> Tensor:
    """Real-valued labels (n,) (or (n, L) with ``multi_dim``) in ``dtype``."""
    if not isinstance(y, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(y).__name__}")
    if y.dtype.is_complex or y.dtype == torch.bool:
        raise TypeError(f"{name} must hold real numbers, got {y.dtype}")
    if y.shape[:1] != (n,) or y.dim() not in ((1, 2) if multi_dim else (1,)):
        shapes = f"({n},) or ({n}, L)" if multi_dim else f"({n},)"
        raise ValueError(f"{name} must have shape {shapes}, got {tuple(y.shape)}")
    if y.device != device:
        raise ValueError(f"{name} is on {y.device} but the features are on {device}")
    y = y.detach().to(dtype)
    finite(name, y)
    return y.contiguous()
