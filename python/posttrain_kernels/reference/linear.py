"""Reference fused-linear losses: materialize ``hidden @ weight.T + bias`` and call the references."""
from __future__ import annotations

from typing import Optional, Tuple

import torch

from .token_logprobs import cross_entropy_reference, token_logprobs_reference


def reference_logits(hidden: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None,
                     softcap: Optional[float] = None, logit_scale: float = 1.0) -> torch.Tensor:
    """``softcap * tanh(logit_scale * (hidden @ weight.T + bias) / softcap)``, in the matmul dtype."""
    logits = torch.nn.functional.linear(hidden, weight, bias)
    if logit_scale != 1.0:
        logits = logits * logit_scale
    if softcap is not None:
        logits = softcap * torch.tanh(logits.float() / softcap)
    return logits


def linear_token_logprobs_reference(hidden, weight, labels, bias=None, temperature=1.0,
                                    ignore_index=-100, return_entropy=False, softcap=None,
                                    logit_scale=1.0) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """``token_logprobs_reference`` of the materialized logits."""
    logits = reference_logits(hidden, weight, bias, softcap, logit_scale)
    return token_logprobs_reference(logits, labels, temperature, ignore_index, return_entropy)


def linear_cross_entropy_reference(hidden, weight, labels, bias=None, ignore_index=-100,
                                   label_smoothing=0.0, z_loss=0.0, softcap=None, logit_scale=1.0,
                                   reduction="mean") -> torch.Tensor:
    """``cross_entropy_reference`` of the materialized logits."""
    logits = reference_logits(hidden, weight, bias, None, logit_scale)
    return cross_entropy_reference(logits, labels, ignore_index, label_smoothing, z_loss, softcap,
                                   reduction)
