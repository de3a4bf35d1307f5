"""Fused-linear distillation: the divergence between a student's and a teacher's token
distributions from their hidden states and heads, no logits of either model in memory."""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from .. import _validation as V
from ..backends.torch_distill import DIVERGENCE_CODES
from ..dispatch import resolve_backend
from ..ops.linear_distill import LinearDistillLoss
from ..reference import cross_entropy_reference, distill_loss_reference, reference_logits
from .distill import DIVERGENCES, _check_beta
from .linear_token_logprobs import CHUNK_BYTES_ENV, _autocast_inputs, _prepare, chunk_budget

LINEAR_DISTILL_REDUCTIONS = ("batchmean", "sum", "mean")


def linear_distill_loss(
    student_hidden: Tensor,
    student_weight: Tensor,
    teacher_hidden: Tensor,
    teacher_weight: Tensor,
    *,
    labels: Optional[Tensor] = None,
    student_bias: Optional[Tensor] = None,
    teacher_bias: Optional[Tensor] = None,
    hard_label_weight: float = 0.0,
    divergence: str = "forward_kl",
    beta: float = 0.5,
    temperature: float = 1.0,
    ignore_index: int = -100,
    reduction: str = "batchmean",
    chunk_size: Optional[int] = None,
    backend: str = "auto",
) -> Tensor:
    """:func:`distill_loss` of ``student_hidden @ student_weight.T`` against ``teacher_hidden @
    teacher_weight.T``, optionally mixed with the hard-label cross-entropy of the student, with
    both heads chunked over tokens.

    Args:
        student_hidden: ``(..., Hs)``; student_weight ``(Vs, Hs)``; student_bias ``(Vs,)``.
        teacher_hidden: ``(..., Ht)`` with the same leading shape (``Ht`` may differ from ``Hs``);
            teacher_weight ``(Vt, Ht)``; teacher_bias. Never differentiated.
        labels: ``(...)`` integer or None: tokens labelled ``ignore_index`` are left out of both
            terms; required when ``hard_label_weight > 0``.
        hard_label_weight: ``w`` in ``[0, 1]``: ``loss = (1 - w) * divergence + w * CE``, the
            cross-entropy of the student's logits (no temperature) averaged over the labelled
            tokens (Liger's ``weight_hard_loss`` / ``weight_soft_loss`` with ``weight_soft = 1 - w``).
        divergence, beta, temperature, reduction: as :func:`distill_loss` (the scalar reductions;
            the common vocabulary prefix ``min(Vs, Vt)`` is compared).
        chunk_size: token rows per chunk; by default ``POSTTRAIN_KERNELS_CHUNK_BYTES`` (64 MiB on
            the CPU, 512 MiB on a GPU) bounds each of the chunk's ``rows x max(Vs, Vt)`` fp32
            buffers, as for the other fused-linear losses: student logits (which then hold the divergence's gradient) and
            teacher logits, plus a third for the gradient with the hard-label term.

    Returns:
        fp32 scalar, differentiable in ``student_hidden``, ``student_weight``, ``student_bias``.
        Gradients are computed during the forward (four GEMMs in all: the student's three and the
        teacher's one); the weight gradient accumulates in fp32.
    """
    _prepare(student_hidden, student_weight, student_bias,
             labels if labels is not None else torch.zeros(student_hidden.shape[:-1], dtype=torch.long,
                                                           device=student_hidden.device),
             chunk_size, single_only=True, allow_fp64=(backend == "reference"))
    V.check_tensor("teacher_hidden", teacher_hidden, ndim_min=1)
    V.check_tensor("teacher_weight", teacher_weight, ndim_min=2)
    if tuple(teacher_hidden.shape[:-1]) != tuple(student_hidden.shape[:-1]):
        raise ValueError(f"teacher_hidden: expected the leading shape {tuple(student_hidden.shape[:-1])} of "
                         f"student_hidden (one teacher row per student row), got {tuple(teacher_hidden.shape)}")
    if teacher_weight.dim() != 2 or teacher_weight.shape[1] != teacher_hidden.shape[-1]:
        raise ValueError(f"teacher_weight: expected shape (Vt, {teacher_hidden.shape[-1]}) for teacher_hidden of "
                         f"shape {tuple(teacher_hidden.shape)}, got {tuple(teacher_weight.shape)}")
    if teacher_hidden.dtype != student_hidden.dtype or teacher_weight.dtype != student_hidden.dtype:
        if not torch.is_autocast_enabled(student_hidden.device.type):
            raise TypeError(f"teacher_hidden, teacher_weight: expected the dtype of student_hidden "
                            f"({student_hidden.dtype}), got {teacher_hidden.dtype} and {teacher_weight.dtype}")
    V.check_same_device(student_hidden=student_hidden, teacher_hidden=teacher_hidden,
                        teacher_weight=teacher_weight, labels=labels)
    V.check_choice("divergence", divergence, DIVERGENCES)
    V.check_choice("reduction", reduction, LINEAR_DISTILL_REDUCTIONS)
    beta = _check_beta(divergence, beta)
    temperature = V.check_positive("temperature", temperature)
    w = V.check_range("hard_label_weight", hard_label_weight, 0.0, 1.0, hi_inclusive=True)
    if w > 0 and labels is None:
        raise ValueError(f"labels: hard_label_weight={w} needs the labels of the hard-label cross-entropy, got None")
    name = resolve_backend(backend, student_hidden.device)
    vs, vt = student_weight.shape[0], teacher_weight.shape[0]
    if labels is not None:
        V.check_label_range(labels, vs, ignore_index)
    lead0 = student_hidden.shape[0] if student_hidden.dim() > 1 else 1
    if name == "reference":
        zs = reference_logits(student_hidden, student_weight, student_bias)
        zt = reference_logits(teacher_hidden, teacher_weight, teacher_bias).detach()
        soft = distill_loss_reference(zs, zt, labels, divergence, beta, temperature, ignore_index, reduction)
        if w == 0:
            return soft.float()
        hard = cross_entropy_reference(zs, labels, ignore_index)
        return ((1 - w) * soft + w * hard).float()
    student_hidden, student_weight, student_bias = _autocast_inputs(student_hidden, student_weight, student_bias)
    dt = student_weight.dtype
    teacher_hidden, teacher_weight = teacher_hidden.detach().to(dt), teacher_weight.detach().to(dt)
    teacher_bias = None if teacher_bias is None else teacher_bias.detach().to(dt)
    hs = student_hidden.reshape(-1, student_hidden.shape[-1])
    ht = teacher_hidden.reshape(-1, teacher_hidden.shape[-1])
    n = hs.shape[0]
    lab = None if labels is None else labels.reshape(-1).to(torch.int64).contiguous()
    v = min(vs, vt)
    dev = hs.device
    kept = (lab != ignore_index).sum().clamp_min(1).to(torch.float32) if lab is not None else None
    if reduction == "sum":
        soft_scale = torch.ones((), device=dev)
    elif reduction == "mean":
        soft_scale = 1.0 / ((kept if kept is not None else torch.tensor(float(n), device=dev)) * v)
    else:  # batchmean
        soft_scale = 1.0 / (kept if kept is not None else torch.tensor(float(max(lead0, 1)), device=dev))
    soft_scale = (soft_scale * (1 - w)).to(torch.float32).reshape(())
    hard_scale = (w / kept if kept is not None else torch.zeros((), device=dev)).to(torch.float32).reshape(())
    # The budget bounds each fp32 chunk buffer (student and teacher logits, and a gradient buffer
    # unless the divergence's gradient is written over the student's logits: no hard-label term,
    # Vs <= Vt), as it bounds the one logits buffer of linear_cross_entropy: splitting it between
    # the buffers would halve the rows of every GEMM, which costs more time than the memory saves
    # (the GEMMs lose efficiency below ~512 rows).
    chunk = chunk_size or max(1, chunk_budget(student_weight.device) // (4 * max(vs, vt)))
    with torch.autocast(dev.type, enabled=False):
        return LinearDistillLoss.apply(hs, student_weight, student_bias, ht, teacher_weight, teacher_bias, lab,
                                       soft_scale, hard_scale, bool(w > 0), DIVERGENCE_CODES[divergence], beta,
                                       1.0 / temperature, int(ignore_index), chunk, torch.is_grad_enabled(), name)


__all__ = ["linear_distill_loss", "CHUNK_BYTES_ENV"]
