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

    # Distillation family: the contract is the docstring of backends/torch_distill.py. The same
    # launchers serve _C.distill_{forward,backward}_cpu and _cuda (the latter on the current stream
    # of the student's device, with the stream as last argument).

    def _distill_operands(self, student: Tensor, teacher: Tensor, labels: Optional[Tensor]):
        ext = load_extension()
        if ext is None or not hasattr(ext, f"distill_forward_{self.suffix}") or \
                not hasattr(ext, f"distill_backward_{self.suffix}"):
            raise NotImplementedError(
                f"posttrain_kernels: the distillation kernels have no {self.suffix!r} build here (the "
                f"native extension lacks distill_forward_{self.suffix}); use backend='triton' or "
                "'torch' instead")
        if teacher.dtype != student.dtype:
            raise TypeError(f"teacher: expected the dtype of student ({student.dtype}), got {teacher.dtype}")
        if student.dtype not in DTYPE_CODES:
            raise TypeError(f"student: expected float32, bfloat16 or float16, got {student.dtype}")
        if teacher.shape != student.shape or student.dim() != 2:
            raise ValueError(f"teacher: expected the 2-D shape of student {tuple(student.shape)}, "
                             f"got {tuple(teacher.shape)}")
        # the kernels dereference raw pointers: every operand on the backend's device, and one device
        if student.device.type != self.suffix:
            raise ValueError(f"student: backend {self.suffix!r} expects {self.suffix} tensors, got a "
                             f"tensor on {student.device}")
        for name, t in (("teacher", teacher), ("labels", labels)):
            if t is not None and t.device != student.device:
                raise ValueError(f"{name}: expected a tensor on {student.device} (the student's device), "
                                 f"got {t.device}")
        # the kernels need unit stride along V (any row stride)
        student = student if student.stride(-1) == 1 else student.contiguous()
        teacher = teacher if teacher.stride(-1) == 1 else teacher.contiguous()
        if labels is not None:
            labels = labels.to(torch.int64).contiguous()  # read densely, (N,)
        return student, teacher, labels

    def distill_forward(self, student: Tensor, teacher: Tensor, labels: Optional[Tensor], ignore_index: int,
                        divergence: int, beta: float, inv_temperature: float) -> Tuple[Tensor, Tensor]:
        student, teacher, labels = self._distill_operands(student, teacher, labels)
        n, v = student.shape
        f32 = dict(device=student.device, dtype=torch.float32)
        loss = torch.empty((n,), **f32)
        stats = torch.empty((n, 3), **f32)
        with self._on_device(student):
            self._fn("distill_forward")(
                _ptr(student),                 # [n, v] student logits, unit stride along v
                _ptr(teacher),                 # [n, v] teacher logits, same dtype, unit stride along v
                DTYPE_CODES[student.dtype],    # dtype code of both
                n, v,                          # rows, vocabulary (the common prefix of both)
                student.stride(0),             # elements between student rows (>= v)
                teacher.stride(0),             # elements between teacher rows (>= v)
                _ptr(labels),                  # int64 [n] contiguous, or 0: no row skipped
                int(ignore_index),             # label of a skipped row
                int(divergence), float(beta),  # DIVERGENCE_CODES code, JSD beta / skew alpha
                float(inv_temperature),        # s = student * inv_t, t = teacher * inv_t
                _ptr(loss),                    # out fp32 [n]
                _ptr(stats),                   # out fp32 [n, 3] contiguous: (lse_s, lse_t, c)
                **self._stream(student))       # cuda: the current stream of the student's device
        return loss, stats

    def distill_backward(self, student: Tensor, teacher: Tensor, labels: Optional[Tensor], ignore_index: int,
                         divergence: int, beta: float, inv_temperature: float, stats: Tensor, grad_loss: Tensor,
                         out: Optional[Tensor] = None) -> Tensor:
        student, teacher, labels = self._distill_operands(student, teacher, labels)
        n, v = student.shape
        if tuple(stats.shape) != (n, 3) or tuple(grad_loss.shape) != (n,):
            raise ValueError(f"stats, grad_loss: expected shapes ({n}, 3) and ({n},), got "
                             f"{tuple(stats.shape)} and {tuple(grad_loss.shape)}")
        for name, t in (("stats", stats), ("grad_loss", grad_loss)):
            if t.device != student.device:
                raise ValueError(f"{name}: expected a tensor on {student.device} (the student's device), "
                                 f"got {t.device}")
        stats = stats.to(torch.float32).contiguous()
        grad_loss = grad_loss.to(torch.float32).contiguous()  # the kernel reads it densely
        # Written directly into out when it is safe (see _distill_out_ok: also exactly in place over
        # the student or the teacher, which both kernels allow), else into a new buffer copied over.
        grad = out if self._distill_out_ok(out, student, teacher) else torch.empty(
            (n, v), device=student.device, dtype=student.dtype)
        with self._on_device(student):
            self._fn("distill_backward")(
                _ptr(student),                 # [n, v] student logits, unit stride along v
                _ptr(teacher),                 # [n, v] teacher logits, same dtype, unit stride along v
                DTYPE_CODES[student.dtype],    # dtype code of both (and of the gradient)
                n, v,                          # rows, vocabulary
                student.stride(0),             # elements between student rows (>= v)
                teacher.stride(0),             # elements between teacher rows (>= v)
                _ptr(labels),                  # int64 [n] contiguous, or 0: no row skipped
                int(ignore_index),             # label of a skipped row
                int(divergence), float(beta),  # as in the forward
                float(inv_temperature),        # as in the forward
                _ptr(stats),                   # fp32 [n, 3] contiguous, the forward's
                _ptr(grad_loss),               # fp32 [n] contiguous, upstream gradient of the loss
                _ptr(grad),                    # out [n, v] contiguous, the student's dtype
                **self._stream(student))       # cuda: the current stream of the student's device
        return self._finish(grad, out)

    def distill_fused_(self, student: Tensor, teacher: Tensor, labels: Optional[Tensor], ignore_index: int,
                       divergence: int, beta: float, inv_temperature: float,
                       grad_loss: Tensor) -> Tuple[Tensor, Tensor]:
        """``distill_forward`` and the gradient of ``sum_r grad_loss[r] * loss[r]`` at once, the
        gradient written over ``student`` and ``teacher`` clobbered (both the caller's own
        buffers, unit stride along V). CPU only (``_C.distill_fused_cpu``)."""
        if self.suffix != "cpu" or not hasattr(load_extension(), "distill_fused_cpu"):
            raise NotImplementedError(f"posttrain_kernels: no fused distillation kernel for {self.suffix!r} here")
        if student.stride(-1) != 1 or teacher.stride(-1) != 1:
            raise ValueError("student, teacher: the fused kernel writes over them and needs unit stride along V")
        student_c, teacher_c, labels = self._distill_operands(student, teacher, labels)
        n, v = student.shape
        if tuple(grad_loss.shape) != (n,):
            raise ValueError(f"grad_loss: expected shape ({n},), got {tuple(grad_loss.shape)}")
        grad_loss = grad_loss.to(device=student.device, dtype=torch.float32).contiguous()
        f32 = dict(device=student.device, dtype=torch.float32)
        loss = torch.empty((n,), **f32)
        stats = torch.empty((n, 3), **f32)
        self._fn("distill_fused")(
            _ptr(student),                 # [n, v] in: student logits; out: the gradient (its dtype)
            _ptr(teacher),                 # [n, v] in: teacher logits; out: scratch (clobbered)
            DTYPE_CODES[student.dtype],    # dtype code of both
            n, v,                          # rows, vocabulary
            student.stride(0),             # elements between student rows (>= v)
            teacher.stride(0),             # elements between teacher rows (>= v)
            _ptr(labels),                  # int64 [n] contiguous, or 0: no row skipped
            int(ignore_index),             # label of a skipped row
            int(divergence), float(beta),  # DIVERGENCE_CODES code, JSD beta / skew alpha
            float(inv_temperature),        # s = student * inv_t, t = teacher * inv_t
            _ptr(grad_loss),               # fp32 [n]: the weight of each row's loss
            _ptr(loss),                    # out fp32 [n]
            _ptr(stats))                   # out fp32 [n, 3]: (lse_s, lse_t, c)
        return loss, stats

    @staticmethod
    def _distill_out_ok(out: Optional[Tensor], student: Tensor, teacher: Tensor) -> bool:
        """Whether the kernel may write into ``out`` directly (else a new buffer, copied into it):
        contiguous, the student's shape, dtype and device, and either aliasing neither input or
        being exactly one of them (in place: every element is read before its gradient is written)."""
        if out is None or not out.is_contiguous() or out.dtype != student.dtype or \
                out.shape != student.shape or out.device != student.device:
            return False
        for t in (student, teacher):
            if t.numel() == 0 or out.numel() == 0:
                continue
            if t.data_ptr() == out.data_ptr() and t.stride() == out.stride():
                continue  # exactly in place
            t_lo = t.data_ptr()
            t_hi = t_lo + ((t.shape[0] - 1) * t.stride(0) + t.shape[1]) * t.element_size()
            o_lo = out.data_ptr()
            o_hi = o_lo + out.numel() * out.element_size()
            if t_lo < o_hi and o_lo < t_hi:
                return False
        return True

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
