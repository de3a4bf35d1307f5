"""Custom ops + autograd for the token-level policy-gradient losses (``posttrain_kernels::policy_*``).

``policy_token_loss_forward`` computes, for the loss types whose per-token loss is elementwise
given the row's advantage (``grpo``, ``bnpo``, ``dr_grpo``, ``dapo``, ``cispo``, ``sapo`` with
token-level importance sampling), the per-token loss (ratio, clipping, delta, dual clip, KL
estimator with optional bias correction) and the per-row partial sums of ``PARTIAL_COLUMNS``, in
one pass; the aggregation over rows and the metrics are O(B) PyTorch on those partials
(``posttrain_kernels.api.policy``). ``policy_token_loss_backward`` takes the upstream gradient of
each row's ``loss`` and ``entropy`` partials (the aggregation makes it a per-row scale of every
token's loss) and writes ``d / d logps`` and ``d / d entropy`` in one pass.

Backends: ``"triton"`` runs the kernels of ``posttrain_kernels.kernels.policy``; every other
backend name runs the vectorized PyTorch transcription below (same per-token quantities, same
partials, the same derivative rules). The ops never mutate an input and allocate their outputs,
so ``torch.compile`` traces them through their fake implementations.

Sequence-level importance sampling (``gspo``, ``luspo``), ``vespo``, the entropy-quantile mask,
the off-policy sequence mask and ``importance_sampling_ratio`` are not covered: the public
``policy_loss`` keeps them on its PyTorch path.
"""
from __future__ import annotations

import importlib
from typing import Optional, Tuple

import torch
from torch import Tensor

_F32 = torch.float32

# Loss types the fused ops cover, and their kernel family (0 clipped surrogate, 1 cispo, 2 sapo).
LOSS_KINDS = {"grpo": 0, "bnpo": 0, "dr_grpo": 0, "dapo": 0, "cispo": 1, "sapo": 2}
FUSED_LOSS_TYPES = tuple(LOSS_KINDS)
KL_ESTIMATORS = ("k1", "k2", "k3", "low_var_kl")

# Columns of the per-row partial sums (fp32 [B, len(PARTIAL_COLUMNS)]), over the row's valid
# tokens (m != 0, m the mask weight); the same layout as kernels/policy.py.
PARTIAL_COLUMNS = (
    "loss",        # sum m l
    "mask",        # sum m
    "count",       # number of valid tokens
    "clip_low",    # sum m [min(r, delta) < 1 - eps_low and A < 0]      (clipped types)
    "clip_high",   # sum m [min(r, delta) > 1 + eps_high and A > 0]; cispo: [r > eps_max and A > 0]
    "clip_dual",   # sum m [A < 0 and the dual clip binds]
    "ratio",       # sum m r
    "log_ratio",   # sum m clamp(logps - old_logps, -20, 20)
    "kl",          # sum m kl (bias correction included)
    "entropy",     # sum m H
)
COL = {name: i for i, name in enumerate(PARTIAL_COLUMNS)}
NSTAT = len(PARTIAL_COLUMNS)
_LR_CLAMP = 20.0


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


def _min_tie_weights(a: Tensor, b: Tensor) -> Tuple[Tensor, Tensor]:
    """Shares of the gradient of ``torch.minimum(a, b)``: 1/0, 0/1, or 1/2 each on a tie."""
    half = 0.5 * (a == b).to(_F32)
    return (a < b).to(_F32) + half, (b < a).to(_F32) + half


def _token_math(lp, old, adv, ref, loss_type, epsilon_low, epsilon_high, delta, clip_ratio_c,
                sapo_temperature_pos, sapo_temperature_neg, beta, kl_estimator, bias):
    """Per token: (l, dl/dlp, low, high, dual, r, lr, kl), the kernels' ``_token_math``."""
    kind = LOSS_KINDS[loss_type]
    raw = lp - old
    lr = raw.clamp(-_LR_CLAMP, _LR_CLAMP)
    r = torch.exp(lr)
    in_lr = (raw >= -_LR_CLAMP) & (raw <= _LR_CLAMP)
    dr = torch.where(in_lr, r, 0.0)
    zero = torch.zeros_like(lp)
    low = high = dual = zero
    if kind == 0:
        clip_lo, clip_hi = 1.0 - epsilon_low, 1.0 + epsilon_high
        c1 = r if delta is None else r.clamp(max=delta)
        c2 = r.clamp(clip_lo, clip_hi)
        dc1 = torch.ones_like(r) if delta is None else (r <= delta).to(_F32)
        dc2 = ((r >= clip_lo) & (r <= clip_hi)).to(_F32)
        a, b = c1 * adv, c2 * adv
        wa, wb = _min_tie_weights(a, b)
        loss = -torch.minimum(a, b)
        dloss = -adv * (wa * dc1 + wb * dc2) * dr
        neg = adv < 0
        if clip_ratio_c is not None:
            bound = -adv * clip_ratio_c
            dual = (neg & (loss > bound)).to(_F32)
            wl, _ = _min_tie_weights(loss, bound)
            dloss = torch.where(neg, dloss * wl, dloss)
            loss = torch.where(neg, torch.minimum(loss, bound), loss)
        low = ((c1 < clip_lo) & neg).to(_F32)
        high = ((c1 > clip_hi) & (adv > 0)).to(_F32)
    elif kind == 1:
        cc = r.clamp(max=epsilon_high)
        loss = -cc * adv * lp
        dloss = -cc * adv
        high = ((r > epsilon_high) & (adv > 0)).to(_F32)
    else:
        tau = torch.where(adv > 0, adv.new_full((), sapo_temperature_pos), adv.new_full((), sapo_temperature_neg))
        s = torch.sigmoid(tau * (r - 1.0))
        loss = -(s * 4.0 / tau) * adv
        dloss = -adv * (4.0 / tau) * (s * (1.0 - s)) * tau * dr
    kl = zero
    if ref is not None:
        d = ref - lp
        if kl_estimator == "k1":
            kl, dkl = -d, torch.ones_like(d)
        elif kl_estimator == "k2":
            kl, dkl = 0.5 * d * d, -d
        elif kl_estimator == "k3":
            e = torch.exp(d)
            kl, dkl = e - d - 1.0, 1.0 - e
        else:
            dc = d.clamp(-20.0, 20.0)
            e = torch.exp(dc)
            v = e - dc - 1.0
            kl = v.clamp(-10.0, 10.0)
            dkl = torch.where((d >= -20.0) & (d <= 20.0) & (v >= -10.0) & (v <= 10.0), 1.0 - e, 0.0)
        if bias:
            dkl = dkl * r + torch.where(in_lr, kl * r, 0.0)
            kl = kl * r
        if beta != 0.0:
            loss = loss + beta * kl
            dloss = dloss + beta * dkl
    return loss, dloss, low, high, dual, r, lr, kl


def _torch_forward(logps, old_logps, advantages, mask, ref_logps, entropy, *opts) -> Tuple[Tensor, Tensor]:
    valid, m, lp, old, adv, ref = _operands(logps, old_logps, advantages, mask, ref_logps)
    loss, _, low, high, dual, r, lr, kl = _token_math(lp, old, adv, ref, *opts)
    tok = torch.where(valid, loss, 0.0).expand_as(lp)
    ent = torch.zeros_like(lp) if entropy is None else torch.where(valid, entropy.to(_F32), 0.0)
    cols = (tok * m, m, valid.to(_F32), low * m, high * m, dual * m, r * m, lr * m, kl * m, ent * m)
    part = torch.stack([c.expand_as(lp).sum(dim=-1) for c in cols], dim=-1)
    return tok.contiguous(), part


def _torch_backward(logps, old_logps, advantages, mask, ref_logps, grad_loss, grad_entropy,
                    *opts) -> Tuple[Tensor, Tensor]:
    valid, m, lp, old, adv, ref = _operands(logps, old_logps, advantages, mask, ref_logps)
    _, dloss, *_ = _token_math(lp, old, adv, ref, *opts)
    g = grad_loss.to(_F32).unsqueeze(1)
    grad_lp = torch.where(valid, (g * m) * dloss, 0.0).expand_as(lp).contiguous()
    if grad_entropy is None:
        return grad_lp, lp.new_empty((0,))
    h = grad_entropy.to(_F32).unsqueeze(1)
    return grad_lp, torch.where(valid, h * m, 0.0).expand_as(lp).contiguous()


# --------------------------------------------------------------------------------------------
# custom ops


def _check_options(loss_type: str, kl_estimator: str) -> None:
    if loss_type not in LOSS_KINDS:
        raise ValueError(f"loss_type: expected one of {FUSED_LOSS_TYPES} (the token-level types the fused "
                         f"op covers), got {loss_type!r}")
    if kl_estimator not in KL_ESTIMATORS:
        raise ValueError(f"kl_estimator: expected one of {KL_ESTIMATORS}, got {kl_estimator!r}")


@torch.library.custom_op("posttrain_kernels::policy_token_loss_forward", mutates_args=())
def policy_token_loss_forward(
    logps: Tensor, old_logps: Optional[Tensor], advantages: Tensor, mask: Tensor,
    ref_logps: Optional[Tensor], entropy: Optional[Tensor], loss_type: str, epsilon_low: float,
    epsilon_high: float, delta: Optional[float], clip_ratio_c: Optional[float],
    sapo_temperature_pos: float, sapo_temperature_neg: float, beta: float, kl_estimator: str,
    use_bias_correction_kl: bool, backend: str,
) -> Tuple[Tensor, Tensor]:
    """logps (B, T) (+ old_logps, ref_logps, entropy (B, T) or None), advantages (B,), (B, 1) or
    (B, T), mask (B, T) bool or weights -> per-token loss (B, T) (0 where masked) and the per-row
    partial sums (B, len(PARTIAL_COLUMNS)), both fp32. ``epsilon_high`` is cispo's ``eps_max``;
    ``delta`` / ``clip_ratio_c`` None = off; ``beta == 0``: the KL is only summed (metrics)."""
    _check_options(loss_type, kl_estimator)
    opts = (loss_type, epsilon_low, epsilon_high, delta, clip_ratio_c, sapo_temperature_pos,
            sapo_temperature_neg, beta, kl_estimator, use_bias_correction_kl)
    if backend == "triton":
        return _kernels().policy_token_loss_forward(logps, old_logps, advantages, mask, ref_logps, entropy,
                                                    *opts)
    return _torch_forward(logps, old_logps, advantages, mask, ref_logps, entropy, *opts)


@policy_token_loss_forward.register_fake
def _(logps, old_logps, advantages, mask, ref_logps, entropy, loss_type, epsilon_low, epsilon_high, delta,
      clip_ratio_c, sapo_temperature_pos, sapo_temperature_neg, beta, kl_estimator, use_bias_correction_kl,
      backend):
    b, t = logps.shape
    return logps.new_empty((b, t), dtype=_F32), logps.new_empty((b, NSTAT), dtype=_F32)


@torch.library.custom_op("posttrain_kernels::policy_token_loss_backward", mutates_args=())
def policy_token_loss_backward(
    logps: Tensor, old_logps: Optional[Tensor], advantages: Tensor, mask: Tensor,
    ref_logps: Optional[Tensor], grad_loss: Tensor, grad_entropy: Optional[Tensor], loss_type: str,
    epsilon_low: float, epsilon_high: float, delta: Optional[float], clip_ratio_c: Optional[float],
    sapo_temperature_pos: float, sapo_temperature_neg: float, beta: float, kl_estimator: str,
    use_bias_correction_kl: bool, backend: str,
) -> Tuple[Tensor, Tensor]:
    """Gradients of ``sum_b grad_loss[b] partials[b, "loss"] + grad_entropy[b] partials[b, "entropy"]``:
    d / d logps (B, T) and d / d entropy (B, T), or an empty (0,) tensor when ``grad_entropy`` is
    None; fp32, 0 where masked."""
    _check_options(loss_type, kl_estimator)
    opts = (loss_type, epsilon_low, epsilon_high, delta, clip_ratio_c, sapo_temperature_pos,
            sapo_temperature_neg, beta, kl_estimator, use_bias_correction_kl)
    if backend == "triton":
        return _kernels().policy_token_loss_backward(logps, old_logps, advantages, mask, ref_logps, grad_loss,
                                                     grad_entropy, *opts)
    return _torch_backward(logps, old_logps, advantages, mask, ref_logps, grad_loss, grad_entropy, *opts)


@policy_token_loss_backward.register_fake
def _(logps, old_logps, advantages, mask, ref_logps, grad_loss, grad_entropy, loss_type, epsilon_low,
      epsilon_high, delta, clip_ratio_c, sapo_temperature_pos, sapo_temperature_neg, beta, kl_estimator,
      use_bias_correction_kl, backend):
    b, t = logps.shape
    return (logps.new_empty((b, t), dtype=_F32),
            logps.new_empty((b, t) if grad_entropy is not None else (0,), dtype=_F32))


def _setup_policy(ctx, inputs, output):
    logps, old_logps, advantages, mask, ref_logps, entropy = inputs[:6]
    ctx.save_for_backward(logps, old_logps, advantages, mask, ref_logps)
    ctx.opts = tuple(inputs[6:])
    ctx.entropy_dtype = None if entropy is None else entropy.dtype
    ctx.mark_non_differentiable(output[0])


def _backward_policy(ctx, _grad_tok, grad_part):
    logps, old_logps, advantages, mask, ref_logps = ctx.saved_tensors
    need_lp = ctx.needs_input_grad[0]
    need_ent = ctx.entropy_dtype is not None and ctx.needs_input_grad[5]
    if grad_part is None:
        grad_part = logps.new_zeros((logps.shape[0], NSTAT), dtype=_F32)
    grad_part = grad_part.to(_F32)
    grad_lp, grad_h = policy_token_loss_backward(
        logps, old_logps, advantages, mask, ref_logps, grad_part[:, COL["loss"]],
        grad_part[:, COL["entropy"]] if need_ent else None, *ctx.opts)
    return ((grad_lp.to(logps.dtype) if need_lp else None), None, None, None, None,
            (grad_h.to(ctx.entropy_dtype) if need_ent else None)) + (None,) * len(ctx.opts)


policy_token_loss_forward.register_autograd(_backward_policy, setup_context=_setup_policy)
