"""Fused-linear vocab-parallel heads: token log-probs, entropy and cross-entropy from the hidden
states and this rank's rows of the head weight, without the logits in memory.

Every rank holds the same hidden states ``(N, H)`` (replicated, as they enter a column-parallel
output layer) and the rows ``[vocab_start, vocab_start + V_r)`` of the head weight ``(V, H)``.
Rows (tokens) are processed in chunks, as ``linear_token_logprobs`` does: a chunk's shard logits
``hidden_c @ weight_shard.T (+ bias_shard)`` exist only while the chunk is reduced to per-row
partials (``shard_softmax.ShardRowPartials``), so the extra memory is O(chunk x V_r). After the
last chunk the ranks merge the partials (one MAX and one SUM all-reduce for the whole batch), and
the backward recomputes each chunk's shard logits.

Gradients: the weight and bias shards' are local (fp32 accumulators across chunks); the hidden
states' is a sum over the shards, ``sum_r g_r @ weight_r``, so each rank computes its term in fp32
and the backward all-reduces it (SUM, ``(N, H)`` fp32) -- the backward of Megatron's "copy to
tensor-parallel region".
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

from .. import _validation as V
from ..api.linear_token_logprobs import _autocast_inputs
from ..ops.linear_head import _Head, accumulate_product
from .process_group import LocalArgs, VocabShards, agree_on_shards, check_vocab_start
from .shard_softmax import (ShardRowPartials, cross_entropy_logits_grad, cross_entropy_rows,
                            local_label_index, merge_over_shards, token_logprobs_logits_grad)
from .vocab_parallel import REDUCTIONS, chunk_rows_for, device_of, reduce_rows

_F32 = torch.float32


def _check_linear_local(hidden, weight_shard, bias_shard, labels, vocab_start, ignore_index,
                        chunk_size) -> Tuple[int, int]:
    """Local checks of the fused-linear variants: ``(vocab_start, V_r)``."""
    vocab_start = check_vocab_start(vocab_start)
    V.check_tensor("hidden", hidden, ndim_min=1)
    V.check_tensor("weight_shard", weight_shard)
    V.check_tensor("labels", labels)
    V.check_float("hidden", hidden)
    V.check_float("weight_shard", weight_shard)
    V.check_integer("labels", labels)
    if weight_shard.dim() != 2 or weight_shard.shape[0] < 1:
        raise ValueError(f"weight_shard: expected shape (V_r, H) with V_r >= 1 (this rank's rows of the "
                         f"(V, H) head weight), got {tuple(weight_shard.shape)}")
    width, h = weight_shard.shape
    if hidden.shape[-1] != h:
        raise ValueError(f"hidden: expected last dimension {h} (weight_shard is {tuple(weight_shard.shape)}), "
                         f"got shape {tuple(hidden.shape)}")
    if bias_shard is not None:
        V.check_tensor("bias_shard", bias_shard)
        V.check_float("bias_shard", bias_shard)
        if tuple(bias_shard.shape) != (width,):
            raise ValueError(f"bias_shard: expected shape ({width},) (this rank's entries of the (V,) bias), "
                             f"got {tuple(bias_shard.shape)}")
    if tuple(labels.shape) != tuple(hidden.shape[:-1]):
        raise ValueError(f"labels: expected shape {tuple(hidden.shape[:-1])} (one global token id per row of "
                         f"hidden {tuple(hidden.shape)}), got {tuple(labels.shape)}")
    V.check_same_device(hidden=hidden, weight_shard=weight_shard, labels=labels, bias_shard=bias_shard)
    if not torch.is_autocast_enabled(hidden.device.type) and hidden.dtype != weight_shard.dtype:
        raise TypeError(f"hidden: expected the dtype of weight_shard ({weight_shard.dtype}) outside "
                        f"torch.autocast, got {hidden.dtype}")
    if isinstance(ignore_index, bool) or not isinstance(ignore_index, int):
        raise TypeError(f"ignore_index: expected an int, got {type(ignore_index).__name__}")
    if chunk_size is not None and (isinstance(chunk_size, bool) or not isinstance(chunk_size, int)
                                   or chunk_size < 1):
        raise ValueError(f"chunk_size: expected a positive integer or None, got {chunk_size!r}")
    return vocab_start, width


def _chunks(n: int, chunk: int):
    return [slice(s, min(s + chunk, n)) for s in range(0, n, chunk)]


def _shard_forward(hidden, head: _Head, labels, shards: VocabShards, ignore_index, inv_t, chunk,
                   entropy: bool, sum_logits: bool):
    """One pass over the head shard in token chunks, then the merge over the ranks."""
    n = hidden.shape[0]
    local_y = local_label_index(labels, ignore_index, shards.vocab_start, shards.width)
    part = ShardRowPartials(n, hidden.device, entropy=entropy, sum_logits=sum_logits)
    for sl in _chunks(n, chunk):
        z = head.logits(hidden[sl]).float()
        part.add_chunk(sl, z * inv_t if inv_t != 1.0 else z, local_y[sl])
        del z
    return merge_over_shards(part, shards), local_y, labels != ignore_index


def _grad_hidden_fp32(acc: Tensor, g: Tensor, head: _Head) -> None:
    """``acc (rows, H) fp32 = g (rows, V_r) fp32 @ weight_shard``, accumulated in fp32."""
    w = head.weight
    if w.dtype == _F32:
        torch.mm(g, w, out=acc)
    elif w.is_cuda:
        acc.zero_()
        accumulate_product(acc, g.to(w.dtype), w)  # bf16/fp16 GEMM with an fp32 accumulator
    else:  # CPU: fp32 GEMMs, the weight upcast one block of rows at a time (no (V_r, H) fp32 copy)
        acc.zero_()
        for vb in head.blocks:
            acc.addmm_(g[:, vb], w[vb].float())


def _shard_backward(hidden, weight, bias, head: _Head, chunk, need, shards: VocabShards, logits_grad):
    """Gradients of hidden (all-reduced over the ranks), weight_shard and bias_shard (local), from
    ``logits_grad(z_fp32, rows)`` = d loss / d (chunk logits) fp32."""
    need_h, need_w, need_b = need
    n = hidden.shape[0]
    f32 = dict(dtype=_F32, device=hidden.device)
    gh = torch.empty((n, hidden.shape[1]), **f32) if need_h else None
    gw = torch.zeros(weight.shape, **f32) if need_w else None
    gb = torch.zeros(weight.shape[0], **f32) if (need_b and bias is not None) else None
    if need_h or need_w or gb is not None:
        for sl in _chunks(n, chunk):
            h = hidden[sl]
            g = logits_grad(head.logits(h).float(), sl)
            if gh is not None:
                _grad_hidden_fp32(gh[sl], g, head)
            if gw is not None:
                head.grad_weight(gw, g, h)
            if gb is not None:
                gb += g.sum(0)
            del g
    if gh is not None:
        # d loss / d hidden = sum over the ranks of each shard's term (hidden is replicated)
        gh = shards.all_reduce_sum(gh).to(hidden.dtype)
    return (gh, None if gw is None else gw.to(weight.dtype), None if gb is None else gb.to(bias.dtype))


class _VocabParallelLinearTokenLogprobs(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, bias, labels, shards: VocabShards, inv_t, ignore_index,
                want_entropy, chunk, fp32_logits):
        head = _Head(weight, bias, fp32_logits, 1.0)
        stats, local_y, kept = _shard_forward(hidden, head, labels, shards, ignore_index, inv_t, chunk,
                                              want_entropy, False)
        zero = torch.zeros_like(stats.lse)
        logp = torch.where(kept, stats.target - stats.lse, zero)
        entropy = torch.where(kept, stats.entropy, zero) if want_entropy else stats.lse.new_empty(0)
        ctx.save_for_backward(hidden, weight, bias, local_y, kept, stats.lse, entropy)
        ctx.args = (shards, inv_t, want_entropy, chunk, fp32_logits)
        if not want_entropy:
            ctx.mark_non_differentiable(entropy)
        return logp, entropy

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_logp, grad_entropy):
        hidden, weight, bias, local_y, kept, lse, entropy = ctx.saved_tensors
        shards, inv_t, want_entropy, chunk, fp32_logits = ctx.args
        grad_logp = torch.zeros_like(lse) if grad_logp is None else grad_logp.float()
        grad_entropy = grad_entropy.float() if (want_entropy and grad_entropy is not None) else None

        def logits_grad(z, sl):
            return token_logprobs_logits_grad(
                z * inv_t, local_y[sl], kept[sl], lse[sl], None if grad_entropy is None else entropy[sl],
                grad_logp[sl], None if grad_entropy is None else grad_entropy[sl], inv_t)
        head = _Head(weight, bias, fp32_logits, 1.0)
        grads = _shard_backward(hidden, weight, bias, head, chunk, ctx.needs_input_grad[:3], shards,
                                logits_grad)
        return grads + (None,) * 7


class _VocabParallelLinearCrossEntropyRows(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, bias, labels, shards: VocabShards, ignore_index, eps, chunk,
                fp32_logits):
        head = _Head(weight, bias, fp32_logits, 1.0)
        stats, local_y, kept = _shard_forward(hidden, head, labels, shards, ignore_index, 1.0, chunk,
                                              False, eps > 0)
        ctx.save_for_backward(hidden, weight, bias, local_y, kept, stats.lse)
        ctx.args = (shards, eps, chunk, fp32_logits)
        return cross_entropy_rows(stats, kept, eps, shards.vocab_size)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_loss):
        hidden, weight, bias, local_y, kept, lse = ctx.saved_tensors
        shards, eps, chunk, fp32_logits = ctx.args
        grad_loss = grad_loss.float()

        def logits_grad(z, sl):
            return cross_entropy_logits_grad(z, local_y[sl], kept[sl], lse[sl], grad_loss[sl], eps,
                                             shards.vocab_size)
        head = _Head(weight, bias, fp32_logits, 1.0)
        grads = _shard_backward(hidden, weight, bias, head, chunk, ctx.needs_input_grad[:3], shards,
                                logits_grad)
        return grads + (None,) * 6


def _prepare(fn, hidden, weight_shard, bias_shard, labels, vocab_start, group, ignore_index,
             chunk_size, fp32_logits, param_names, vocab_size, extra_checks, check_ranks=True):
    """Local checks (``extra_checks()`` returns the function's own checked scalar arguments, named
    ``param_names``), the handshake, autocast, and the 2-D views:
    ``(shards, hidden2d, weight, bias, labels1d, chunk)``."""
    def check_local() -> LocalArgs:
        start, width = _check_linear_local(hidden, weight_shard, bias_shard, labels, vocab_start,
                                           ignore_index, chunk_size)
        checked = extra_checks()
        # H must agree (the backward all-reduces (N, H)); fp32_logits only changes the numbers, but
        # the ranks must compute the same ones
        common = (ignore_index, hidden.shape[-1], float(bool(fp32_logits)))
        return LocalArgs(start, width, labels.numel(), labels, ignore_index, common + checked)

    shards = agree_on_shards(fn, group, device_of(hidden), check_local,
                             ("ignore_index", "hidden (its last dimension H)", "fp32_logits") + param_names,
                             vocab_size, check_ranks)
    # dtypes were checked above (check_local): this casts under autocast only
    hidden, weight, bias = _autocast_inputs(hidden, weight_shard, bias_shard)
    chunk = chunk_size or chunk_rows_for(shards.width, hidden.device)
    return (shards, hidden.reshape(-1, hidden.shape[-1]), weight, bias,
            labels.reshape(-1).to(torch.int64), chunk)


def vocab_parallel_linear_token_logprobs(
    hidden: Tensor,
    weight_shard: Tensor,
    labels: Tensor,
    *,
    vocab_start: int,
    group=None,
    bias_shard: Optional[Tensor] = None,
    temperature: float = 1.0,
    ignore_index: int = -100,
    return_entropy: bool = False,
    chunk_size: Optional[int] = None,
    fp32_logits: bool = False,
    vocab_size: Optional[int] = None,
    check_ranks: bool = True,
) -> Tuple[Tensor, Optional[Tensor]]:
    """Token log-probs (and entropy) of a vocab-parallel head ``hidden @ weight.T + bias``, without
    the logits in memory: :func:`vocab_parallel_token_logprobs` fused with the head matmul.

    Args:
        hidden: ``(..., H)`` float32 / bfloat16 / float16, the same on every rank (replicated).
        weight_shard: ``(V_r, H)``, this rank's rows ``[vocab_start, vocab_start + V_r)`` of the head
            weight ``(V, H)``; same dtype as ``hidden`` (outside ``torch.autocast``).
        labels: ``(...)`` integer global token ids in ``[0, V)`` or ``ignore_index``, replicated.
        vocab_start, group, vocab_size, check_ranks: as in :func:`vocab_parallel_token_logprobs`.
        bias_shard: optional ``(V_r,)``, this rank's entries of the bias.
        temperature, ignore_index, return_entropy: as in :func:`vocab_parallel_token_logprobs`.
        chunk_size: rows per chunk (default: from the package's chunk memory budget,
            ``POSTTRAIN_KERNELS_CHUNK_BYTES``).
        fp32_logits: the head matmul in fp32 for bf16/fp16 inputs, as ``linear_token_logprobs``.

    Returns:
        ``(logp, entropy)`` fp32 of the shape of ``labels`` (entropy ``None`` unless asked), equal on
        every rank to ``token_logprobs(hidden @ weight.T + bias, labels, ...)`` of the full head;
        differentiable in ``hidden``, ``weight_shard`` and ``bias_shard`` with any (replicated)
        upstream gradient. Every rank must run the backward (it all-reduces).

    Communication: the argument handshake; one MAX all-reduce ``(N,)`` and one SUM all-reduce
    ``(N, 2)`` (``(N, 3)`` with entropy) fp32 in the forward; one SUM all-reduce of the hidden
    gradient ``(N, H)`` fp32 in the backward (when ``hidden`` requires grad). The weight and bias
    gradients are the shard's own, accumulated in fp32 over the token chunks.
    """
    def extra():
        return (V.check_positive("temperature", temperature), float(bool(return_entropy)))

    shards, h2d, weight, bias, labels1d, chunk = _prepare(
        "vocab_parallel_linear_token_logprobs", hidden, weight_shard, bias_shard, labels, vocab_start,
        group, ignore_index, chunk_size, fp32_logits, ("temperature", "return_entropy"), vocab_size, extra,
        check_ranks)
    with torch.autocast(h2d.device.type, enabled=False):
        logp, entropy = _VocabParallelLinearTokenLogprobs.apply(
            h2d, weight, bias, labels1d, shards, 1.0 / float(temperature), int(ignore_index),
            bool(return_entropy), chunk, bool(fp32_logits))
    return logp.reshape(labels.shape), (entropy.reshape(labels.shape) if return_entropy else None)


def vocab_parallel_linear_cross_entropy(
    hidden: Tensor,
    weight_shard: Tensor,
    labels: Tensor,
    *,
    vocab_start: int,
    group=None,
    bias_shard: Optional[Tensor] = None,
    ignore_index: int = -100,
    label_smoothing: float = 0.0,
    reduction: str = "mean",
    chunk_size: Optional[int] = None,
    fp32_logits: bool = False,
    vocab_size: Optional[int] = None,
    check_ranks: bool = True,
) -> Tensor:
    """The SFT cross-entropy of a vocab-parallel head, without the logits in memory:
    :func:`vocab_parallel_cross_entropy` fused with the head matmul.

    Arguments as :func:`vocab_parallel_linear_token_logprobs` and
    :func:`vocab_parallel_cross_entropy` (``label_smoothing`` over the full vocabulary,
    ``reduction`` ``"mean"`` over the non-ignored rows (0 when all are ignored) / ``"sum"`` /
    ``"none"``). Equal on every rank to ``cross_entropy(hidden @ weight.T + bias, labels, ...)`` of
    the full head. Returns fp32. Communication: the handshake, one MAX all-reduce ``(N,)`` and one
    SUM all-reduce ``(N, 2)`` (``(N, 3)`` with label smoothing) in the forward, one SUM all-reduce
    of the ``(N, H)`` fp32 hidden gradient in the backward.
    """
    def extra():
        V.check_choice("reduction", reduction, REDUCTIONS)
        eps = V.check_range("label_smoothing", label_smoothing, 0.0, 1.0, hi_inclusive=True)
        return (eps, float(REDUCTIONS.index(reduction)))

    shards, h2d, weight, bias, labels1d, chunk = _prepare(
        "vocab_parallel_linear_cross_entropy", hidden, weight_shard, bias_shard, labels, vocab_start,
        group, ignore_index, chunk_size, fp32_logits, ("label_smoothing", "reduction"), vocab_size, extra,
        check_ranks)
    with torch.autocast(h2d.device.type, enabled=False):
        loss = _VocabParallelLinearCrossEntropyRows.apply(
            h2d, weight, bias, labels1d, shards, int(ignore_index), float(label_smoothing), chunk,
            bool(fp32_logits))
    return reduce_rows(loss, labels1d != ignore_index, reduction, labels.shape)
