"""The C++ (CPU) and CUDA kernels of ``posttrain_kernels._C``, called with raw pointers.

``_C`` is torch-free, so tensors cross the boundary as ``data_ptr()`` + sizes + strides + a dtype
code; outputs are allocated here, or written into ``out`` (which may be the logits: in place). CUDA launches go on the current stream of the logits' device.
"""
from __future__ import annotations

import contextlib
from typing import Optional, Tuple

import torch

from .._extension import DTYPE_CODES, load_extension

Tensor = torch.Tensor


def _ptr(t: Optional[Tensor]) -> int:
    return 0 if t is None else t.data_ptr()


class NativeBackend:
    """Launchers over ``_C.<op>_<suffix>``; ``suffix`` is ``"cpu"`` or ``"cuda"``."""

    def __init__(self, suffix: str):
        self.suffix = suffix

    def _fn(self, name: str):
        ext = load_extension()
        fn = None if ext is None else getattr(ext, f"{name}_{self.suffix}", None)
        if fn is None:
            raise RuntimeError(
                f"posttrain_kernels: backend={self.suffix!r} needs the native extension built with "
                f"{self.suffix.upper()} kernels; run `python -m posttrain_kernels info` to see "
                "which backends are live"
            )
        return fn

    def _on_device(self, t: Tensor):
        # The CUDA kernels launch on the calling thread's current device.
        return torch.cuda.device(t.device) if self.suffix == "cuda" else contextlib.nullcontext()

    def _stream(self, t: Tensor) -> dict:
        if self.suffix != "cuda":
            return {}
        return {"stream": torch.cuda.current_stream(t.device).cuda_stream}

    def token_logprobs_forward(self, logits: Tensor, labels: Tensor, inv_temperature: float,
                               ignore_index: int, compute_entropy: bool) -> Tuple[Tensor, Tensor, Tensor]:
        n, v = logits.shape
        k = labels.shape[1]
        f32 = dict(device=logits.device, dtype=torch.float32)
        logp = torch.empty((n, k), **f32)
        entropy = torch.empty((n if compute_entropy else 0,), **f32)
        lse = torch.empty((n,), **f32)
        with self._on_device(logits):
            self._fn("token_logprobs_forward")(
                _ptr(logits), DTYPE_CODES[logits.dtype], n, v, logits.stride(0), _ptr(labels), k,
                float(inv_temperature), int(ignore_index), _ptr(logp),
                _ptr(entropy) if compute_entropy else 0, _ptr(lse), **self._stream(logits))
        return logp, entropy, lse

    def token_logprobs_backward(self, logits: Tensor, labels: Tensor, lse: Tensor,
                                entropy: Optional[Tensor], grad_logp: Optional[Tensor],
                                grad_entropy: Optional[Tensor], inv_temperature: float,
                                ignore_index: int, out: Optional[Tensor] = None) -> Tensor:
        n, v = logits.shape
        # the kernels read the upstream gradients densely: (N, K) and (N,) contiguous
        grad_logp = None if grad_logp is None else grad_logp.to(torch.float32).contiguous()
        grad_entropy = None if grad_entropy is None else grad_entropy.to(torch.float32).contiguous()
        grad_logits = self._grad_buffer(logits, out)
        with self._on_device(logits):
            self._fn("token_logprobs_backward")(
                _ptr(logits), DTYPE_CODES[logits.dtype], n, v, logits.stride(0), _ptr(labels),
                labels.shape[1], float(inv_temperature), int(ignore_index), _ptr(lse),
                _ptr(entropy) if grad_entropy is not None else 0, _ptr(grad_logp), _ptr(grad_entropy),
                _ptr(grad_logits), **self._stream(logits))
        return self._finish(grad_logits, out)

    def cross_entropy_forward(self, logits: Tensor, labels: Tensor, ignore_index: int,
                              label_smoothing: float, z_loss: float, softcap: float) -> Tuple[Tensor, Tensor]:
        n, v = logits.shape
        loss = torch.empty((n,), device=logits.device, dtype=torch.float32)
        lse = torch.empty((n,), device=logits.device, dtype=torch.float32)
        with self._on_device(logits):
            self._fn("cross_entropy_forward")(
                _ptr(logits), DTYPE_CODES[logits.dtype], n, v, logits.stride(0), _ptr(labels),
                int(ignore_index), float(label_smoothing), float(z_loss), float(softcap), _ptr(loss),
                _ptr(lse), **self._stream(logits))
        return loss, lse

    def cross_entropy_backward(self, logits: Tensor, labels: Tensor, lse: Tensor, grad_loss: Tensor,
                               ignore_index: int, label_smoothing: float, z_loss: float,
                               softcap: float, out: Optional[Tensor] = None,
                               smoothing_vocab: int = 0) -> Tensor:
        n, v = logits.shape
        grad_loss = grad_loss.to(torch.float32).contiguous()  # the kernel reads it densely
        grad_logits = self._grad_buffer(logits, out)
        with self._on_device(logits):
            self._fn("cross_entropy_backward")(
                _ptr(logits), DTYPE_CODES[logits.dtype], n, v, logits.stride(0), _ptr(labels),
                int(ignore_index), float(label_smoothing), float(z_loss), float(softcap),
                int(smoothing_vocab), _ptr(lse), _ptr(grad_loss), _ptr(grad_logits),
                **self._stream(logits))
        return self._finish(grad_logits, out)

    def cross_entropy_fused(self, logits: Tensor, labels: Tensor, grad_loss: Tensor,
                            ignore_index: int, label_smoothing: float, z_loss: float,
                            softcap: float) -> Tuple[Tensor, Tensor]:
        """Forward and backward at once; the gradient is written over ``logits`` (contiguous)."""
        if self.suffix != "cpu":
            loss, lse = self.cross_entropy_forward(logits, labels, ignore_index, label_smoothing,
                                                   z_loss, softcap)
            self.cross_entropy_backward(logits, labels, lse, grad_loss, ignore_index,
                                        label_smoothing, z_loss, softcap, out=logits)
            return loss, lse
        n, v = logits.shape
        grad_loss = grad_loss.to(torch.float32).contiguous()  # the kernel reads it densely
        loss = torch.empty((n,), device=logits.device, dtype=torch.float32)
        lse = torch.empty((n,), device=logits.device, dtype=torch.float32)
        self._fn("cross_entropy_fused")(
            _ptr(logits), DTYPE_CODES[logits.dtype], n, v, _ptr(labels), int(ignore_index),
            float(label_smoothing), float(z_loss), float(softcap), _ptr(grad_loss), _ptr(loss),
            _ptr(lse))
        return loss, lse

    def _grad_buffer(self, logits: Tensor, out: Optional[Tensor]) -> Tensor:
        # The CUDA kernels take their pointers as __restrict__: an in-place request gets a new
        # buffer there, copied over the logits afterwards (same result, no memory saved).
        if out is None or (self.suffix == "cuda" and out.data_ptr() == logits.data_ptr()):
            return torch.empty(logits.shape, device=logits.device, dtype=logits.dtype)
        return out

    @staticmethod
    def _finish(grad_logits: Tensor, out: Optional[Tensor]) -> Tensor:
        if out is not None and grad_logits is not out:
            out.copy_(grad_logits)
            return out
        return grad_logits


cpu = NativeBackend("cpu")
cuda = NativeBackend("cuda")
