"""How the ops of ``posttrain_kernels::*`` are registered with ``torch.library``.

Every op takes the name of a concrete backend. Where Triton compiles kernels (Triton installed,
no ``TRITON_INTERPRET``), an op is a ``torch.library.triton_op``: ``torch.compile`` traces into it,
and with ``backend="triton"`` it sees each kernel launch (the launchers call them through
``wrap_triton``), so inductor schedules our kernels in its own graph instead of calling an opaque
op. The other backends (the C++/CUDA kernels of ``_C``, the chunked PyTorch path) stay opaque: the
op forwards them to a companion ``custom_op`` named ``<op>_native`` with the same schema and fake
implementation. ``opaque(op)`` gives that companion to code that must keep the Triton backend
opaque under ``torch.compile`` too (any backend runs through it).

Under ``TRITON_INTERPRET=1`` (the CPU tests), or without Triton, the op is one plain ``custom_op``
with the fake implementation: torch cannot trace interpreted kernels (tracing them reads the data
pointers of fake tensors). Either way the op's name, schema, autograd and results are the same,
and run eagerly an op calls its backend's launchers directly.
"""
from __future__ import annotations

import functools
import importlib.util
import inspect
from typing import Callable, Iterable

import torch

from ..dispatch import triton_interpreting

try:  # whether a triton_op's implementation runs eagerly (off) or is being traced (on)
    from torch._library.triton import is_wrap_triton_enabled, set_wrap_triton_enabled
except ImportError:  # torch < 2.6: no triton_op either
    is_wrap_triton_enabled = set_wrap_triton_enabled = None


def triton_traceable() -> bool:
    """Whether the ops are registered as ``triton_op``s: torch has ``triton_op``, Triton is
    installed and does not interpret (decided once, when the ops are defined)."""
    return (hasattr(torch.library, "triton_op") and is_wrap_triton_enabled is not None
            and importlib.util.find_spec("triton") is not None and not triton_interpreting())


TRITON_TRACEABLE = triton_traceable()


def _list_kernels(op_name: str, family: str) -> None:
    """Tell torch which Triton kernels the op ``op_name`` may launch (every kernel of
    ``posttrain_kernels.kernels.<family>``): AOTAutograd's cache keys a compiled graph on their
    source, so a changed kernel is never served from a stale cache. torch finds them itself only
    in ``wrap_triton(...)`` calls written in the op's own body; ours are in the launchers."""
    from triton.runtime.jit import JITFunction
    from torch._library import triton as library_triton

    table = getattr(library_triton, "triton_ops_to_kernels", None)
    if table is None:  # not in this torch: nothing to key on
        return
    module = importlib.import_module(f"posttrain_kernels.kernels.{family}")
    table[op_name] = [k for key, k in vars(module).items()
                      if key.endswith("_kernel") and isinstance(k, JITFunction)]


def _launching_directly(impl: Callable) -> Callable:
    """``impl`` with ``wrap_triton`` returning the kernel itself, as a ``triton_op`` does for its own
    eager calls: run inside an opaque op (``opaque``), the traceable wrapper would dispatch each
    launch as a higher-order op (about a millisecond each)."""
    @functools.wraps(impl)
    def run(*args, **kwargs):
        with set_wrap_triton_enabled(False):
            return impl(*args, **kwargs)

    run.__signature__ = inspect.signature(impl, eval_str=True)
    return run


def opaque(op):
    """The op to call where ``torch.compile`` must not trace into the Triton kernels: the op's
    opaque ``<op>_native`` companion (any backend, ``"triton"`` included) where the ops are
    ``triton_op``s, else the op itself (already opaque)."""
    if not TRITON_TRACEABLE:
        return op
    return getattr(torch.ops.posttrain_kernels, op._name + "_native")


def kernel_op(name: str, *, mutates_args: Iterable[str], fake: Callable, family: str) -> Callable:
    """Decorator: register ``impl(..., backend, ...)`` as the op ``name`` (see the module doc).

    ``impl`` dispatches on its ``backend`` argument to the launchers; ``fake`` computes the outputs'
    metadata; ``family`` names the module of ``posttrain_kernels.kernels`` whose kernels the Triton
    backend launches. Returns the op (a ``CustomOpDef``: ``register_autograd`` etc. apply to it)."""
    mutates_args = tuple(mutates_args)

    def register(impl: Callable):
        if not TRITON_TRACEABLE:
            op = torch.library.custom_op(name, impl, mutates_args=mutates_args)
            op.register_fake(fake)
            return op
        native = torch.library.custom_op(name + "_native", _launching_directly(impl), mutates_args=mutates_args)
        native.register_fake(fake)
        # annotations resolved in impl's module (they may be strings: ``from __future__``)
        signature = inspect.signature(impl, eval_str=True)
        backend_at = list(signature.parameters).index("backend")

        @functools.wraps(impl)
        def traced(*args, **kwargs):
            # Run eagerly (the triton_op turns wrap_triton off around its own calls), the launchers
            # directly. Traced (fake or functional tensors), the Triton launchers wrap each launch
            # and every other backend stays one opaque op.
            if not is_wrap_triton_enabled():
                return impl(*args, **kwargs)
            backend = args[backend_at] if len(args) > backend_at else kwargs["backend"]
            if backend == "triton":
                return impl(*args, **kwargs)
            return native(*args, **kwargs)

        traced.__signature__ = signature
        op = torch.library.triton_op(name, traced, mutates_args=mutates_args)
        _list_kernels(name, family)
        return op

    return register
