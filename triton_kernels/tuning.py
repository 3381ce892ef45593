"""Tile configurations of the Triton kernels: measured data first, autotuning second.

``tuned.json`` beside this file holds, per GPU model, the configuration found
fastest for each kernel × operand precision × feature size (written by
``bench/tune_gpu.py`` on that card and committed), and which backend ``auto``
should pick per op family × precision × feature size. A kernel launch asks
``choose`` for its configuration:

1. an entry of ``tuned.json`` for this card, kernel and precision at the
   feature-size bucket of D (the power of two ≥ D; the nearest bucket measured
   when D's own is missing);
2. else, once per process and key, the fastest of the kernel's candidates,
   timed on the call's own inputs (``PYCLLOSS_TRITON_AUTOTUNE=0``, or the
   interpreter, takes the first candidate instead: one compile per kernel).

Every choice made in this process is kept in ``CHOSEN`` (with its time when it
was measured), which is what the tuning script saves.
"""

import functools
import json
import os
import re
from typing import Callable, Dict, List, Optional, Sequence

import torch

_TUNED_FILE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "tuned.json")

Config = Dict[str, int]

# (kernel, precision, bucket) -> {"config": Config, "ms": float or None, "source": str}
CHOSEN: Dict[tuple, dict] = {}


def dot_precision(dtype: torch.dtype) -> str:
    """tl.dot's input precision for operands of ``dtype``: fp32 runs TF32 when
    torch allows TF32 matmuls, else three TF32 products (fp32 accuracy)."""
    if dtype != torch.float32:
        return "tf32"  # ignored for 16-bit operands
    return "tf32" if _tf32_allowed() else "tf32x3"


def _tf32_allowed() -> bool:
    matmul = torch.backends.cuda.matmul
    precision = getattr(matmul, "fp32_precision", "none")  # torch >= 2.9 reports both APIs here
    if precision != "none":
        return precision == "tf32"
    return bool(matmul.allow_tf32)


def precision_key(dtype: torch.dtype) -> str:
    """How tuned.json names a precision: the dtype, and for fp32 its dot precision
    ('bfloat16', 'float32-tf32', 'float32-tf32x3', ...)."""
    name = str(dtype).replace("torch.", "")
    return f"{name}-{dot_precision(dtype)}" if dtype == torch.float32 else name


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def card_key(device: Optional[torch.device] = None) -> str:
    """'nvidia-h200' for 'NVIDIA H200': the GPU model as a file key."""
    if interpreting() or not torch.cuda.is_available():
        return "interpreter"
    name = torch.cuda.get_device_name(device)
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")


def bucket(d: int) -> int:
    """The feature-size bucket of D: the smallest power of two ≥ D (at least 16)."""
    return max(16, 1 << max(0, int(d) - 1).bit_length())


@functools.lru_cache(maxsize=None)
def _tuned() -> dict:
    if os.environ.get("PYCLLOSS_TUNED", "1") == "0" or not os.path.exists(_TUNED_FILE):
        return {}
    with open(_TUNED_FILE) as f:
        return json.load(f)


def _nearest(table: dict, d: int):
    """The entry of a {bucket: value} table at D's bucket, else the nearest one."""
    if not table:
        return None
    target = bucket(d)
    key = min(table, key=lambda b: (abs(int(b).bit_length() - target.bit_length()), -int(b)))
    return table[key]


def tuned_config(kernel: str, precision: str, d: int, card: Optional[str] = None):
    """The recorded configuration of a kernel on this card, or None."""
    entry = _tuned().get(card or card_key(), {}).get("configs", {}).get(kernel, {})
    return _nearest(entry.get(precision, {}), d)


def preferred_backend(family: str, dtype: torch.dtype, size: int,
                      card: Optional[str] = None) -> Optional[str]:
    """The GPU backend measured fastest on this card for an op family at this
    precision and size (D, or n for sorting), or None where nothing was measured."""
    entry = _tuned().get(card or card_key(), {}).get("auto", {}).get(family, {})
    return _nearest(entry.get(precision_key(dtype), {}), size)


def _autotune_enabled() -> bool:
    return os.environ.get("PYCLLOSS_TRITON_AUTOTUNE", "1") != "0" and not interpreting()


def choose(kernel: str, precision: str, d: int, candidates: Sequence[Config],
           launch: Callable[[Config], None]) -> Config:
    """The configuration for one launch (see the module docstring).

    ``launch(config)`` runs the kernel once with a configuration; it must be
    idempotent (it is timed several times when autotuning)."""
    key = (kernel, precision, bucket(d))
    if key in CHOSEN:
        return CHOSEN[key]["config"]
    config = tuned_config(kernel, precision, d)
    if config is not None:
        CHOSEN[key] = {"config": dict(config), "ms": None, "source": "tuned.json"}
    elif not _autotune_enabled() or len(candidates) == 1:
        CHOSEN[key] = {"config": dict(candidates[0]), "ms": None, "source": "first candidate"}
    else:
        CHOSEN[key] = _fastest(candidates, launch)
    return CHOSEN[key]["config"]


def _fastest(candidates: Sequence[Config], launch) -> dict:
    import triton.testing  # only when autotuning (the import costs time)

    timings: List[tuple] = []
    errors = []
    for config in candidates:
        try:
            ms = triton.testing.do_bench(lambda: launch(config), warmup=5, rep=20,
                                         return_mode="median")
        except Exception as exc:  # e.g. out of shared memory here: not a candidate
            errors.append(exc)
            continue
        timings.append((ms, config))
    if not timings:
        raise errors[0]
    ms, config = min(timings, key=lambda t: t[0])
    return {"config": dict(config), "ms": ms, "source": "autotuned",
            "all": [(dict(c), t) for t, c in timings]}
