"""Autograd of the fused-linear token log-prob family: the head matmul and the loss, chunk by chunk.

Rows (tokens) are processed in chunks: a chunk's logits ``hidden_c @ weight.T (+ bias)`` exist only
while that chunk is processed, so the extra memory is O(chunk x vocab), never O(tokens x vocab).
The per-chunk losses and logits gradients come from the custom ops of the logits family
(``posttrain_kernels::token_logprobs_forward`` etc., opaque to ``torch.compile``); the gradients are
written in place over the chunk's own logits buffer (the ``*_`` in-place ops), so a chunk holds one
``rows x V`` buffer; the gradient matmuls accumulate the weight gradient in fp32 across chunks,
straight into the accumulator (``addmm_``). A bf16/fp16 head whose gradient is wanted runs its
backward over vocabulary blocks instead (``linear_vocab_blocks``): no ``(V, H)`` fp32 accumulator.

* ``LinearTokenLogprobs``: any upstream gradient, so the forward keeps O(tokens) state (lse,
  entropy) and the backward recomputes each chunk's logits (four matmuls in all).
* ``LinearCrossEntropyRows``: per-row losses; forward keeps the lse, backward recomputes.
* ``LinearCrossEntropyScalar``: ``reduction="mean"|"sum"`` of an fp32 (or frozen) head; the
  gradients are computed during the forward (three matmuls in all) and the backward only scales
  them by the upstream scalar.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import Tensor

from . import token_logprobs as chunk_ops
from .linear_head import (_F32, _chain_scale, _Grads, _Head, _softcapped,  # noqa: F401 (re-exported)
                          cpu_has_fast_low_precision_gemm, forward_chunk_rows, logits_element_size,
                          use_vocab_blocks, vocab_tile)
from .linear_vocab_blocks import IGNORED, vocab_blocked_backward
from .token_logprobs import upstream_grads

def _token_logprobs_tile_grad(lse, entropy, grad_logp, grad_entropy, inv_t, softcap, logit_scale,
                              ignore_index, backend):
    """The tile gradient of the log-probs (and entropy): over the logits of token rows ``t``
    (all columns, or a block of them with block-shifted labels)."""
    def tile_grad(z: Tensor, labels: Tensor, t: slice) -> Tensor:
        x = _softcapped(z, softcap)
        del z  # (a new buffer only with soft-capping)
        # d c tanh(z / c) / dz = 1 - (x / c)^2, taken before x is overwritten by its gradient
        dcap = 1.0 - (x.float() / softcap).square_() if softcap > 0 else None
        chunk_ops.token_logprobs_backward_(
            x, labels, lse[t], entropy[t] if grad_entropy is not None else entropy,
            None if grad_logp is None else grad_logp[t],
            None if grad_entropy is None else grad_entropy[t], inv_t, ignore_index, backend)
        g = x if dcap is None else dcap.mul_(x)
        return _chain_scale(g, logit_scale)
    return tile_grad


def _cross_entropy_tile_grad(lse, grad_loss, eps, z_loss, softcap, logit_scale, vocab,
                             ignore_index, backend):
    """The tile gradient of the per-row cross-entropy (``grad_loss`` the rows' upstream
    gradients); ``vocab`` is the full row width, over which label smoothing spreads."""
    def tile_grad(z: Tensor, labels: Tensor, t: slice) -> Tensor:
        chunk_ops.cross_entropy_backward_(z, labels, lse[t], grad_loss[t], ignore_index, eps,
                                          z_loss, softcap, backend, vocab)
        return _chain_scale(z, logit_scale)
    return tile_grad


def _backward(hidden, weight, bias, labels, ignore_index, need, head, chunk, tile, make_tile_grad):
    """The gradients of hidden, weight and bias: by token chunks (each chunk's logits recomputed
    whole), or by vocabulary blocks for a bf16/fp16 head whose gradient is wanted (see
    ``linear_vocab_blocks``). ``make_tile_grad(ignore_index)`` gives the loss's tile gradient."""
    if use_vocab_blocks(weight, need[1]):
        return vocab_blocked_backward(hidden, head, labels, ignore_index, need,
                                      make_tile_grad(IGNORED), tile[0], tile[1])
    grads = _Grads(hidden, weight, bias, need)
    tile_grad = make_tile_grad(ignore_index)
    n = labels.shape[0]
    for s in range(0, n, chunk):
        sl = slice(s, min(s + chunk, n))
        h = hidden[sl]
        grads.add_chunk(sl, tile_grad(head.logits(h), labels[sl], sl), h, head)
    return grads.result(weight, bias)


class LinearTokenLogprobs(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, bias, labels, inv_t, ignore_index, compute_entropy, softcap,
                logit_scale, chunk, tile_rows, tile_cols, fp32_logits, backend, chunk_hook=None):
        # chunk_hook(x, rows, lse_rows): called with each chunk's soft-capped logits (before the
        # temperature) while they exist, for per-row statistics without gradient (the TRL
        # integration's argmax, mean logit, sum of squared probabilities); it must not write x.
        n, k = labels.shape
        f32 = dict(device=hidden.device, dtype=_F32)
        logp = torch.empty((n, k), **f32)
        entropy = torch.empty((n if compute_entropy else 0,), **f32)
        lse = torch.empty((n,), **f32)
        head = _Head(weight, bias, fp32_logits, logit_scale)
        for s in range(0, n, chunk):
            sl = slice(s, min(s + chunk, n))
            x = _softcapped(head.logits(hidden[sl]), softcap)
            lp, ent, l = chunk_ops.token_logprobs_forward(x, labels[sl], inv_t, ignore_index,
                                                          compute_entropy, backend)
            logp[sl], lse[sl] = lp, l
            if compute_entropy:
                entropy[sl] = ent
            if chunk_hook is not None:
                chunk_hook(x, sl, l)
            del x
        ctx.save_for_backward(hidden, weight, bias, labels, lse, entropy)
        ctx.args = (inv_t, ignore_index, compute_entropy, softcap, logit_scale, chunk,
                    (tile_rows, tile_cols), fp32_logits, backend)
        ctx.mark_non_differentiable(lse)
        return logp, entropy, lse

    @staticmethod
    def backward(ctx, grad_logp, grad_entropy, _grad_lse):
        hidden, weight, bias, labels, lse, entropy = ctx.saved_tensors
        inv_t, ignore_index, compute_entropy, softcap, logit_scale, chunk, tile, fp32_logits, backend = ctx.args
        grad_logp, grad_entropy = upstream_grads(grad_logp, grad_entropy, compute_entropy)
        head = _Head(weight, bias, fp32_logits, logit_scale)

        def make_tile_grad(ignore):
            return _token_logprobs_tile_grad(lse, entropy, grad_logp, grad_entropy, inv_t, softcap,
                                             logit_scale, ignore, backend)
        gh, gw, gb = _backward(hidden, weight, bias, labels, ignore_index, ctx.needs_input_grad[:3],
                               head, chunk, tile, make_tile_grad)
        return (gh, gw, gb) + (None,) * 12


class LinearCrossEntropyRows(torch.autograd.Function):
    """Per-row cross-entropy (``reduction="none"``, and the scalar reductions of a bf16/fp16 head
    whose gradient is wanted): forward keeps lse, backward recomputes."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, labels, ignore_index, eps, z_loss, softcap, logit_scale,
                chunk, tile_rows, tile_cols, fp32_logits, backend):
        n = labels.shape[0]
        loss = torch.empty((n,), device=hidden.device, dtype=_F32)
        lse = torch.empty((n,), device=hidden.device, dtype=_F32)
        head = _Head(weight, bias, fp32_logits, logit_scale)
        for s in range(0, n, chunk):
            sl = slice(s, min(s + chunk, n))
            z = head.logits(hidden[sl])
            loss[sl], lse[sl] = chunk_ops.cross_entropy_forward(z, labels[sl], ignore_index, eps,
                                                                z_loss, softcap, backend)
            del z
        ctx.save_for_backward(hidden, weight, bias, labels, lse)
        ctx.args = (ignore_index, eps, z_loss, softcap, logit_scale, chunk, (tile_rows, tile_cols),
                    fp32_logits, backend)
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        hidden, weight, bias, labels, lse = ctx.saved_tensors
        ignore_index, eps, z_loss, softcap, logit_scale, chunk, tile, fp32_logits, backend = ctx.args
        grad_loss = grad_loss.to(_F32).contiguous()
        head = _Head(weight, bias, fp32_logits, logit_scale)
        vocab = weight.shape[0]

        def make_tile_grad(ignore):
            return _cross_entropy_tile_grad(lse, grad_loss, eps, z_loss, softcap, logit_scale,
                                            vocab, ignore, backend)
        gh, gw, gb = _backward(hidden, weight, bias, labels, ignore_index, ctx.needs_input_grad[:3],
                               head, chunk, tile, make_tile_grad)
        return (gh, gw, gb) + (None,) * 11


class LinearCrossEntropyScalar(torch.autograd.Function):
    """``reduction="mean"|"sum"``: gradients computed in the forward (three matmuls in all).
    Only for heads that accumulate their gradient in place (fp32, or no weight gradient): a
    bf16/fp16 head whose gradient is wanted goes through ``LinearCrossEntropyRows``."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, labels, ignore_index, eps, z_loss, softcap, logit_scale,
                chunk, fp32_logits, mean, grad_enabled, backend):
        n = labels.shape[0]
        total = torch.zeros((), device=hidden.device, dtype=_F32)
        # d total / d loss_row: 1 for "sum", 1 / (number of non-ignored rows) for "mean" (0 rows:
        # every row is ignored, loss 0, gradients 0); computed on the device, no host sync.
        if mean:
            scale = 1.0 / (labels != ignore_index).sum().clamp_min(1).to(_F32)
        else:
            scale = torch.ones((), device=hidden.device, dtype=_F32)
        row_grad = scale.expand(n).contiguous()
        # grad mode is off inside forward: the caller says whether gradients will be wanted
        needs = tuple(bool(grad_enabled and x) for x in ctx.needs_input_grad[:3])
        grads = _Grads(hidden, weight, bias, needs) if any(needs) else None
        head = _Head(weight, bias, fp32_logits, logit_scale)
        for s in range(0, n, chunk):
            sl = slice(s, min(s + chunk, n))
            h = hidden[sl]
            z = head.logits(h)
            if grads is None:
                loss, _ = chunk_ops.cross_entropy_forward(z, labels[sl], ignore_index, eps, z_loss,
                                                          softcap, backend)
            else:
                # loss and logits gradient in one pass, the gradient written over z
                loss, _ = chunk_ops.cross_entropy_fused_(z, labels[sl], row_grad[sl], ignore_index,
                                                         eps, z_loss, softcap, backend)
                grads.add_chunk(sl, _chain_scale(z, logit_scale), h, head)
            total += loss.sum()
            del z
        if grads is not None:
            gh, gw, gb = grads.result(weight, bias)
            ctx.save_for_backward(gh, gw, gb)
        else:
            ctx.save_for_backward(None, None, None)
        return total * scale

    @staticmethod
    def backward(ctx, grad_out):
        gh, gw, gb = ctx.saved_tensors
        # Scaled in place: they are this node's own buffers, and a copy would double the memory of
        # the gradients. A second backward through the same graph (retain_graph=True) then fails
        # with PyTorch's "modified by an inplace operation" error instead of using scaled values.
        for g in (gh, gw, gb):
            if g is not None:
                g.mul_(grad_out)
        return (gh, gw, gb, None, None, None, None, None, None, None, None, None, None, None)
