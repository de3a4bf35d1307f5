"""Autograd of sequence-level losses on the fused-linear log-probs, gradients computed in the forward.

A preference loss (DPO, SimPO, ORPO, KTO, ...) is a function of per-sequence log-probs, the sums
of the completion's token log-probs. Most of them are a mean over pairs (or examples) of terms that
each depend on one pair only; then the loss splits into groups of sequences, and a group's
gradient w.r.t. its sequence log-probs is known as soon as the group's log-probs are. So each
group of sequences is processed whole:

    for each group (a few pairs: a few rows of chosen and the matching rows of rejected):
        z = logits of the group's tokens            (the chunk buffer; kept while the group fits)
        token log-probs and lse from z              (the token log-prob kernel)
        seq_logps = sums over the completions; loss_g, metrics_g = seq_loss(seq_logps, group)
        g_seq = d loss_g / d seq_logps              (autograd on a few scalars)
        z <- d loss_g / d z, in place               (the backward kernel, upstream g_seq per token)
        grad hidden rows, grad weight += ...        (the two gradient GEMMs)

three GEMMs in all, like the scalar cross-entropy; a group too long for the chunk budget
recomputes its logits (four). The backward only scales the precomputed gradients.
"""
from __future__ import annotations

from typing import Callable, Dict, List, Sequence, Tuple

import torch
from torch import Tensor

from . import token_logprobs as chunk_ops
from .linear_head import _F32, _Grads, _Head
from .registration import opaque

# A group of sequences: the token-row ranges (slices of the flattened (S * T) tokens) that hold
# them, each range a whole number of sequences, in the order seq_loss expects their log-probs.
Group = Sequence[slice]
# seq_loss(seq_logps (n,), group index) -> (loss contribution, metric contributions): the group's
# share of the total loss (the groups' contributions add up to it) and of each metric.
SeqLoss = Callable[[Tensor, int], Tuple[Tensor, Dict[str, Tensor]]]


def _sub_chunks(rng: slice, rows: int) -> List[slice]:
    return [slice(s, min(s + rows, rng.stop)) for s in range(rng.start, rng.stop, rows)]


class LinearSequenceLoss(torch.autograd.Function):
    """Inputs: ``hidden (S * T, H)``, ``weight (V, H)``, ``bias (V,)`` or None, ``labels (S * T, 1)``
    int64 (``ignore_index`` outside the completions), ``groups`` (see ``Group``), ``seq_len`` T,
    ``seq_loss`` (see ``SeqLoss``). Returns the loss (fp32 scalar) and the metrics, in the order of
    ``metric_names``, summed over the groups (not differentiable)."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, labels, groups, seq_len, seq_loss, metric_names, inv_t,
                ignore_index, chunk, fp32_logits, grad_enabled, backend):
        ops = _ops()
        needs = tuple(bool(grad_enabled and x) for x in ctx.needs_input_grad[:3])
        grads = _Grads(hidden, weight, bias, needs) if any(needs) else None
        if grads is not None and grads.hidden is not None:
            grads.hidden.zero_()  # tokens of no group (none, when the groups cover the batch) get 0
        head = _Head(weight, bias, fp32_logits, 1.0)
        total = torch.zeros((), device=hidden.device, dtype=_F32)
        metrics = torch.zeros((len(metric_names),), device=hidden.device, dtype=_F32)
        empty = torch.empty((0,), device=hidden.device, dtype=_F32)
        minus_one = torch.full((chunk,), -1.0, device=hidden.device, dtype=_F32)
        for gi, group in enumerate(groups):
            n_group = sum(r.stop - r.start for r in group)
            if grads is not None and n_group <= chunk and inv_t == 1.0:
                seq, loss_g, met_g = _fused_group(hidden, labels, group, seq_len, seq_loss, gi, head, grads,
                                                  minus_one[:n_group], ignore_index, backend, ops)
                total += loss_g
                metrics += torch.stack([met_g[k].detach().float() for k in metric_names])
                continue
            pieces = [sc for rng in group for sc in _sub_chunks(rng, chunk)]
            # keep the group's logits between its forward and backward when they fit the budget
            keep = grads is not None and n_group <= chunk
            kept, lses, seq_parts = [], [], []
            for sc in pieces:
                z = head.logits(hidden[sc])
                lp, _, lse = ops.token_logprobs_forward(z, labels[sc], inv_t, ignore_index, False, backend)
                lses.append(lse)
                seq_parts.append(lp)
                if keep:
                    kept.append(z)
                del z
            seq = torch.cat(seq_parts).view(-1, seq_len).sum(-1)  # ignored tokens have logp 0
            if grads is not None:
                g_seq, loss_g, met_g = _seq_grad(seq_loss, seq, gi)
            else:
                g_seq, (loss_g, met_g) = None, seq_loss(seq.detach(), gi)
            total += loss_g.detach()
            metrics += torch.stack([met_g[k].detach().float() for k in metric_names])
            if grads is None:
                continue
            # d loss / d token logp = g_seq of the token's sequence (labels mark the completion)
            g_tok = g_seq.to(_F32).repeat_interleave(seq_len)[:, None]  # contiguous
            offset = 0
            for i, sc in enumerate(pieces):
                n = sc.stop - sc.start
                z = kept[i] if keep else head.logits(hidden[sc])
                ops.token_logprobs_backward_(z, labels[sc], lses[i], empty, g_tok[offset:offset + n], None,
                                             inv_t, ignore_index, backend)
                grads.add_chunk(sc, z, hidden[sc], head)
                offset += n
                if keep:
                    kept[i] = None
                del z
        if grads is not None:
            gh, gw, gb = grads.result(weight, bias)
            ctx.save_for_backward(gh, gw, gb)
        else:
            ctx.save_for_backward(None, None, None)
        ctx.mark_non_differentiable(metrics)
        return total, metrics

    @staticmethod
    def backward(ctx, grad_out, _grad_metrics):
        gh, gw, gb = ctx.saved_tensors
        # scaled in place, as LinearCrossEntropyScalar (a second backward raises)
        for g in (gh, gw, gb):
            if g is not None:
                g.mul_(grad_out)
        return (gh, gw, gb) + (None,) * 11


class _Ops:
    """The three ops the groups call, each passed through ``wrap``."""

    def __init__(self, wrap):
        self.token_logprobs_forward = wrap(chunk_ops.token_logprobs_forward)
        self.token_logprobs_backward_ = wrap(chunk_ops.token_logprobs_backward_)
        self.cross_entropy_fused_ = wrap(chunk_ops.cross_entropy_fused_)


def _ops():
    """Eagerly, the ops. Compiled, their opaque forms (``registration.opaque``): on an H200 (torch
    2.11) inductor gave this loss eager's value but zero hidden-state gradients when it traced the
    Triton kernels here (the other families were right); until that is understood, compiled
    preference losses launch the kernels from opaque ops, as before the ops were ``triton_op``s."""
    return _Ops(opaque) if torch.compiler.is_compiling() else chunk_ops


def _seq_grad(seq_loss, seq: Tensor, gi: int):
    """The group's loss, metrics and ``d loss / d seq``: ``torch.autograd.grad`` eagerly, ``torch.func``
    under ``torch.compile`` (dynamo does not trace ``torch.autograd.grad`` by default)."""
    if torch.compiler.is_compiling():
        g_seq, (loss_g, met_g) = torch.func.grad_and_value(lambda x: seq_loss(x, gi), has_aux=True)(seq.detach())
        return g_seq, loss_g, met_g
    with torch.enable_grad():
        leaf = seq.detach().requires_grad_(True)
        loss_g, met_g = seq_loss(leaf, gi)
        return torch.autograd.grad(loss_g, leaf)[0], loss_g, met_g


def _fused_group(hidden, labels, group, seq_len, seq_loss, gi, head, grads, minus_one, ignore_index, backend,
                 ops):
    """A group that fits the chunk, in one pass: its rows gathered into one GEMM operand (one
    larger GEMM instead of one per range), the log-probs and the unit gradient
    ``d logp / d z = onehot - p`` from the fused cross-entropy kernel (upstream -1, so its loss is
    ``-logp``) written over the logits while each row is in cache, then the group's gradient
    ``g_seq`` applied as a per-row scale to the GEMMs' small operands (never to the logits):
    ``grad_h = g * (U @ W)``, ``grad_W += U.T @ (g * h)``."""
    h_g = hidden[group[0]] if len(group) == 1 else torch.cat([hidden[r] for r in group])
    lab_g = labels[group[0]] if len(group) == 1 else torch.cat([labels[r] for r in group])
    z = head.logits(h_g)
    nll, _ = ops.cross_entropy_fused_(z, lab_g[:, 0].contiguous(), minus_one, ignore_index, 0.0, 0.0, 0.0,
                                      backend)
    seq = nll.neg().view(-1, seq_len).sum(-1)  # ignored tokens have loss 0
    g_seq, loss_g, met_g = _seq_grad(seq_loss, seq, gi)
    g_tok = g_seq.to(_F32).repeat_interleave(seq_len)
    if grads.need_h:
        gh = torch.empty(h_g.shape, dtype=h_g.dtype, device=h_g.device)
        head.grad_hidden(z, gh)
        gh.mul_(g_tok[:, None].to(gh.dtype))
        o = 0
        for r in group:
            grads.hidden[r] = gh[o:o + r.stop - r.start]
            o += r.stop - r.start
    if grads.need_w:
        head.grad_weight(grads.weight, z, (h_g.float() * g_tok[:, None]).to(h_g.dtype))
    if grads.bias is not None:
        grads.bias.add_(z.t().float() @ g_tok)
    return seq, loss_g.detach(), met_g
