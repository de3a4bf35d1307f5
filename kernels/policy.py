"""Triton kernels of the policy-gradient family: every loss type of ``policy_loss`` (the clipped
surrogate ``grpo`` / ``bnpo`` / ``dr_grpo`` / ``dapo`` / ``gspo`` / ``luspo``, ``cispo``, ``sapo``,
``vespo``) at token- or sequence-level importance sampling, with the off-policy sequence mask, the
entropy-quantile mask, ``importance_sampling_ratio``, the KL penalty and the entropy term, fused in
one forward and one backward kernel.

Layout of both kernels: one program per row (sequence) of the ``[B, T]`` inputs on grid axis 0
(up to 2^31 - 1 programs), looping over the tokens in ``BLOCK_T`` tiles; row offsets are int64.
Inputs may be fp32 / bf16 / fp16 (fp64 side inputs are read too); they are upcast to fp32 on load
and every accumulation is fp32. Positions where ``mask == 0`` (and past ``T``) are never read: their
inputs (padding: garbage, NaN, inf) are replaced by 0 before any math, as the eager path does, so
they give a loss of 0 and a gradient of exactly 0.

Row pass (forward only, when a row statistic is needed: ``SEQ``, ``OPSM`` or vespo), with ``M =
max(sum_t m, 1)``::

    sequence level:  log w = clamp(sum_t m (lp - old) / M, -20, 20),   r_row = exp(log w)
    vespo:           s = clamp(sum_t m clamp(lp - old, -20, 20) + sum_t clamp(log isr, log 1e-8, 20),
                               log 1e-8, 20)   (the isr term: once per row for a per-row isr)
    off-policy mask: seq_kl = sum_t m nan_to_num(samp - lp) / M

Per valid token, with ``lp`` the log-prob, ``old`` the rollout log-prob (``lp`` itself without
``old_logps``: ratio 1), ``A`` the advantage, ``m`` the mask weight::

    lr = clamp(lp - old, -20, 20),   r = exp(lr) (token level) or r_row (sequence level)
    clipped (LOSS 0):  l = -min(min(r, delta) A, clamp(r, clip_lo, clip_hi) A)
                       A < 0: l = min(l, -A clip_c)                       (dual clip)
    cispo   (LOSS 1):  l = -sg(min(r, clip_hi)) A lp
    sapo    (LOSS 2):  l = -(4 / tau) sigmoid(tau (r - 1)) A,   tau = tau_pos if A > 0 else tau_neg
    vespo   (LOSS 3):  l = -sg(phi) A lp,  phi = nan_to_num(exp(lam + k s - lam e^s)),
                       (k, lam) = (k_pos, lam_pos) if A >= 0 else (k_neg, lam_neg), lam >= 1e-4
    l *= q,  q = keep * e * isr:  keep = [A >= 0 or seq_kl <= opsm_thr] (OPSM),
                                  e = [H >= ent_thr] (ENT_Q), isr (HAS_ISR, not vespo)
    l += beta kl,      kl = KL_EST(ref - lp) (* r with BIAS_KL)

(``clip_lo = 1 - eps_low``, ``clip_hi = 1 + eps_high``, or cispo's ``eps_max``; ``delta = inf``
switches the bound off, ``HAS_DUAL`` the dual clip; ``ent_thr`` is the batch entropy quantile,
computed by the caller before the launch.) The forward writes ``l`` (0 where masked) and per-row
partial sums, the columns ``PARTIAL_COLUMNS``; everything after (the aggregation over rows and the
metrics) is O(B) PyTorch. The backward takes, per row, the upstream gradient ``g_b`` of the row's
``sum_t m l``, ``h_b`` of the row's ``sum_t m H`` and ``hq_b`` of ``sum_t m e H``, and writes
``g_b m dl/dlp`` and ``m (h_b + hq_b e)``. At sequence level ``dl/dlp`` has a row term: with
``D_b = sum_t m_t dl_t / d log w``, token ``t`` receives ``m_t D_b / M`` (``d log w / d lp_t``),
0 where the clamp is active; the forward computes ``F_b = D_b / M`` (column ``row_grad``), so the
backward is one pass that reads ``F_b``, ``r_row``, vespo's ``s`` and ``seq_kl`` from the
forward's partials. ``phi``, ``keep``, ``e`` and ``isr`` carry no gradient.

The derivative follows PyTorch's autograd of the eager formulas exactly, ties included: the clamps
pass the gradient on their closed interval, and ``min(a, b)`` with ``a == b`` sends half of it to
each side (``torch.minimum``'s rule).

Launchers validate, allocate every output and launch; they never synchronize with the host.
Autograd lives in ``posttrain_kernels.ops.policy``.
"""
from __future__ import annotations

import contextlib
import math
from typing import Dict, List, Optional, Tuple

import torch
import triton
import triton.language as tl

try:
    from ._aot import jit_like
    from ._launch import unused_pointer, wrap_triton
except ImportError:  # loaded as a standalone file (the interpreter tests load a private copy)
    from posttrain_kernels.kernels._aot import jit_like
    from posttrain_kernels.kernels._launch import unused_pointer, wrap_triton

__all__ = [
    "policy_token_loss_forward",
    "policy_token_loss_backward",
    "launch_config",
    "aot_specs",
    "PARTIAL_COLUMNS",
    "LOSS_KINDS",
    "KL_ESTIMATORS",
]

# Columns of the per-row partial sums written by the forward (fp32 [B, NSTAT]); all sums run over
# the row's valid tokens (m != 0), m the mask weight.
PARTIAL_COLUMNS = (
    "loss",        # sum m l
    "mask",        # sum m
    "count",       # number of valid tokens
    "clip_low",    # sum m [min(r, delta) < clip_lo and A < 0]             (clipped types)
    "clip_high",   # sum m [min(r, delta) > clip_hi and A > 0]; cispo: [r > eps_max and A > 0]
    "clip_dual",   # sum m [A < 0 and the dual clip binds]
    "ratio",       # sum m r (token level); the row's ratio r_row (sequence level)
    "log_ratio",   # sum m lr (token log-ratios, at either level)
    "kl",          # sum m kl (bias correction included)
    "entropy",     # sum m H
    "entropy_q",   # sum m e H, e the entropy-quantile mask (= entropy without ENT_Q)
    "mask_q",      # sum m e (= mask without ENT_Q)
    "row_log_w",   # sequence level: log r_row; vespo: the clamped sequence log-weight s; else 0
    "row_grad",    # sequence level: F_b = [log w unclamped] sum_t m dl/dlog w / M; else 0
    "seq_kl",      # off-policy mask: sum_t m nan_to_num(samp - lp) / M; else 0
)
_NSTAT = tl.constexpr(len(PARTIAL_COLUMNS))
_C_LOSS = tl.constexpr(0)
_C_MASK = tl.constexpr(1)
_C_COUNT = tl.constexpr(2)
_C_LOW = tl.constexpr(3)
_C_HIGH = tl.constexpr(4)
_C_DUAL = tl.constexpr(5)
_C_RATIO = tl.constexpr(6)
_C_LOGR = tl.constexpr(7)
_C_KL = tl.constexpr(8)
_C_ENT = tl.constexpr(9)
_C_ENTQ = tl.constexpr(10)
_C_MASKQ = tl.constexpr(11)
_C_LOGW = tl.constexpr(12)
_C_ROWG = tl.constexpr(13)
_C_SKL = tl.constexpr(14)

# |log(pi / pi_old)| is clamped to this before exp (api/policy.py LOG_RATIO_CLAMP).
_LR_CLAMP = tl.constexpr(20.0)
# VESPO's lower clamp of the sequence log-weight (api/policy.py _VESPO_LOG_W_MIN).
_LOG_W_MIN = tl.constexpr(math.log(1e-8))
# torch.nan_to_num's replacement of +-inf in fp32.
_FLT_MAX = tl.constexpr(torch.finfo(torch.float32).max)

# loss type -> LOSS constexpr (gspo / luspo: the clipped surrogate; their sequence level is the
# launchers' ``sequence_level``)
LOSS_KINDS = {"grpo": 0, "bnpo": 0, "dr_grpo": 0, "dapo": 0, "gspo": 0, "luspo": 0, "cispo": 1, "sapo": 2,
              "vespo": 3}
KL_ESTIMATORS = {"k1": 0, "k2": 1, "k3": 2, "low_var_kl": 3}

# Largest token tile: 1024 fp32 over 8 warps = 4 values per thread per live tile.
MAX_BLOCK_T = 1024


# ----------------------------------------------------------------------------------------------
# device helpers
# ----------------------------------------------------------------------------------------------


@triton.jit
def _min_tie_weights(a, b):
    """Share of the gradient of ``minimum(a, b)`` that goes to ``a`` and to ``b`` (1/0, 0/1 or,
    on a tie, 1/2 each: torch's rule)."""
    half = 0.5 * (a == b).to(tl.float32)
    return (a < b).to(tl.float32) + half, (b < a).to(tl.float32) + half


@triton.jit
def _token_math(
    lp,        # fp32 [BLOCK_T]: log-probs (0 where masked)
    old,       # fp32 [BLOCK_T]: rollout log-probs (lp itself without old_logps)
    adv,       # fp32 [BLOCK_T]: advantages
    ref,       # fp32 [BLOCK_T]: reference log-probs (ignored unless HAS_REF)
    q,         # fp32 [BLOCK_T] or 1.0: multiplier of the policy term (keep * e * isr)
    r_row,     # fp32: the row's ratio (read only if SEQ)
    slw,       # fp32: vespo's clamped sequence log-weight (read only if LOSS == 3)
    clip_lo,   # fp32: 1 - eps_low
    clip_hi,   # fp32: 1 + eps_high; cispo: eps_max
    delta,     # fp32: bound of the unclipped ratio (inf: none)
    clip_c,    # fp32: dual-clip bound (read only if HAS_DUAL)
    tau_pos,   # fp32: sapo temperature for A > 0
    tau_neg,   # fp32: sapo temperature for A <= 0
    beta,      # fp32: KL coefficient (0: the KL is only measured)
    k_pos, lam_pos, k_neg, lam_neg,  # fp32: vespo's Gamma-weight shape for A >= 0 / A < 0
    LOSS: tl.constexpr, HAS_DUAL: tl.constexpr, HAS_REF: tl.constexpr, KL_EST: tl.constexpr,
    BIAS_KL: tl.constexpr, SEQ: tl.constexpr,
):
    """Per token: (l, dl, dl_w, low, high, dual, r, lr, kl); flags fp32 0/1, kl 0 without HAS_REF.

    Token level: ``dl = dl/dlp`` (total), ``dl_w = 0``. Sequence level (``SEQ``): ``dl`` is the
    direct part of ``dl/dlp_t`` (cispo, the KL) and ``dl_w = dl / d log w`` the part through the
    row's ratio (before its clamp), which the caller sums over the row."""
    raw = lp - old
    lr = tl.minimum(tl.maximum(raw, -_LR_CLAMP), _LR_CLAMP)
    in_lr = (raw >= -_LR_CLAMP) & (raw <= _LR_CLAMP)  # the clamp passes the gradient here
    zero = tl.zeros_like(lp)
    if SEQ:  # one ratio per row: the ratio terms stay scalars
        r = r_row
        dr = r_row  # d r / d log w
    else:
        r = tl.exp(lr)
        dr = tl.where(in_lr, r, 0.0)  # d r / d lp
    low = zero
    high = zero
    dual = zero
    dpd = zero  # direct derivative of the policy term
    dpr = zero  # its derivative through r (times dr)
    if LOSS == 0:  # clipped surrogate (+ delta, + dual clip)
        c1 = tl.minimum(r, delta)
        c2 = tl.minimum(tl.maximum(r, clip_lo), clip_hi)
        dc1 = (r <= delta).to(tl.float32)
        dc2 = ((r >= clip_lo) & (r <= clip_hi)).to(tl.float32)
        a = c1 * adv
        b = c2 * adv
        wa, wb = _min_tie_weights(a, b)
        loss = -tl.minimum(a, b)
        dpr = -adv * (wa * dc1 + wb * dc2) * dr
        neg = adv < 0.0
        if HAS_DUAL:
            bound = -adv * clip_c
            dual = (neg & (loss > bound)).to(tl.float32)
            wl, _ = _min_tie_weights(loss, bound)
            dpr = tl.where(neg, dpr * wl, dpr)
            loss = tl.where(neg, tl.minimum(loss, bound), loss)
        # (products of 0/1 floats, not &: c1 is a scalar at sequence level)
        low = (c1 < clip_lo).to(tl.float32) * neg.to(tl.float32)
        high = (c1 > clip_hi).to(tl.float32) * (adv > 0.0).to(tl.float32)
    elif LOSS == 1:  # cispo: the clamped ratio is a constant weight of -A lp
        cc = tl.minimum(r, clip_hi)
        loss = -cc * adv * lp
        dpd = -cc * adv
        high = (r > clip_hi).to(tl.float32) * (adv > 0.0).to(tl.float32)
    elif LOSS == 2:  # sapo: soft gate
        tau = tl.where(adv > 0.0, tau_pos, tau_neg)
        s = tl.sigmoid(tau * (r - 1.0))
        loss = -(s * 4.0 / tau) * adv
        dpr = -adv * (4.0 / tau) * (s * (1.0 - s)) * tau * dr
    else:  # vespo: the row's Gamma weight phi is a constant weight of -A lp
        nonneg = adv >= 0.0
        k = tl.where(nonneg, k_pos, k_neg)
        lam = tl.maximum(tl.where(nonneg, lam_pos, lam_neg), 1e-4)
        phi = tl.exp(lam + k * slw - lam * tl.exp(slw))
        phi = tl.where(phi <= _FLT_MAX, phi, 0.0)  # nan_to_num(nan=0, posinf=0); phi >= 0
        loss = -phi * adv * lp
        dpd = -phi * adv
    loss = loss * q
    dpd = dpd * q
    dpr = dpr * q
    if not SEQ:
        dpd = dpd + dpr
    kl = zero
    if HAS_REF:
        d = ref - lp  # log(pi_ref / pi)
        if KL_EST == 0:  # k1
            kl = -d
            dkl = tl.full(lp.shape, 1.0, tl.float32)
        elif KL_EST == 1:  # k2
            kl = 0.5 * d * d
            dkl = -d
        elif KL_EST == 2:  # k3
            e = tl.exp(d)
            kl = e - d - 1.0
            dkl = 1.0 - e
        else:  # low_var_kl: clamp(k3(clamp(d, -20, 20)), -10, 10)
            dc = tl.minimum(tl.maximum(d, -20.0), 20.0)
            e = tl.exp(dc)
            v = e - dc - 1.0
            kl = tl.minimum(tl.maximum(v, -10.0), 10.0)
            dkl = tl.where((d >= -20.0) & (d <= 20.0) & (v >= -10.0) & (v <= 10.0), 1.0 - e, 0.0)
        use_kl = beta != 0.0  # beta == 0: measured only (never 0 * inf in the loss)
        if BIAS_KL:
            if SEQ:
                dpr = tl.where(use_kl, dpr + beta * (kl * r), dpr)  # d (kl r) / d log w = kl r
                dkl = dkl * r
            else:
                dkl = dkl * r + tl.where(in_lr, kl * r, 0.0)  # 0, not inf * 0, where lr is clamped
            kl = kl * r
        loss = tl.where(use_kl, loss + beta * kl, loss)
        dpd = tl.where(use_kl, dpd + beta * dkl, dpd)
    if not SEQ:
        dpr = zero
    return loss, dpd, dpr, low, high, dual, r, lr, kl


@triton.jit
def _load_tile(
    logps_row, old_row, adv_row, mask_row, ref_row,  # row base pointers
    cols,            # int [BLOCK_T]: token indices of the tile
    T,               # int: tokens per row
    stride_adv_t,    # int: elements between consecutive advantages of a row (0: one per row)
    HAS_OLD: tl.constexpr, HAS_REF: tl.constexpr,
):
    """(valid, m, lp, old, adv, ref) of one tile, fp32, every input 0 where not valid."""
    in_row = cols < T
    w = tl.load(mask_row + cols, mask=in_row, other=0)
    valid = w != 0  # in the mask's own dtype, before any rounding to fp32
    w = w.to(tl.float32)
    lp = tl.load(logps_row + cols, mask=valid, other=0.0).to(tl.float32)
    if HAS_OLD:
        old = tl.load(old_row + cols, mask=valid, other=0.0).to(tl.float32)
    else:
        old = lp
    adv = tl.load(adv_row + cols * stride_adv_t, mask=valid, other=0.0).to(tl.float32)
    if HAS_REF:
        ref = tl.load(ref_row + cols, mask=valid, other=0.0).to(tl.float32)
    else:
        ref = lp
    return valid, tl.where(valid, w, 0.0), lp, old, adv, ref


@triton.jit
def _multiplier(valid, adv, h, isr_row, cols, stride_isr_t, seq_kl, opsm_thr, ent_thr,
                LOSS: tl.constexpr, OPSM: tl.constexpr, HAS_ISR: tl.constexpr, ENT_Q: tl.constexpr):
    """(q, e): the policy term's multiplier keep * e * isr (1.0 when none applies) and the entropy
    mask e (fp32 0/1; 1.0 without ENT_Q)."""
    q = 1.0
    e = 1.0
    if OPSM:  # off-policy sequence mask: drop A < 0 tokens of rows that drifted
        q = tl.maximum((adv >= 0.0).to(tl.float32), (seq_kl <= opsm_thr).to(tl.float32))  # or
    if ENT_Q:  # high-entropy tokens only
        e = (valid & (h >= ent_thr)).to(tl.float32)
        q = q * e
    if HAS_ISR and LOSS != 3:  # vespo folds the ratio into its weight instead
        isr = tl.load(isr_row + cols * stride_isr_t, mask=valid, other=1.0).to(tl.float32)
        q = q * isr
    return q, e


# ----------------------------------------------------------------------------------------------
# kernels
# ----------------------------------------------------------------------------------------------


@triton.jit
def _policy_fwd_kernel(
    logps_ptr,       # *{fp32|bf16|fp16} [B, T]; element (b, t) at b * stride_logps + t
    old_ptr,         # *float [B, T]; (b, t) at b * stride_old + t (read only if HAS_OLD)
    adv_ptr,         # *float [B] or [B, T]; (b, t) at b * stride_adv_b + t * stride_adv_t
    mask_ptr,        # *{float|u8} [B, T]; (b, t) at b * stride_mask + t: weight m, 0 = not in the loss
    ref_ptr,         # *float [B, T]; (b, t) at b * stride_ref + t (read only if HAS_REF)
    ent_ptr,         # *float [B, T]; (b, t) at b * stride_ent + t (read only if HAS_ENT)
    samp_ptr,        # *float [B, T]; (b, t) at b * stride_samp + t: sampling log-probs (read only if OPSM)
    isr_ptr,         # *float [B] or [B, T]; (b, t) at b * stride_isr_b + t * stride_isr_t (if HAS_ISR)
    ent_thr_ptr,     # *fp32 [1]: the entropy threshold (read only if ENT_Q)
    tok_ptr,         # *fp32 [B, T] contiguous (output): per-token loss l, 0 where masked
    part_ptr,        # *fp32 [B, NSTAT] contiguous (output): per-row partial sums, PARTIAL_COLUMNS
    stride_logps,    # int: elements between consecutive rows of logps
    stride_old,      # int: elements between consecutive rows of old_logps
    stride_adv_b,    # int: elements between consecutive rows of advantages
    stride_adv_t,    # int: elements between consecutive tokens of advantages (0: one per row)
    stride_mask,     # int: elements between consecutive rows of mask
    stride_ref,      # int: elements between consecutive rows of ref_logps
    stride_ent,      # int: elements between consecutive rows of entropy
    stride_samp,     # int: elements between consecutive rows of the sampling log-probs
    stride_isr_b,    # int: elements between consecutive rows of isr
    stride_isr_t,    # int: elements between consecutive tokens of isr (0: one per row)
    T,               # int: tokens per row
    clip_lo,         # fp32: 1 - eps_low
    clip_hi,         # fp32: 1 + eps_high (cispo: eps_max)
    delta,           # fp32: bound of the unclipped ratio (inf: none)
    clip_c,          # fp32: dual-clip bound (read only if HAS_DUAL)
    tau_pos,         # fp32: sapo temperature, A > 0
    tau_neg,         # fp32: sapo temperature, A <= 0
    beta,            # fp32: KL coefficient
    opsm_thr,        # fp32: off-policy mask threshold (read only if OPSM)
    k_pos, lam_pos, k_neg, lam_neg,  # fp32: vespo's parameters (read only if LOSS == 3)
    LOSS: tl.constexpr,      # 0 clipped, 1 cispo, 2 sapo, 3 vespo
    HAS_DUAL: tl.constexpr,  # dual clip on (clipped types)
    HAS_OLD: tl.constexpr,   # old_logps given (else the ratio is 1)
    HAS_REF: tl.constexpr,   # ref_logps given: compute the KL
    KL_EST: tl.constexpr,    # 0 k1, 1 k2, 2 k3, 3 low_var_kl
    BIAS_KL: tl.constexpr,   # KL * r (importance-sampling correction)
    HAS_ENT: tl.constexpr,   # entropy given: sum it
    SEQ: tl.constexpr,       # sequence-level importance sampling (one ratio per row)
    OPSM: tl.constexpr,      # off-policy sequence mask
    HAS_ISR: tl.constexpr,   # importance_sampling_ratio given
    ENT_Q: tl.constexpr,     # entropy-quantile mask (needs HAS_ENT)
    BLOCK_T: tl.constexpr,   # token tile, power of two
):
    """Per row b: ``tok[b, t] = l`` (0 where masked) and ``part[b, :]``, the row sums of
    ``PARTIAL_COLUMNS`` (see the module docstring)."""
    # fp32 whatever the launch typed them (inductor types Python floats of user kernels as fp64)
    clip_lo = tl.cast(clip_lo, tl.float32)
    clip_hi = tl.cast(clip_hi, tl.float32)
    delta = tl.cast(delta, tl.float32)
    clip_c = tl.cast(clip_c, tl.float32)
    tau_pos = tl.cast(tau_pos, tl.float32)
    tau_neg = tl.cast(tau_neg, tl.float32)
    beta = tl.cast(beta, tl.float32)
    opsm_thr = tl.cast(opsm_thr, tl.float32)
    k_pos = tl.cast(k_pos, tl.float32)
    lam_pos = tl.cast(lam_pos, tl.float32)
    k_neg = tl.cast(k_neg, tl.float32)
    lam_neg = tl.cast(lam_neg, tl.float32)
    row = tl.program_id(0).to(tl.int64)
    logps_row = logps_ptr + row * stride_logps
    old_row = old_ptr + row * stride_old
    adv_row = adv_ptr + row * stride_adv_b
    mask_row = mask_ptr + row * stride_mask
    ref_row = ref_ptr + row * stride_ref
    ent_row = ent_ptr + row * stride_ent
    samp_row = samp_ptr + row * stride_samp
    isr_row = isr_ptr + row * stride_isr_b
    tok_row = tok_ptr + row * T
    offs = tl.arange(0, BLOCK_T)

    # ---- row pass: the row statistics the per-token pass needs, stored right away (fewer live
    # values in the token loop)
    part_row = part_ptr + row * _NSTAT
    r_row = 1.0
    w_scale = 0.0  # sequence level: [log w not clamped] / M, the row's share of d log w / d lp_t
    slw = 0.0
    seq_kl = 0.0
    if (SEQ or OPSM) or LOSS == 3:
        acc_m = tl.zeros([BLOCK_T], dtype=tl.float32)
        acc_n = tl.zeros([BLOCK_T], dtype=tl.float32)
        acc_d = tl.zeros([BLOCK_T], dtype=tl.float32)
        acc_i = tl.zeros([BLOCK_T], dtype=tl.float32)
        acc_s = tl.zeros([BLOCK_T], dtype=tl.float32)
        for start in range(0, T, BLOCK_T):
            cols = start + offs
            w = tl.load(mask_row + cols, mask=cols < T, other=0)
            valid = w != 0
            m = tl.where(valid, w.to(tl.float32), 0.0)
            lp = tl.load(logps_row + cols, mask=valid, other=0.0).to(tl.float32)
            if HAS_OLD:
                old = tl.load(old_row + cols, mask=valid, other=0.0).to(tl.float32)
            else:
                old = lp
            if SEQ:
                acc_d += m * (lp - old)
            if LOSS == 3:
                acc_d += m * tl.minimum(tl.maximum(lp - old, -_LR_CLAMP), _LR_CLAMP)
                if HAS_ISR:  # log 1 = 0 where masked
                    isr = tl.load(isr_row + cols * stride_isr_t, mask=valid, other=1.0).to(tl.float32)
                    acc_i += tl.minimum(tl.maximum(tl.log(isr), _LOG_W_MIN), 20.0)
            if OPSM:
                samp = tl.load(samp_row + cols, mask=valid, other=0.0).to(tl.float32)
                x = samp - lp
                x = tl.where(x != x, 0.0, x)  # nan_to_num(nan=0, +-inf=+-max)
                acc_s += m * tl.minimum(tl.maximum(x, -_FLT_MAX), _FLT_MAX)
            acc_m += m
            acc_n += valid.to(tl.float32)
        m_row = tl.maximum(tl.sum(acc_m, axis=0), 1.0)
        if SEQ:
            mean = tl.sum(acc_d, axis=0) / m_row
            log_w = tl.minimum(tl.maximum(mean, -_LR_CLAMP), _LR_CLAMP)
            r_row = tl.exp(log_w)
            w_scale = tl.where((mean >= -_LR_CLAMP) & (mean <= _LR_CLAMP), 1.0 / m_row, 0.0)
            tl.store(part_row + _C_LOGW, log_w)
            tl.store(part_row + _C_RATIO, r_row)
        if LOSS == 3:
            s = tl.sum(acc_d, axis=0)
            if HAS_ISR:
                li = tl.minimum(tl.maximum(tl.log(tl.load(isr_row).to(tl.float32)), _LOG_W_MIN), 20.0)
                li = tl.where(tl.sum(acc_n, axis=0) > 0.0, li, 0.0)  # a row without tokens: isr 1
                s += tl.where(stride_isr_t == 0, li, tl.sum(acc_i, axis=0))  # per row: once
            slw = tl.minimum(tl.maximum(s, _LOG_W_MIN), 20.0)
            tl.store(part_row + _C_LOGW, slw)
        if OPSM:
            seq_kl = tl.sum(acc_s, axis=0) / m_row
    tl.store(part_row + _C_SKL, seq_kl)
    if not SEQ:
        if LOSS != 3:
            tl.store(part_row + _C_LOGW, 0.0)
        tl.store(part_row + _C_ROWG, 0.0)
    ent_thr = 0.0
    if ENT_Q:
        ent_thr = tl.load(ent_thr_ptr).to(tl.float32)

    # ---- per-token pass
    acc_loss = tl.zeros([BLOCK_T], dtype=tl.float32)
    acc_m = tl.zeros([BLOCK_T], dtype=tl.float32)
    acc_n = tl.zeros([BLOCK_T], dtype=tl.float32)
    acc_low = tl.zeros([BLOCK_T], dtype=tl.float32)
    acc_high = tl.zeros([BLOCK_T], dtype=tl.float32)
    acc_dual = tl.zeros([BLOCK_T], dtype=tl.float32)
    acc_r = tl.zeros([BLOCK_T], dtype=tl.float32)
    acc_lr = tl.zeros([BLOCK_T], dtype=tl.float32)
    acc_kl = tl.zeros([BLOCK_T], dtype=tl.float32)
    acc_ent = tl.zeros([BLOCK_T], dtype=tl.float32)
    acc_entq = tl.zeros([BLOCK_T], dtype=tl.float32)
    acc_mq = tl.zeros([BLOCK_T], dtype=tl.float32)
    acc_g = tl.zeros([BLOCK_T], dtype=tl.float32)
    for start in range(0, T, BLOCK_T):
        cols = start + offs
        valid, m, lp, old, adv, ref = _load_tile(logps_row, old_row, adv_row, mask_row, ref_row, cols, T,
                                                 stride_adv_t, HAS_OLD, HAS_REF)
        h = lp
        if HAS_ENT:
            h = tl.load(ent_row + cols, mask=valid, other=0.0).to(tl.float32)
        q, e = _multiplier(valid, adv, h, isr_row, cols, stride_isr_t, seq_kl, opsm_thr, ent_thr,
                           LOSS, OPSM, HAS_ISR, ENT_Q)
        loss, _, dl_w, low, high, dual, r, lr, kl = _token_math(
            lp, old, adv, ref, q, r_row, slw, clip_lo, clip_hi, delta, clip_c, tau_pos, tau_neg, beta,
            k_pos, lam_pos, k_neg, lam_neg, LOSS, HAS_DUAL, HAS_REF, KL_EST, BIAS_KL, SEQ)
        loss = tl.where(valid, loss, 0.0)
        tl.store(tok_row + cols, loss, mask=cols < T)
        acc_loss += loss * m
        acc_m += m
        acc_n += valid.to(tl.float32)
        acc_low += low * m
        acc_high += high * m
        acc_dual += dual * m
        if not SEQ:
            acc_r += r * m  # masked tokens: r = 1, kl = 0 (their inputs read as 0)
        acc_lr += lr * m
        if HAS_REF:
            acc_kl += kl * m
        if HAS_ENT:
            acc_ent += h * m
        if ENT_Q:
            me = m * e
            acc_entq += h * me
            acc_mq += me
        if SEQ:
            acc_g += dl_w * m

    sum_m = tl.sum(acc_m, axis=0)
    sum_ent = tl.sum(acc_ent, axis=0)
    tl.store(part_row + _C_LOSS, tl.sum(acc_loss, axis=0))
    tl.store(part_row + _C_MASK, sum_m)
    tl.store(part_row + _C_COUNT, tl.sum(acc_n, axis=0))
    tl.store(part_row + _C_LOW, tl.sum(acc_low, axis=0))
    tl.store(part_row + _C_HIGH, tl.sum(acc_high, axis=0))
    tl.store(part_row + _C_DUAL, tl.sum(acc_dual, axis=0))
    if SEQ:
        tl.store(part_row + _C_ROWG, tl.sum(acc_g, axis=0) * w_scale)
    else:
        tl.store(part_row + _C_RATIO, tl.sum(acc_r, axis=0))
    tl.store(part_row + _C_LOGR, tl.sum(acc_lr, axis=0))
    tl.store(part_row + _C_KL, tl.sum(acc_kl, axis=0))
    tl.store(part_row + _C_ENT, sum_ent)
    if ENT_Q:
        tl.store(part_row + _C_ENTQ, tl.sum(acc_entq, axis=0))
        tl.store(part_row + _C_MASKQ, tl.sum(acc_mq, axis=0))
    else:
        tl.store(part_row + _C_ENTQ, sum_ent)
        tl.store(part_row + _C_MASKQ, sum_m)


@triton.jit
def _policy_bwd_kernel(
    logps_ptr,       # *{fp32|bf16|fp16} [B, T]; element (b, t) at b * stride_logps + t
    old_ptr,         # *float [B, T]; (b, t) at b * stride_old + t (read only if HAS_OLD)
    adv_ptr,         # *float [B] or [B, T]; (b, t) at b * stride_adv_b + t * stride_adv_t
    mask_ptr,        # *{float|u8} [B, T]; (b, t) at b * stride_mask + t: weight m
    ref_ptr,         # *float [B, T]; (b, t) at b * stride_ref + t (read only if HAS_REF)
    ent_ptr,         # *float [B, T]; (b, t) at b * stride_ent + t (read only if ENT_Q)
    isr_ptr,         # *float [B] or [B, T]; (b, t) at b * stride_isr_b + t * stride_isr_t (if HAS_ISR)
    ent_thr_ptr,     # *fp32 [1]: the entropy threshold (read only if ENT_Q)
    part_ptr,        # *fp32 [B, NSTAT] contiguous: the forward's partials (row statistics; if SEQ, OPSM, vespo)
    grad_loss_ptr,   # *fp32 [B]; element b at b * stride_gloss: d out / d (sum_t m l) of row b
    grad_ent_ptr,    # *fp32 [B]; element b at b * stride_gent: d out / d (sum_t m H) of row b (if HAS_GRAD_ENT)
    grad_entq_ptr,   # *fp32 [B]; element b at b * stride_gentq: d out / d (sum_t m e H) (if HAS_GRAD_ENT and ENT_Q)
    grad_lp_ptr,     # *fp32 [B, T] contiguous (output): d out / d logps, 0 where masked
    grad_h_ptr,      # *fp32 [B, T] contiguous (output, written only if HAS_GRAD_ENT): d out / d entropy
    stride_logps,    # int: elements between consecutive rows of logps
    stride_old,      # int: elements between consecutive rows of old_logps
    stride_adv_b,    # int: elements between consecutive rows of advantages
    stride_adv_t,    # int: elements between consecutive tokens of advantages (0: one per row)
    stride_mask,     # int: elements between consecutive rows of mask
    stride_ref,      # int: elements between consecutive rows of ref_logps
    stride_ent,      # int: elements between consecutive rows of entropy
    stride_isr_b,    # int: elements between consecutive rows of isr
    stride_isr_t,    # int: elements between consecutive tokens of isr (0: one per row)
    stride_gloss,    # int: elements between consecutive entries of grad_loss
    stride_gent,     # int: elements between consecutive entries of grad_ent
    stride_gentq,    # int: elements between consecutive entries of grad_entq
    T,               # int: tokens per row
    clip_lo, clip_hi, delta, clip_c, tau_pos, tau_neg, beta,  # fp32: as in the forward
    opsm_thr, k_pos, lam_pos, k_neg, lam_neg,                  # fp32: as in the forward
    LOSS: tl.constexpr, HAS_DUAL: tl.constexpr, HAS_OLD: tl.constexpr, HAS_REF: tl.constexpr,
    KL_EST: tl.constexpr, BIAS_KL: tl.constexpr, SEQ: tl.constexpr, OPSM: tl.constexpr,
    HAS_ISR: tl.constexpr, ENT_Q: tl.constexpr,  # as in the forward
    HAS_GRAD_ENT: tl.constexpr,  # also write the entropy gradient
    BLOCK_T: tl.constexpr,       # token tile, power of two
):
    """Per row b, with ``g = grad_loss[b]``, ``h = grad_ent[b]``, ``hq = grad_entq[b]``:
    ``grad_lp[b, t] = g m (dl/dlp + F_b)`` (``F_b`` at sequence level only),
    ``grad_h[b, t] = m (h + hq e)`` (``h m`` without ENT_Q); 0 where masked."""
    # fp32 whatever the launch typed them (inductor types Python floats of user kernels as fp64)
    clip_lo = tl.cast(clip_lo, tl.float32)
    clip_hi = tl.cast(clip_hi, tl.float32)
    delta = tl.cast(delta, tl.float32)
    clip_c = tl.cast(clip_c, tl.float32)
    tau_pos = tl.cast(tau_pos, tl.float32)
    tau_neg = tl.cast(tau_neg, tl.float32)
    beta = tl.cast(beta, tl.float32)
    opsm_thr = tl.cast(opsm_thr, tl.float32)
    k_pos = tl.cast(k_pos, tl.float32)
    lam_pos = tl.cast(lam_pos, tl.float32)
    k_neg = tl.cast(k_neg, tl.float32)
    lam_neg = tl.cast(lam_neg, tl.float32)
    row = tl.program_id(0).to(tl.int64)
    logps_row = logps_ptr + row * stride_logps
    old_row = old_ptr + row * stride_old
    adv_row = adv_ptr + row * stride_adv_b
    mask_row = mask_ptr + row * stride_mask
    ref_row = ref_ptr + row * stride_ref
    ent_row = ent_ptr + row * stride_ent
    isr_row = isr_ptr + row * stride_isr_b
    part_row = part_ptr + row * _NSTAT
    g = tl.load(grad_loss_ptr + row * stride_gloss)
    if HAS_GRAD_ENT:
        h_g = tl.load(grad_ent_ptr + row * stride_gent)
        if ENT_Q:
            hq_g = tl.load(grad_entq_ptr + row * stride_gentq)
    r_row = 1.0
    f_row = 0.0
    slw = 0.0
    seq_kl = 0.0
    ent_thr = 0.0
    if SEQ:
        r_row = tl.load(part_row + _C_RATIO)
        f_row = tl.load(part_row + _C_ROWG)
    if LOSS == 3:
        slw = tl.load(part_row + _C_LOGW)
    if OPSM:
        seq_kl = tl.load(part_row + _C_SKL)
    if ENT_Q:
        ent_thr = tl.load(ent_thr_ptr).to(tl.float32)

    offs = tl.arange(0, BLOCK_T)
    for start in range(0, T, BLOCK_T):
        cols = start + offs
        in_row = cols < T
        valid, m, lp, old, adv, ref = _load_tile(logps_row, old_row, adv_row, mask_row, ref_row, cols, T,
                                                 stride_adv_t, HAS_OLD, HAS_REF)
        h = lp
        if ENT_Q:
            h = tl.load(ent_row + cols, mask=valid, other=0.0).to(tl.float32)
        q, e = _multiplier(valid, adv, h, isr_row, cols, stride_isr_t, seq_kl, opsm_thr, ent_thr,
                           LOSS, OPSM, HAS_ISR, ENT_Q)
        _, dloss, _, _, _, _, _, _, _ = _token_math(
            lp, old, adv, ref, q, r_row, slw, clip_lo, clip_hi, delta, clip_c, tau_pos, tau_neg, beta,
            k_pos, lam_pos, k_neg, lam_neg, LOSS, HAS_DUAL, HAS_REF, KL_EST, BIAS_KL, SEQ)
        if SEQ:
            dloss = dloss + f_row  # the row term: d log w / d lp_t = m_t / M
        tl.store(grad_lp_ptr + row * T + cols, tl.where(valid, (g * m) * dloss, 0.0), mask=in_row)
        if HAS_GRAD_ENT:
            if ENT_Q:
                gh = h_g * m + hq_g * (m * e)
            else:
                gh = h_g * m
            tl.store(grad_h_ptr + row * T + cols, tl.where(valid, gh, 0.0), mask=in_row)


# ----------------------------------------------------------------------------------------------
# launchers
# ----------------------------------------------------------------------------------------------


def launch_config(seq_len: int, max_block: Optional[int] = None) -> Tuple[int, int]:
    """(BLOCK_T, num_warps) for rows of ``seq_len`` tokens, shared by both kernels.

    BLOCK_T = next_pow2(seq_len) clamped to [16, max_block or MAX_BLOCK_T]; num_warps keeps ~4
    values per thread per tile (1024 -> 8 warps, 512 -> 4, 256 -> 2, smaller -> 1).
    """
    cap = MAX_BLOCK_T if max_block is None else int(max_block)
    block_t = min(max(triton.next_power_of_2(max(int(seq_len), 1)), 16), max(cap, 16))
    num_warps = max(1, min(8, block_t // 128))
    return block_t, num_warps


def _device_ctx(t: torch.Tensor):
    # launch on the tensor's device, not the current one (no host sync)
    return torch.cuda.device(t.device) if t.is_cuda else contextlib.nullcontext()


_LOADABLE = (torch.float32, torch.bfloat16, torch.float16, torch.float64)


def _row_major(name: str, t: Optional[torch.Tensor], shape: Tuple[int, int],
               device: torch.device) -> Optional[torch.Tensor]:
    """``t`` checked to be a floating ``shape`` tensor on ``device``, with unit stride along T."""
    if t is None:
        return None
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(t).__name__}")
    if tuple(t.shape) != shape:
        raise ValueError(f"{name}: expected shape {shape}, got {tuple(t.shape)}")
    if t.dtype not in _LOADABLE:
        raise TypeError(f"{name}: expected a floating tensor (float32, bfloat16, float16, float64), got "
                        f"dtype {t.dtype}")
    if t.device != device:
        raise ValueError(f"{name}: expected a tensor on {device} (the device of logps), got {t.device}")
    if shape[1] > 1 and t.stride(1) != 1:
        t = t.contiguous()
    return t


def _per_row_operand(name: str, t: torch.Tensor, b: int, t_len: int,
                     device: torch.device) -> Tuple[torch.Tensor, Tuple[int, int]]:
    """``t`` of shape (B,), (B, 1) or (B, T) and its (row, token) strides; token stride 0 for one
    value per row ((B,), (B, 1), and (B, T) at T = 1), else 1 (made so)."""
    if not isinstance(t, torch.Tensor) or t.dtype not in _LOADABLE:
        raise TypeError(f"{name}: expected a floating tensor")
    if t.device != device:
        raise ValueError(f"{name}: expected a tensor on {device} (the device of logps), got {t.device}")
    if t.dim() == 1 and t.shape[0] == b:
        return t, (t.stride(0), 0)
    if t.dim() == 2 and t.shape[0] == b and t.shape[1] == 1:
        return t, (t.stride(0), 0)
    if t.dim() == 2 and tuple(t.shape) == (b, t_len):
        if t.stride(1) != 1:
            t = t.contiguous()  # one value per token: never a broadcast (stride 0) along T
        return t, (t.stride(0), 1)
    raise ValueError(f"{name}: expected shape ({b},), ({b}, 1) or ({b}, {t_len}), got {tuple(t.shape)}")


def _inputs(logps, old_logps, advantages, mask, ref_logps, entropy=None):
    """Validated kernel operands: tensors, their row strides, and the advantage strides."""
    if not isinstance(logps, torch.Tensor) or logps.dim() != 2:
        raise ValueError(f"logps: expected a 2-D (B, T) tensor, got "
                         f"{tuple(logps.shape) if isinstance(logps, torch.Tensor) else type(logps).__name__}")
    if logps.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise TypeError(f"logps: expected float32, bfloat16 or float16, got dtype {logps.dtype}")
    b, t = (int(s) for s in logps.shape)
    dev = logps.device
    logps = _row_major("logps", logps, (b, t), dev)
    old_logps = _row_major("old_logps", old_logps, (b, t), dev)
    ref_logps = _row_major("ref_logps", ref_logps, (b, t), dev)
    entropy = _row_major("entropy", entropy, (b, t), dev)
    if not isinstance(mask, torch.Tensor) or tuple(mask.shape) != (b, t):
        raise ValueError(f"mask: expected shape {(b, t)}, got "
                         f"{tuple(mask.shape) if isinstance(mask, torch.Tensor) else type(mask).__name__}")
    if mask.device != dev:
        raise ValueError(f"mask: expected a tensor on {dev} (the device of logps), got {mask.device}")
    if mask.dtype == torch.bool:
        # no copy: the kernels read 0 / 1 bytes. Traced by torch.compile (a tensor subclass here),
        # a byte copy instead: inductor has no lowering for a dtype view of a bool tensor
        mask = mask.view(torch.uint8) if type(mask) is torch.Tensor else mask.to(torch.uint8)
    elif mask.dtype not in _LOADABLE:
        raise TypeError(f"mask: expected a bool or floating tensor, got dtype {mask.dtype}")
    if t > 1 and mask.stride(1) != 1:
        mask = mask.contiguous()
    if not isinstance(advantages, torch.Tensor) or advantages.dtype not in _LOADABLE:
        raise TypeError("advantages: expected a floating tensor")
    if advantages.device != dev:
        raise ValueError(f"advantages: expected a tensor on {dev} (the device of logps), got {advantages.device}")
    if advantages.dim() == 1 and advantages.shape[0] == b:
        adv_strides = (advantages.stride(0), 0)
    elif advantages.dim() == 2 and advantages.shape[0] == b and advantages.shape[1] == 1:
        adv_strides = (advantages.stride(0), 0)
    elif advantages.dim() == 2 and tuple(advantages.shape) == (b, t):
        adv_strides = (advantages.stride(0), advantages.stride(1))
    else:
        raise ValueError(f"advantages: expected shape ({b},), ({b}, 1) or ({b}, {t}), got "
                         f"{tuple(advantages.shape)}")
    return b, t, logps, old_logps, advantages, adv_strides, mask, ref_logps, entropy


def _extras(b: int, t: int, logps: torch.Tensor, loss_kind: int, importance_sampling_ratio,
            entropy_threshold, sequence_level: bool, has_entropy: bool):
    """Validated (isr, isr strides, entropy threshold [1] fp32) of the optional row options."""
    dev = logps.device
    if sequence_level and loss_kind == 3:
        raise ValueError("sequence_level: vespo computes its own sequence weight; expected False, got True")
    isr, isr_strides = None, (0, 0)
    if importance_sampling_ratio is not None:
        isr, isr_strides = _per_row_operand("importance_sampling_ratio", importance_sampling_ratio, b, t, dev)
    thr = None
    if entropy_threshold is not None:
        if not has_entropy:
            raise ValueError("entropy: required with entropy_threshold (the entropy-quantile mask), got None")
        if (not isinstance(entropy_threshold, torch.Tensor) or entropy_threshold.numel() != 1
                or not entropy_threshold.dtype.is_floating_point):
            raise ValueError("entropy_threshold: expected a one-element floating tensor")
        if entropy_threshold.device != dev:
            raise ValueError(f"entropy_threshold: expected a tensor on {dev} (the device of logps), got "
                             f"{entropy_threshold.device}")
        thr = entropy_threshold.reshape(1).to(torch.float32)
    return isr, isr_strides, thr


def _scalars(loss_type: str, epsilon_low: float, epsilon_high: float, delta: Optional[float],
             clip_ratio_c: Optional[float], sapo_temperature_pos: float, sapo_temperature_neg: float,
             beta: float, kl_estimator: str, off_policy_threshold: Optional[float] = None,
             vespo: Tuple[float, float, float, float] = (2.0, 3.0, 3.0, 2.0)
             ) -> Tuple[int, bool, int, Tuple[float, ...]]:
    if loss_type not in LOSS_KINDS:
        raise ValueError(f"loss_type: expected one of {tuple(LOSS_KINDS)}, got {loss_type!r}")
    if kl_estimator not in KL_ESTIMATORS:
        raise ValueError(f"kl_estimator: expected one of {tuple(KL_ESTIMATORS)}, got {kl_estimator!r}")
    kind = LOSS_KINDS[loss_type]
    eps_low, eps_high = float(epsilon_low), float(epsilon_high)
    clip_lo = 1.0 - eps_low
    clip_hi = eps_high if kind == 1 else 1.0 + eps_high
    d = math.inf if delta is None else float(delta)
    has_dual = kind == 0 and clip_ratio_c is not None
    c = float(clip_ratio_c) if has_dual else 0.0
    opsm = 0.0 if off_policy_threshold is None else float(off_policy_threshold)
    vals = (clip_lo, clip_hi, d, c, float(sapo_temperature_pos), float(sapo_temperature_neg), float(beta),
            opsm) + tuple(float(v) for v in vespo)
    return kind, has_dual, KL_ESTIMATORS[kl_estimator], vals


def policy_token_loss_forward(
    logps: torch.Tensor,
    old_logps: Optional[torch.Tensor],
    advantages: torch.Tensor,
    mask: torch.Tensor,
    ref_logps: Optional[torch.Tensor],
    entropy: Optional[torch.Tensor],
    loss_type: str,
    epsilon_low: float,
    epsilon_high: float,
    delta: Optional[float],
    clip_ratio_c: Optional[float],
    sapo_temperature_pos: float,
    sapo_temperature_neg: float,
    beta: float,
    kl_estimator: str,
    use_bias_correction_kl: bool,
    block_t: Optional[int] = None,
    *,
    sampling_logps: Optional[torch.Tensor] = None,
    importance_sampling_ratio: Optional[torch.Tensor] = None,
    entropy_threshold: Optional[torch.Tensor] = None,
    sequence_level: bool = False,
    off_policy_threshold: Optional[float] = None,
    vespo_k_pos: float = 2.0,
    vespo_lambda_pos: float = 3.0,
    vespo_k_neg: float = 3.0,
    vespo_lambda_neg: float = 2.0,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Per-token loss and per-row partial sums of the policy losses.

    ``logps [B, T]`` fp32/bf16/fp16; ``old_logps`` / ``ref_logps`` / ``entropy`` /
    ``sampling_logps [B, T]`` or None; ``advantages`` and ``importance_sampling_ratio`` ``[B]``,
    ``[B, 1]`` or ``[B, T]``; ``mask [B, T]`` bool or floating weights. ``loss_type`` one of
    ``LOSS_KINDS``; ``epsilon_high`` is cispo's ``eps_max``; ``delta`` / ``clip_ratio_c`` None =
    off. ``sequence_level``: one ratio per row (not with vespo). ``off_policy_threshold`` (None =
    off): the off-policy sequence mask, on ``sampling_logps`` (default ``old_logps``).
    ``entropy_threshold`` (one-element tensor, None = off): only tokens with ``entropy >=`` it keep
    their policy term (needs ``entropy``). Returns new fp32 ``(tok [B, T], partials [B,
    len(PARTIAL_COLUMNS)])``. ``block_t`` caps BLOCK_T (tests).
    """
    b, t, logps, old_logps, advantages, (sab, sat), mask, ref_logps, entropy = _inputs(
        logps, old_logps, advantages, mask, ref_logps, entropy)
    kind, has_dual, kl_est, vals = _scalars(
        loss_type, epsilon_low, epsilon_high, delta, clip_ratio_c, sapo_temperature_pos, sapo_temperature_neg,
        beta, kl_estimator, off_policy_threshold, (vespo_k_pos, vespo_lambda_pos, vespo_k_neg, vespo_lambda_neg))
    isr, (sib, sit), thr = _extras(b, t, logps, kind, importance_sampling_ratio, entropy_threshold,
                                   bool(sequence_level), entropy is not None)
    opsm = off_policy_threshold is not None
    samp = _row_major("sampling_logps", sampling_logps, (b, t), logps.device) if opsm else None
    dev = logps.device
    tok = torch.empty((b, t), dtype=torch.float32, device=dev)
    part = torch.empty((b, len(PARTIAL_COLUMNS)), dtype=torch.float32, device=dev)
    if b == 0:
        return tok, part
    block, num_warps = launch_config(t, block_t)
    old = old_logps if old_logps is not None else logps  # placeholder, never read
    ref = ref_logps if ref_logps is not None else logps  # placeholder, never read
    ent = entropy if entropy is not None else logps      # placeholder, never read
    if samp is None:  # the off-policy mask defaults to old_logps (logps itself: on-policy)
        samp = old
    isr_t = isr if isr is not None else logps            # placeholder, never read
    thr_t = thr if thr is not None else unused_pointer(dev)  # never read
    with _device_ctx(logps):
        wrap_triton(_policy_fwd_kernel)[(b,)](
            logps, old, advantages, mask, ref, ent, samp, isr_t, thr_t, tok, part,
            logps.stride(0), old.stride(0), sab, sat, mask.stride(0), ref.stride(0), ent.stride(0),
            samp.stride(0), sib, sit, t, *vals,
            LOSS=kind, HAS_DUAL=has_dual, HAS_OLD=old_logps is not None, HAS_REF=ref_logps is not None,
            KL_EST=kl_est, BIAS_KL=bool(use_bias_correction_kl), HAS_ENT=entropy is not None,
            SEQ=bool(sequence_level), OPSM=opsm, HAS_ISR=isr is not None, ENT_Q=thr is not None,
            BLOCK_T=block, num_warps=num_warps,
        )
    return tok, part


def policy_token_loss_backward(
    logps: torch.Tensor,
    old_logps: Optional[torch.Tensor],
    advantages: torch.Tensor,
    mask: torch.Tensor,
    ref_logps: Optional[torch.Tensor],
    grad_loss: torch.Tensor,
    grad_entropy: Optional[torch.Tensor],
    loss_type: str,
    epsilon_low: float,
    epsilon_high: float,
    delta: Optional[float],
    clip_ratio_c: Optional[float],
    sapo_temperature_pos: float,
    sapo_temperature_neg: float,
    beta: float,
    kl_estimator: str,
    use_bias_correction_kl: bool,
    block_t: Optional[int] = None,
    *,
    partials: Optional[torch.Tensor] = None,
    entropy: Optional[torch.Tensor] = None,
    importance_sampling_ratio: Optional[torch.Tensor] = None,
    entropy_threshold: Optional[torch.Tensor] = None,
    grad_entropy_q: Optional[torch.Tensor] = None,
    sequence_level: bool = False,
    off_policy_threshold: Optional[float] = None,
    vespo_k_pos: float = 2.0,
    vespo_lambda_pos: float = 3.0,
    vespo_k_neg: float = 3.0,
    vespo_lambda_neg: float = 2.0,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Gradients of ``sum_b grad_loss[b] * partials[b, loss] + grad_entropy[b] * partials[b, entropy]
    + grad_entropy_q[b] * partials[b, entropy_q]``.

    ``grad_loss [B]`` / ``grad_entropy [B]`` / ``grad_entropy_q [B]`` (None: no such gradient) fp32,
    any stride (0: broadcast). ``partials``: the forward's (with the same options); required at
    sequence level, with the off-policy mask and for vespo (the backward reads their row
    statistics there). ``entropy``: required with ``entropy_threshold``. The other options as in
    :func:`policy_token_loss_forward`. Returns new fp32 ``(grad_logps [B, T], grad_entropy [B, T]
    or empty (0,))``, 0 where masked; the entropy gradient is there when ``grad_entropy`` or
    ``grad_entropy_q`` is given.
    """
    b, t, logps, old_logps, advantages, (sab, sat), mask, ref_logps, entropy = _inputs(
        logps, old_logps, advantages, mask, ref_logps, entropy)
    kind, has_dual, kl_est, vals = _scalars(
        loss_type, epsilon_low, epsilon_high, delta, clip_ratio_c, sapo_temperature_pos, sapo_temperature_neg,
        beta, kl_estimator, off_policy_threshold, (vespo_k_pos, vespo_lambda_pos, vespo_k_neg, vespo_lambda_neg))
    isr, (sib, sit), thr = _extras(b, t, logps, kind, importance_sampling_ratio, entropy_threshold,
                                   bool(sequence_level), entropy is not None)
    opsm = off_policy_threshold is not None
    dev = logps.device

    def row_vector(name, g):
        if not isinstance(g, torch.Tensor) or g.dim() != 1 or g.shape[0] != b:
            raise ValueError(f"{name}: expected shape ({b},), got "
                             f"{tuple(g.shape) if isinstance(g, torch.Tensor) else type(g).__name__}")
        if g.device != dev:
            raise ValueError(f"{name}: expected a tensor on {dev} (the device of logps), got {g.device}")
        return g.to(torch.float32)

    grad_loss = row_vector("grad_loss", grad_loss)
    if grad_entropy is not None:
        grad_entropy = row_vector("grad_entropy", grad_entropy)
    if grad_entropy_q is not None:
        grad_entropy_q = row_vector("grad_entropy_q", grad_entropy_q)
        if thr is None:  # e = 1: entropy_q is the entropy column
            grad_entropy = grad_entropy_q if grad_entropy is None else grad_entropy + grad_entropy_q
            grad_entropy_q = None
        elif grad_entropy is None:
            grad_entropy = torch.zeros_like(grad_entropy_q)
    elif grad_entropy is not None and thr is not None:
        grad_entropy_q = torch.zeros_like(grad_entropy)
    has_gent = grad_entropy is not None
    need_part = bool(sequence_level) or opsm or kind == 3
    if need_part:
        if (not isinstance(partials, torch.Tensor) or tuple(partials.shape) != (b, len(PARTIAL_COLUMNS))
                or partials.dtype != torch.float32 or partials.device != dev):
            got = (type(partials).__name__ if not isinstance(partials, torch.Tensor)
                   else f"shape {tuple(partials.shape)}, dtype {partials.dtype}, on {partials.device}")
            raise ValueError(f"partials: expected the forward's fp32 ({b}, {len(PARTIAL_COLUMNS)}) partials on "
                             f"{dev} (sequence level, off-policy mask and vespo read their row statistics), got {got}")
        partials = partials.contiguous()
    grad_lp = torch.empty((b, t), dtype=torch.float32, device=dev)
    grad_h = torch.empty((b, t) if has_gent else (0,), dtype=torch.float32, device=dev)
    if b == 0:
        return grad_lp, grad_h
    block, num_warps = launch_config(t, block_t)
    old = old_logps if old_logps is not None else logps
    ref = ref_logps if ref_logps is not None else logps
    ent = entropy if entropy is not None else logps
    isr_t = isr if isr is not None else logps
    thr_t = thr if thr is not None else grad_loss
    part = partials if need_part else grad_loss
    gent = grad_entropy if has_gent else grad_loss
    gentq = grad_entropy_q if grad_entropy_q is not None else gent
    with _device_ctx(logps):
        wrap_triton(_policy_bwd_kernel)[(b,)](
            logps, old, advantages, mask, ref, ent, isr_t, thr_t, part, grad_loss, gent, gentq, grad_lp,
            grad_h if has_gent else unused_pointer(dev),
            logps.stride(0), old.stride(0), sab, sat, mask.stride(0), ref.stride(0), ent.stride(0), sib, sit,
            grad_loss.stride(0), gent.stride(0), gentq.stride(0), t, *vals,
            LOSS=kind, HAS_DUAL=has_dual, HAS_OLD=old_logps is not None, HAS_REF=ref_logps is not None,
            KL_EST=kl_est, BIAS_KL=bool(use_bias_correction_kl), SEQ=bool(sequence_level), OPSM=opsm,
            HAS_ISR=isr is not None, ENT_Q=thr is not None, HAS_GRAD_ENT=has_gent,
            BLOCK_T=block, num_warps=num_warps,
        )
    return grad_lp, grad_h


# ----------------------------------------------------------------------------------------------
# ahead-of-time compilation specs (tests/test_triton_aot.py)
# ----------------------------------------------------------------------------------------------




def _flags(loss, dual=False, old=False, ref=False, kl_est=2, bias=False, ent=False, seq=False, opsm=False,
           isr=False, ent_q=False):
    return dict(LOSS=loss, HAS_DUAL=dual, HAS_OLD=old, HAS_REF=ref, KL_EST=kl_est, BIAS_KL=bias, HAS_ENT=ent,
                SEQ=seq, OPSM=opsm, HAS_ISR=isr, ENT_Q=ent_q)


# Flag combinations compiled ahead of time: every loss kind bare (on-policy, no KL) and with every
# token-level input and option (the most live values), each other KL estimator, the row-statistics
# variants (sequence level for each ratio-based kind, vespo) with every input and option, and the
# token-level masks and multiplier (off-policy mask, entropy quantile, importance_sampling_ratio).
_AOT_FLAGS = (
    [_flags(kind) for kind in (0, 1, 2, 3)]
    + [_flags(kind, dual=kind == 0, old=True, ref=True, bias=True, ent=True) for kind in (0, 1, 2)]
    + [_flags(0, dual=True, old=True, ref=True, kl_est=est, bias=True) for est in (0, 1, 3)]
    + [_flags(kind, dual=kind == 0, old=True, ref=True, bias=True, ent=True, seq=True, opsm=True, isr=True,
              ent_q=True) for kind in (0, 1, 2)]
    + [_flags(3, old=True, ref=True, bias=True, ent=True, opsm=True, isr=True, ent_q=True)]
    + [_flags(0, dual=True, old=True, ref=True, bias=True, ent=True, opsm=True, isr=True, ent_q=True)]
)


def aot_specs(seq_len: int = 8192,
              dtypes=("bf16", "fp32")) -> List[Tuple[object, Dict[str, str], Dict[str, object], int]]:
    """``(kernel, signature, constexprs, num_warps)`` for both kernels in the flag combinations of
    ``_AOT_FLAGS``, for bf16 and fp32 log-probs (old / ref / entropy / sampling log-probs in the
    same dtype, fp32 advantages and importance_sampling_ratio, one per row, and a bool mask read as
    u8), with the BLOCK_T / num_warps the launchers pick at ``seq_len``. Same format and usage as
    ``posttrain_kernels.kernels.token_logprobs.aot_specs``; the per-row advantages, the per-row
    importance ratios and the per-row upstream gradients of a contiguous ``[B]`` tensor have unit
    stride, which the JIT turns into constexpr 1 (the upstream gradients come as columns of ``[B,
    NSTAT]``: stride NSTAT).
    """
    block_t, num_warps = launch_config(seq_len)
    specs = []
    for dt in dtypes:
        lp = "*" + dt
        for flags in _AOT_FLAGS:
            sig, consts = jit_like({
                "logps_ptr": lp, "old_ptr": lp, "adv_ptr": "*fp32", "mask_ptr": "*u8", "ref_ptr": lp,
                "ent_ptr": lp, "samp_ptr": lp, "isr_ptr": "*fp32", "ent_thr_ptr": "*fp32",
                "tok_ptr": "*fp32", "part_ptr": "*fp32",
                "stride_logps": "i32", "stride_old": "i32", "stride_adv_b": "i32", "stride_adv_t": "i32",
                "stride_mask": "i32", "stride_ref": "i32", "stride_ent": "i32", "stride_samp": "i32",
                "stride_isr_b": "i32", "stride_isr_t": "i32", "T": "i32",
                "clip_lo": "fp32", "clip_hi": "fp32", "delta": "fp32", "clip_c": "fp32",
                "tau_pos": "fp32", "tau_neg": "fp32", "beta": "fp32", "opsm_thr": "fp32",
                "k_pos": "fp32", "lam_pos": "fp32", "k_neg": "fp32", "lam_neg": "fp32",
                **{name: "constexpr" for name in flags}, "BLOCK_T": "constexpr",
            }, ("stride_adv_b", "stride_isr_b"))
            consts.update(flags, BLOCK_T=block_t)
            specs.append((_policy_fwd_kernel, sig, consts, num_warps))
            bwd_flags = {k: v for k, v in flags.items() if k != "HAS_ENT"}
            sig, consts = jit_like({
                "logps_ptr": lp, "old_ptr": lp, "adv_ptr": "*fp32", "mask_ptr": "*u8", "ref_ptr": lp,
                "ent_ptr": lp, "isr_ptr": "*fp32", "ent_thr_ptr": "*fp32", "part_ptr": "*fp32",
                "grad_loss_ptr": "*fp32", "grad_ent_ptr": "*fp32", "grad_entq_ptr": "*fp32",
                "grad_lp_ptr": "*fp32", "grad_h_ptr": "*fp32",
                "stride_logps": "i32", "stride_old": "i32", "stride_adv_b": "i32", "stride_adv_t": "i32",
                "stride_mask": "i32", "stride_ref": "i32", "stride_ent": "i32", "stride_isr_b": "i32",
                "stride_isr_t": "i32", "stride_gloss": "i32", "stride_gent": "i32", "stride_gentq": "i32",
                "T": "i32", "clip_lo": "fp32", "clip_hi": "fp32", "delta": "fp32", "clip_c": "fp32",
                "tau_pos": "fp32", "tau_neg": "fp32", "beta": "fp32", "opsm_thr": "fp32",
                "k_pos": "fp32", "lam_pos": "fp32", "k_neg": "fp32", "lam_neg": "fp32",
                **{name: "constexpr" for name in bwd_flags}, "HAS_GRAD_ENT": "constexpr", "BLOCK_T": "constexpr",
            }, ("stride_adv_b", "stride_isr_b"))
            consts.update(bwd_flags, HAS_GRAD_ENT=flags["HAS_ENT"], BLOCK_T=block_t)
            specs.append((_policy_bwd_kernel, sig, consts, num_warps))
    return specs
