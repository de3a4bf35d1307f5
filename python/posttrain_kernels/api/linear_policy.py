"""Fused-linear policy-gradient loss: the GRPO family from the policy's hidden states and head,
with no logits of the policy or of the reference model in memory."""
from __future__ import annotations

from typing import Dict, Optional, Tuple

import torch
from torch import Tensor

from .. import _validation as V
from ..dispatch import resolve_backend
from ..ops.linear_head import use_vocab_blocks
from ..ops.linear_token_loss import LinearTokenLoss, gradient_of_rows, group_rows
from ..reference import linear_token_logprobs_reference
from .linear_token_logprobs import _autocast_inputs, _prepare, _schedule, linear_token_logprobs
from .policy import POLICY_METRIC_KEYS, policy_loss


def linear_policy_loss(
    hidden: Tensor,
    weight: Tensor,
    labels: Tensor,
    old_logps: Optional[Tensor],
    advantages: Tensor,
    mask: Tensor,
    *,
    bias: Optional[Tensor] = None,
    ref_logps: Optional[Tensor] = None,
    ref_hidden: Optional[Tensor] = None,
    ref_weight: Optional[Tensor] = None,
    ref_bias: Optional[Tensor] = None,
    temperature: float = 1.0,
    ignore_index: int = -100,
    chunk_size: Optional[int] = None,
    fp32_logits: bool = False,
    backend: str = "auto",
    **policy_kwargs,
) -> Tuple[Tensor, Dict[str, Tensor]]:
    """:func:`policy_loss` of the policy's token log-probs and entropy computed from its hidden
    states: ``logps[b, t] = log softmax((hidden[b, t] @ weight.T + bias) / temperature)[labels[b, t]]``
    and the entropy of that distribution, by the fused linear kernels.

    Args:
        hidden: ``(B, T, H)`` the policy's last hidden states at the completion positions (row
            ``b``, position ``t`` predicts ``labels[b, t]``).
        weight, bias: the head, ``(V, H)`` and ``(V,)``.
        labels: ``(B, T)`` the sampled completion tokens (any valid id, or ``ignore_index``, where
            ``mask`` is off).
        old_logps, advantages, mask: as :func:`policy_loss` (``old_logps=None``: on-policy).
        ref_logps: ``(B, T)`` the reference's token log-probs, precomputed; or ``ref_hidden
            (B, T, H')``, ``ref_weight (V, H')``, ``ref_bias``: computed here by the same kernels
            without gradients (with the same temperature, as TRL does).
        temperature: divides the logits (TRL's ``temperature``).
        chunk_size: token rows per chunk (default from ``POSTTRAIN_KERNELS_CHUNK_BYTES``).
        policy_kwargs: every option of :func:`policy_loss` (``loss_type``, ``epsilon_low``,
            ``beta``, ``entropy_coef``, ``loss_agg_mode``, ...).

    Returns:
        ``(loss, metrics)`` as :func:`policy_loss`; the loss is differentiable in ``hidden``,
        ``weight`` and ``bias``.

    Schedule: rows are processed in groups that fit the chunk budget; a group's logits give its
    log-probs and entropy, then the gradient of the loss w.r.t. them (the rows of these loss types
    do not interact), then the in-place gradient of the logits and the two gradient GEMMs: three
    head GEMMs in all. ``top_entropy_quantile < 1`` (a quantile over the whole batch) and
    bf16/fp16 heads whose gradient is wanted go through :func:`linear_token_logprobs` instead
    (four GEMMs).
    """
    _prepare(hidden, weight, bias, labels, chunk_size, allow_fp64=(backend == "reference"))
    if hidden.dim() != 3 or labels.dim() != 2:
        raise ValueError(f"hidden: expected shape (B, T, H) with labels (B, T), got {tuple(hidden.shape)} "
                         f"and {tuple(labels.shape)}")
    b, t = labels.shape
    temperature = V.check_positive("temperature", temperature)
    name = resolve_backend(backend, hidden.device)
    V.check_label_range(labels, weight.shape[0], ignore_index)
    ref = _reference(ref_logps, ref_hidden, ref_weight, ref_bias, labels, temperature, ignore_index,
                     chunk_size, name)
    # every check of policy_loss (shapes, dtypes, options) before any head GEMM
    zeros = torch.zeros((b, t), device=hidden.device)
    with torch.no_grad():
        policy_loss(zeros, old_logps, advantages, mask, ref_logps=ref, entropy=zeros, **policy_kwargs)

    def loss_of(lp, ent, backend="auto"):
        return policy_loss(lp, old_logps, advantages, mask, ref_logps=ref, entropy=ent, backend=backend,
                           **policy_kwargs)

    def row_loss(lp, ent):
        # under torch.compile the token gradient is taken by torch.func, which cannot differentiate a
        # custom op (the fused policy op): the policy term's PyTorch path there, same formulas
        return loss_of(lp, ent, "torch" if torch.compiler.is_compiling() else "auto")[0]

    if name == "reference":
        lp, ent = linear_token_logprobs_reference(hidden, weight, labels, bias, temperature, ignore_index, True)
        return loss_of(lp, ent)
    hidden, weight, bias = _autocast_inputs(hidden, weight, bias)
    grad_w = torch.is_grad_enabled() and weight.requires_grad
    if use_vocab_blocks(weight, grad_w) or policy_kwargs.get("top_entropy_quantile", 1.0) < 1.0:
        lp, ent = linear_token_logprobs(hidden, weight, labels, bias=bias, temperature=temperature,
                                        ignore_index=ignore_index, return_entropy=True, chunk_size=chunk_size,
                                        fp32_logits=fp32_logits, backend=name)
        return loss_of(lp, ent)

    need_ent = float(policy_kwargs.get("entropy_coef", 0.0)) != 0.0
    placeholder = (zeros if old_logps is None else old_logps.detach().float())
    token_grad = gradient_of_rows(row_loss, placeholder, zeros, need_ent)

    def loss_fn(lp, ent):
        loss, metrics = loss_of(lp, ent)
        return loss, torch.stack([metrics[k].float() for k in POLICY_METRIC_KEYS])

    chunk, _ = _schedule(chunk_size, b * t, weight, fp32_logits)
    h = hidden.shape[-1]
    with torch.autocast(hidden.device.type, enabled=False):
        loss, met, _, _ = LinearTokenLoss.apply(
            hidden.reshape(-1, h), weight, bias, labels.reshape(-1, 1).to(torch.int64).contiguous(), t,
            group_rows(chunk, t), token_grad, loss_fn, 1.0 / temperature, int(ignore_index), chunk,
            bool(fp32_logits), torch.is_grad_enabled(), name)
    return loss, dict(zip(POLICY_METRIC_KEYS, met.unbind()))


def _reference(ref_logps, ref_hidden, ref_weight, ref_bias, labels, temperature, ignore_index, chunk_size,
               backend) -> Optional[Tensor]:
    if ref_logps is not None:
        if ref_hidden is not None or ref_weight is not None:
            raise ValueError("ref_logps: expected either ref_logps or ref_hidden and ref_weight, got both")
        return ref_logps
    if (ref_hidden is None) != (ref_weight is None):
        missing = "ref_weight" if ref_weight is None else "ref_hidden"
        other = "ref_hidden" if missing == "ref_weight" else "ref_weight"
        raise ValueError(f"{missing}: expected with {other}, got None")
    if ref_hidden is None:
        return None
    if tuple(ref_hidden.shape[:2]) != tuple(labels.shape):
        raise ValueError(f"ref_hidden: expected shape {tuple(labels.shape) + ('H',)}, got {tuple(ref_hidden.shape)}")
    with torch.no_grad():
        if backend == "reference":
            lp, _ = linear_token_logprobs_reference(ref_hidden, ref_weight, labels, ref_bias, temperature,
                                                    ignore_index)
        else:
            lp, _ = linear_token_logprobs(ref_hidden, ref_weight, labels, bias=ref_bias, temperature=temperature,
                                          ignore_index=ignore_index, chunk_size=chunk_size, backend=backend)
    return lp
