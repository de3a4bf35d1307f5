"""Temporarily replacing the forward of one module, so that code runs inside its ``__call__``
(where FSDP / DeepSpeed ZeRO-3 forward pre-hooks have gathered its parameters and their
backward hooks see its outputs)."""
from __future__ import annotations

import contextlib
from typing import Callable, Iterator

from torch import nn

from .head import UnsupportedModelError


def forward_attr(module: nn.Module) -> str:
    """The attribute ``nn.Module.__call__`` ends up calling: ``_old_forward`` under an accelerate
    hook (``module.forward`` is then accelerate's wrapper, which calls ``module._old_forward``
    after moving weights and inputs), else ``forward``."""
    if "_old_forward" in module.__dict__ and hasattr(module, "_hf_hook"):
        return "_old_forward"
    return "forward"


def original_forward(module: nn.Module):
    """The function the module's forward runs (unbound), or None when something other than the
    class's forward was set on the instance (another integration patched it)."""
    attr = forward_attr(module)
    bound = module.__dict__.get(attr)
    if bound is None:
        return type(module).forward
    if getattr(bound, "__self__", None) is module:
        return bound.__func__
    return None


@contextlib.contextmanager
def patched_forward(module: nn.Module, fn: Callable) -> Iterator[None]:
    """``module(*args, **kwargs)`` runs ``fn(*args, **kwargs)`` inside the block (hooks still
    apply); the previous forward is restored on exit, also on exceptions."""
    attr = forward_attr(module)
    if attr == "forward" and "forward" in module.__dict__:
        raise UnsupportedModelError(
            f"{type(module).__name__}: its forward is already replaced on the instance (by another "
            "integration, or by a call of posttrain_kernels.models already in progress on this model)")
    had = attr in module.__dict__
    old = module.__dict__.get(attr)
    setattr(module, attr, fn)
    try:
        yield
    finally:
        if had:
            setattr(module, attr, old)
        else:
            delattr(module, attr)


def call_inside(module: nn.Module, fn: Callable, *args):
    """``fn(*args)`` run as the forward of ``module`` (its hooks gather its parameters around it)."""
    with patched_forward(module, fn):
        return module(*args)
