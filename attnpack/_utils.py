"""Small shared helpers: dtype parsing, versions, optional-dependency checks."""

from __future__ import annotations

import importlib
import importlib.metadata
import importlib.util
import math
import numbers
from typing import Any

import torch


__all__ = ["parse_dtype", "package_versions", "require", "is_available", "check_number", "DTYPE_NAMES"]

DTYPE_NAMES: dict[str, torch.dtype] = {
    "fp32": torch.float32,
    "float32": torch.float32,
    "fp16": torch.float16,
    "float16": torch.float16,
    "half": torch.float16,
    "bf16": torch.bfloat16,
    "bfloat16": torch.bfloat16,
}


def parse_dtype(dtype: str | torch.dtype | None, device: str | torch.device | None = None) -> torch.dtype:
    """``"auto"`` / ``None`` -> bf16 on CUDA with bf16 support, fp16 on other CUDA, fp32 on CPU; names as in
    :data:`DTYPE_NAMES`; a ``torch.dtype`` passes through."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype is None or dtype == "auto":
        dev = torch.device(device) if device is not None else None
        if dev is not None and dev.type == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.float32
    if not isinstance(dtype, str) or dtype.lower() not in DTYPE_NAMES:
        raise ValueError(f"`dtype` must be one of auto, {', '.join(DTYPE_NAMES)}, got {dtype!r}.")
    return DTYPE_NAMES[dtype.lower()]


def _bound(value: float) -> str:
    if isinstance(value, int):
        return str(value)  # exactly, however large (a float would round 2**64 - 1)
    return str(int(value)) if float(value).is_integer() else f"{value:g}"


def check_number(
    name: str,
    value: Any,
    low: float | None = None,
    high: float | None = None,
    *,
    integer: bool = False,
    note: str = "",
) -> Any:
    """``value`` as a finite number (an ``int`` with ``integer=True``) in ``low..high`` (either may be ``None``), else a
    ``TypeError`` / ``ValueError`` naming ``name``, the rule (``note`` added after the range) and the value. Every
    number a user gives attnpack (Python API, command line, batch rows, config files, the UI) goes through this: NaN
    and infinities never reach a pipeline (they would give black images with exit 0), nor do values that overflow
    downstream."""
    if low is not None and high is not None:
        bounds = f" in {_bound(low)}..{_bound(high)}"
    elif low is not None or high is not None:
        bounds = f" >= {_bound(low)}" if low is not None else f" <= {_bound(high)}"
    else:
        bounds = ""
    kind = "an integer" if integer else "a number"
    if not isinstance(value, numbers.Integral if integer else numbers.Real) or isinstance(value, bool):
        raise TypeError(f"`{name}` must be {kind}{bounds}{note}, got {name}={value!r}.")
    given, value = value, int(value) if integer else float(value)
    if not integer and not math.isfinite(value):  # ints are finite (and may be too large for a float)
        raise ValueError(f"`{name}` must be a finite number{bounds}{note}, got {name}={given!r}.")
    if (low is not None and value < low) or (high is not None and value > high):
        raise ValueError(f"`{name}` must be {kind}{bounds}{note}, got {name}={given!r}.")
    return value


def is_available(module: str) -> bool:
    return importlib.util.find_spec(module) is not None


def require(module: str, extra: str, feature: str) -> object:
    """Import ``module`` or raise an ``ImportError`` naming the pip extra that provides it."""
    try:
        return importlib.import_module(module)
    except ImportError:
        raise ImportError(
            f"{feature} requires `{module}`. Please install it with `pip install attnpack[{extra}]`."
        ) from None


# The packages whose versions decide what attnpack computes: shown by `attnpack info`, printed at the top of every
# test run (tests/conftest.py), embedded in every output's parameters. Resolved to their newest releases on a fresh
# machine, so a changed version here is the first thing to look at when a result changes.
TRACKED_PACKAGES = (
    "torch",
    "diffusers",
    "transformers",
    "accelerate",
    "safetensors",
    "huggingface_hub",
    "gradio",
    "numpy",
    "triton",
    "xformers",
)


def package_versions() -> dict[str, str]:
    """Versions of attnpack and of :data:`TRACKED_PACKAGES` (``"-"`` when not installed)."""
    from ._version import __version__

    out = {"attnpack": __version__}
    for name in TRACKED_PACKAGES:
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            out[name] = "-"
    return out
