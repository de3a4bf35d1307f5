"""Tiny random-weight causal LMs for the pipeline (``transformers`` Llama, built from configs, no
downloads), and a loader for a real model behind the same interface.

Two sizes share the tokenizer's vocabulary, so a teacher's logits line up with a student's::

    policy / teacher:  4 layers, hidden 128, 4 heads, MLP 256   (~0.66 M parameters)
    student:           3 layers, hidden  96, 4 heads, MLP 192   (~0.28 M parameters)

Usage::

    tok = default_tokenizer()
    policy = build_policy(tok, seed=0)          # SFT -> DPO -> GRPO, then the teacher
    student = build_student(tok, seed=1)        # distillation target
    out = policy.generate(**prompt_batch(tok, prompts), **generation_kwargs(tok, 12))  # trainer.batches

The models are float32, in train mode, untied (``lm_head.weight`` is its own ``(vocab_size,
hidden)`` parameter, the ``weight`` the fused linear losses take), with ``config`` and
``generation_config`` carrying the tokenizer's pad/bos/eos ids, so ``generate`` needs no extra
arguments to stop at eos. Building does not touch the global torch RNG (the seed is applied inside
``torch.random.fork_rng``): the same seed gives the same weights, whatever ran before.
"""
from __future__ import annotations

from typing import Any, Dict, Optional

import torch

__all__ = [
    "POLICY_SIZE", "STUDENT_SIZE", "tiny_config", "build_tiny_model", "build_policy",
    "build_teacher", "build_student", "load_model", "generation_kwargs",
]

#: Architecture of the policy (which is also the distillation teacher).
POLICY_SIZE: Dict[str, int] = {"hidden_size": 128, "num_hidden_layers": 4, "num_attention_heads": 4,
                               "num_key_value_heads": 4, "intermediate_size": 256}
#: Architecture of the distillation student: three quarters of the width and depth
#: (3 layers, hidden 96: a 2-layer, 64-wide student stayed below 10% exact match after 300
#: distillation steps from a teacher at 53%; this one reaches 37%.)
STUDENT_SIZE: Dict[str, int] = {"hidden_size": 96, "num_hidden_layers": 3, "num_attention_heads": 4,
                                "num_key_value_heads": 4, "intermediate_size": 192}

_SIZES = {"policy": POLICY_SIZE, "teacher": POLICY_SIZE, "student": STUDENT_SIZE}


def _tokenizer_or_default(tokenizer):
    if tokenizer is None:
        from .tokenizer import default_tokenizer

        return default_tokenizer()
    return tokenizer


def tiny_config(tokenizer=None, size: str = "policy", **overrides: Any):
    """A ``transformers.LlamaConfig`` for a tiny model.

    Args:
        tokenizer: gives ``vocab_size`` and the pad/bos/eos ids (anything with ``vocab_size``,
            ``pad_token_id``, ``bos_token_id``, ``eos_token_id``); default: the default task's
            :class:`~posttrain_kernels.pipeline.tokenizer.CharTokenizer`.
        size: ``"policy"`` (= ``"teacher"``, :data:`POLICY_SIZE`) or ``"student"``
            (:data:`STUDENT_SIZE`).
        **overrides: any ``LlamaConfig`` field (``hidden_size=96``, ``num_hidden_layers=3``, ...).

    Fixed otherwise: ``max_position_embeddings=64`` (the default task's sequences are at most 23
    tokens, plus generation slack), untied embeddings, float32.
    """
    from transformers import LlamaConfig

    if size not in _SIZES:
        raise ValueError(f"size: expected one of {sorted(_SIZES)}, got {size!r}")
    tok = _tokenizer_or_default(tokenizer)
    fields = dict(_SIZES[size])
    fields.update(vocab_size=tok.vocab_size, pad_token_id=tok.pad_token_id,
                  bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                  max_position_embeddings=64, tie_word_embeddings=False)
    fields.update(overrides)
    return LlamaConfig(**fields)


def build_tiny_model(config, seed: int = 0):
    """A random-weight ``LlamaForCausalLM`` (any ``AutoModelForCausalLM`` config works) with
    weights drawn from ``seed``, float32, in train mode; its ``generation_config`` gets the
    config's pad/bos/eos ids. Deterministic in ``seed`` and leaves the global RNG untouched."""
    from transformers import AutoModelForCausalLM

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    gc = model.generation_config
    gc.pad_token_id, gc.bos_token_id, gc.eos_token_id = (config.pad_token_id, config.bos_token_id,
                                                         config.eos_token_id)
    model.train()
    return model


def build_policy(tokenizer=None, seed: int = 0, **overrides: Any):
    """The tiny policy / teacher (:data:`POLICY_SIZE`, vocabulary of ``tokenizer``), seeded.
    ``overrides``: ``LlamaConfig`` fields, see :func:`tiny_config`."""
    return build_tiny_model(tiny_config(tokenizer, "policy", **overrides), seed)


#: The teacher of the distillation stage is the trained policy; built fresh it is the same model.
build_teacher = build_policy


def build_student(tokenizer=None, seed: int = 1, **overrides: Any):
    """The tiny distillation student (:data:`STUDENT_SIZE`, same vocabulary as the policy), seeded.
    ``overrides``: ``LlamaConfig`` fields, see :func:`tiny_config`."""
    return build_tiny_model(tiny_config(tokenizer, "student", **overrides), seed)


def load_model(path: str, **kwargs: Any):
    """A user's causal LM: ``AutoModelForCausalLM.from_pretrained(path, **kwargs)`` (a local
    directory, or a hub id if the machine may download), in train mode. Its vocabulary must be the
    tokenizer's the data is encoded with; the embedded task's data needs :func:`build_policy` /
    :func:`build_student` (or a model trained on :class:`CharTokenizer` ids)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, **kwargs)
    model.train()
    return model


def generation_kwargs(tokenizer=None, max_new_tokens: int = 12, *, do_sample: bool = False,
                      temperature: float = 1.0, top_k: Optional[int] = None,
                      num_return_sequences: int = 1) -> Dict[str, Any]:
    """Keyword arguments for ``model.generate(**prompt_batch(...), **generation_kwargs(...))`` (``prompt_batch`` of :mod:`posttrain_kernels.trainer.batches`):
    ``max_new_tokens``, the pad/eos ids, greedy (``do_sample=False``) or sampling at
    ``temperature`` (``top_k=None`` and ``top_p=1.0``: the unmodified distribution, as GRPO wants),
    ``num_return_sequences`` samples per prompt (rows ``i * n .. i * n + n - 1`` belong to prompt
    ``i``). The default task's answers are at most 10 letters + eos, so 12 new tokens suffice."""
    tok = _tokenizer_or_default(tokenizer)
    kw: Dict[str, Any] = {"max_new_tokens": max_new_tokens, "pad_token_id": tok.pad_token_id,
                          "eos_token_id": tok.eos_token_id, "do_sample": do_sample,
                          "num_return_sequences": num_return_sequences}
    if do_sample:
        kw.update(temperature=temperature, top_k=top_k if top_k is not None else 0, top_p=1.0)
    return kw
