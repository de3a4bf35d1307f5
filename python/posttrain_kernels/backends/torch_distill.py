"""Pure-PyTorch launchers of the distillation family (student vs teacher divergences per row),
chunked over rows; the contract every distillation backend implements.

Contract (all backends):

``distill_forward(student, teacher, labels, ignore_index, divergence, beta, inv_temperature)``
    student ``(N, V)`` and teacher ``(N, V)`` float (fp32 / bf16 / fp16, unit stride along V, any
    row stride; the same V: the public API slices both to their common prefix), labels int64
    ``(N,)`` or None (a row whose label is ``ignore_index`` is skipped), ``divergence`` one of
    ``DIVERGENCE_CODES``, ``beta`` (JSD's beta, or the skew factor alpha), ``inv_temperature``.
    With ``s = student * inv_t``, ``t = teacher * inv_t``, ``p = softmax(s)``, ``q = softmax(t)``:
    returns ``loss (N,)`` fp32 (0 for skipped rows) and ``stats (N, 3)`` fp32 =
    ``(logsumexp(s), logsumexp(t), c)``, ``c`` the row constant the backward needs (below).

``distill_backward(student, teacher, labels, ignore_index, divergence, beta, inv_temperature,
stats, grad_loss, out=None)``
    ``grad_loss (N,)`` fp32; returns the gradient of ``sum_r grad_loss[r] * loss[r]`` w.r.t.
    ``student`` ``(N, V)`` in the student's dtype (0 for skipped rows); ``out`` may be given
    (contiguous, the student's shape and dtype).

Divergences per row (TRL's ``generalized_jsd_loss`` for ``jsd``, ``beta`` 0 and 1 being the two
KLs exactly as TRL special-cases them) and their gradients w.r.t. ``s``, each of the form
``dL/ds_j = p_j (G_j - c)`` with ``c = sum_k p_k G_k``:

* ``forward_kl`` (code 0): ``KL(q || p) = sum q (log q - log p)``; ``dL/ds = p - q`` (c unused, 0).
* ``reverse_kl`` (1): ``KL(p || q)``; ``G = log p - log q``, ``c = L``.
* ``jsd`` (2), ``0 < beta < 1``: ``m = beta q + (1 - beta) p``,
  ``L = beta KL(q || m) + (1 - beta) KL(p || m)``; ``G = (1 - beta)(log p - log m)``.
  ``beta == 0`` is ``forward_kl`` and ``beta == 1`` is ``reverse_kl`` (TRL).
* ``skew_kl`` (3), skew ``alpha = beta``: ``KL(q || alpha q + (1 - alpha) p)`` (DistiLLM's skew
  KL); ``G = -(1 - alpha) q / r`` with ``r = alpha q + (1 - alpha) p``.
* ``skew_reverse_kl`` (4): ``KL(p || alpha p + (1 - alpha) q)``;
  ``G = log p - log r + 1 - alpha p / r`` with ``r = alpha p + (1 - alpha) q``.
* ``tvd`` (5): ``0.5 sum |p - q|``; ``G = 0.5 sign(p - q)``.

The final gradient is ``grad_loss[r] * inv_t * dL/ds``.
"""
from __future__ import annotations

import math
from typing import Iterator, Optional, Tuple

import torch

Tensor = torch.Tensor

DIVERGENCE_CODES = {"forward_kl": 0, "reverse_kl": 1, "jsd": 2, "skew_kl": 3, "skew_reverse_kl": 4, "tvd": 5}

# fp32 elements per chunk of rows (16 MiB per temporary)
_CHUNK_ELEMENTS = 1 << 22


def _chunks(n: int, v: int) -> Iterator[slice]:
    step = max(1, _CHUNK_ELEMENTS // max(v, 1))
    for s in range(0, n, step):
        yield slice(s, min(s + step, n))


def _xlogy(p: Tensor, logp: Tensor) -> Tensor:
    """p * logp with 0 where p == 0 (no 0 * -inf)."""
    return torch.where(p > 0, p * logp, torch.zeros_like(p))


def _effective(divergence: int, beta: float) -> int:
    if divergence == 2 and beta == 0.0:
        return 0
    if divergence == 2 and beta == 1.0:
        return 1
    return divergence


def _row_terms(ls: Tensor, lt: Tensor, divergence: int, beta: float) -> Tuple[Tensor, Tensor]:
    """(loss per row, G per element) from the log-probs ``ls`` (student) and ``lt`` (teacher)."""
    p, q = ls.exp(), lt.exp()
    if divergence == 0:
        return _xlogy(q, lt - ls).sum(-1), None
    if divergence == 1:
        g = ls - lt
        return _xlogy(p, g).sum(-1), g
    if divergence == 2:
        lm = torch.logaddexp(lt + math.log(beta), ls + math.log1p(-beta))
        loss = beta * _xlogy(q, lt - lm).sum(-1) + (1 - beta) * _xlogy(p, ls - lm).sum(-1)
        return loss, (1 - beta) * (ls - lm)
    if divergence == 3:
        alpha = beta
        lr = torch.logaddexp(lt + math.log(alpha), ls + math.log1p(-alpha)) if 0 < alpha < 1 else (
            lt if alpha == 1 else ls)
        # q / r, 0 where q == 0 (also where r == 0 too: alpha == 1 with q == 0 < p)
        ratio = torch.where(q > 0, torch.exp(lt - lr), torch.zeros_like(q))
        return _xlogy(q, lt - lr).sum(-1), -(1 - alpha) * ratio
    if divergence == 4:
        alpha = beta
        lr = torch.logaddexp(ls + math.log(alpha), lt + math.log1p(-alpha)) if 0 < alpha < 1 else (
            ls if alpha == 1 else lt)
        loss = _xlogy(p, ls - lr).sum(-1)
        return loss, (ls - lr) + 1 - alpha * torch.exp(ls - lr)
    # tvd
    return 0.5 * (p - q).abs().sum(-1), 0.5 * torch.sign(p - q)


def distill_forward(student: Tensor, teacher: Tensor, labels: Optional[Tensor], ignore_index: int,
                    divergence: int, beta: float, inv_temperature: float) -> Tuple[Tensor, Tensor]:
    n, v = student.shape
    f32 = dict(device=student.device, dtype=torch.float32)
    loss = torch.zeros((n,), **f32)
    stats = torch.zeros((n, 3), **f32)
    div = _effective(divergence, beta)
    for sl in _chunks(n, v):
        s = student[sl].float() * inv_temperature
        t = teacher[sl].float() * inv_temperature
        lse_s, lse_t = torch.logsumexp(s, -1), torch.logsumexp(t, -1)
        ls, lt = s - lse_s[:, None], t - lse_t[:, None]
        row, g = _row_terms(ls, lt, div, beta)
        if g is None:
            c = torch.zeros_like(row)
        else:
            p = ls.exp()
            c = torch.where(p > 0, p * g, torch.zeros_like(p)).sum(-1)
        if labels is not None:
            skip = labels[sl] == ignore_index
            row = row.masked_fill(skip, 0.0)
            lse_s, lse_t, c = (x.masked_fill(skip, 0.0) for x in (lse_s, lse_t, c))
        loss[sl] = row
        stats[sl] = torch.stack([lse_s, lse_t, c], -1)
    return loss, stats


def distill_backward(student: Tensor, teacher: Tensor, labels: Optional[Tensor], ignore_index: int,
                     divergence: int, beta: float, inv_temperature: float, stats: Tensor, grad_loss: Tensor,
                     out: Optional[Tensor] = None) -> Tensor:
    n, v = student.shape
    grad = torch.empty((n, v), device=student.device, dtype=student.dtype) if out is None else out
    div = _effective(divergence, beta)
    for sl in _chunks(n, v):
        s = student[sl].float() * inv_temperature
        t = teacher[sl].float() * inv_temperature
        ls = s - stats[sl, 0:1]
        lt = t - stats[sl, 1:2]
        p = ls.exp()
        if div == 0:
            ds = p - lt.exp()
        else:
            _, g = _row_terms(ls, lt, div, beta)
            ds = torch.where(p > 0, p * (g - stats[sl, 2:3]), torch.zeros_like(p))
        ds = ds * (grad_loss[sl].float() * inv_temperature)[:, None]
        if labels is not None:
            ds.masked_fill_((labels[sl] == ignore_index)[:, None], 0.0)
        grad[sl] = ds
    return grad


def distill_fused_(student: Tensor, teacher: Tensor, labels: Optional[Tensor], ignore_index: int,
                   divergence: int, beta: float, inv_temperature: float, grad_loss: Tensor) -> Tuple[Tensor, Tensor]:
    """``distill_forward``, then the gradient of ``sum_r grad_loss[r] * loss[r]`` written over
    ``student`` (contiguous); ``teacher`` may be clobbered by other backends (not here)."""
    loss, stats = distill_forward(student, teacher, labels, ignore_index, divergence, beta, inv_temperature)
    distill_backward(student, teacher, labels, ignore_index, divergence, beta, inv_temperature, stats,
                     grad_loss.to(torch.float32), out=student)
    return loss, stats
