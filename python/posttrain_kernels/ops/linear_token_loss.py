"""Autograd of token-level losses on the fused-linear log-probs and entropy (the policy-gradient
family), gradients computed in the forward.

A policy-gradient loss is a function of each token's log-prob (and entropy) under the current
policy; for the loss types whose rows do not interact (every one but the top-entropy-quantile
selection) the gradient of a row's tokens depends only on that row's values and on constants of
the batch (token counts, the number of rows). So rows are processed in groups:

    for each group of rows:
        z = logits of the group's tokens            (the chunk buffer; kept while the group fits)
        token log-probs, entropy, lse from z        (the token log-prob kernel)
        (g_logp, g_entropy) = token_grad(group)     (autograd of the loss on the group's rows)
        z <- d loss / d z, in place                 (the backward kernel)
        grad hidden rows, grad weight += ...        (the two gradient GEMMs)

three GEMMs in all; the loss itself and its metrics are evaluated once at the end on the whole
batch's (detached) log-probs, and the backward only scales the precomputed gradients.
"""
from __future__ import annotations

from typing import Callable, List, Sequence, Tuple

import torch
from torch import Tensor

from . import token_logprobs as chunk_ops
from .linear_head import _F32, _Grads, _Head

# token_grad(logp (n, T), entropy (n, T), rows slice) -> (d loss / d logp, d loss / d entropy),
# each (n, T) fp32 (the second may be None).
TokenGrad = Callable[[Tensor, Tensor, slice], Tuple[Tensor, object]]
# loss_fn(logp (S, T), entropy (S, T)) -> (loss, metrics stacked in metric order), no gradients.
LossFn = Callable[[Tensor, Tensor], Tuple[Tensor, Tensor]]


def _pieces(r0: int, r1: int, t: int, rows: int) -> List[slice]:
    return [slice(s, min(s + rows, r1 * t)) for s in range(r0 * t, r1 * t, rows)]


class LinearTokenLoss(torch.autograd.Function):
    """Inputs: ``hidden (S * T, H)``, ``weight (V, H)``, ``bias``, ``labels (S * T, 1)`` int64,
    ``seq_len`` T, ``rows_per_group``, ``token_grad`` (see ``TokenGrad``), ``loss_fn`` (see
    ``LossFn``). Returns ``(loss, metrics, logp (S, T), entropy (S, T))``; only the loss carries
    gradients."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, labels, seq_len, rows_per_group, token_grad, loss_fn, inv_t,
                ignore_index, chunk, fp32_logits, grad_enabled, backend):
        needs = tuple(bool(grad_enabled and x) for x in ctx.needs_input_grad[:3])
        grads = _Grads(hidden, weight, bias, needs) if any(needs) else None
        head = _Head(weight, bias, fp32_logits, 1.0)
        n_tok = labels.shape[0]
        s = n_tok // seq_len
        logp = torch.empty((n_tok, 1), device=hidden.device, dtype=_F32)
        entropy = torch.empty((n_tok,), device=hidden.device, dtype=_F32)
        for r0 in range(0, s, rows_per_group):
            r1 = min(r0 + rows_per_group, s)
            pieces = _pieces(r0, r1, seq_len, chunk)
            keep = grads is not None and len(pieces) == 1
            kept, lses = [], []
            for sc in pieces:
                z = head.logits(hidden[sc])
                lp, ent, lse = chunk_ops.token_logprobs_forward(z, labels[sc], inv_t, ignore_index, True,
                                                                backend)
                logp[sc], entropy[sc] = lp, ent
                lses.append(lse)
                if keep:
                    kept.append(z)
                del z
            if grads is None:
                continue
            tok = slice(r0 * seq_len, r1 * seq_len)
            g_lp, g_ent = token_grad(logp[tok].view(r1 - r0, seq_len), entropy[tok].view(r1 - r0, seq_len),
                                     slice(r0, r1))
            g_lp = g_lp.to(_F32).reshape(-1, 1).contiguous()
            g_ent = None if g_ent is None else g_ent.to(_F32).reshape(-1).contiguous()
            for i, sc in enumerate(pieces):
                z = kept[i] if keep else head.logits(hidden[sc])
                o = slice(sc.start - tok.start, sc.stop - tok.start)
                chunk_ops.token_logprobs_backward_(z, labels[sc], lses[i], entropy[sc], g_lp[o],
                                                   None if g_ent is None else g_ent[o], inv_t,
                                                   ignore_index, backend)
                grads.add_chunk(sc, z, hidden[sc], head)
                if keep:
                    kept[i] = None
                del z
        logp2d, ent2d = logp.view(s, seq_len), entropy.view(s, seq_len)
        loss, metrics = loss_fn(logp2d, ent2d)
        if grads is not None:
            ctx.save_for_backward(*grads.result(weight, bias))
        else:
            ctx.save_for_backward(None, None, None)
        ctx.mark_non_differentiable(metrics, logp2d, ent2d)
        return loss.detach().to(_F32), metrics, logp2d, ent2d

    @staticmethod
    def backward(ctx, grad_out, _m, _lp, _ent):
        gh, gw, gb = ctx.saved_tensors
        for g in (gh, gw, gb):  # in place, as LinearCrossEntropyScalar
            if g is not None:
                g.mul_(grad_out)
        return (gh, gw, gb) + (None,) * 11


def group_rows(chunk: int, seq_len: int) -> int:
    """Rows per group: as many whole rows as the chunk holds (at least one)."""
    return max(1, chunk // max(seq_len, 1))


def gradient_of_rows(loss_of: Callable[[Tensor, Tensor], Tensor], placeholder_logp: Tensor,
                     placeholder_entropy: Tensor, need_entropy_grad: bool) -> TokenGrad:
    """A ``TokenGrad`` for a loss whose rows do not interact: the loss of the whole batch with the
    group's rows live and every other row a placeholder; its gradient w.r.t. the live rows is the
    gradient of the batch's loss w.r.t. them (the other rows only add terms of their own)."""
    def token_grad(lp: Tensor, ent: Tensor, rows: slice):
        if torch.compiler.is_compiling():
            return _token_grad_func(loss_of, placeholder_logp, placeholder_entropy, need_entropy_grad, lp, ent, rows)
        with torch.enable_grad():
            lp_leaf = lp.detach().clone().requires_grad_(True)
            ent_leaf = ent.detach().clone().requires_grad_(need_entropy_grad)
            full_lp = torch.cat([placeholder_logp[:rows.start], lp_leaf, placeholder_logp[rows.stop:]])
            full_ent = torch.cat([placeholder_entropy[:rows.start], ent_leaf, placeholder_entropy[rows.stop:]])
            loss = loss_of(full_lp, full_ent)
            wrt: Sequence[Tensor] = (lp_leaf, ent_leaf) if need_entropy_grad else (lp_leaf,)
            got = torch.autograd.grad(loss, wrt, allow_unused=True)
        g_lp = torch.zeros_like(lp) if got[0] is None else got[0]
        g_ent = None
        if need_entropy_grad:
            g_ent = torch.zeros_like(ent) if got[1] is None else got[1]
        return g_lp, g_ent
    return token_grad


def _token_grad_func(loss_of, placeholder_logp, placeholder_entropy, need_entropy_grad, lp, ent, rows):
    """``token_grad`` through ``torch.func`` (dynamo traces it; not ``torch.autograd.grad``)."""
    def f(lp_live, ent_live):
        full_lp = torch.cat([placeholder_logp[:rows.start], lp_live, placeholder_logp[rows.stop:]])
        full_ent = torch.cat([placeholder_entropy[:rows.start], ent_live, placeholder_entropy[rows.stop:]])
        return loss_of(full_lp, full_ent)
    g_lp, g_ent = torch.func.grad(f, argnums=(0, 1))(lp.detach(), ent.detach())
    return g_lp, (g_ent if need_entropy_grad else None)
