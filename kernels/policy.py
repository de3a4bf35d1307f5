"""Triton kernels of the policy-gradient family: the token-level clipped surrogate and its
relatives (``grpo``, ``bnpo``, ``dr_grpo``, ``dapo``, ``cispo``, ``sapo``), the KL penalty and the
entropy term, fused in one forward and one backward kernel.

Layout of both kernels: one program per row (sequence) of the ``[B, T]`` inputs on grid axis 0
(up to 2^31 - 1 programs), looping over the tokens in ``BLOCK_T`` tiles; row offsets are int64.
Inputs may be fp32 / bf16 / fp16 (fp64 side inputs are read too); they are upcast to fp32 on load
and every accumulation is fp32. Positions where ``mask == 0`` (and past ``T``) are never read: their
inputs (padding: garbage, NaN, inf) are replaced by 0 before any math, as the eager path does, so
they give a loss of 0 and a gradient of exactly 0.

Per valid token, with ``lp`` the log-prob, ``old`` the rollout log-prob (``lp`` itself without
``old_logps``: ratio 1), ``A`` the advantage, ``m`` the mask weight::

    lr = clamp(lp - old, -20, 20),   r = exp(lr)
    clipped (LOSS 0):  l = -min(min(r, delta) A, clamp(r, clip_lo, clip_hi) A)
                       A < 0: l = min(l, -A clip_c)                       (dual clip)
    cispo   (LOSS 1):  l = -sg(min(r, clip_hi)) A lp
    sapo    (LOSS 2):  l = -(4 / tau) sigmoid(tau (r - 1)) A,   tau = tau_pos if A > 0 else tau_neg
    l += beta kl,      kl = KL_EST(ref - lp) (* r with BIAS_KL)

(``clip_lo = 1 - eps_low``, ``clip_hi = 1 + eps_high``, or cispo's ``eps_max``; ``delta = inf``
switches the bound off, ``HAS_DUAL`` the dual clip.) The forward writes ``l`` (0 where masked) and per-row
partial sums, the columns ``PARTIAL_COLUMNS``; everything after (the aggregation over rows and the
metrics) is O(B) PyTorch. The backward takes, per row, the upstream gradient ``g_b`` of the row's
``sum_t m l`` and ``h_b`` of the row's ``sum_t m H``, and writes ``g_b m dl/dlp`` and ``h_b m``.

The derivative follows PyTorch's autograd of the eager formulas exactly, ties included: the clamps
pass the gradient on their closed interval, and ``min(a, b)`` with ``a == b`` sends half of it to
each side (``torch.minimum``'s rule).

Launchers validate, allocate every output and launch; they never synchronize with the host.
Autograd lives in ``posttrain_kernels.ops.policy``. Loss types with row reductions before the
per-token pass (sequence-level importance sampling ``gspo`` / ``luspo``, ``vespo``), the entropy
quantile mask, the off-policy sequence mask and ``importance_sampling_ratio`` are not fused: the
public ``policy_loss`` runs them on its PyTorch path.
"""
from __future__ import annotations

import contextlib
import math
from typing import Dict, List, Optional, Tuple

import torch
import triton
import triton.language as tl

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
    "ratio",       # sum m r
    "log_ratio",   # sum m lr
    "kl",          # sum m kl (bias correction included)
    "entropy",     # sum m H
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

# |log(pi / pi_old)| is clamped to this before exp (api/policy.py LOG_RATIO_CLAMP).
_LR_CLAMP = tl.constexpr(20.0)

# loss type -> LOSS constexpr
LOSS_KINDS = {"grpo": 0, "bnpo": 0, "dr_grpo": 0, "dapo": 0, "cispo": 1, "sapo": 2}
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
    clip_lo,   # fp32: 1 - eps_low
    clip_hi,   # fp32: 1 + eps_high; cispo: eps_max
    delta,     # fp32: bound of the unclipped ratio (inf: none)
    clip_c,    # fp32: dual-clip bound (read only if HAS_DUAL)
    tau_pos,   # fp32: sapo temperature for A > 0
    tau_neg,   # fp32: sapo temperature for A <= 0
    beta,      # fp32: KL coefficient (0: the KL is only measured)
    LOSS: tl.constexpr, HAS_DUAL: tl.constexpr, HAS_REF: tl.constexpr, KL_EST: tl.constexpr,
    BIAS_KL: tl.constexpr,
):
    """Per token: (l, dl/dlp, low, high, dual, r, lr, kl); flags fp32 0/1, kl 0 without HAS_REF."""
    raw = lp - old
    lr = tl.minimum(tl.maximum(raw, -_LR_CLAMP), _LR_CLAMP)
    r = tl.exp(lr)
    in_lr = (raw >= -_LR_CLAMP) & (raw <= _LR_CLAMP)  # the clamp passes the gradient here
    dr = tl.where(in_lr, r, 0.0)  # d r / d lp
    zero = tl.zeros_like(lp)
    low = zero
    high = zero
    dual = zero
    if LOSS == 0:  # clipped surrogate (+ delta, + dual clip)
        c1 = tl.minimum(r, delta)
        c2 = tl.minimum(tl.maximum(r, clip_lo), clip_hi)
        dc1 = (r <= delta).to(tl.float32)
        dc2 = ((r >= clip_lo) & (r <= clip_hi)).to(tl.float32)
        a = c1 * adv
        b = c2 * adv
        wa, wb = _min_tie_weights(a, b)
        loss = -tl.minimum(a, b)
        dloss = -adv * (wa * dc1 + wb * dc2) * dr
        neg = adv < 0.0
        if HAS_DUAL:
            bound = -adv * clip_c
            dual = (neg & (loss > bound)).to(tl.float32)
            wl, _ = _min_tie_weights(loss, bound)
            dloss = tl.where(neg, dloss * wl, dloss)
            loss = tl.where(neg, tl.minimum(loss, bound), loss)
        low = ((c1 < clip_lo) & neg).to(tl.float32)
        high = ((c1 > clip_hi) & (adv > 0.0)).to(tl.float32)
    elif LOSS == 1:  # cispo: the clamped ratio is a constant weight of -A lp
        cc = tl.minimum(r, clip_hi)
        loss = -cc * adv * lp
        dloss = -cc * adv
        high = ((r > clip_hi) & (adv > 0.0)).to(tl.float32)
    else:  # sapo: soft gate
        tau = tl.where(adv > 0.0, tau_pos, tau_neg)
        s = tl.sigmoid(tau * (r - 1.0))
        loss = -(s * 4.0 / tau) * adv
        dloss = -adv * (4.0 / tau) * (s * (1.0 - s)) * tau * dr
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
        if BIAS_KL:
            dkl = dkl * r + tl.where(in_lr, kl * r, 0.0)  # 0, not inf * 0, where lr is clamped
            kl = kl * r
        use_kl = beta != 0.0  # beta == 0: measured only (never 0 * inf in the loss)
        loss = tl.where(use_kl, loss + beta * kl, loss)
        dloss = tl.where(use_kl, dloss + beta * dkl, dloss)
    return loss, dloss, low, high, dual, r, lr, kl


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
    tok_ptr,         # *fp32 [B, T] contiguous (output): per-token loss l, 0 where masked
    part_ptr,        # *fp32 [B, NSTAT] contiguous (output): per-row partial sums, PARTIAL_COLUMNS
    stride_logps,    # int: elements between consecutive rows of logps
    stride_old,      # int: elements between consecutive rows of old_logps
    stride_adv_b,    # int: elements between consecutive rows of advantages
    stride_adv_t,    # int: elements between consecutive tokens of advantages (0: one per row)
    stride_mask,     # int: elements between consecutive rows of mask
    stride_ref,      # int: elements between consecutive rows of ref_logps
    stride_ent,      # int: elements between consecutive rows of entropy
    T,               # int: tokens per row
    clip_lo,         # fp32: 1 - eps_low
    clip_hi,         # fp32: 1 + eps_high (cispo: eps_max)
    delta,           # fp32: bound of the unclipped ratio (inf: none)
    clip_c,          # fp32: dual-clip bound (read only if HAS_DUAL)
    tau_pos,         # fp32: sapo temperature, A > 0
    tau_neg,         # fp32: sapo temperature, A <= 0
    beta,            # fp32: KL coefficient
    LOSS: tl.constexpr,      # 0 clipped, 1 cispo, 2 sapo
    HAS_DUAL: tl.constexpr,  # dual clip on (clipped types)
    HAS_OLD: tl.constexpr,   # old_logps given (else the ratio is 1)
    HAS_REF: tl.constexpr,   # ref_logps given: compute the KL
    KL_EST: tl.constexpr,    # 0 k1, 1 k2, 2 k3, 3 low_var_kl
    BIAS_KL: tl.constexpr,   # KL * r (importance-sampling correction)
    HAS_ENT: tl.constexpr,   # entropy given: sum it
    BLOCK_T: tl.constexpr,   # token tile, power of two
):
    """Per row b: ``tok[b, t] = l`` (0 where masked) and ``part[b, :]``, the row sums of
    ``PARTIAL_COLUMNS`` (see the module docstring)."""
    row = tl.program_id(0).to(tl.int64)
    logps_row = logps_ptr + row * stride_logps
    old_row = old_ptr + row * stride_old
    adv_row = adv_ptr + row * stride_adv_b
    mask_row = mask_ptr + row * stride_mask
    ref_row = ref_ptr + row * stride_ref
    ent_row = ent_ptr + row * stride_ent
    tok_row = tok_ptr + row * T

    offs = tl.arange(0, BLOCK_T)
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
    for start in range(0, T, BLOCK_T):
        cols = start + offs
        valid, m, lp, old, adv, ref = _load_tile(logps_row, old_row, adv_row, mask_row, ref_row, cols, T,
                                                 stride_adv_t, HAS_OLD, HAS_REF)
        loss, _, low, high, dual, r, lr, kl = _token_math(
            lp, old, adv, ref, clip_lo, clip_hi, delta, clip_c, tau_pos, tau_neg, beta,
            LOSS, HAS_DUAL, HAS_REF, KL_EST, BIAS_KL)
        loss = tl.where(valid, loss, 0.0)
        tl.store(tok_row + cols, loss, mask=cols < T)
        acc_loss += loss * m
        acc_m += m
        acc_n += valid.to(tl.float32)
        acc_low += low * m
        acc_high += high * m
        acc_dual += dual * m
        acc_r += r * m  # masked tokens: r = 1, kl = 0 (their inputs read as 0)
        acc_lr += lr * m
        if HAS_REF:
            acc_kl += kl * m
        if HAS_ENT:
            h = tl.load(ent_row + cols, mask=valid, other=0.0).to(tl.float32)
            acc_ent += h * m

    part_row = part_ptr + row * _NSTAT
    tl.store(part_row + _C_LOSS, tl.sum(acc_loss, axis=0))
    tl.store(part_row + _C_MASK, tl.sum(acc_m, axis=0))
    tl.store(part_row + _C_COUNT, tl.sum(acc_n, axis=0))
    tl.store(part_row + _C_LOW, tl.sum(acc_low, axis=0))
    tl.store(part_row + _C_HIGH, tl.sum(acc_high, axis=0))
    tl.store(part_row + _C_DUAL, tl.sum(acc_dual, axis=0))
    tl.store(part_row + _C_RATIO, tl.sum(acc_r, axis=0))
    tl.store(part_row + _C_LOGR, tl.sum(acc_lr, axis=0))
    tl.store(part_row + _C_KL, tl.sum(acc_kl, axis=0))
    tl.store(part_row + _C_ENT, tl.sum(acc_ent, axis=0))


@triton.jit
def _policy_bwd_kernel(
    logps_ptr,       # *{fp32|bf16|fp16} [B, T]; element (b, t) at b * stride_logps + t
    old_ptr,         # *float [B, T]; (b, t) at b * stride_old + t (read only if HAS_OLD)
    adv_ptr,         # *float [B] or [B, T]; (b, t) at b * stride_adv_b + t * stride_adv_t
    mask_ptr,        # *{float|u8} [B, T]; (b, t) at b * stride_mask + t: weight m
    ref_ptr,         # *float [B, T]; (b, t) at b * stride_ref + t (read only if HAS_REF)
    grad_loss_ptr,   # *fp32 [B]; element b at b * stride_gloss: d out / d (sum_t m l) of row b
    grad_ent_ptr,    # *fp32 [B]; element b at b * stride_gent: d out / d (sum_t m H) of row b (if HAS_GRAD_ENT)
    grad_lp_ptr,     # *fp32 [B, T] contiguous (output): d out / d logps, 0 where masked
    grad_h_ptr,      # *fp32 [B, T] contiguous (output, written only if HAS_GRAD_ENT): d out / d entropy
    stride_logps,    # int: elements between consecutive rows of logps
    stride_old,      # int: elements between consecutive rows of old_logps
    stride_adv_b,    # int: elements between consecutive rows of advantages
    stride_adv_t,    # int: elements between consecutive tokens of advantages (0: one per row)
    stride_mask,     # int: elements between consecutive rows of mask
    stride_ref,      # int: elements between consecutive rows of ref_logps
    stride_gloss,    # int: elements between consecutive entries of grad_loss
    stride_gent,     # int: elements between consecutive entries of grad_ent
    T,               # int: tokens per row
    clip_lo, clip_hi, delta, clip_c, tau_pos, tau_neg, beta,  # fp32: as in the forward
    LOSS: tl.constexpr, HAS_DUAL: tl.constexpr, HAS_OLD: tl.constexpr, HAS_REF: tl.constexpr,
    KL_EST: tl.constexpr, BIAS_KL: tl.constexpr,  # as in the forward
    HAS_GRAD_ENT: tl.constexpr,  # also write the entropy gradient
    BLOCK_T: tl.constexpr,       # token tile, power of two
):
    """Per row b, with ``g = grad_loss[b]``, ``h = grad_ent[b]``:
    ``grad_lp[b, t] = g m dl/dlp``, ``grad_h[b, t] = h m``; 0 where masked."""
    row = tl.program_id(0).to(tl.int64)
    logps_row = logps_ptr + row * stride_logps
    old_row = old_ptr + row * stride_old
    adv_row = adv_ptr + row * stride_adv_b
    mask_row = mask_ptr + row * stride_mask
    ref_row = ref_ptr + row * stride_ref
    g = tl.load(grad_loss_ptr + row * stride_gloss)
    if HAS_GRAD_ENT:
        h = tl.load(grad_ent_ptr + row * stride_gent)

    offs = tl.arange(0, BLOCK_T)
    for start in range(0, T, BLOCK_T):
        cols = start + offs
        in_row = cols < T
        valid, m, lp, old, adv, ref = _load_tile(logps_row, old_row, adv_row, mask_row, ref_row, cols, T,
                                                 stride_adv_t, HAS_OLD, HAS_REF)
        _, dloss, _, _, _, _, _, _ = _token_math(
            lp, old, adv, ref, clip_lo, clip_hi, delta, clip_c, tau_pos, tau_neg, beta,
            LOSS, HAS_DUAL, HAS_REF, KL_EST, BIAS_KL)
        tl.store(grad_lp_ptr + row * T + cols, tl.where(valid, (g * m) * dloss, 0.0), mask=in_row)
        if HAS_GRAD_ENT:
            tl.store(grad_h_ptr + row * T + cols, tl.where(valid, h * m, 0.0), mask=in_row)


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
        mask = mask.view(torch.uint8)  # no copy: the kernels read 0 / 1 bytes
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


def _scalars(loss_type: str, epsilon_low: float, epsilon_high: float, delta: Optional[float],
             clip_ratio_c: Optional[float], sapo_temperature_pos: float, sapo_temperature_neg: float,
             beta: float, kl_estimator: str) -> Tuple[int, bool, int, Tuple[float, ...]]:
    if loss_type not in LOSS_KINDS:
        raise ValueError(f"loss_type: expected one of {tuple(LOSS_KINDS)} (the token-level types the "
                         f"kernels fuse), got {loss_type!r}")
    if kl_estimator not in KL_ESTIMATORS:
        raise ValueError(f"kl_estimator: expected one of {tuple(KL_ESTIMATORS)}, got {kl_estimator!r}")
    kind = LOSS_KINDS[loss_type]
    eps_low, eps_high = float(epsilon_low), float(epsilon_high)
    clip_lo = 1.0 - eps_low
    clip_hi = eps_high if kind == 1 else 1.0 + eps_high
    d = math.inf if delta is None else float(delta)
    has_dual = kind == 0 and clip_ratio_c is not None
    c = float(clip_ratio_c) if has_dual else 0.0
    vals = (clip_lo, clip_hi, d, c, float(sapo_temperature_pos), float(sapo_temperature_neg), float(beta))
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
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Per-token loss and per-row partial sums of the token-level policy losses.

    ``logps [B, T]`` fp32/bf16/fp16; ``old_logps`` / ``ref_logps`` / ``entropy [B, T]`` or None;
    ``advantages [B]``, ``[B, 1]`` or ``[B, T]``; ``mask [B, T]`` bool or floating weights.
    ``loss_type`` one of ``LOSS_KINDS``; ``epsilon_high`` is cispo's ``eps_max``; ``delta`` /
    ``clip_ratio_c`` None = off. Returns new fp32 ``(tok [B, T], partials [B, len(PARTIAL_COLUMNS)])``.
    ``block_t`` caps BLOCK_T (tests).
    """
    b, t, logps, old_logps, advantages, (sab, sat), mask, ref_logps, entropy = _inputs(
        logps, old_logps, advantages, mask, ref_logps, entropy)
    kind, has_dual, kl_est, vals = _scalars(loss_type, epsilon_low, epsilon_high, delta, clip_ratio_c,
                                  sapo_temperature_pos, sapo_temperature_neg, beta, kl_estimator)
    dev = logps.device
    tok = torch.empty((b, t), dtype=torch.float32, device=dev)
    part = torch.empty((b, len(PARTIAL_COLUMNS)), dtype=torch.float32, device=dev)
    if b == 0:
        return tok, part
    block, num_warps = launch_config(t, block_t)
    old = old_logps if old_logps is not None else logps  # placeholder, never read
    ref = ref_logps if ref_logps is not None else logps  # placeholder, never read
    ent = entropy if entropy is not None else logps      # placeholder, never read
    with _device_ctx(logps):
        _policy_fwd_kernel[(b,)](
            logps, old, advantages, mask, ref, ent, tok, part,
            logps.stride(0), old.stride(0), sab, sat, mask.stride(0), ref.stride(0), ent.stride(0),
            t, *vals,
            LOSS=kind, HAS_DUAL=has_dual, HAS_OLD=old_logps is not None, HAS_REF=ref_logps is not None,
            KL_EST=kl_est,
            BIAS_KL=bool(use_bias_correction_kl), HAS_ENT=entropy is not None, BLOCK_T=block,
            num_warps=num_warps,
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
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Gradients of ``sum_b grad_loss[b] * partials[b, loss] + grad_entropy[b] * partials[b, entropy]``.

    ``grad_loss [B]`` / ``grad_entropy [B]`` (None: no entropy gradient) fp32, any stride (0:
    broadcast). Returns new fp32 ``(grad_logps [B, T], grad_entropy [B, T] or empty (0,))``, 0 where
    masked.
    """
    b, t, logps, old_logps, advantages, (sab, sat), mask, ref_logps, _ = _inputs(
        logps, old_logps, advantages, mask, ref_logps)
    kind, has_dual, kl_est, vals = _scalars(loss_type, epsilon_low, epsilon_high, delta, clip_ratio_c,
                                  sapo_temperature_pos, sapo_temperature_neg, beta, kl_estimator)
    dev = logps.device

    def row_vector(name, g):
        if not isinstance(g, torch.Tensor) or g.dim() != 1 or g.shape[0] != b:
            raise ValueError(f"{name}: expected shape ({b},), got "
                             f"{tuple(g.shape) if isinstance(g, torch.Tensor) else type(g).__name__}")
        if g.device != dev:
            raise ValueError(f"{name}: expected a tensor on {dev} (the device of logps), got {g.device}")
        return g.to(torch.float32)

    grad_loss = row_vector("grad_loss", grad_loss)
    has_gent = grad_entropy is not None
    if has_gent:
        grad_entropy = row_vector("grad_entropy", grad_entropy)
    grad_lp = torch.empty((b, t), dtype=torch.float32, device=dev)
    grad_h = torch.empty((b, t) if has_gent else (0,), dtype=torch.float32, device=dev)
    if b == 0:
        return grad_lp, grad_h
    block, num_warps = launch_config(t, block_t)
    old = old_logps if old_logps is not None else logps
    ref = ref_logps if ref_logps is not None else logps
    gent = grad_entropy if has_gent else grad_loss
    with _device_ctx(logps):
        _policy_bwd_kernel[(b,)](
            logps, old, advantages, mask, ref, grad_loss, gent, grad_lp, grad_h if has_gent else grad_lp,
            logps.stride(0), old.stride(0), sab, sat, mask.stride(0), ref.stride(0),
            grad_loss.stride(0), gent.stride(0), t, *vals,
            LOSS=kind, HAS_DUAL=has_dual, HAS_OLD=old_logps is not None, HAS_REF=ref_logps is not None,
            KL_EST=kl_est,
            BIAS_KL=bool(use_bias_correction_kl), HAS_GRAD_ENT=has_gent, BLOCK_T=block,
            num_warps=num_warps,
        )
    return grad_lp, grad_h


# ----------------------------------------------------------------------------------------------
# ahead-of-time compilation specs (tests/test_triton_aot.py)
# ----------------------------------------------------------------------------------------------


def _jit_like(signature: Dict[str, str], ones: Tuple[str, ...]) -> Tuple[Dict[str, str], Dict[str, int]]:
    """Mark the integer arguments the JIT would see equal to 1 as constexpr 1 (it specializes them)."""
    sig = dict(signature)
    consts = {}
    for name in ones:
        sig[name] = "constexpr"
        consts[name] = 1
    return sig, consts


# (LOSS, HAS_DUAL, HAS_OLD, HAS_REF, KL_EST, BIAS_KL, HAS_ENT) compiled ahead of time: every loss
# kind bare (on-policy, no KL) and with every input and option (the most live values), and each
# other KL estimator.
_AOT_FLAGS = (
    [(kind, False, False, False, 2, False, False) for kind in (0, 1, 2)]
    + [(kind, kind == 0, True, True, 2, True, True) for kind in (0, 1, 2)]
    + [(0, True, True, True, est, True, False) for est in (0, 1, 3)]
)


def aot_specs(seq_len: int = 8192,
              dtypes=("bf16", "fp32")) -> List[Tuple[object, Dict[str, str], Dict[str, object], int]]:
    """``(kernel, signature, constexprs, num_warps)`` for both kernels in the flag combinations of
    ``_AOT_FLAGS``, for bf16 and fp32 log-probs (old / ref / entropy in the same dtype, fp32
    advantages, one per row, and a bool mask read as u8), with the BLOCK_T / num_warps the
    launchers pick at ``seq_len``. Same format and usage as
    ``posttrain_kernels.kernels.token_logprobs.aot_specs``; the per-row advantages and the
    per-row upstream gradients of a contiguous ``[B]`` tensor have unit stride, which the JIT turns
    into constexpr 1 (the upstream gradients come as columns of ``[B, NSTAT]``: stride NSTAT).
    """
    block_t, num_warps = launch_config(seq_len)
    specs = []
    for dt in dtypes:
        lp = "*" + dt
        for kind, has_dual, has_old, has_ref, kl_est, bias, has_ent in _AOT_FLAGS:
            flags = dict(LOSS=kind, HAS_DUAL=has_dual, HAS_OLD=has_old, HAS_REF=has_ref, KL_EST=kl_est,
                         BIAS_KL=bias)
            sig, consts = _jit_like({
                "logps_ptr": lp, "old_ptr": lp, "adv_ptr": "*fp32", "mask_ptr": "*u8", "ref_ptr": lp,
                "ent_ptr": lp, "tok_ptr": "*fp32", "part_ptr": "*fp32",
                "stride_logps": "i32", "stride_old": "i32", "stride_adv_b": "i32", "stride_adv_t": "i32",
                "stride_mask": "i32", "stride_ref": "i32", "stride_ent": "i32", "T": "i32",
                "clip_lo": "fp32", "clip_hi": "fp32", "delta": "fp32", "clip_c": "fp32",
                "tau_pos": "fp32", "tau_neg": "fp32", "beta": "fp32",
                "LOSS": "constexpr", "HAS_DUAL": "constexpr", "HAS_OLD": "constexpr", "HAS_REF": "constexpr",
                "KL_EST": "constexpr",
                "BIAS_KL": "constexpr", "HAS_ENT": "constexpr", "BLOCK_T": "constexpr",
            }, ("stride_adv_b",))
            consts.update(flags, HAS_ENT=has_ent, BLOCK_T=block_t)
            specs.append((_policy_fwd_kernel, sig, consts, num_warps))
            sig, consts = _jit_like({
                "logps_ptr": lp, "old_ptr": lp, "adv_ptr": "*fp32", "mask_ptr": "*u8", "ref_ptr": lp,
                "grad_loss_ptr": "*fp32", "grad_ent_ptr": "*fp32", "grad_lp_ptr": "*fp32",
                "grad_h_ptr": "*fp32",
                "stride_logps": "i32", "stride_old": "i32", "stride_adv_b": "i32", "stride_adv_t": "i32",
                "stride_mask": "i32", "stride_ref": "i32", "stride_gloss": "i32", "stride_gent": "i32",
                "T": "i32", "clip_lo": "fp32", "clip_hi": "fp32", "delta": "fp32", "clip_c": "fp32",
                "tau_pos": "fp32", "tau_neg": "fp32", "beta": "fp32",
                "LOSS": "constexpr", "HAS_DUAL": "constexpr", "HAS_OLD": "constexpr", "HAS_REF": "constexpr",
                "KL_EST": "constexpr",
                "BIAS_KL": "constexpr", "HAS_GRAD_ENT": "constexpr", "BLOCK_T": "constexpr",
            }, ("stride_adv_b",))
            consts.update(flags, HAS_GRAD_ENT=has_ent, BLOCK_T=block_t)
            specs.append((_policy_bwd_kernel, sig, consts, num_warps))
    return specs
