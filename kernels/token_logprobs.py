"""Triton kernels of the token log-prob family: token log-probs (+ entropy) and SFT cross-entropy.

Layout of every kernel: one program per row of ``logits [N, V]`` on grid axis 0 (axis 0 takes up to
2^31 - 1 programs; axes 1/2 stop at 65535), streaming over the vocabulary in ``BLOCK_V`` tiles.
Row offsets are computed in int64 (``row * stride`` can pass 2^31 for tokens x vocab tensors).
Logits may be fp32 / bf16 / fp16; they are upcast to fp32 on load and every accumulation is fp32.

Forward (each logit read once): online log-sum-exp with running max ``m`` (initialised to -inf),
running sum ``s = sum_j exp(x_j - m)`` and, for the entropy, ``t = sum_j exp(x_j - m) (x_j - m)``;
when the running max moves from ``m`` to ``m'`` they are rescaled by ``alpha = exp(m - m')``:
``s <- alpha s``, ``t <- alpha (t + s (m - m'))``. Then ``lse = m + log s`` and
``H = lse - sum_j p_j x_j = log s - t / s``.  (``t`` is kept relative to the running max, i.e. it is
the spec's ``t_raw = sum_j exp(x_j - m) x_j`` minus ``m s``; same formula, but it does not cancel
``m`` against ``t_raw / s`` when ``|x| ~ 1e4``.)  Log-probs are ``(x_y - m) - log s`` for the same
reason.

Backward (each logit read once, each gradient element written once): ``p_j = exp(x_j - lse)`` is
recomputed from the saved ``lse``; no second reduction over the vocabulary is needed.

Launchers allocate every output (never write into an input, except the backward's ``out`` and the
fused cross-entropy's logits, which the fused-linear losses pass as their own chunk buffer), pick ``BLOCK_V`` / ``num_warps`` and
launch; they never synchronize with the host. Autograd lives in ``posttrain_kernels.ops``.
"""
from __future__ import annotations

import contextlib
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
    "token_logprobs_forward",
    "token_logprobs_backward",
    "cross_entropy_forward",
    "cross_entropy_backward",
    "cross_entropy_fused",
    "launch_config",
    "aot_specs",
]

# Largest vocabulary tile. 4096 fp32 per tile over 8 warps = 16 values per thread per live tile,
# which keeps every kernel below far from the register limit (see tests/test_triton_aot.py).
MAX_BLOCK_V = 4096


# ----------------------------------------------------------------------------------------------
# device helpers
# ----------------------------------------------------------------------------------------------


@triton.jit
def _tanh(u):
    """tanh(u) in fp32 from exp only (libdevice is not available under TRITON_INTERPRET=1).

    |u| < 0.25: odd Taylor polynomial to u^9 (truncation < 1e-8 relative);
    otherwise sign(u) * (1 - e) / (1 + e), e = exp(-2|u|) (no cancellation there; -> +-1, never nan,
    for u = +-inf).
    """
    a = tl.abs(u)
    e = tl.exp(-2.0 * a)
    big = (1.0 - e) / (1.0 + e)
    a2 = a * a
    # tanh(a) = a - a^3/3 + 2a^5/15 - 17a^7/315 + 62a^9/2835 - ...
    small = a * (1.0 + a2 * (-0.333333333333 + a2 * (0.133333333333
                                                     + a2 * (-0.053968253968 + a2 * 0.021869488536))))
    r = tl.where(a < 0.25, small, big)
    return tl.where(u < 0.0, -r, r)


@triton.jit
def _count_valid_labels(
    labels_row,        # *int64: first label of this row
    stride_labels_k,   # int: elements between consecutive labels of a row
    K,                 # int: labels per row
    ignore_index,      # int: label value that marks an ignored label
):
    """Number of labels of the row that are not ``ignore_index`` (int32 scalar)."""
    n_valid = tl.full([], 0, tl.int32)
    for k in range(0, K):
        lab = tl.load(labels_row + k * stride_labels_k)
        n_valid += (lab != ignore_index).to(tl.int32)
    return n_valid


# ----------------------------------------------------------------------------------------------
# token log-probs (+ entropy)
# ----------------------------------------------------------------------------------------------


@triton.jit
def _token_logprobs_fwd_kernel(
    logits_ptr,         # *{fp32|bf16|fp16} [N, V]; element (r, j) at r * stride_logits_row + j
    labels_ptr,         # *int64 [N, K]; element (r, k) at r * stride_labels_row + k * stride_labels_k
    logp_ptr,           # *fp32 [N, K] contiguous (output): x[y_k] - lse, 0 for ignored labels
    entropy_ptr,        # *fp32 [N] contiguous (output, written only if HAS_ENTROPY): lse - sum p x
    lse_ptr,            # *fp32 [N] contiguous (output): logsumexp_j x_j, 0 for ignored rows
    stride_logits_row,  # int: elements between consecutive rows of logits (>= V)
    stride_labels_row,  # int: elements between consecutive rows of labels
    stride_labels_k,    # int: elements between consecutive labels of a row
    V,                  # int: vocabulary size (columns of logits)
    K,                  # int: labels per row
    inv_t,              # fp32: 1 / temperature; x_j = logits_j * inv_t
    ignore_index,       # int: label value that marks an ignored label
    BLOCK_V: tl.constexpr,      # vocabulary tile, power of two
    HAS_ENTROPY: tl.constexpr,  # also compute and store the entropy of the row
):
    """Per row r: ``x = logits[r] * inv_t``, ``lse = logsumexp(x)``,
    ``logp[r, k] = x[y_k] - lse`` (0 where ``y_k == ignore_index``),
    ``entropy[r] = lse - sum_j p_j x_j`` with ``p = exp(x - lse)``.
    Rows whose labels are all ignored are skipped: logp 0, entropy 0, lse 0.
    """
    # fp32 whatever the launch typed them (inductor types Python floats of user kernels as fp64)
    inv_t = tl.cast(inv_t, tl.float32)
    row = tl.program_id(0).to(tl.int64)
    logits_row = logits_ptr + row * stride_logits_row
    labels_row = labels_ptr + row * stride_labels_row

    row_valid = _count_valid_labels(labels_row, stride_labels_k, K, ignore_index) > 0
    v_end = tl.where(row_valid, V, 0)  # ignored rows do not read their logits

    offs = tl.arange(0, BLOCK_V)
    m = tl.full([], float("-inf"), tl.float32)  # running max
    s = tl.full([], 0.0, tl.float32)            # sum exp(x - m)
    t = tl.full([], 0.0, tl.float32)            # sum exp(x - m) (x - m)
    for start in range(0, v_end, BLOCK_V):
        cols = start + offs
        x = tl.load(logits_row + cols, mask=cols < V, other=float("-inf")).to(tl.float32) * inv_t
        m_new = tl.maximum(m, tl.max(x, axis=0))
        # while every x seen is -inf, shift by 0 instead: exp(-inf - -inf) would be nan
        m_ref = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp(m - m_ref)
        d = x - m_ref
        e = tl.exp(d)
        if HAS_ENTROPY:
            # p == 0 terms (x = -inf) contribute 0, not 0 * -inf; so does the shift while s == 0
            t = alpha * (t + s * (tl.where(s > 0.0, m, m_ref) - m_ref)) \
                + tl.sum(e * tl.where(e > 0.0, d, 0.0), axis=0)
        s = s * alpha + tl.sum(e, axis=0)
        m = m_new

    # ignored rows (loop skipped): m = 0, s = 1 instead of -inf, 0 -- no inf or nan below
    m = tl.where(row_valid, m, 0.0)
    s = tl.where(row_valid, s, 1.0)
    log_s = tl.log(s)
    tl.store(lse_ptr + row, tl.where(row_valid, m + log_s, 0.0))
    if HAS_ENTROPY:
        tl.store(entropy_ptr + row, tl.where(row_valid, log_s - t / s, 0.0))
    for k in range(0, K):
        lab = tl.load(labels_row + k * stride_labels_k)
        keep = lab != ignore_index
        # an out-of-range label (unchecked only under torch.compile / on the GPU) is never read:
        # its log-prob is nan, as in the CPU and CUDA kernels, so the error shows
        in_range = (lab >= 0) & (lab < V)
        x_y = tl.load(logits_row + lab, mask=keep & in_range, other=float("nan")).to(tl.float32) * inv_t
        tl.store(logp_ptr + row * K + k, tl.where(keep, (x_y - m) - log_s, 0.0))


@triton.jit
def _token_logprobs_bwd_kernel(
    logits_ptr,         # *{fp32|bf16|fp16} [N, V]; element (r, j) at r * stride_logits_row + j
    labels_ptr,         # *int64 [N, K]; element (r, k) at r * stride_labels_row + k * stride_labels_k
    lse_ptr,            # *fp32 [N] contiguous: lse saved by the forward
    entropy_ptr,        # *fp32 [N] contiguous: entropy saved by the forward (read only if HAS_GRAD_ENTROPY)
    grad_logp_ptr,      # *fp32 [N, K]; (r, k) at r * stride_glogp_row + k * stride_glogp_k (if HAS_GRAD_LOGP)
    grad_entropy_ptr,   # *fp32 [N]; element r at r * stride_gent (read only if HAS_GRAD_ENTROPY)
    grad_logits_ptr,    # *{logits dtype} [N, V] contiguous (output)
    stride_logits_row,  # int: elements between consecutive rows of logits (>= V)
    stride_labels_row,  # int: elements between consecutive rows of labels
    stride_labels_k,    # int: elements between consecutive labels of a row
    stride_glogp_row,   # int: elements between consecutive rows of grad_logp (0 if broadcast)
    stride_glogp_k,     # int: elements between consecutive columns of grad_logp (0 if broadcast)
    stride_gent,        # int: elements between consecutive entries of grad_entropy (0 if broadcast)
    V,                  # int: vocabulary size; also the row stride of grad_logits
    K,                  # int: labels per row
    inv_t,              # fp32: 1 / temperature
    ignore_index,       # int: label value that marks an ignored label
    BLOCK_V: tl.constexpr,           # vocabulary tile, power of two
    HAS_GRAD_LOGP: tl.constexpr,     # grad_logp is given (else zeros)
    HAS_GRAD_ENTROPY: tl.constexpr,  # grad_entropy is given (else zeros)
):
    """Per row r, with ``p = exp(x - lse)``, ``g = grad_logp[r]`` (ignored labels count 0),
    ``G = sum_k g_k``, ``gH = grad_entropy[r]``, ``H = entropy[r]``:
    ``grad_logits[r, j] = inv_t * (sum_k g_k [j == y_k] - G p_j - gH p_j (x_j - lse + H))``,
    the gH term being 0 where ``p_j == 0``; rows whose labels are all ignored get 0.
    """
    # fp32 whatever the launch typed them (inductor types Python floats of user kernels as fp64)
    inv_t = tl.cast(inv_t, tl.float32)
    row = tl.program_id(0).to(tl.int64)
    logits_row = logits_ptr + row * stride_logits_row
    labels_row = labels_ptr + row * stride_labels_row
    grad_row = grad_logits_ptr + row * V

    n_valid = tl.full([], 0, tl.int32)
    G = tl.full([], 0.0, tl.float32)
    for k in range(0, K):
        lab = tl.load(labels_row + k * stride_labels_k)
        keep = lab != ignore_index
        n_valid += keep.to(tl.int32)
        if HAS_GRAD_LOGP:
            g = tl.load(grad_logp_ptr + row * stride_glogp_row + k * stride_glogp_k)
            G += tl.where(keep, g, 0.0)
    row_valid = n_valid > 0
    lse = tl.load(lse_ptr + row)
    if HAS_GRAD_ENTROPY:
        gH = tl.load(grad_entropy_ptr + row * stride_gent)
        lse_minus_h = lse - tl.load(entropy_ptr + row)

    v_read = tl.where(row_valid, V, 0)  # ignored rows do not read their logits, only write zeros
    offs = tl.arange(0, BLOCK_V)
    for start in range(0, V, BLOCK_V):
        cols = start + offs
        mask = cols < V
        x = tl.load(logits_row + cols, mask=cols < v_read, other=float("-inf")).to(tl.float32) * inv_t
        p = tl.exp(x - lse)
        dx = tl.zeros([BLOCK_V], dtype=tl.float32)
        if HAS_GRAD_ENTROPY:
            dx -= gH * p * tl.where(p > 0.0, x - lse_minus_h, 0.0)  # 0, not 0 * -inf, where p == 0
        if HAS_GRAD_LOGP:
            dx -= G * p
            # one-hot terms, compared against the tile-local offsets (x, p are dead by now)
            for k in range(0, K):
                lab = tl.load(labels_row + k * stride_labels_k)
                g = tl.load(grad_logp_ptr + row * stride_glogp_row + k * stride_glogp_k)
                g = tl.where(lab != ignore_index, g, 0.0)
                dx += tl.where(offs == lab - start, g, 0.0)
        dx = tl.where(row_valid, dx * inv_t, 0.0)
        tl.store(grad_row + cols, dx.to(grad_logits_ptr.dtype.element_ty), mask=mask)


# ----------------------------------------------------------------------------------------------
# cross-entropy (label smoothing, z-loss, soft-capping)
# ----------------------------------------------------------------------------------------------


@triton.jit
def _cross_entropy_row_forward(
    logits_row,         # *{fp32|bf16|fp16}: the row's first logit (unit stride along V)
    lab,                # int64: the row's label
    row_valid,          # bool: lab != ignore_index
    V, label_smoothing, z_loss, softcap, inv_softcap,
    BLOCK_V: tl.constexpr, HAS_SOFTCAP: tl.constexpr,
):
    """(loss, lse) of one row, each logit read once; (0, 0) for an ignored row (nothing read)."""
    v_end = tl.where(row_valid, V, 0)  # ignored rows do not read their logits
    offs = tl.arange(0, BLOCK_V)
    m = tl.full([], float("-inf"), tl.float32)  # running max
    s = tl.full([], 0.0, tl.float32)            # sum exp(x - m)
    sum_x = tl.full([], 0.0, tl.float32)        # sum x (label smoothing)
    for start in range(0, v_end, BLOCK_V):
        cols = start + offs
        mask = cols < V
        x = tl.load(logits_row + cols, mask=mask, other=float("-inf")).to(tl.float32)
        if HAS_SOFTCAP:
            x = tl.where(mask, softcap * _tanh(x * inv_softcap), float("-inf"))
        sum_x += tl.sum(tl.where(mask, x, 0.0), axis=0)
        m_new = tl.maximum(m, tl.max(x, axis=0))
        m_ref = tl.where(m_new == float("-inf"), 0.0, m_new)  # no exp(-inf - -inf)
        s = s * tl.exp(m - m_ref) + tl.sum(tl.exp(x - m_ref), axis=0)
        m = m_new

    # ignored rows (loop skipped): m = 0, s = 1 instead of -inf, 0 -- no inf or nan below
    m = tl.where(row_valid, m, 0.0)
    log_s = tl.log(tl.where(row_valid, s, 1.0))
    lse = m + log_s
    # out-of-range labels are never read: nan, as in the CPU and CUDA kernels; ignored rows read 0
    in_range = row_valid & (lab >= 0) & (lab < V)
    x_y = tl.load(logits_row + lab, mask=in_range, other=tl.where(row_valid, float("nan"), 0.0)).to(tl.float32)
    if HAS_SOFTCAP:
        x_y = softcap * _tanh(x_y * inv_softcap)
    loss = (1.0 - label_smoothing) * ((m - x_y) + log_s)
    # guarded: with eps == 0 a -inf logit must not turn 0 * inf into nan
    loss += label_smoothing * tl.where(label_smoothing > 0.0, (m - sum_x / V) + log_s, 0.0)
    loss += z_loss * lse * lse
    return tl.where(row_valid, loss, 0.0), tl.where(row_valid, lse, 0.0)


@triton.jit
def _cross_entropy_row_backward(
    logits_row,         # *{fp32|bf16|fp16}: the row's first logit (unit stride along V)
    grad_row,           # *{logits dtype}: the row's first gradient element; may equal logits_row
    lab, row_valid, lse,
    g,                  # fp32: upstream gradient of the row's loss
    V, label_smoothing,
    eps_per_class,      # fp32: eps / V_s, V_s the row's full width (the logits may be a column block)
    z_loss, softcap, inv_softcap,
    BLOCK_V: tl.constexpr, HAS_SOFTCAP: tl.constexpr,
):
    """grad_row = g * d loss / d logits_row, tile by tile; each tile is loaded before it is
    stored, so the gradient may be written over the logits (in place)."""
    p_scale = g * (1.0 + 2.0 * z_loss * lse)
    g_label = g * (1.0 - label_smoothing)
    g_smooth = g * eps_per_class
    v_read = tl.where(row_valid, V, 0)  # ignored rows do not read their logits, only write zeros
    offs = tl.arange(0, BLOCK_V)
    for start in range(0, V, BLOCK_V):
        cols = start + offs
        mask = cols < V
        x = tl.load(logits_row + cols, mask=cols < v_read, other=float("-inf")).to(tl.float32)
        if HAS_SOFTCAP:
            th = _tanh(x * inv_softcap)
            x = softcap * th
        dx = p_scale * tl.exp(x - lse) - tl.where(cols == lab, g_label, 0.0) - g_smooth
        if HAS_SOFTCAP:
            dx = dx * (1.0 - th * th)
        dx = tl.where(row_valid, dx, 0.0)
        tl.store(grad_row + cols, dx.to(grad_row.dtype.element_ty), mask=mask)


@triton.jit
def _cross_entropy_fwd_kernel(
    logits_ptr,         # *{fp32|bf16|fp16} [N, V]; element (r, j) at r * stride_logits_row + j
    labels_ptr,         # *int64 [N]; element r at r * stride_labels
    loss_ptr,           # *fp32 [N] contiguous (output), 0 for ignored rows
    lse_ptr,            # *fp32 [N] contiguous (output): logsumexp_j x_j, 0 for ignored rows
    stride_logits_row,  # int: elements between consecutive rows of logits (>= V)
    stride_labels,      # int: elements between consecutive labels
    V,                  # int: vocabulary size (columns of logits)
    ignore_index,       # int: label value that marks an ignored row
    label_smoothing,    # fp32: eps in [0, 1]
    z_loss,             # fp32: z, coefficient of lse^2
    softcap,            # fp32: c (read only if HAS_SOFTCAP)
    inv_softcap,        # fp32: 1 / c (read only if HAS_SOFTCAP)
    BLOCK_V: tl.constexpr,      # vocabulary tile, power of two
    HAS_SOFTCAP: tl.constexpr,  # x = c tanh(logits / c) instead of x = logits
):
    """Per row r: ``x = c tanh(logits[r] / c)`` (or ``logits[r]``), ``lse = logsumexp(x)``,
    ``loss[r] = (1 - eps)(lse - x_y) + eps (lse - sum_j x_j / V) + z lse^2``; 0 where y is ignored.
    """
    # fp32 whatever the launch typed them (inductor types Python floats of user kernels as fp64)
    label_smoothing = tl.cast(label_smoothing, tl.float32)
    z_loss = tl.cast(z_loss, tl.float32)
    softcap = tl.cast(softcap, tl.float32)
    inv_softcap = tl.cast(inv_softcap, tl.float32)
    row = tl.program_id(0).to(tl.int64)
    lab = tl.load(labels_ptr + row * stride_labels)
    loss, lse = _cross_entropy_row_forward(
        logits_ptr + row * stride_logits_row, lab, lab != ignore_index, V, label_smoothing, z_loss,
        softcap, inv_softcap, BLOCK_V, HAS_SOFTCAP)
    tl.store(loss_ptr + row, loss)
    tl.store(lse_ptr + row, lse)


@triton.jit
def _cross_entropy_bwd_kernel(
    logits_ptr,         # *{fp32|bf16|fp16} [N, V]; element (r, j) at r * stride_logits_row + j
    labels_ptr,         # *int64 [N]; element r at r * stride_labels
    lse_ptr,            # *fp32 [N] contiguous: lse saved by the forward
    grad_loss_ptr,      # *fp32 [N]; element r at r * stride_gloss (0 if broadcast)
    grad_logits_ptr,    # *{logits dtype} [N, V] contiguous (output; may be logits_ptr)
    stride_logits_row,  # int: elements between consecutive rows of logits (>= V)
    stride_labels,      # int: elements between consecutive labels
    stride_gloss,       # int: elements between consecutive entries of grad_loss
    V,                  # int: vocabulary size; also the row stride of grad_logits
    ignore_index,       # int: label value that marks an ignored row
    label_smoothing,    # fp32: eps
    eps_per_class,      # fp32: eps / V_s (V_s = V, or the full width when logits are a column block)
    z_loss,             # fp32: z
    softcap,            # fp32: c (read only if HAS_SOFTCAP)
    inv_softcap,        # fp32: 1 / c (read only if HAS_SOFTCAP)
    BLOCK_V: tl.constexpr,      # vocabulary tile, power of two
    HAS_SOFTCAP: tl.constexpr,  # x = c tanh(logits / c) instead of x = logits
):
    """Per row r, with ``p = exp(x - lse)``, ``g = grad_loss[r]``:
    ``grad_logits[r, j] = g (p_j (1 + 2 z lse) - (1 - eps)[j == y] - eps / V_s) * (1 - (x_j / c)^2)``
    (the last factor only with soft-capping); ignored rows get 0; a label outside [0, V) adds no
    one-hot term (the row's label lies in another column block).
    """
    # fp32 whatever the launch typed them (inductor types Python floats of user kernels as fp64)
    label_smoothing = tl.cast(label_smoothing, tl.float32)
    eps_per_class = tl.cast(eps_per_class, tl.float32)
    z_loss = tl.cast(z_loss, tl.float32)
    softcap = tl.cast(softcap, tl.float32)
    inv_softcap = tl.cast(inv_softcap, tl.float32)
    row = tl.program_id(0).to(tl.int64)
    lab = tl.load(labels_ptr + row * stride_labels)
    _cross_entropy_row_backward(
        logits_ptr + row * stride_logits_row, grad_logits_ptr + row * V, lab, lab != ignore_index,
        tl.load(lse_ptr + row), tl.load(grad_loss_ptr + row * stride_gloss), V, label_smoothing,
        eps_per_class, z_loss, softcap, inv_softcap, BLOCK_V, HAS_SOFTCAP)


@triton.jit
def _cross_entropy_fused_kernel(
    logits_ptr,         # *{fp32|bf16|fp16} [N, V] contiguous; overwritten with the gradient
    labels_ptr,         # *int64 [N]; element r at r * stride_labels
    grad_loss_ptr,      # *fp32 [N]; element r at r * stride_gloss (0 if broadcast)
    loss_ptr,           # *fp32 [N] contiguous (output), 0 for ignored rows
    lse_ptr,            # *fp32 [N] contiguous (output), 0 for ignored rows
    stride_labels,      # int: elements between consecutive labels
    stride_gloss,       # int: elements between consecutive entries of grad_loss
    V,                  # int: vocabulary size; also the row stride of logits
    ignore_index,       # int: label value that marks an ignored row
    label_smoothing,    # fp32: eps
    z_loss,             # fp32: z
    softcap,            # fp32: c (read only if HAS_SOFTCAP)
    inv_softcap,        # fp32: 1 / c (read only if HAS_SOFTCAP)
    BLOCK_V: tl.constexpr,      # vocabulary tile, power of two
    HAS_SOFTCAP: tl.constexpr,  # x = c tanh(logits / c) instead of x = logits
):
    """The forward kernel's loss and lse, then the backward kernel's gradient written over the
    row (the chunk buffer of the fused-linear loss): the second pass reads the row while it is
    still in cache, and no second ``[N, V]`` buffer exists."""
    # fp32 whatever the launch typed them (inductor types Python floats of user kernels as fp64)
    label_smoothing = tl.cast(label_smoothing, tl.float32)
    z_loss = tl.cast(z_loss, tl.float32)
    softcap = tl.cast(softcap, tl.float32)
    inv_softcap = tl.cast(inv_softcap, tl.float32)
    row = tl.program_id(0).to(tl.int64)
    lab = tl.load(labels_ptr + row * stride_labels)
    row_valid = lab != ignore_index
    logits_row = logits_ptr + row * V
    loss, lse = _cross_entropy_row_forward(
        logits_row, lab, row_valid, V, label_smoothing, z_loss, softcap, inv_softcap, BLOCK_V,
        HAS_SOFTCAP)
    tl.store(loss_ptr + row, loss)
    tl.store(lse_ptr + row, lse)
    _cross_entropy_row_backward(
        logits_row, logits_row, lab, row_valid, lse, tl.load(grad_loss_ptr + row * stride_gloss),
        V, label_smoothing, label_smoothing / V, z_loss, softcap, inv_softcap, BLOCK_V, HAS_SOFTCAP)


# ----------------------------------------------------------------------------------------------
# launchers
# ----------------------------------------------------------------------------------------------


def launch_config(vocab: int) -> Tuple[int, int]:
    """(BLOCK_V, num_warps) for a vocabulary of ``vocab`` columns, shared by all four kernels.

    BLOCK_V = next_pow2(vocab) clamped to [16, 4096]; num_warps keeps ~8-16 values per thread
    per tile (4096 -> 8 warps, 1024..2048 -> 4, 256..512 -> 2, smaller -> 1).
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


def _device_ctx(t: torch.Tensor):
    # launch on the tensor's device, not the current one (no host sync)
    return torch.cuda.device(t.device) if t.is_cuda else contextlib.nullcontext()


def _check_logits(logits: torch.Tensor) -> torch.Tensor:
    if not isinstance(logits, torch.Tensor):
        raise TypeError(f"logits: expected a torch.Tensor, got {type(logits).__name__}")
    if logits.dim() != 2:
        raise ValueError(f"logits: expected shape [N, V] (2 dims), got {tuple(logits.shape)}")
    if logits.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise TypeError(f"logits: expected dtype float32, bfloat16 or float16, got {logits.dtype}")
    if logits.shape[1] < 1:
        raise ValueError(f"logits: expected a vocabulary of at least 1 column, got V={logits.shape[1]}")
    if logits.stride(1) != 1:
        logits = logits.contiguous()
    return logits


def _check_labels(labels: torch.Tensor, shape: Tuple[int, ...], name: str = "labels") -> torch.Tensor:
    if not isinstance(labels, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(labels).__name__}")
    if tuple(labels.shape) != tuple(shape):
        raise ValueError(f"{name}: expected shape {tuple(shape)}, got {tuple(labels.shape)}")
    if labels.dtype != torch.int64:
        if labels.dtype.is_floating_point or labels.dtype == torch.bool:
            raise TypeError(f"{name}: expected an integer dtype (int64), got {labels.dtype}")
        labels = labels.to(torch.int64)
    return labels


def _check_row_vector(t: torch.Tensor, n: int, name: str) -> torch.Tensor:
    if tuple(t.shape) != (n,):
        raise ValueError(f"{name}: expected shape ({n},), got {tuple(t.shape)}")
    return t.to(torch.float32)


def _check_logits_and_k_labels(logits: torch.Tensor, labels: torch.Tensor):
    """logits [N, V] and labels [N, K] of the token log-prob launchers, checked."""
    logits = _check_logits(logits)
    if labels.dim() != 2:
        raise ValueError(f"labels: expected shape [N, K] (2 dims), got {tuple(labels.shape)}")
    return logits, _check_labels(labels, (logits.shape[0], labels.shape[1]))


def token_logprobs_forward(
    logits: torch.Tensor,
    labels: torch.Tensor,
    inv_temperature: float,
    ignore_index: int,
    compute_entropy: bool,
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Token log-probs, entropy and log-sum-exp of ``softmax(logits * inv_temperature)``.

    logits ``[N, V]`` fp32/bf16/fp16 (unit column stride, any row stride); labels int64 ``[N, K]``.
    Returns newly allocated fp32 ``(logp [N, K], entropy [N] or torch.empty(0) when not computed,
    lse [N])``: ``logp[r, k] = x[y_k] - lse`` (0 for ignored labels), ``entropy = lse - sum p x``,
    ``x = logits * inv_temperature``; rows whose labels are all ``ignore_index`` get 0 everywhere.
    """
    logits, labels = _check_logits_and_k_labels(logits, labels)
    n, v = logits.shape
    k = labels.shape[1]
    dev = logits.device
    logp = torch.empty((n, k), dtype=torch.float32, device=dev)
    lse = torch.empty((n,), dtype=torch.float32, device=dev)
    entropy = torch.empty((n,) if compute_entropy else (0,), dtype=torch.float32, device=dev)
    if n == 0:
        return logp, entropy, lse
    block_v, num_warps = launch_config(v)
    with _device_ctx(logits):
        wrap_triton(_token_logprobs_fwd_kernel)[(n,)](
            logits, labels, logp, entropy if compute_entropy else unused_pointer(dev), lse,
            logits.stride(0), labels.stride(0), labels.stride(1),
            v, k, float(inv_temperature), int(ignore_index),
            BLOCK_V=block_v, HAS_ENTROPY=bool(compute_entropy), num_warps=num_warps,
        )
    return logp, entropy, lse


def token_logprobs_backward(
    logits: torch.Tensor,
    labels: torch.Tensor,
    lse: torch.Tensor,
    entropy: Optional[torch.Tensor],
    grad_logp: Optional[torch.Tensor],
    grad_entropy: Optional[torch.Tensor],
    inv_temperature: float,
    ignore_index: int,
    out: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Gradient of ``sum(grad_logp * logp) + sum(grad_entropy * entropy)`` w.r.t. ``logits``.

    ``lse`` / ``entropy`` are the forward's outputs (``entropy`` is needed only with
    ``grad_entropy``); ``grad_logp [N, K]`` / ``grad_entropy [N]`` may be None (zeros) and may be
    broadcast views (stride 0). Returns a new contiguous ``[N, V]`` tensor in ``logits.dtype``
    (or ``out``, which may be ``logits`` itself: in place):
    ``inv_T (sum_k g_k [j == y_k] - G p_j - gH p_j (x_j - lse + H))``, 0 for ignored rows.
    """
    logits, labels = _check_logits_and_k_labels(logits, labels)
    n, v = logits.shape
    k = labels.shape[1]
    lse = _check_row_vector(lse, n, "lse").contiguous()
    grad_logits = _grad_buffer(logits, out)
    if grad_logp is None and grad_entropy is None:
        return grad_logits.zero_()
    if grad_logp is not None:
        if tuple(grad_logp.shape) != (n, k):
            raise ValueError(f"grad_logp: expected shape ({n}, {k}), got {tuple(grad_logp.shape)}")
        grad_logp = grad_logp.to(torch.float32)
    if grad_entropy is not None:
        grad_entropy = _check_row_vector(grad_entropy, n, "grad_entropy")
        if entropy is None or entropy.numel() == 0:
            raise ValueError("entropy: the forward entropy is required when grad_entropy is given, got None")
        entropy = _check_row_vector(entropy, n, "entropy").contiguous()
    if n == 0:
        return grad_logits
    block_v, num_warps = launch_config(v)
    glogp = grad_logp if grad_logp is not None else lse  # placeholder, never read
    gent = grad_entropy if grad_entropy is not None else lse  # placeholder, never read
    ent = entropy if grad_entropy is not None else lse  # placeholder, never read
    with _device_ctx(logits):
        wrap_triton(_token_logprobs_bwd_kernel)[(n,)](
            logits, labels, lse, ent, glogp, gent, grad_logits,
            logits.stride(0), labels.stride(0), labels.stride(1),
            grad_logp.stride(0) if grad_logp is not None else 0,
            grad_logp.stride(1) if grad_logp is not None else 0,
            grad_entropy.stride(0) if grad_entropy is not None else 0,
            v, k, float(inv_temperature), int(ignore_index),
            BLOCK_V=block_v, HAS_GRAD_LOGP=grad_logp is not None,
            HAS_GRAD_ENTROPY=grad_entropy is not None, num_warps=num_warps,
        )
    return grad_logits


def _softcap_args(softcap: Optional[float]) -> Tuple[bool, float, float]:
    c = 0.0 if softcap is None else float(softcap)
    if c > 0.0:
        return True, c, 1.0 / c
    return False, 0.0, 0.0


def cross_entropy_forward(
    logits: torch.Tensor,
    labels: torch.Tensor,
    ignore_index: int,
    label_smoothing: float,
    z_loss: float,
    softcap: float,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Per-row SFT cross-entropy with label smoothing, z-loss and soft-capping (``softcap <= 0``: off).

    logits ``[N, V]`` fp32/bf16/fp16; labels int64 ``[N]``. Returns new fp32 ``(loss [N], lse [N])``:
    ``x = c tanh(logits / c)`` (or logits), ``lse = logsumexp(x)``,
    ``loss = (1 - eps)(lse - x_y) + eps (lse - mean_j x_j) + z lse^2``; 0 (and lse 0) for ignored rows.
    """
    logits = _check_logits(logits)
    n, v = logits.shape
    labels = _check_labels(labels, (n,))
    dev = logits.device
    loss = torch.empty((n,), dtype=torch.float32, device=dev)
    lse = torch.empty((n,), dtype=torch.float32, device=dev)
    if n == 0:
        return loss, lse
    has_softcap, c, inv_c = _softcap_args(softcap)
    block_v, num_warps = launch_config(v)
    with _device_ctx(logits):
        wrap_triton(_cross_entropy_fwd_kernel)[(n,)](
            logits, labels, loss, lse,
            logits.stride(0), labels.stride(0),
            v, int(ignore_index), float(label_smoothing), float(z_loss), c, inv_c,
            BLOCK_V=block_v, HAS_SOFTCAP=has_softcap, num_warps=num_warps,
        )
    return loss, lse


def cross_entropy_backward(
    logits: torch.Tensor,
    labels: torch.Tensor,
    lse: torch.Tensor,
    grad_loss: torch.Tensor,
    ignore_index: int,
    label_smoothing: float,
    z_loss: float,
    softcap: float,
    out: Optional[torch.Tensor] = None,
    smoothing_vocab: int = 0,
) -> torch.Tensor:
    """Gradient of ``sum(grad_loss * loss)`` w.r.t. ``logits``; ``lse`` is the forward's output.

    ``smoothing_vocab > 0``: ``logits`` is a block of columns of rows that are that wide (``lse``
    the full rows'), so the smoothing term is ``eps / smoothing_vocab`` and labels outside the
    block add no one-hot term.

    ``grad_loss [N]`` may be a broadcast view. Returns a new contiguous ``[N, V]`` tensor in
    ``logits.dtype`` (or ``out``, which may be ``logits`` itself: in place): ``g (p_j (1 + 2 z lse) - (1 - eps)[j == y] - eps / V) (1 - (x_j / c)^2)``
    (last factor only with soft-capping), 0 for ignored rows.
    """
    logits = _check_logits(logits)
    n, v = logits.shape
    labels = _check_labels(labels, (n,))
    lse = _check_row_vector(lse, n, "lse").contiguous()
    grad_loss = _check_row_vector(grad_loss, n, "grad_loss")
    grad_logits = _grad_buffer(logits, out)
    if n == 0:
        return grad_logits
    has_softcap, c, inv_c = _softcap_args(softcap)
    block_v, num_warps = launch_config(v)
    with _device_ctx(logits):
        wrap_triton(_cross_entropy_bwd_kernel)[(n,)](
            logits, labels, lse, grad_loss, grad_logits,
            logits.stride(0), labels.stride(0), grad_loss.stride(0),
            v, int(ignore_index), float(label_smoothing),
            float(label_smoothing) / (smoothing_vocab if smoothing_vocab > 0 else v),
            float(z_loss), c, inv_c,
            BLOCK_V=block_v, HAS_SOFTCAP=has_softcap, num_warps=num_warps,
        )
    return grad_logits


def cross_entropy_fused(
    logits: torch.Tensor,
    labels: torch.Tensor,
    grad_loss: torch.Tensor,
    ignore_index: int,
    label_smoothing: float,
    z_loss: float,
    softcap: float,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """:func:`cross_entropy_forward` and :func:`cross_entropy_backward` in one kernel, the
    gradient of ``sum(grad_loss * loss)`` written over ``logits`` (contiguous ``[N, V]``, the
    caller's own buffer). Returns new fp32 ``(loss [N], lse [N])``.
    """
    logits = _check_logits(logits)
    if not logits.is_contiguous():
        raise ValueError("logits: expected a contiguous tensor (its gradient is written over it)")
    n, v = logits.shape
    labels = _check_labels(labels, (n,))
    grad_loss = _check_row_vector(grad_loss, n, "grad_loss")
    dev = logits.device
    loss = torch.empty((n,), dtype=torch.float32, device=dev)
    lse = torch.empty((n,), dtype=torch.float32, device=dev)
    if n == 0:
        return loss, lse
    has_softcap, c, inv_c = _softcap_args(softcap)
    block_v, num_warps = launch_config(v)
    with _device_ctx(logits):
        wrap_triton(_cross_entropy_fused_kernel)[(n,)](
            logits, labels, grad_loss, loss, lse,
            labels.stride(0), grad_loss.stride(0),
            v, int(ignore_index), float(label_smoothing), float(z_loss), c, inv_c,
            BLOCK_V=block_v, HAS_SOFTCAP=has_softcap, num_warps=num_warps,
        )
    return loss, lse


def _grad_buffer(logits: torch.Tensor, out: Optional[torch.Tensor]) -> torch.Tensor:
    """The gradient's destination: new, or ``out`` (contiguous, same shape and dtype as logits)."""
    if out is None:
        return torch.empty(logits.shape, dtype=logits.dtype, device=logits.device)
    if out.shape != logits.shape or out.dtype != logits.dtype or not out.is_contiguous():
        raise ValueError(f"out: expected a contiguous {tuple(logits.shape)} {logits.dtype} tensor, "
                         f"got {tuple(out.shape)} {out.dtype} (contiguous={out.is_contiguous()})")
    return out


# ----------------------------------------------------------------------------------------------
# ahead-of-time compilation specs (tests/test_triton_aot.py)
# ----------------------------------------------------------------------------------------------





def aot_specs(vocab: int = 128256,
              dtypes=("bf16", "fp32")) -> List[Tuple[object, Dict[str, str], Dict[str, object], int]]:
    """``(kernel, signature, constexprs, num_warps)`` for every kernel in every flag combination the
    launchers use, for bf16 and fp32 logits, with the BLOCK_V / num_warps picked at ``vocab``.

    ``signature`` maps every argument name to a Triton type (``"*bf16"``, ``"i32"``, ``"fp32"``) or
    ``"constexpr"``. The specializations mirror what the JIT sees in a typical launch: ints below
    2^31 are i32 (row offsets are int64 inside the kernels regardless); contiguous labels and
    upstream gradients give unit strides, which the JIT turns into constexpr 1; the token log-prob
    kernels come both with a runtime K and with K == 1 (the common case, also specialized).
    Usage: ``triton.compile(ASTSource(kernel, signature, constexprs), target=GPUTarget("cuda", 90, 32),
    options={"num_warps": num_warps})``; needs the real JIT (TRITON_INTERPRET unset).
    """
    block_v, num_warps = launch_config(vocab)
    specs = []
    for dt in dtypes:
        lg = "*" + dt
        for k_is_one in (False, True):
            # contiguous labels [N, K]: stride_labels_k == 1; with K == 1 also stride_labels_row == 1
            k_ones = ("K", "stride_labels_row") if k_is_one else ()
            for has_entropy in (False, True):
                sig, consts = jit_like({
                    "logits_ptr": lg, "labels_ptr": "*i64", "logp_ptr": "*fp32", "entropy_ptr": "*fp32",
                    "lse_ptr": "*fp32", "stride_logits_row": "i32", "stride_labels_row": "i32",
                    "stride_labels_k": "i32", "V": "i32", "K": "i32", "inv_t": "fp32", "ignore_index": "i32",
                    "BLOCK_V": "constexpr", "HAS_ENTROPY": "constexpr",
                }, ("stride_labels_k",) + k_ones)
                consts.update(BLOCK_V=block_v, HAS_ENTROPY=has_entropy)
                specs.append((_token_logprobs_fwd_kernel, sig, consts, num_warps))
            for has_glogp, has_gent in ((True, False), (True, True), (False, True)):
                # contiguous grad_logp [N, K] / grad_entropy [N]: unit strides
                ones = ("stride_labels_k", "stride_glogp_k", "stride_gent") + k_ones
                if k_is_one:
                    ones += ("stride_glogp_row",)
                sig, consts = jit_like({
                    "logits_ptr": lg, "labels_ptr": "*i64", "lse_ptr": "*fp32", "entropy_ptr": "*fp32",
                    "grad_logp_ptr": "*fp32", "grad_entropy_ptr": "*fp32", "grad_logits_ptr": lg,
                    "stride_logits_row": "i32", "stride_labels_row": "i32", "stride_labels_k": "i32",
                    "stride_glogp_row": "i32", "stride_glogp_k": "i32", "stride_gent": "i32",
                    "V": "i32", "K": "i32", "inv_t": "fp32", "ignore_index": "i32",
                    "BLOCK_V": "constexpr", "HAS_GRAD_LOGP": "constexpr", "HAS_GRAD_ENTROPY": "constexpr",
                }, ones)
                consts.update(BLOCK_V=block_v, HAS_GRAD_LOGP=has_glogp, HAS_GRAD_ENTROPY=has_gent)
                specs.append((_token_logprobs_bwd_kernel, sig, consts, num_warps))
        for has_softcap in (False, True):
            sig, consts = jit_like({
                "logits_ptr": lg, "labels_ptr": "*i64", "loss_ptr": "*fp32", "lse_ptr": "*fp32",
                "stride_logits_row": "i32", "stride_labels": "i32", "V": "i32", "ignore_index": "i32",
                "label_smoothing": "fp32", "z_loss": "fp32", "softcap": "fp32", "inv_softcap": "fp32",
                "BLOCK_V": "constexpr", "HAS_SOFTCAP": "constexpr",
            }, ("stride_labels",))
            consts.update(BLOCK_V=block_v, HAS_SOFTCAP=has_softcap)
            specs.append((_cross_entropy_fwd_kernel, sig, consts, num_warps))
            sig, consts = jit_like({
                "logits_ptr": lg, "labels_ptr": "*i64", "lse_ptr": "*fp32", "grad_loss_ptr": "*fp32",
                "grad_logits_ptr": lg, "stride_logits_row": "i32", "stride_labels": "i32",
                "stride_gloss": "i32", "V": "i32", "ignore_index": "i32", "label_smoothing": "fp32",
                "eps_per_class": "fp32", "z_loss": "fp32", "softcap": "fp32", "inv_softcap": "fp32",
                "BLOCK_V": "constexpr", "HAS_SOFTCAP": "constexpr",
            }, ("stride_labels", "stride_gloss"))
            consts.update(BLOCK_V=block_v, HAS_SOFTCAP=has_softcap)
            specs.append((_cross_entropy_bwd_kernel, sig, consts, num_warps))
            sig, consts = jit_like({
                "logits_ptr": lg, "labels_ptr": "*i64", "grad_loss_ptr": "*fp32", "loss_ptr": "*fp32",
                "lse_ptr": "*fp32", "stride_labels": "i32", "stride_gloss": "i32", "V": "i32",
                "ignore_index": "i32", "label_smoothing": "fp32", "z_loss": "fp32", "softcap": "fp32",
                "inv_softcap": "fp32", "BLOCK_V": "constexpr", "HAS_SOFTCAP": "constexpr",
            }, ("stride_labels", "stride_gloss"))
            consts.update(BLOCK_V=block_v, HAS_SOFTCAP=has_softcap)
            specs.append((_cross_entropy_fused_kernel, sig, consts, num_warps))
    return specs
