"""Preference-optimization losses on per-sequence log-probs: the DPO family (``preference_loss``,
with TRL 1.16's ``DPOTrainer`` loss types, f-divergences, WPO weighting and RPO) and KTO
(``kto_loss``), plus the two sequence-level helpers they need (``ld_sequence_logps`` for LD-DPO and
``wpo_log_weights`` for WPO). The reference-free family (SimPO, CPO, ORPO) lives in
:mod:`posttrain_kernels.api.preference_free`.

The inputs are per-sequence log-probs, ``(B,)`` tensors: the sum over a completion's tokens of the
token log-probs (``token_logprobs(...)[0].sum(-1)`` with the prompt and padding masked). The math
on top of them is O(B), so it runs as eager PyTorch on any device, in fp32 whatever the input
dtype, without host synchronization, and traces under ``torch.compile``.
"""
from __future__ import annotations

import math
from typing import Dict, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F
from torch import Tensor

from .. import _validation as V

DPO_LOSS_TYPES = ("sigmoid", "hinge", "ipo", "exo_pair", "nca_pair", "robust", "bco_pair", "sppo_hard",
                  "aot", "aot_unpaired", "apo_zero", "apo_down", "discopop", "sft", "sigmoid_norm")
"""The ``loss_type`` values of :func:`preference_loss` (those of TRL 1.16's ``DPOConfig``)."""

F_DIVERGENCES = ("reverse_kl", "forward_kl", "js_divergence", "alpha_divergence")

# The f-DPO reparameterization leaves a beta * log Z(x) term that cancels only in the
# chosen-minus-rejected score difference (TRL 1.16 rejects the other loss types likewise).
F_DIVERGENCE_LOSS_TYPES = ("sigmoid", "sigmoid_norm", "hinge", "ipo", "exo_pair", "robust", "discopop",
                           "sft")
# Loss types that average the log-ratios over the completion's tokens (need the token counts).
LENGTH_NORMALIZED_LOSS_TYPES = ("ipo", "sigmoid_norm")
# Loss types that sort over the batch: a per-pair weight would no longer line up with its pair.
SORTING_LOSS_TYPES = ("aot", "aot_unpaired")

KTO_LOSS_TYPES = ("kto", "apo_zero_unpaired")

PREFERENCE_METRICS = ("rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins",
                      "logps/chosen", "logps/rejected", "nll_loss")
"""The keys of the metrics dict of :func:`preference_loss` (and of SimPO / CPO), whatever the loss
type."""
KTO_METRICS = ("rewards/chosen", "rewards/rejected", "rewards/margins", "logps/chosen", "logps/rejected",
               "kl")
"""The keys of the metrics dict of :func:`kto_loss`."""

# TRL clamps (alpha - 1) * log-ratio at 80 before exp for fp32/bf16 (11 for fp16); we compute in fp32.
_ALPHA_DIVERGENCE_CLAMP = 80.0
_LOG2 = math.log(2.0)

Scalar = Union[float, Tensor]


# ----------------------------------------------------------------------------------------------
# shared checks and helpers (also used by preference_free)


def _batch_vector(name: str, t, batch: Optional[int] = None, batch_name: Optional[str] = None) -> int:
    """``t`` must be a 1-D float tensor; of shape ``(batch,)`` when ``batch`` is given."""
    V.check_tensor(name, t)
    V.check_float(name, t, allow_fp64=True)
    if t.dim() != 1:
        raise ValueError(f"{name}: expected a 1-D tensor of per-sequence values, shape (B,), "
                         f"got shape {tuple(t.shape)}")
    if batch is not None and t.shape[0] != batch:
        raise ValueError(f"{name}: expected shape ({batch},) (the batch size of {batch_name}), "
                         f"got {tuple(t.shape)}")
    return t.shape[0]


def _lengths(name: str, t, batch: int, batch_name: str) -> None:
    V.check_tensor(name, t)
    if t.dtype == torch.bool or t.dtype.is_complex:
        raise TypeError(f"{name}: expected an integer or floating tensor of token counts, "
                        f"got dtype {t.dtype}")
    if t.dim() != 1 or t.shape[0] != batch:
        raise ValueError(f"{name}: expected shape ({batch},) (the batch size of {batch_name}), "
                         f"got {tuple(t.shape)}")


def _check_nll(chosen_nll, batch: int) -> None:
    V.check_tensor("chosen_nll", chosen_nll)
    V.check_float("chosen_nll", chosen_nll, allow_fp64=True)
    if chosen_nll.dim() == 0:
        return
    if chosen_nll.dim() != 1 or chosen_nll.shape[0] != batch:
        raise ValueError(f"chosen_nll: expected a scalar or shape ({batch},) (the batch size of "
                         f"chosen_logps), got {tuple(chosen_nll.shape)}")


def _mean(x: Tensor) -> Tensor:
    """Mean of a 1-D tensor that is 0 (not nan) when it is empty; no device sync."""
    return x.sum() / max(x.shape[0], 1)


def _per_token(logps: Tensor, lengths: Tensor) -> Tensor:
    """Sequence log-prob divided by its token count (at least 1, as TRL's ``clamp(min=1)``)."""
    return logps / lengths.to(torch.float32).clamp_min(1.0)


def _nll_per_sequence(chosen_nll: Tensor, batch: int) -> Tensor:
    nll = chosen_nll.float()
    return nll.expand(batch) if nll.dim() == 0 else nll


def _nll_metric(chosen_nll: Optional[Tensor], like: Tensor) -> Tensor:
    if chosen_nll is None:
        return like.new_zeros((), dtype=torch.float32)
    nll = chosen_nll.detach().float()
    return nll if nll.dim() == 0 else _mean(nll)


def _pair_metrics(chosen_rewards: Tensor, rejected_rewards: Tensor, chosen_logps: Tensor,
                  rejected_logps: Tensor, chosen_nll: Optional[Tensor]) -> Dict[str, Tensor]:
    cr, rr = chosen_rewards.detach(), rejected_rewards.detach()
    return {
        "rewards/chosen": _mean(cr),
        "rewards/rejected": _mean(rr),
        "rewards/accuracies": _mean((cr > rr).float()),
        "rewards/margins": _mean(cr - rr),
        "logps/chosen": _mean(chosen_logps.detach()),
        "logps/rejected": _mean(rejected_logps.detach()),
        "nll_loss": _nll_metric(chosen_nll, cr),
    }


def _sigmoid_smoothed(x: Tensor, label_smoothing: float) -> Tensor:
    """``-(1 - eps) * logsigmoid(x) - eps * logsigmoid(-x)`` (conservative DPO / cDPO)."""
    loss = -F.logsigmoid(x)
    if label_smoothing:
        loss = loss * (1.0 - label_smoothing) - F.logsigmoid(-x) * label_smoothing
    return loss


def _loss_types(loss_type, known: Sequence[str]) -> Tuple[str, ...]:
    types = (loss_type,) if isinstance(loss_type, str) else tuple(loss_type)
    if not types:
        raise ValueError(f"loss_type: expected a loss type or a non-empty list of them, one of {known}, "
                         f"got {loss_type!r}")
    for t in types:
        if t not in known:
            raise ValueError(f"loss_type: expected one of {tuple(known)}, got {t!r}")
    return types


# ----------------------------------------------------------------------------------------------
# DPO family


def _check_dpo_config(loss_type, beta, label_smoothing, loss_weights, f_divergence_type,
                      f_alpha_divergence_coef, use_weighting, rpo_alpha, discopop_tau):
    """Validates the configuration of :func:`preference_loss` (shared with ``DPOLoss``); returns the
    normalized ``(loss_types, loss_weights, beta, label_smoothing, f_alpha_divergence_coef,
    rpo_alpha, discopop_tau)``."""
    types = _loss_types(loss_type, DPO_LOSS_TYPES)
    beta = V.check_positive("beta", beta)
    eps = V.check_range("label_smoothing", label_smoothing, 0.0, 1.0, hi_inclusive=True)
    if "robust" in types and not eps < 0.5:
        raise ValueError(f"label_smoothing: expected a value in [0.0, 0.5) for loss_type 'robust' (the "
                         f"probability that a label is flipped), got {label_smoothing!r}")
    if "exo_pair" in types and not 0.0 < eps < 1.0:
        raise ValueError(f"label_smoothing: expected a value in (0.0, 1.0) for loss_type 'exo_pair' (the EXO "
                         f"paper recommends 1e-3), got {label_smoothing!r}")
    if loss_weights is None:
        weights = (1.0,) * len(types)
    else:
        if isinstance(loss_weights, (str, bytes)) or not hasattr(loss_weights, "__len__"):
            raise TypeError(f"loss_weights: expected a sequence of {len(types)} numbers (one per loss type), "
                            f"got {loss_weights!r}")
        if len(loss_weights) != len(types):
            raise ValueError(f"loss_weights: expected {len(types)} weight(s), one per loss type in "
                             f"loss_type={list(types)}, got {len(loss_weights)}: {list(loss_weights)!r}")
        weights = tuple(V.check_finite("loss_weights", w) for w in loss_weights)
    V.check_choice("f_divergence_type", f_divergence_type, F_DIVERGENCES)
    if f_divergence_type != "reverse_kl":
        bad = [t for t in types if t not in F_DIVERGENCE_LOSS_TYPES]
        if bad:
            raise ValueError(
                f"f_divergence_type: {f_divergence_type!r} is defined only for the loss types "
                f"{F_DIVERGENCE_LOSS_TYPES} (their loss depends on the chosen-minus-rejected score only), "
                f"got loss_type {bad}; use f_divergence_type='reverse_kl' with them")
    alpha_coef = V.check_finite("f_alpha_divergence_coef", f_alpha_divergence_coef)
    if use_weighting:
        bad = [t for t in types if t in SORTING_LOSS_TYPES]
        if bad:
            raise ValueError(f"use_weighting: WPO weighting is not defined for loss_type {bad} (they sort "
                             "the batch, so a per-pair weight no longer lines up with its pair), got True")
    if rpo_alpha is not None:
        rpo_alpha = V.check_finite("rpo_alpha", rpo_alpha)
    tau = V.check_positive("discopop_tau", discopop_tau)
    return types, weights, beta, eps, alpha_coef, rpo_alpha, tau


def _f_scores(logratios: Tensor, f_divergence_type: str, alpha_coef: float) -> Tensor:
    """The f-DPO score ``f'(pi / pi_ref)`` of a log-ratio (the log-ratio itself for reverse KL)."""
    if f_divergence_type == "reverse_kl":
        return logratios
    if f_divergence_type == "forward_kl":  # f'(t) = 1 - 1/t
        return -torch.expm1(-logratios)
    if f_divergence_type == "js_divergence":  # f'(t) = log(2t / (t + 1)) = log 2 + logsigmoid(log t)
        return _LOG2 + F.logsigmoid(logratios)
    # alpha divergence: f'(t) = (t^(alpha - 1) - 1) / (alpha - 1); the limit alpha -> 1 is log t
    if abs(alpha_coef - 1.0) < 1e-6:
        return logratios
    a1 = alpha_coef - 1.0
    return torch.expm1((a1 * logratios).clamp(max=_ALPHA_DIVERGENCE_CLAMP)) / a1


def _dpo_per_sequence(lt: str, *, beta: float, eps: float, tau: float, chosen_logps: Tensor,
                      rejected_logps: Tensor, ref_chosen: Tensor, ref_rejected: Tensor,
                      chosen_logratios: Tensor, rejected_logratios: Tensor, chosen_scores: Tensor,
                      rejected_scores: Tensor, chosen_lengths: Optional[Tensor],
                      rejected_lengths: Optional[Tensor], nll: Optional[Tensor], bco_delta: Tensor) -> Tensor:
    delta = chosen_scores - rejected_scores
    if lt == "sigmoid":
        return _sigmoid_smoothed(beta * delta, eps)
    if lt == "hinge":
        return torch.relu(1.0 - beta * delta)
    if lt == "ipo":
        d = _per_token(chosen_scores, chosen_lengths) - _per_token(rejected_scores, rejected_lengths)
        return (d - 1.0 / (2.0 * beta)) ** 2
    if lt == "sigmoid_norm":
        d = _per_token(chosen_scores, chosen_lengths) - _per_token(rejected_scores, rejected_lengths)
        return -F.logsigmoid(beta * d)
    if lt == "exo_pair":
        x = beta * delta
        return (torch.sigmoid(x) * (F.logsigmoid(x) - math.log1p(-eps))
                + torch.sigmoid(-x) * (F.logsigmoid(-x) - math.log(eps)))
    if lt == "nca_pair":
        cr, rr = beta * chosen_logratios, beta * rejected_logratios
        return -F.logsigmoid(cr) - 0.5 * F.logsigmoid(-cr) - 0.5 * F.logsigmoid(-rr)
    if lt == "robust":
        x = beta * delta
        return (-(1.0 - eps) * F.logsigmoid(x) + eps * F.logsigmoid(-x)) / (1.0 - 2.0 * eps)
    if lt == "bco_pair":
        cr, rr = beta * chosen_logratios, beta * rejected_logratios
        return -F.logsigmoid(cr - bco_delta) - F.logsigmoid(-(rr - bco_delta))
    if lt == "sppo_hard":
        return (chosen_logratios - 0.5 / beta) ** 2 + (rejected_logratios + 0.5 / beta) ** 2
    if lt == "aot":
        lr, _ = torch.sort(chosen_logps - rejected_logps, dim=0)
        ref_lr, _ = torch.sort(ref_chosen - ref_rejected, dim=0)
        return _sigmoid_smoothed(beta * (lr - ref_lr), eps)
    if lt == "aot_unpaired":
        c, _ = torch.sort(chosen_logratios, dim=0)
        r, _ = torch.sort(rejected_logratios, dim=0)
        return _sigmoid_smoothed(beta * (c - r), eps)
    if lt == "apo_zero":
        return torch.sigmoid(-beta * chosen_logratios) + torch.sigmoid(beta * rejected_logratios)
    if lt == "apo_down":
        return (torch.sigmoid(beta * chosen_logratios)
                + torch.sigmoid(-beta * (chosen_logratios - rejected_logratios)))
    if lt == "discopop":
        x = beta * delta
        mod = torch.sigmoid(x / tau)
        # exp(-x) * sigmoid(x / tau) as one exp: no inf * 0 where x is very negative
        return -F.logsigmoid(x) * (1.0 - mod) + torch.exp(F.logsigmoid(x / tau) - x)
    if lt == "sft":
        return nll
    raise AssertionError(lt)  # unreachable: loss types are validated first


def preference_loss(
    chosen_logps: Tensor,
    rejected_logps: Tensor,
    ref_chosen_logps: Optional[Tensor] = None,
    ref_rejected_logps: Optional[Tensor] = None,
    *,
    loss_type: Union[str, Sequence[str]] = "sigmoid",
    beta: float = 0.1,
    label_smoothing: float = 0.0,
    loss_weights: Optional[Sequence[float]] = None,
    chosen_lengths: Optional[Tensor] = None,
    rejected_lengths: Optional[Tensor] = None,
    f_divergence_type: str = "reverse_kl",
    f_alpha_divergence_coef: float = 0.5,
    use_weighting: bool = False,
    chosen_wpo_logps: Optional[Tensor] = None,
    rejected_wpo_logps: Optional[Tensor] = None,
    wpo_weights: Optional[Tensor] = None,
    rpo_alpha: Optional[float] = None,
    chosen_nll: Optional[Tensor] = None,
    discopop_tau: float = 0.05,
    bco_delta: Optional[Scalar] = None,
    reference_free: bool = False,
) -> Tuple[Tensor, Dict[str, Tensor]]:
    """The DPO family of preference losses on per-sequence log-probs, with the semantics and the
    defaults of TRL 1.16's ``DPOTrainer`` / ``DPOConfig``.

    Args:
        chosen_logps, rejected_logps: ``(B,)`` policy log-probs of the chosen and rejected
            completions, each the sum of the completion's token log-probs; float32, bfloat16,
            float16 or float64. Differentiable: the gradients flow back to them in their dtype.
        ref_chosen_logps, ref_rejected_logps: ``(B,)`` the same under the reference model (their
            gradient is not needed; TRL computes them under ``no_grad``). Required by every loss
            type but ``"sft"`` unless ``reference_free=True``.
        loss_type: one of :data:`DPO_LOSS_TYPES`, or a list of them to combine (e.g. MPO:
            ``["sigmoid", "bco_pair", "sft"]``).
        beta: ``> 0``; the inverse temperature of the implicit reward (for ``"ipo"`` the
            regularization ``tau`` of the IPO paper).
        label_smoothing: ``eps`` in ``[0, 1]``: conservative DPO for ``"sigmoid"``, the label-flip
            probability for ``"robust"`` (``[0, 0.5)``), EXO's ``eps`` for ``"exo_pair"``
            (``(0, 1)``, the paper uses 1e-3), and smoothing for ``"aot"`` / ``"aot_unpaired"``.
        loss_weights: one weight per loss type (default all 1.0); the loss is
            ``sum_k loss_weights[k] * mean_b loss_k[b]``.
        chosen_lengths, rejected_lengths: ``(B,)`` token counts of the completions (integer or
            float); required by ``"ipo"`` and ``"sigmoid_norm"``, which average the scores per
            token (a count of 0 counts as 1, as in TRL).
        f_divergence_type: ``"reverse_kl"`` (DPO), ``"forward_kl"``, ``"js_divergence"`` or
            ``"alpha_divergence"`` (f-DPO); a non-default value is allowed only with the loss types
            in :data:`F_DIVERGENCE_LOSS_TYPES`.
        f_alpha_divergence_coef: ``alpha`` of the alpha divergence (TRL's default 0.5).
        use_weighting: WPO: scale each pair's loss (of every loss type, the ``"sft"`` / RPO term
            included) by a detached weight, given either as ``chosen_wpo_logps`` and
            ``rejected_wpo_logps`` (see :func:`wpo_log_weights`; weight
            ``exp(chosen_wpo_logps + rejected_wpo_logps)``), or directly as ``wpo_weights``.
            Not defined for ``"aot"`` / ``"aot_unpaired"``.
        chosen_wpo_logps, rejected_wpo_logps: ``(B,)`` per-sequence mean over the completion of
            ``log p(y_t) - log sum_v p(v)^2`` (TRL's length-normalized aligned log-probs).
        wpo_weights: ``(B,)`` per-pair weight computed by the caller (used as is, detached).
        rpo_alpha: RPO: adds ``rpo_alpha * mean(chosen_nll)`` (TRL's former ``rpo_alpha``; the same
            as adding ``"sft"`` with weight ``rpo_alpha``); ``None`` for none.
        chosen_nll: the NLL of the chosen completions, required by ``"sft"`` and ``rpo_alpha``:
            a scalar (TRL: the mean over all chosen completion tokens of the batch) or ``(B,)``
            (one value per pair, averaged over pairs). Differentiable.
        discopop_tau: DiscoPOP's temperature ``tau`` (``> 0``, TRL's default 0.05).
        bco_delta: the reward reference point ``delta`` of ``"bco_pair"``, a float or a scalar
            tensor (detached); ``None`` is 0, as in TRL 1.16. Earlier TRL releases used a running
            mean of the batch-mean reward; ``posttrain_kernels.modules.DPOLoss`` keeps that state.
        reference_free: use a uniform reference (``ref_*_logps = 0``), as TRL's former
            ``reference_free`` option.

    Returns:
        ``(loss, metrics)``: ``loss`` a float32 scalar, differentiable with respect to the policy
        log-probs (and ``chosen_nll``); ``metrics`` a dict of detached float32 scalars with the keys
        of :data:`PREFERENCE_METRICS` whatever the loss type (TRL's names and definitions, means
        over the batch): ``rewards/chosen = mean(beta * (chosen_logps - ref_chosen_logps))``,
        ``rewards/rejected`` likewise, ``rewards/accuracies = mean(chosen reward > rejected
        reward)``, ``rewards/margins = mean(chosen reward - rejected reward)``, ``logps/chosen``,
        ``logps/rejected`` (means of the inputs), ``nll_loss`` (mean of ``chosen_nll``, 0 without
        it). An empty batch gives a zero loss and zero metrics.

    With ``c = chosen_logps - ref_chosen_logps`` and ``r = rejected_logps - ref_rejected_logps``
    (the log-ratios), the f-divergence scores ``sc = f'(c)``, ``sr = f'(r)``::

        reverse_kl:        f'(u) = u
        forward_kl:        f'(u) = 1 - exp(-u)
        js_divergence:     f'(u) = log 2 + logsigmoid(u)
        alpha_divergence:  f'(u) = (exp(min((alpha - 1) u, 80)) - 1) / (alpha - 1)   (u if alpha = 1)

    ``d = sc - sr``, ``x = beta * d``, ``n_c``, ``n_r`` the token counts (at least 1), the loss of
    pair ``b`` is::

        sigmoid       -(1 - eps) logsigmoid(x) - eps logsigmoid(-x)
        hinge         relu(1 - x)
        ipo           (sc / n_c - sr / n_r - 1 / (2 beta))^2
        sigmoid_norm  -logsigmoid(beta (sc / n_c - sr / n_r))
        exo_pair      sigmoid(x) (logsigmoid(x) - log(1 - eps)) + sigmoid(-x) (logsigmoid(-x) - log eps)
        nca_pair      -logsigmoid(beta c) - 0.5 logsigmoid(-beta c) - 0.5 logsigmoid(-beta r)
        robust        (-(1 - eps) logsigmoid(x) + eps logsigmoid(-x)) / (1 - 2 eps)
        bco_pair      -logsigmoid(beta c - delta) - logsigmoid(-(beta r - delta))
        sppo_hard     (c - 1 / (2 beta))^2 + (r + 1 / (2 beta))^2
        aot           sigmoid-smoothed(beta (sort(pi_c - pi_r) - sort(ref_c - ref_r)))  (batch sorts)
        aot_unpaired  sigmoid-smoothed(beta (sort(c) - sort(r)))
        apo_zero      (1 - sigmoid(beta c)) + sigmoid(beta r)
        apo_down      sigmoid(beta c) + (1 - sigmoid(beta (c - r)))
        discopop      -logsigmoid(x) (1 - sigmoid(x / tau)) + exp(-x) sigmoid(x / tau)
        sft           chosen_nll

    where ``sigmoid-smoothed(z) = -(1 - eps) logsigmoid(z) - eps logsigmoid(-z)``. With
    ``use_weighting`` each pair's loss is multiplied by its WPO weight ``w_b`` before the mean, and
    ``loss = sum_k weight_k * mean_b(w_b * loss_k[b]) + rpo_alpha * mean_b(w_b * chosen_nll[b])``.

    Where TRL's eager formula overflows (``exp(-x) * sigmoid(x / tau)`` in DiscoPOP for very
    negative ``x``: ``inf * 0``), the same quantity is computed in a stable form. For LD-DPO
    (``ld_alpha``) build the sequence log-probs with :func:`ld_sequence_logps`.
    """
    (types, weights, beta, eps, alpha_coef, rpo_alpha, tau) = _check_dpo_config(
        loss_type, beta, label_smoothing, loss_weights, f_divergence_type, f_alpha_divergence_coef,
        use_weighting, rpo_alpha, discopop_tau)
    b = _batch_vector("chosen_logps", chosen_logps)
    _batch_vector("rejected_logps", rejected_logps, b, "chosen_logps")
    needs_ref = any(t != "sft" for t in types)
    if reference_free:
        for name, t in (("ref_chosen_logps", ref_chosen_logps), ("ref_rejected_logps", ref_rejected_logps)):
            if t is not None:
                raise ValueError(f"{name}: expected None with reference_free=True (a uniform reference), "
                                 "got a tensor")
    else:
        for name, t in (("ref_chosen_logps", ref_chosen_logps), ("ref_rejected_logps", ref_rejected_logps)):
            if t is None:
                if needs_ref:
                    lt = next(t for t in types if t != "sft")
                    raise ValueError(
                        f"{name}: loss_type {lt!r} needs the reference log-probs ref_chosen_logps and "
                        f"ref_rejected_logps, got None (pass reference_free=True for a uniform reference)")
            else:
                _batch_vector(name, t, b, "chosen_logps")
        if (ref_chosen_logps is None) != (ref_rejected_logps is None):
            missing = "ref_rejected_logps" if ref_rejected_logps is None else "ref_chosen_logps"
            raise ValueError(f"{missing}: expected a tensor (the other reference log-probs are given), "
                             "got None")
    if any(t in LENGTH_NORMALIZED_LOSS_TYPES for t in types):
        lt = next(t for t in types if t in LENGTH_NORMALIZED_LOSS_TYPES)
        for name, t in (("chosen_lengths", chosen_lengths), ("rejected_lengths", rejected_lengths)):
            if t is None:
                raise ValueError(f"{name}: loss_type {lt!r} averages the scores over the completion tokens "
                                 "and needs chosen_lengths and rejected_lengths (token counts), got None")
    for name, t in (("chosen_lengths", chosen_lengths), ("rejected_lengths", rejected_lengths)):
        if t is not None:
            _lengths(name, t, b, "chosen_logps")
    needs_nll = "sft" in types or rpo_alpha is not None
    if chosen_nll is not None:
        _check_nll(chosen_nll, b)
    elif needs_nll:
        why = "loss_type 'sft'" if "sft" in types else f"rpo_alpha={rpo_alpha}"
        raise ValueError(f"chosen_nll: {why} needs the NLL of the chosen completions, got None")
    if use_weighting:
        if wpo_weights is not None:
            if chosen_wpo_logps is not None or rejected_wpo_logps is not None:
                raise ValueError("wpo_weights: expected either wpo_weights or chosen_wpo_logps and "
                                 "rejected_wpo_logps, got both")
            _batch_vector("wpo_weights", wpo_weights, b, "chosen_logps")
        else:
            for name, t in (("chosen_wpo_logps", chosen_wpo_logps),
                            ("rejected_wpo_logps", rejected_wpo_logps)):
                if t is None:
                    raise ValueError(f"{name}: use_weighting=True needs chosen_wpo_logps and "
                                     "rejected_wpo_logps (or wpo_weights), got None")
                _batch_vector(name, t, b, "chosen_logps")
    else:
        for name, t in (("wpo_weights", wpo_weights), ("chosen_wpo_logps", chosen_wpo_logps),
                        ("rejected_wpo_logps", rejected_wpo_logps)):
            if t is not None:
                raise ValueError(f"{name}: expected None with use_weighting=False, got a tensor")
    if bco_delta is not None:
        if isinstance(bco_delta, Tensor):
            if bco_delta.numel() != 1:
                raise ValueError(f"bco_delta: expected a number or a one-element tensor, got shape "
                                 f"{tuple(bco_delta.shape)}")
        else:
            V.check_finite("bco_delta", bco_delta)
    V.check_same_device(chosen_logps=chosen_logps, rejected_logps=rejected_logps,
                        ref_chosen_logps=ref_chosen_logps, ref_rejected_logps=ref_rejected_logps,
                        chosen_lengths=chosen_lengths, rejected_lengths=rejected_lengths,
                        chosen_nll=chosen_nll, chosen_wpo_logps=chosen_wpo_logps,
                        rejected_wpo_logps=rejected_wpo_logps, wpo_weights=wpo_weights)

    pc, pr = chosen_logps.float(), rejected_logps.float()
    if ref_chosen_logps is None:  # reference-free, or "sft" only
        rc, rr = torch.zeros_like(pc), torch.zeros_like(pr)
    else:
        rc, rr = ref_chosen_logps.float(), ref_rejected_logps.float()
    c, r = pc - rc, pr - rr
    sc, sr = _f_scores(c, f_divergence_type, alpha_coef), _f_scores(r, f_divergence_type, alpha_coef)
    nll = _nll_per_sequence(chosen_nll, b) if chosen_nll is not None else None
    if bco_delta is None:
        delta = pc.new_zeros(())
    elif isinstance(bco_delta, Tensor):
        delta = bco_delta.detach().to(device=pc.device, dtype=torch.float32).reshape(())
    else:
        delta = pc.new_tensor(float(bco_delta))
    w = None
    if use_weighting:
        if wpo_weights is not None:
            w = wpo_weights.detach().float()
        else:
            w = torch.exp(chosen_wpo_logps.detach().float() + rejected_wpo_logps.detach().float())

    terms = list(zip(types, weights))
    if rpo_alpha is not None:
        terms.append(("sft", rpo_alpha))
    loss = pc.new_zeros(())
    for lt, weight in terms:
        per_seq = _dpo_per_sequence(
            lt, beta=beta, eps=eps, tau=tau, chosen_logps=pc, rejected_logps=pr, ref_chosen=rc,
            ref_rejected=rr, chosen_logratios=c, rejected_logratios=r, chosen_scores=sc, rejected_scores=sr,
            chosen_lengths=chosen_lengths, rejected_lengths=rejected_lengths, nll=nll, bco_delta=delta)
        if w is not None:
            per_seq = per_seq * w
        loss = loss + weight * _mean(per_seq)

    metrics = _pair_metrics(beta * c, beta * r, pc, pr, chosen_nll)
    return loss, metrics


def ld_sequence_logps(
    chosen_token_logps: Tensor,
    rejected_token_logps: Tensor,
    chosen_mask: Tensor,
    rejected_mask: Tensor,
    *,
    ld_alpha: float,
) -> Tuple[Tensor, Tensor]:
    """LD-DPO sequence log-probs: the tokens past the length the two completions of a pair share
    count ``ld_alpha`` times (TRL's ``ld_alpha``; 1.0 is the plain sum, 0.0 drops the excess).

    Args:
        chosen_token_logps: ``(B, Tc)`` token log-probs of the chosen completions (any float dtype).
        rejected_token_logps: ``(B, Tr)`` the same for the rejected completions.
        chosen_mask, rejected_mask: ``(B, Tc)`` / ``(B, Tr)`` completion masks (bool or 0/1
            integers): the completion tokens, in order, anywhere in the row (left or right padding).
        ld_alpha: in ``[0, 1]``.

    Returns:
        ``(chosen_logps, rejected_logps)``: ``(B,)`` float32, differentiable. With ``pos`` the
        1-based index of a token among its completion's tokens and ``s = min(n_chosen, n_rejected)``
        the shared length of the pair::

            logps = sum_{pos <= s} logp_t + ld_alpha * sum_{pos > s} logp_t

    (masked positions contribute nothing, even when their log-prob is -inf).
    """
    alpha = V.check_range("ld_alpha", ld_alpha, 0.0, 1.0, hi_inclusive=True)
    for name, t in (("chosen_token_logps", chosen_token_logps),
                    ("rejected_token_logps", rejected_token_logps)):
        V.check_tensor(name, t)
        V.check_float(name, t, allow_fp64=True)
        if t.dim() != 2:
            raise ValueError(f"{name}: expected shape (B, T), got {tuple(t.shape)}")
    bsz = chosen_token_logps.shape[0]
    if rejected_token_logps.shape[0] != bsz:
        raise ValueError(f"rejected_token_logps: expected {bsz} rows (the batch size of chosen_token_logps), "
                         f"got shape {tuple(rejected_token_logps.shape)}")
    for name, m, t, tname in (("chosen_mask", chosen_mask, chosen_token_logps, "chosen_token_logps"),
                              ("rejected_mask", rejected_mask, rejected_token_logps, "rejected_token_logps")):
        V.check_tensor(name, m)
        if m.dtype.is_floating_point or m.dtype.is_complex:
            raise TypeError(f"{name}: expected a bool or integer mask, got dtype {m.dtype}")
        if m.shape != t.shape:
            raise ValueError(f"{name}: expected shape {tuple(t.shape)} (the shape of {tname}), "
                             f"got {tuple(m.shape)}")
    V.check_same_device(chosen_token_logps=chosen_token_logps, rejected_token_logps=rejected_token_logps,
                        chosen_mask=chosen_mask, rejected_mask=rejected_mask)
    cm, rm = chosen_mask.bool(), rejected_mask.bool()
    shared = torch.minimum(cm.sum(1), rm.sum(1)).unsqueeze(1)

    def weighted(tok: Tensor, m: Tensor) -> Tensor:
        tok = tok.float()
        pos = m.long().cumsum(1)
        zero = tok.new_zeros(())
        head = torch.where(m & (pos <= shared), tok, zero).sum(1)
        tail = torch.where(m & (pos > shared), tok, zero).sum(1)
        return head + alpha * tail

    return weighted(chosen_token_logps, cm), weighted(rejected_token_logps, rm)


def wpo_log_weights(token_logps: Tensor, log_sum_sq_probs: Tensor, mask: Tensor) -> Tensor:
    """Per-sequence log WPO weight: the length-normalized aligned log-prob of TRL's
    ``use_weighting`` (WPO, Eq. 2 of https://huggingface.co/papers/2406.11827).

    Args:
        token_logps: ``(N, T)`` policy log-probs of the completion tokens (any float dtype).
        log_sum_sq_probs: ``(N, T)`` ``log sum_v p_t(v)^2`` at each position
            (``torch.logsumexp(2 * log_softmax(logits), -1)``).
        mask: ``(N, T)`` completion mask (bool or 0/1 integers).

    Returns:
        ``(N,)`` float32, detached::

            sum_t mask_t (logp_t - log_sum_sq_probs_t) / max(sum_t mask_t, 1)

    Pass the chosen rows as ``chosen_wpo_logps`` and the rejected rows as ``rejected_wpo_logps``
    of :func:`preference_loss`: the pair's weight is ``exp(chosen + rejected)``.
    """
    V.check_tensor("token_logps", token_logps)
    V.check_float("token_logps", token_logps, allow_fp64=True)
    if token_logps.dim() != 2:
        raise ValueError(f"token_logps: expected shape (N, T), got {tuple(token_logps.shape)}")
    V.check_tensor("log_sum_sq_probs", log_sum_sq_probs)
    V.check_float("log_sum_sq_probs", log_sum_sq_probs, allow_fp64=True)
    if log_sum_sq_probs.shape != token_logps.shape:
        raise ValueError(f"log_sum_sq_probs: expected shape {tuple(token_logps.shape)} (the shape of "
                         f"token_logps), got {tuple(log_sum_sq_probs.shape)}")
    V.check_tensor("mask", mask)
    if mask.dtype.is_floating_point or mask.dtype.is_complex:
        raise TypeError(f"mask: expected a bool or integer mask, got dtype {mask.dtype}")
    if mask.shape != token_logps.shape:
        raise ValueError(f"mask: expected shape {tuple(token_logps.shape)} (the shape of token_logps), "
                         f"got {tuple(mask.shape)}")
    V.check_same_device(token_logps=token_logps, log_sum_sq_probs=log_sum_sq_probs, mask=mask)
    with torch.no_grad():
        m = mask.bool()
        zero = token_logps.new_zeros((), dtype=torch.float32)
        aligned = torch.where(m, token_logps.float() - log_sum_sq_probs.float(), zero)
        return aligned.sum(1) / m.sum(1).clamp_min(1).to(torch.float32)


# ----------------------------------------------------------------------------------------------
# KTO


def _check_kto_config(loss_type, beta, desirable_weight, undesirable_weight):
    V.check_choice("loss_type", loss_type, KTO_LOSS_TYPES)
    beta = V.check_positive("beta", beta)
    dw = V.check_range("desirable_weight", desirable_weight, 0.0, float("inf"))
    uw = V.check_range("undesirable_weight", undesirable_weight, 0.0, float("inf"))
    return beta, dw, uw


def kto_loss(
    chosen_logps: Tensor,
    rejected_logps: Tensor,
    ref_chosen_logps: Optional[Tensor],
    ref_rejected_logps: Optional[Tensor],
    *,
    policy_KL_logps: Optional[Tensor] = None,
    ref_KL_logps: Optional[Tensor] = None,
    kl: Optional[Scalar] = None,
    loss_type: str = "kto",
    beta: float = 0.1,
    desirable_weight: float = 1.0,
    undesirable_weight: float = 1.0,
) -> Tuple[Tensor, Dict[str, Tensor]]:
    """KTO (https://huggingface.co/papers/2402.01306) on unpaired completions, with the semantics
    and defaults of TRL 1.16's ``KTOTrainer``.

    Args:
        chosen_logps: ``(Bc,)`` policy log-probs (sums over the completion) of the desirable
            completions; float32, bfloat16, float16 or float64; differentiable. ``Bc`` may be 0.
        rejected_logps: ``(Br,)`` the same for the undesirable completions (``Br`` may differ from
            ``Bc``, and may be 0).
        ref_chosen_logps, ref_rejected_logps: ``(Bc,)`` / ``(Br,)`` under the reference model.
        policy_KL_logps, ref_KL_logps: ``(Bk,)`` policy and reference log-probs of the mismatched
            (prompt, completion) pairs TRL builds by shifting the completions by one within the
            batch; the KL reference point is ``z0 = max(mean(policy_KL - ref_KL), 0)``, detached.
        kl: instead of the KL log-probs, ``z0`` itself (a float or a scalar tensor, e.g. the mean
            gathered across ranks as TRL does); it is detached and clamped at 0 as well.
        loss_type: ``"kto"`` (needs the KL point) or ``"apo_zero_unpaired"`` (no KL point).
        beta: ``> 0``.
        desirable_weight, undesirable_weight: ``>= 0`` weights of the desirable and undesirable
            losses.

    Returns:
        ``(loss, metrics)``: ``loss`` a float32 scalar; ``metrics`` detached float32 scalars with
        the keys of :data:`KTO_METRICS`: ``rewards/chosen = mean(beta * (chosen - ref_chosen))``,
        ``rewards/rejected`` likewise, ``rewards/margins`` their difference, ``logps/chosen``,
        ``logps/rejected`` (means), ``kl`` (``z0``; 0 for ``apo_zero_unpaired``). A mean over an
        empty set is 0 (TRL leaves the metric out).

    With ``c = chosen - ref_chosen``, ``r = rejected - ref_rejected``::

        kto:                desirable   1 - sigmoid(beta (c - z0))
                            undesirable 1 - sigmoid(beta (z0 - r))
        apo_zero_unpaired:  desirable   1 - sigmoid(beta c)
                            undesirable sigmoid(beta r)
        loss = (desirable_weight * sum(desirable) + undesirable_weight * sum(undesirable)) / max(Bc + Br, 1)

    (TRL's ``nanmean`` over the concatenated weighted losses; 0, not nan, for an empty batch).
    """
    beta, dw, uw = _check_kto_config(loss_type, beta, desirable_weight, undesirable_weight)
    bc = _batch_vector("chosen_logps", chosen_logps)
    br = _batch_vector("rejected_logps", rejected_logps)
    for name, t, n, nname in (("ref_chosen_logps", ref_chosen_logps, bc, "chosen_logps"),
                              ("ref_rejected_logps", ref_rejected_logps, br, "rejected_logps")):
        if t is None:
            raise ValueError(f"{name}: loss_type {loss_type!r} needs the reference log-probs "
                             "ref_chosen_logps and ref_rejected_logps, got None")
        _batch_vector(name, t, n, nname)
    if loss_type == "kto":
        if kl is not None:
            if policy_KL_logps is not None or ref_KL_logps is not None:
                raise ValueError("kl: expected either kl or policy_KL_logps and ref_KL_logps, got both")
            if isinstance(kl, Tensor):
                if kl.numel() != 1:
                    raise ValueError(f"kl: expected a number or a one-element tensor, "
                                     f"got shape {tuple(kl.shape)}")
            else:
                V.check_finite("kl", kl)
        else:
            for name, t in (("policy_KL_logps", policy_KL_logps), ("ref_KL_logps", ref_KL_logps)):
                if t is None:
                    raise ValueError(f"{name}: loss_type 'kto' needs the KL reference point: policy_KL_logps "
                                     "and ref_KL_logps (log-probs of mismatched pairs), or kl, got None")
            bk = _batch_vector("policy_KL_logps", policy_KL_logps)
            _batch_vector("ref_KL_logps", ref_KL_logps, bk, "policy_KL_logps")
    else:
        for name, t in (("kl", kl), ("policy_KL_logps", policy_KL_logps), ("ref_KL_logps", ref_KL_logps)):
            if t is not None:
                raise ValueError(f"{name}: loss_type {loss_type!r} uses no KL reference point, expected None")
    V.check_same_device(chosen_logps=chosen_logps, rejected_logps=rejected_logps,
                        ref_chosen_logps=ref_chosen_logps, ref_rejected_logps=ref_rejected_logps,
                        policy_KL_logps=policy_KL_logps, ref_KL_logps=ref_KL_logps,
                        kl=kl if isinstance(kl, Tensor) else None)

    pc, pr = chosen_logps.float(), rejected_logps.float()
    c = pc - ref_chosen_logps.float()
    r = pr - ref_rejected_logps.float()
    if loss_type == "kto":
        if kl is None:
            z0 = _mean((policy_KL_logps.detach().float() - ref_KL_logps.detach().float()))
        elif isinstance(kl, Tensor):
            z0 = kl.detach().to(device=pc.device, dtype=torch.float32).reshape(())
        else:
            z0 = pc.new_tensor(float(kl))
        z0 = z0.clamp(min=0)
        chosen_losses = torch.sigmoid(-beta * (c - z0))  # = 1 - sigmoid(beta (c - z0)), without cancellation
        rejected_losses = torch.sigmoid(-beta * (z0 - r))
    else:
        z0 = pc.new_zeros(())
        chosen_losses = torch.sigmoid(-beta * c)
        rejected_losses = torch.sigmoid(beta * r)
    loss = (dw * chosen_losses.sum() + uw * rejected_losses.sum()) / max(bc + br, 1)

    cr, rr = (beta * c).detach(), (beta * r).detach()
    metrics = {
        "rewards/chosen": _mean(cr),
        "rewards/rejected": _mean(rr),
        "rewards/margins": _mean(cr) - _mean(rr),
        "logps/chosen": _mean(pc.detach()),
        "logps/rejected": _mean(pr.detach()),
        "kl": z0.detach(),
    }
    return loss, metrics
