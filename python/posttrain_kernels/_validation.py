"""Argument checks shared by the public API. Every message names the argument, what was expected
and what came. Data-dependent checks (label range) run only on CPU tensors, where they cost no
device sync, and never while ``torch.compile`` traces."""
from __future__ import annotations

import math
from typing import Optional

import torch

FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def check_tensor(name: str, t, *, ndim_min: int = 0) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(t).__name__}")
    if t.dim() < ndim_min:
        raise ValueError(f"{name}: expected at least {ndim_min} dimension(s), got shape {tuple(t.shape)}")


def check_float(name: str, t: torch.Tensor, allow_fp64: bool = False) -> None:
    allowed = FLOAT_DTYPES + ((torch.float64,) if allow_fp64 else ())
    if t.dtype not in allowed:
        names = ", ".join(str(d).replace("torch.", "") for d in allowed)
        raise TypeError(f"{name}: expected a floating tensor ({names}), got dtype {t.dtype}")


def check_integer(name: str, t: torch.Tensor) -> None:
    if t.dtype.is_floating_point or t.dtype.is_complex or t.dtype == torch.bool:
        raise TypeError(f"{name}: expected an integer tensor (int64 or int32), got dtype {t.dtype}")


def check_same_device(**tensors: Optional[torch.Tensor]) -> None:
    items = [(k, v) for k, v in tensors.items() if v is not None]
    first_name, first = items[0]
    for name, t in items[1:]:
        if t.device != first.device:
            raise ValueError(
                f"{name}: expected a tensor on {first.device} (the device of {first_name}), got {t.device}")


def _finite(v: float) -> bool:
    # not math.isfinite: under torch.compile(dynamic=True) ``float(value)`` may be a SymFloat,
    # which math.isfinite cannot take (a graph break); a comparison guards on it instead
    return abs(v) < math.inf


def check_positive(name: str, value) -> float:
    try:
        v = float(value)
    except (TypeError, ValueError):
        raise TypeError(f"{name}: expected a positive number, got {value!r}") from None
    if not (v > 0 and _finite(v)):
        raise ValueError(f"{name}: expected a finite number > 0, got {value!r}")
    return v


def check_finite(name: str, value) -> float:
    try:
        v = float(value)
    except (TypeError, ValueError):
        raise TypeError(f"{name}: expected a number, got {value!r}") from None
    if not _finite(v):
        raise ValueError(f"{name}: expected a finite number, got {value!r}")
    return v


def check_range(name: str, value, lo: float, hi: float, hi_inclusive: bool = False) -> float:
    try:
        v = float(value)
    except (TypeError, ValueError):
        raise TypeError(f"{name}: expected a number, got {value!r}") from None
    ok = lo <= v <= hi if hi_inclusive else lo <= v < hi
    if not ok:
        bracket = "]" if hi_inclusive else ")"
        raise ValueError(f"{name}: expected a value in [{lo}, {hi}{bracket}, got {value!r}")
    return v


def check_choice(name: str, value, choices) -> None:
    if value not in choices:
        raise ValueError(f"{name}: expected one of {tuple(choices)}, got {value!r}")


def check_label_range(labels: torch.Tensor, vocab: int, ignore_index: int, name: str = "labels") -> None:
    """ValueError for a label outside [0, vocab) that is not ``ignore_index``.

    Runs only where it is free of a device sync (CPU tensors) and outside ``torch.compile`` tracing.
    """
    if labels.device.type != "cpu" or labels.numel() == 0:
        return
    if torch.compiler.is_compiling():
        return
    bad = ((labels < 0) | (labels >= vocab)) & (labels != ignore_index)
    if bool(bad.any()):
        value = int(labels[bad][0])
        raise ValueError(
            f"{name}: expected values in [0, {vocab}) or ignore_index={ignore_index}, got {value} "
            f"({int(bad.sum())} out-of-range label(s))")
