"""The vocabulary-blocked backward of the fused-linear losses (bf16/fp16 heads).

The token-chunked backward accumulates the weight gradient across chunks, which for a bf16/fp16
head needs a ``(V, H)`` fp32 accumulator: twice the size of the gradient itself, and the largest
buffer of the whole loss. This backward walks the vocabulary in blocks of ``cols`` rows of the
head weight instead, and within a block the tokens in chunks of ``rows``:

    for each vocabulary block b = [c0, c1):
        for each token chunk t:
            z = logit_scale * (hidden[t] @ weight[b].T + bias[b])        # (rows, cols) tile
            g = d loss / d z, written over z by the logits family's kernel, from the row
                statistics saved by the forward (lse, entropy) -- the tile is a block of columns
                of full rows, so labels are shifted into the block
            grad_hidden[t] += g @ weight[b]          (fp32 (N, H) accumulator)
            grad_weight[b] += g.T @ hidden[t]        (written once when one chunk holds every row)
            grad_bias[b]   += sum_t g

so every buffer is O(rows x cols + cols x H + N x H): no ``(V, H)`` fp32 buffer and no
``(N, V)`` one. Four GEMMs in all, as the token-chunked backward of the log-probs.
"""
from __future__ import annotations

from typing import Callable, Optional, Tuple

import torch
from torch import Tensor

from .linear_head import _F32, _Head, accumulate_product

# Label codes inside a tile: the kernels see ``ignore_index = IGNORED`` and treat any other label
# outside [0, cols) as "in another block": it counts in the row's upstream gradient sum, but adds
# no one-hot term. Both are negative, so no real label (shifted into [0, cols)) can collide.
IGNORED = -1
ELSEWHERE = -2

# tile_grad(z, tile_labels, rows) -> g: the gradient of the loss w.r.t. the tile's scaled logits
# z (rows, cols) (logit_scale applied), written over z or into a buffer of the callee's own;
# tile_labels are the rows' labels shifted into the block (block_labels), rows the token slice.
TileGrad = Callable[[Tensor, Tensor, slice], Tensor]


def block_labels(labels: Tensor, c0: int, c1: int, ignore_index: int) -> Tensor:
    """Labels (N,) or (N, K) int64 shifted into the block [c0, c1): ``y - c0`` inside,
    ``IGNORED`` where ``y == ignore_index``, ``ELSEWHERE`` otherwise; a new contiguous tensor."""
    inside = (labels >= c0) & (labels < c1)
    shifted = torch.where(inside, labels - c0, torch.full_like(labels, ELSEWHERE))
    return shifted.masked_fill_(labels == ignore_index, IGNORED).contiguous()


def vocab_blocked_backward(hidden: Tensor, head: _Head, labels: Tensor, ignore_index: int,
                           need: Tuple[bool, bool, bool], tile_grad: TileGrad, rows: int, cols: int
                           ) -> Tuple[Optional[Tensor], Optional[Tensor], Optional[Tensor]]:
    """Gradients w.r.t. ``hidden (N, H)``, ``head.weight (V, H)`` and ``head.bias (V,)`` (None
    where not needed), in their own dtypes, accumulated in fp32. ``labels`` int64 ``(N,)`` or
    ``(N, K)``; tiles of ``rows x cols`` (see ``linear_head.vocab_tile``)."""
    weight, bias = head.weight, head.bias
    n, h = hidden.shape
    v = weight.shape[0]
    need_h, need_w, need_b = need
    dev = hidden.device
    gh = torch.zeros((n, h), dtype=_F32, device=dev) if need_h else None
    gw = torch.empty(weight.shape, dtype=weight.dtype, device=dev) if need_w else None
    gb = torch.zeros((v,), dtype=_F32, device=dev) if (need_b and bias is not None) else None
    # operand dtypes: of the logits GEMM (fp32 in the fp32-logits and CPU upcast modes) and of
    # the two gradient GEMMs (fp32 in the CPU upcast mode only)
    z_dtype = _F32 if head.logits_fp32 else weight.dtype
    g_dtype = _F32 if head.grads_fp32 else weight.dtype
    one_chunk = rows >= n
    for c0 in range(0, v, cols):
        c1 = min(c0 + cols, v)
        w_z = weight[c0:c1].to(z_dtype)
        w_g = w_z if g_dtype == z_dtype else weight[c0:c1]
        b_z = None if bias is None else bias[c0:c1].to(z_dtype)
        labels_b = block_labels(labels, c0, c1, ignore_index)
        gw_acc = None
        if need_w and not one_chunk:
            gw_acc = torch.zeros((c1 - c0, h), dtype=_F32, device=dev)
        for s in range(0, n, rows):
            t = slice(s, min(s + rows, n))
            h_z = hidden[t].to(z_dtype)
            z = torch.nn.functional.linear(h_z, w_z, b_z)
            if head.scale != 1.0:
                z.mul_(head.scale)
            g = tile_grad(z, labels_b[t], t).to(g_dtype)
            h_g = h_z if g_dtype == z_dtype else hidden[t]
            if gh is not None:
                accumulate_product(gh[t], g, w_g)
            if gw_acc is not None:
                accumulate_product(gw_acc, g.t(), h_g)
            elif need_w:
                # every token in one GEMM: its fp32 accumulation is the whole sum
                if g.dtype == weight.dtype:
                    torch.mm(g.t(), h_g, out=gw[c0:c1])
                else:
                    gw[c0:c1].copy_(g.t() @ h_g)
            if gb is not None:
                gb[c0:c1] += g.sum(0, dtype=_F32)
            del z, g, h_z
        if gw_acc is not None:
            gw[c0:c1].copy_(gw_acc)
        del labels_b
    return (None if gh is None else gh.to(hidden.dtype), gw,
            None if gb is None else gb.to(bias.dtype))
