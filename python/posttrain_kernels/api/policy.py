"""Policy-gradient losses (PPO / GRPO family) on per-token log-probs, and the PPO value loss.

The losses are cheap per-token math on top of the token log-prob primitive (:func:`token_logprobs`,
:func:`linear_token_logprobs`): a few row reductions (sequence-level importance weights, the
off-policy sequence mask, the VESPO weights, the entropy quantile), one elementwise pass that makes
the per-token loss, and one aggregation. The code below keeps that structure (row statistics ->
per-token loss -> ``_aggregate``) in vectorized PyTorch (``_policy_loss_torch``).

Fused path: when the backend resolves to ``"triton"`` (CUDA tensors with ``backend="auto"``, or
``backend="triton"``, on CPU tensors only under ``TRITON_INTERPRET=1``), every loss type and option
runs fused: token- and sequence-level importance sampling (``gspo``, ``luspo``, any type at
``importance_sampling_level="sequence"``), ``vespo``, the off-policy sequence mask, the entropy
quantile and ``importance_sampling_ratio``. The row statistics (sequence-level ratio, VESPO weight,
off-policy mask), the per-token math and the per-row sums run in one Triton kernel forward and one
backward (``posttrain_kernels.ops.policy``); only the entropy-quantile threshold (a sort over the
batch, before the kernel), the O(B) aggregation and the metrics run in PyTorch
(``_policy_loss_fused``): same loss, same metrics, same gradients. Calls with float64 ``logps``, an
empty ``logps`` or a mask that requires grad (and every other backend) run ``_policy_loss_torch``.
"""
from __future__ import annotations

import math
import os
from numbers import Number
from typing import Dict, Optional, Tuple, Union

import torch
from torch import Tensor

from .. import _validation as V
from ..dispatch import ENV_VAR, resolve_backend, validate_backend
from ..ops import policy as policy_ops

LOSS_TYPES = ("grpo", "bnpo", "dr_grpo", "dapo", "cispo", "sapo", "gspo", "luspo", "vespo")
KL_ESTIMATORS = ("k1", "k2", "k3", "low_var_kl")
LOSS_AGG_MODES = ("token-mean", "seq-mean-token-sum", "seq-mean-token-mean", "seq-mean-token-sum-norm")
IMPORTANCE_SAMPLING_LEVELS = ("token", "sequence")

# Loss types whose per-token loss is the clipped surrogate -min(r A, clip(r) A).
CLIPPED_LOSS_TYPES = ("grpo", "bnpo", "dr_grpo", "dapo", "gspo", "luspo")

# The aggregation each loss type implies (TRL 1.16 GRPOTrainer._compute_loss), in verl's names.
LOSS_TYPE_AGG_MODE = {
    "grpo": "seq-mean-token-mean",
    "gspo": "seq-mean-token-mean",
    "sapo": "seq-mean-token-mean",
    "bnpo": "token-mean",
    "dapo": "token-mean",
    "cispo": "token-mean",
    "vespo": "token-mean",
    "dr_grpo": "seq-mean-token-sum-norm",
    "luspo": "seq-mean-token-sum",
}

# The fixed key set of the metrics dict returned by :func:`policy_loss` (every key, every call).
POLICY_METRIC_KEYS = (
    "policy_loss",
    "kl",
    "entropy",
    "approx_kl",
    "ratio_mean",
    "clip_ratio/low_mean",
    "clip_ratio/high_mean",
    "clip_ratio/region_mean",
    "clip_ratio/low_min",
    "clip_ratio/high_max",
    "clip_ratio/dual_mean",
)
VALUE_METRIC_KEYS = ("vf_loss", "vf_clipfrac", "vpred_mean")

# |log(pi / pi_old)| is clamped to this before exp (as verl does), so the ratio never overflows.
LOG_RATIO_CLAMP = 20.0
# VESPO's lower clamp of the sequence log-weight (TRL: log(1e-8)).
_VESPO_LOG_W_MIN = math.log(1e-8)

Count = Union[int, float, Tensor]


# --------------------------------------------------------------------------------------------
# argument checks


def _check_choice(name: str, value, choices) -> None:
    if not isinstance(value, str) or value not in choices:
        raise ValueError(f"{name}: expected one of {tuple(choices)}, got {value!r}")


def _check_bool(name: str, value) -> bool:
    if not isinstance(value, bool):
        raise TypeError(f"{name}: expected a bool, got {type(value).__name__} {value!r}")
    return value


def _check_int(name: str, value, lo: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name}: expected an int >= {lo}, got {type(value).__name__} {value!r}")
    if value < lo:
        raise ValueError(f"{name}: expected an int >= {lo}, got {value!r}")
    return value


def _check_count(name: str, value: Optional[Count]):
    """A token count: None, a number >= 0 or a one-element (device) tensor; never read on the host."""
    if value is None:
        return None
    if isinstance(value, Tensor):
        if value.numel() != 1:
            raise ValueError(f"{name}: expected a number or a one-element tensor, got shape {tuple(value.shape)}")
        if value.dtype == torch.bool or value.dtype.is_complex:
            raise TypeError(f"{name}: expected an integer or floating tensor, got dtype {value.dtype}")
        return value.reshape(())
    if isinstance(value, bool) or not isinstance(value, Number):
        raise TypeError(f"{name}: expected a number or a one-element tensor, got {type(value).__name__}")
    v = V.check_range(name, value, 0.0, float("inf"))
    return v


def _policy_options(
    *, loss_type, loss_agg_mode, importance_sampling_level, epsilon_low, epsilon_high, delta,
    clip_ratio_c, sapo_temperature_pos, sapo_temperature_neg, vespo_k_pos, vespo_lambda_pos,
    vespo_k_neg, vespo_lambda_neg, beta, kl_estimator, use_bias_correction_kl, entropy_coef,
    top_entropy_quantile, off_policy_mask_threshold, max_completion_length,
    gradient_accumulation_steps, backend,
) -> dict:
    """Checks every non-tensor option of :func:`policy_loss` and returns them normalized."""
    _check_choice("loss_type", loss_type, LOSS_TYPES)
    if loss_agg_mode is not None:
        _check_choice("loss_agg_mode", loss_agg_mode, LOSS_AGG_MODES)
    if importance_sampling_level is not None:
        _check_choice("importance_sampling_level", importance_sampling_level, IMPORTANCE_SAMPLING_LEVELS)
    _check_choice("kl_estimator", kl_estimator, KL_ESTIMATORS)
    validate_backend(backend)

    level = importance_sampling_level
    if loss_type in ("gspo", "luspo"):
        if level == "token":
            what = ("grpo with sequence-level importance sampling" if loss_type == "gspo"
                    else "a sequence-level loss (LUSPO)")
            raise ValueError(
                f"importance_sampling_level: loss_type={loss_type!r} is {what}; expected 'sequence' "
                f"(or None), got 'token'")
        level = "sequence"
    elif loss_type == "vespo":
        if level == "sequence":
            raise ValueError(
                "importance_sampling_level: loss_type='vespo' computes its sequence-level weights itself "
                "from the token log-ratios; expected 'token' (or None), got 'sequence'")
        level = "token"
    elif level is None:
        level = "token"

    eps_low = V.check_range("epsilon_low", epsilon_low, 0.0, 1.0, hi_inclusive=True)
    if epsilon_high is None:
        eps_high = eps_low
    elif loss_type == "cispo":
        eps_high = V.check_positive("epsilon_high", epsilon_high)
    else:
        eps_high = V.check_range("epsilon_high", epsilon_high, 0.0, float("inf"))
    if loss_type == "cispo" and eps_high <= 0:
        raise ValueError(f"epsilon_high: loss_type='cispo' clamps the ratio at epsilon_high (its eps_max); "
                         f"expected a number > 0, got {eps_high!r}")

    clipped = loss_type in CLIPPED_LOSS_TYPES
    if delta is not None:
        if not clipped:
            raise ValueError(f"delta: the two-sided bound applies to the clipped loss types "
                             f"{CLIPPED_LOSS_TYPES}, not loss_type={loss_type!r}; expected None, got {delta!r}")
        delta = V.check_positive("delta", delta)
    if clip_ratio_c is not None:
        if not clipped:
            raise ValueError(f"clip_ratio_c: dual-clip applies to the clipped loss types {CLIPPED_LOSS_TYPES}, "
                             f"not loss_type={loss_type!r}; expected None, got {clip_ratio_c!r}")
        clip_ratio_c = V.check_finite("clip_ratio_c", clip_ratio_c)
        if clip_ratio_c <= 1.0:
            raise ValueError(f"clip_ratio_c: expected a number > 1 (the dual-clip bound on the ratio for "
                             f"negative advantages), got {clip_ratio_c!r}")

    sapo_pos = V.check_positive("sapo_temperature_pos", sapo_temperature_pos)
    sapo_neg = V.check_positive("sapo_temperature_neg", sapo_temperature_neg)
    k_pos = V.check_finite("vespo_k_pos", vespo_k_pos)
    lam_pos = V.check_finite("vespo_lambda_pos", vespo_lambda_pos)
    k_neg = V.check_finite("vespo_k_neg", vespo_k_neg)
    lam_neg = V.check_finite("vespo_lambda_neg", vespo_lambda_neg)

    beta = V.check_finite("beta", beta)
    use_bias_correction_kl = _check_bool("use_bias_correction_kl", use_bias_correction_kl)
    entropy_coef = V.check_finite("entropy_coef", entropy_coef)
    q = V.check_range("top_entropy_quantile", top_entropy_quantile, 0.0, 1.0, hi_inclusive=True)
    if off_policy_mask_threshold is not None:
        off_policy_mask_threshold = V.check_finite("off_policy_mask_threshold", off_policy_mask_threshold)

    agg = LOSS_TYPE_AGG_MODE[loss_type] if loss_agg_mode is None else loss_agg_mode
    if max_completion_length is not None:
        if agg != "seq-mean-token-sum-norm":
            raise ValueError(
                f"max_completion_length: only the 'seq-mean-token-sum-norm' aggregation (loss_type='dr_grpo') "
                f"uses it, and this call aggregates with {agg!r}; expected None, got {max_completion_length!r}")
        max_completion_length = _check_int("max_completion_length", max_completion_length, 1)
    ga = _check_int("gradient_accumulation_steps", gradient_accumulation_steps, 1)
    # token-mean over a global count: dapo / cispo / vespo, or an explicit loss_agg_mode="token-mean".
    # bnpo is defined by its local count (TRL), so it takes no num_items_in_batch.
    global_count = agg == "token-mean" and (loss_agg_mode is not None or loss_type != "bnpo")

    return dict(
        base="grpo" if loss_type == "gspo" else loss_type, loss_type=loss_type, level=level, agg=agg,
        eps_low=eps_low, eps_high=eps_high, delta=delta, clip_ratio_c=clip_ratio_c, clipped=clipped,
        sapo_pos=sapo_pos, sapo_neg=sapo_neg, k_pos=k_pos, lam_pos=lam_pos, k_neg=k_neg, lam_neg=lam_neg,
        beta=beta, kl_estimator=kl_estimator, bias_kl=use_bias_correction_kl, entropy_coef=entropy_coef,
        top_q=q, opsm=off_policy_mask_threshold, max_len=max_completion_length, ga=ga,
        global_count=global_count, backend=backend,
    )


def _check_float_tensor(name: str, t) -> None:
    V.check_tensor(name, t)
    V.check_float(name, t, allow_fp64=True)


def _check_like(name: str, t, ref_name: str, ref: Tensor) -> None:
    _check_float_tensor(name, t)
    if t.shape != ref.shape:
        raise ValueError(f"{name}: expected shape {tuple(ref.shape)} (the shape of {ref_name}), "
                         f"got {tuple(t.shape)}")


def _check_mask(name: str, mask, ref_name: str, ref: Tensor) -> None:
    V.check_tensor(name, mask)
    if mask.dtype != torch.bool and not mask.dtype.is_floating_point:
        raise TypeError(
            f"{name}: expected a bool tensor (or a floating tensor of per-token weights), got dtype "
            f"{mask.dtype} (convert an integer attention mask with {name}.bool())")
    if mask.shape != ref.shape:
        raise ValueError(f"{name}: expected shape {tuple(ref.shape)} (the shape of {ref_name}), "
                         f"got {tuple(mask.shape)}")


def _check_per_row(name: str, t, b: int, t_len: int, ref_name: str) -> None:
    """(B,), (B, 1) or (B, T)."""
    _check_float_tensor(name, t)
    ok = ((t.dim() == 1 and t.shape[0] == b)
          or (t.dim() == 2 and t.shape[0] == b and t.shape[1] in (1, t_len)))
    if not ok:
        raise ValueError(
            f"{name}: expected shape ({b},), ({b}, 1) or ({b}, {t_len}) (one value per sequence or per "
            f"token of {ref_name} of shape ({b}, {t_len})), got {tuple(t.shape)}")


def _check_is_truncated(is_truncated, b: int) -> None:
    V.check_tensor("is_truncated", is_truncated)
    if is_truncated.dtype != torch.bool:
        raise TypeError(f"is_truncated: expected a bool tensor (True = truncated completion), got dtype "
                        f"{is_truncated.dtype}")
    if tuple(is_truncated.shape) != (b,):
        raise ValueError(f"is_truncated: expected shape ({b},) (one flag per sequence of logps), got "
                         f"{tuple(is_truncated.shape)}")


def _check_logps(logps) -> Tuple[int, int]:
    _check_float_tensor("logps", logps)
    if logps.dim() != 2:
        raise ValueError(f"logps: expected a 2-D (B, T) tensor of per-token log-probs, got shape "
                         f"{tuple(logps.shape)}")
    return int(logps.shape[0]), int(logps.shape[1])


# --------------------------------------------------------------------------------------------
# the math: row statistics -> per-token loss -> aggregation


def _compute_dtype(t: Tensor) -> torch.dtype:
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def _clean(t: Tensor, valid: Tensor, dtype: torch.dtype, fill: float = 0.0) -> Tensor:
    """``t`` in ``dtype`` with the positions outside ``valid`` replaced by ``fill``.

    Padding may hold anything (garbage, -inf, NaN); replacing it *before* any math keeps the masked
    positions finite in the forward and their gradient exactly 0 (never 0 * inf = NaN).
    """
    return torch.where(valid, t.to(dtype), fill)


def _per_row(t: Tensor, valid: Tensor, dtype: torch.dtype, fill: float) -> Tensor:
    """(B,), (B, 1) or (B, T) -> (B, 1) or (B, T), cleaned like :func:`_clean`."""
    t = t.to(dtype)
    if t.dim() == 1:
        t = t.unsqueeze(1)
    if t.shape[1] == valid.shape[1] and valid.shape[1] != 1:
        return torch.where(valid, t, fill)
    return torch.where(valid.any(dim=1, keepdim=True), t, fill)


def _masked_mean(x: Tensor, m: Tensor, valid: Tensor) -> Tensor:
    return torch.where(valid, x * m, 0.0).sum() / m.sum().clamp(min=1.0)


def _high_entropy_mask(entropy: Tensor, valid: Tensor, threshold: float) -> Tensor:
    """TRL's ``get_high_entropy_mask`` without a host sync: tokens whose entropy is >= the
    ``threshold``-quantile (linear interpolation, as ``torch.quantile``) of the entropies of the
    valid tokens; all False when no token is valid."""
    return (entropy.float() >= _entropy_quantile(entropy, valid, threshold)) & valid


def _entropy_quantile(entropy: Tensor, valid: Tensor, threshold: float) -> Tensor:
    """The ``threshold``-quantile of :func:`_high_entropy_mask`, a (1,) float32 device tensor (inf
    when no token is valid); no host sync."""
    flat = torch.where(valid, entropy.float(), float("inf")).reshape(-1)
    srt = torch.sort(flat).values
    n = valid.sum()
    rank = ((n - 1).to(torch.float32) * threshold).clamp(min=0.0).reshape(1)
    below = rank.to(torch.long)
    above = rank.ceil().to(torch.long)
    v_below = srt.gather(0, below)
    v_above = srt.gather(0, above)
    return torch.lerp(v_below, v_above, rank - below.to(torch.float32))


def _kl(lp: Tensor, ref: Tensor, estimator: str) -> Tensor:
    d = ref - lp  # log(pi_ref / pi)
    if estimator == "k1":
        return -d
    if estimator == "k2":
        return 0.5 * d * d
    if estimator == "k3":
        return torch.exp(d) - d - 1.0
    dc = d.clamp(-20.0, 20.0)  # low_var_kl: verl's clamped k3
    return (torch.exp(dc) - dc - 1.0).clamp(-10.0, 10.0)


def _row_mean(x: Tensor, m: Tensor) -> Tensor:
    return (x * m).sum(dim=-1, keepdim=True) / m.sum(dim=-1, keepdim=True).clamp(min=1.0)


def _aggregate(tok: Tensor, m: Tensor, valid: Tensor, agg: str, norm_count, max_len: Optional[int],
               ga: int) -> Tensor:
    """The per-token loss ``tok`` (B, T) reduced to a scalar as ``agg`` says (see :func:`policy_loss`)."""
    b, t = tok.shape
    tok = torch.where(valid, tok * m, 0.0)
    if agg == "token-mean":
        if norm_count is not None:  # global count: already spans the accumulation window
            denom = norm_count.to(tok.dtype) if isinstance(norm_count, Tensor) else float(norm_count)
            if isinstance(denom, Tensor):
                return tok.sum() / denom.clamp(min=1.0)
            return tok.sum() / max(denom, 1.0)
        loss = tok.sum() / m.sum().clamp(min=1.0)
    elif agg == "seq-mean-token-mean":
        rows = tok.sum(dim=-1) / m.sum(dim=-1).clamp(min=1.0)
        loss = rows.mean() if b > 0 else rows.sum()
    elif agg == "seq-mean-token-sum":
        rows = tok.sum(dim=-1)
        loss = rows.mean() if b > 0 else rows.sum()
    else:  # seq-mean-token-sum-norm
        loss = tok.sum() / (max(b, 1) * (t if max_len is None else max_len))
    return loss / ga if ga != 1 else loss


def _policy_loss_torch(logps, old_logps, advantages, mask, ref_logps, entropy, sampling_logps,
                       importance_sampling_ratio, is_truncated, num_items_in_batch, o):
    b, t = logps.shape
    dt = _compute_dtype(logps)
    valid = mask if mask.dtype == torch.bool else mask != 0
    if is_truncated is not None:
        valid = valid & ~is_truncated.unsqueeze(1)
    m = valid.to(dt) if mask.dtype == torch.bool else torch.where(valid, mask.to(dt), 0.0)

    # Gradients flow to logps and entropy only; every other input is data.
    lp = _clean(logps, valid, dt)
    old = lp.detach() if old_logps is None else _clean(old_logps.detach(), valid, dt)
    adv = _per_row(advantages.detach(), valid, dt, 0.0)
    isr = (None if importance_sampling_ratio is None
           else _per_row(importance_sampling_ratio.detach(), valid, dt, 1.0))
    ent = None if entropy is None else _clean(entropy, valid, dt)

    # ---- row statistics (reductions over T that the per-token pass needs)
    log_ratio = (lp - old).clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)
    if o["level"] == "token":
        log_w = log_ratio
    else:  # one weight per sequence: the mean token log-ratio (GSPO)
        log_w = _row_mean(lp - old, m).clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)
    coef_1 = torch.exp(log_w)

    keep = None
    if o["opsm"] is not None:  # off-policy sequence mask (DeepSeek-V3.2): drop A < 0 rows that drifted
        samp = old if sampling_logps is None else _clean(sampling_logps.detach(), valid, dt)
        seq_kl = _row_mean(torch.nan_to_num(samp - lp.detach(), nan=0.0), m)
        keep = ((adv >= 0) | (seq_kl <= o["opsm"])).to(dt)

    ent_mask = None
    if o["top_q"] < 1.0:
        ent_mask = _high_entropy_mask(ent.detach(), valid, 1.0 - o["top_q"])

    phi = None
    if o["base"] == "vespo":
        with torch.no_grad():
            seq_log_w = (log_ratio * m).sum(dim=-1, keepdim=True)
            if isr is not None:
                seq_log_w = seq_log_w + torch.log(isr).clamp(_VESPO_LOG_W_MIN, 20.0).sum(dim=-1, keepdim=True)
            seq_log_w = seq_log_w.clamp(_VESPO_LOG_W_MIN, 20.0)
            nonneg = adv >= 0
            k = torch.where(nonneg, adv.new_full((), o["k_pos"]), adv.new_full((), o["k_neg"]))
            lam = torch.where(nonneg, adv.new_full((), o["lam_pos"]), adv.new_full((), o["lam_neg"]))
            lam = lam.clamp(min=1e-4)
            phi = torch.exp(lam + k * seq_log_w - lam * torch.exp(seq_log_w))
            phi = phi.nan_to_num(nan=0.0, posinf=0.0, neginf=0.0)

    # ---- the per-token loss (elementwise)
    zero_flags = None
    low = high = dual = zero_flags
    base = o["base"]
    if o["clipped"]:
        coef_2 = coef_1.clamp(1.0 - o["eps_low"], 1.0 + o["eps_high"])
        c1 = coef_1 if o["delta"] is None else coef_1.clamp(max=o["delta"])
        per_token = -torch.min(c1 * adv, coef_2 * adv)
        if o["clip_ratio_c"] is not None:  # dual-clip: for A < 0 the loss is at most -A * c
            bound = -adv * o["clip_ratio_c"]
            dual = (adv < 0) & (per_token > bound)
            per_token = torch.where(adv < 0, torch.min(per_token, bound), per_token)
        low = (c1 < 1.0 - o["eps_low"]) & (adv < 0)
        high = (c1 > 1.0 + o["eps_high"]) & (adv > 0)
    elif base == "cispo":
        per_token = -coef_1.clamp(max=o["eps_high"]).detach() * adv * lp
        high = (coef_1 > o["eps_high"]) & (adv > 0)
    elif base == "sapo":
        temp = torch.where(adv > 0, adv.new_full((), o["sapo_pos"]), adv.new_full((), o["sapo_neg"]))
        per_token = -(torch.sigmoid(temp * (coef_1 - 1.0)) * 4.0 / temp) * adv
    else:  # vespo
        per_token = -phi * adv * lp

    if keep is not None:
        per_token = per_token * keep
    if ent_mask is not None:
        per_token = per_token * ent_mask
    if isr is not None and base != "vespo":
        per_token = per_token * isr

    kl = None
    if ref_logps is not None:
        ref = _clean(ref_logps.detach(), valid, dt)
        kl = _kl(lp, ref, o["kl_estimator"])
        if o["bias_kl"]:  # importance-sampling correction (DeepSeek-V3.2), with the undelta'd ratio
            kl = kl * coef_1
        if o["beta"] != 0.0:
            per_token = per_token + o["beta"] * kl
    per_token = per_token.expand(b, t)

    # ---- aggregation
    norm_count = num_items_in_batch if o["global_count"] else None
    loss = _aggregate(per_token, m, valid, o["agg"], norm_count, o["max_len"], o["ga"])
    policy = loss
    if o["entropy_coef"] != 0.0:
        eff = m if ent_mask is None else m * ent_mask
        bonus = torch.where(valid, ent * eff, 0.0).sum() / eff.sum().clamp(min=1.0)
        if o["ga"] != 1:
            bonus = bonus / o["ga"]
        loss = loss - o["entropy_coef"] * bonus

    metrics = _policy_metrics(policy, kl, ent, log_ratio, coef_1, low, high, dual, m, valid, o)
    return loss, metrics


def _policy_metrics(policy, kl, ent, log_ratio, coef_1, low, high, dual, m, valid, o) -> Dict[str, Tensor]:
    b = m.shape[0]
    with torch.no_grad():
        zero = torch.zeros((), dtype=torch.float32, device=m.device)
        seq_level = o["level"] == "sequence"

        def mean(x: Optional[Tensor]) -> Tensor:
            if x is None:
                return zero
            x = x.to(m.dtype)
            if seq_level and x.shape[-1] == 1:  # one value per sequence: mean over all rows (as TRL)
                return x.sum() / max(b, 1)
            return _masked_mean(x.expand_as(m), m, valid)

        def row_extreme(x: Optional[Tensor], largest: bool) -> Tensor:
            if x is None or b == 0:
                return zero
            x = x.to(m.dtype)
            if seq_level and x.shape[-1] == 1:
                rows, ok = x.squeeze(1), torch.ones(b, dtype=torch.bool, device=m.device)
            else:
                x = x.expand_as(m)
                rows = torch.where(valid, x * m, 0.0).sum(-1) / m.sum(-1).clamp(min=1.0)
                ok = valid.any(dim=-1)
            fill = float("-inf") if largest else float("inf")
            rows = torch.where(ok, rows, fill)
            v = rows.amax() if largest else rows.amin()
            return torch.where(ok.any(), v, 0.0)

        region = None if low is None and high is None else (
            high if low is None else (low if high is None else low | high))
        out = {
            "policy_loss": policy.detach(),
            "kl": mean(kl),
            "entropy": mean(ent),
            "approx_kl": _masked_mean(-log_ratio, m, valid),
            "ratio_mean": mean(coef_1),
            "clip_ratio/low_mean": mean(low),
            "clip_ratio/high_mean": mean(high),
            "clip_ratio/region_mean": mean(region),
            "clip_ratio/low_min": row_extreme(low, largest=False),
            "clip_ratio/high_max": row_extreme(high, largest=True),
            "clip_ratio/dual_mean": mean(dual),
        }
        return {k: v.to(torch.float32) for k, v in out.items()}


# --------------------------------------------------------------------------------------------
# the fused path: per-token math and row sums in one kernel (ops/policy.py), O(B) torch after


def _fused_backend(o: dict, logps: Tensor, mask: Tensor) -> Optional[str]:
    """The concrete backend of the fused op for this call, or None for the torch path.

    Fused: the backend resolves to ``"triton"`` (``"auto"`` with CUDA tensors, or ``"triton"``
    asked for, which on CPU tensors needs ``TRITON_INTERPRET=1`` as everywhere in the library), for
    every loss type, level and option, with fp32/bf16/fp16 ``logps`` of at least one element and
    a mask that is not itself differentiated (the torch path propagates into float mask weights).
    The other backends, and ``"auto"`` on CPU tensors, return None before any resolution (nothing
    for ``torch.compile`` to trace). Metadata only: no host sync.
    """
    backend = o.get("backend", "auto")
    if backend in ("torch", "cpu", "cuda", "reference"):
        return None
    if backend == "auto" and logps.device.type != "cuda" and os.environ.get(ENV_VAR, "auto") == "auto":
        return None
    if resolve_backend(backend, logps.device) != "triton":
        return None
    if (o["loss_type"] not in policy_ops.FUSED_LOSS_TYPES or logps.dtype == torch.float64 or logps.numel() == 0
            or (mask.requires_grad and torch.is_grad_enabled())):
        return None
    return "triton"


def _aggregate_rows(row_loss: Tensor, row_m: Tensor, agg: str, norm_count, max_len: Optional[int], ga: int,
                    b: int, t: int) -> Tensor:
    """:func:`_aggregate` from the per-row sums ``row_loss = sum_t l m`` and ``row_m = sum_t m``."""
    if agg == "token-mean":
        if norm_count is not None:  # global count: already spans the accumulation window
            if isinstance(norm_count, Tensor):
                return row_loss.sum() / norm_count.to(row_loss.dtype).clamp(min=1.0)
            return row_loss.sum() / max(float(norm_count), 1.0)
        loss = row_loss.sum() / row_m.sum().clamp(min=1.0)
    elif agg == "seq-mean-token-mean":
        loss = (row_loss / row_m.clamp(min=1.0)).mean()
    elif agg == "seq-mean-token-sum":
        loss = row_loss.mean()
    else:  # seq-mean-token-sum-norm
        loss = row_loss.sum() / (max(b, 1) * (t if max_len is None else max_len))
    return loss / ga if ga != 1 else loss


def _policy_loss_fused(logps, old_logps, advantages, mask, ref_logps, entropy, sampling_logps,
                       importance_sampling_ratio, is_truncated, count, o, backend: str):
    """:func:`_policy_loss_torch` for the calls :func:`_fused_backend` accepts: the per-token loss and
    the per-row sums from ``posttrain_kernels::policy_token_loss_forward`` (row statistics included),
    the aggregation (whose gradient is a per-row scale of each token's loss) and the metrics from
    the (B, NSTAT) sums. The entropy-quantile threshold is computed here, on the device, before the
    kernel (a quantile over the whole batch)."""
    b, t = logps.shape
    if is_truncated is not None:  # truncated completions leave the loss, the counts and the quantile
        mask = mask.masked_fill(is_truncated.unsqueeze(1), 0)
    bonus = o["entropy_coef"] != 0.0
    ent_in = None if entropy is None else (entropy if bonus else entropy.detach())
    ent_thr = None
    if o["top_q"] < 1.0:
        valid = mask if mask.dtype == torch.bool else mask != 0
        ent_thr = _entropy_quantile(entropy.detach(), valid, 1.0 - o["top_q"])
    seq = o["level"] == "sequence"
    _, part = policy_ops.policy_token_loss_forward(
        logps, None if old_logps is None else old_logps.detach(), advantages.detach(), mask,
        None if ref_logps is None else ref_logps.detach(), ent_in, o["loss_type"], o["eps_low"], o["eps_high"],
        o["delta"], o["clip_ratio_c"], o["sapo_pos"], o["sapo_neg"], o["beta"], o["kl_estimator"], o["bias_kl"],
        backend,
        sampling_logps=(None if sampling_logps is None or o["opsm"] is None else sampling_logps.detach()),
        importance_sampling_ratio=(None if importance_sampling_ratio is None
                                   else importance_sampling_ratio.detach()),
        entropy_threshold=ent_thr, sequence_level=seq, off_policy_threshold=o["opsm"],
        vespo_k_pos=o["k_pos"], vespo_lambda_pos=o["lam_pos"], vespo_k_neg=o["k_neg"],
        vespo_lambda_neg=o["lam_neg"])
    col = policy_ops.COL
    stats = part.detach()
    row_m = stats[:, col["mask"]]
    norm_count = count if o["global_count"] else None
    loss = _aggregate_rows(part[:, col["loss"]], row_m, o["agg"], norm_count, o["max_len"], o["ga"], b, t)
    policy = loss
    if bonus:  # over the high-entropy tokens with top_entropy_quantile < 1 (entropy_q = entropy else)
        h = part[:, col["entropy_q"]].sum() / stats[:, col["mask_q"]].sum().clamp(min=1.0)
        if o["ga"] != 1:
            h = h / o["ga"]
        loss = loss - o["entropy_coef"] * h
    return loss, _fused_metrics(policy, stats, o, ref_logps is not None, entropy is not None, advantages, t)


def _row_flags(ratio: Tensor, adv: Tensor, o: dict) -> Tuple[Optional[Tensor], Optional[Tensor], Optional[Tensor]]:
    """(low, high, dual) per row (B,) bool, from the row's ratio and advantage: the clip flags of
    :func:`_policy_loss_torch` at sequence level when they are one per row; None where a loss type
    has none."""
    low = high = dual = None
    if o["clipped"]:
        lo, hi = 1.0 - o["eps_low"], 1.0 + o["eps_high"]
        c1 = ratio if o["delta"] is None else ratio.clamp(max=o["delta"])
        if o["clip_ratio_c"] is not None:
            per_row = -torch.min(c1 * adv, ratio.clamp(lo, hi) * adv)
            dual = (adv < 0) & (per_row > -adv * o["clip_ratio_c"])
        low = (c1 < lo) & (adv < 0)
        high = (c1 > hi) & (adv > 0)
    elif o["base"] == "cispo":
        high = (ratio > o["eps_high"]) & (adv > 0)
    return low, high, dual


def _fused_metrics(policy: Tensor, stats: Tensor, o: dict, has_ref: bool, has_entropy: bool, advantages: Tensor,
                   t: int) -> Dict[str, Tensor]:
    """:func:`_policy_metrics` from the per-row sums of ``ops.policy.PARTIAL_COLUMNS``.

    At sequence level, the quantities that are one per row in the torch path (the ratio; the clip
    flags when the advantages are one per row; every per-token quantity when T = 1) are averaged
    over all B rows, as TRL's ``masked_batch_mean`` does; the rest over the tokens."""
    col = policy_ops.COL
    with torch.no_grad():
        b = stats.shape[0]
        zero = torch.zeros((), dtype=torch.float32, device=stats.device)
        tot = stats.sum(dim=0)
        denom = tot[col["mask"]].clamp(min=1.0)
        row_denom = stats[:, col["mask"]].clamp(min=1.0)
        ok = stats[:, col["count"]] > 0  # rows with tokens
        seq = o["level"] == "sequence"

        def mean(name: str) -> Tensor:
            if seq and t == 1:  # one token per row: the row's value, averaged over all rows
                return torch.where(ok, stats[:, col[name]] / stats[:, col["mask"]], 0.0).sum() / b
            return tot[col[name]] / denom

        def row_extreme(name: str, largest: bool) -> Tensor:
            rows = torch.where(ok, stats[:, col[name]] / row_denom, float("-inf") if largest else float("inf"))
            v = rows.amax() if largest else rows.amin()
            return torch.where(ok.any(), v, 0.0)

        clipped, cispo = o["clipped"], o["base"] == "cispo"
        out = {
            "policy_loss": policy.detach(),
            "kl": mean("kl") if has_ref else zero,
            "entropy": mean("entropy") if has_entropy else zero,
            "approx_kl": -tot[col["log_ratio"]] / denom,
            "ratio_mean": stats[:, col["ratio"]].sum() / b if seq else mean("ratio"),
        }
        if seq and (advantages.dim() == 1 or advantages.shape[1] == 1 or t == 1):
            # one advantage per row: the flags are one per row (B, 1) in the torch path
            adv = advantages.detach().to(torch.float32).reshape(b, -1)[:, 0]
            adv = torch.where(ok, adv, 0.0)
            low, high, dual = _row_flags(stats[:, col["ratio"]], adv, o)

            def rmean(x):
                return zero if x is None else x.to(torch.float32).sum() / b

            region = None if low is None and high is None else (high if low is None else low | high)
            out.update({
                "clip_ratio/low_mean": rmean(low),
                "clip_ratio/high_mean": rmean(high),
                "clip_ratio/region_mean": rmean(region),
                "clip_ratio/low_min": zero if low is None else low.to(torch.float32).amin(),
                "clip_ratio/high_max": zero if high is None else high.to(torch.float32).amax(),
                "clip_ratio/dual_mean": rmean(dual),
            })
        else:
            if clipped:
                region = (tot[col["clip_low"]] + tot[col["clip_high"]]) / denom  # low, high: A < 0, A > 0
            else:
                region = mean("clip_high") if cispo else zero
            out.update({
                "clip_ratio/low_mean": mean("clip_low") if clipped else zero,
                "clip_ratio/high_mean": mean("clip_high") if clipped or cispo else zero,
                "clip_ratio/region_mean": region,
                "clip_ratio/low_min": row_extreme("clip_low", largest=False) if clipped else zero,
                "clip_ratio/high_max": row_extreme("clip_high", largest=True) if clipped or cispo else zero,
                "clip_ratio/dual_mean": mean("clip_dual") if o["clip_ratio_c"] is not None else zero,
            })
        return {k: out[k].to(torch.float32) for k in POLICY_METRIC_KEYS}


# --------------------------------------------------------------------------------------------
# public API


def policy_loss(
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
    num_items_in_batch: Optional[Count] = None,
    max_completion_length: Optional[int] = None,
    gradient_accumulation_steps: int = 1,
    backend: str = "auto",
) -> Tuple[Tensor, Dict[str, Tensor]]:
    """The policy-gradient loss of the PPO / GRPO family on per-token log-probs, with the semantics
    of TRL 1.16's ``GRPOTrainer._compute_loss`` (option names and defaults of ``GRPOConfig``) plus
    verl's dual-clip, KL estimators and loss aggregation modes.

    Args:
        logps: ``(B, T)`` log-probs of the sampled tokens under the policy being trained (float32,
            bfloat16, float16 or float64); the only input besides ``entropy`` that gets a gradient.
        old_logps: ``(B, T)`` log-probs under the policy that sampled (``pi_old``), or ``None`` for
            on-policy training: ``old_logps = logps.detach()``, so the ratio is exactly 1 and its
            gradient is ``grad logps`` (TRL's ``num_iterations=1`` shortcut).
        advantages: ``(B,)`` or ``(B, 1)`` (one per sequence) or ``(B, T)`` (one per token).
        mask: ``(B, T)`` bool (True = the token is in the loss), or floating: per-token weights (0 =
            out), used as TRL uses ``completion_mask * tool_mask``. Integer masks are refused
            (``TypeError``): convert with ``mask.bool()``.
        ref_logps: ``(B, T)`` log-probs under the reference policy; required when ``beta != 0``.
            When given with ``beta == 0`` the KL is only reported (``metrics["kl"]``).
        entropy: ``(B, T)`` entropy of the policy at each position (from :func:`token_logprobs` with
            ``return_entropy=True``); required when ``entropy_coef != 0`` or
            ``top_entropy_quantile < 1``; differentiable (the entropy bonus back-propagates into it).
        sampling_logps: ``(B, T)`` log-probs of the inference engine that sampled (TRL's
            ``sampling_per_token_logps``), used only by the off-policy sequence mask; defaults to
            ``old_logps``.
        importance_sampling_ratio: ``(B,)``, ``(B, 1)`` or ``(B, T)`` train/inference mismatch weights
            (TRL's vLLM ``importance_sampling_ratio``, already truncated or masked): the per-token
            loss is multiplied by it (VESPO folds its log into the sequence weight instead).
        is_truncated: ``(B,)`` bool, True for completions cut at the length limit: their tokens
            leave the loss, the counts and the entropy quantile (TRL's
            ``mask_truncated_completions=True``); they still count as rows in the sequence means.
        loss_type: one of ``grpo, bnpo, dr_grpo, dapo, cispo, sapo, gspo, luspo, vespo``
            (default ``"dapo"``, as TRL); see the formulas below.
        loss_agg_mode: ``None`` (the aggregation the loss type implies, see below) or one of verl's
            ``"token-mean"``, ``"seq-mean-token-sum"``, ``"seq-mean-token-mean"``,
            ``"seq-mean-token-sum-norm"``, which then overrides it.
        importance_sampling_level: ``"token"`` or ``"sequence"`` (GSPO: one ratio per sequence,
            ``exp(mean_t log r_t)``). ``None`` (default) = the loss type's own level: ``"sequence"``
            for ``gspo`` and ``luspo``, ``"token"`` otherwise. ``gspo``/``luspo`` with ``"token"``
            and ``vespo`` with ``"sequence"`` are refused (TRL only warns).
        epsilon_low: lower clip ``eps_low`` in ``[0, 1]``: the ratio is clipped below at
            ``1 - eps_low`` (TRL's ``epsilon``, default 0.2).
        epsilon_high: upper clip ``eps_high >= 0`` (``None`` = ``epsilon_low``; DAPO recommends
            0.28). For ``cispo`` it is the absolute cap ``eps_max > 0`` of the ratio (ScaleRL
            recommends 5.0).
        delta: two-sided bound (INTELLECT-2): the unclipped branch uses ``min(r, delta)``; ``None``
            disables it. Clipped loss types only; recommended ``> 1 + eps_high``.
        clip_ratio_c: dual-clip PPO bound ``c > 1`` (verl; Ye et al. 2019): for ``A < 0`` the
            per-token loss is at most ``-A * c``. ``None`` disables it. Clipped loss types only.
        sapo_temperature_pos, sapo_temperature_neg: SAPO gate temperatures ``tau > 0`` for
            ``A > 0`` and ``A <= 0`` (TRL defaults 1.0 and 1.05).
        vespo_k_pos, vespo_lambda_pos, vespo_k_neg, vespo_lambda_neg: VESPO's Gamma-weight shape for
            ``A >= 0`` and ``A < 0`` (TRL defaults 2.0, 3.0, 3.0, 2.0).
        beta: KL coefficient (TRL's name; verl's ``kl_loss_coef``); default 0.0 (no KL term).
        kl_estimator: per-token estimator of ``KL(pi || pi_ref)``, with ``d = ref_logps - logps``:
            ``"k1"``: ``-d``; ``"k2"``: ``d**2 / 2``; ``"k3"`` (TRL, default): ``exp(d) - d - 1``;
            ``"low_var_kl"`` (verl's k3): ``clamp(exp(d') - d' - 1, -10, 10)``,
            ``d' = clamp(d, -20, 20)``.
        use_bias_correction_kl: multiply the per-token KL by the (differentiable) importance ratio
            ``r`` (DeepSeek-V3.2; TRL default True). Changes the KL gradient even on-policy.
        entropy_coef: weight of the entropy bonus (``loss -= entropy_coef * H``, ``H`` the mean entropy
            over the loss tokens, restricted to the high-entropy tokens when
            ``top_entropy_quantile < 1``, divided by ``gradient_accumulation_steps``, never by a
            loss-type normalizer: TRL's definition). 0.0 = no bonus. Adaptive entropy control
            (TRL ``use_adaptive_entropy``) is the caller's: change ``entropy_coef`` between steps.
        top_entropy_quantile: ``rho`` in ``[0, 1]`` (Beyond the 80/20 Rule): only tokens whose
            entropy is ``>=`` the ``(1 - rho)``-quantile of the valid tokens' entropies (this batch,
            linear interpolation) keep their policy loss; 1.0 (default) keeps all.
        off_policy_mask_threshold: off-policy sequence mask (DeepSeek-V3.2): a sequence with
            ``A < 0`` whose mean ``sampling_logps - logps`` over its tokens exceeds the threshold
            is dropped from the policy term. ``None`` (default) disables it.
        num_items_in_batch: for ``"token-mean"`` aggregation (``dapo``, ``cispo``, ``vespo``, or an
            explicit ``loss_agg_mode="token-mean"``): the token count to divide by, a number or a
            one-element device tensor (never read on the host), clamped to ``>= 1``. Under gradient
            accumulation pass the loss tokens of the whole accumulation window on this rank (TRL:
            ``num_items_in_batch / num_processes * gradient_accumulation_steps /
            steps_per_generation``); it replaces ``gradient_accumulation_steps`` for the policy
            term. ``None``: the local token count (then ``dapo`` equals ``bnpo``). Refused by
            ``bnpo`` and the other aggregations.
        max_completion_length: the constant ``L`` of ``"seq-mean-token-sum-norm"`` (``dr_grpo``);
            ``None`` = ``T``. TRL uses its config's ``max_completion_length`` (default 512): pass it
            for the same numbers. Refused by the other aggregations.
        gradient_accumulation_steps: the local normalizers (and the entropy bonus) are divided by
            it, as TRL does (``current_gradient_accumulation_steps``); default 1.
        backend: ``"auto" | "triton" | "cuda" | "cpu" | "torch" | "reference"`` (resolved as
            everywhere in the library: ``"auto"`` is Triton for CUDA tensors). ``"triton"`` fuses
            the row statistics (sequence-level ratio, VESPO weight, off-policy mask) and the
            per-token math into one Triton kernel forward and one backward for every loss type,
            level and option (the entropy-quantile threshold, a sort over the batch, runs in
            PyTorch before the kernel; same numbers); float64 ``logps``, an empty ``logps``, a
            mask that requires grad and the other backends run the vectorized PyTorch
            implementation.

    Returns:
        ``(loss, metrics)``: ``loss`` a 0-d float32 tensor (float64 for float64 ``logps``),
        differentiable w.r.t. ``logps`` (and ``entropy`` when ``entropy_coef != 0``); ``metrics`` a
        dict with exactly the keys :data:`POLICY_METRIC_KEYS`, each a detached 0-d float32 tensor
        (no host sync):

        - ``policy_loss``: the loss without the entropy bonus;
        - ``kl``: mean per-token KL to the reference (as it enters the loss, bias correction
          included); 0 when ``ref_logps`` is None;
        - ``entropy``: mean entropy over the loss tokens; 0 when ``entropy`` is None;
        - ``approx_kl``: mean ``old_logps - logps`` over the loss tokens (verl's ``ppo_kl``);
        - ``ratio_mean``: mean importance ratio ``r`` (per token, or per sequence at sequence level);
        - ``clip_ratio/low_mean``, ``clip_ratio/high_mean``, ``clip_ratio/region_mean``: fraction of
          tokens (sequences at sequence level) with ``r < 1 - eps_low, A < 0`` / ``r > 1 + eps_high,
          A > 0`` / either (TRL's names; ``r`` after ``delta``); for ``cispo`` the high fraction is
          ``r > eps_max, A > 0`` (TRL's ``cispo_clip_ratio``); 0 for ``sapo`` and ``vespo``;
        - ``clip_ratio/low_min``, ``clip_ratio/high_max``: min / max over sequences of the per-sequence
          low / high fractions (over the sequences that have tokens; 0 if none);
        - ``clip_ratio/dual_mean``: fraction of tokens (sequences at sequence level) where the dual
          clip binds (verl's ``pg_clipfrac_lower``); 0 without ``clip_ratio_c``.

    Per token, with ``r = exp(clamp(logps - old_logps, -20, 20))`` (token level) or
    ``r = exp(clamp(sum_t m_t (logps_t - old_t) / max(sum_t m_t, 1), -20, 20))`` (sequence level),
    ``A`` the advantage and ``sg`` stop-gradient::

        grpo, bnpo, dr_grpo, dapo, gspo, luspo:
            l = -min(min(r, delta) * A, clip(r, 1 - eps_low, 1 + eps_high) * A)
            dual-clip (A < 0): l = min(l, -A * clip_ratio_c)
        cispo:  l = -sg(min(r, eps_high)) * A * logps
        sapo:   l = -(4 / tau) * sigmoid(tau * (r - 1)) * A,    tau = tau_pos if A > 0 else tau_neg
        vespo:  l = -sg(phi) * A * logps,   phi = exp(lam + k log w - lam w),
                log w = clamp(sum_t m_t clamp(logps_t - old_t, -20, 20), log 1e-8, 20)
                (+ sum_t log IS ratio), (k, lam) = (k_pos, lam_pos) if A >= 0 else (k_neg, lam_neg)

    then ``l *= off-policy keep * high-entropy mask * importance_sampling_ratio`` (those given) and
    ``l += beta * KL`` (``KL * r`` with bias correction). With ``m`` the mask (weights) and ``G``
    ``gradient_accumulation_steps``, the aggregation (TRL's per loss type, or ``loss_agg_mode``)::

        token-mean               (bnpo, dapo, cispo, vespo):  sum(l m) / max(sum m, 1) / G
                                  or sum(l m) / max(num_items_in_batch, 1)
        seq-mean-token-mean      (grpo, gspo, sapo):  mean_b [sum_t l m / max(sum_t m, 1)] / G
        seq-mean-token-sum       (luspo):  mean_b [sum_t l m] / G
        seq-mean-token-sum-norm  (dr_grpo):  sum(l m) / (B * max_completion_length) / G

    The sequence means run over all ``B`` rows (a row without tokens contributes 0, as in TRL), and
    a batch without any token gives loss 0 with zero gradients. Padding positions may hold any
    value, NaN and inf included: they never reach the math.

    Same numbers and gradients as TRL 1.16 wherever TRL's are finite, except: the log-ratio clamp
    to ``[-20, 20]`` (TRL's ``exp`` overflows to inf / NaN gradients; only ``|log r| > 20``
    differs); the entropy quantile and the metrics are over this call's tokens (TRL gathers them
    across processes: all-reduce them yourself); ``max_completion_length`` defaults to ``T``, not
    512; ``gspo``/``luspo`` at token level and ``vespo`` at sequence level are errors, not warnings.
    """
    o = _policy_options(
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
    return _policy_loss_checked(
        o, logps, old_logps, advantages, mask, ref_logps=ref_logps, entropy=entropy,
        sampling_logps=sampling_logps, importance_sampling_ratio=importance_sampling_ratio,
        is_truncated=is_truncated, num_items_in_batch=num_items_in_batch)


def _policy_loss_checked(o: dict, logps, old_logps, advantages, mask, *, ref_logps, entropy,
                         sampling_logps, importance_sampling_ratio, is_truncated, num_items_in_batch):
    """Checks the tensors of one call against already-checked options ``o`` and runs the math."""
    b, t = _check_logps(logps)
    if old_logps is not None:
        _check_like("old_logps", old_logps, "logps", logps)
    _check_per_row("advantages", advantages, b, t, "logps")
    _check_mask("mask", mask, "logps", logps)
    for name, x in (("ref_logps", ref_logps), ("entropy", entropy), ("sampling_logps", sampling_logps)):
        if x is not None:
            _check_like(name, x, "logps", logps)
    if importance_sampling_ratio is not None:
        _check_per_row("importance_sampling_ratio", importance_sampling_ratio, b, t, "logps")
    if is_truncated is not None:
        _check_is_truncated(is_truncated, b)
    count = _check_count("num_items_in_batch", num_items_in_batch)
    if count is not None and not o["global_count"]:
        raise ValueError(
            f"num_items_in_batch: only 'token-mean' aggregation over a global count uses it (loss_type "
            f"dapo, cispo, vespo, or loss_agg_mode='token-mean'); loss_type={o['loss_type']!r} "
            f"aggregates with {o['agg']!r}" + (" over the local token count" if o["loss_type"] == "bnpo" else "")
            + "; expected None")
    V.check_same_device(logps=logps, old_logps=old_logps, advantages=advantages, mask=mask,
                        ref_logps=ref_logps, entropy=entropy, sampling_logps=sampling_logps,
                        importance_sampling_ratio=importance_sampling_ratio, is_truncated=is_truncated)
    if o["beta"] != 0.0 and ref_logps is None:
        raise ValueError(f"ref_logps: required when beta != 0 (the KL term), got None with beta={o['beta']!r}")
    if o["entropy_coef"] != 0.0 and entropy is None:
        raise ValueError(f"entropy: required when entropy_coef != 0 (the entropy bonus), got None with "
                         f"entropy_coef={o['entropy_coef']!r}")
    if o["top_q"] < 1.0 and entropy is None:
        raise ValueError(f"entropy: required when top_entropy_quantile < 1, got None with "
                         f"top_entropy_quantile={o['top_q']!r}")
    fused = _fused_backend(o, logps, mask)
    if fused is not None:
        return _policy_loss_fused(logps, old_logps, advantages, mask, ref_logps, entropy, sampling_logps,
                                  importance_sampling_ratio, is_truncated, count, o, fused)
    return _policy_loss_torch(logps, old_logps, advantages, mask, ref_logps, entropy, sampling_logps,
                              importance_sampling_ratio, is_truncated, count, o)


def value_loss(
    values: Tensor,
    old_values: Optional[Tensor],
    returns: Tensor,
    mask: Tensor,
    *,
    cliprange_value: Optional[float] = 0.2,
    loss_agg_mode: str = "token-mean",
    num_items_in_batch: Optional[Count] = None,
    max_completion_length: Optional[int] = None,
    gradient_accumulation_steps: int = 1,
    backend: str = "auto",
) -> Tuple[Tensor, Dict[str, Tensor]]:
    """The PPO value (critic) loss with value clipping (TRL ``PPOTrainer``, verl
    ``compute_value_loss``).

    Args:
        values: ``(B, T)`` value predictions ``v`` of the critic being trained (float32, bfloat16,
            float16 or float64); the only input that gets a gradient.
        old_values: ``(B, T)`` values ``v_old`` at rollout time, or ``None`` (= ``values.detach()``,
            clipping then has no effect).
        returns: ``(B, T)`` return targets ``R``.
        mask: ``(B, T)`` bool, or floating per-token weights, as in :func:`policy_loss`.
        cliprange_value: ``c > 0`` (TRL's and verl's ``cliprange_value``, default 0.2), or ``None``
            for no clipping.
        loss_agg_mode: verl's aggregation (default ``"token-mean"``, as TRL's masked mean), see
            :func:`policy_loss`.
        num_items_in_batch: the token count of ``"token-mean"`` (global count), as in
            :func:`policy_loss`; ``None`` = local count.
        max_completion_length: the constant of ``"seq-mean-token-sum-norm"`` (``None`` = ``T``).
        gradient_accumulation_steps: the local normalizers are divided by it.
        backend: as in :func:`policy_loss`.

    Returns:
        ``(loss, metrics)``: ``loss`` 0-d float32 (float64 for float64 ``values``); ``metrics`` with
        exactly the keys :data:`VALUE_METRIC_KEYS`: ``vf_loss`` (the loss, detached),
        ``vf_clipfrac`` (fraction of tokens where the clipped term is the larger), ``vpred_mean``
        (mean prediction), each a detached 0-d float32 tensor.

    Per token::

        l = 0.5 * max((v - R)**2, (clip(v, v_old - c, v_old + c) - R)**2)

    aggregated by ``loss_agg_mode``.
    """
    o = _value_options(cliprange_value=cliprange_value, loss_agg_mode=loss_agg_mode,
                       max_completion_length=max_completion_length,
                       gradient_accumulation_steps=gradient_accumulation_steps, backend=backend)
    return _value_loss_checked(o, values, old_values, returns, mask, num_items_in_batch=num_items_in_batch)


def _value_options(*, cliprange_value, loss_agg_mode, max_completion_length, gradient_accumulation_steps,
                   backend) -> dict:
    """Checks every non-tensor option of :func:`value_loss` and returns them normalized."""
    _check_choice("loss_agg_mode", loss_agg_mode, LOSS_AGG_MODES)
    validate_backend(backend)
    c = None if cliprange_value is None else V.check_positive("cliprange_value", cliprange_value)
    ga = _check_int("gradient_accumulation_steps", gradient_accumulation_steps, 1)
    if max_completion_length is not None:
        if loss_agg_mode != "seq-mean-token-sum-norm":
            raise ValueError(f"max_completion_length: only loss_agg_mode='seq-mean-token-sum-norm' uses it, got "
                             f"loss_agg_mode={loss_agg_mode!r}; expected None, got {max_completion_length!r}")
        max_completion_length = _check_int("max_completion_length", max_completion_length, 1)
    return dict(c=c, agg=loss_agg_mode, max_len=max_completion_length, ga=ga)


def _value_loss_checked(o: dict, values, old_values, returns, mask, *, num_items_in_batch):
    c, loss_agg_mode, max_completion_length, ga = o["c"], o["agg"], o["max_len"], o["ga"]
    _check_float_tensor("values", values)
    if values.dim() != 2:
        raise ValueError(f"values: expected a 2-D (B, T) tensor, got shape {tuple(values.shape)}")
    if old_values is not None:
        _check_like("old_values", old_values, "values", values)
    _check_like("returns", returns, "values", values)
    _check_mask("mask", mask, "values", values)
    count = _check_count("num_items_in_batch", num_items_in_batch)
    if count is not None and loss_agg_mode != "token-mean":
        raise ValueError(f"num_items_in_batch: only loss_agg_mode='token-mean' uses it, got "
                         f"loss_agg_mode={loss_agg_mode!r}; expected None")
    V.check_same_device(values=values, old_values=old_values, returns=returns, mask=mask)

    dt = _compute_dtype(values)
    valid = mask if mask.dtype == torch.bool else mask != 0
    m = valid.to(dt) if mask.dtype == torch.bool else torch.where(valid, mask.to(dt), 0.0)
    v = _clean(values, valid, dt)
    ret = _clean(returns.detach(), valid, dt)
    loss1 = (v - ret) ** 2
    if c is None:
        per_token = loss1
        clipped = torch.zeros_like(valid)
    else:
        old = v.detach() if old_values is None else _clean(old_values.detach(), valid, dt)
        v_clip = torch.max(torch.min(v, old + c), old - c)
        loss2 = (v_clip - ret) ** 2
        per_token = torch.max(loss1, loss2)
        clipped = loss2 > loss1
    loss = 0.5 * _aggregate(per_token, m, valid, loss_agg_mode, count, max_completion_length, ga)
    with torch.no_grad():
        metrics = {
            "vf_loss": loss.detach().to(torch.float32),
            "vf_clipfrac": _masked_mean(clipped.to(dt), m, valid).to(torch.float32),
            "vpred_mean": _masked_mean(v.detach(), m, valid).to(torch.float32),
        }
    return loss, metrics
