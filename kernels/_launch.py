"""What every launcher of ``posttrain_kernels.kernels`` launches through.

``wrap_triton``: inside a ``torch.library.triton_op`` (``posttrain_kernels.ops.registration``)
``torch.compile`` records the launch and inductor schedules the kernel itself; outside tracing, and
for interpreted kernels, the kernel itself. ``unused_pointer``: the argument for a pointer the
kernel does not read or write at these flags."""
try:
    from torch.library import wrap_triton
except ImportError:  # torch < 2.6 has no triton_op: the ops are plain custom ops, launch directly
    def wrap_triton(kernel):
        return kernel

import torch


def unused_pointer(device) -> torch.Tensor:
    """A pointer argument that the launch's kernel never dereferences (its flag is off): a buffer of
    its own, never one of the launch's outputs. Passing an output twice (as itself and as a
    placeholder) makes one buffer two kernel arguments, which ``torch.compile`` then reasons about
    (mutation, cloning, buffer reuse) as two; fp32, so the kernel's specialization is unchanged."""
    return torch.empty((1,), dtype=torch.float32, device=device)


__all__ = ["wrap_triton", "unused_pointer"]
