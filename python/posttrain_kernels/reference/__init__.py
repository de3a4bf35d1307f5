"""Eager PyTorch reference implementations: the oracle for tests and the baseline for benchmarks.

They materialize everything (fp32 logits, full log-softmax) and rely on autograd, so they are simple
enough to trust; every fused backend is tested against them by error budget.
"""
from .distill import distill_divergence_reference, distill_loss_reference
from .linear import linear_cross_entropy_reference, linear_token_logprobs_reference, reference_logits
from .token_logprobs import cross_entropy_reference, token_logprobs_reference

__all__ = ["token_logprobs_reference", "cross_entropy_reference", "linear_token_logprobs_reference",
           "linear_cross_entropy_reference", "reference_logits", "distill_loss_reference",
           "distill_divergence_reference"]
