"""TRL's ``ChunkedDivergenceFunction`` (the ``DistillationTrainer``'s loss) on this library's kernels.

Per token, from both models' hidden states and heads, without either model's logits in memory:
the generalized JSD of TRL with mixture ``m = (1 - beta) p_s + beta p_t``,

    D = beta KL(p_t || m) + (1 - beta) KL(p_s || m),   beta = 0: KL(p_t || p_s),  beta = 1: KL(p_s || p_t),

where ``p = softmax(softcap(logit_scale * (h W^T + b)) / T)`` for each model, and the student's
entropy (no gradient). The divergence is differentiable in the student's hidden states, weight and
bias with any per-token upstream gradient; the teacher gets none. Token chunks: the forward keeps
the per-row statistics of the distillation kernels, the backward recomputes both chunks' logits.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from ..api.distill import DIVERGENCE_CODES
from ..api.linear_token_logprobs import _autocast_inputs, chunk_budget
from ..dispatch import resolve_backend
from ..ops import distill as distill_ops
from ..ops import token_logprobs as chunk_ops
from ..ops.linear_head import _F32, _chain_scale, _Grads, _Head, _softcapped

_JSD = DIVERGENCE_CODES["jsd"]


def gemm_inputs(hidden, weight, bias):
    """Hidden, weight and bias in the GEMM dtype of one head: autocast's, else the wider of hidden's
    and weight's."""
    if torch.is_autocast_enabled(hidden.device.type):
        return _autocast_inputs(hidden, weight, bias)
    wide = torch.promote_types(hidden.dtype, weight.dtype)
    return hidden.to(wide), weight.to(wide), (None if bias is None else bias.to(wide))


class _FusedDivergence(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hs, ws, bs, ht, wt, bt, beta, inv_t, s_scale, s_cap, t_scale, t_cap, chunk, backend):
        n = hs.shape[0]
        dev = hs.device
        div = torch.empty(n, device=dev, dtype=_F32)
        ent = torch.empty(n, device=dev, dtype=_F32)
        stats = torch.empty((n, 3), device=dev, dtype=_F32)
        any_label = torch.zeros((n, 1), device=dev, dtype=torch.int64)  # entropy only: any label will do
        s_head, t_head = _Head(ws, bs, False, s_scale), _Head(wt, bt, False, t_scale)
        for s in range(0, n, chunk):
            sl = slice(s, min(s + chunk, n))
            zs = _softcapped(s_head.logits(hs[sl]), s_cap)
            zt = _softcapped(t_head.logits(ht[sl]), t_cap)
            div[sl], stats[sl] = distill_ops.distill_forward(zs, zt, None, -100, _JSD, beta, inv_t, backend)
            _, ent[sl], _ = chunk_ops.token_logprobs_forward(zs, any_label[sl], inv_t, -100, True, backend)
            del zs, zt
        ctx.save_for_backward(hs, ws, bs, ht, wt, bt, stats)
        ctx.args = (beta, inv_t, s_scale, s_cap, t_scale, t_cap, chunk, backend)
        ctx.mark_non_differentiable(ent)
        return div, ent

    @staticmethod
    def backward(ctx, grad_div, _grad_ent):
        hs, ws, bs, ht, wt, bt, stats = ctx.saved_tensors
        beta, inv_t, s_scale, s_cap, t_scale, t_cap, chunk, backend = ctx.args
        needs = tuple(ctx.needs_input_grad[:3])
        if grad_div is None or not any(needs):
            return (None,) * 14
        grad_div = grad_div.to(_F32).contiguous()
        grads = _Grads(hs, ws, bs, needs)
        s_head, t_head = _Head(ws, bs, False, s_scale), _Head(wt, bt, False, t_scale)
        for s in range(0, hs.shape[0], chunk):
            sl = slice(s, min(s + chunk, hs.shape[0]))
            z = s_head.logits(hs[sl])
            x = _softcapped(z, s_cap)
            # d s_cap tanh(z / s_cap) / dz = 1 - (x / s_cap)^2, before x's buffer is released
            dcap = 1.0 - (x.float() / s_cap).square_() if s_cap > 0 else None
            zt = _softcapped(t_head.logits(ht[sl]), t_cap)
            g = distill_ops.distill_backward(x, zt, None, -100, _JSD, beta, inv_t, stats[sl], grad_div[sl],
                                             backend)
            del zt, x, z
            if dcap is not None:
                g = dcap.mul_(g).to(g.dtype)
            grads.add_chunk(sl, _chain_scale(g, s_scale), hs[sl], s_head)
            del g, dcap
        gh, gw, gb = grads.result(ws, bs)
        return (gh, gw, gb) + (None,) * 11


def fused_divergence(student_hidden: Tensor, student_weight: Tensor, student_bias: Optional[Tensor],
                     teacher_hidden: Tensor, teacher_weight: Tensor, teacher_bias: Optional[Tensor],
                     beta: float, temperature: float = 1.0, student_logit_scale: float = 1.0,
                     student_final_logit_softcapping: Optional[float] = None, teacher_logit_scale: float = 1.0,
                     teacher_final_logit_softcapping: Optional[float] = None, backend: str = "auto"):
    """``trl.kernels.chunked_divergence.ChunkedDivergenceFunction.apply`` on this library's kernels.

    Args:
        student_hidden: ``(N, Hs)``; student_weight ``(V, Hs)``; student_bias ``(V,)`` or None.
        teacher_hidden: ``(N, Ht)``; teacher_weight ``(V, Ht)``; teacher_bias ``(V,)`` or None.
        beta: in ``[0, 1]``: 0 forward KL(teacher || student), 1 reverse KL(student || teacher),
            else the generalized JSD (module docstring).
        temperature, *_logit_scale, *_final_logit_softcapping: each model's logits
            ``softcap(scale * (h W^T + b)) / T``.

    Returns:
        ``(divergence, entropy)``, each ``(N,)`` fp32: the divergence differentiable in the
        student's hidden states, weight and bias; the student's entropy without gradient.
    """
    n, v = student_hidden.shape[0], student_weight.shape[0]
    if teacher_hidden.shape[0] != n or teacher_weight.shape[0] != v:
        raise ValueError(f"teacher_hidden / teacher_weight: expected {n} rows and vocabulary {v} (the student's), "
                         f"got {tuple(teacher_hidden.shape)} and {tuple(teacher_weight.shape)}")
    if not 0.0 <= float(beta) <= 1.0:
        raise ValueError(f"beta: expected a value in [0, 1], got {beta}")
    hs, ws, bs = gemm_inputs(student_hidden, student_weight, student_bias)
    ht, wt, bt = gemm_inputs(teacher_hidden, teacher_weight, teacher_bias)
    name = resolve_backend(backend, hs.device)
    # both chunks' logits, and the fp32 gradient, within the chunk budget
    chunk = max(1, chunk_budget(hs.device) // (4 * max(v, 1)))
    with torch.autocast(hs.device.type, enabled=False):
        return _FusedDivergence.apply(
            hs, ws, bs, ht.detach(), wt.detach(), None if bt is None else bt.detach(), float(beta),
            1.0 / float(temperature), float(student_logit_scale), float(student_final_logit_softcapping or 0.0),
            float(teacher_logit_scale), float(teacher_final_logit_softcapping or 0.0), chunk, name)


class FusedDivergenceFunction:
    """Drop-in for ``ChunkedDivergenceFunction``: TRL calls ``.apply(...)``."""

    backend = "auto"

    @classmethod
    def apply(cls, *args):
        return fused_divergence(*args, backend=cls.backend)
