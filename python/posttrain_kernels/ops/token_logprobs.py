"""Custom ops + autograd for the token log-prob family (``posttrain_kernels::*``).

Each op takes 2-D operands (rows x vocab, unit stride along the vocabulary) and the name of a
concrete backend (see ``posttrain_kernels.dispatch``); it allocates its outputs and never mutates an
input (except the in-place variants below, which say so). ``ops.registration`` registers them: a
``triton_op`` that ``torch.compile`` traces into where Triton compiles, else a custom op with a fake
(shape-only) implementation.
The forward keeps O(rows) state (lse, entropy) and the backward recomputes the softmax from it.
"""
from typing import Optional, Tuple

import torch
from torch import Tensor

from ..dispatch import launchers
from .registration import kernel_op

_F32 = torch.float32


# --------------------------------------------------------------------------------------------
# token_logprobs


def _token_logprobs_forward_fake(logits, labels, inv_temperature, ignore_index, compute_entropy, backend):
    n, k = labels.shape
    return (logits.new_empty((n, k), dtype=_F32),
            logits.new_empty((n if compute_entropy else 0,), dtype=_F32),
            logits.new_empty((n,), dtype=_F32))


@kernel_op("posttrain_kernels::token_logprobs_forward", mutates_args=(), fake=_token_logprobs_forward_fake,
           family="token_logprobs")
def token_logprobs_forward(logits: Tensor, labels: Tensor, inv_temperature: float, ignore_index: int,
                           compute_entropy: bool, backend: str) -> Tuple[Tensor, Tensor, Tensor]:
    """logits (N, V), labels int64 (N, K) -> logp (N, K), entropy (N,) or (0,), lse (N,), all fp32."""
    return launchers(backend).token_logprobs_forward(logits, labels, inv_temperature, ignore_index,
                                                     compute_entropy)


def _token_logprobs_backward_fake(logits, labels, lse, entropy, grad_logp, grad_entropy, inv_temperature,
                                  ignore_index, backend):
    return torch.empty_like(logits, memory_format=torch.contiguous_format)


@kernel_op("posttrain_kernels::token_logprobs_backward", mutates_args=(), fake=_token_logprobs_backward_fake,
           family="token_logprobs")
def token_logprobs_backward(logits: Tensor, labels: Tensor, lse: Tensor, entropy: Tensor,
                            grad_logp: Optional[Tensor], grad_entropy: Optional[Tensor],
                            inv_temperature: float, ignore_index: int, backend: str) -> Tensor:
    """The logits gradient (N, V) in the logits dtype, written once."""
    return launchers(backend).token_logprobs_backward(logits, labels, lse, entropy, grad_logp,
                                                      grad_entropy, inv_temperature, ignore_index)


def _setup_token_logprobs(ctx, inputs, output):
    logits, labels, inv_temperature, ignore_index, compute_entropy, backend = inputs
    _, entropy, lse = output
    ctx.save_for_backward(logits, labels, lse, entropy)
    ctx.args = (inv_temperature, ignore_index, compute_entropy, backend)
    ctx.mark_non_differentiable(lse)


def upstream_grads(grad_logp: Optional[Tensor], grad_entropy: Optional[Tensor],
                   compute_entropy: bool) -> Tuple[Optional[Tensor], Optional[Tensor]]:
    """Upstream gradients as the launchers take them: fp32 contiguous, or None when absent
    (the entropy's is dropped when no entropy was computed)."""
    if grad_logp is not None:
        grad_logp = grad_logp.to(_F32).contiguous()
    if not compute_entropy or grad_entropy is None:
        return grad_logp, None
    return grad_logp, grad_entropy.to(_F32).contiguous()


def _backward_token_logprobs(ctx, grad_logp, grad_entropy, _grad_lse):
    logits, labels, lse, entropy = ctx.saved_tensors
    inv_temperature, ignore_index, compute_entropy, backend = ctx.args
    grad_logp, grad_entropy = upstream_grads(grad_logp, grad_entropy, compute_entropy)
    grad = token_logprobs_backward(logits, labels, lse, entropy, grad_logp, grad_entropy,
                                   inv_temperature, ignore_index, backend)
    return grad, None, None, None, None, None


token_logprobs_forward.register_autograd(_backward_token_logprobs, setup_context=_setup_token_logprobs)


# --------------------------------------------------------------------------------------------
# cross_entropy


def _cross_entropy_forward_fake(logits, labels, ignore_index, label_smoothing, z_loss, softcap, backend):
    n = labels.shape[0]
    return logits.new_empty((n,), dtype=_F32), logits.new_empty((n,), dtype=_F32)


@kernel_op("posttrain_kernels::cross_entropy_forward", mutates_args=(), fake=_cross_entropy_forward_fake,
           family="token_logprobs")
def cross_entropy_forward(logits: Tensor, labels: Tensor, ignore_index: int, label_smoothing: float,
                          z_loss: float, softcap: float, backend: str) -> Tuple[Tensor, Tensor]:
    """logits (N, V), labels int64 (N,) -> per-row loss (N,), lse (N,), fp32."""
    return launchers(backend).cross_entropy_forward(logits, labels, ignore_index, label_smoothing,
                                                    z_loss, softcap)


def _cross_entropy_backward_fake(logits, labels, lse, grad_loss, ignore_index, label_smoothing, z_loss,
                                 softcap, backend):
    return torch.empty_like(logits, memory_format=torch.contiguous_format)


@kernel_op("posttrain_kernels::cross_entropy_backward", mutates_args=(), fake=_cross_entropy_backward_fake,
           family="token_logprobs")
def cross_entropy_backward(logits: Tensor, labels: Tensor, lse: Tensor, grad_loss: Tensor,
                           ignore_index: int, label_smoothing: float, z_loss: float, softcap: float,
                           backend: str) -> Tensor:
    return launchers(backend).cross_entropy_backward(logits, labels, lse, grad_loss, ignore_index,
                                                     label_smoothing, z_loss, softcap)


def _setup_cross_entropy(ctx, inputs, output):
    logits, labels, ignore_index, label_smoothing, z_loss, softcap, backend = inputs
    ctx.save_for_backward(logits, labels, output[1])
    ctx.args = (ignore_index, label_smoothing, z_loss, softcap, backend)
    ctx.mark_non_differentiable(output[1])


def _backward_cross_entropy(ctx, grad_loss, _grad_lse):
    logits, labels, lse = ctx.saved_tensors
    grad = cross_entropy_backward(logits, labels, lse, grad_loss.to(_F32).contiguous(), *ctx.args)
    return grad, None, None, None, None, None, None


cross_entropy_forward.register_autograd(_backward_cross_entropy, setup_context=_setup_cross_entropy)


# --------------------------------------------------------------------------------------------
# In-place variants for the fused-linear losses: the gradient is written over the logits, which
# there are the loss's own chunk buffer (never a caller's tensor), so a chunk needs one
# [rows, V] buffer instead of two. Not differentiable (they are the backward).


def _token_logprobs_backward_inplace_fake(logits, labels, lse, entropy, grad_logp, grad_entropy,
                                          inv_temperature, ignore_index, backend):
    return None


@kernel_op("posttrain_kernels::token_logprobs_backward_", mutates_args=("logits",),
           fake=_token_logprobs_backward_inplace_fake,
           family="token_logprobs")
def token_logprobs_backward_(logits: Tensor, labels: Tensor, lse: Tensor, entropy: Tensor,
                             grad_logp: Optional[Tensor], grad_entropy: Optional[Tensor],
                             inv_temperature: float, ignore_index: int, backend: str) -> None:
    """``token_logprobs_backward`` written over ``logits`` (contiguous)."""
    launchers(backend).token_logprobs_backward(logits, labels, lse, entropy, grad_logp,
                                               grad_entropy, inv_temperature, ignore_index,
                                               out=logits)


def _cross_entropy_backward_inplace_fake(logits, labels, lse, grad_loss, ignore_index, label_smoothing,
                                         z_loss, softcap, backend,
      smoothing_vocab=0):
    return None


@kernel_op("posttrain_kernels::cross_entropy_backward_", mutates_args=("logits",),
           fake=_cross_entropy_backward_inplace_fake,
           family="token_logprobs")
def cross_entropy_backward_(logits: Tensor, labels: Tensor, lse: Tensor, grad_loss: Tensor,
                            ignore_index: int, label_smoothing: float, z_loss: float, softcap: float,
                            backend: str, smoothing_vocab: int = 0) -> None:
    """``cross_entropy_backward`` written over ``logits`` (contiguous). ``smoothing_vocab > 0``:
    ``logits`` is a block of columns of rows that wide, ``lse`` the full rows'; the smoothing term
    is ``eps / smoothing_vocab``, and labels outside the block's ``[0, V)`` (other than
    ``ignore_index``) add no one-hot term."""
    launchers(backend).cross_entropy_backward(logits, labels, lse, grad_loss, ignore_index,
                                              label_smoothing, z_loss, softcap, out=logits,
                                              smoothing_vocab=smoothing_vocab)


def _cross_entropy_fused_inplace_fake(logits, labels, grad_loss, ignore_index, label_smoothing, z_loss,
                                      softcap, backend):
    n = labels.shape[0]
    return logits.new_empty((n,), dtype=_F32), logits.new_empty((n,), dtype=_F32)


@kernel_op("posttrain_kernels::cross_entropy_fused_", mutates_args=("logits",),
           fake=_cross_entropy_fused_inplace_fake,
           family="token_logprobs")
def cross_entropy_fused_(logits: Tensor, labels: Tensor, grad_loss: Tensor, ignore_index: int,
                         label_smoothing: float, z_loss: float, softcap: float,
                         backend: str) -> Tuple[Tensor, Tensor]:
    """Per-row loss and lse (fp32 ``(N,)``) as ``cross_entropy_forward``, and the gradient of
    ``sum(grad_loss * loss)`` written over ``logits`` (contiguous ``(N, V)``), in one pass."""
    return launchers(backend).cross_entropy_fused(logits, labels, grad_loss, ignore_index,
                                                  label_smoothing, z_loss, softcap)