"""The head of the fused-linear losses: its GEMMs, gradient accumulators and memory budget.

Shared by the token-chunked schedule (``linear_token_logprobs.py``) and the vocabulary-blocked
backward (``linear_vocab_blocks.py``).
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import Tensor

_F32 = torch.float32


# Vocabulary rows of the head weight upcast to fp32 at a time (see _Head): 8 MiB blocks.
_UPCAST_BLOCK_BYTES = 8 * 2**20


def cpu_has_fast_low_precision_gemm() -> bool:
    """Whether this CPU multiplies bf16 matrices natively (AVX512-BF16 or AMX). Without them
    PyTorch's bf16 GEMM is emulated and far slower than fp32 (measured on an AVX2 EPYC: 16 s
    against 2.1 s for 2048 x 1024 x 32000), so the fused-linear losses multiply in fp32 there."""
    probes = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    try:
        return any(bool(getattr(torch.cpu, p)()) for p in probes if hasattr(torch.cpu, p))
    except Exception:  # noqa: BLE001 -- a probe that fails means "no"
        return False


def _cpu_upcast(weight: Tensor) -> bool:
    """bf16/fp16 head on a CPU without bf16 GEMMs: every GEMM runs in fp32 (see _Head)."""
    return weight.dtype != _F32 and weight.device.type == "cpu" and not cpu_has_fast_low_precision_gemm()


def logits_element_size(weight: Tensor, fp32_logits: bool) -> int:
    """Bytes per element of a chunk's logits buffer for this head weight (see _Head's modes)."""
    return 4 if (fp32_logits or _cpu_upcast(weight)) else weight.element_size()


class _Head:
    """The GEMMs of one chunk of rows against the head ``weight (V, H)`` (+ ``bias (V,)``).

    Three modes:
    * native: logits and both gradient GEMMs in the weight's dtype (fp32 weights; bf16/fp16 on GPUs
      and on CPUs with bf16 matrix units) -- what the materialized computation does;
    * ``fp32_logits``: the logits GEMM in fp32 from the bf16/fp16 operands (log-probs that match an
      engine computing fp32 logits); the gradient GEMMs stay in the weight's dtype;
    * CPU upcast (bf16/fp16 weights on a CPU without bf16 GEMMs): every GEMM in fp32.
    Upcasting never copies the whole weight: it is multiplied in blocks of vocabulary rows, each
    block upcast on its own (``_UPCAST_BLOCK_BYTES``), so the extra memory stays O(chunk x V).
    """

    def __init__(self, weight: Tensor, bias: Optional[Tensor], fp32_logits: bool, logit_scale: float):
        self.weight, self.bias, self.scale = weight, bias, logit_scale
        self.grads_fp32 = _cpu_upcast(weight)
        self.logits_fp32 = weight.dtype != _F32 and (fp32_logits or self.grads_fp32)
        v, h = weight.shape
        self.block = max(1, _UPCAST_BLOCK_BYTES // (4 * max(h, 1)))
        self.blocks = [slice(s, min(s + self.block, v)) for s in range(0, v, self.block)]

    def logits(self, h: Tensor) -> Tensor:
        """``logit_scale * (h @ weight.T + bias)`` for one chunk: a new contiguous buffer, fp32 in
        the fp32 modes, else in the weight's dtype."""
        w, b = self.weight, self.bias
        if not self.logits_fp32:
            z = torch.nn.functional.linear(h, w, None if b is None else b.to(h.dtype))
        else:
            hf = h.float()
            z = torch.empty((h.shape[0], w.shape[0]), dtype=_F32, device=h.device)
            for vb in self.blocks:
                z[:, vb] = torch.nn.functional.linear(hf, w[vb].float(), None if b is None else b[vb].float())
        if self.scale != 1.0:
            z.mul_(self.scale)
        return z

    def grad_hidden(self, g: Tensor, out: Tensor) -> None:
        """out (rows, H) = g @ weight, g (rows, V) the gradient of this chunk's logits."""
        w = self.weight
        if self.grads_fp32:
            acc = torch.zeros(out.shape, dtype=_F32, device=out.device)
            for vb in self.blocks:
                acc.addmm_(g[:, vb], w[vb].float())
            out.copy_(acc)
            return
        torch.mm(g.to(w.dtype), w, out=out)  # out has the weight's dtype (checked in the API)

    def grad_weight(self, acc: Tensor, g: Tensor, h: Tensor) -> None:
        """acc (V, H) fp32 += g.T @ h, with fp32 accumulation across chunks."""
        if self.grads_fp32:
            acc.addmm_(g.t(), h.float())
        else:
            _accumulate_weight_grad(acc, g.to(self.weight.dtype), h)


def _softcapped(z: Tensor, softcap: float) -> Tensor:
    return z if softcap <= 0 else torch.tanh(z.float() / softcap).mul_(softcap).to(z.dtype)


def _accumulate_weight_grad(acc: Tensor, g: Tensor, h: Tensor) -> None:
    """``acc (V, H) += g.T @ h`` for g ``(rows, V)``, h ``(rows, H)``: see accumulate_product."""
    accumulate_product(acc, g.t(), h)


def accumulate_product(acc: Tensor, a: Tensor, b: Tensor) -> None:
    """``acc += a @ b`` with fp32 accumulation, into ``acc`` itself (no temporary of its size).

    acc fp32 (a contiguous buffer or a row slice of one); a and b of one dtype. bf16/fp16 operands:
    on CUDA the GEMM accumulates into fp32 (``out_dtype``); on the CPU the operands are upcast
    (fp32 GEMMs are the fast ones on CPUs without bf16 matrix units, and the copies are
    chunk-sized).
    """
    if a.dtype == _F32 and b.dtype == _F32:
        acc.addmm_(a, b)
        return
    if acc.is_cuda:
        try:
            torch.addmm(acc, a, b, out_dtype=_F32, out=acc)
            return
        except (TypeError, RuntimeError):  # torch without addmm(out_dtype=...)
            acc.add_(a @ b)
            return
    acc.addmm_(a.float(), b.float())


class _Grads:
    """Accumulators of the three parameter gradients (fp32 for weight and bias)."""

    def __init__(self, hidden: Tensor, weight: Tensor, bias: Optional[Tensor], need: Tuple[bool, bool, bool]):
        self.need_h, self.need_w, self.need_b = need
        dev = weight.device
        self.hidden = torch.empty(hidden.shape, dtype=hidden.dtype, device=dev) if self.need_h else None
        self.weight = torch.zeros(weight.shape, dtype=_F32, device=dev) if self.need_w else None
        self.bias = torch.zeros(weight.shape[0], dtype=_F32, device=dev) if (self.need_b and bias is not None) else None

    def add_chunk(self, sl: slice, g_logits: Tensor, h: Tensor, head: "_Head") -> None:
        """g_logits [rows_c, V] = d loss / d (h @ weight.T + bias) for the chunk rows ``sl``."""
        if self.need_h:
            head.grad_hidden(g_logits, self.hidden[sl])
        if self.need_w:
            head.grad_weight(self.weight, g_logits, h)
        if self.bias is not None:
            self.bias.add_(g_logits.sum(0, dtype=_F32))

    def result(self, weight: Tensor, bias: Optional[Tensor]):
        gw = None if self.weight is None else self.weight.to(weight.dtype)
        gb = None if self.bias is None else self.bias.to(bias.dtype)
        return self.hidden, gw, gb


def _chain_scale(g: Tensor, logit_scale: float) -> Tensor:
    """From d/d(logit_scale * z) to d/dz, in place on g (our buffer)."""
    return g.mul_(logit_scale) if logit_scale != 1.0 else g




def use_vocab_blocks(weight: Tensor, need_weight_grad: bool) -> bool:
    """Whether the backward walks vocabulary blocks (``linear_vocab_blocks``) instead of token chunks.

    With a bf16/fp16 head whose gradient is wanted, token chunks would accumulate the weight
    gradient in a ``(V, H)`` fp32 buffer, twice the size of the gradient itself (125 MiB at
    V=32000, H=1024; 2 GiB at V=131072, H=4096). Vocabulary blocks write each block of the weight
    gradient once, from GEMMs that sum over the tokens in fp32. An fp32 head accumulates straight
    into its own gradient, so it keeps the token chunks (three GEMMs for the scalar losses).
    """
    return need_weight_grad and weight.dtype != _F32


def forward_chunk_rows(budget: int, weight: Tensor, fp32_logits: bool) -> int:
    """Rows per token chunk so that one chunk's logits buffer, with the CPU upcast mode's weight
    block and hidden rows in fp32, fits ``budget`` bytes."""
    v, h = weight.shape
    if _cpu_upcast(weight):
        return max(1, (budget - _UPCAST_BLOCK_BYTES) // max(1, 4 * (v + h)))
    return max(1, budget // max(1, v * logits_element_size(weight, fp32_logits)))


def vocab_tile(budget: int, n_rows: int, weight: Tensor, fp32_logits: bool,
               chunk_rows: Optional[int]) -> Tuple[int, int]:
    """``(rows, cols)`` of a tile of the vocabulary-blocked backward.

    A quarter of ``budget`` goes to the block's two ``(cols, H)`` fp32 buffers (the weight block
    upcast, or the weight gradient's accumulator), the rest to the ``(rows, cols)`` logits tile and
    the rows' hidden states in fp32. ``chunk_rows`` (the caller's ``chunk_size``) fixes the rows.
    """
    v, h = weight.shape
    cols = int(min(v, max(8, budget // (32 * max(h, 1)))))
    if chunk_rows:
        return int(chunk_rows), cols
    elem = logits_element_size(weight, fp32_logits)
    rows = (budget - 8 * cols * h) // max(1, cols * elem + 4 * h)
    return int(max(1, min(n_rows, rows))), cols
