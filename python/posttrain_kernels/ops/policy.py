"""Custom ops + autograd for the policy-gradient losses (``posttrain_kernels::policy_*``).

``policy_token_loss_forward`` computes, for every loss type of ``policy_loss`` (``grpo``, ``bnpo``,
``dr_grpo``, ``dapo``, ``gspo``, ``luspo``, ``cispo``, ``sapo``, ``vespo``) at token- or
sequence-level importance sampling, the per-token loss (ratio, clipping, delta, dual clip, the
off-policy sequence mask, the entropy-quantile mask, ``importance_sampling_ratio``, the KL
estimator with optional bias correction) and the per-row partial sums of ``PARTIAL_COLUMNS`` in
one kernel (a row pass first where a row statistic is needed: the sequence-level ratio, vespo's
sequence weight, the off-policy mask); the aggregation over rows and the metrics are O(B)
PyTorch on those partials (``posttrain_kernels.api.policy``). The entropy-quantile threshold is a
quantile over the whole batch: the caller computes it (a sort, in PyTorch, no host sync) and
passes it as a one-element tensor. ``policy_token_loss_backward`` takes the upstream gradient of
each row's ``loss``, ``entropy`` and ``entropy_q`` partials (the aggregation makes it a per-row
scale of every token's loss) and the forward's partials (the row statistics: the sequence-level
ratio and its gradient share, vespo's weight, the off-policy mask), and writes ``d / d logps``
and ``d / d entropy`` in one pass.

Backends: ``"triton"`` runs the kernels of ``posttrain_kernels.kernels.policy``; every other
backend name runs the vectorized PyTorch transcription below (same per-token quantities, same
partials, the same derivative rules). The ops never mutate an input and allocate their outputs,
so ``torch.compile`` traces them (see ``ops.registration``: the Triton kernels are visible to it
where Triton compiles).
"""
from __future__ import annotations

import importlib
import math
from typing import Optional, Tuple

import torch
from torch import Tensor

from .registration import kernel_op

_F32 = torch.float32

# Loss types the fused ops cover, and their kernel family (0 clipped surrogate, 1 cispo, 2 sapo,
# 3 vespo). gspo / luspo are the clipped surrogate; their sequence level is ``sequence_level``.
LOSS_KINDS = {"grpo": 0, "bnpo": 0, "dr_grpo": 0, "dapo": 0, "gspo": 0, "luspo": 0, "cispo": 1, "sapo": 2,
              "vespo": 3}
FUSED_LOSS_TYPES = tuple(LOSS_KINDS)
KL_ESTIMATORS = ("k1", "k2", "k3", "low_var_kl")

# Columns of the per-row partial sums (fp32 [B, len(PARTIAL_COLUMNS)]), over the row's valid
# tokens (m != 0, m the mask weight); the same layout as kernels/policy.py. M = max(sum m, 1).
PARTIAL_COLUMNS = (
    "loss",        # sum m l
    "mask",        # sum m
    "count",       # number of valid tokens
    "clip_low",    # sum m [min(r, delta) < 1 - eps_low and A < 0]      (clipped types)
    "clip_high",   # sum m [min(r, delta) > 1 + eps_high and A > 0]; cispo: [r > eps_max and A > 0]
    "clip_dual",   # sum m [A < 0 and the dual clip binds]
    "ratio",       # sum m r (token level); the row's ratio r_row (sequence level)
    "log_ratio",   # sum m clamp(logps - old_logps, -20, 20)
    "kl",          # sum m kl (bias correction included)
    "entropy",     # sum m H
    "entropy_q",   # sum m e H, e = [H >= entropy_threshold] (= entropy without a threshold)
    "mask_q",      # sum m e (= mask without a threshold)
    "row_log_w",   # sequence level: log r_row = clamp(sum m (lp - old) / M, -20, 20); vespo: its
                   # clamped sequence log-weight; else 0
    "row_grad",    # sequence level: [log w not clamped] sum m dl/dlog w / M; else 0
    "seq_kl",      # off-policy mask: sum m nan_to_num(sampling - lp) / M; else 0
)
COL = {name: i for i, name in enumerate(PARTIAL_COLUMNS)}
NSTAT = len(PARTIAL_COLUMNS)
_LR_CLAMP = 20.0
_LOG_W_MIN = math.log(1e-8)


def _kernels():
    return importlib.import_module("posttrain_kernels.kernels.policy")


# --------------------------------------------------------------------------------------------
# vectorized PyTorch implementation (backends other than "triton")


def _operands(logps, old_logps, advantages, mask, ref_logps):
    """(valid, m, lp, old, adv, ref) as (B, T) fp32, every input 0 where not valid."""
    valid = mask if mask.dtype == torch.bool else mask != 0
    m = valid.to(_F32) if mask.dtype == torch.bool else torch.where(valid, mask.to(_F32), 0.0)
    lp = torch.where(valid, logps.to(_F32), 0.0)
    old = lp if old_logps is None else torch.where(valid, old_logps.to(_F32), 0.0)
    adv = advantages.to(_F32)
    if adv.dim() == 1:
        adv = adv.unsqueeze(1)
    adv = torch.where(valid, adv, 0.0)
    ref = None if ref_logps is None else torch.where(valid, ref_logps.to(_F32), 0.0)
    return valid, m, lp, old, adv, ref


def _isr_operand(isr: Optional[Tensor], valid: Tensor) -> Optional[Tensor]:
    """importance_sampling_ratio as (B, 1) (one per row: 1 for rows without tokens) or (B, T) (1
    where masked), fp32."""
    if isr is None:
        return None
    isr = isr.to(_F32)
    if isr.dim() == 1:
        isr = isr.unsqueeze(1)
    if isr.shape[1] == valid.shape[1] and valid.shape[1] != 1:
        return torch.where(valid, isr, 1.0)
    return torch.where(valid.any(dim=1, keepdim=True), isr, 1.0)


def _min_tie_weights(a: Tensor, b: Tensor) -> Tuple[Tensor, Tensor]:
    """Shares of the gradient of ``torch.minimum(a, b)``: 1/0, 0/1, or 1/2 each on a tie."""
    half = 0.5 * (a == b).to(_F32)
    return (a < b).to(_F32) + half, (b < a).to(_F32) + half


class _Opts:
    """The scalar options of one call."""

    def __init__(self, loss_type, epsilon_low, epsilon_high, delta, clip_ratio_c, sapo_temperature_pos,
                 sapo_temperature_neg, beta, kl_estimator, use_bias_correction_kl, sequence_level=False,
                 off_policy_threshold=None, vespo_k_pos=2.0, vespo_lambda_pos=3.0, vespo_k_neg=3.0,
                 vespo_lambda_neg=2.0):
        self.kind = LOSS_KINDS[loss_type]
        self.eps_low, self.eps_high, self.delta, self.clip_c = epsilon_low, epsilon_high, delta, clip_ratio_c
        self.tau_pos, self.tau_neg, self.beta = sapo_temperature_pos, sapo_temperature_neg, beta
        self.kl_estimator, self.bias = kl_estimator, use_bias_correction_kl
        self.seq, self.opsm = bool(sequence_level), off_policy_threshold
        self.vespo = (vespo_k_pos, vespo_lambda_pos, vespo_k_neg, vespo_lambda_neg)


def _row_stats(valid, m, lp, old, samp, isr, o: _Opts):
    """(r_row, log_w, in_w, slw, seq_kl, m_row), (B, 1) each (None where not needed): the kernels'
    row pass."""
    m_row = m.sum(dim=-1, keepdim=True).clamp(min=1.0)
    r_row = log_w = in_w = slw = seq_kl = None
    if o.seq:
        mean = ((lp - old) * m).sum(dim=-1, keepdim=True) / m_row
        in_w = (mean >= -_LR_CLAMP) & (mean <= _LR_CLAMP)
        log_w = mean.clamp(-_LR_CLAMP, _LR_CLAMP)
        r_row = torch.exp(log_w)
    if o.kind == 3:
        s = (m * (lp - old).clamp(-_LR_CLAMP, _LR_CLAMP)).sum(dim=-1, keepdim=True)
        if isr is not None:
            s = s + torch.log(isr).clamp(_LOG_W_MIN, 20.0).sum(dim=-1, keepdim=True)
        slw = s.clamp(_LOG_W_MIN, 20.0)
    if o.opsm is not None:
        x = torch.nan_to_num(samp - lp, nan=0.0)
        seq_kl = (m * x).sum(dim=-1, keepdim=True) / m_row
    return r_row, log_w, in_w, slw, seq_kl, m_row


def _multiplier(valid, adv, h, isr, seq_kl, thr, o: _Opts):
    """(q, e): the policy term's multiplier keep * e * isr (None: 1) and the entropy mask (None: 1)."""
    q = e = None
    if o.opsm is not None:
        q = ((adv >= 0) | (seq_kl <= o.opsm)).to(_F32)
    if thr is not None:
        e = ((h >= thr.reshape(()).to(_F32)) & valid).to(_F32)
        q = e if q is None else q * e
    if isr is not None and o.kind != 3:
        q = isr if q is None else q * isr
    return q, e


def _token_math(lp, old, adv, ref, q, r_row, slw, o: _Opts):
    """Per token: (l, dl, dl_w, low, high, dual, r, lr, kl), the kernels' ``_token_math``."""
    raw = lp - old
    lr = raw.clamp(-_LR_CLAMP, _LR_CLAMP)
    in_lr = (raw >= -_LR_CLAMP) & (raw <= _LR_CLAMP)
    zero = torch.zeros_like(lp)
    if o.seq:
        r = r_row.expand_as(lp)
        dr = r
    else:
        r = torch.exp(lr)
        dr = torch.where(in_lr, r, 0.0)
    low = high = dual = dpd = dpr = zero
    if o.kind == 0:
        clip_lo, clip_hi = 1.0 - o.eps_low, 1.0 + o.eps_high
        c1 = r if o.delta is None else r.clamp(max=o.delta)
        c2 = r.clamp(clip_lo, clip_hi)
        dc1 = torch.ones_like(r) if o.delta is None else (r <= o.delta).to(_F32)
        dc2 = ((r >= clip_lo) & (r <= clip_hi)).to(_F32)
        a, b = c1 * adv, c2 * adv
        wa, wb = _min_tie_weights(a, b)
        loss = -torch.minimum(a, b)
        dpr = -adv * (wa * dc1 + wb * dc2) * dr
        neg = adv < 0
        if o.clip_c is not None:
            bound = -adv * o.clip_c
            dual = (neg & (loss > bound)).to(_F32)
            wl, _ = _min_tie_weights(loss, bound)
            dpr = torch.where(neg, dpr * wl, dpr)
            loss = torch.where(neg, torch.minimum(loss, bound), loss)
        low = ((c1 < clip_lo) & neg).to(_F32)
        high = ((c1 > clip_hi) & (adv > 0)).to(_F32)
    elif o.kind == 1:
        cc = r.clamp(max=o.eps_high)
        loss = -cc * adv * lp
        dpd = -cc * adv
        high = ((r > o.eps_high) & (adv > 0)).to(_F32)
    elif o.kind == 2:
        tau = torch.where(adv > 0, adv.new_full((), o.tau_pos), adv.new_full((), o.tau_neg))
        s = torch.sigmoid(tau * (r - 1.0))
        loss = -(s * 4.0 / tau) * adv
        dpr = -adv * (4.0 / tau) * (s * (1.0 - s)) * tau * dr
    else:
        k_pos, lam_pos, k_neg, lam_neg = o.vespo
        nonneg = adv >= 0
        k = torch.where(nonneg, adv.new_full((), k_pos), adv.new_full((), k_neg))
        lam = torch.where(nonneg, adv.new_full((), lam_pos), adv.new_full((), lam_neg)).clamp(min=1e-4)
        phi = torch.exp(lam + k * slw - lam * torch.exp(slw))
        phi = phi.nan_to_num(nan=0.0, posinf=0.0, neginf=0.0)
        loss = -phi * adv * lp
        dpd = -phi * adv
    if q is not None:
        loss, dpd, dpr = loss * q, dpd * q, dpr * q
    if not o.seq:
        dpd = dpd + dpr
    kl = zero
    if ref is not None:
        d = ref - lp
        if o.kl_estimator == "k1":
            kl, dkl = -d, torch.ones_like(d)
        elif o.kl_estimator == "k2":
            kl, dkl = 0.5 * d * d, -d
        elif o.kl_estimator == "k3":
            e = torch.exp(d)
            kl, dkl = e - d - 1.0, 1.0 - e
        else:
            dc = d.clamp(-20.0, 20.0)
            e = torch.exp(dc)
            v = e - dc - 1.0
            kl = v.clamp(-10.0, 10.0)
            dkl = torch.where((d >= -20.0) & (d <= 20.0) & (v >= -10.0) & (v <= 10.0), 1.0 - e, 0.0)
        if o.bias:
            if o.seq:
                if o.beta != 0.0:
                    dpr = dpr + o.beta * (kl * r)
                dkl = dkl * r
            else:
                dkl = dkl * r + torch.where(in_lr, kl * r, 0.0)
            kl = kl * r
        if o.beta != 0.0:
            loss = loss + o.beta * kl
            dpd = dpd + o.beta * dkl
    if not o.seq:
        dpr = zero
    return loss, dpd, dpr, low, high, dual, r, lr, kl


def _torch_forward(logps, old_logps, advantages, mask, ref_logps, entropy, sampling_logps,
                   importance_sampling_ratio, entropy_threshold, o: _Opts) -> Tuple[Tensor, Tensor]:
    valid, m, lp, old, adv, ref = _operands(logps, old_logps, advantages, mask, ref_logps)
    isr = _isr_operand(importance_sampling_ratio, valid)
    samp = None
    if o.opsm is not None:
        samp = old if sampling_logps is None else torch.where(valid, sampling_logps.to(_F32), 0.0)
    h = torch.zeros_like(lp) if entropy is None else torch.where(valid, entropy.to(_F32), 0.0)
    r_row, log_w, in_w, slw, seq_kl, m_row = _row_stats(valid, m, lp, old, samp, isr, o)
    q, e = _multiplier(valid, adv, h, isr, seq_kl, entropy_threshold, o)
    loss, _, dl_w, low, high, dual, r, lr, kl = _token_math(lp, old, adv, ref, q, r_row, slw, o)
    tok = torch.where(valid, loss, 0.0).expand_as(lp)
    me = m if e is None else m * e

    def rows(x):
        return (x * m).expand_as(lp).sum(dim=-1)

    zero = lp.new_zeros(lp.shape[0])
    cols = {
        "loss": (tok * m).sum(dim=-1), "mask": m.sum(dim=-1), "count": valid.to(_F32).sum(dim=-1),
        "clip_low": rows(low), "clip_high": rows(high), "clip_dual": rows(dual),
        "ratio": r_row.squeeze(1) if o.seq else rows(r), "log_ratio": rows(lr), "kl": rows(kl),
        "entropy": rows(h), "entropy_q": (h * me).sum(dim=-1), "mask_q": me.sum(dim=-1),
        "row_log_w": log_w.squeeze(1) if o.seq else (slw.squeeze(1) if o.kind == 3 else zero),
        "row_grad": (torch.where(in_w, (dl_w * m).sum(dim=-1, keepdim=True) / m_row, 0.0).squeeze(1) if o.seq
                     else zero),
        "seq_kl": seq_kl.squeeze(1) if seq_kl is not None else zero,
    }
    part = torch.stack([cols[name] for name in PARTIAL_COLUMNS], dim=-1)
    return tok.contiguous(), part


def _torch_backward(logps, old_logps, advantages, mask, ref_logps, grad_loss, grad_entropy, partials, entropy,
                    importance_sampling_ratio, entropy_threshold, grad_entropy_q, o: _Opts) -> Tuple[Tensor, Tensor]:
    valid, m, lp, old, adv, ref = _operands(logps, old_logps, advantages, mask, ref_logps)
    isr = _isr_operand(importance_sampling_ratio, valid)
    h = torch.zeros_like(lp) if entropy is None else torch.where(valid, entropy.to(_F32), 0.0)
    stat = (lambda name: partials[:, COL[name]].to(_F32).unsqueeze(1)) if partials is not None else None
    need = o.seq or o.opsm is not None or o.kind == 3
    if need and partials is None:
        raise ValueError("partials: the forward's partials are required at sequence level, with the off-policy "
                         "mask and for vespo")
    r_row = stat("ratio") if o.seq else None
    slw = stat("row_log_w") if o.kind == 3 else None
    seq_kl = stat("seq_kl") if o.opsm is not None else None
    q, e = _multiplier(valid, adv, h, isr, seq_kl, entropy_threshold, o)
    _, dloss, *_ = _token_math(lp, old, adv, ref, q, r_row, slw, o)
    if o.seq:
        dloss = dloss + stat("row_grad")
    g = grad_loss.to(_F32).unsqueeze(1)
    grad_lp = torch.where(valid, (g * m) * dloss, 0.0).expand_as(lp).contiguous()
    if grad_entropy is None and grad_entropy_q is None:
        return grad_lp, lp.new_empty((0,))
    gh = torch.zeros_like(lp)
    if grad_entropy is not None:
        gh = gh + grad_entropy.to(_F32).unsqueeze(1) * m
    if grad_entropy_q is not None:
        gh = gh + grad_entropy_q.to(_F32).unsqueeze(1) * (m if e is None else m * e)
    return grad_lp, torch.where(valid, gh, 0.0).expand_as(lp).contiguous()


# --------------------------------------------------------------------------------------------
# custom ops


def _check_options(loss_type: str, kl_estimator: str, sequence_level: bool = False) -> None:
    if loss_type not in LOSS_KINDS:
        raise ValueError(f"loss_type: expected one of {FUSED_LOSS_TYPES}, got {loss_type!r}")
    if kl_estimator not in KL_ESTIMATORS:
        raise ValueError(f"kl_estimator: expected one of {KL_ESTIMATORS}, got {kl_estimator!r}")
    if sequence_level and LOSS_KINDS[loss_type] == 3:
        raise ValueError("sequence_level: vespo computes its own sequence weight; expected False, got True")


def _policy_token_loss_forward_fake(logps, old_logps, advantages, mask, ref_logps, entropy, loss_type,
                                    epsilon_low, epsilon_high, delta,
      clip_ratio_c, sapo_temperature_pos, sapo_temperature_neg, beta, kl_estimator, use_bias_correction_kl,
      backend, sampling_logps=None, importance_sampling_ratio=None, entropy_threshold=None, sequence_level=False,
      off_policy_threshold=None, vespo_k_pos=2.0, vespo_lambda_pos=3.0, vespo_k_neg=3.0, vespo_lambda_neg=2.0):
    b, t = logps.shape
    return logps.new_empty((b, t), dtype=_F32), logps.new_empty((b, NSTAT), dtype=_F32)


@kernel_op("posttrain_kernels::policy_token_loss_forward", mutates_args=(),
           fake=_policy_token_loss_forward_fake,
           family="policy")
def policy_token_loss_forward(
    logps: Tensor, old_logps: Optional[Tensor], advantages: Tensor, mask: Tensor,
    ref_logps: Optional[Tensor], entropy: Optional[Tensor], loss_type: str, epsilon_low: float,
    epsilon_high: float, delta: Optional[float], clip_ratio_c: Optional[float],
    sapo_temperature_pos: float, sapo_temperature_neg: float, beta: float, kl_estimator: str,
    use_bias_correction_kl: bool, backend: str,
    sampling_logps: Optional[Tensor] = None, importance_sampling_ratio: Optional[Tensor] = None,
    entropy_threshold: Optional[Tensor] = None, sequence_level: bool = False,
    off_policy_threshold: Optional[float] = None, vespo_k_pos: float = 2.0, vespo_lambda_pos: float = 3.0,
    vespo_k_neg: float = 3.0, vespo_lambda_neg: float = 2.0,
) -> Tuple[Tensor, Tensor]:
    """logps (B, T) (+ old_logps, ref_logps, entropy, sampling_logps (B, T) or None), advantages
    and importance_sampling_ratio (B,), (B, 1) or (B, T), mask (B, T) bool or weights -> per-token
    loss (B, T) (0 where masked) and the per-row partial sums (B, len(PARTIAL_COLUMNS)), both fp32.
    ``epsilon_high`` is cispo's ``eps_max``; ``delta`` / ``clip_ratio_c`` None = off; ``beta == 0``:
    the KL is only summed (metrics). ``sequence_level``: one ratio per row (GSPO; not vespo).
    ``off_policy_threshold`` (None = off): the off-policy sequence mask on ``sampling_logps``
    (default ``old_logps``). ``entropy_threshold`` (one-element tensor, None = off): the policy
    term keeps only tokens with ``entropy >=`` it. ``importance_sampling_ratio`` multiplies the
    policy term (vespo: folded into its sequence weight). All of them carry no gradient."""
    _check_options(loss_type, kl_estimator, sequence_level)
    opts = (loss_type, epsilon_low, epsilon_high, delta, clip_ratio_c, sapo_temperature_pos,
            sapo_temperature_neg, beta, kl_estimator, use_bias_correction_kl)
    extra = dict(sequence_level=sequence_level, off_policy_threshold=off_policy_threshold, vespo_k_pos=vespo_k_pos,
                 vespo_lambda_pos=vespo_lambda_pos, vespo_k_neg=vespo_k_neg, vespo_lambda_neg=vespo_lambda_neg)
    if backend == "triton":
        return _kernels().policy_token_loss_forward(
            logps, old_logps, advantages, mask, ref_logps, entropy, *opts, sampling_logps=sampling_logps,
            importance_sampling_ratio=importance_sampling_ratio, entropy_threshold=entropy_threshold, **extra)
    return _torch_forward(logps, old_logps, advantages, mask, ref_logps, entropy, sampling_logps,
                          importance_sampling_ratio, entropy_threshold, _Opts(*opts, **extra))


def _policy_token_loss_backward_fake(logps, old_logps, advantages, mask, ref_logps, grad_loss, grad_entropy,
                                     loss_type, epsilon_low,
      epsilon_high, delta, clip_ratio_c, sapo_temperature_pos, sapo_temperature_neg, beta, kl_estimator,
      use_bias_correction_kl, backend, partials=None, entropy=None, importance_sampling_ratio=None,
      entropy_threshold=None, grad_entropy_q=None, sequence_level=False, off_policy_threshold=None,
      vespo_k_pos=2.0, vespo_lambda_pos=3.0, vespo_k_neg=3.0, vespo_lambda_neg=2.0):
    b, t = logps.shape
    has_gent = grad_entropy is not None or grad_entropy_q is not None
    return (logps.new_empty((b, t), dtype=_F32),
            logps.new_empty((b, t) if has_gent else (0,), dtype=_F32))


@kernel_op("posttrain_kernels::policy_token_loss_backward", mutates_args=(),
           fake=_policy_token_loss_backward_fake,
           family="policy")
def policy_token_loss_backward(
    logps: Tensor, old_logps: Optional[Tensor], advantages: Tensor, mask: Tensor,
    ref_logps: Optional[Tensor], grad_loss: Tensor, grad_entropy: Optional[Tensor], loss_type: str,
    epsilon_low: float, epsilon_high: float, delta: Optional[float], clip_ratio_c: Optional[float],
    sapo_temperature_pos: float, sapo_temperature_neg: float, beta: float, kl_estimator: str,
    use_bias_correction_kl: bool, backend: str,
    partials: Optional[Tensor] = None, entropy: Optional[Tensor] = None,
    importance_sampling_ratio: Optional[Tensor] = None, entropy_threshold: Optional[Tensor] = None,
    grad_entropy_q: Optional[Tensor] = None, sequence_level: bool = False,
    off_policy_threshold: Optional[float] = None, vespo_k_pos: float = 2.0, vespo_lambda_pos: float = 3.0,
    vespo_k_neg: float = 3.0, vespo_lambda_neg: float = 2.0,
) -> Tuple[Tensor, Tensor]:
    """Gradients of ``sum_b grad_loss[b] partials[b, "loss"] + grad_entropy[b] partials[b, "entropy"]
    + grad_entropy_q[b] partials[b, "entropy_q"]``: d / d logps (B, T) and d / d entropy (B, T), or
    an empty (0,) tensor when both entropy gradients are None; fp32, 0 where masked. ``partials``:
    the forward's, required at sequence level, with the off-policy mask and for vespo (their row
    statistics); ``entropy``: required with ``entropy_threshold``; the other options as in the
    forward."""
    _check_options(loss_type, kl_estimator, sequence_level)
    opts = (loss_type, epsilon_low, epsilon_high, delta, clip_ratio_c, sapo_temperature_pos,
            sapo_temperature_neg, beta, kl_estimator, use_bias_correction_kl)
    extra = dict(sequence_level=sequence_level, off_policy_threshold=off_policy_threshold, vespo_k_pos=vespo_k_pos,
                 vespo_lambda_pos=vespo_lambda_pos, vespo_k_neg=vespo_k_neg, vespo_lambda_neg=vespo_lambda_neg)
    if backend == "triton":
        return _kernels().policy_token_loss_backward(
            logps, old_logps, advantages, mask, ref_logps, grad_loss, grad_entropy, *opts, partials=partials,
            entropy=entropy, importance_sampling_ratio=importance_sampling_ratio,
            entropy_threshold=entropy_threshold, grad_entropy_q=grad_entropy_q, **extra)
    return _torch_backward(logps, old_logps, advantages, mask, ref_logps, grad_loss, grad_entropy, partials, entropy,
                           importance_sampling_ratio, entropy_threshold, grad_entropy_q, _Opts(*opts, **extra))


# positions of the forward op's arguments (setup_context sees them all, defaults filled in)
_OPTS = slice(6, 17)  # loss_type .. backend
_SAMP, _ISR, _THR = 17, 18, 19
_EXTRA = slice(20, 26)  # sequence_level .. vespo_lambda_neg


def _setup_policy(ctx, inputs, output):
    logps, old_logps, advantages, mask, ref_logps, entropy = inputs[:6]
    isr, thr = inputs[_ISR], inputs[_THR]
    ctx.has_thr = thr is not None
    ctx.save_for_backward(logps, old_logps, advantages, mask, ref_logps, entropy if thr is not None else None,
                          isr, thr, output[1])
    ctx.opts = tuple(inputs[_OPTS])
    ctx.extra = tuple(inputs[_EXTRA])
    ctx.n_inputs = len(inputs)
    ctx.entropy_dtype = None if entropy is None else entropy.dtype
    ctx.mark_non_differentiable(output[0])


def _backward_policy(ctx, _grad_tok, grad_part):
    logps, old_logps, advantages, mask, ref_logps, entropy, isr, thr, part = ctx.saved_tensors
    need_lp = ctx.needs_input_grad[0]
    need_ent = ctx.entropy_dtype is not None and ctx.needs_input_grad[5]
    if grad_part is None:
        grad_part = logps.new_zeros((logps.shape[0], NSTAT), dtype=_F32)
    grad_part = grad_part.to(_F32)
    g_ent = g_entq = None
    if need_ent:
        g_ent = grad_part[:, COL["entropy"]]
        g_entq = grad_part[:, COL["entropy_q"]]
        if not ctx.has_thr:  # entropy_q is the entropy column
            g_ent, g_entq = g_ent + g_entq, None
    seq, opsm, k_pos, lam_pos, k_neg, lam_neg = ctx.extra
    grad_lp, grad_h = policy_token_loss_backward(
        logps, old_logps, advantages, mask, ref_logps, grad_part[:, COL["loss"]], g_ent, *ctx.opts,
        partials=part.detach(), entropy=None if entropy is None else entropy.detach(),
        importance_sampling_ratio=isr, entropy_threshold=thr, grad_entropy_q=g_entq, sequence_level=seq,
        off_policy_threshold=opsm, vespo_k_pos=k_pos, vespo_lambda_pos=lam_pos, vespo_k_neg=k_neg,
        vespo_lambda_neg=lam_neg)
    grads = [None] * ctx.n_inputs
    grads[0] = grad_lp.to(logps.dtype) if need_lp else None
    grads[5] = grad_h.to(ctx.entropy_dtype) if need_ent else None
    return tuple(grads)


policy_token_loss_forward.register_autograd(_backward_policy, setup_context=_setup_policy)
