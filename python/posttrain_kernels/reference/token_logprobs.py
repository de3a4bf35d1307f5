"""Reference token log-probs, entropy and cross-entropy, materialized with eager PyTorch ops."""
from __future__ import annotations

from typing import Optional, Tuple

import torch


def token_logprobs_reference(
    logits: torch.Tensor,
    labels: torch.Tensor,
    temperature: float = 1.0,
    ignore_index: int = -100,
    return_entropy: bool = False,
) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """Log-probs of ``labels`` under ``softmax(logits / temperature)``, and the entropy of each row.

    logits ``(..., V)`` any float dtype; labels ``(...)`` or ``(..., K)`` integer.
    Returns ``(logp, entropy)``: logp fp32 (fp64 for fp64 logits) with the labels' shape, 0 where a label is ``ignore_index``;
    entropy fp32 ``(...)`` (``None`` unless asked), 0 for rows whose labels are all ignored.

    ``x = logits / T``, ``logp_k = x[y_k] - logsumexp(x)``, ``H = -sum_j p_j log p_j``.
    """
    # fp32 for every low-precision input; fp64 stays fp64 so the reference can serve as the oracle.
    x = logits.to(torch.promote_types(logits.dtype, torch.float32)) / temperature
    logp_all = torch.log_softmax(x, dim=-1)
    single = labels.dim() == logits.dim() - 1
    lab = labels.unsqueeze(-1) if single else labels
    ignored = lab == ignore_index
    logp = logp_all.gather(-1, lab.masked_fill(ignored, 0).long()).masked_fill(ignored, 0.0)
    entropy = None
    if return_entropy:
        p = logp_all.exp()
        # 0 * log 0 := 0: -inf logits (p == 0) must not turn the entropy or its gradient into nan,
        # so the -inf log-probs are replaced before the product (a where() after it still leaks
        # 0 * inf = nan into the backward).
        entropy = -(p * logp_all.masked_fill(p == 0, 0.0)).sum(-1)
        entropy = entropy.masked_fill(ignored.all(-1), 0.0)
    if single:
        logp = logp.squeeze(-1)
    return logp, entropy


def cross_entropy_reference(
    logits: torch.Tensor,
    labels: torch.Tensor,
    ignore_index: int = -100,
    label_smoothing: float = 0.0,
    z_loss: float = 0.0,
    softcap: Optional[float] = None,
    reduction: str = "mean",
) -> torch.Tensor:
    """SFT cross-entropy in fp32: ``torch.nn.functional.cross_entropy`` plus z-loss and soft-capping.

    logits ``(..., V)``, labels ``(...)``. Per row, with ``x = softcap * tanh(logits / softcap)``
    (or ``x = logits``) and ``lse = logsumexp(x)``:
    ``loss = (1 - eps) * (lse - x[y]) + eps * (lse - mean(x)) + z_loss * lse**2``; 0 for ignored rows.
    ``reduction``: ``"none"`` (shape of labels), ``"sum"``, or ``"mean"`` (divided by the number of
    non-ignored rows; 0 when all are ignored, where PyTorch would give nan).
    """
    x = logits.to(torch.promote_types(logits.dtype, torch.float32))
    if softcap is not None:
        x = softcap * torch.tanh(x / softcap)
    v = x.shape[-1]
    x2 = x.reshape(-1, v)
    lab = labels.reshape(-1).long()
    valid = lab != ignore_index
    loss = torch.nn.functional.cross_entropy(
        x2, lab, ignore_index=ignore_index, reduction="none", label_smoothing=label_smoothing
    )
    if z_loss:
        lse = torch.logsumexp(x2, dim=-1)
        loss = loss + torch.where(valid, z_loss * lse * lse, torch.zeros_like(lse))
    if reduction == "none":
        return loss.reshape(labels.shape)
    if reduction == "sum":
        return loss.sum()
    return loss.sum() / valid.sum().clamp_min(1)
