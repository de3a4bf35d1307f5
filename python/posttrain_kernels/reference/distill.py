"""Reference distillation divergences: materialized, eager, differentiable (the oracle of the
distillation family's tests and the baseline of its benchmarks)."""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F



def distill_divergence_reference(student_logits: torch.Tensor, teacher_logits: torch.Tensor,
                                 divergence: str = "forward_kl", beta: float = 0.5,
                                 temperature: float = 1.0) -> torch.Tensor:
    """Per-token divergence ``(...,)`` (summed over the vocabulary), computed in the inputs' dtype
    promoted to at least fp32, the way TRL's ``generalized_jsd_loss`` writes it (``F.kl_div`` with
    log targets; ``beta`` 0 and 1 special-cased to the two KLs)."""
    dt = torch.promote_types(student_logits.dtype, torch.float32)
    ls = F.log_softmax(student_logits.to(dt) / temperature, dim=-1)
    lt = F.log_softmax(teacher_logits.to(dt) / temperature, dim=-1)
    if divergence == "forward_kl" or (divergence == "jsd" and beta == 0):
        per = F.kl_div(ls, lt, reduction="none", log_target=True)
    elif divergence == "reverse_kl" or (divergence == "jsd" and beta == 1):
        per = F.kl_div(lt, ls, reduction="none", log_target=True)
    elif divergence == "jsd":
        b = torch.tensor(beta, dtype=dt, device=ls.device)
        lm = torch.logsumexp(torch.stack([ls + torch.log1p(-b), lt + torch.log(b)]), dim=0)
        per = b * F.kl_div(lm, lt, reduction="none", log_target=True) + \
            (1 - b) * F.kl_div(lm, ls, reduction="none", log_target=True)
    elif divergence == "skew_kl":
        lr = torch.log(beta * lt.exp() + (1 - beta) * ls.exp())
        per = F.kl_div(lr, lt, reduction="none", log_target=True)
    elif divergence == "skew_reverse_kl":
        lr = torch.log(beta * ls.exp() + (1 - beta) * lt.exp())
        per = F.kl_div(lr, ls, reduction="none", log_target=True)
    elif divergence == "tvd":
        per = 0.5 * (ls.exp() - lt.exp()).abs()
    else:
        raise ValueError(f"divergence: unknown {divergence!r}")
    return per.sum(-1)


def distill_loss_reference(student_logits, teacher_logits, labels: Optional[torch.Tensor] = None,
                           divergence: str = "forward_kl", beta: float = 0.5, temperature: float = 1.0,
                           ignore_index: int = -100, reduction: str = "batchmean") -> torch.Tensor:
    """TRL's reductions: ``batchmean`` = sum over unmasked tokens / their number (at least 1), or /
    ``student_logits.shape[0]`` without labels; ``sum``; ``mean`` = sum / (tokens x V);
    ``none`` = per-token divergences (0 where masked)."""
    v = min(student_logits.shape[-1], teacher_logits.shape[-1])
    per = distill_divergence_reference(student_logits[..., :v], teacher_logits[..., :v], divergence, beta,
                                       temperature)
    if labels is not None:
        keep = labels != ignore_index
        per = torch.where(keep, per, torch.zeros_like(per))
        count = keep.sum().clamp_min(1)
    else:
        count = max(student_logits.shape[0], 1)
    if reduction == "none":
        return per
    if reduction == "sum":
        return per.sum()
    if reduction == "mean":
        n_tok = (labels != ignore_index).sum() if labels is not None else per.numel()
        return per.sum() / (n_tok * v if not isinstance(n_tok, torch.Tensor) else (n_tok * v).clamp_min(1))
    return per.sum() / count
