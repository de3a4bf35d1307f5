"""Vocab-parallel token log-probs, entropy and cross-entropy from logits split over the vocabulary.

Tensor-parallel heads (Megatron's ``VocabParallelEmbedding`` / column-parallel output layer) leave
each rank of a process group with a slice of the vocabulary: rank ``r`` holds the logits columns
``[vocab_start_r, vocab_start_r + V_r)`` of every row. These functions compute the per-token
quantities over the *full* vocabulary from the shards, as Megatron's vocab-parallel cross-entropy
does: one MAX all-reduce of the row maxima and one SUM all-reduce of a small ``(N, k)`` fp32 tensor
of per-row sums (see ``shard_softmax``), after a handshake that checks the arguments of every rank
(see ``process_group``). The results are identical on every rank; the backward needs no
communication (each rank computes its own shard's gradient from the replicated statistics).
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

from .. import _validation as V
from ..api.linear_token_logprobs import chunk_budget
from .process_group import LocalArgs, VocabShards, agree_on_shards, check_vocab_start
from .shard_softmax import (ShardRowPartials, cross_entropy_logits_grad, cross_entropy_rows,
                            local_label_index, merge_over_shards, token_logprobs_logits_grad)

REDUCTIONS = ("mean", "sum", "none")


def chunk_rows_for(width: int, device) -> int:
    """Rows per chunk so that a chunk's few fp32 ``(rows, V_r)`` temporaries (the upcast logits,
    their exponentials, the gradient) stay within the package's chunk budget."""
    return max(1, chunk_budget(device) // (16 * max(1, width)))


def check_shard_and_labels(shard_name: str, shard: Tensor, labels: Optional[Tensor],
                           vocab_start, ignore_index) -> Tuple[int, int]:
    """Local checks shared by the logits variants: ``(vocab_start, V_r)``."""
    vocab_start = check_vocab_start(vocab_start)
    V.check_tensor(shard_name, shard, ndim_min=1)
    V.check_float(shard_name, shard)
    if shard.shape[-1] < 1:
        raise ValueError(f"{shard_name}: expected a shard of at least one vocabulary column, got shape "
                         f"{tuple(shard.shape)}")
    if isinstance(ignore_index, bool) or not isinstance(ignore_index, int):
        raise TypeError(f"ignore_index: expected an int, got {type(ignore_index).__name__}")
    if labels is not None:
        V.check_tensor("labels", labels)
        V.check_integer("labels", labels)
        lead = tuple(shard.shape[:-1])
        if tuple(labels.shape) != lead:
            raise ValueError(f"labels: expected shape {lead} (one global token id per row of {shard_name} "
                             f"{tuple(shard.shape)}), got {tuple(labels.shape)}")
        V.check_same_device(**{shard_name: shard, "labels": labels})
    return vocab_start, shard.shape[-1]


def device_of(t) -> torch.device:
    """The device of the handshake record: the tensor's (the collectives run on the tensors'
    device: gloo on the CPU, NCCL on CUDA); the CPU for a non-tensor, which its check rejects."""
    return t.device if isinstance(t, Tensor) else torch.device("cpu")


def _rows(t: Tensor) -> Tensor:
    """(..., V_r) -> (N, V_r), a view whenever the leading dims allow one."""
    return t.reshape(-1, t.shape[-1])


class _VocabParallelTokenLogprobs(torch.autograd.Function):
    """logits (N, V_r), labels int64 (N,) -> logp (N,), entropy (N,) or (0,), lse (N,), fp32."""

    @staticmethod
    def forward(ctx, logits, labels, shards: VocabShards, inv_t: float, ignore_index: int,
                want_entropy: bool, chunk: int):
        n = logits.shape[0]
        local_y = local_label_index(labels, ignore_index, shards.vocab_start, shards.width)
        kept = labels != ignore_index
        part = ShardRowPartials(n, logits.device, entropy=want_entropy, sum_logits=False)
        for s in range(0, n, chunk):
            sl = slice(s, min(s + chunk, n))
            part.add_chunk(sl, logits[sl].float() * inv_t, local_y[sl])
        stats = merge_over_shards(part, shards)
        zero = torch.zeros_like(stats.lse)
        logp = torch.where(kept, stats.target - stats.lse, zero)
        entropy = torch.where(kept, stats.entropy, zero) if want_entropy else stats.lse.new_empty(0)
        ctx.save_for_backward(logits, local_y, kept, stats.lse, entropy)
        ctx.args = (inv_t, want_entropy, chunk)
        ctx.mark_non_differentiable(stats.lse)
        if not want_entropy:
            ctx.mark_non_differentiable(entropy)
        return logp, entropy, stats.lse

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_logp, grad_entropy, _grad_lse):
        logits, local_y, kept, lse, entropy = ctx.saved_tensors
        inv_t, want_entropy, chunk = ctx.args
        n = logits.shape[0]
        grad_logp = torch.zeros_like(lse) if grad_logp is None else grad_logp.float()
        grad_entropy = grad_entropy.float() if (want_entropy and grad_entropy is not None) else None
        grad = torch.empty(logits.shape, dtype=logits.dtype, device=logits.device)
        for s in range(0, n, chunk):
            sl = slice(s, min(s + chunk, n))
            grad[sl] = token_logprobs_logits_grad(
                logits[sl].float() * inv_t, local_y[sl], kept[sl], lse[sl],
                entropy[sl] if grad_entropy is not None else None, grad_logp[sl],
                None if grad_entropy is None else grad_entropy[sl], inv_t)
        return grad, None, None, None, None, None, None


def vocab_parallel_token_logprobs(
    logits_shard: Tensor,
    labels: Tensor,
    *,
    vocab_start: int,
    group=None,
    temperature: float = 1.0,
    ignore_index: int = -100,
    return_entropy: bool = False,
    vocab_size: Optional[int] = None,
    check_ranks: bool = True,
) -> Tuple[Tensor, Optional[Tensor]]:
    """Log-probs of the selected tokens (and each row's entropy) from vocab-parallel logits.

    Args:
        logits_shard: ``(..., V_r)`` float32 / bfloat16 / float16: this rank's columns
            ``[vocab_start, vocab_start + V_r)`` of the logits ``(..., V)``; differentiable.
        labels: ``(...)`` integer **global** token ids in ``[0, V)``, or ``ignore_index``; the same
            on every rank.
        vocab_start: the first global vocabulary id of this rank's shard. The shards of the group's
            ranks must tile ``[0, V)`` (any widths, any order of the ranks); ``V`` is the sum of
            their widths.
        group: the tensor-parallel process group; ``None``: the default group, or a world of one
            when ``torch.distributed`` is not initialized (then this is :func:`token_logprobs`).
        temperature: divides the logits (``> 0``).
        ignore_index: label value that is skipped: logp 0, entropy 0, no gradient.
        return_entropy: also return the entropy of each row's distribution.
        vocab_size: optional check: ``V`` must equal it (catches a group of the wrong size).
        check_ranks: ``True`` (default): the ranks first exchange their arguments (one small
            ``all_gather``, read on the host), so a bad argument raises on every rank instead of
            hanging the others; ``False`` (``vocab_size`` required): no exchange and no host sync,
            for the training hot path once the layout is known to be right.

    Returns:
        ``(logp, entropy)``, fp32 of the shape of ``labels`` (``entropy`` ``None`` unless asked),
        identical on every rank; differentiable with respect to ``logits_shard`` through both, with
        any upstream gradient (which must be the same on every rank, as the outputs are).

    With ``x = logits / temperature`` over the full vocabulary, ``lse = log sum_j exp(x_j)``::

        logp    = x[y] - lse
        entropy = -sum_j p_j log p_j = lse - sum_j p_j x_j,   p_j = exp(x_j - lse)

    accumulated in fp32. Communication: an ``all_gather`` of a small argument record (every rank's
    checks, see ``posttrain_kernels.parallel.process_group``; it syncs with the host), one MAX
    all-reduce of ``(N,)`` and one SUM all-reduce of ``(N, 2)`` (``(N, 3)`` with the entropy) fp32.
    The backward communicates nothing: ``d logp / d x_j = [j == y] - p_j`` and
    ``d entropy / d x_j = -p_j (log p_j + entropy)`` are local to the shard's columns.
    """
    fn = "vocab_parallel_token_logprobs"

    def check_local() -> LocalArgs:
        start, width = check_shard_and_labels("logits_shard", logits_shard, labels, vocab_start, ignore_index)
        t = V.check_positive("temperature", temperature)
        n = labels.numel()
        return LocalArgs(start, width, n, labels, ignore_index,
                         (t, ignore_index, float(bool(return_entropy))))

    shards = agree_on_shards(fn, group, device_of(logits_shard), check_local,
                             ("temperature", "ignore_index", "return_entropy"), vocab_size, check_ranks)
    logp, entropy, _ = _VocabParallelTokenLogprobs.apply(
        _rows(logits_shard), labels.reshape(-1), shards, 1.0 / float(temperature), int(ignore_index),
        bool(return_entropy), chunk_rows_for(shards.width, logits_shard.device))
    return logp.reshape(labels.shape), (entropy.reshape(labels.shape) if return_entropy else None)


class _VocabParallelCrossEntropyRows(torch.autograd.Function):
    """logits (N, V_r), labels int64 (N,) -> per-row loss (N,) fp32."""

    @staticmethod
    def forward(ctx, logits, labels, shards: VocabShards, ignore_index: int, eps: float, chunk: int):
        n = logits.shape[0]
        local_y = local_label_index(labels, ignore_index, shards.vocab_start, shards.width)
        kept = labels != ignore_index
        part = ShardRowPartials(n, logits.device, entropy=False, sum_logits=eps > 0)
        for s in range(0, n, chunk):
            sl = slice(s, min(s + chunk, n))
            part.add_chunk(sl, logits[sl].float(), local_y[sl])
        stats = merge_over_shards(part, shards)
        ctx.save_for_backward(logits, local_y, kept, stats.lse)
        ctx.args = (eps, shards.vocab_size, chunk)
        return cross_entropy_rows(stats, kept, eps, shards.vocab_size)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_loss):
        logits, local_y, kept, lse = ctx.saved_tensors
        eps, vocab_size, chunk = ctx.args
        n = logits.shape[0]
        grad_loss = grad_loss.float()
        grad = torch.empty(logits.shape, dtype=logits.dtype, device=logits.device)
        for s in range(0, n, chunk):
            sl = slice(s, min(s + chunk, n))
            grad[sl] = cross_entropy_logits_grad(logits[sl].float(), local_y[sl], kept[sl], lse[sl],
                                                 grad_loss[sl], eps, vocab_size)
        return grad, None, None, None, None, None


def reduce_rows(loss: Tensor, kept: Tensor, reduction: str, shape) -> Tensor:
    """``"none"``: ``loss`` reshaped to ``shape``; ``"sum"``; ``"mean"``: the sum over the kept rows
    divided by their number (0 when every row is ignored: 0 / 1, no host sync)."""
    if reduction == "none":
        return loss.reshape(shape)
    if reduction == "sum":
        return loss.sum()
    return loss.sum() / kept.sum().clamp_min(1).to(loss.dtype)


def vocab_parallel_cross_entropy(
    logits_shard: Tensor,
    labels: Tensor,
    *,
    vocab_start: int,
    group=None,
    ignore_index: int = -100,
    label_smoothing: float = 0.0,
    reduction: str = "mean",
    vocab_size: Optional[int] = None,
    check_ranks: bool = True,
) -> Tensor:
    """The SFT cross-entropy of vocab-parallel logits (Megatron's vocab-parallel cross-entropy).

    Args:
        logits_shard, labels, vocab_start, group, ignore_index, vocab_size, check_ranks: as in
            :func:`vocab_parallel_token_logprobs` (labels ``(...)``, global token ids).
        label_smoothing: ``eps`` in ``[0, 1]``, as ``torch.nn.functional.cross_entropy`` defines
            it, spread over the full vocabulary ``V`` (the sum of the shards' widths).
        reduction: ``"mean"`` (over non-ignored rows; 0 when every row is ignored), ``"sum"``, or
            ``"none"`` (fp32 loss per row, the shape of ``labels``, 0 for ignored rows).

    Returns:
        fp32, identical on every rank; differentiable with respect to ``logits_shard``.

    Per row, with ``lse = log sum_j exp(x_j)`` over the full vocabulary::

        loss = (1 - eps) (lse - x[y]) + eps (lse - (1/V) sum_j x_j)

    Communication: the argument handshake, one MAX all-reduce ``(N,)`` and one SUM all-reduce
    ``(N, 2)`` (``(N, 3)`` with label smoothing) fp32; none in the backward, where
    ``d loss / d x_j = p_j - (1 - eps) [j == y] - eps / V`` is local to the shard.
    """
    fn = "vocab_parallel_cross_entropy"

    def check_local() -> LocalArgs:
        start, width = check_shard_and_labels("logits_shard", logits_shard, labels, vocab_start, ignore_index)
        V.check_choice("reduction", reduction, REDUCTIONS)
        eps = V.check_range("label_smoothing", label_smoothing, 0.0, 1.0, hi_inclusive=True)
        return LocalArgs(start, width, labels.numel(), labels, ignore_index,
                         (ignore_index, eps, REDUCTIONS.index(reduction)))

    shards = agree_on_shards(fn, group, device_of(logits_shard), check_local,
                             ("ignore_index", "label_smoothing", "reduction"), vocab_size, check_ranks)
    labels1d = labels.reshape(-1).to(torch.int64)
    loss = _VocabParallelCrossEntropyRows.apply(
        _rows(logits_shard), labels1d, shards, int(ignore_index), float(label_smoothing),
        chunk_rows_for(shards.width, logits_shard.device))
    return reduce_rows(loss, labels1d != ignore_index, reduction, labels.shape)
