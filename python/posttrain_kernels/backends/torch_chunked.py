"""Pure-PyTorch launchers of the token log-prob family, chunked over rows.

The fallback for CPU tensors when ``_C`` is not built, and a device-agnostic path. Each chunk of
rows is upcast to fp32 on its own, so the extra memory is O(chunk x vocab), never O(rows x vocab)
beyond the logits gradient itself; the math is the same closed form as the fused kernels.
"""
from __future__ import annotations

from typing import Iterator, Optional, Tuple

import torch

Tensor = torch.Tensor

# fp32 elements per chunk (16 MiB): the bound on each temporary of one chunk.
_CHUNK_ELEMENTS = 1 << 22


def _chunks(n_rows: int, vocab: int) -> Iterator[slice]:
    step = max(1, _CHUNK_ELEMENTS // max(vocab, 1))
    for start in range(0, n_rows, step):
        yield slice(start, min(start + step, n_rows))


def _safe(labels: Tensor, ignore_index: int) -> Tuple[Tensor, Tensor]:
    ignored = labels == ignore_index
    return labels.masked_fill(ignored, 0), ignored


def _xlogits_entropy_term(p: Tensor, x: Tensor, c: Tensor) -> Tensor:
    # p * (x + c) with 0 where p == 0, so -inf logits give 0 rather than 0 * -inf = nan.
    return torch.where(p > 0, p * (x + c), torch.zeros_like(p))


def token_logprobs_forward(logits: Tensor, labels: Tensor, inv_temperature: float,
                           ignore_index: int, compute_entropy: bool) -> Tuple[Tensor, Tensor, Tensor]:
    n, v = logits.shape
    f32 = dict(device=logits.device, dtype=torch.float32)
    logp = torch.empty(labels.shape, **f32)
    entropy = torch.empty((n if compute_entropy else 0,), **f32)
    lse = torch.empty((n,), **f32)
    for sl in _chunks(n, v):
        x = logits[sl].float() * inv_temperature
        l = torch.logsumexp(x, dim=-1)
        safe, ignored = _safe(labels[sl], ignore_index)
        row_ignored = ignored.all(-1)
        logp[sl] = (x.gather(-1, safe) - l[:, None]).masked_fill(ignored, 0.0)
        if compute_entropy:
            # log_softmax subtracts the row max first, so x - lse keeps its precision at |x| ~ 1e4
            logp_all = torch.log_softmax(x, dim=-1)
            p = logp_all.exp()
            h = -torch.where(p > 0, p * logp_all, torch.zeros_like(p)).sum(-1)
            entropy[sl] = h.masked_fill(row_ignored, 0.0)
        lse[sl] = l.masked_fill(row_ignored, 0.0)
    return logp, entropy, lse


def token_logprobs_backward(logits: Tensor, labels: Tensor, lse: Tensor, entropy: Optional[Tensor],
                            grad_logp: Optional[Tensor], grad_entropy: Optional[Tensor],
                            inv_temperature: float, ignore_index: int,
                            out: Optional[Tensor] = None) -> Tensor:
    n, v = logits.shape
    # a chunk's gradient is computed whole before it is stored, so ``out`` may be ``logits``
    grad_logits = torch.empty((n, v), device=logits.device, dtype=logits.dtype) if out is None else out
    for sl in _chunks(n, v):
        x = logits[sl].float() * inv_temperature
        l = lse[sl][:, None]
        p = torch.exp(x - l)
        lab = labels[sl]
        ignored = lab == ignore_index
        # labels outside [0, V) (a column block of wider rows): in G, but no one-hot term here
        in_block = (lab >= 0) & (lab < v)
        dx = torch.zeros_like(x)
        if grad_logp is not None:
            g = grad_logp[sl].masked_fill(ignored, 0.0)
            dx -= g.sum(-1, keepdim=True) * p
            dx.scatter_add_(-1, lab.masked_fill(~in_block, 0), g.masked_fill(~in_block, 0.0))
        if grad_entropy is not None:
            c = (entropy[sl] - lse[sl])[:, None]
            dx -= grad_entropy[sl][:, None] * _xlogits_entropy_term(p, x, c)
        dx.masked_fill_(ignored.all(-1, keepdim=True), 0.0)
        grad_logits[sl] = dx * inv_temperature
    return grad_logits


def _capped(logits: Tensor, softcap: float) -> Tensor:
    x = logits.float()
    return softcap * torch.tanh(x / softcap) if softcap > 0 else x


def cross_entropy_forward(logits: Tensor, labels: Tensor, ignore_index: int, label_smoothing: float,
                          z_loss: float, softcap: float) -> Tuple[Tensor, Tensor]:
    n, v = logits.shape
    loss = torch.empty((n,), device=logits.device, dtype=torch.float32)
    lse = torch.empty((n,), device=logits.device, dtype=torch.float32)
    eps = label_smoothing
    for sl in _chunks(n, v):
        x = _capped(logits[sl], softcap)
        l = torch.logsumexp(x, dim=-1)
        safe, ignored = _safe(labels[sl], ignore_index)
        row = (1.0 - eps) * (l - x.gather(-1, safe[:, None])[:, 0]) + z_loss * l * l
        if eps:
            row = row + eps * (l - x.mean(-1))
        loss[sl] = row.masked_fill(ignored, 0.0)
        lse[sl] = l.masked_fill(ignored, 0.0)
    return loss, lse


def cross_entropy_backward(logits: Tensor, labels: Tensor, lse: Tensor, grad_loss: Tensor,
                           ignore_index: int, label_smoothing: float, z_loss: float,
                           softcap: float, out: Optional[Tensor] = None,
                           smoothing_vocab: int = 0) -> Tensor:
    """``smoothing_vocab > 0``: the logits are a block of columns of rows that wide (see the
    kernels); labels outside ``[0, V)`` then add no one-hot term."""
    n, v = logits.shape
    grad_logits = torch.empty((n, v), device=logits.device, dtype=logits.dtype) if out is None else out
    eps = label_smoothing
    v_s = smoothing_vocab if smoothing_vocab > 0 else v
    for sl in _chunks(n, v):
        x = _capped(logits[sl], softcap)
        l = lse[sl][:, None]
        lab = labels[sl]
        ignored = lab == ignore_index
        in_block = (lab >= 0) & (lab < v)
        g = grad_loss[sl].masked_fill(ignored, 0.0)[:, None]
        dx = g * (torch.exp(x - l) * (1.0 + 2.0 * z_loss * l) - eps / v_s)
        hot = (-(1.0 - eps) * g).masked_fill_(~in_block[:, None], 0.0)
        dx.scatter_add_(-1, lab.masked_fill(~in_block, 0)[:, None], hot)
        if softcap > 0:
            dx *= 1.0 - (x / softcap) ** 2
        # Ignored rows carry lse = 0, so exp(x - lse) may overflow there: clear them last.
        grad_logits[sl] = dx.masked_fill_(ignored[:, None], 0.0)
    return grad_logits


def cross_entropy_fused(logits: Tensor, labels: Tensor, grad_loss: Tensor, ignore_index: int,
                        label_smoothing: float, z_loss: float, softcap: float) -> Tuple[Tensor, Tensor]:
    """Forward, then the backward written over ``logits``."""
    loss, lse = cross_entropy_forward(logits, labels, ignore_index, label_smoothing, z_loss, softcap)
    cross_entropy_backward(logits, labels, lse, grad_loss, ignore_index, label_smoothing, z_loss,
                           softcap, out=logits)
    return loss, lse
