"""Distillation losses between student and teacher logits (the KL / JSD family), with no
``tokens x vocab`` probability tensors in memory."""
from __future__ import annotations

import math
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


def _reduce(per: Tensor, kept: Optional[Tensor], classes: int, first_dim: int, reduction: str,
            num_items_in_batch) -> Tensor:
    """TRL's reductions of the per-token divergences ``per`` (0 where left out): ``kept`` the number
    of kept tokens (None without labels), ``classes`` the size of the compared distributions,
    ``first_dim`` the inputs' first dimension (``batchmean``'s denominator without labels)."""
    if reduction == "none" and num_items_in_batch is None:
        return per
    total = per.sum()
    if num_items_in_batch is not None:
        return total / num_items_in_batch
    if reduction == "sum":
        return total
    if reduction == "mean":
        n = kept if kept is not None else per.numel()
        return total / ((n * classes).clamp_min(1) if isinstance(n, Tensor) else max(n * classes, 1))
    if kept is not None:  # batchmean
        return total / kept.clamp_min(1)
    return total / max(first_dim, 1)


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
    kept = None if lab is None else (lab != ignore_index).sum()
    return _reduce(per.reshape(lead), kept, v, student_logits.shape[0], reduction, num_items_in_batch)


TOPK_TAILS = ("renormalize", "bucket")


def topk_distill_loss(
    student_logits: Tensor,
    teacher_topk_ids: Tensor,
    teacher_topk_logps: Tensor,
    *,
    divergence: str = "forward_kl",
    beta: float = 0.5,
    temperature: float = 1.0,
    tail: str = "renormalize",
    labels: Optional[Tensor] = None,
    ignore_index: int = -100,
    reduction: str = "batchmean",
    num_items_in_batch: Optional[Union[int, Tensor]] = None,
    backend: str = "auto",
) -> Tensor:
    """Distillation from a sparse teacher: its top-k token ids and log-probs per position, stored
    offline, against the student's full distribution.

    Args:
        student_logits: ``(..., V)``; differentiable. ``temperature`` divides them (the teacher's
            log-probs are taken as stored).
        teacher_topk_ids: ``(..., k)`` integer ids in ``[0, V)`` (distinct per position).
        teacher_topk_logps: ``(..., k)`` the teacher's log-probs of those ids (normalized over its
            full vocabulary; not differentiated).
        tail: what happens to the probability mass outside the k ids:

            * ``"renormalize"``: both distributions are restricted to the k ids and renormalized
              there, ``q~_i = q_i / sum_k q``, ``p~_i = p_i / sum_k p``; the divergence is taken
              between ``q~`` and ``p~`` (k classes);
            * ``"bucket"``: the rest of the vocabulary is one more class, with mass
              ``1 - sum_k q`` for the teacher and ``1 - sum_k p`` for the student (k + 1 classes;
              a tail mass below 1e-7 counts as 1e-7, so its log stays finite).
        divergence, beta, labels, ignore_index, reduction, num_items_in_batch, backend: as
            :func:`distill_loss` (``"mean"`` divides by the kept tokens x the number of classes).

    The student's log-probs of the k ids come from :func:`token_logprobs` (one fused pass over the
    vocabulary per row, no log-softmax tensor); the rest is O(tokens x k).

    Returns:
        fp32: a scalar, or ``(...)`` for ``reduction="none"``.
    """
    from .token_logprobs import token_logprobs
    from ..reference.distill import distill_divergence_reference
    V.check_tensor("teacher_topk_ids", teacher_topk_ids, ndim_min=1)
    V.check_tensor("teacher_topk_logps", teacher_topk_logps, ndim_min=1)
    V.check_integer("teacher_topk_ids", teacher_topk_ids)
    V.check_float("teacher_topk_logps", teacher_topk_logps, allow_fp64=True)
    lead = tuple(student_logits.shape[:-1])
    if tuple(teacher_topk_ids.shape[:-1]) != lead:
        raise ValueError(f"teacher_topk_ids: expected shape {lead + ('k',)} for student_logits of shape "
                         f"{tuple(student_logits.shape)}, got {tuple(teacher_topk_ids.shape)}")
    if teacher_topk_logps.shape != teacher_topk_ids.shape:
        raise ValueError(f"teacher_topk_logps: expected the shape of teacher_topk_ids "
                         f"{tuple(teacher_topk_ids.shape)}, got {tuple(teacher_topk_logps.shape)}")
    if teacher_topk_ids.shape[-1] < 1:
        raise ValueError("teacher_topk_ids: expected at least one id per position (k >= 1), got k = 0")
    V.check_choice("tail", tail, TOPK_TAILS)
    V.check_choice("divergence", divergence, DIVERGENCES)
    V.check_choice("reduction", reduction, DISTILL_REDUCTIONS)
    beta = _check_beta(divergence, beta)
    if labels is not None:
        V.check_tensor("labels", labels)
        V.check_integer("labels", labels)
        if tuple(labels.shape) != lead:
            raise ValueError(f"labels: expected shape {lead}, got {tuple(labels.shape)}")
    lp, _ = token_logprobs(student_logits, teacher_topk_ids, temperature=temperature, backend=backend)
    lq = teacher_topk_logps.detach().to(lp.dtype if lp.dtype != torch.float64 else torch.float64)
    lp = lp.to(lq.dtype)
    if tail == "bucket":
        floor = math.log(1e-7)

        def tail_of(x):
            mass = torch.logsumexp(x, -1).clamp(max=math.log1p(-1e-7))
            return torch.log(-torch.expm1(mass)).clamp_min(floor)[..., None]
        lp, lq = torch.cat([lp, tail_of(lp)], -1), torch.cat([lq, tail_of(lq)], -1)
    # log_softmax inside renormalizes over the k ids (and is exact for the k + 1 normalized classes)
    per = distill_divergence_reference(lp, lq, divergence, beta, 1.0).float()
    kept = None
    if labels is not None:
        keep = labels != ignore_index
        per = torch.where(keep, per, torch.zeros_like(per))
        kept = keep.sum()
    return _reduce(per, kept, lp.shape[-1], student_logits.shape[0], reduction, num_items_in_batch)
