"""Fused-linear token log-probs, entropy and cross-entropy: losses from hidden states and the head
weight, without a ``tokens x vocab`` logits tensor in memory."""
from __future__ import annotations

import os
from typing import Optional, Tuple

import torch
from torch import Tensor

from .. import _validation as V
from ..dispatch import resolve_backend
from ..ops.linear_token_logprobs import (LinearCrossEntropyRows, LinearCrossEntropyScalar,
                                         LinearTokenLogprobs, forward_chunk_rows, use_vocab_blocks,
                                         vocab_tile)
from ..reference import linear_cross_entropy_reference, linear_token_logprobs_reference
from .token_logprobs import REDUCTIONS

CHUNK_BYTES_ENV = "POSTTRAIN_KERNELS_CHUNK_BYTES"
DEFAULT_CHUNK_BYTES = 64 * 2**20
# On a GPU the chunk's GEMMs must be large to run near the matrix units' rate, and each tile costs a
# handful of launches: 512 MiB holds 2048 rows of a 131072-token vocabulary in bf16, and makes the
# backward's vocabulary tiles span every token of a 16k-token batch (measured on an H100, see
# benchmarks/results/nvidia-h100-80gb-hbm3: the 64 MiB of the CPU default ran 3x the GEMM floor).
DEFAULT_CUDA_CHUNK_BYTES = 512 * 2**20


def chunk_budget(device=None) -> int:
    """The memory budget in bytes of one chunk: ``POSTTRAIN_KERNELS_CHUNK_BYTES`` when set, else
    64 MiB on the CPU and 512 MiB on a GPU. It bounds a chunk's logits buffer, which then holds
    their gradient in place, together with its fp32 copies of weight and hidden rows where the
    GEMMs are upcast."""
    env = os.environ.get(CHUNK_BYTES_ENV)
    if env:
        return int(env)
    on_gpu = device is not None and torch.device(device).type == "cuda"
    return DEFAULT_CUDA_CHUNK_BYTES if on_gpu else DEFAULT_CHUNK_BYTES


def sequence_group_budget(device) -> int:
    """The budget of a group's logits in the sequence losses (``linear_preference_loss``): the
    chunk budget, but at least 128 MiB on the CPU unless ``POSTTRAIN_KERNELS_CHUNK_BYTES`` is set.
    A group holds whole pairs, and at 64 MiB a pair of 256-token sequences at V=32000 is the whole
    group: its 512-row GEMMs ran 8% slower than the floor's 2048-row ones (DPO at 1.10-1.14x the
    GEMM floor); 128 MiB groups of two pairs (and reference chunks of the same size) measured
    1.05-1.07x, with 197 MiB of peak memory against Liger's 255
    (benchmarks/results/cpu-amd-epyc-2c/preference-policy, dpo-isolated)."""
    budget = chunk_budget(device)
    if os.environ.get(CHUNK_BYTES_ENV) or torch.device(device).type == "cuda":
        return budget
    return max(budget, 2 * DEFAULT_CHUNK_BYTES)


def _schedule(chunk_size, n_rows, weight, fp32_logits, budget=None):
    """(rows per token chunk, (rows, cols) of a tile of the vocabulary-blocked backward)."""
    budget = budget or chunk_budget(weight.device)
    chunk = chunk_size or forward_chunk_rows(budget, weight, fp32_logits)
    return chunk, vocab_tile(budget, n_rows, weight, fp32_logits, chunk_size)


def _prepare(hidden, weight, bias, labels, chunk_size, single_only=False, allow_fp64=False):
    V.check_tensor("hidden", hidden, ndim_min=1)
    V.check_tensor("weight", weight, ndim_min=2)
    V.check_tensor("labels", labels)
    V.check_float("hidden", hidden, allow_fp64)
    V.check_float("weight", weight, allow_fp64)
    V.check_integer("labels", labels)
    if weight.dim() != 2:
        raise ValueError(f"weight: expected shape (V, H), got {tuple(weight.shape)}")
    vocab, h = weight.shape
    if hidden.shape[-1] != h:
        raise ValueError(f"hidden: expected last dimension {h} (weight is {tuple(weight.shape)}), "
                         f"got shape {tuple(hidden.shape)}")
    if bias is not None:
        V.check_tensor("bias", bias)
        V.check_float("bias", bias, allow_fp64)
        if tuple(bias.shape) != (vocab,):
            raise ValueError(f"bias: expected shape ({vocab},), got {tuple(bias.shape)}")
    V.check_same_device(hidden=hidden, weight=weight, labels=labels, bias=bias)
    lead = tuple(hidden.shape[:-1])
    if tuple(labels.shape) == lead:
        k = 1
    elif not single_only and labels.dim() == hidden.dim() and tuple(labels.shape[:-1]) == lead:
        k = labels.shape[-1]
    else:
        want = f"{lead}" + ("" if single_only else f" or {lead + ('K',)}")
        raise ValueError(f"labels: expected shape {want} for hidden of shape {tuple(hidden.shape)}, "
                         f"got {tuple(labels.shape)}")
    if chunk_size is not None and (not isinstance(chunk_size, int) or chunk_size < 1):
        raise ValueError(f"chunk_size: expected a positive integer or None, got {chunk_size!r}")
    return vocab, h, k


def _autocast_inputs(hidden, weight, bias):
    """Under torch.autocast, cast once here so the forward and the backward's recomputation of the
    logits use the same dtype (autocast is off inside the autograd function)."""
    dev = hidden.device.type
    if torch.is_autocast_enabled(dev):
        dt = torch.get_autocast_dtype(dev)
        hidden, weight = hidden.to(dt), weight.to(dt)
        bias = None if bias is None else bias.to(dt)
    elif hidden.dtype != weight.dtype:
        raise TypeError(f"hidden: expected the dtype of weight ({weight.dtype}) outside "
                        f"torch.autocast, got {hidden.dtype}")
    return hidden, weight, bias


def linear_token_logprobs(
    hidden: Tensor,
    weight: Tensor,
    labels: Tensor,
    *,
    bias: Optional[Tensor] = None,
    temperature: float = 1.0,
    ignore_index: int = -100,
    return_entropy: bool = False,
    softcap: Optional[float] = None,
    logit_scale: float = 1.0,
    chunk_size: Optional[int] = None,
    fp32_logits: bool = False,
    backend: str = "auto",
) -> Tuple[Tensor, Optional[Tensor]]:
    """Token log-probs (and entropy) of ``hidden @ weight.T + bias``, never materializing the logits.

    Args:
        hidden: ``(..., H)`` float32 / bfloat16 / float16 (e.g. ``hidden[:, :-1]``, non-contiguous).
        weight: ``(V, H)``, the head weight as ``nn.Linear`` stores it (tied embeddings work).
        labels: ``(...)`` or ``(..., K)`` integer, in ``[0, V)`` or ``ignore_index``.
        bias: optional ``(V,)``.
        temperature, ignore_index, return_entropy: as in :func:`token_logprobs`.
        softcap: ``None`` or ``c > 0``: logits become ``c * tanh(logits / c)`` (before temperature).
        logit_scale: multiplies the logits first (e.g. Cohere's / Granite's logit scaling).
        chunk_size: rows per chunk; default from a memory budget of
            ``POSTTRAIN_KERNELS_CHUNK_BYTES`` (64 MiB on the CPU, 512 MiB on a GPU) for a chunk's
            logits buffer, which then holds their gradient (in place). A bf16/fp16 head whose
            gradient is wanted runs its backward in tiles of ``chunk_size`` rows by a block of the
            vocabulary sized from the same budget (no ``(V, H)`` fp32 accumulator).
        fp32_logits: compute the head matmul in fp32 even for bf16/fp16 inputs (log-probs that match
            an inference engine computing fp32 logits).
        backend: backend of the per-chunk kernels (``"auto"``, ``"cpu"``, ``"triton"``, ...).

    Returns:
        ``(logp, entropy)`` fp32, as ``token_logprobs(softcap(logit_scale * (hidden @ weight.T +
        bias)), labels, temperature=...)``; differentiable in ``hidden``, ``weight`` and ``bias``
        with any upstream gradient. The forward keeps O(tokens) state; the backward recomputes each
        chunk's logits; the weight gradient is accumulated in fp32 (across token chunks for an
        fp32 head, within a GEMM over all tokens for each vocabulary block of a bf16/fp16 head).
        Extra memory is O(chunk x V) (+ O(tokens x H) fp32 for a bf16/fp16 hidden gradient).
    """
    vocab, h, k = _prepare(hidden, weight, bias, labels, chunk_size)
    temperature = V.check_positive("temperature", temperature)
    cap = 0.0 if softcap is None else V.check_positive("softcap", softcap)
    scale = V.check_finite("logit_scale", logit_scale)
    name = resolve_backend(backend, hidden.device)
    V.check_label_range(labels, vocab, ignore_index)
    if name == "reference":
        return linear_token_logprobs_reference(hidden, weight, labels, bias, temperature,
                                               ignore_index, return_entropy, softcap, scale)
    hidden, weight, bias = _autocast_inputs(hidden, weight, bias)
    lead = hidden.shape[:-1]
    hidden2d = hidden.reshape(-1, h)
    chunk, tile = _schedule(chunk_size, hidden2d.shape[0], weight, fp32_logits)
    with torch.autocast(hidden.device.type, enabled=False):
        logp, entropy, _ = LinearTokenLogprobs.apply(
            hidden2d, weight, bias, labels.reshape(-1, k).to(torch.int64).contiguous(),
            1.0 / temperature, int(ignore_index), bool(return_entropy), cap, scale, chunk, *tile,
            bool(fp32_logits), name)
    return logp.reshape(labels.shape), (entropy.reshape(lead) if return_entropy else None)


def linear_cross_entropy(
    hidden: Tensor,
    weight: Tensor,
    labels: Tensor,
    *,
    bias: Optional[Tensor] = None,
    ignore_index: int = -100,
    label_smoothing: float = 0.0,
    z_loss: float = 0.0,
    softcap: Optional[float] = None,
    logit_scale: float = 1.0,
    reduction: str = "mean",
    chunk_size: Optional[int] = None,
    fp32_logits: bool = False,
    backend: str = "auto",
) -> Tensor:
    """The SFT cross-entropy of ``hidden @ weight.T + bias`` without the logits in memory.

    Shapes and arguments as :func:`linear_token_logprobs` (labels ``(...)`` only) and
    :func:`cross_entropy` (``label_smoothing``, ``z_loss``, ``softcap``, ``reduction``). Equal to
    ``cross_entropy(logit_scale * (hidden @ weight.T + bias), labels, ...)``. For ``"mean"`` and
    ``"sum"`` the gradients are computed during the forward (three matmuls instead of four) and the
    backward scales them by the upstream gradient; ``"none"`` keeps the lse and recomputes, as do
    the scalar reductions of a bf16/fp16 head whose gradient is wanted (their vocabulary-blocked
    backward needs no ``(V, H)`` fp32 accumulator: see :func:`linear_token_logprobs`).
    Returns fp32.
    """
    vocab, h, _ = _prepare(hidden, weight, bias, labels, chunk_size, single_only=True)
    V.check_choice("reduction", reduction, REDUCTIONS)
    eps = V.check_range("label_smoothing", label_smoothing, 0.0, 1.0, hi_inclusive=True)
    z = V.check_range("z_loss", z_loss, 0.0, float("inf"))
    cap = 0.0 if softcap is None else V.check_positive("softcap", softcap)
    scale = V.check_finite("logit_scale", logit_scale)
    name = resolve_backend(backend, hidden.device)
    V.check_label_range(labels, vocab, ignore_index)
    if name == "reference":
        return linear_cross_entropy_reference(hidden, weight, labels, bias, ignore_index, eps, z,
                                              softcap, scale, reduction)
    hidden, weight, bias = _autocast_inputs(hidden, weight, bias)
    hidden2d = hidden.reshape(-1, h)
    chunk, tile = _schedule(chunk_size, hidden2d.shape[0], weight, fp32_logits)
    labels1d = labels.reshape(-1).to(torch.int64).contiguous()
    with torch.autocast(hidden.device.type, enabled=False):
        blocked = use_vocab_blocks(weight, torch.is_grad_enabled() and weight.requires_grad)
        if reduction == "none" or blocked:
            loss = LinearCrossEntropyRows.apply(hidden2d, weight, bias, labels1d, int(ignore_index),
                                                eps, z, cap, scale, chunk, *tile,
                                                bool(fp32_logits), name)
            if reduction == "none":
                return loss.reshape(labels.shape)
            if reduction == "sum":
                return loss.sum()
            # mean over non-ignored rows (0 when all are ignored), no host sync
            return loss.sum() / (labels1d != ignore_index).sum().clamp_min(1).to(loss.dtype)
        return LinearCrossEntropyScalar.apply(hidden2d, weight, bias, labels1d,
                                              int(ignore_index), eps, z, cap, scale, chunk,
                                              bool(fp32_logits), reduction == "mean",
                                              torch.is_grad_enabled(), name)
