"""Custom ops + autograd of the distillation family (``posttrain_kernels::distill_*``).

2-D operands: student and teacher logits ``(N, V)`` with unit stride along V; the teacher is never
differentiated. The forward keeps O(N) state (both lse's and the row constant of the gradient);
the backward recomputes the probabilities and writes the student's gradient once.
"""
from typing import Optional, Tuple

import torch
from torch import Tensor

from ..dispatch import distill_launchers
from .registration import kernel_op

_F32 = torch.float32


def _distill_forward_fake(student, teacher, labels, ignore_index, divergence, beta, inv_temperature, backend):
    n = student.shape[0]
    return student.new_empty((n,), dtype=_F32), student.new_empty((n, 3), dtype=_F32)


@kernel_op("posttrain_kernels::distill_forward", mutates_args=(), fake=_distill_forward_fake,
           family="distill")
def distill_forward(student: Tensor, teacher: Tensor, labels: Optional[Tensor], ignore_index: int,
                    divergence: int, beta: float, inv_temperature: float, backend: str) -> Tuple[Tensor, Tensor]:
    """student, teacher (N, V) -> per-row divergence (N,) fp32, stats (N, 3) fp32."""
    return distill_launchers(backend).distill_forward(student, teacher, labels, ignore_index, divergence, beta,
                                                      inv_temperature)


def _distill_backward_fake(student, teacher, labels, ignore_index, divergence, beta, inv_temperature, stats,
                           grad_loss, backend):
    return torch.empty_like(student, memory_format=torch.contiguous_format)


@kernel_op("posttrain_kernels::distill_backward", mutates_args=(), fake=_distill_backward_fake,
           family="distill")
def distill_backward(student: Tensor, teacher: Tensor, labels: Optional[Tensor], ignore_index: int,
                     divergence: int, beta: float, inv_temperature: float, stats: Tensor, grad_loss: Tensor,
                     backend: str) -> Tensor:
    """The student's gradient (N, V) in its dtype, written once."""
    return distill_launchers(backend).distill_backward(student, teacher, labels, ignore_index, divergence, beta,
                                                       inv_temperature, stats, grad_loss)


def _setup(ctx, inputs, output):
    student, teacher, labels, ignore_index, divergence, beta, inv_temperature, backend = inputs
    ctx.save_for_backward(student, teacher, labels, output[1])
    ctx.args = (ignore_index, divergence, beta, inv_temperature, backend)
    ctx.mark_non_differentiable(output[1])


def _backward(ctx, grad_loss, _grad_stats):
    student, teacher, labels, stats = ctx.saved_tensors
    ignore_index, divergence, beta, inv_temperature, backend = ctx.args
    grad = distill_backward(student, teacher, labels, ignore_index, divergence, beta, inv_temperature, stats,
                            grad_loss.to(_F32).contiguous(), backend)
    return grad, None, None, None, None, None, None, None


distill_forward.register_autograd(_backward, setup_context=_setup)


def _distill_backward_inplace_fake(student, teacher, labels, ignore_index, divergence, beta,
                                   inv_temperature, stats, grad_loss, backend):
    return None


@kernel_op("posttrain_kernels::distill_backward_", mutates_args=("student",),
           fake=_distill_backward_inplace_fake,
           family="distill")
def distill_backward_(student: Tensor, teacher: Tensor, labels: Optional[Tensor], ignore_index: int,
                      divergence: int, beta: float, inv_temperature: float, stats: Tensor, grad_loss: Tensor,
                      backend: str) -> None:
    """``distill_backward`` written over ``student`` (contiguous; the fused-linear loss's own chunk
    buffer, never a caller's tensor): each tile of a row is read before its gradient is stored."""
    distill_launchers(backend).distill_backward(student, teacher, labels, ignore_index, divergence, beta,
                                                inv_temperature, stats, grad_loss, out=student)


def _distill_fused_inplace_fake(student, teacher, labels, ignore_index, divergence, beta, inv_temperature,
                                grad_loss, backend):
    n = student.shape[0]
    return student.new_empty((n,), dtype=_F32), student.new_empty((n, 3), dtype=_F32)


@kernel_op("posttrain_kernels::distill_fused_", mutates_args=("student", "teacher"),
           fake=_distill_fused_inplace_fake,
           family="distill")
def distill_fused_(student: Tensor, teacher: Tensor, labels: Optional[Tensor], ignore_index: int,
                   divergence: int, beta: float, inv_temperature: float, grad_loss: Tensor,
                   backend: str) -> Tuple[Tensor, Tensor]:
    """Forward and backward at once, for callers that know each row's loss weight ``grad_loss``
    before the forward (the fused-linear loss): returns ``(loss, stats)`` as ``distill_forward``
    and writes the gradient of ``sum_r grad_loss[r] * loss[r]`` over ``student``; ``teacher`` is
    scratch afterwards. Both must be the caller's own contiguous buffers. The C++ kernel stages
    the gradient's factors in the rows between its passes (no second exp/log per element); other
    backends run ``distill_forward`` then the in-place backward."""
    launchers = distill_launchers(backend)
    fused = getattr(launchers, "distill_fused_", None)
    if fused is not None:
        try:
            return fused(student, teacher, labels, ignore_index, divergence, beta, inv_temperature, grad_loss)
        except NotImplementedError:
            pass
    loss, stats = launchers.distill_forward(student, teacher, labels, ignore_index, divergence, beta,
                                            inv_temperature)
    launchers.distill_backward(student, teacher, labels, ignore_index, divergence, beta, inv_temperature, stats,
                               grad_loss.to(_F32).contiguous(), out=student)
    return loss, stats