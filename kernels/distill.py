"""Triton kernels of the distillation family: per-row divergences between a student and a teacher
distribution over the vocabulary (forward KL, reverse KL, generalized JSD, skew KL, skew reverse KL,
total variation), forward and backward.

The contract (math, shapes, row statistics, gradients) is the module docstring of
``posttrain_kernels.backends.torch_distill``; the launchers below have the signatures and return
values of its ``distill_forward`` / ``distill_backward`` and compute the same numbers.

Layout of both kernels: one program per row of ``student / teacher [N, V]`` on grid axis 0 (up to
2^31 - 1 programs), streaming over the vocabulary in ``BLOCK_V`` tiles; row offsets are int64.
Logits may be fp32 / bf16 / fp16 (student and teacher independently); they are upcast to fp32 on
load, scaled by ``inv_t`` (``s = student * inv_t``, ``t = teacher * inv_t``) and every
accumulation is fp32. The divergence is a constexpr (``DIV``, the codes of ``DIVERGENCE_CODES``
after the launcher maps ``jsd`` with ``beta`` 0 / 1 to ``forward_kl`` / ``reverse_kl``, as TRL and
the contract do), so each compiled kernel carries the math of one divergence only.

Forward, per row (two passes over the row):

1. Online two-logsumexp: running maxima ``m_s``, ``m_t`` (initialised to -inf) and running sums
   ``z_s = sum exp(s - m_s)``, ``z_t = sum exp(t - m_t)``, rescaled by ``exp(m - m')`` when a
   maximum moves (shifted by 0 while every value seen is -inf: no ``exp(-inf - -inf)``).
2. Every divergence needs both log-softmaxes, hence both lse's first: a second pass recomputes
   ``ls = (s - m_s) - log z_s``, ``lt = (t - m_t) - log z_t`` (relative to the maxima, so nothing
   cancels at ``|logits| ~ 1e4``), ``p = exp(ls)``, ``q = exp(lt)``, and accumulates the loss and
   ``c = sum_j p_j G_j`` (the row constant of the gradient ``dL/ds_j = p_j (G_j - c)``). Every
   ``x log y`` term is taken as 0 where ``x == 0`` and every ``p_j G_j`` as 0 where ``p_j == 0``
   (no ``0 * -inf``), as in the contract.

The mixtures are log-sum-exps of two terms, ``log m = logaddexp(lt + log beta, ls + log(1 - beta))``
(JSD) and ``log r = logaddexp(lt + log alpha, ls + log(1 - alpha))`` (skew KL; teacher and student
swapped for skew reverse KL); the launcher passes the two logarithms, ``-inf`` for a zero weight,
which makes ``alpha`` 0 and 1 exactly the contract's special cases (``log r = ls`` / ``lt``).
Skew reverse KL's ``G = log p - log r + 1 - alpha p / r`` is evaluated as
``log p - log r + (1 - alpha) q / r`` (the same number, ``r = alpha p + (1 - alpha) q``), which does
not cancel where ``p ~ r``; skew KL's ``G = -(1 - alpha) q / r`` is taken as 0 where ``q == 0``
(also at ``alpha == 1``, where ``r == q == 0 < p`` would give ``0 * (0 / 0)``).

Outputs: ``loss [N]`` and ``stats [N, 3] = (lse_s, lse_t, c)``; skipped rows (``label ==
ignore_index``) read nothing and get 0 everywhere.

Backward, per row (one pass; each logit read once, each gradient element written once):
``ls = s - lse_s``, ``lt = t - lse_t`` from the saved stats, ``p = exp(ls)``, and
``grad_j = (grad_loss * inv_t) * dL/ds_j`` with ``dL/ds = p - q`` (forward KL) or
``p (G - c)`` (0 where ``p == 0``) otherwise; 0 for skipped rows (their logits are not read).

Launchers validate, allocate every output (never write into an input; the backward's ``out`` is
the caller's own buffer) and launch; they never synchronize with the host. Autograd lives in
``posttrain_kernels.ops``.
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
    "distill_forward",
    "distill_backward",
    "effective_divergence",
    "launch_config",
    "aot_specs",
    "DIVERGENCE_CODES",
    "NUM_STATS",
]

# Same codes as posttrain_kernels.backends.torch_distill.DIVERGENCE_CODES (backends import
# kernels, never the other way round; tests/test_triton_distill.py checks they agree).
DIVERGENCE_CODES = {"forward_kl": 0, "reverse_kl": 1, "jsd": 2, "skew_kl": 3, "skew_reverse_kl": 4, "tvd": 5}
_FORWARD_KL = tl.constexpr(0)
_REVERSE_KL = tl.constexpr(1)
_JSD = tl.constexpr(2)
_SKEW_KL = tl.constexpr(3)
_SKEW_REVERSE_KL = tl.constexpr(4)
_TVD = tl.constexpr(5)

# Columns of the row statistics: (logsumexp(s), logsumexp(t), c)
NUM_STATS = 3

# Largest vocabulary tile. Two rows (student, teacher) are live per tile; 4096 fp32 per tile over
# 8 warps = 16 values per thread per live tile (see tests/test_triton_aot.py for the register use).
MAX_BLOCK_V = 4096


# ----------------------------------------------------------------------------------------------
# device helpers
# ----------------------------------------------------------------------------------------------


@triton.jit
def _logaddexp(a, b):
    """log(exp(a) + exp(b)) in fp32, elementwise; -inf (not nan) where both are -inf."""
    mx = tl.maximum(a, b)
    mx_ref = tl.where(mx == float("-inf"), 0.0, mx)  # no exp(-inf - -inf)
    return mx_ref + tl.log(tl.exp(a - mx_ref) + tl.exp(b - mx_ref))


@triton.jit
def _xlogy(x, log_y):
    """x * log_y, 0 where x == 0 (no 0 * -inf)."""
    return tl.where(x > 0.0, x * log_y, 0.0)


@triton.jit
def _row_valid(labels_ptr, row, stride_labels, ignore_index, HAS_LABELS: tl.constexpr):
    """Whether the row takes part (its label is not ``ignore_index``; always without labels)."""
    if HAS_LABELS:
        lab = tl.load(labels_ptr + row * stride_labels)
        valid = lab != ignore_index
    else:
        valid = tl.full([], 1, tl.int1)
    return valid


@triton.jit
def _grad_terms(ls, lt, p, w, log_w, log_1mw, DIV: tl.constexpr):
    """``G`` of the contract, elementwise (DIV != forward KL), from the log-probs ``ls`` (student)
    and ``lt`` (teacher), ``p = exp(ls)``; ``w`` is JSD's beta or the skew alpha,
    ``log_w = log(w)``, ``log_1mw = log(1 - w)`` (-inf for a zero weight). Values where ``p == 0``
    are meaningless (the callers mask them)."""
    if DIV == _REVERSE_KL:
        g = ls - lt
    elif DIV == _JSD:
        lm = _logaddexp(lt + log_w, ls + log_1mw)
        g = (1.0 - w) * (ls - lm)
    elif DIV == _SKEW_KL:
        lr = _logaddexp(lt + log_w, ls + log_1mw)
        # q == 0 contributes 0 (also at alpha == 1, where r == q == 0 would give 0 * nan)
        g = tl.where(lt > float("-inf"), -(1.0 - w) * tl.exp(lt - lr), 0.0)
    elif DIV == _SKEW_REVERSE_KL:
        lr = _logaddexp(ls + log_w, lt + log_1mw)
        # the contract's 1 - alpha p / r is (1 - alpha) q / r: no cancellation where p ~ r
        g = (ls - lr) + (1.0 - w) * tl.exp(lt - lr)
    else:  # total variation
        q = tl.exp(lt)
        g = tl.where(p > q, 0.5, tl.where(p < q, -0.5, 0.0))
    return g


# ----------------------------------------------------------------------------------------------
# kernels
# ----------------------------------------------------------------------------------------------


@triton.jit
def _distill_fwd_kernel(
    student_ptr,         # *{fp32|bf16|fp16} [N, V]; element (r, j) at r * stride_student_row + j
    teacher_ptr,         # *{fp32|bf16|fp16} [N, V]; element (r, j) at r * stride_teacher_row + j
    labels_ptr,          # *int64 [N]; element r at r * stride_labels (read only if HAS_LABELS)
    loss_ptr,            # *fp32 [N] contiguous (output): the row's divergence, 0 for skipped rows
    stats_ptr,           # *fp32 [N, 3] contiguous (output): (lse_s, lse_t, c), 0 for skipped rows
    stride_student_row,  # int: elements between consecutive rows of student (>= V)
    stride_teacher_row,  # int: elements between consecutive rows of teacher (>= V)
    stride_labels,       # int: elements between consecutive labels
    V,                   # int: vocabulary size (columns of student and teacher)
    inv_t,               # fp32: 1 / temperature; s = student * inv_t, t = teacher * inv_t
    w,                   # fp32: JSD's beta or the skew alpha (unused by the other divergences)
    log_w,               # fp32: log(w), -inf for w == 0
    log_1mw,             # fp32: log(1 - w), -inf for w == 1
    ignore_index,        # int: label value that marks a skipped row
    BLOCK_V: tl.constexpr,     # vocabulary tile, power of two
    DIV: tl.constexpr,         # divergence code (DIVERGENCE_CODES; jsd only for 0 < beta < 1)
    HAS_LABELS: tl.constexpr,  # labels are given (else no row is skipped)
):
    """Per row r: ``lse_s = logsumexp(s)``, ``lse_t = logsumexp(t)``, ``loss[r]`` = the divergence
    DIV between ``p = softmax(s)`` and ``q = softmax(t)``, ``c = sum_j p_j G_j`` (0 for forward
    KL); ``stats[r] = (lse_s, lse_t, c)``. Skipped rows are not read: loss 0, stats 0.
    """
    # fp32 whatever the launch typed them (inductor types Python floats of user kernels as fp64)
    inv_t = tl.cast(inv_t, tl.float32)
    w = tl.cast(w, tl.float32)
    log_w = tl.cast(log_w, tl.float32)
    log_1mw = tl.cast(log_1mw, tl.float32)
    row = tl.program_id(0).to(tl.int64)
    student_row = student_ptr + row * stride_student_row
    teacher_row = teacher_ptr + row * stride_teacher_row
    valid = _row_valid(labels_ptr, row, stride_labels, ignore_index, HAS_LABELS)
    v_end = tl.where(valid, V, 0)  # skipped rows do not read their logits

    offs = tl.arange(0, BLOCK_V)
    # pass 1: online logsumexp of both rows
    m_s = tl.full([], float("-inf"), tl.float32)  # running max of s
    z_s = tl.full([], 0.0, tl.float32)            # sum exp(s - m_s)
    m_t = tl.full([], float("-inf"), tl.float32)  # running max of t
    z_t = tl.full([], 0.0, tl.float32)            # sum exp(t - m_t)
    for start in range(0, v_end, BLOCK_V):
        cols = start + offs
        mask = cols < V
        s = tl.load(student_row + cols, mask=mask, other=float("-inf")).to(tl.float32) * inv_t
        t = tl.load(teacher_row + cols, mask=mask, other=float("-inf")).to(tl.float32) * inv_t
        m_new = tl.maximum(m_s, tl.max(s, axis=0))
        m_ref = tl.where(m_new == float("-inf"), 0.0, m_new)  # no exp(-inf - -inf)
        z_s = z_s * tl.exp(m_s - m_ref) + tl.sum(tl.exp(s - m_ref), axis=0)
        m_s = m_new
        m_new = tl.maximum(m_t, tl.max(t, axis=0))
        m_ref = tl.where(m_new == float("-inf"), 0.0, m_new)
        z_t = z_t * tl.exp(m_t - m_ref) + tl.sum(tl.exp(t - m_ref), axis=0)
        m_t = m_new

    # skipped rows (loop skipped): m = 0, z = 1 instead of -inf, 0 -- no inf or nan below
    m_s = tl.where(valid, m_s, 0.0)
    m_t = tl.where(valid, m_t, 0.0)
    log_zs = tl.log(tl.where(valid, z_s, 1.0))
    log_zt = tl.log(tl.where(valid, z_t, 1.0))

    # pass 2: the divergence and c, from log-probs taken relative to the maxima
    loss = tl.zeros([BLOCK_V], dtype=tl.float32)  # per-lane partial sums, reduced once at the end
    c = tl.zeros([BLOCK_V], dtype=tl.float32)
    for start in range(0, v_end, BLOCK_V):
        cols = start + offs
        mask = cols < V
        s = tl.load(student_row + cols, mask=mask, other=float("-inf")).to(tl.float32) * inv_t
        t = tl.load(teacher_row + cols, mask=mask, other=float("-inf")).to(tl.float32) * inv_t
        ls = (s - m_s) - log_zs
        lt = (t - m_t) - log_zt
        p = tl.exp(ls)
        if DIV == _FORWARD_KL:
            loss += _xlogy(tl.exp(lt), lt - ls)
        elif DIV == _REVERSE_KL:
            loss += _xlogy(p, ls - lt)
        elif DIV == _JSD:
            lm = _logaddexp(lt + log_w, ls + log_1mw)
            loss += w * _xlogy(tl.exp(lt), lt - lm) + (1.0 - w) * _xlogy(p, ls - lm)
        elif DIV == _SKEW_KL:
            lr = _logaddexp(lt + log_w, ls + log_1mw)
            loss += _xlogy(tl.exp(lt), lt - lr)
        elif DIV == _SKEW_REVERSE_KL:
            lr = _logaddexp(ls + log_w, lt + log_1mw)
            loss += _xlogy(p, ls - lr)
        else:  # total variation
            loss += 0.5 * tl.abs(p - tl.exp(lt))
        if DIV != _FORWARD_KL:
            c += tl.where(p > 0.0, p * _grad_terms(ls, lt, p, w, log_w, log_1mw, DIV), 0.0)

    lse_s = tl.where(valid, m_s + log_zs, 0.0)
    lse_t = tl.where(valid, m_t + log_zt, 0.0)
    tl.store(loss_ptr + row, tl.where(valid, tl.sum(loss, axis=0), 0.0))
    stats_row = stats_ptr + row * 3
    tl.store(stats_row, lse_s)
    tl.store(stats_row + 1, lse_t)
    tl.store(stats_row + 2, tl.where(valid, tl.sum(c, axis=0), 0.0))


@triton.jit
def _distill_bwd_kernel(
    student_ptr,         # *{fp32|bf16|fp16} [N, V]; element (r, j) at r * stride_student_row + j
    teacher_ptr,         # *{fp32|bf16|fp16} [N, V]; element (r, j) at r * stride_teacher_row + j
    labels_ptr,          # *int64 [N]; element r at r * stride_labels (read only if HAS_LABELS)
    stats_ptr,           # *fp32 [N, 3]; (r, k) at r * stride_stats_row + k: the forward's (lse_s, lse_t, c)
    grad_loss_ptr,       # *fp32 [N]; element r at r * stride_gloss (0 if broadcast)
    grad_ptr,            # *{student dtype} [N, V] contiguous (output): d(sum_r grad_loss[r] loss[r]) / d student
    stride_student_row,  # int: elements between consecutive rows of student (>= V)
    stride_teacher_row,  # int: elements between consecutive rows of teacher (>= V)
    stride_labels,       # int: elements between consecutive labels
    stride_stats_row,    # int: elements between consecutive rows of stats
    stride_gloss,        # int: elements between consecutive entries of grad_loss
    V,                   # int: vocabulary size; also the row stride of grad
    inv_t,               # fp32: 1 / temperature
    w,                   # fp32: JSD's beta or the skew alpha
    log_w,               # fp32: log(w), -inf for w == 0
    log_1mw,             # fp32: log(1 - w), -inf for w == 1
    ignore_index,        # int: label value that marks a skipped row
    BLOCK_V: tl.constexpr,     # vocabulary tile, power of two
    DIV: tl.constexpr,         # divergence code, as in the forward
    HAS_LABELS: tl.constexpr,  # labels are given (else no row is skipped)
):
    """Per row r, with ``ls = s - lse_s``, ``lt = t - lse_t``, ``p = exp(ls)``, ``q = exp(lt)``:
    ``grad[r, j] = (grad_loss[r] * inv_t) * (p_j - q_j)`` (forward KL) or
    ``(grad_loss[r] * inv_t) * p_j (G_j - c)`` (0 where ``p_j == 0``); 0 for skipped rows.
    """
    # fp32 whatever the launch typed them (inductor types Python floats of user kernels as fp64)
    inv_t = tl.cast(inv_t, tl.float32)
    w = tl.cast(w, tl.float32)
    log_w = tl.cast(log_w, tl.float32)
    log_1mw = tl.cast(log_1mw, tl.float32)
    row = tl.program_id(0).to(tl.int64)
    student_row = student_ptr + row * stride_student_row
    teacher_row = teacher_ptr + row * stride_teacher_row
    grad_row = grad_ptr + row * V
    valid = _row_valid(labels_ptr, row, stride_labels, ignore_index, HAS_LABELS)
    stats_row = stats_ptr + row * stride_stats_row
    lse_s = tl.load(stats_row)
    lse_t = tl.load(stats_row + 1)
    c = tl.load(stats_row + 2)
    scale = tl.load(grad_loss_ptr + row * stride_gloss) * inv_t

    v_read = tl.where(valid, V, 0)  # skipped rows do not read their logits, only write zeros
    offs = tl.arange(0, BLOCK_V)
    for start in range(0, V, BLOCK_V):
        cols = start + offs
        rmask = cols < v_read
        s = tl.load(student_row + cols, mask=rmask, other=float("-inf")).to(tl.float32) * inv_t
        t = tl.load(teacher_row + cols, mask=rmask, other=float("-inf")).to(tl.float32) * inv_t
        ls = s - lse_s
        lt = t - lse_t
        p = tl.exp(ls)
        if DIV == _FORWARD_KL:
            ds = p - tl.exp(lt)
        else:
            ds = tl.where(p > 0.0, p * (_grad_terms(ls, lt, p, w, log_w, log_1mw, DIV) - c), 0.0)
        ds = tl.where(valid, ds * scale, 0.0)
        tl.store(grad_row + cols, ds.to(grad_ptr.dtype.element_ty), mask=cols < V)


# ----------------------------------------------------------------------------------------------
# launchers
# ----------------------------------------------------------------------------------------------


def launch_config(vocab: int) -> Tuple[int, int]:
    """(BLOCK_V, num_warps) for a vocabulary of ``vocab`` columns, shared by both kernels.

    BLOCK_V = next_pow2(vocab) clamped to [16, MAX_BLOCK_V]; num_warps keeps ~8-16 values per
    thread per tile (4096 -> 8 warps, 1024..2048 -> 4, 256..512 -> 2, smaller -> 1).
    """
    block_v = min(max(triton.next_power_of_2(max(int(vocab), 1)), 16), MAX_BLOCK_V)
    if block_v >= 4096:
        num_warps = 8
    elif block_v >= 1024:
        num_warps = 4
    elif block_v >= 256:
        num_warps = 2
    else:
        num_warps = 1
    return block_v, num_warps


def effective_divergence(divergence: int, beta: float) -> int:
    """The kernel's divergence code: ``jsd`` with ``beta`` 0 / 1 is forward / reverse KL (TRL)."""
    if divergence == DIVERGENCE_CODES["jsd"] and beta == 0.0:
        return DIVERGENCE_CODES["forward_kl"]
    if divergence == DIVERGENCE_CODES["jsd"] and beta == 1.0:
        return DIVERGENCE_CODES["reverse_kl"]
    return divergence


def _device_ctx(t: torch.Tensor):
    # launch on the tensor's device, not the current one (no host sync)
    return torch.cuda.device(t.device) if t.is_cuda else contextlib.nullcontext()


_FLOATS = (torch.float32, torch.bfloat16, torch.float16)


def _check_logits(t: torch.Tensor, name: str, shape: Optional[Tuple[int, int]] = None,
                  device: Optional[torch.device] = None) -> torch.Tensor:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(t).__name__}")
    if t.dim() != 2:
        raise ValueError(f"{name}: expected shape [N, V] (2 dims), got {tuple(t.shape)}")
    if shape is not None and tuple(t.shape) != shape:
        raise ValueError(f"{name}: expected shape {shape} (the student's), got {tuple(t.shape)}")
    if t.dtype not in _FLOATS:
        raise TypeError(f"{name}: expected dtype float32, bfloat16 or float16, got {t.dtype}")
    if device is not None and t.device != device:
        raise ValueError(f"{name}: expected a tensor on {device} (the student's device), got {t.device}")
    if t.shape[1] < 1:
        raise ValueError(f"{name}: expected a vocabulary of at least 1 column, got V={t.shape[1]}")
    if t.stride(1) != 1:
        t = t.contiguous()
    return t


def _check_inputs(student, teacher, labels):
    student = _check_logits(student, "student")
    teacher = _check_logits(teacher, "teacher", tuple(student.shape), student.device)
    n = student.shape[0]
    if labels is not None:
        if not isinstance(labels, torch.Tensor):
            raise TypeError(f"labels: expected a torch.Tensor or None, got {type(labels).__name__}")
        if tuple(labels.shape) != (n,):
            raise ValueError(f"labels: expected shape ({n},), got {tuple(labels.shape)}")
        if labels.dtype.is_floating_point or labels.dtype.is_complex or labels.dtype == torch.bool:
            raise TypeError(f"labels: expected an integer dtype (int64), got {labels.dtype}")
        if labels.device != student.device:
            raise ValueError(f"labels: expected a tensor on {student.device}, got {labels.device}")
        labels = labels.to(torch.int64)
    return student, teacher, labels


def _divergence_args(divergence: int, beta: float) -> Tuple[int, float, float, float]:
    """(kernel code, w, log w, log(1 - w)) with -inf for a zero weight."""
    if isinstance(divergence, str):
        if divergence not in DIVERGENCE_CODES:
            raise ValueError(f"divergence: expected one of {sorted(DIVERGENCE_CODES)}, got {divergence!r}")
        divergence = DIVERGENCE_CODES[divergence]
    if int(divergence) not in DIVERGENCE_CODES.values():
        raise ValueError(f"divergence: expected a code in {sorted(DIVERGENCE_CODES.values())}, got {divergence!r}")
    w = float(beta)
    code = effective_divergence(int(divergence), w)
    if code in (DIVERGENCE_CODES["jsd"], DIVERGENCE_CODES["skew_kl"], DIVERGENCE_CODES["skew_reverse_kl"]) \
            and not 0.0 <= w <= 1.0:
        raise ValueError(f"beta: expected a value in [0, 1], got {beta!r}")
    log_w = math.log(w) if w > 0.0 else float("-inf")
    log_1mw = math.log1p(-w) if w < 1.0 else float("-inf")
    return code, w, log_w, log_1mw


def distill_forward(student: torch.Tensor, teacher: torch.Tensor, labels: Optional[torch.Tensor],
                    ignore_index: int, divergence: int, beta: float,
                    inv_temperature: float) -> Tuple[torch.Tensor, torch.Tensor]:
    """Per-row divergence between ``softmax(student * inv_t)`` and ``softmax(teacher * inv_t)``.

    student, teacher ``[N, V]`` fp32/bf16/fp16 (unit column stride, any row stride); labels int64
    ``[N]`` or None; ``divergence`` a code of ``DIVERGENCE_CODES`` (or its name); ``beta`` JSD's
    beta or the skew alpha. Returns new fp32 ``(loss [N], stats [N, 3])``, ``stats = (lse_s, lse_t,
    c)``; 0 for rows whose label is ``ignore_index``.
    """
    student, teacher, labels = _check_inputs(student, teacher, labels)
    code, w, log_w, log_1mw = _divergence_args(divergence, beta)
    n, v = student.shape
    dev = student.device
    loss = torch.empty((n,), dtype=torch.float32, device=dev)
    stats = torch.empty((n, NUM_STATS), dtype=torch.float32, device=dev)
    if n == 0:
        return loss, stats
    block_v, num_warps = launch_config(v)
    with _device_ctx(student):
        wrap_triton(_distill_fwd_kernel)[(n,)](
            student, teacher, labels if labels is not None else unused_pointer(dev), loss, stats,
            student.stride(0), teacher.stride(0), labels.stride(0) if labels is not None else 0,
            v, float(inv_temperature), w, log_w, log_1mw, int(ignore_index),
            BLOCK_V=block_v, DIV=code, HAS_LABELS=labels is not None, num_warps=num_warps,
        )
    return loss, stats


def _grad_buffer(student: torch.Tensor, out: Optional[torch.Tensor]) -> torch.Tensor:
    """The gradient's destination: new, or ``out`` (contiguous, the student's shape and dtype)."""
    if out is None:
        return torch.empty(student.shape, dtype=student.dtype, device=student.device)
    if not isinstance(out, torch.Tensor):
        raise TypeError(f"out: expected a torch.Tensor or None, got {type(out).__name__}")
    if out.shape != student.shape or out.dtype != student.dtype or not out.is_contiguous() \
            or out.device != student.device:
        raise ValueError(f"out: expected a contiguous {tuple(student.shape)} {student.dtype} tensor on "
                         f"{student.device}, got {tuple(out.shape)} {out.dtype} on {out.device} "
                         f"(contiguous={out.is_contiguous()})")
    return out


def distill_backward(student: torch.Tensor, teacher: torch.Tensor, labels: Optional[torch.Tensor],
                     ignore_index: int, divergence: int, beta: float, inv_temperature: float,
                     stats: torch.Tensor, grad_loss: torch.Tensor,
                     out: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Gradient of ``sum_r grad_loss[r] * loss[r]`` w.r.t. ``student``; ``stats`` is the forward's.

    ``grad_loss [N]`` (any float dtype, may be a broadcast view). Returns a new contiguous
    ``[N, V]`` tensor in the student's dtype, or ``out`` (contiguous, the student's shape and
    dtype): ``grad_loss * inv_t * dL/ds``, 0 for rows whose label is ``ignore_index``.
    """
    student, teacher, labels = _check_inputs(student, teacher, labels)
    code, w, log_w, log_1mw = _divergence_args(divergence, beta)
    n, v = student.shape
    if not isinstance(stats, torch.Tensor) or tuple(stats.shape) != (n, NUM_STATS):
        got = tuple(stats.shape) if isinstance(stats, torch.Tensor) else type(stats).__name__
        raise ValueError(f"stats: expected the forward's ({n}, {NUM_STATS}) tensor, got {got}")
    stats = stats.to(torch.float32)
    if stats.stride(1) != 1:
        stats = stats.contiguous()
    if not isinstance(grad_loss, torch.Tensor) or tuple(grad_loss.shape) != (n,):
        got = tuple(grad_loss.shape) if isinstance(grad_loss, torch.Tensor) else type(grad_loss).__name__
        raise ValueError(f"grad_loss: expected shape ({n},), got {got}")
    grad_loss = grad_loss.to(torch.float32)
    grad = _grad_buffer(student, out)
    if n == 0:
        return grad
    block_v, num_warps = launch_config(v)
    with _device_ctx(student):
        wrap_triton(_distill_bwd_kernel)[(n,)](
            student, teacher, labels if labels is not None else stats, stats, grad_loss, grad,
            student.stride(0), teacher.stride(0), labels.stride(0) if labels is not None else 0,
            stats.stride(0), grad_loss.stride(0),
            v, float(inv_temperature), w, log_w, log_1mw, int(ignore_index),
            BLOCK_V=block_v, DIV=code, HAS_LABELS=labels is not None, num_warps=num_warps,
        )
    return grad


# ----------------------------------------------------------------------------------------------
# ahead-of-time compilation specs (tests/test_triton_aot.py)
# ----------------------------------------------------------------------------------------------




def aot_specs(vocab: int = 128256,
              dtypes=("bf16", "fp32")) -> List[Tuple[object, Dict[str, str], Dict[str, object], int]]:
    """``(kernel, signature, constexprs, num_warps)`` for both kernels and every divergence code,
    with labels (the superset of the label-free variant), for bf16 and fp32 student and teacher
    logits, with the BLOCK_V / num_warps the launchers pick at ``vocab``. Same format and usage as
    ``posttrain_kernels.kernels.token_logprobs.aot_specs``: contiguous labels and upstream
    gradients give unit strides, which the JIT turns into constexpr 1 (the stats have row stride 3).
    """
    block_v, num_warps = launch_config(vocab)
    specs = []
    for dt in dtypes:
        lg = "*" + dt
        for code in sorted(DIVERGENCE_CODES.values()):
            sig, consts = jit_like({
                "student_ptr": lg, "teacher_ptr": lg, "labels_ptr": "*i64", "loss_ptr": "*fp32",
                "stats_ptr": "*fp32", "stride_student_row": "i32", "stride_teacher_row": "i32",
                "stride_labels": "i32", "V": "i32", "inv_t": "fp32", "w": "fp32", "log_w": "fp32",
                "log_1mw": "fp32", "ignore_index": "i32",
                "BLOCK_V": "constexpr", "DIV": "constexpr", "HAS_LABELS": "constexpr",
            }, ("stride_labels",))
            consts.update(BLOCK_V=block_v, DIV=code, HAS_LABELS=True)
            specs.append((_distill_fwd_kernel, sig, consts, num_warps))
            sig, consts = jit_like({
                "student_ptr": lg, "teacher_ptr": lg, "labels_ptr": "*i64", "stats_ptr": "*fp32",
                "grad_loss_ptr": "*fp32", "grad_ptr": lg, "stride_student_row": "i32",
                "stride_teacher_row": "i32", "stride_labels": "i32", "stride_stats_row": "i32",
                "stride_gloss": "i32", "V": "i32", "inv_t": "fp32", "w": "fp32", "log_w": "fp32",
                "log_1mw": "fp32", "ignore_index": "i32",
                "BLOCK_V": "constexpr", "DIV": "constexpr", "HAS_LABELS": "constexpr",
            }, ("stride_labels", "stride_gloss"))
            consts.update(BLOCK_V=block_v, DIV=code, HAS_LABELS=True)
            specs.append((_distill_bwd_kernel, sig, consts, num_warps))
    return specs
