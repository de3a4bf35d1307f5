"""Lazy loading of the native extension ``posttrain_kernels._C``.

The extension is optional: if it was not built (``PTK_SKIP_EXTENSION=1``) or fails to load, every
function still works through the Python paths, and a single warning says why.
"""
from __future__ import annotations

import importlib
import warnings
from typing import Optional

import torch

# Must match csrc/common/dtype.h (ptk::DType).
DTYPE_CODES = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}

_state = {"loaded": False, "module": None, "error": None}


def load_extension() -> Optional[object]:
    """Return the ``_C`` module, or ``None`` (after one warning) when it is unavailable."""
    if not _state["loaded"]:
        _state["loaded"] = True
        try:
            _state["module"] = importlib.import_module("posttrain_kernels._C")
        except ImportError as exc:  # not built, or built for another Python
            _state["error"] = exc
            warnings.warn(
                f"posttrain_kernels: native extension _C is not available ({exc}); "
                "using the Python/Triton paths instead",
                RuntimeWarning,
                stacklevel=3,
            )
    return _state["module"]


def extension_error() -> Optional[BaseException]:
    """Why the extension did not load (``None`` if it loaded or was never tried)."""
    load_extension()
    return _state["error"]


def has_cpu_kernels() -> bool:
    ext = load_extension()
    return bool(ext is not None and getattr(ext, "has_cpu", False))


def has_cuda_kernels() -> bool:
    ext = load_extension()
    return bool(ext is not None and getattr(ext, "has_cuda", False))
