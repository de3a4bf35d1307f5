"""Autograd of the fused-linear distillation loss: both heads chunked over tokens, gradients computed
in the forward (the loss is a scalar), no logits of either model beyond one chunk.

Per chunk of token rows:

    zs = hs @ Ws.T (+ bs)      the student's logits (rows, Vs)
    zt = ht @ Wt.T (+ bt)      the teacher's (rows, Vt), no gradient
    per-row divergence and its student gradient on the common prefix V = min(Vs, Vt)
    (the distillation kernels), plus the hard-label cross-entropy on the student's logits
    (the fused cross-entropy kernel, in place over zs)
    grad hs = G @ Ws, grad Ws += G.T @ hs     (the student's two gradient GEMMs)

four GEMMs in all (three of the student, one of the teacher); the backward scales the
precomputed gradients by the upstream scalar.
"""
from __future__ import annotations

import torch

from . import distill as distill_ops
from . import token_logprobs as chunk_ops
from .linear_head import _F32, _Grads, _Head


class LinearDistillLoss(torch.autograd.Function):
    """Inputs: student ``hidden (N, Hs)``, ``weight (Vs, Hs)``, ``bias``; teacher ``hidden (N, Ht)``,
    ``weight (Vt, Ht)``, ``bias`` (constants); ``labels (N,)`` int64 or None; ``soft_scale`` and
    ``hard_scale``: the weights of the summed per-row divergence and of the summed per-row
    cross-entropy in the loss (they carry the reduction's denominators, fp32 0-d tensors);
    ``use_hard``: whether there is a cross-entropy term (labels given and a non-zero weight)."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, t_hidden, t_weight, t_bias, labels, soft_scale, hard_scale, use_hard,
                divergence, beta, inv_t, ignore_index, chunk, grad_enabled, backend):
        needs = tuple(bool(grad_enabled and x) for x in ctx.needs_input_grad[:3])
        grads = _Grads(hidden, weight, bias, needs) if any(needs) else None
        head = _Head(weight, bias, False, 1.0)
        t_head = _Head(t_weight, t_bias, False, 1.0)
        n = hidden.shape[0]
        v = min(weight.shape[0], t_weight.shape[0])
        dev = hidden.device
        soft_total = torch.zeros((), device=dev, dtype=_F32)
        hard_total = torch.zeros((), device=dev, dtype=_F32)
        for s in range(0, n, chunk):
            sl = slice(s, min(s + chunk, n))
            h = hidden[sl]
            zs = head.logits(h)
            with torch.no_grad():
                zt = t_head.logits(t_hidden[sl])
            lab = None if labels is None else labels[sl]
            zs_v, zt_v = zs[:, :v], zt[:, :v]
            if grads is not None and not use_hard and zs.shape[1] == v:
                # forward and gradient in one kernel call, the gradient written over the student's
                # logits (the teacher's buffer is its scratch): two chunk buffers, and on the C++
                # backend no second pass of exps and logs
                row_grad = soft_scale.expand(zs.shape[0]).contiguous()
                per, _ = distill_ops.distill_fused_(zs, zt_v, lab, ignore_index, divergence, beta, inv_t,
                                                    row_grad, backend)
                soft_total += per.sum()
                del zt, zt_v
                grads.add_chunk(sl, zs, h, head)
                del zs
                continue
            per, stats = distill_ops.distill_forward(zs_v, zt_v, lab, ignore_index, divergence, beta, inv_t,
                                                     backend)
            soft_total += per.sum()
            g = None
            if grads is not None:
                row_grad = soft_scale.expand(per.shape[0]).contiguous()
                g = distill_ops.distill_backward(zs_v, zt_v, lab, ignore_index, divergence, beta, inv_t,
                                                 stats, row_grad, backend)
            del zt, zt_v
            if use_hard:
                hard_grad = hard_scale.expand(zs.shape[0]).contiguous()
                if grads is not None:
                    ce, _ = chunk_ops.cross_entropy_fused_(zs, lab, hard_grad, ignore_index, 0.0, 0.0, 0.0, backend)
                else:
                    ce, _ = chunk_ops.cross_entropy_forward(zs, lab, ignore_index, 0.0, 0.0, 0.0, backend)
                hard_total += ce.sum()
                if grads is not None:
                    zs[:, :v] += g  # zs now holds the cross-entropy gradient: add the divergence's
                    g = zs
            elif grads is not None:  # Vs > Vt (else the fused branch above took the chunk)
                zs[:, :v].copy_(g)  # the student's columns beyond the teacher's get no gradient
                zs[:, v:] = 0
                g = zs
            if grads is not None:
                grads.add_chunk(sl, g, h, head)
            del zs, g
        if grads is not None:
            ctx.save_for_backward(*grads.result(weight, bias))
        else:
            ctx.save_for_backward(None, None, None)
        return soft_total * soft_scale + hard_total * hard_scale

    @staticmethod
    def backward(ctx, grad_out):
        gh, gw, gb = ctx.saved_tensors
        for g in (gh, gw, gb):  # in place, as LinearCrossEntropyScalar (a second backward raises)
            if g is not None:
                g.mul_(grad_out)
        return (gh, gw, gb) + (None,) * 14
