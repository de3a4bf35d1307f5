"""TRL integration: TRL's trainers compute their per-token log-probs with this library's kernels.

TRL (>= 1.16) computes every loss of ``SFTTrainer``, ``DPOTrainer``, ``GRPOTrainer``, ``KTOTrainer``
and ``RLOOTrainer`` from a *fused LM head* (``trl.trainer.utils.add_fused_lm_head``): the model's
forward with ``fused_lm_head=True`` returns per-token log-probs (and entropy, argmax flags, ...)
from ``trl.kernels.ChunkedLogProbFunction``, without logits. ``patch_trl()`` swaps that function
for one built on :func:`posttrain_kernels.linear_token_logprobs`, so the trainers' own loss code,
loss types and metrics run unchanged on our kernels. The ``DistillationTrainer`` (TRL's on-policy
GKD) computes its generalized JSD from both models' hidden states with
``ChunkedDivergenceFunction``, which ``patch_trl()`` swaps for :mod:`.trl_divergence`'s::

    from posttrain_kernels.integrations.trl import patch_trl
    patch_trl()                      # before trainer.train(); undo with unpatch_trl()
    trainer = SFTTrainer(model=..., args=SFTConfig(...), train_dataset=...)
    trainer.train()

or, scoped: ``with fused_trl(): trainer.train()``.

Semantics follow ``ChunkedLogProbFunction`` exactly: logits ``z = softcap(logit_scale * (h W^T +
b)) / T``; log-probs and entropy of ``softmax(z)`` differentiable (any upstream gradients);
``log_sum_sq_probs = log sum_v p_v^2``, ``mean_logits = mean_v z_v`` and ``is_top1`` (the label is
the first index of the row's maximum, as ``argmax``) without gradient. Under ``torch.autocast`` the
GEMMs run in the autocast dtype; with TRL's ``cast_lm_head_to_fp32`` (fp32 hidden states, autocast
off) they run in fp32.

TRL is optional (the ``trl`` extra); importing this module without it raises ``ImportError``.
"""
from __future__ import annotations

import contextlib
from typing import Optional, Tuple

import torch
from torch import Tensor

from ..api.linear_token_logprobs import _schedule
from ..dispatch import resolve_backend
from ..ops.linear_token_logprobs import LinearTokenLogprobs
from .trl_divergence import FusedDivergenceFunction, fused_divergence, gemm_inputs  # noqa: F401 (public)

try:
    import trl.trainer.utils as _trl_utils
except ImportError as e:  # pragma: no cover - exercised only without TRL
    raise ImportError("posttrain_kernels.integrations.trl needs TRL: pip install 'posttrain-kernels[trl]'") from e

OPTIONAL_OUTPUTS = ("entropy", "log_sum_sq_probs", "mean_logits", "is_top1")
# Rows of a chunk upcast at a time for log sum p^2 (bounds its fp32 temporary)
_SQ_ROWS = 256


def fused_head_logprobs(hidden: Tensor, weight: Tensor, bias: Optional[Tensor], targets: Tensor,
                        temperature: float = 1.0, chunk_size: Optional[int] = None,
                        final_logit_softcapping: Optional[float] = None, logit_scale: float = 1.0,
                        outputs: Tuple[str, ...] = OPTIONAL_OUTPUTS, backend: str = "auto"):
    """``trl.kernels.ChunkedLogProbFunction.apply`` on this library's fused-linear kernels.

    Args:
        hidden: ``(N, H)`` float (bf16/fp16/fp32; autocast honoured).
        weight: ``(V, H)`` head weight; ``bias``: ``(V,)`` or None.
        targets: ``(N,)`` int64 in ``[0, V)`` (TRL passes only scored positions, or clamped ones).
        temperature, final_logit_softcapping, logit_scale: ``z = softcap(scale * (h W^T + b)) / T``.
        chunk_size: TRL's vocabulary tile width; ignored (this library sizes its own chunks from
            ``POSTTRAIN_KERNELS_CHUNK_BYTES``).
        outputs: which of ``OPTIONAL_OUTPUTS`` to compute (log-probs always are).

    Returns:
        ``(log_probs, entropy, log_sum_sq_probs, mean_logits, is_top1)``, each ``(N,)`` (fp32, bool
        for ``is_top1``) or None when not requested; the first two differentiable in ``hidden``,
        ``weight`` and ``bias``.
    """
    del chunk_size
    n, v = hidden.shape[0], weight.shape[0]
    if hidden.dim() != 2 or weight.dim() != 2 or targets.shape != (n,):
        raise ValueError(f"hidden (N, H), weight (V, H), targets (N,): got {tuple(hidden.shape)}, "
                         f"{tuple(weight.shape)}, {tuple(targets.shape)}")
    unknown = set(outputs) - set(OPTIONAL_OUTPUTS) - {"log_probs"}
    if unknown:
        raise ValueError(f"outputs: expected names from {('log_probs',) + OPTIONAL_OUTPUTS}, got {sorted(unknown)}")
    # autocast's dtype, else the wider one: TRL's cast_lm_head_to_fp32 hands fp32 hidden states to a
    # bf16 head, and TRL's own kernel then multiplies in fp32
    hidden, weight, bias = gemm_inputs(hidden, weight, bias)
    inv_t = 1.0 / float(temperature)
    cap = float(final_logit_softcapping) if final_logit_softcapping else 0.0
    f32 = dict(device=hidden.device, dtype=torch.float32)
    want = {name: name in outputs for name in OPTIONAL_OUTPUTS}
    sq = torch.empty(n, **f32) if want["log_sum_sq_probs"] else None
    mean = torch.empty(n, **f32) if want["mean_logits"] else None
    top1 = torch.empty(n, device=hidden.device, dtype=torch.bool) if want["is_top1"] else None
    labels = targets.reshape(n, 1).to(torch.int64).contiguous()

    def row_statistics(x: Tensor, rows: slice, lse: Tensor) -> None:
        # x: the chunk's soft-capped logits (before 1/T), in the GEMM dtype
        if top1 is not None:  # argmax is the first maximal index: TRL's tie rule
            top1[rows] = x.argmax(-1) == labels[rows, 0]
        if mean is not None:
            mean[rows] = x.sum(-1, dtype=torch.float32) * (inv_t / v)
        if sq is not None:  # log sum_v p_v^2 = logsumexp(2 z) - 2 lse
            for s in range(0, x.shape[0], _SQ_ROWS):
                part = x[s:s + _SQ_ROWS].float().mul_(2.0 * inv_t)
                r = slice(rows.start + s, rows.start + s + part.shape[0])
                sq[r] = torch.logsumexp(part, -1) - 2.0 * lse[s:s + part.shape[0]]

    name = resolve_backend(backend, hidden.device)
    chunk, tile = _schedule(None, n, weight, False)
    with torch.autocast(hidden.device.type, enabled=False):
        logp, entropy, _ = LinearTokenLogprobs.apply(
            hidden, weight, bias, labels, inv_t, -100, want["entropy"], cap, float(logit_scale),
            chunk, *tile, False, name, row_statistics)
    return logp[:, 0], (entropy if want["entropy"] else None), sq, mean, top1


class FusedHeadLogProbFunction:
    """Drop-in for ``trl.kernels.ChunkedLogProbFunction``: TRL calls ``.apply(...)``."""

    backend = "auto"

    @classmethod
    def apply(cls, hidden, weight, bias, targets, temperature, chunk_size, final_logit_softcapping=None,
              logit_scale=1.0, outputs=OPTIONAL_OUTPUTS):
        return fused_head_logprobs(hidden, weight, bias, targets, temperature, chunk_size,
                                   final_logit_softcapping, logit_scale, outputs, cls.backend)


_ORIGINAL = {}


def _distillation_module():
    try:
        import trl.trainer.distillation_trainer as mod
    except ImportError:  # a TRL without the DistillationTrainer (or without its dependencies)
        return None
    return mod if hasattr(mod, "ChunkedDivergenceFunction") else None


def patch_trl(backend: str = "auto") -> None:
    """Make TRL's fused LM head (every trainer that uses it: SFT, DPO, GRPO, KTO, RLOO) and the
    ``DistillationTrainer``'s divergence compute with this library's kernels, on ``backend``.
    Idempotent; :func:`unpatch_trl` restores TRL's own."""
    FusedHeadLogProbFunction.backend = backend
    FusedDivergenceFunction.backend = backend
    _ORIGINAL.setdefault("logprob", _trl_utils._ChunkedLogProbFunction)
    _trl_utils._ChunkedLogProbFunction = FusedHeadLogProbFunction
    mod = _distillation_module()
    if mod is not None:
        _ORIGINAL.setdefault("divergence", mod.ChunkedDivergenceFunction)
        mod.ChunkedDivergenceFunction = FusedDivergenceFunction


def unpatch_trl() -> None:
    """Restore TRL's own kernels."""
    if "logprob" in _ORIGINAL:
        _trl_utils._ChunkedLogProbFunction = _ORIGINAL.pop("logprob")
    if "divergence" in _ORIGINAL:
        _distillation_module().ChunkedDivergenceFunction = _ORIGINAL.pop("divergence")


def is_patched() -> bool:
    return _trl_utils._ChunkedLogProbFunction is FusedHeadLogProbFunction


@contextlib.contextmanager
def fused_trl(backend: str = "auto"):
    """``with fused_trl(): trainer.train()``: :func:`patch_trl` for the block only."""
    was = is_patched()
    patch_trl(backend)
    try:
        yield
    finally:
        if not was:
            unpatch_trl()
