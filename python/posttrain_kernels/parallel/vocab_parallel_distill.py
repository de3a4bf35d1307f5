"""Vocab-parallel distillation: a divergence between student and teacher logits that are both split
over the vocabulary the same way (the student's and the teacher's tensor-parallel heads).

Per row, with ``s = student / T`` and ``t = teacher / T`` over the full vocabulary,
``p = softmax(s)``, ``q = softmax(t)``, ``s' = s - M_s``, ``t' = t - M_t`` (the row maxima),
``S_s = sum_j exp(s'_j)``, ``S_t = sum_j exp(t'_j)``::

    forward_kl  KL(q || p) = (1 / S_t) sum_j exp(t'_j) (t'_j - s'_j) - log S_t + log S_s
    reverse_kl  KL(p || q) = (1 / S_s) sum_j exp(s'_j) (s'_j - t'_j) - log S_s + log S_t

so both need one MAX all-reduce ``(N, 2)`` and one SUM all-reduce ``(N, 3)``. The JSD's mixture
``m = beta q + (1 - beta) p`` needs both global normalizers inside the log of every column
(``log m_j`` does not split into per-rank sums), so ``jsd`` takes one more SUM all-reduce
``(N, 2)`` of ``KL(q || m)`` and ``KL(p || m)``, computed once ``log S_s`` and ``log S_t`` are known.
The backward needs no communication.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

from .. import _validation as V
from ..api.distill import DISTILL_REDUCTIONS, _check_beta, _reduce
from .process_group import LocalArgs, VocabShards, agree_on_shards
from .shard_softmax import finite_or_zero
from .vocab_parallel import check_shard_and_labels, chunk_rows_for, device_of

PARALLEL_DIVERGENCES = ("forward_kl", "reverse_kl", "jsd")


def _zero_where_absent(prob: Tensor, value: Tensor) -> Tensor:
    """``prob * value`` with 0 where ``prob`` is 0 (a -inf logit: its term is 0, not 0 * inf)."""
    return torch.where(prob > 0, prob * value, torch.zeros_like(prob))


def _effective_divergence(divergence: str, beta: float) -> str:
    """TRL's generalized JSD special-cases beta 0 and 1 as the two KLs (as ``distill_loss`` does)."""
    if divergence == "jsd" and beta == 0.0:
        return "forward_kl"
    if divergence == "jsd" and beta == 1.0:
        return "reverse_kl"
    return divergence


class _VocabParallelDivergence(torch.autograd.Function):
    """student (N, V_r), teacher (N, V_r), kept (N,) bool -> per-row divergence (N,) fp32, 0 where
    not kept. ``divergence`` is the effective one (see ``_effective_divergence``)."""

    @staticmethod
    def forward(ctx, student, teacher, kept, shards: VocabShards, divergence: str, beta: float,
                inv_t: float, chunk: int):
        n = student.shape[0]
        chunks = [slice(s, min(s + chunk, n)) for s in range(0, n, chunk)]

        def scaled(x, sl):
            return x[sl].float() * inv_t

        maxima = torch.empty((n, 2), dtype=torch.float32, device=student.device)
        for sl in chunks:
            maxima[sl, 0], maxima[sl, 1] = scaled(student, sl).amax(1), scaled(teacher, sl).amax(1)
        shift = finite_or_zero(shards.all_reduce_max(maxima))
        sums = torch.zeros((n, 3), dtype=torch.float32, device=student.device)
        for sl in chunks:
            ss = scaled(student, sl) - shift[sl, 0:1]
            tt = scaled(teacher, sl) - shift[sl, 1:2]
            es, et = torch.exp(ss), torch.exp(tt)
            sums[sl, 0], sums[sl, 1] = es.sum(1), et.sum(1)
            if divergence == "forward_kl":
                sums[sl, 2] = _zero_where_absent(et, tt - ss).sum(1)
            elif divergence == "reverse_kl":
                sums[sl, 2] = _zero_where_absent(es, ss - tt).sum(1)
        shards.all_reduce_sum(sums)
        log_ss, log_st = torch.log(sums[:, 0]), torch.log(sums[:, 1])
        lse_s, lse_t = shift[:, 0] + log_ss, shift[:, 1] + log_st
        if divergence == "forward_kl":
            per, aux = sums[:, 2] / sums[:, 1] - log_st + log_ss, None
        elif divergence == "reverse_kl":
            per = sums[:, 2] / sums[:, 0] - log_ss + log_st
            aux = per
        else:  # jsd: KL(q || m) and KL(p || m), m = beta q + (1 - beta) p, need lse_s and lse_t first
            kl = torch.zeros((n, 2), dtype=torch.float32, device=student.device)
            for sl in chunks:
                lp, lq = scaled(student, sl) - lse_s[sl, None], scaled(teacher, sl) - lse_t[sl, None]
                lm = _log_mixture(lp, lq, beta)
                kl[sl, 0] = _zero_where_absent(lq.exp(), lq - lm).sum(1)
                kl[sl, 1] = _zero_where_absent(lp.exp(), lp - lm).sum(1)
            shards.all_reduce_sum(kl)
            per, aux = beta * kl[:, 0] + (1.0 - beta) * kl[:, 1], kl[:, 1]
        per = torch.where(kept, per, torch.zeros_like(per))
        ctx.save_for_backward(student, teacher, kept, lse_s, lse_t, aux)
        ctx.args = (divergence, beta, inv_t, chunk)
        return per

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_per):
        student, teacher, kept, lse_s, lse_t, aux = ctx.saved_tensors
        divergence, beta, inv_t, chunk = ctx.args
        n = student.shape[0]
        grad_row = grad_per.float() * inv_t
        grad = torch.empty(student.shape, dtype=student.dtype, device=student.device)
        for s in range(0, n, chunk):
            sl = slice(s, min(s + chunk, n))
            lp = student[sl].float() * inv_t - lse_s[sl, None]
            lq = teacher[sl].float() * inv_t - lse_t[sl, None]
            p = lp.exp()
            if divergence == "forward_kl":    # d KL(q||p) / d s_j = p_j - q_j
                g = p - lq.exp()
            elif divergence == "reverse_kl":  # d KL(p||q) / d s_j = p_j (lp_j - lq_j - KL)
                g = _zero_where_absent(p, lp - lq - aux[sl, None])
            else:                             # d JSD / d s_j = (1 - beta) p_j (lp_j - lm_j - KL(p||m))
                g = (1.0 - beta) * _zero_where_absent(p, lp - _log_mixture(lp, lq, beta) - aux[sl, None])
            # where(), not a product: a left-out row of -inf logits may hold nan in g
            grad[sl] = torch.where(kept[sl, None], g * grad_row[sl, None], torch.zeros_like(g))
        return grad, None, None, None, None, None, None, None


def _log_mixture(lp: Tensor, lq: Tensor, beta: float) -> Tensor:
    """``log(beta q + (1 - beta) p)`` from ``log p`` and ``log q``, for ``0 < beta < 1``."""
    return torch.logaddexp(lp + math.log1p(-beta), lq + math.log(beta))


def vocab_parallel_distill_loss(
    student_shard: Tensor,
    teacher_shard: Tensor,
    *,
    vocab_start: int,
    group=None,
    divergence: str = "forward_kl",
    beta: float = 0.5,
    temperature: float = 1.0,
    labels: Optional[Tensor] = None,
    ignore_index: int = -100,
    reduction: str = "batchmean",
    vocab_size: Optional[int] = None,
    check_ranks: bool = True,
) -> Tensor:
    """:func:`posttrain_kernels.distill_loss` on student and teacher logits split over the vocabulary.

    Args:
        student_shard: ``(..., V_r)`` float32 / bfloat16 / float16, this rank's columns
            ``[vocab_start, vocab_start + V_r)`` of the student's logits; differentiable.
        teacher_shard: the teacher's logits, split the same way (the same shape and dtype); never
            differentiated (detached).
        vocab_start, group, vocab_size, check_ranks: as in :func:`vocab_parallel_token_logprobs`.
        divergence: with ``p = softmax(student / T)``, ``q = softmax(teacher / T)`` over the full
            vocabulary, per token: ``"forward_kl"`` ``KL(q || p)``; ``"reverse_kl"`` ``KL(p || q)``;
            ``"jsd"``: TRL's generalized JSD, ``m = beta q + (1 - beta) p``,
            ``beta KL(q || m) + (1 - beta) KL(p || m)`` (``beta = 0`` is ``forward_kl``,
            ``beta = 1`` is ``reverse_kl``).
        beta: JSD's interpolation coefficient in ``[0, 1]``.
        temperature: divides both logits (``> 0``).
        labels: ``(...)`` integer or None: tokens whose label is ``ignore_index`` are left out (the
            same on every rank; the other label values are not used).
        reduction: as ``distill_loss``: ``"batchmean"`` = sum over the kept tokens / their number
            (at least 1), or / ``student_shard.shape[0]`` without labels; ``"sum"``; ``"mean"`` =
            sum / (kept tokens x V); ``"none"``: the per-token divergence ``(...)`` (0 where left
            out).

    Returns:
        fp32 scalar, or ``(...)`` for ``"none"``; identical on every rank; the gradient reaches
        ``student_shard`` only.

    Communication: the argument handshake, one MAX all-reduce ``(N, 2)``, one SUM all-reduce
    ``(N, 3)`` fp32, and for ``jsd`` one more SUM all-reduce ``(N, 2)`` (see the module docstring);
    nothing in the backward (``d KL(q||p)/d s_j = p_j - q_j``,
    ``d KL(p||q)/d s_j = p_j (log p_j - log q_j - KL(p||q))``,
    ``d JSD/d s_j = (1 - beta) p_j (log p_j - log m_j - KL(p||m))``, times ``1/T``).
    """
    fn = "vocab_parallel_distill_loss"

    def check_local() -> LocalArgs:
        start, width = check_shard_and_labels("student_shard", student_shard, labels, vocab_start, ignore_index)
        V.check_tensor("teacher_shard", teacher_shard, ndim_min=1)
        V.check_float("teacher_shard", teacher_shard)
        if tuple(teacher_shard.shape) != tuple(student_shard.shape):
            raise ValueError(f"teacher_shard: expected the shape of student_shard {tuple(student_shard.shape)} "
                             f"(the teacher's logits split over the vocabulary as the student's are), got "
                             f"{tuple(teacher_shard.shape)}")
        if teacher_shard.dtype != student_shard.dtype:
            raise TypeError(f"teacher_shard: expected the dtype of student_shard ({student_shard.dtype}), "
                            f"got {teacher_shard.dtype}")
        V.check_same_device(student_shard=student_shard, teacher_shard=teacher_shard)
        V.check_choice("divergence", divergence, PARALLEL_DIVERGENCES)
        V.check_choice("reduction", reduction, DISTILL_REDUCTIONS)
        b = _check_beta(divergence, beta)
        t = V.check_positive("temperature", temperature)
        n = student_shard.numel() // width
        params = (PARALLEL_DIVERGENCES.index(divergence), b, t, ignore_index,
                  DISTILL_REDUCTIONS.index(reduction), float(labels is not None))
        return LocalArgs(start, width, n, labels, ignore_index, params, labels_are_token_ids=False)

    shards = agree_on_shards(fn, group, device_of(student_shard), check_local,
                             ("divergence", "beta", "temperature", "ignore_index", "reduction",
                              "labels (given or None)"), vocab_size, check_ranks)
    lead = student_shard.shape[:-1]
    s2d = student_shard.reshape(-1, shards.width)
    t2d = teacher_shard.detach().reshape(-1, shards.width)
    if labels is None:
        kept, count = torch.ones(s2d.shape[0], dtype=torch.bool, device=s2d.device), None
    else:
        kept = labels.reshape(-1) != ignore_index
        count = kept.sum()
    beta = float(beta)
    per = _VocabParallelDivergence.apply(
        s2d, t2d, kept, shards, _effective_divergence(divergence, beta), beta, 1.0 / float(temperature),
        chunk_rows_for(shards.width, s2d.device))
    # distill_loss's reductions; without labels "batchmean" divides by the first dimension of the
    # logits (the vocabulary itself for 1-D logits: V, not this rank's V_r)
    first_dim = student_shard.shape[0] if student_shard.dim() > 1 else shards.vocab_size
    return _reduce(per.reshape(lead), count, shards.vocab_size, first_dim, reduction, None)
