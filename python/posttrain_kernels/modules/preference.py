"""``nn.Module`` forms of the preference losses: the configuration goes to the constructor (and is
validated there), the per-batch tensors to ``forward``, which returns ``(loss, metrics)``."""
from __future__ import annotations

from typing import Dict, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor, nn

from .. import _validation as V
from ..api.preference import Scalar, _check_dpo_config, _check_kto_config, kto_loss, preference_loss
from ..api.preference_free import _check_cpo_config, cpo_loss, orpo_loss, simpo_loss

__all__ = ["DPOLoss", "SimPOLoss", "CPOLoss", "ORPOLoss", "KTOLoss"]


def _consistent_batch(*tensors: Optional[Tensor]) -> bool:
    """A non-empty batch of 1-D tensors of one shape (anything else is left to the validation of
    ``preference_loss``, before any state moves)."""
    ts = [t for t in tensors if t is not None]
    return (all(isinstance(t, Tensor) and t.dim() == 1 and t.shape == ts[0].shape for t in ts)
            and ts[0].shape[0] > 0)


class DPOLoss(nn.Module):
    """Module form of :func:`~posttrain_kernels.api.preference.preference_loss` (any of its loss
    types, or a weighted combination).

    ``forward(chosen_logps, rejected_logps, ref_chosen_logps=None, ref_rejected_logps=None, *,
    chosen_lengths=None, rejected_lengths=None, chosen_nll=None, chosen_wpo_logps=None,
    rejected_wpo_logps=None, wpo_weights=None, bco_delta=None) -> (loss, metrics)``; the tensors
    are as in ``preference_loss``.

    ``bco_running_mean=True`` (only with ``"bco_pair"`` among the loss types) restores the reward
    reference point of TRL releases before 1.0: ``delta`` is the running mean of the batch-mean
    reward ``mean(cat(beta * c, beta * r))`` over the training steps so far, this batch included
    (TRL's ``RunningMoments``, local to the process: no all-gather). The state lives in the buffers
    ``bco_reward_mean`` and ``bco_steps`` (saved in the ``state_dict``); it advances only in
    training mode (eval batches use it without moving it) and only for a non-empty batch.
    Without it, ``delta`` is ``forward``'s ``bco_delta`` (default 0, as TRL 1.16).
    """

    def __init__(
        self,
        *,
        loss_type: Union[str, Sequence[str]] = "sigmoid",
        beta: float = 0.1,
        label_smoothing: float = 0.0,
        loss_weights: Optional[Sequence[float]] = None,
        f_divergence_type: str = "reverse_kl",
        f_alpha_divergence_coef: float = 0.5,
        use_weighting: bool = False,
        rpo_alpha: Optional[float] = None,
        discopop_tau: float = 0.05,
        reference_free: bool = False,
        bco_running_mean: bool = False,
    ):
        super().__init__()
        types, _, beta_v, *_ = _check_dpo_config(loss_type, beta, label_smoothing, loss_weights,
                                                 f_divergence_type, f_alpha_divergence_coef, use_weighting,
                                                 rpo_alpha, discopop_tau)
        if bco_running_mean and "bco_pair" not in types:
            raise ValueError(f"bco_running_mean: needs 'bco_pair' among the loss types, got loss_type "
                             f"{list(types)}")
        self.kwargs = dict(loss_type=loss_type, beta=beta, label_smoothing=label_smoothing,
                           loss_weights=loss_weights, f_divergence_type=f_divergence_type,
                           f_alpha_divergence_coef=f_alpha_divergence_coef, use_weighting=use_weighting,
                           rpo_alpha=rpo_alpha, discopop_tau=discopop_tau, reference_free=reference_free)
        self.bco_running_mean = bool(bco_running_mean)
        self._beta = beta_v
        if self.bco_running_mean:
            self.register_buffer("bco_reward_mean", torch.zeros((), dtype=torch.float32))
            self.register_buffer("bco_steps", torch.zeros((), dtype=torch.int64))

    def forward(
        self,
        chosen_logps: Tensor,
        rejected_logps: Tensor,
        ref_chosen_logps: Optional[Tensor] = None,
        ref_rejected_logps: Optional[Tensor] = None,
        *,
        chosen_lengths: Optional[Tensor] = None,
        rejected_lengths: Optional[Tensor] = None,
        chosen_nll: Optional[Tensor] = None,
        chosen_wpo_logps: Optional[Tensor] = None,
        rejected_wpo_logps: Optional[Tensor] = None,
        wpo_weights: Optional[Tensor] = None,
        bco_delta: Optional[Scalar] = None,
    ) -> Tuple[Tensor, Dict[str, Tensor]]:
        new_state = None
        if self.bco_running_mean:
            if bco_delta is not None:
                raise ValueError("bco_delta: expected None with bco_running_mean=True (the module keeps the "
                                 "reference point), got a value")
            bco_delta = self.bco_reward_mean
            if self.training and _consistent_batch(chosen_logps, rejected_logps, ref_chosen_logps,
                                                   ref_rejected_logps):
                with torch.no_grad():
                    pc, pr = chosen_logps.detach().float(), rejected_logps.detach().float()
                    if ref_chosen_logps is not None and ref_rejected_logps is not None:
                        pc = pc - ref_chosen_logps.detach().float()
                        pr = pr - ref_rejected_logps.detach().float()
                    batch_mean = self._beta * torch.cat((pc, pr)).mean()
                    steps = self.bco_steps + 1
                    mean = self.bco_reward_mean + (batch_mean - self.bco_reward_mean) / steps
                new_state, bco_delta = (mean, steps), mean
        out = preference_loss(chosen_logps, rejected_logps, ref_chosen_logps, ref_rejected_logps,
                              chosen_lengths=chosen_lengths, rejected_lengths=rejected_lengths,
                              chosen_nll=chosen_nll, chosen_wpo_logps=chosen_wpo_logps,
                              rejected_wpo_logps=rejected_wpo_logps, wpo_weights=wpo_weights,
                              bco_delta=bco_delta, **self.kwargs)
        if new_state is not None:  # commit only once the batch passed validation
            self.bco_reward_mean.copy_(new_state[0])
            self.bco_steps.copy_(new_state[1])
        return out

    def extra_repr(self) -> str:
        return ", ".join(f"{k}={v!r}" for k, v in self.kwargs.items())


class SimPOLoss(nn.Module):
    """Module form of :func:`~posttrain_kernels.api.preference_free.simpo_loss`;
    ``forward(chosen_logps, rejected_logps, chosen_lengths, rejected_lengths, *, chosen_nll=None)
    -> (loss, metrics)``."""

    def __init__(self, *, beta: float = 2.0, gamma: float = 0.5, label_smoothing: float = 0.0,
                 sft_weight: float = 0.0):
        super().__init__()
        _check_cpo_config("simpo", beta, label_smoothing, sft_weight, gamma, 0.0)
        self.kwargs = dict(beta=beta, gamma=gamma, label_smoothing=label_smoothing, sft_weight=sft_weight)

    def forward(self, chosen_logps: Tensor, rejected_logps: Tensor, chosen_lengths: Tensor,
                rejected_lengths: Tensor, *, chosen_nll: Optional[Tensor] = None
                ) -> Tuple[Tensor, Dict[str, Tensor]]:
        return simpo_loss(chosen_logps, rejected_logps, chosen_lengths, rejected_lengths,
                          chosen_nll=chosen_nll, **self.kwargs)

    def extra_repr(self) -> str:
        return ", ".join(f"{k}={v!r}" for k, v in self.kwargs.items())


class CPOLoss(nn.Module):
    """Module form of :func:`~posttrain_kernels.api.preference_free.cpo_loss`;
    ``forward(chosen_logps, rejected_logps, chosen_lengths=None, rejected_lengths=None, *,
    chosen_nll=None) -> (loss, metrics)``."""

    def __init__(self, *, loss_type: str = "sigmoid", beta: float = 0.1, label_smoothing: float = 0.0,
                 cpo_alpha: float = 1.0, simpo_gamma: float = 0.5, alpha: float = 0.0):
        super().__init__()
        _check_cpo_config(loss_type, beta, label_smoothing, cpo_alpha, simpo_gamma, alpha)
        self.kwargs = dict(loss_type=loss_type, beta=beta, label_smoothing=label_smoothing,
                           cpo_alpha=cpo_alpha, simpo_gamma=simpo_gamma, alpha=alpha)

    def forward(self, chosen_logps: Tensor, rejected_logps: Tensor, chosen_lengths: Optional[Tensor] = None,
                rejected_lengths: Optional[Tensor] = None, *, chosen_nll: Optional[Tensor] = None
                ) -> Tuple[Tensor, Dict[str, Tensor]]:
        return cpo_loss(chosen_logps, rejected_logps, chosen_lengths, rejected_lengths,
                        chosen_nll=chosen_nll, **self.kwargs)

    def extra_repr(self) -> str:
        return ", ".join(f"{k}={v!r}" for k, v in self.kwargs.items())


class ORPOLoss(nn.Module):
    """Module form of :func:`~posttrain_kernels.api.preference_free.orpo_loss`;
    ``forward(chosen_logps, rejected_logps, chosen_lengths, rejected_lengths, *, chosen_nll=None)
    -> (loss, metrics)``."""

    def __init__(self, *, beta: float = 0.1):
        super().__init__()
        V.check_positive("beta", beta)
        self.kwargs = dict(beta=beta)

    def forward(self, chosen_logps: Tensor, rejected_logps: Tensor, chosen_lengths: Tensor,
                rejected_lengths: Tensor, *, chosen_nll: Optional[Tensor] = None
                ) -> Tuple[Tensor, Dict[str, Tensor]]:
        return orpo_loss(chosen_logps, rejected_logps, chosen_lengths, rejected_lengths,
                         chosen_nll=chosen_nll, **self.kwargs)

    def extra_repr(self) -> str:
        return f"beta={self.kwargs['beta']!r}"


class KTOLoss(nn.Module):
    """Module form of :func:`~posttrain_kernels.api.preference.kto_loss`;
    ``forward(chosen_logps, rejected_logps, ref_chosen_logps, ref_rejected_logps, *,
    policy_KL_logps=None, ref_KL_logps=None, kl=None) -> (loss, metrics)``."""

    def __init__(self, *, loss_type: str = "kto", beta: float = 0.1, desirable_weight: float = 1.0,
                 undesirable_weight: float = 1.0):
        super().__init__()
        _check_kto_config(loss_type, beta, desirable_weight, undesirable_weight)
        self.kwargs = dict(loss_type=loss_type, beta=beta, desirable_weight=desirable_weight,
                           undesirable_weight=undesirable_weight)

    def forward(self, chosen_logps: Tensor, rejected_logps: Tensor, ref_chosen_logps: Tensor,
                ref_rejected_logps: Tensor, *, policy_KL_logps: Optional[Tensor] = None,
                ref_KL_logps: Optional[Tensor] = None, kl: Optional[Scalar] = None
                ) -> Tuple[Tensor, Dict[str, Tensor]]:
        return kto_loss(chosen_logps, rejected_logps, ref_chosen_logps, ref_rejected_logps,
                        policy_KL_logps=policy_KL_logps, ref_KL_logps=ref_KL_logps, kl=kl, **self.kwargs)

    def extra_repr(self) -> str:
        return ", ".join(f"{k}={v!r}" for k, v in self.kwargs.items())
