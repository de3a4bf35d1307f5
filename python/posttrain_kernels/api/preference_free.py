"""Reference-free preference losses on per-sequence log-probs: SimPO, CPO (with its SimPO and
AlphaPO variants) and ORPO, with the semantics of TRL 1.16's ``CPOTrainer`` and ``ORPOTrainer``
(``trl.experimental``). The reference-based DPO family and KTO are in
:mod:`posttrain_kernels.api.preference`.

Inputs are per-sequence log-probs summed over each completion's tokens, ``(B,)``; the loss types
that work on per-token averages (SimPO, IPO, ORPO) take the token counts and divide here, so one
set of inputs serves every loss. Computed in fp32 whatever the input dtype, without host syncs.
"""
from __future__ import annotations

from typing import Dict, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

from .. import _validation as V
from .preference import (PREFERENCE_METRICS, _batch_vector, _check_nll, _lengths, _mean,
                         _nll_per_sequence, _pair_metrics, _per_token, _sigmoid_smoothed)

CPO_LOSS_TYPES = ("sigmoid", "hinge", "ipo", "simpo")
"""The ``loss_type`` values of :func:`cpo_loss` (those of TRL's ``CPOConfig``; its ``"alphapo"``
is ``"simpo"`` with ``alpha != 0`` and ``cpo_alpha=0``)."""
CPO_AVERAGED_LOSS_TYPES = ("ipo", "simpo")  # TRL's CPO averages the log-probs per token for these

ORPO_METRICS = PREFERENCE_METRICS + ("log_odds_ratio", "log_odds_chosen")
"""The keys of the metrics dict of :func:`orpo_loss`."""

ORPO_MAX_AVG_LOGP = -1e-7
"""ORPO's odds ``p / (1 - p)`` are infinite at ``p = 1``: average log-probs above this value (a
zero-length completion, or one the policy is certain of) are clamped to it inside
``log(1 - exp(.))``, where TRL's formula gives -inf (and NaN losses and gradients)."""

_NEG_LN2 = -0.6931471805599453


def _log1mexp(x: Tensor) -> Tensor:
    """``log(1 - exp(x))`` for ``x < 0`` without cancellation (branch at ``-ln 2``, as TRL's)."""
    return torch.where(x < _NEG_LN2, torch.log1p(-torch.exp(x)), torch.log(-torch.expm1(x)))


def _check_pair(chosen_logps, rejected_logps) -> int:
    b = _batch_vector("chosen_logps", chosen_logps)
    _batch_vector("rejected_logps", rejected_logps, b, "chosen_logps")
    return b


def _check_lengths(chosen_lengths, rejected_lengths, b: int, required_by: Optional[str]) -> None:
    for name, t in (("chosen_lengths", chosen_lengths), ("rejected_lengths", rejected_lengths)):
        if t is None:
            if required_by is not None:
                raise ValueError(f"{name}: {required_by} averages the log-probs over the completion tokens "
                                 "and needs chosen_lengths and rejected_lengths (token counts), got None")
        else:
            _lengths(name, t, b, "chosen_logps")


def _check_cpo_config(loss_type, beta, label_smoothing, cpo_alpha, simpo_gamma, alpha):
    V.check_choice("loss_type", loss_type, CPO_LOSS_TYPES)
    beta = V.check_positive("beta", beta)
    eps = V.check_range("label_smoothing", label_smoothing, 0.0, 1.0, hi_inclusive=True)
    cpo_alpha = V.check_finite("cpo_alpha", cpo_alpha)
    gamma = V.check_finite("simpo_gamma", simpo_gamma)
    alpha = V.check_finite("alpha", alpha)
    return beta, eps, cpo_alpha, gamma, alpha


def _cpo(chosen_logps, rejected_logps, chosen_lengths, rejected_lengths, chosen_nll, loss_type, beta, eps,
         nll_weight, gamma, alpha, nll_weight_name):
    b = _check_pair(chosen_logps, rejected_logps)
    averaged = loss_type in CPO_AVERAGED_LOSS_TYPES
    _check_lengths(chosen_lengths, rejected_lengths, b, f"loss_type {loss_type!r}" if averaged else None)
    if chosen_nll is not None:
        _check_nll(chosen_nll, b)
    elif nll_weight != 0.0:
        raise ValueError(f"chosen_nll: {nll_weight_name}={nll_weight} needs the NLL of the chosen "
                         f"completions, got None (pass {nll_weight_name}=0.0 for no NLL term)")
    V.check_same_device(chosen_logps=chosen_logps, rejected_logps=rejected_logps,
                        chosen_lengths=chosen_lengths, rejected_lengths=rejected_lengths,
                        chosen_nll=chosen_nll)

    pc, pr = chosen_logps.float(), rejected_logps.float()
    if averaged:
        pc, pr = _per_token(pc, chosen_lengths), _per_token(pr, rejected_lengths)
    if alpha != 0.0:  # AlphaPO reward (1 - p^-alpha) / alpha, with p = exp(logp)
        uc, ur = -torch.expm1(-alpha * pc) / alpha, -torch.expm1(-alpha * pr) / alpha
    else:
        uc, ur = pc, pr
    logits = uc - ur
    if loss_type == "simpo":
        losses = _sigmoid_smoothed(beta * logits - gamma, eps)
    elif loss_type == "sigmoid":
        losses = _sigmoid_smoothed(beta * logits, eps)
    elif loss_type == "hinge":
        losses = torch.relu(1.0 - beta * logits)
    else:  # ipo
        losses = (logits - 1.0 / (2.0 * beta)) ** 2
    loss = _mean(losses)
    if nll_weight != 0.0:
        loss = loss + nll_weight * _mean(_nll_per_sequence(chosen_nll, b))
    return loss, _pair_metrics(beta * uc, beta * ur, pc, pr, chosen_nll)


def cpo_loss(
    chosen_logps: Tensor,
    rejected_logps: Tensor,
    chosen_lengths: Optional[Tensor] = None,
    rejected_lengths: Optional[Tensor] = None,
    *,
    chosen_nll: Optional[Tensor] = None,
    loss_type: str = "sigmoid",
    beta: float = 0.1,
    label_smoothing: float = 0.0,
    cpo_alpha: float = 1.0,
    simpo_gamma: float = 0.5,
    alpha: float = 0.0,
) -> Tuple[Tensor, Dict[str, Tensor]]:
    """CPO (Xu et al. 2024, https://huggingface.co/papers/2401.08417): a reference-free preference
    loss plus ``cpo_alpha`` times the NLL of the chosen completions, with the loss types, defaults
    and metrics of TRL 1.16's ``CPOTrainer``.

    Args:
        chosen_logps, rejected_logps: ``(B,)`` policy log-probs summed over each completion's tokens;
            float32, bfloat16, float16 or float64; differentiable.
        chosen_lengths, rejected_lengths: ``(B,)`` token counts (integer or float), required by
            ``"ipo"`` and ``"simpo"``, which use the per-token average ``logps / max(n, 1)`` (TRL's
            ``average_log_prob=True``); ignored by ``"sigmoid"`` and ``"hinge"``.
        chosen_nll: NLL of the chosen completions, a scalar (TRL: the cross-entropy averaged over
            all chosen tokens of the batch) or ``(B,)`` (averaged over pairs); required when
            ``cpo_alpha != 0``. Differentiable.
        loss_type: ``"sigmoid"`` (CPO), ``"hinge"``, ``"ipo"`` or ``"simpo"``.
        beta: ``> 0`` (TRL's default 0.1).
        label_smoothing: ``eps`` in ``[0, 1]``, for ``"sigmoid"`` and ``"simpo"``.
        cpo_alpha: weight of the NLL term (TRL's default 1.0; 0 for pure SimPO).
        simpo_gamma: SimPO's target reward margin ``gamma`` (TRL's default 0.5).
        alpha: AlphaPO's ``alpha`` (0 for none): the reward becomes ``(1 - p^-alpha) / alpha``.

    Returns:
        ``(loss, metrics)``: ``loss`` a float32 scalar; ``metrics`` detached float32 scalars with the
        keys of :data:`~posttrain_kernels.api.preference.PREFERENCE_METRICS`: ``rewards/* = beta *
        u`` (below; TRL's definitions), ``logps/*`` the means of the log-probs the loss used (per
        token for ``ipo`` / ``simpo``), ``nll_loss`` the mean of ``chosen_nll`` (0 without it).

    With ``l_c``, ``l_r`` the log-probs (per-token averages for ipo / simpo), ``u = l`` (or
    ``u = -expm1(-alpha l) / alpha`` with AlphaPO), ``z = u_c - u_r``::

        sigmoid  -(1 - eps) logsigmoid(beta z) - eps logsigmoid(-beta z)
        hinge    relu(1 - beta z)
        ipo      (z - 1 / (2 beta))^2
        simpo    -(1 - eps) logsigmoid(beta z - gamma) - eps logsigmoid(-(beta z - gamma))
        loss = mean_b(loss_b) + cpo_alpha * mean(chosen_nll)
    """
    beta, eps, cpo_alpha, gamma, alpha = _check_cpo_config(loss_type, beta, label_smoothing, cpo_alpha,
                                                           simpo_gamma, alpha)
    return _cpo(chosen_logps, rejected_logps, chosen_lengths, rejected_lengths, chosen_nll, loss_type, beta,
                eps, cpo_alpha, gamma, alpha, "cpo_alpha")


def simpo_loss(
    chosen_logps: Tensor,
    rejected_logps: Tensor,
    chosen_lengths: Tensor,
    rejected_lengths: Tensor,
    *,
    beta: float = 2.0,
    gamma: float = 0.5,
    label_smoothing: float = 0.0,
    sft_weight: float = 0.0,
    chosen_nll: Optional[Tensor] = None,
) -> Tuple[Tensor, Dict[str, Tensor]]:
    """SimPO (Meng et al. 2024, https://huggingface.co/papers/2405.14734): a reference-free
    preference loss on length-normalized log-probs with a target reward margin.

    Args:
        chosen_logps, rejected_logps: ``(B,)`` policy log-probs summed over each completion's
            tokens; float32, bfloat16, float16 or float64; differentiable.
        chosen_lengths, rejected_lengths: ``(B,)`` token counts (integer or float; 0 counts as 1).
        beta: ``> 0``; the reward scale (2.0, the SimPO paper's and its reference trainer's default).
        gamma: the target reward margin (0.5 = ``beta * gamma_beta_ratio`` with the reference
            trainer's defaults 2.0 and 0.25).
        label_smoothing: ``eps`` in ``[0, 1]``.
        sft_weight: weight of an NLL term on the chosen completions (the reference trainer's
            ``sft_weight``, CPO's ``cpo_alpha``); 0 for none.
        chosen_nll: scalar or ``(B,)`` NLL of the chosen completions; required when
            ``sft_weight != 0``.

    Returns:
        ``(loss, metrics)`` as :func:`cpo_loss` with ``loss_type="simpo"`` (rewards are ``beta`` times
        the per-token log-probs, ``logps/*`` the per-token log-probs).

    With ``l = logps / max(n, 1)`` and ``x = beta (l_c - l_r) - gamma``::

        loss_b = -(1 - eps) logsigmoid(x) - eps logsigmoid(-x)
        loss = mean_b(loss_b) + sft_weight * mean(chosen_nll)

    Equals TRL's ``CPOTrainer`` with ``loss_type="simpo"``, ``simpo_gamma=gamma``, ``cpo_alpha=sft_weight``.
    """
    beta, eps, sft_weight, gamma, _ = _check_cpo_config("simpo", beta, label_smoothing, sft_weight, gamma,
                                                        0.0)
    return _cpo(chosen_logps, rejected_logps, chosen_lengths, rejected_lengths, chosen_nll, "simpo", beta,
                eps, sft_weight, gamma, 0.0, "sft_weight")


def orpo_loss(
    chosen_logps: Tensor,
    rejected_logps: Tensor,
    chosen_lengths: Tensor,
    rejected_lengths: Tensor,
    *,
    chosen_nll: Optional[Tensor] = None,
    beta: float = 0.1,
) -> Tuple[Tensor, Dict[str, Tensor]]:
    """ORPO (Hong et al. 2024, https://huggingface.co/papers/2403.07691): NLL plus an odds-ratio
    penalty on the per-token average log-probs, as TRL 1.16's ``ORPOTrainer``.

    Args:
        chosen_logps, rejected_logps: ``(B,)`` policy log-probs summed over each completion's
            tokens; float32, bfloat16, float16 or float64; differentiable.
        chosen_lengths, rejected_lengths: ``(B,)`` token counts (integer or float; 0 counts as 1).
        chosen_nll: the NLL of the chosen completions, a scalar (TRL: the cross-entropy averaged
            over all chosen tokens of the batch) or ``(B,)`` (averaged over pairs); ``None`` leaves
            the NLL term out (for a caller that adds its own SFT loss).
        beta: ``> 0``, the weight of the odds-ratio term (TRL's default 0.1).

    Returns:
        ``(loss, metrics)``: ``loss`` a float32 scalar; ``metrics`` detached float32 scalars with
        the keys of :data:`ORPO_METRICS`: ``rewards/* = beta * l`` (per-token log-probs),
        ``rewards/accuracies``, ``rewards/margins``, ``logps/*`` (means of ``l``), ``nll_loss``, and
        TRL's ``log_odds_ratio = mean(logsigmoid(log_odds))`` and ``log_odds_chosen =
        mean(log_odds)``.

    With ``l = logps / max(n, 1)`` (clamped to at most :data:`ORPO_MAX_AVG_LOGP` inside
    ``log1mexp(l) = log(1 - exp(l))``)::

        log_odds = (l_c - l_r) - (log1mexp(l_c) - log1mexp(l_r))
        loss = mean(chosen_nll) - beta * mean_b(logsigmoid(log_odds_b))
    """
    beta = V.check_positive("beta", beta)
    b = _check_pair(chosen_logps, rejected_logps)
    _check_lengths(chosen_lengths, rejected_lengths, b, "ORPO")
    if chosen_nll is not None:
        _check_nll(chosen_nll, b)
    V.check_same_device(chosen_logps=chosen_logps, rejected_logps=rejected_logps,
                        chosen_lengths=chosen_lengths, rejected_lengths=rejected_lengths,
                        chosen_nll=chosen_nll)

    lc = _per_token(chosen_logps.float(), chosen_lengths)
    lr = _per_token(rejected_logps.float(), rejected_lengths)
    cap = ORPO_MAX_AVG_LOGP
    log_odds = (lc - lr) - (_log1mexp(lc.clamp(max=cap)) - _log1mexp(lr.clamp(max=cap)))
    ratio = F.logsigmoid(log_odds)
    loss = -beta * _mean(ratio)
    if chosen_nll is not None:
        loss = loss + _mean(_nll_per_sequence(chosen_nll, b))
    metrics = _pair_metrics(beta * lc, beta * lr, lc, lr, chosen_nll)
    metrics["log_odds_ratio"] = _mean(ratio.detach())
    metrics["log_odds_chosen"] = _mean(log_odds.detach())
    return loss, metrics
