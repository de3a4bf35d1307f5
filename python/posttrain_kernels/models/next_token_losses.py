"""Next-token log-probs and the SFT cross-entropy of a causal LM, fused with its head."""
from __future__ import annotations

from typing import Optional, Tuple, Union

import torch
from torch import Tensor

from ..api.linear_token_logprobs import linear_cross_entropy, linear_token_logprobs
from ..api.token_logprobs import REDUCTIONS
from .causal_lm_loss import causal_lm_loss
from .logit_transform import LogitTransform


def next_token_labels(labels: Tensor, ignore_index: int = -100) -> Tensor:
    """HF's shift of ``ForCausalLMLoss``: ``out[..., t] = labels[..., t + 1]`` and
    ``out[..., -1] = ignore_index``, same shape ``(B, T)`` as ``labels``, so that ``out[b, t]`` is
    the token predicted from the hidden state at position ``t``."""
    if not isinstance(labels, Tensor) or labels.dim() < 1:
        raise TypeError(f"labels: expected an integer tensor (B, T), got "
                        f"{getattr(labels, 'shape', type(labels).__name__)}")
    return torch.nn.functional.pad(labels[..., 1:], (0, 1), value=ignore_index)


def _check_ids(name: str, t: Tensor, shape=None) -> None:
    if not isinstance(t, Tensor) or t.dim() != 2:
        got = tuple(t.shape) if isinstance(t, Tensor) else type(t).__name__
        raise ValueError(f"{name}: expected a (B, T) tensor, got {got}")
    if shape is not None and tuple(t.shape) != tuple(shape):
        raise ValueError(f"{name}: expected shape {tuple(shape)} (that of input_ids), got "
                         f"{tuple(t.shape)}")


def token_logprobs(
    model,
    input_ids: Tensor,
    attention_mask: Optional[Tensor] = None,
    labels: Optional[Tensor] = None,
    *,
    temperature: float = 1.0,
    return_entropy: bool = False,
    ignore_index: int = -100,
    fp32_logits: bool = False,
    logit_transform: Optional[LogitTransform] = None,
    backend: str = "auto",
    **model_kwargs,
) -> Tuple[Tensor, Optional[Tensor]]:
    """Log-probs of the next tokens under a causal LM, without its logits in memory.

    Args:
        model: a ``transformers`` causal LM (see :func:`causal_lm_loss`).
        input_ids: ``(B, T)`` integer.
        attention_mask: ``(B, T)`` or None, passed to the model.
        labels: ``(B, T)`` integer, the tokens to score, unshifted as HF takes them (``labels[b,
            t]`` is the token at position ``t``), ``ignore_index`` where not scored. Default:
            ``input_ids`` with ``ignore_index`` where ``attention_mask == 0``.
        temperature: divides the (soft-capped, scaled) logits (a sampler's temperature).
        return_entropy: also return the entropy of each position's next-token distribution.
        fp32_logits: compute the head matmul in fp32 for bf16/fp16 models.
        logit_transform, **model_kwargs: as :func:`causal_lm_loss`.
        backend: backend of the fused kernels (``"auto"``, ``"cpu"``, ``"torch"``, ...).

    Returns:
        ``(logps, entropy)``, fp32 ``(B, T)`` aligned with the hidden states (HF's shift):

            logps[b, t] = log softmax(logits[b, t] / temperature)[labels[b, t + 1]]
                        = log p(labels[b, t + 1] | input_ids[b, :t + 1])

        for ``t < T - 1``; ``logps[b, t] = 0`` (no gradient) where ``labels[b, t + 1] ==
        ignore_index`` and at ``t = T - 1``. So ``logps[:, :-1]`` lines up with
        ``input_ids[:, 1:]`` (TRL's layout). ``entropy[b, t]`` is the entropy of that
        distribution, 0 where ``logps`` is ignored; ``None`` unless ``return_entropy``.
        Differentiable in every parameter (see :func:`causal_lm_loss`).
    """
    _check_ids("input_ids", input_ids)
    if labels is None:
        labels = input_ids
        if attention_mask is not None:
            _check_ids("attention_mask", attention_mask, input_ids.shape)
            labels = input_ids.masked_fill(attention_mask == 0, ignore_index)
    else:
        _check_ids("labels", labels, input_ids.shape)
    target = next_token_labels(labels, ignore_index)

    def loss_fn(hidden, head):
        return linear_token_logprobs(hidden, head.weight, target, temperature=temperature,
                                     ignore_index=ignore_index, return_entropy=return_entropy,
                                     fp32_logits=fp32_logits, backend=backend, **head.kwargs)

    return causal_lm_loss(model, loss_fn, logit_transform=logit_transform, input_ids=input_ids,
                          attention_mask=attention_mask, **model_kwargs)


def cross_entropy(
    model,
    input_ids: Tensor,
    labels: Tensor,
    attention_mask: Optional[Tensor] = None,
    *,
    reduction: str = "mean",
    num_items_in_batch: Optional[Union[int, Tensor]] = None,
    ignore_index: int = -100,
    fp32_logits: bool = False,
    logit_transform: Optional[LogitTransform] = None,
    backend: str = "auto",
    **model_kwargs,
) -> Tensor:
    """The SFT loss of ``model(input_ids, attention_mask, labels=labels).loss`` (HF's
    ``ForCausalLMLoss``), fused with the head: no logits in memory.

    Args:
        model: a ``transformers`` causal LM (see :func:`causal_lm_loss`).
        input_ids: ``(B, T)`` integer; ``attention_mask``: ``(B, T)`` or None (given to the
            model only: pads must be ``ignore_index`` in ``labels``, as HF's collators do).
        labels: ``(B, T)`` integer, unshifted (``labels[b, t]`` is the token at position ``t``),
            ``ignore_index`` where not trained on; shifted by one inside as HF does.
        reduction: ``"mean"``: the mean over the non-ignored next tokens (0, not NaN, when all
            are ignored), or ``sum / num_items_in_batch`` when ``num_items_in_batch`` is given
            (gradient accumulation, as HF's Trainer passes it); ``"sum"``; ``"none"``: fp32
            ``(B, T)``, ``loss[b, t] = -log p(labels[b, t + 1] | input_ids[b, :t + 1])``, 0
            where ignored and at ``t = T - 1``.
        num_items_in_batch: int or scalar tensor, the global count of non-ignored tokens;
            only with ``reduction="mean"``.
        ignore_index, fp32_logits, logit_transform, backend, **model_kwargs: as
            :func:`token_logprobs`.

    Returns:
        fp32: a scalar, or ``(B, T)`` for ``"none"``; differentiable in every parameter.
    """
    _check_ids("input_ids", input_ids)
    _check_ids("labels", labels, input_ids.shape)
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction: expected one of {REDUCTIONS}, got {reduction!r}")
    if num_items_in_batch is not None and reduction != "mean":
        raise ValueError(f"num_items_in_batch: expected None with reduction={reduction!r} (it "
                         f"divides the summed loss of reduction='mean'), got {num_items_in_batch!r}")
    target = next_token_labels(labels, ignore_index)
    inner = reduction if num_items_in_batch is None else "sum"

    def loss_fn(hidden, head):
        loss = linear_cross_entropy(hidden, head.weight, target, ignore_index=ignore_index,
                                    reduction=inner, fp32_logits=fp32_logits, backend=backend,
                                    **head.kwargs)
        if num_items_in_batch is not None:
            n = num_items_in_batch
            loss = loss / (n.to(loss.device) if isinstance(n, Tensor) else n)
        return loss

    return causal_lm_loss(model, loss_fn, logit_transform=logit_transform, input_ids=input_ids,
                          attention_mask=attention_mask, **model_kwargs)
