"""Token log-probs, entropy and SFT cross-entropy from logits (the token log-prob family)."""
from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import Tensor, nn

from .. import _validation as V
from ..dispatch import resolve_backend
from ..ops import token_logprobs as ops
from ..reference import cross_entropy_reference, token_logprobs_reference

REDUCTIONS = ("mean", "sum", "none")


def _rows(logits: Tensor) -> Tensor:
    """(..., V) -> (N, V) with unit stride along V; a view whenever the leading dims allow one."""
    v = logits.shape[-1]
    if logits.stride(-1) != 1 and v > 1:
        logits = logits.contiguous()
    return logits.reshape(-1, v)


def _check_logits_labels(logits: Tensor, labels: Tensor) -> bool:
    """Returns True when labels hold one token per row (labels.shape == logits.shape[:-1])."""
    V.check_tensor("logits", logits, ndim_min=1)
    V.check_tensor("labels", labels)
    V.check_float("logits", logits, allow_fp64=True)
    V.check_integer("labels", labels)
    V.check_same_device(logits=logits, labels=labels)
    lead = tuple(logits.shape[:-1])
    if tuple(labels.shape) == lead:
        return True
    if labels.dim() == logits.dim() and tuple(labels.shape[:-1]) == lead:
        return False
    raise ValueError(
        f"labels: expected shape {lead} (one token per row) or {lead + ('K',)} (K tokens per row) "
        f"for logits of shape {tuple(logits.shape)}, got {tuple(labels.shape)}")


def _check_fused_dtype(logits: Tensor, backend: str) -> None:
    if logits.dtype == torch.float64:
        raise TypeError(
            f"logits: backend {backend!r} takes float32, bfloat16 or float16, got float64 "
            "(use backend='reference' for float64)")


def token_logprobs(
    logits: Tensor,
    labels: Tensor,
    *,
    temperature: float = 1.0,
    ignore_index: int = -100,
    return_entropy: bool = False,
    backend: str = "auto",
) -> Tuple[Tensor, Optional[Tensor]]:
    """Log-probabilities of the selected tokens (and the entropy of each row), without a log-softmax
    tensor in memory.

    Args:
        logits: ``(..., V)`` float32, bfloat16 or float16 (float64 with ``backend="reference"``).
        labels: ``(...)`` (one token per row) or ``(..., K)`` (K tokens per row, e.g. a top-K set),
            integer, values in ``[0, V)`` or ``ignore_index``.
        temperature: divides the logits (``> 0``), as TRL's trainers do before
            ``selective_log_softmax``.
        ignore_index: label value that is skipped: its log-prob is 0 and gets no gradient; a row
            whose labels are all ignored gets entropy 0 and no gradient.
        return_entropy: also return the entropy of each row's distribution.
        backend: ``"auto" | "triton" | "cuda" | "cpu" | "torch" | "reference"``.

    Returns:
        ``(logp, entropy)``: ``logp`` fp32 with the shape of ``labels``; ``entropy`` fp32 of shape
        ``logits.shape[:-1]``, or ``None`` when ``return_entropy=False``. Both are differentiable
        with respect to ``logits`` for any upstream gradient.

    With ``x = logits / temperature``, ``lse = log sum_j exp(x_j)`` and ``p = exp(x - lse)``::

        logp[..., k] = x[..., y_k] - lse
        entropy      = -sum_j p_j log p_j = lse - sum_j p_j x_j

    The same numbers as TRL's ``selective_log_softmax`` / ``selective_log_softmax_and_entropy``,
    accumulated in fp32 whatever the input dtype.
    """
    single = _check_logits_labels(logits, labels)
    temperature = V.check_positive("temperature", temperature)
    name = resolve_backend(backend, logits.device)
    v = logits.shape[-1]
    V.check_label_range(labels, v, ignore_index)
    if name == "reference":
        return token_logprobs_reference(logits, labels, temperature, ignore_index, return_entropy)
    _check_fused_dtype(logits, name)
    lead = logits.shape[:-1]
    k = 1 if single else labels.shape[-1]
    logp, entropy, _ = ops.token_logprobs_forward(
        _rows(logits), labels.reshape(-1, k).to(torch.int64).contiguous(), 1.0 / temperature,
        int(ignore_index), bool(return_entropy), name)
    logp = logp.reshape(labels.shape)
    return logp, (entropy.reshape(lead) if return_entropy else None)


def cross_entropy(
    logits: Tensor,
    labels: Tensor,
    *,
    ignore_index: int = -100,
    label_smoothing: float = 0.0,
    z_loss: float = 0.0,
    softcap: Optional[float] = None,
    reduction: str = "mean",
    backend: str = "auto",
) -> Tensor:
    """The SFT cross-entropy loss, fused: no log-softmax or fp32 copy of the logits in memory.

    Args:
        logits: ``(..., V)`` float32, bfloat16 or float16 (float64 with ``backend="reference"``).
        labels: ``(...)`` integer, values in ``[0, V)`` or ``ignore_index``.
        ignore_index: rows with this label contribute 0 and get no gradient.
        label_smoothing: ``eps`` in ``[0, 1]``, as in ``torch.nn.functional.cross_entropy``.
        z_loss: weight of the auxiliary ``lse**2`` term (PaLM's z-loss), ``>= 0``.
        softcap: ``None`` or ``c > 0``: the logits become ``c * tanh(logits / c)`` first (Gemma 2).
        reduction: ``"mean"`` (over non-ignored rows; 0 when every row is ignored, where PyTorch
            gives nan), ``"sum"``, or ``"none"`` (a loss per row, shape of ``labels``).
        backend: as in :func:`token_logprobs`.

    Returns:
        fp32 scalar (``mean``/``sum``) or fp32 tensor of the shape of ``labels`` (``none``).

    Per row, with ``x`` the (soft-capped) logits and ``lse = log sum_j exp(x_j)``::

        loss = (1 - eps) * (lse - x[y]) + eps * (lse - mean_j x_j) + z_loss * lse**2

    which equals ``torch.nn.functional.cross_entropy`` when ``z_loss = 0`` and ``softcap=None``.
    """
    single = _check_logits_labels(logits, labels)
    if not single:
        raise ValueError(
            f"labels: expected shape {tuple(logits.shape[:-1])} (one token per row), got "
            f"{tuple(labels.shape)}")
    V.check_choice("reduction", reduction, REDUCTIONS)
    eps = V.check_range("label_smoothing", label_smoothing, 0.0, 1.0, hi_inclusive=True)
    z = V.check_range("z_loss", z_loss, 0.0, float("inf"))
    cap = 0.0 if softcap is None else V.check_positive("softcap", softcap)
    name = resolve_backend(backend, logits.device)
    V.check_label_range(labels, logits.shape[-1], ignore_index)
    if name == "reference":
        return cross_entropy_reference(logits, labels, ignore_index, eps, z, softcap, reduction)
    _check_fused_dtype(logits, name)
    labels1d = labels.reshape(-1).to(torch.int64).contiguous()
    loss, _ = ops.cross_entropy_forward(_rows(logits), labels1d, int(ignore_index), eps, z, cap, name)
    if reduction == "none":
        return loss.reshape(labels.shape)
    if reduction == "sum":
        return loss.sum()
    # Count on the device: no host sync, and 0 / 1 = 0 when every row is ignored.
    return loss.sum() / (labels1d != ignore_index).sum().clamp_min(1)


class TokenLogprobs(nn.Module):
    """Module form of :func:`token_logprobs`; ``forward(logits, labels) -> (logp, entropy)``."""

    def __init__(self, *, temperature: float = 1.0, ignore_index: int = -100,
                 return_entropy: bool = False, backend: str = "auto"):
        super().__init__()
        self.kwargs = dict(temperature=temperature, ignore_index=ignore_index,
                           return_entropy=return_entropy, backend=backend)

    def forward(self, logits: Tensor, labels: Tensor) -> Tuple[Tensor, Optional[Tensor]]:
        return token_logprobs(logits, labels, **self.kwargs)


class CrossEntropyLoss(nn.Module):
    """Module form of :func:`cross_entropy`; ``forward(logits, labels) -> loss``."""

    def __init__(self, *, ignore_index: int = -100, label_smoothing: float = 0.0,
                 z_loss: float = 0.0, softcap: Optional[float] = None, reduction: str = "mean",
                 backend: str = "auto"):
        super().__init__()
        self.kwargs = dict(ignore_index=ignore_index, label_smoothing=label_smoothing,
                           z_loss=z_loss, softcap=softcap, reduction=reduction, backend=backend)

    def forward(self, logits: Tensor, labels: Tensor) -> Tensor:
        return cross_entropy(logits, labels, **self.kwargs)
