"""Backend selection: ``backend="auto" | "triton" | "cuda" | "cpu" | "torch" | "reference"``.

``auto`` (the default, overridable with the environment variable ``POSTTRAIN_KERNELS_BACKEND``):
CUDA tensors go to Triton (or to the CUDA kernels of ``_C`` when Triton is missing), CPU tensors
to the fused C++ kernels of ``_C`` when built, else to the chunked PyTorch path (``"torch"``).
``"triton"`` on CPU tensors needs ``TRITON_INTERPRET=1`` (that is how the kernels are tested
without a GPU). ``"reference"`` is the eager, materialized implementation (the test oracle).
"""
from __future__ import annotations

import importlib
import os
from types import ModuleType
from typing import Any

import torch

from ._extension import has_cpu_kernels, has_cuda_kernels

BACKENDS = ("auto", "triton", "cuda", "cpu", "torch", "reference")
ENV_VAR = "POSTTRAIN_KERNELS_BACKEND"


# (a constant to torch.compile: dynamo does not trace importlib.import_module, a graph break)
@torch.compiler.assume_constant_result
def triton_available() -> bool:
    try:
        importlib.import_module("triton")
    except ImportError:
        return False
    return True


def triton_interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def validate_backend(backend: str) -> str:
    if not isinstance(backend, str) or backend not in BACKENDS:
        raise ValueError(f"backend: expected one of {BACKENDS}, got {backend!r}")
    return backend


def resolve_backend(backend: str, device: torch.device) -> str:
    """The concrete backend name that ``backend`` means for tensors on ``device``."""
    validate_backend(backend)
    if backend == "auto":
        env = os.environ.get(ENV_VAR, "auto")
        if env not in BACKENDS:
            raise ValueError(f"environment variable {ENV_VAR}: expected one of {BACKENDS}, got {env!r}")
        backend = env
    if backend == "auto":
        if device.type == "cuda":
            if triton_available():
                return "triton"
            return "cuda" if has_cuda_kernels() else "torch"
        return "cpu" if has_cpu_kernels() and device.type == "cpu" else "torch"
    if backend == "triton":
        if not triton_available():
            raise RuntimeError("backend='triton': triton is not installed (pip install triton)")
        if device.type != "cuda" and not triton_interpreting():
            raise ValueError(
                f"backend='triton': tensors on {device} need a CUDA device, or TRITON_INTERPRET=1 "
                "set before triton is imported (the interpreter, for tests)")
    elif backend == "cuda" and device.type != "cuda":
        raise ValueError(f"backend='cuda': expected CUDA tensors, got tensors on {device}")
    elif backend == "cpu" and device.type != "cpu":
        raise ValueError(f"backend='cpu': expected CPU tensors, got tensors on {device}")
    return backend


def launchers(name: str) -> Any:
    """The object whose attributes are the four launchers of a concrete backend ``name``."""
    if name == "triton":
        return importlib.import_module("posttrain_kernels.kernels.token_logprobs")
    if name == "cpu":
        from .backends import native
        return native.cpu
    if name == "cuda":
        from .backends import native
        return native.cuda
    if name == "torch":
        from .backends import torch_chunked
        return torch_chunked
    raise ValueError(f"backend {name!r} has no fused launchers")


def distill_launchers(name: str) -> Any:
    """The launchers ``distill_forward`` / ``distill_backward`` of a concrete backend ``name`` (the
    contract is in ``backends/torch_distill.py``): ``cpu`` and ``cuda`` run the native kernels of
    ``_C`` (``distill_{forward,backward}_{cpu,cuda}``) when the extension has them, else the
    PyTorch launchers (an extension built before the kernels existed, or without CUDA)."""
    if name == "triton":
        return importlib.import_module("posttrain_kernels.kernels.distill")
    if name in ("cpu", "cuda"):
        from .backends import native
        if _has_native(f"distill_forward_{name}") and _has_native(f"distill_backward_{name}"):
            return getattr(native, name)
    if name in ("cpu", "cuda", "torch"):
        from .backends import torch_distill
        return torch_distill
    raise ValueError(f"backend {name!r} has no fused launchers")


def _has_native(fn: str) -> bool:
    from ._extension import load_extension
    ext = load_extension()
    return ext is not None and hasattr(ext, fn)


def live_backends() -> dict:
    """Which backends can run here, for ``python -m posttrain_kernels info``."""
    cuda_dev = torch.cuda.is_available()
    return {
        "reference": True,
        "torch": True,
        "cpu": has_cpu_kernels(),
        "cuda": has_cuda_kernels() and cuda_dev,
        "triton": triton_available() and (cuda_dev or triton_interpreting()),
    }
