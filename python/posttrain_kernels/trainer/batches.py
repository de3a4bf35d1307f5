"""Tensors of a training batch from text records, for any tokenizer with ``encode`` / ``decode``
and ``pad_token_id`` / ``eos_token_id`` (a Hugging Face tokenizer or the embedded task's).

Layout conventions (Hugging Face's): ``input_ids (B, T)``, ``attention_mask (B, T)`` int64 1 on
real tokens, ``labels (B, T)`` int64 equal to ``input_ids`` on the tokens a loss is taken on and
``-100`` elsewhere (prompt, padding). Labels are *not* shifted: position ``t`` of the model's
output predicts ``labels[t + 1]``, and the losses of :mod:`posttrain_kernels.models` shift.
"""
from __future__ import annotations

from typing import Dict, List, Optional, Sequence, Tuple

import torch
from torch import Tensor

IGNORE = -100


def encode(tokenizer, text: str) -> List[int]:
    """Token ids of ``text`` without special tokens (Hugging Face tokenizers add BOS by default)."""
    try:
        return list(tokenizer.encode(text, add_special_tokens=False))
    except TypeError:
        return list(tokenizer.encode(text))


def _bos(tokenizer) -> List[int]:
    bos = getattr(tokenizer, "bos_token_id", None)
    return [] if bos is None else [bos]


def _pad_id(tokenizer) -> int:
    pad = getattr(tokenizer, "pad_token_id", None)
    if pad is None:
        pad = getattr(tokenizer, "eos_token_id", None)
    if pad is None:
        raise ValueError("tokenizer: expected a pad_token_id or an eos_token_id, got neither")
    return pad


def prompt_completion_ids(tokenizer, prompt: str, completion: str) -> Tuple[List[int], List[int]]:
    """``([bos] + prompt, completion + [eos])`` token ids."""
    eos = getattr(tokenizer, "eos_token_id", None)
    return _bos(tokenizer) + encode(tokenizer, prompt), encode(tokenizer, completion) + ([] if eos is None else [eos])


def completion_batch(tokenizer, prompts: Sequence[str], completions: Sequence[str],
                     max_length: Optional[int] = None) -> Dict[str, Tensor]:
    """Right-padded ``prompt + completion`` rows with labels on the completion (and its EOS) only.

    Returns ``input_ids``, ``attention_mask``, ``labels``, each ``(B, T)`` int64, ``T`` the longest
    row (cut to ``max_length`` from the right when given)."""
    rows, labels = [], []
    for p, c in zip(prompts, completions):
        pi, ci = prompt_completion_ids(tokenizer, p, c)
        ids = (pi + ci)[:max_length] if max_length else pi + ci
        lab = ([IGNORE] * len(pi) + ci)[:len(ids)]
        rows.append(ids)
        labels.append(lab)
    t = max(len(r) for r in rows)
    pad = _pad_id(tokenizer)
    input_ids = torch.full((len(rows), t), pad, dtype=torch.long)
    mask = torch.zeros((len(rows), t), dtype=torch.long)
    lab_t = torch.full((len(rows), t), IGNORE, dtype=torch.long)
    for i, (r, lab) in enumerate(zip(rows, labels)):
        input_ids[i, :len(r)] = torch.tensor(r)
        mask[i, :len(r)] = 1
        lab_t[i, :len(lab)] = torch.tensor(lab)
    return {"input_ids": input_ids, "attention_mask": mask, "labels": lab_t}


def preference_batch(tokenizer, records: Sequence[dict], max_length: Optional[int] = None) -> Dict[str, Tensor]:
    """Records ``{"prompt", "chosen", "rejected"}`` as ``2B`` rows: the chosen completions, then
    the rejected ones in the same order (the layout of ``linear_preference_loss``)."""
    prompts = [r["prompt"] for r in records]
    return completion_batch(tokenizer, prompts + prompts, [r["chosen"] for r in records]
                            + [r["rejected"] for r in records], max_length)


def prompt_batch(tokenizer, prompts: Sequence[str]) -> Dict[str, Tensor]:
    """Left-padded prompts for ``model.generate``: ``input_ids``, ``attention_mask`` ``(B, P)``."""
    rows = [_bos(tokenizer) + encode(tokenizer, p) for p in prompts]
    p = max(len(r) for r in rows)
    pad = _pad_id(tokenizer)
    input_ids = torch.full((len(rows), p), pad, dtype=torch.long)
    mask = torch.zeros((len(rows), p), dtype=torch.long)
    for i, r in enumerate(rows):
        input_ids[i, p - len(r):] = torch.tensor(r)
        mask[i, p - len(r):] = 1
    return {"input_ids": input_ids, "attention_mask": mask}


def completion_mask(completion_ids: Tensor, eos_token_id: Optional[int]) -> Tuple[Tensor, Tensor]:
    """``(mask, truncated)`` of generated completions ``(N, C)``: ``mask`` bool, true up to and
    including the first EOS; ``truncated (N,)`` bool, true where no EOS was generated."""
    n, c = completion_ids.shape
    if eos_token_id is None or c == 0:
        return torch.ones((n, c), dtype=torch.bool), torch.ones((n,), dtype=torch.bool)
    is_eos = completion_ids == eos_token_id
    has = is_eos.any(dim=1)
    first = torch.where(has, is_eos.int().argmax(dim=1), torch.full((n,), c, dtype=torch.long))
    mask = torch.arange(c).unsqueeze(0) <= first.unsqueeze(1)
    return mask & (torch.arange(c).unsqueeze(0) < c), ~has


def decode(tokenizer, ids: Sequence[int]) -> str:
    try:
        return tokenizer.decode(list(ids), skip_special_tokens=True)
    except TypeError:
        return tokenizer.decode(list(ids))
