"""Backends: each exposes the same four launchers of the token log-prob family.

  token_logprobs_forward(logits2d, labels2d, inv_temperature, ignore_index, compute_entropy)
      -> (logp [N, K] fp32, entropy [N] fp32 or empty, lse [N] fp32)
  token_logprobs_backward(logits2d, labels2d, lse, entropy, grad_logp, grad_entropy,
                          inv_temperature, ignore_index) -> grad_logits [N, V] (logits dtype)
  cross_entropy_forward(logits2d, labels1d, ignore_index, label_smoothing, z_loss, softcap)
      -> (loss [N] fp32, lse [N] fp32)
  cross_entropy_backward(logits2d, labels1d, lse, grad_loss, ignore_index, label_smoothing,
                         z_loss, softcap) -> grad_logits

``logits2d`` has unit stride along the vocabulary and any row stride; labels are contiguous int64.
Backends never import each other; ``posttrain_kernels.dispatch`` chooses among them.
"""
