"""posttrain_kernels: fused kernels for the losses of LLM post-training.

Public API (token log-prob family)::

    token_logprobs(logits, labels, *, temperature=1.0, ignore_index=-100, return_entropy=False)
    cross_entropy(logits, labels, *, ignore_index=-100, label_smoothing=0.0, z_loss=0.0,
                  softcap=None, reduction="mean")

Fused linear (hidden states + head weight, no logits in memory)::

    linear_token_logprobs(hidden, weight, labels, *, bias=None, temperature=1.0, ...)
    linear_cross_entropy(hidden, weight, labels, *, bias=None, reduction="mean", ...)

Every function of these two families takes
``backend="auto" | "triton" | "cuda" | "cpu" | "torch" | "reference"``.

Preference optimization (per-sequence log-probs; ``(loss, metrics)``)::

    preference_loss(chosen_logps, rejected_logps, ref_chosen_logps, ref_rejected_logps, *,
                    loss_type="sigmoid", beta=0.1, ...)      # the DPO family of TRL's DPOTrainer
    kto_loss(...), simpo_loss(...), cpo_loss(...), orpo_loss(...)
    linear_preference_loss(hidden, weight, labels, *, ref_hidden=None, ref_weight=None,
                           ref_logps=None, loss_type="sigmoid", ...)  # fused, no logits

Policy gradient (per-token log-probs; ``(loss, metrics)``)::

    policy_loss(logps, old_logps, advantages, mask, *, loss_type="dapo", ...)  # TRL's GRPOTrainer
    value_loss(values, old_values, returns, mask, *, cliprange_value=0.2)
    linear_policy_loss(hidden, weight, labels, old_logps, advantages, mask, *,
                       ref_hidden=None, ref_weight=None, ref_logps=None, ...)  # fused, no logits

Distillation (student vs teacher logits)::

    distill_loss(student_logits, teacher_logits, *, divergence="forward_kl", beta=0.5,
                 temperature=1.0, labels=None, reduction="batchmean")

``nn.Module`` forms of every loss are in ``posttrain_kernels.modules``.

Any Hugging Face causal LM, losses from its hidden states and head inside its forward
(``transformers`` is imported only by the caller)::

    models.causal_lm_loss(model, loss_fn, **model_inputs)   # loss_fn(hidden, head)
    models.token_logprobs(model, input_ids, attention_mask, labels), models.cross_entropy(...)
"""
from .api.distill import distill_loss, topk_distill_loss
from .api.linear_distill import linear_distill_loss
from .api.linear_policy import linear_policy_loss
from .api.linear_preference import linear_preference_loss
from .api.linear_token_logprobs import linear_cross_entropy, linear_token_logprobs
from .api.policy import policy_loss, value_loss
from .api.preference import kto_loss, preference_loss
from .api.preference_free import cpo_loss, orpo_loss, simpo_loss
from .api.token_logprobs import CrossEntropyLoss, TokenLogprobs, cross_entropy, token_logprobs
from .dispatch import BACKENDS, live_backends
from . import models  # imports neither transformers nor peft

__version__ = "0.1.0"

__all__ = [
    "token_logprobs",
    "cross_entropy",
    "linear_token_logprobs",
    "linear_cross_entropy",
    "preference_loss",
    "linear_preference_loss",
    "kto_loss",
    "simpo_loss",
    "cpo_loss",
    "orpo_loss",
    "distill_loss",
    "topk_distill_loss",
    "linear_distill_loss",
    "policy_loss",
    "linear_policy_loss",
    "value_loss",
    "TokenLogprobs",
    "CrossEntropyLoss",
    "BACKENDS",
    "live_backends",
    "models",
    "__version__",
]
