"""Fused-linear preference losses: DPO family, SimPO, CPO, ORPO and KTO from hidden states and the
head weight, with no logits of the policy or the reference model in memory."""
from __future__ import annotations

from typing import Callable, Dict, List, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor

from .. import _validation as V
from ..dispatch import resolve_backend
from ..ops.linear_head import logits_element_size, use_vocab_blocks
from ..ops.linear_sequence_loss import LinearSequenceLoss
from ..reference import linear_token_logprobs_reference
from .linear_token_logprobs import (_autocast_inputs, _prepare, _schedule, linear_token_logprobs,
                                    sequence_group_budget)
from .preference import DPO_LOSS_TYPES, KTO_LOSS_TYPES, KTO_METRICS, PREFERENCE_METRICS, kto_loss, preference_loss
from .preference_free import ORPO_METRICS, cpo_loss, orpo_loss, simpo_loss

REFERENCE_FREE_LOSS_TYPES = ("simpo", "cpo", "orpo")
LINEAR_PREFERENCE_LOSS_TYPES = DPO_LOSS_TYPES + REFERENCE_FREE_LOSS_TYPES + KTO_LOSS_TYPES
"""The ``loss_type`` values of :func:`linear_preference_loss`."""

# Loss types whose loss couples the pairs of the batch (they sort over it): one group for all.
_BATCH_COUPLED = ("aot", "aot_unpaired")
# Default weight of the NLL term on the chosen completions, per loss type (TRL's defaults: ORPO
# always adds it, CPO's cpo_alpha is 1.0; DPO's rpo_alpha and SimPO's sft_weight are off).
_DEFAULT_NLL_ALPHA = {"orpo": 1.0, "cpo": 1.0}


def _seq_sums(token_logps: Tensor) -> Tensor:
    return token_logps.sum(-1)


def _pair_loss_fn(loss_type, beta, nll_alpha, average_log_prob, loss_kwargs) -> Callable:
    """(chosen, rejected, ref_chosen, ref_rejected, len_c, len_r, nll) -> (loss, metrics), on
    per-sequence sums of token log-probs; ``nll`` the per-pair NLL term (see _nll_per_pair)."""
    types = (loss_type,) if isinstance(loss_type, str) else tuple(loss_type)
    kw = dict(loss_kwargs)
    if beta is not None:
        kw["beta"] = beta
    if types[0] == "simpo":
        def fn(c, r, rc, rr, lc, lr, nll):
            return simpo_loss(c, r, lc, lr, sft_weight=nll_alpha, chosen_nll=nll if nll_alpha else None, **kw)
    elif types[0] == "cpo":
        def fn(c, r, rc, rr, lc, lr, nll):
            return cpo_loss(c, r, lc, lr, chosen_nll=nll if nll_alpha else None, cpo_alpha=nll_alpha, **kw)
    elif types[0] == "orpo":
        def fn(c, r, rc, rr, lc, lr, nll):
            return orpo_loss(c, r, lc, lr, chosen_nll=nll * nll_alpha if nll_alpha else None, **kw)
    else:
        def fn(c, r, rc, rr, lc, lr, nll):
            if average_log_prob:  # the scores of every DPO loss type become per-token averages
                c, r = c / lc.clamp_min(1), r / lr.clamp_min(1)
                if rc is not None:
                    rc, rr = rc / lc.clamp_min(1), rr / lr.clamp_min(1)
            needs_nll = "sft" in types or bool(nll_alpha)
            return preference_loss(c, r, rc, rr, loss_type=loss_type, chosen_lengths=lc, rejected_lengths=lr,
                                   rpo_alpha=nll_alpha or None, chosen_nll=nll if needs_nll else None, **kw)
    return fn


def _metric_names(loss_type) -> Tuple[str, ...]:
    first = loss_type if isinstance(loss_type, str) else loss_type[0]
    if first in KTO_LOSS_TYPES:
        return KTO_METRICS
    return ORPO_METRICS if first == "orpo" else PREFERENCE_METRICS


def _check_layout(labels: Tensor, hidden: Tensor, name: str) -> Tuple[int, int]:
    if hidden.dim() != 3:
        raise ValueError(f"{name}: expected shape (S, T, H) (sequences, tokens, hidden), got "
                         f"{tuple(hidden.shape)}")
    if labels.dim() != 2 or tuple(labels.shape) != tuple(hidden.shape[:2]):
        raise ValueError(f"labels: expected shape {tuple(hidden.shape[:2])} (the first two dimensions "
                         f"of {name}), got {tuple(labels.shape)}")
    return hidden.shape[0], hidden.shape[1]


def linear_preference_loss(
    hidden: Tensor,
    weight: Tensor,
    labels: Tensor,
    *,
    bias: Optional[Tensor] = None,
    ref_hidden: Optional[Tensor] = None,
    ref_weight: Optional[Tensor] = None,
    ref_bias: Optional[Tensor] = None,
    ref_logps: Optional[Tensor] = None,
    loss_type: Union[str, Sequence[str]] = "sigmoid",
    beta: Optional[float] = None,
    average_log_prob: bool = False,
    nll_alpha: Optional[float] = None,
    desirable: Optional[Tensor] = None,
    kl: Optional[Union[float, Tensor]] = None,
    policy_KL_logps: Optional[Tensor] = None,
    ref_KL_logps: Optional[Tensor] = None,
    ignore_index: int = -100,
    chunk_size: Optional[int] = None,
    fp32_logits: bool = False,
    backend: str = "auto",
    **loss_kwargs,
) -> Tuple[Tensor, Dict[str, Tensor]]:
    """A preference loss from the policy's hidden states and head, no logits in memory.

    Layout (TRL's and Liger's): ``hidden (S, T, H)`` and ``labels (S, T)`` hold ``S`` sequences
    (prompt + completion, shifted so that ``labels[s, t]`` is the token predicted from
    ``hidden[s, t]``), ``labels`` equal to ``ignore_index`` outside the completions. For the paired
    loss types the first ``B = S / 2`` rows are the chosen completions and the last ``B`` the
    rejected ones, pair ``i`` being rows ``i`` and ``B + i``; for ``"kto"`` /
    ``"apo_zero_unpaired"`` each row is one example and ``desirable (S,)`` bool says which are
    desirable.

    The sequence log-prob of row ``s`` is ``logp_s = sum_t log softmax(hidden[s, t] @ weight.T +
    bias)[labels[s, t]]`` over its completion tokens (``n_s`` of them), computed by the fused
    linear log-prob kernels; then

    * ``loss_type`` in :data:`DPO_LOSS_TYPES` (or a list of them): :func:`preference_loss` of
      ``(logp_chosen, logp_rejected, ref_chosen, ref_rejected)`` with the token counts
      (``average_log_prob=True``: every score divided by its ``n_s`` first);
    * ``"simpo"``, ``"cpo"``, ``"orpo"``: :func:`simpo_loss`, :func:`cpo_loss`, :func:`orpo_loss`;
    * ``"kto"``, ``"apo_zero_unpaired"``: :func:`kto_loss` of the desirable / undesirable rows,
      with the KL reference point ``kl`` or the precomputed ``policy_KL_logps`` / ``ref_KL_logps``
      (log-probs of mismatched completions, a mean taken over the whole batch).

    The NLL term (RPO for the DPO family, CPO's, ORPO's, SimPO's ``sft_weight``) is TRL's: the mean
    over all chosen completion tokens of ``-log p``, weighted by ``nll_alpha`` (defaults: 1 for
    ``"orpo"`` and ``"cpo"``, else 0), from the same pass as the log-probs.

    The reference's sequence log-probs come from ``ref_logps (S,)`` (precomputed) or from
    ``ref_hidden (S, T, H')``, ``ref_weight (V, H')`` and ``ref_bias`` through the same fused
    kernels without gradients (one forward GEMM); reference-free loss types need neither.

    Schedule: the loss is a mean over pairs (examples) of terms of one pair each, so the pairs are
    processed in groups that fit the chunk budget (``chunk_size`` token rows; by default
    ``POSTTRAIN_KERNELS_CHUNK_BYTES``, at least 128 MiB on the CPU): a group's logits,
    log-probs, loss, and the gradient of its logits (written in place) follow one another, with
    the gradient GEMMs accumulating into the weight gradient in fp32: three GEMMs for the policy.
    ``"aot"`` / ``"aot_unpaired"``, which sort over the batch, form one group (recomputing its
    logits: four GEMMs); a bf16/fp16 head whose gradient is wanted goes through
    :func:`linear_token_logprobs` (vocabulary-blocked backward, no ``(V, H)`` fp32 buffer).

    ``beta``: ``None`` takes each loss function's default (0.1; SimPO's 2.0). ``loss_kwargs`` go to
    the loss function (``label_smoothing``, ``loss_weights``, ``gamma``, ``f_divergence_type``, ...).

    Returns:
        ``(loss, metrics)``: the fp32 scalar loss (differentiable in ``hidden``, ``weight``,
        ``bias``) and the loss function's metrics (detached fp32 scalars: batch means).
    """
    types = (loss_type,) if isinstance(loss_type, str) else tuple(loss_type)
    if not types or any(t not in LINEAR_PREFERENCE_LOSS_TYPES for t in types):
        raise ValueError(f"loss_type: expected one of {LINEAR_PREFERENCE_LOSS_TYPES} (or a list of DPO "
                         f"loss types), got {loss_type!r}")
    if len(types) > 1 and any(t not in DPO_LOSS_TYPES for t in types):
        raise ValueError(f"loss_type: only DPO loss types combine in a list, got {loss_type!r}")
    family = types[0]
    unpaired = family in KTO_LOSS_TYPES
    # fp64 only on the materialized path (an oracle for tests)
    _prepare(hidden, weight, bias, labels, chunk_size, allow_fp64=(backend == "reference"))
    s, t = _check_layout(labels, hidden, "hidden")
    if not unpaired and s % 2:
        raise ValueError(f"hidden: a paired loss ({family!r}) needs chosen rows then rejected rows, an "
                         f"even number of sequences, got {s}")
    if unpaired:
        if desirable is None:
            raise ValueError(f"desirable: loss_type {family!r} needs the (S,) bool desirable flags, got None")
        V.check_tensor("desirable", desirable)
        if desirable.dtype != torch.bool or tuple(desirable.shape) != (s,):
            raise ValueError(f"desirable: expected a ({s},) bool tensor, got {tuple(desirable.shape)} "
                             f"{desirable.dtype}")
    elif desirable is not None:
        raise ValueError(f"desirable: only for the unpaired loss types {KTO_LOSS_TYPES}, got a tensor "
                         f"with loss_type {family!r}")
    if average_log_prob and family not in DPO_LOSS_TYPES:
        raise ValueError(f"average_log_prob: only for the DPO loss types ({family!r} defines its own "
                         "normalization), got True")
    if nll_alpha is None:
        nll_alpha = _DEFAULT_NLL_ALPHA.get(family, 0.0)
    nll_alpha = float(V.check_range("nll_alpha", nll_alpha, 0.0, float("inf")))
    if unpaired and nll_alpha:
        raise ValueError(f"nll_alpha: loss_type {family!r} has no NLL term, got {nll_alpha}")
    if beta is not None:
        beta = V.check_positive("beta", beta)
    name = resolve_backend(backend, hidden.device)
    V.check_label_range(labels, weight.shape[0], ignore_index)

    ref = _reference_logps(ref_logps, ref_hidden, ref_weight, ref_bias, labels, s, ignore_index, chunk_size,
                           backend, hidden)
    lengths = (labels != ignore_index).sum(-1)
    if name == "reference":
        lp, _ = linear_token_logprobs_reference(hidden, weight, labels, bias, ignore_index=ignore_index)
        seq = _seq_sums(lp)
        return _whole_batch_loss(seq, ref, lengths, types, unpaired, desirable, beta, nll_alpha,
                                 average_log_prob, kl, policy_KL_logps, ref_KL_logps, loss_kwargs)
    hidden, weight, bias = _autocast_inputs(hidden, weight, bias)
    grad_w = torch.is_grad_enabled() and weight.requires_grad
    if use_vocab_blocks(weight, grad_w):
        lp, _ = linear_token_logprobs(hidden, weight, labels, bias=bias, ignore_index=ignore_index,
                                      chunk_size=chunk_size, fp32_logits=fp32_logits, backend=name)
        return _whole_batch_loss(_seq_sums(lp), ref, lengths, types, unpaired, desirable, beta, nll_alpha,
                                 average_log_prob, kl, policy_KL_logps, ref_KL_logps, loss_kwargs)
    chunk, _ = _schedule(chunk_size, s * t, weight, fp32_logits, sequence_group_budget(weight.device))
    if unpaired:
        groups, seq_loss = _kto_groups(s, t, chunk, ref, desirable, family, beta, kl, policy_KL_logps,
                                       ref_KL_logps, loss_kwargs)
    else:
        groups, seq_loss = _pair_groups(s // 2, t, chunk, ref, lengths, types, beta, nll_alpha,
                                        average_log_prob, loss_kwargs)
    metric_names = _metric_names(loss_type)
    h = hidden.shape[-1]
    with torch.autocast(hidden.device.type, enabled=False):
        loss, met = LinearSequenceLoss.apply(
            hidden.reshape(-1, h), weight, bias, labels.reshape(-1, 1).to(torch.int64).contiguous(),
            groups, t, seq_loss, metric_names, 1.0, int(ignore_index), chunk, bool(fp32_logits),
            torch.is_grad_enabled(), name)
    metrics = dict(zip(metric_names, met.unbind()))
    if "rewards/margins" in metrics and unpaired:
        metrics["rewards/margins"] = metrics["rewards/chosen"] - metrics["rewards/rejected"]
    return loss, metrics


def _reference_logps(ref_logps, ref_hidden, ref_weight, ref_bias, labels, s, ignore_index, chunk_size,
                     backend, hidden) -> Optional[Tensor]:
    """The reference's (S,) sequence log-probs: given, or from its hidden states without gradients."""
    if ref_logps is not None:
        if ref_hidden is not None or ref_weight is not None:
            raise ValueError("ref_logps: expected either ref_logps or ref_hidden and ref_weight, got both")
        V.check_tensor("ref_logps", ref_logps)
        V.check_float("ref_logps", ref_logps, allow_fp64=True)
        if tuple(ref_logps.shape) != (s,):
            raise ValueError(f"ref_logps: expected shape ({s},) (one per sequence of hidden), got "
                             f"{tuple(ref_logps.shape)}")
        V.check_same_device(hidden=hidden, ref_logps=ref_logps)
        return ref_logps.detach().float()
    if (ref_hidden is None) != (ref_weight is None):
        missing = "ref_weight" if ref_weight is None else "ref_hidden"
        raise ValueError(f"{missing}: expected with {'ref_hidden' if missing == 'ref_weight' else 'ref_weight'}, "
                         "got None")
    if ref_hidden is None:
        return None
    _check_layout(labels, ref_hidden, "ref_hidden")
    with torch.no_grad():
        if backend == "reference":
            lp, _ = linear_token_logprobs_reference(ref_hidden, ref_weight, labels, ref_bias,
                                                    ignore_index=ignore_index)
        else:
            # no gradient, so nothing else is alive beside the chunk: the policy groups' budget
            # (larger GEMMs on the CPU) costs no extra peak
            if chunk_size is None:
                chunk_size = max(1, sequence_group_budget(ref_weight.device)
                                 // (ref_weight.shape[0] * logits_element_size(ref_weight, False)))
            lp, _ = linear_token_logprobs(ref_hidden, ref_weight, labels, bias=ref_bias,
                                          ignore_index=ignore_index, chunk_size=chunk_size, backend=backend)
    return _seq_sums(lp)


def _nll_per_pair(chosen: Tensor, n_pairs: int, chosen_tokens: Tensor) -> Tensor:
    """Per-pair NLL whose mean over the batch's pairs is TRL's NLL, the mean over all chosen
    completion tokens of -log p: ``-logp_chosen * B / (number of chosen completion tokens)``."""
    return -chosen * (n_pairs / chosen_tokens.clamp_min(1).to(chosen.dtype))


def _pair_groups(b, t, chunk, ref, lengths, types, beta, nll_alpha, average_log_prob, loss_kwargs):
    fn = _pair_loss_fn(types if len(types) > 1 else types[0], beta, nll_alpha, average_log_prob, loss_kwargs)
    per_group = b if any(x in _BATCH_COUPLED for x in types) else max(1, chunk // (2 * max(t, 1)))
    starts = list(range(0, b, per_group))
    chosen_tokens = lengths[:b].sum()

    def seq_loss(seq: Tensor, gi: int):
        p0 = starts[gi]
        p1 = min(p0 + per_group, b)
        n = p1 - p0
        c, r = seq[:n], seq[n:]
        rc = None if ref is None else ref[p0:p1]
        rr = None if ref is None else ref[b + p0:b + p1]
        loss, met = fn(c, r, rc, rr, lengths[p0:p1], lengths[b + p0:b + p1], _nll_per_pair(c, b, chosen_tokens))
        share = n / b  # the group's metrics are means over its n pairs
        return loss * share, {k: v * share for k, v in met.items()}

    groups = [(slice(p0 * t, min(p0 + per_group, b) * t),
               slice((b + p0) * t, (b + min(p0 + per_group, b)) * t)) for p0 in starts]
    return groups, seq_loss


def _kto_groups(s, t, chunk, ref, desirable, family, beta, kl, policy_KL_logps, ref_KL_logps, loss_kwargs):
    if ref is None:
        raise ValueError(f"ref_logps: loss_type {family!r} needs the reference (ref_logps, or ref_hidden "
                         "and ref_weight), got None")
    kw = dict(loss_kwargs)
    if beta is not None:
        kw["beta"] = beta
    z0 = _kto_reference_point(family, kl, policy_KL_logps, ref_KL_logps)
    per_group = max(1, chunk // max(t, 1))
    starts = list(range(0, s, per_group))
    n_des = desirable.sum().clamp_min(1).float()
    n_und = (~desirable).sum().clamp_min(1).float()

    def seq_loss(seq: Tensor, gi: int):
        e0 = starts[gi]
        e1 = min(e0 + per_group, s)
        d = desirable[e0:e1]
        loss, met = kto_loss(seq[d], seq[~d], ref[e0:e1][d], ref[e0:e1][~d], kl=z0, loss_type=family, **kw)
        # loss: kto_loss averages over the group's examples; metrics: means over its desirable
        # (chosen) / undesirable (rejected) rows, reweighted to means over the batch's
        wd, wu = d.sum() / n_des, (~d).sum() / n_und
        out = {k: v * (wd if "chosen" in k else wu if "rejected" in k else (e1 - e0) / s) for k, v in met.items()}
        return loss * ((e1 - e0) / s), out

    groups = [(slice(e0 * t, min(e0 + per_group, s) * t),) for e0 in starts]
    return groups, seq_loss


def _kto_reference_point(family, kl, policy_KL_logps, ref_KL_logps):
    """KTO's z0 for the whole batch (the groups each see the same one); None for apo_zero_unpaired."""
    if family != "kto":
        return kl
    if kl is not None or policy_KL_logps is None or ref_KL_logps is None:
        return kl  # kto_loss validates (and reports a missing reference point)
    V.check_tensor("policy_KL_logps", policy_KL_logps)
    V.check_tensor("ref_KL_logps", ref_KL_logps)
    if policy_KL_logps.shape != ref_KL_logps.shape or policy_KL_logps.dim() != 1:
        raise ValueError(f"ref_KL_logps: expected the 1-D shape of policy_KL_logps "
                         f"{tuple(policy_KL_logps.shape)}, got {tuple(ref_KL_logps.shape)}")
    d = policy_KL_logps.detach().float() - ref_KL_logps.detach().float()
    return (d.sum() / max(d.shape[0], 1)).clamp(min=0)


def _whole_batch_loss(seq, ref, lengths, types, unpaired, desirable, beta, nll_alpha, average_log_prob, kl,
                      policy_KL_logps, ref_KL_logps, loss_kwargs):
    """The loss of the whole batch at once, on its (S,) sequence log-probs (differentiable)."""
    if unpaired:
        if ref is None:
            raise ValueError(f"ref_logps: loss_type {types[0]!r} needs the reference (ref_logps, or ref_hidden "
                             "and ref_weight), got None")
        kw = dict(loss_kwargs)
        if beta is not None:
            kw["beta"] = beta
        z0 = _kto_reference_point(types[0], kl, policy_KL_logps, ref_KL_logps)
        return kto_loss(seq[desirable], seq[~desirable], ref[desirable], ref[~desirable], kl=z0,
                        loss_type=types[0], **kw)
    b = seq.shape[0] // 2
    fn = _pair_loss_fn(types if len(types) > 1 else types[0], beta, nll_alpha, average_log_prob, loss_kwargs)
    c, r = seq[:b], seq[b:]
    rc = None if ref is None else ref[:b]
    rr = None if ref is None else ref[b:]
    return fn(c, r, rc, rr, lengths[:b], lengths[b:], _nll_per_pair(c, b, lengths[:b].sum()))
