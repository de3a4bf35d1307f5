"""Autograd of the fused-linear token log-prob family: the head matmul and the loss, chunk by chunk.

Rows (tokens) are processed in chunks: a chunk's logits ``hidden_c @ weight.T (+ bias)`` exist only
while that chunk is processed, so the extra memory is O(chunk x vocab), never O(tokens x vocab).
The per-chunk losses and logits gradients come from the custom ops of the logits family
(``posttrain_kernels::token_logprobs_forward`` etc., opaque to ``torch.compile``); the gradients are
written in place over the chunk's own logits buffer (the ``*_`` in-place ops), so a chunk holds one
``rows x V`` buffer; the gradient matmuls accumulate the weight gradient in fp32 across chunks,
straight into the accumulator (``addmm_``).

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


# Vocabulary rows of the head weight upcast to fp32 at a time (see _Head): 16 MiB blocks.
_UPCAST_BLOCK_BYTES = 16 * 2**20


def cpu_has_fast_low_precision_gemm() -> bool:
    """Whether this CPU multiplies bf16 matrices natively (AVX512-BF16 or AMX). Without them
    PyTorch's bf16 GEMM is emulated and far slower than fp32 (measured on an AVX2 EPYC: 16 s
    against 2.1 s for 2048 x 1024 x 32000), so the fused-linear losses multiply in fp32 there."""
    probes = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    try:
        return any(bool(getattr(torch.cpu, p)()) for p in probes if hasattr(torch.cpu, p))
    except Exception:  # noqa: BLE001 -- a probe that fails means "no"
        return False


def _cpu_upcast(weight: Tensor) -> bool:
    """bf16/fp16 head on a CPU without bf16 GEMMs: every GEMM runs in fp32 (see _Head)."""
    return weight.dtype != _F32 and weight.device.type == "cpu" and not cpu_has_fast_low_precision_gemm()


def logits_element_size(weight: Tensor, fp32_logits: bool) -> int:
    """Bytes per element of a chunk's logits buffer for this head weight (see _Head's modes)."""
    return 4 if (fp32_logits or _cpu_upcast(weight)) else weight.element_size()


class _Head:
    """The GEMMs of one chunk of rows against the head ``weight (V, H)`` (+ ``bias (V,)``).

    Three modes:
    * native: logits and both gradient GEMMs in the weight's dtype (fp32 weights; bf16/fp16 on GPUs
      and on CPUs with bf16 matrix units) -- what the materialized computation does;
    * ``fp32_logits``: the logits GEMM in fp32 from the bf16/fp16 operands (log-probs that match an
      engine computing fp32 logits); the gradient GEMMs stay in the weight's dtype;
    * CPU upcast (bf16/fp16 weights on a CPU without bf16 GEMMs): every GEMM in fp32.
    Upcasting never copies the whole weight: it is multiplied in blocks of vocabulary rows, each
    block upcast on its own (``_UPCAST_BLOCK_BYTES``), so the extra memory stays O(chunk x V).
    """

    def __init__(self, weight: Tensor, bias: Optional[Tensor], fp32_logits: bool, logit_scale: float):
        self.weight, self.bias, self.scale = weight, bias, logit_scale
        self.grads_fp32 = _cpu_upcast(weight)
        self.logits_fp32 = weight.dtype != _F32 and (fp32_logits or self.grads_fp32)
        v, h = weight.shape
        self.block = max(1, _UPCAST_BLOCK_BYTES // (4 * max(h, 1)))
        self.blocks = [slice(s, min(s + self.block, v)) for s in range(0, v, self.block)]

    def logits(self, h: Tensor) -> Tensor:
        """``logit_scale * (h @ weight.T + bias)`` for one chunk: a new contiguous buffer, fp32 in
        the fp32 modes, else in the weight's dtype."""
        w, b = self.weight, self.bias
        if not self.logits_fp32:
            z = torch.nn.functional.linear(h, w, None if b is None else b.to(h.dtype))
        else:
            hf = h.float()
            z = torch.empty((h.shape[0], w.shape[0]), dtype=_F32, device=h.device)
            for vb in self.blocks:
                z[:, vb] = torch.nn.functional.linear(hf, w[vb].float(), None if b is None else b[vb].float())
        if self.scale != 1.0:
            z.mul_(self.scale)
        return z

    def grad_hidden(self, g: Tensor, out: Tensor) -> None:
        """out (rows, H) = g @ weight, g (rows, V) the gradient of this chunk's logits."""
        w = self.weight
        if self.grads_fp32:
            acc = torch.zeros(out.shape, dtype=_F32, device=out.device)
            for vb in self.blocks:
                acc.addmm_(g[:, vb], w[vb].float())
            out.copy_(acc)
            return
        torch.mm(g.to(w.dtype), w, out=out)  # out has the weight's dtype (checked in the API)

    def grad_weight(self, acc: Tensor, g: Tensor, h: Tensor) -> None:
        """acc (V, H) fp32 += g.T @ h, with fp32 accumulation across chunks."""
        if self.grads_fp32:
            acc.addmm_(g.t(), h.float())
        else:
            _accumulate_weight_grad(acc, g.to(self.weight.dtype), h)


def _softcapped(z: Tensor, softcap: float) -> Tensor:
    return z if softcap <= 0 else torch.tanh(z.float() / softcap).mul_(softcap).to(z.dtype)


def _accumulate_weight_grad(acc: Tensor, g: Tensor, h: Tensor) -> None:
    """``acc += g.T @ h`` with fp32 accumulation, into ``acc`` itself (no ``(V, H)`` temporary).

    acc ``(V, H)`` fp32; g ``(rows, V)`` and h ``(rows, H)`` of one dtype. bf16/fp16 operands: on
    CUDA the GEMM accumulates into fp32 (``out_dtype``); on the CPU the chunk's operands are upcast
    (fp32 GEMMs are the fast ones on CPUs without bf16 matrix units, and the copies are chunk-sized).
    """
    if g.dtype == _F32 and h.dtype == _F32:
        acc.addmm_(g.t(), h)
        return
    if acc.is_cuda:
        try:
            torch.addmm(acc, g.t(), h, out_dtype=_F32, out=acc)
            return
        except (TypeError, RuntimeError):  # torch without addmm(out_dtype=...)
            acc.add_(g.t() @ h)
            return
    acc.addmm_(g.float().t(), h.float())


class _Grads:
    """Accumulators of the three parameter gradients (fp32 for weight and bias)."""

    def __init__(self, hidden: Tensor, weight: Tensor, bias: Optional[Tensor], need: Tuple[bool, bool, bool]):
        self.need_h, self.need_w, self.need_b = need
        dev = weight.device
        self.hidden = torch.empty(hidden.shape, dtype=hidden.dtype, device=dev) if self.need_h else None
        self.weight = torch.zeros(weight.shape, dtype=_F32, device=dev) if self.need_w else None
        self.bias = torch.zeros(weight.shape[0], dtype=_F32, device=dev) if (self.need_b and bias is not None) else None

    def add_chunk(self, sl: slice, g_logits: Tensor, h: Tensor, head: "_Head") -> None:
        """g_logits [rows_c, V] = d loss / d (h @ weight.T + bias) for the chunk rows ``sl``."""
        if self.need_h:
            head.grad_hidden(g_logits, self.hidden[sl])
        if self.need_w:
            head.grad_weight(self.weight, g_logits, h)
        if self.bias is not None:
            self.bias.add_(g_logits.sum(0, dtype=_F32))

    def result(self, weight: Tensor, bias: Optional[Tensor]):
        gw = None if self.weight is None else self.weight.to(weight.dtype)
        gb = None if self.bias is None else self.bias.to(bias.dtype)
        return self.hidden, gw, gb


def _chain_scale(g: Tensor, logit_scale: float) -> Tensor:
    """From d/d(logit_scale * z) to d/dz, in place on g (our buffer)."""
    return g.mul_(logit_scale) if logit_scale != 1.0 else g


class LinearTokenLogprobs(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, bias, labels, inv_t, ignore_index, compute_entropy, softcap,
                logit_scale, chunk, fp32_logits, backend):
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
        head = _Head(weight, bias, fp32_logits, logit_scale)
        n = labels.shape[0]
        for s in range(0, n, chunk):
            sl = slice(s, min(s + chunk, n))
            h = hidden[sl]
            x = _softcapped(head.logits(h), softcap)
            # d c tanh(z / c) / dz = 1 - (x / c)^2, taken before x is overwritten by its gradient
            dcap = 1.0 - (x.float() / softcap).square_() if softcap > 0 else None
            chunk_ops.token_logprobs_backward_(
                x, labels[sl], lse[sl], entropy[sl] if grad_entropy is not None else entropy,
                None if grad_logp is None else grad_logp[sl],
                None if grad_entropy is None else grad_entropy[sl], inv_t, ignore_index, backend)
            g = x if dcap is None else dcap.mul_(x)
            grads.add_chunk(sl, _chain_scale(g, logit_scale), h, head)
            del x, g, dcap
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
        head = _Head(weight, bias, fp32_logits, logit_scale)
        for s in range(0, n, chunk):
            sl = slice(s, min(s + chunk, n))
            z = head.logits(hidden[sl])
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
        head = _Head(weight, bias, fp32_logits, logit_scale)
        n = labels.shape[0]
        for s in range(0, n, chunk):
            sl = slice(s, min(s + chunk, n))
            h = hidden[sl]
            z = head.logits(h)
            chunk_ops.cross_entropy_backward_(z, labels[sl], lse[sl], grad_loss[sl], ignore_index,
                                              eps, z_loss, softcap, backend)
            grads.add_chunk(sl, _chain_scale(z, logit_scale), h, head)
            del z
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
