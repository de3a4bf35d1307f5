"""Vocab-parallel (tensor-parallel) heads: the token log-prob, cross-entropy and distillation losses
from logits or head weights split over the vocabulary across a process group.

Rank ``r`` holds the vocabulary columns ``[vocab_start_r, vocab_start_r + V_r)`` (any split whose
shards tile ``[0, V)``); labels are global token ids. Per row, the ranks all-reduce the row max once
(MAX) and the per-row sums once (one SUM of an ``(N, k)`` fp32 tensor), as Megatron's
vocab-parallel cross-entropy does; the results are the same on every rank. Without
``torch.distributed`` initialized (and no group) each function is a world of one and equals its
single-process counterpart::

    vocab_parallel_token_logprobs(logits_shard, labels, *, vocab_start, group=None, temperature=1.0,
                                  ignore_index=-100, return_entropy=False)  # = token_logprobs
    vocab_parallel_cross_entropy(logits_shard, labels, *, vocab_start, group=None, ignore_index=-100,
                                 label_smoothing=0.0, reduction="mean")     # = cross_entropy
    vocab_parallel_distill_loss(student_shard, teacher_shard, *, vocab_start, group=None,
                                divergence="forward_kl", beta=0.5, temperature=1.0, labels=None,
                                ignore_index=-100, reduction="batchmean")  # = distill_loss
    vocab_parallel_linear_token_logprobs(hidden, weight_shard, labels, *, vocab_start, group=None,
                                         bias_shard=None, ...)             # = linear_token_logprobs
    vocab_parallel_linear_cross_entropy(hidden, weight_shard, labels, *, vocab_start, group=None,
                                        bias_shard=None, ...)              # = linear_cross_entropy
"""
from .process_group import VocabShards
from .vocab_parallel import vocab_parallel_cross_entropy, vocab_parallel_token_logprobs
from .vocab_parallel_distill import vocab_parallel_distill_loss
from .vocab_parallel_linear import vocab_parallel_linear_cross_entropy, vocab_parallel_linear_token_logprobs

__all__ = [
    "vocab_parallel_token_logprobs",
    "vocab_parallel_cross_entropy",
    "vocab_parallel_distill_loss",
    "vocab_parallel_linear_token_logprobs",
    "vocab_parallel_linear_cross_entropy",
    "VocabShards",
]
