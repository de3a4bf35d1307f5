"""The head of a causal LM as the fused losses take it: ``Head(weight, bias, softcap, logit_scale)``,
and how to find the module that computes it in a (possibly wrapped) model."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Dict, Optional, Tuple

import torch
from torch import Tensor, nn


class UnsupportedModelError(TypeError):
    """The model (or its head) is not one :mod:`posttrain_kernels.models` can compute losses of."""


_WRAPPER_ATTRS = ("module", "_orig_mod")  # DDP / FSDP1 / DeepSpeedEngine, torch.compile


def unwrap(model) -> Any:
    """The innermost object with ``get_output_embeddings`` (DDP, FSDP1 and DeepSpeed engines wrap
    the Hugging Face model in ``.module``; a ``PeftModel`` forwards the method itself)."""
    m = model
    for _ in range(8):
        if callable(getattr(m, "get_output_embeddings", None)):
            return m
        nxt = next((getattr(m, a) for a in _WRAPPER_ATTRS if isinstance(getattr(m, a, None), nn.Module)),
                   None)
        if nxt is None:
            break
        m = nxt
    return m


def model_name(model) -> str:
    """The class name of the model inside its wrappers (a PeftModel's base model)."""
    m = unwrap(model)
    get_base = getattr(m, "get_base_model", None)
    if callable(get_base):
        try:
            m = get_base()
        except Exception:  # noqa: BLE001 - only for messages
            pass
    return type(m).__name__


def model_config(model):
    return getattr(unwrap(model), "config", None)


def output_embeddings(model) -> nn.Module:
    """``model.get_output_embeddings()``, or :class:`UnsupportedModelError` naming the model."""
    inner = unwrap(model)
    get = getattr(inner, "get_output_embeddings", None)
    if not callable(get):
        raise UnsupportedModelError(
            f"model: expected a transformers causal LM with get_output_embeddings() (e.g. "
            f"AutoModelForCausalLM), got {type(model).__name__} without one")
    module = get()
    if not isinstance(module, nn.Module):
        raise UnsupportedModelError(
            f"{type(inner).__name__}: get_output_embeddings() returned "
            f"{type(module).__name__}, expected the head module (an nn.Linear); a base model "
            "without an LM head (e.g. LlamaModel rather than LlamaForCausalLM) has no logits")
    return module


def is_dtensor(t) -> bool:
    return any(c.__name__ == "DTensor" for c in type(t).__mro__)


@dataclass(frozen=True, eq=False)
class Head:
    """The head as the fused losses take it, resolved inside the model's forward:

        logits = softcap(logit_scale * (hidden @ weight.T + bias)),  softcap(z) = c * tanh(z / c)

    Attributes:
        weight: ``(V, H')`` float, the head weight as ``nn.Linear`` stores it: the parameter
            itself for a plain head (a tied head is the input embedding), gathered by
            FSDP / ZeRO-3 at that moment; for a PEFT LoRA head the concatenation
            ``[W | B_1 | ... | B_k]`` (``H' = H + r_1 + ... + r_k``, differentiable in ``B_i``).
        bias: ``(V,)`` or ``None``.
        softcap: ``None`` or ``c > 0`` (Gemma 2/3's ``final_logit_softcapping``).
        logit_scale: multiplies the head output before the soft-cap (Cohere's ``logit_scale``,
            ``1 / logits_scaling`` for Granite).
    """

    weight: Tensor
    bias: Optional[Tensor] = None
    softcap: Optional[float] = None
    logit_scale: float = 1.0

    @property
    def kwargs(self) -> Dict[str, Any]:
        """``{"bias", "softcap", "logit_scale"}`` for :func:`~posttrain_kernels.linear_token_logprobs`
        and :func:`~posttrain_kernels.linear_cross_entropy`:
        ``ptk.linear_cross_entropy(hidden, head.weight, labels, **head.kwargs)``."""
        return {"bias": self.bias, "softcap": self.softcap, "logit_scale": self.logit_scale}

    def fold_scale(self, hidden: Tensor) -> Tuple[Tensor, Optional[Tensor]]:
        """``(hidden * logit_scale, bias * logit_scale)``: the inputs for the fused losses that take
        no ``logit_scale`` (``linear_preference_loss``, ``linear_policy_loss``,
        ``linear_distill_loss``), since ``s * (h @ W.T + b) = (s * h) @ W.T + s * b``.
        Raises ``ValueError`` for a soft-capped head, which they cannot express."""
        if self.softcap is not None:
            raise ValueError(f"softcap: this head soft-caps its logits (c={self.softcap!r}), which "
                             "a loss without a softcap argument cannot express; use "
                             "linear_token_logprobs / linear_cross_entropy with **head.kwargs")
        if self.logit_scale == 1.0:
            return hidden, self.bias
        s = self.logit_scale
        return hidden * s, (None if self.bias is None else self.bias * s)

    def logits(self, hidden: Tensor) -> Tensor:
        """The materialized ``(..., V)`` logits in the dtype of ``hidden`` (for checks and small
        inputs; the fused losses never build them)."""
        z = torch.nn.functional.linear(hidden, self.weight, self.bias)
        if self.logit_scale != 1.0:
            z = z * self.logit_scale
        if self.softcap is not None:
            z = torch.tanh(z / self.softcap) * self.softcap
        return z
