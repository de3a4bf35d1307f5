"""Distillation losses between student and teacher logits (the KL / JSD family), with no
``tokens x vocab`` probability tensors in memory."""
from __future__ import annotations

from typing import Optional, Union

import torch
from torch import Tensor

from .. import _validation as V
from ..backends.torch_distill import DIVERGENCE_CODES
from ..dispatch import resolve_backend
from ..ops import distill as ops
from ..reference.distill import distill_loss_reference
from .token_logprobs import _check_fused_dtype, _rows

DIVERGENCES = tuple(DIVERGENCE_CODES)
"""The ``divergence`` values of :func:`distill_loss`."""
DISTILL_REDUCTIONS = ("batchmean", "sum", "mean", "none")


def _check_beta(divergence: str, beta: float) -> float:
    beta = V.check_finite("beta", beta)
    if divergence == "jsd" and not 0.0 <= beta <= 1.0:
        raise ValueError(f"beta: expected a value in [0, 1] for divergence 'jsd', got {beta}")
    if divergence in ("skew_kl", "skew_reverse_kl") and not 0.0 < beta <= 1.0:
        raise ValueError(f"beta: expected the skew factor in (0, 1] for divergence {divergence!r}, got {beta}")
    return beta


def distill_loss(
    student_logits: Tensor,
    teacher_logits: Tensor,
    *,
    divergence: str = "forward_kl",
    beta: float = 0.5,
    temperature: float = 1.0,
    labels: Optional[Tensor] = None,
    ignore_index: int = -100,
    reduction: str = "batchmean",
    num_items_in_batch: Optional[Union[int, Tensor]] = None,
    backend: str = "auto",
) -> Tensor:
    """A divergence between the student's and the teacher's token distributions, per token, reduced.

    Args:
        student_logits: ``(..., Vs)`` float32 / bfloat16 / float16 (float64 with
            ``backend="reference"``); differentiable.
        teacher_logits: ``(..., Vt)`` with the same leading shape; never differentiated (detached).
            When ``Vs != Vt`` the two are compared on their common prefix ``V = min(Vs, Vt)``: one
            vocabulary is a prefix of the other (vocabularies padded to different multiples), and
            the extra columns (padding) are dropped before the softmax.
        divergence: with ``p = softmax(student / T)``, ``q = softmax(teacher / T)``, per token:

            * ``"forward_kl"``: ``KL(q || p) = sum_j q_j (log q_j - log p_j)``;
            * ``"reverse_kl"``: ``KL(p || q)``;
            * ``"jsd"``: TRL's ``generalized_jsd_loss``: ``m = beta q + (1 - beta) p``,
              ``beta KL(q || m) + (1 - beta) KL(p || m)``; ``beta = 0`` is ``forward_kl`` and
              ``beta = 1`` is ``reverse_kl``, as TRL special-cases them;
            * ``"skew_kl"``: ``KL(q || beta q + (1 - beta) p)`` (DistiLLM's skew KL, skew factor
              ``beta`` in ``(0, 1]``);
            * ``"skew_reverse_kl"``: ``KL(p || beta p + (1 - beta) q)``;
            * ``"tvd"``: ``0.5 sum_j |p_j - q_j|``.
        beta: JSD's interpolation coefficient in ``[0, 1]``, or the skew factor in ``(0, 1]``.
        temperature: divides both logits (``> 0``), as distillation practice does.
        labels: ``(...)`` integer or None: tokens whose label is ``ignore_index`` are left out.
        reduction: TRL's: ``"batchmean"`` = sum over the kept tokens / their number (at least 1),
            or / ``student_logits.shape[0]`` without labels; ``"sum"``; ``"mean"`` = sum / (kept
            tokens x V); ``"none"``: the per-token divergence ``(...)`` (0 for left-out tokens).
        num_items_in_batch: instead of the reduction's denominator, the global number of tokens
            (gradient accumulation, as TRL's ``num_items_in_batch``).
        backend: ``"auto" | "triton" | "cuda" | "cpu" | "torch" | "reference"``.

    Returns:
        fp32: a scalar, or ``(...)`` for ``reduction="none"``. The forward keeps O(tokens) state and
        the backward writes the student's gradient once; nothing else of size tokens x V exists.
    """
    V.check_tensor("student_logits", student_logits, ndim_min=1)
    V.check_tensor("teacher_logits", teacher_logits, ndim_min=1)
    V.check_float("student_logits", student_logits, allow_fp64=True)
    V.check_float("teacher_logits", teacher_logits, allow_fp64=True)
    if tuple(student_logits.shape[:-1]) != tuple(teacher_logits.shape[:-1]):
        raise ValueError(f"teacher_logits: expected the leading shape {tuple(student_logits.shape[:-1])} of "
                         f"student_logits (one teacher row per student row), got {tuple(teacher_logits.shape)}")
    if teacher_logits.dtype != student_logits.dtype:
        raise TypeError(f"teacher_logits: expected the dtype of student_logits ({student_logits.dtype}), "
                        f"got {teacher_logits.dtype}")
    if labels is not None:
        V.check_tensor("labels", labels)
        V.check_integer("labels", labels)
        if tuple(labels.shape) != tuple(student_logits.shape[:-1]):
            raise ValueError(f"labels: expected shape {tuple(student_logits.shape[:-1])}, got {tuple(labels.shape)}")
    V.check_same_device(student_logits=student_logits, teacher_logits=teacher_logits, labels=labels)
    V.check_choice("divergence", divergence, DIVERGENCES)
    V.check_choice("reduction", reduction, DISTILL_REDUCTIONS)
    beta = _check_beta(divergence, beta)
    temperature = V.check_positive("temperature", temperature)
    name = resolve_backend(backend, student_logits.device)
    teacher_logits = teacher_logits.detach()
    if name == "reference":
        if num_items_in_batch is None:
            return distill_loss_reference(student_logits, teacher_logits, labels, divergence, beta, temperature,
                                          ignore_index, reduction)
        per = distill_loss_reference(student_logits, teacher_logits, labels, divergence, beta, temperature,
                                     ignore_index, "none")
        return per.float().sum() / num_items_in_batch
    _check_fused_dtype(student_logits, name)
    v = min(student_logits.shape[-1], teacher_logits.shape[-1])
    s = _rows(student_logits[..., :v])
    t = _rows(teacher_logits[..., :v])
    lab = None if labels is None else labels.reshape(-1).to(torch.int64).contiguous()
    per, _ = ops.distill_forward(s, t, lab, int(ignore_index), DIVERGENCE_CODES[divergence], beta, 1.0 / temperature,
                                 name)
    lead = student_logits.shape[:-1]
    if reduction == "none" and num_items_in_batch is None:
        return per.reshape(lead)
    total = per.sum()
    if num_items_in_batch is not None:
        return total / num_items_in_batch
    if reduction == "sum":
        return total
    kept = (lab != ignore_index).sum() if lab is not None else None
    if reduction == "mean":
        n = kept if kept is not None else per.numel()
        return total / ((n * v).clamp_min(1) if isinstance(n, Tensor) else max(n * v, 1))
    # batchmean
    if kept is not None:
        return total / kept.clamp_min(1)
    return total / max(student_logits.shape[0], 1)
