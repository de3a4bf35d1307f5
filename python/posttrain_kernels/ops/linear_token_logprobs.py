"""Autograd of the fused-linear token log-prob family: the head matmul and the loss, chunk by chunk.

Rows (tokens) are processed in chunks: a chunk's logits ``hidden_c @ weight.T (+ bias)`` exist only
while that chunk is processed, so the extra memory is O(chunk x vocab), never O(tokens x vocab).
The per-chunk losses and logits gradients come from the custom ops of the logits family
(``posttrain_kernels::token_logprobs_forward`` etc., opaque to ``torch.compile``); the gradient matmuls accumulate the weight gradient in
fp32 across chunks.

* ``LinearTokenLogprobs``: any upstream gradient, so the forward keeps O(tokens) state (lse,
  entropy) and the backward recomputes each chunk's logits (four matmuls in all).
* ``LinearCrossEntropyScalar``: ``reduction="mean"|"sum"``; the gradients are computed during the
  forward (three matmuls in all) and the backward only scales them by the upstream scalar.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import Tensor

from . import token_logprobs as chunk_ops
from .token_logprobs import upstream_grads

_F32 = torch.float32


def _chunk_logits(h: Tensor, weight: Tensor, bias: Optional[Tensor], fp32_logits: bool,
                  logit_scale: float) -> Tensor:
    """``logit_scale * (h @ weight.T + bias)`` for one chunk (a new buffer owned by the caller)."""
    if fp32_logits:
        h, weight = h.float(), weight.float()
        bias = None if bias is None else bias.float()
    z = torch.nn.functional.linear(h, weight, None if bias is None else bias.to(h.dtype))
    if logit_scale != 1.0:
        z.mul_(logit_scale)
    return z


def _softcapped(z: Tensor, softcap: float) -> Tensor:
    return z if softcap <= 0 else torch.tanh(z.float() / softcap).mul_(softcap).to(z.dtype)


class _Grads:
    """Accumulators of the three parameter gradients (fp32 for weight and bias)."""

    def __init__(self, hidden: Tensor, weight: Tensor, bias: Optional[Tensor], need: Tuple[bool, bool, bool]):
        self.need_h, self.need_w, self.need_b = need
        self.hidden = torch.empty_like(hidden) if self.need_h else None
        self.weight = torch.zeros(weight.shape, dtype=_F32, device=weight.device) if self.need_w else None
        self.bias = torch.zeros(weight.shape[0], dtype=_F32, device=weight.device) if (self.need_b and bias is not None) else None

    def add_chunk(self, sl: slice, g_logits: Tensor, h: Tensor, weight: Tensor) -> None:
        """g_logits [rows_c, V] = d loss / d (h @ weight.T + bias) for the chunk rows ``sl``."""
        if self.need_h:
            self.hidden[sl] = (g_logits.to(weight.dtype) @ weight).to(self.hidden.dtype)
        if self.need_w:
            # bf16 products are rounded once per chunk; the sum across chunks is fp32
            self.weight.add_((g_logits.t().to(h.dtype) @ h).to(_F32))
        if self.bias is not None:
            self.bias.add_(g_logits.sum(0, dtype=_F32))

    def result(self, weight: Tensor, bias: Optional[Tensor]):
        gw = None if self.weight is None else self.weight.to(weight.dtype)
        gb = None if self.bias is None else self.bias.to(bias.dtype)
        return self.hidden, gw, gb


def _chain(g: Tensor, x: Tensor, softcap: float, logit_scale: float) -> Tensor:
    """From d/dx (x the soft-capped logits) to d/d(h @ W.T + b), in place on g (our buffer)."""
    if softcap > 0:
        t = x.float() / softcap
        g = g.float().mul_(1.0 - t * t)
    if logit_scale != 1.0:
        g = g.mul_(logit_scale)
    return g


class LinearTokenLogprobs(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, bias, labels, inv_t, ignore_index, compute_entropy, softcap,
                logit_scale, chunk, fp32_logits, backend):
        n, k = labels.shape
        f32 = dict(device=hidden.device, dtype=_F32)
        logp = torch.empty((n, k), **f32)
        entropy = torch.empty((n if compute_entropy else 0,), **f32)
        lse = torch.empty((n,), **f32)
        for s in range(0, n, chunk):
            sl = slice(s, min(s + chunk, n))
            x = _softcapped(_chunk_logits(hidden[sl], weight, bias, fp32_logits, logit_scale), softcap)
            lp, ent, l = chunk_ops.token_logprobs_forward(x, labels[sl], inv_t, ignore_index,
                                                              compute_entropy, backend)
            logp[sl], lse[sl] = lp, l
            if compute_entropy:
                entropy[sl] = ent
            del x
        ctx.save_for_backward(hidden, weight, bias, labels, lse, entropy)
        ctx.args = (inv_t, ignore_index, compute_entropy, softcap, logit_scale, chunk, fp32_logits, backend)
        ctx.mark_non_differentiable(lse)
        return logp, entropy, lse

    @staticmethod
    def backward(ctx, grad_logp, grad_entropy, _grad_lse):
        hidden, weight, bias, labels, lse, entropy = ctx.saved_tensors
        inv_t, ignore_index, compute_entropy, softcap, logit_scale, chunk, fp32_logits, backend = ctx.args
        need = ctx.needs_input_grad[:3]
        grads = _Grads(hidden, weight, bias, need)
        grad_logp, grad_entropy = upstream_grads(grad_logp, grad_entropy, compute_entropy)
        n = labels.shape[0]
        for s in range(0, n, chunk):
            sl = slice(s, min(s + chunk, n))
            h = hidden[sl]
            x = _softcapped(_chunk_logits(h, weight, bias, fp32_logits, logit_scale), softcap)
            g = chunk_ops.token_logprobs_backward(
                x, labels[sl], lse[sl], entropy[sl] if grad_entropy is not None else entropy,
                None if grad_logp is None else grad_logp[sl],
                None if grad_entropy is None else grad_entropy[sl], inv_t, ignore_index, backend)
            g = _chain(g, x, softcap, logit_scale)
            del x
            grads.add_chunk(sl, g, h, weight)
        gh, gw, gb = grads.result(weight, bias)
        return gh, gw, gb, None, None, None, None, None, None, None, None, None


class LinearCrossEntropyRows(torch.autograd.Function):
    """Per-row cross-entropy (``reduction="none"``): forward keeps lse, backward recomputes."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, labels, ignore_index, eps, z_loss, softcap, logit_scale,
                chunk, fp32_logits, backend):
        n = labels.shape[0]
        loss = torch.empty((n,), device=hidden.device, dtype=_F32)
        lse = torch.empty((n,), device=hidden.device, dtype=_F32)
        for s in range(0, n, chunk):
            sl = slice(s, min(s + chunk, n))
            z = _chunk_logits(hidden[sl], weight, bias, fp32_logits, logit_scale)
            loss[sl], lse[sl] = chunk_ops.cross_entropy_forward(z, labels[sl], ignore_index, eps,
                                                                z_loss, softcap, backend)
            del z
        ctx.save_for_backward(hidden, weight, bias, labels, lse)
        ctx.args = (ignore_index, eps, z_loss, softcap, logit_scale, chunk, fp32_logits, backend)
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        hidden, weight, bias, labels, lse = ctx.saved_tensors
        ignore_index, eps, z_loss, softcap, logit_scale, chunk, fp32_logits, backend = ctx.args
        grads = _Grads(hidden, weight, bias, ctx.needs_input_grad[:3])
        grad_loss = grad_loss.to(_F32).contiguous()
        n = labels.shape[0]
        for s in range(0, n, chunk):
            sl = slice(s, min(s + chunk, n))
            h = hidden[sl]
            z = _chunk_logits(h, weight, bias, fp32_logits, logit_scale)
            g = chunk_ops.cross_entropy_backward(z, labels[sl], lse[sl], grad_loss[sl], ignore_index,
                                                 eps, z_loss, softcap, backend)
            del z
            grads.add_chunk(sl, _chain(g, g, 0.0, logit_scale), h, weight)
        gh, gw, gb = grads.result(weight, bias)
        return gh, gw, gb, None, None, None, None, None, None, None, None, None


class LinearCrossEntropyScalar(torch.autograd.Function):
    """``reduction="mean"|"sum"``: gradients computed in the forward (three matmuls in all)."""

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
        for s in range(0, n, chunk):
            sl = slice(s, min(s + chunk, n))
            h = hidden[sl]
            z = _chunk_logits(h, weight, bias, fp32_logits, logit_scale)
            loss, lse = chunk_ops.cross_entropy_forward(z, labels[sl], ignore_index, eps, z_loss,
                                                        softcap, backend)
            total += loss.sum()
            if grads is not None:
                g = chunk_ops.cross_entropy_backward(z, labels[sl], lse, row_grad[sl], ignore_index,
                                                     eps, z_loss, softcap, backend)
                del z
                grads.add_chunk(sl, _chain(g, g, 0.0, logit_scale), h, weight)
        if grads is not None:
            gh, gw, gb = grads.result(weight, bias)
            ctx.save_for_backward(gh, gw, gb)
        else:
            ctx.save_for_backward(None, None, None)
        return total * scale

    @staticmethod
    def backward(ctx, grad_out):
        gh, gw, gb = ctx.saved_tensors
        scaled = [None if g is None else g * grad_out.to(g.dtype) for g in (gh, gw, gb)]
        return (*scaled, None, None, None, None, None, None, None, None, None, None, None)
