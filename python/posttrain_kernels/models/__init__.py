"""Losses of any Hugging Face causal LM from its final hidden states and head, without logits.

Generic::

    causal_lm_loss(model, loss_fn, **model_inputs)      # loss_fn(hidden, head) inside the forward

Convenience (HF alignment: labels are shifted by one inside)::

    token_logprobs(model, input_ids, attention_mask=None, labels=None, *, temperature=1.0,
                   return_entropy=False, backend="auto")          # -> (logps, entropy), (B, T)
    cross_entropy(model, input_ids, labels, attention_mask=None, *, reduction="mean",
                  num_items_in_batch=None, backend="auto")        # == HF's ForCausalLMLoss

The head's forward is intercepted during the model's own forward, so FSDP / DeepSpeed ZeRO-3
parameter gathering applies and a PEFT LoRA adapter on the head gets its gradient; soft-capping
and logit scaling come from the config and are checked against the forward (see
:mod:`.causal_lm_loss`). Importing this package does not import ``transformers`` or ``peft``.
"""
from .causal_lm_loss import causal_lm_loss
from .head import Head, UnsupportedModelError, output_embeddings
from .logit_transform import LogitTransform
from .next_token_losses import cross_entropy, next_token_labels, token_logprobs

__all__ = [
    "causal_lm_loss",
    "token_logprobs",
    "cross_entropy",
    "next_token_labels",
    "Head",
    "LogitTransform",
    "UnsupportedModelError",
    "output_embeddings",
]
