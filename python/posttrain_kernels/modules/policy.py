"""``nn.Module`` forms of the policy-gradient and value losses: the configuration goes to the
constructor (and is validated there), the per-batch tensors to ``forward``, which returns
``(loss, metrics)``."""
from __future__ import annotations

from typing import Dict, Optional, Tuple

from torch import Tensor, nn

from ..api.policy import (Count, _check_int, _policy_loss_checked, _policy_options, _value_loss_checked,
                          _value_options)

__all__ = ["PolicyLoss", "ValueLoss"]


class PolicyLoss(nn.Module):
    """Module form of :func:`~posttrain_kernels.api.policy.policy_loss`.

    The constructor takes the options of ``policy_loss`` (same names, defaults and meaning; they are
    checked once, here). ``forward(logps, old_logps, advantages, mask, *, ref_logps=None,
    entropy=None, sampling_logps=None, importance_sampling_ratio=None, is_truncated=None,
    num_items_in_batch=None, gradient_accumulation_steps=None) -> (loss, metrics)``: the tensors as
    in ``policy_loss``; ``num_items_in_batch`` changes every step, and ``gradient_accumulation_steps``
    (``None`` = the constructor's) may change for the last, shorter accumulation window of an epoch.
    """

    def __init__(
        self,
        *,
        loss_type: str = "dapo",
        loss_agg_mode: Optional[str] = None,
        importance_sampling_level: Optional[str] = None,
        epsilon_low: float = 0.2,
        epsilon_high: Optional[float] = None,
        delta: Optional[float] = None,
        clip_ratio_c: Optional[float] = None,
        sapo_temperature_pos: float = 1.0,
        sapo_temperature_neg: float = 1.05,
        vespo_k_pos: float = 2.0,
        vespo_lambda_pos: float = 3.0,
        vespo_k_neg: float = 3.0,
        vespo_lambda_neg: float = 2.0,
        beta: float = 0.0,
        kl_estimator: str = "k3",
        use_bias_correction_kl: bool = True,
        entropy_coef: float = 0.0,
        top_entropy_quantile: float = 1.0,
        off_policy_mask_threshold: Optional[float] = None,
        max_completion_length: Optional[int] = None,
        gradient_accumulation_steps: int = 1,
        backend: str = "auto",
    ):
        super().__init__()
        self.kwargs = dict(
            loss_type=loss_type, loss_agg_mode=loss_agg_mode,
            importance_sampling_level=importance_sampling_level, epsilon_low=epsilon_low,
            epsilon_high=epsilon_high, delta=delta, clip_ratio_c=clip_ratio_c,
            sapo_temperature_pos=sapo_temperature_pos, sapo_temperature_neg=sapo_temperature_neg,
            vespo_k_pos=vespo_k_pos, vespo_lambda_pos=vespo_lambda_pos, vespo_k_neg=vespo_k_neg,
            vespo_lambda_neg=vespo_lambda_neg, beta=beta, kl_estimator=kl_estimator,
            use_bias_correction_kl=use_bias_correction_kl, entropy_coef=entropy_coef,
            top_entropy_quantile=top_entropy_quantile, off_policy_mask_threshold=off_policy_mask_threshold,
            max_completion_length=max_completion_length,
            gradient_accumulation_steps=gradient_accumulation_steps, backend=backend)
        self._options = _policy_options(**self.kwargs)

    def forward(
        self,
        logps: Tensor,
        old_logps: Optional[Tensor],
        advantages: Tensor,
        mask: Tensor,
        *,
        ref_logps: Optional[Tensor] = None,
        entropy: Optional[Tensor] = None,
        sampling_logps: Optional[Tensor] = None,
        importance_sampling_ratio: Optional[Tensor] = None,
        is_truncated: Optional[Tensor] = None,
        num_items_in_batch: Optional[Count] = None,
        gradient_accumulation_steps: Optional[int] = None,
    ) -> Tuple[Tensor, Dict[str, Tensor]]:
        o = self._options
        if gradient_accumulation_steps is not None:
            o = dict(o, ga=_check_int("gradient_accumulation_steps", gradient_accumulation_steps, 1))
        return _policy_loss_checked(
            o, logps, old_logps, advantages, mask, ref_logps=ref_logps, entropy=entropy,
            sampling_logps=sampling_logps, importance_sampling_ratio=importance_sampling_ratio,
            is_truncated=is_truncated, num_items_in_batch=num_items_in_batch)

    def extra_repr(self) -> str:
        o = self._options
        return f"loss_type={self.kwargs['loss_type']!r}, level={o['level']!r}, agg={o['agg']!r}"


class ValueLoss(nn.Module):
    """Module form of :func:`~posttrain_kernels.api.policy.value_loss`.

    ``forward(values, old_values, returns, mask, *, num_items_in_batch=None) -> (loss, metrics)``.
    """

    def __init__(
        self,
        *,
        cliprange_value: Optional[float] = 0.2,
        loss_agg_mode: str = "token-mean",
        max_completion_length: Optional[int] = None,
        gradient_accumulation_steps: int = 1,
        backend: str = "auto",
    ):
        super().__init__()
        self.kwargs = dict(cliprange_value=cliprange_value, loss_agg_mode=loss_agg_mode,
                           max_completion_length=max_completion_length,
                           gradient_accumulation_steps=gradient_accumulation_steps, backend=backend)
        self._options = _value_options(**self.kwargs)

    def forward(
        self,
        values: Tensor,
        old_values: Optional[Tensor],
        returns: Tensor,
        mask: Tensor,
        *,
        num_items_in_batch: Optional[Count] = None,
    ) -> Tuple[Tensor, Dict[str, Tensor]]:
        return _value_loss_checked(self._options, values, old_values, returns, mask,
                                   num_items_in_batch=num_items_in_batch)
