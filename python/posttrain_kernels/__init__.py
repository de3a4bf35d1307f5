"""posttrain_kernels: fused kernels for the losses of LLM post-training.

Public API (token log-prob family)::

    token_logprobs(logits, labels, *, temperature=1.0, ignore_index=-100, return_entropy=False)
    cross_entropy(logits, labels, *, ignore_index=-100, label_smoothing=0.0, z_loss=0.0,
                  softcap=None, reduction="mean")

Fused linear (hidden states + head weight, no logits in memory)::

    linear_token_logprobs(hidden, weight, labels, *, bias=None, temperature=1.0, ...)
    linear_cross_entropy(hidden, weight, labels, *, bias=None, reduction="mean", ...)

Every function takes ``backend="auto" | "triton" | "cuda" | "cpu" | "torch" | "reference"``.
"""
from .api.linear_token_logprobs import linear_cross_entropy, linear_token_logprobs
from .api.token_logprobs import CrossEntropyLoss, TokenLogprobs, cross_entropy, token_logprobs
from .dispatch import BACKENDS, live_backends

__version__ = "0.1.0"

__all__ = [
    "token_logprobs",
    "cross_entropy",
    "linear_token_logprobs",
    "linear_cross_entropy",
    "TokenLogprobs",
    "CrossEntropyLoss",
    "BACKENDS",
    "live_backends",
    "__version__",
]
