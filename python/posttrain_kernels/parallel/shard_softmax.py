"""Softmax statistics of rows whose vocabulary is split over ranks, and the shard's logits gradient.

Each rank sees the columns ``[vocab_start, vocab_start + V_r)`` of every row. The forward of the
token log-prob family needs, per row, over the *full* vocabulary (``x`` the fp32 logits already
divided by the temperature)::

    M   = max_j x_j                                  (all-reduce MAX)
    S   = sum_j exp(x_j - M)                         (all-reduce SUM, together with:)
    W   = sum_j exp(x_j - M) (x_j - M)               (entropy)
    x_y = the target's logit (0 on the ranks that do not hold it)
    X   = sum_j x_j                                  (label smoothing)

    lse = M + log S,   logp = x_y - lse,   entropy = log S - W / S,   mean_j x_j = X / V

A rank first reduces its shard to per-row partials relative to its *own* max ``m_r`` (so the fused
linear variants need a single pass over the head: each chunk's logits are reduced as soon as they
are computed), then the ranks all-reduce ``m_r`` with MAX, each rank rescales its partials to the
global max (``exp(m_r - M)``), and one SUM all-reduce of an ``(N, k)`` fp32 tensor adds them up.
Everything is fp32 whatever the logits' dtype.

The gradient of the shard's logits needs no communication: with ``p_j = exp(x_j - lse)`` (from the
replicated ``lse``) the formulas are local to each column.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
from torch import Tensor

from .process_group import VocabShards

_F32 = torch.float32


def local_label_index(labels: Tensor, ignore_index: int, vocab_start: int, width: int) -> Tensor:
    """``(N,)`` int64: the label's column in this shard, or -1 where the label is ignored or held by
    another rank."""
    y = labels.to(torch.int64)
    mine = (y != ignore_index) & (y >= vocab_start) & (y < vocab_start + width)
    return torch.where(mine, y - vocab_start, -1)


def _target_logit(x: Tensor, local_y: Tensor) -> Tensor:
    """``x[i, local_y[i]]``, 0 where ``local_y`` is -1."""
    has = local_y >= 0
    picked = x.gather(1, local_y.clamp_min(0)[:, None])[:, 0]
    return torch.where(has, picked, torch.zeros_like(picked))


def finite_or_zero(m: Tensor) -> Tensor:
    """A row max usable as a shift: -inf (a row of -inf logits) becomes 0, so that
    ``exp(x - shift)`` is 0 and not nan."""
    return torch.where(torch.isfinite(m), m, torch.zeros_like(m))


class ShardRowPartials:
    """Per-row partials of this rank's shard, accumulated chunk by chunk of rows, relative to the
    shard's own row max (see the module docstring)."""

    def __init__(self, n: int, device, entropy: bool, sum_logits: bool):
        f32 = dict(dtype=_F32, device=device)
        self.entropy, self.sum_logits = entropy, sum_logits
        self.m = torch.empty(n, **f32)          # m_r: this shard's row max
        self.s = torch.empty(n, **f32)          # sum exp(x - m_r)
        self.w = torch.zeros(n if entropy else 0, **f32)    # sum exp(x - m_r) (x - m_r)
        self.tgt = torch.empty(n, **f32)        # x_y where this rank holds y, else 0
        self.sx = torch.zeros(n if sum_logits else 0, **f32)  # sum x

    def add_chunk(self, rows: slice, x: Tensor, local_y: Tensor) -> None:
        """``x`` fp32 ``(rows, V_r)`` the chunk's logits divided by the temperature; ``local_y`` its
        local label columns (-1: not here)."""
        m = x.amax(1)
        xs = x - finite_or_zero(m)[:, None]
        e = torch.exp(xs)
        self.m[rows], self.s[rows] = m, e.sum(1)
        if self.entropy:
            # e * xs is 0 * -inf = nan for -inf logits: their term of the entropy is 0
            self.w[rows] = torch.where(e > 0, e * xs, torch.zeros_like(e)).sum(1)
        self.tgt[rows] = _target_logit(x, local_y)
        if self.sum_logits:
            self.sx[rows] = x.sum(1)


@dataclass
class RowStats:
    """Replicated per-row statistics over the full vocabulary, ``(N,)`` fp32 each."""

    lse: Tensor
    target: Tensor                   # x_y (0 for an ignored row)
    entropy: Optional[Tensor]        # -sum_j p_j log p_j, or None when not asked
    sum_logits: Optional[Tensor]     # sum_j x_j, or None when not asked


def merge_over_shards(part: ShardRowPartials, shards: VocabShards) -> RowStats:
    """One MAX all-reduce of the row maxima, one SUM all-reduce of the rescaled partials."""
    big_m = shards.all_reduce_max(part.m.clone())
    shift = finite_or_zero(big_m)
    has = part.s > 0  # s > 0 iff the shard's row max is finite; else every partial is 0
    m_here = finite_or_zero(part.m)
    # exp(m_r - M) <= 1 where m_r is finite; a where() (not a product) keeps exp overflow of
    # all -inf shards out of the result
    scale = torch.where(has, torch.exp(m_here - shift), torch.zeros_like(shift))
    cols = [scale * part.s, part.tgt]
    if part.entropy:
        # sum e_j (x_j - M) = exp(m_r - M) [sum e'_j (x_j - m_r) + (m_r - M) sum e'_j]
        w = torch.where(has, scale * (part.w + (m_here - shift) * part.s), torch.zeros_like(shift))
        cols.append(w)
    if part.sum_logits:
        cols.append(part.sx)
    total = shards.all_reduce_sum(torch.stack(cols, 1))
    s, tgt = total[:, 0], total[:, 1]
    log_s = torch.log(s)
    entropy = sum_logits = None
    k = 2
    if part.entropy:
        entropy = log_s - total[:, k] / s
        k += 1
    if part.sum_logits:
        sum_logits = total[:, k]
    return RowStats(shift + log_s, tgt, entropy, sum_logits)


def token_logprobs_logits_grad(x: Tensor, local_y: Tensor, kept: Tensor, lse: Tensor,
                               entropy: Optional[Tensor], grad_logp: Tensor,
                               grad_entropy: Optional[Tensor], inv_t: float) -> Tensor:
    """d loss / d (shard logits) for one chunk, fp32 ``(rows, V_r)``; ``x`` the chunk's logits
    divided by the temperature, the other tensors the chunk's rows.

    With ``lp_j = x_j - lse``, ``p_j = exp(lp_j)``, ``g``/``h`` the upstream gradients of
    logp/entropy::

        d logp    / d x_j = [j == y] - p_j
        d entropy / d x_j = -p_j (lp_j + entropy)

    times ``1 / T`` (x = logits / T); 0 for ignored rows.
    """
    lp = x - lse[:, None]
    p = torch.exp(lp)
    grad = p * (-grad_logp[:, None])
    if grad_entropy is not None:
        # p_j = 0 (a -inf logit) has lp_j = -inf: its term is 0, not 0 * inf
        term = torch.where(p > 0, p * (lp + entropy[:, None]), torch.zeros_like(p))
        grad -= grad_entropy[:, None] * term
    has = local_y >= 0
    grad.scatter_add_(1, local_y.clamp_min(0)[:, None],
                      torch.where(has, grad_logp, torch.zeros_like(grad_logp))[:, None])
    if inv_t != 1.0:
        grad *= inv_t
    return torch.where(kept[:, None], grad, torch.zeros_like(grad))


def cross_entropy_logits_grad(x: Tensor, local_y: Tensor, kept: Tensor, lse: Tensor, grad_loss: Tensor,
                              eps: float, vocab_size: int) -> Tensor:
    """d loss / d (shard logits) for one chunk of rows, fp32 ``(rows, V_r)``, for the per-row loss
    ``(1 - eps)(lse - x_y) + eps (lse - mean_j x_j)``::

        d loss / d x_j = p_j - (1 - eps) [j == y] - eps / V

    times the rows' upstream gradients; 0 for ignored rows.
    """
    grad = torch.exp(x - lse[:, None])
    if eps:
        grad -= eps / vocab_size
    has = local_y >= 0
    grad.scatter_add_(1, local_y.clamp_min(0)[:, None],
                      torch.where(has, torch.full_like(lse, -(1.0 - eps)), torch.zeros_like(lse))[:, None])
    grad *= grad_loss[:, None]
    return torch.where(kept[:, None], grad, torch.zeros_like(grad))


def cross_entropy_rows(stats: RowStats, kept: Tensor, eps: float, vocab_size: int) -> Tensor:
    """Per-row loss ``(1 - eps)(lse - x_y) + eps (lse - X / V)``, 0 for ignored rows."""
    loss = (1.0 - eps) * (stats.lse - stats.target)
    if eps:
        loss = loss + eps * (stats.lse - stats.sum_logits / vocab_size)
    return torch.where(kept, loss, torch.zeros_like(loss))
