"""``nn.Module`` wrappers of the loss families: the configuration goes to the constructor (validated
there), the per-batch tensors to ``forward``.

Preference optimization (``forward`` returns ``(loss, metrics)``)::

    DPOLoss(*, loss_type="sigmoid", beta=0.1, ...)
        forward(chosen_logps, rejected_logps, ref_chosen_logps=None, ref_rejected_logps=None, *, ...)
    SimPOLoss(*, beta=2.0, gamma=0.5, label_smoothing=0.0, sft_weight=0.0)
        forward(chosen_logps, rejected_logps, chosen_lengths, rejected_lengths, *, chosen_nll=None)
    CPOLoss(*, loss_type="sigmoid", beta=0.1, label_smoothing=0.0, cpo_alpha=1.0, simpo_gamma=0.5, alpha=0.0)
        forward(chosen_logps, rejected_logps, chosen_lengths=None, rejected_lengths=None, *, chosen_nll=None)
    ORPOLoss(*, beta=0.1)
        forward(chosen_logps, rejected_logps, chosen_lengths, rejected_lengths, *, chosen_nll=None)
    KTOLoss(*, loss_type="kto", beta=0.1, desirable_weight=1.0, undesirable_weight=1.0)
        forward(chosen_logps, rejected_logps, ref_chosen_logps, ref_rejected_logps, *,
                policy_KL_logps=None, ref_KL_logps=None, kl=None)

Policy gradient (``forward`` returns ``(loss, metrics)``)::

    PolicyLoss(*, loss_type="dapo", epsilon_low=0.2, ..., beta=0.0, kl_estimator="k3", ...)
        forward(logps, old_logps, advantages, mask, *, ref_logps=None, entropy=None, ...)
    ValueLoss(*, cliprange_value=0.2, loss_agg_mode="token-mean", ...)
        forward(values, old_values, returns, mask, *, num_items_in_batch=None)
"""
from .policy import PolicyLoss, ValueLoss
from .preference import CPOLoss, DPOLoss, KTOLoss, ORPOLoss, SimPOLoss

__all__ = ["DPOLoss", "SimPOLoss", "CPOLoss", "ORPOLoss", "KTOLoss", "PolicyLoss", "ValueLoss"]
