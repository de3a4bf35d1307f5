"""Training objectives: what one optimizer step computes, on the fused losses.

Each objective turns its data into the micro-batches of one step, computes each micro-batch's loss
inside the model's forward (through :func:`posttrain_kernels.models.causal_lm_loss`, so the logits
are never built and FSDP / ZeRO-3 gather the head as usual), and normalizes it over the whole
accumulation window, so that the micro-batches' losses add up to the step's loss.

* :class:`SFT`: token cross-entropy on the completions, a mean over the window's completion tokens.
* :class:`Preference`: any loss of ``linear_preference_loss`` (DPO family, SimPO, CPO, ORPO), a
  mean over the window's pairs, against a frozen copy of the starting model or precomputed reference
  log-probs (``ref_chosen_logps`` / ``ref_rejected_logps`` fields of the records).
* :class:`PolicyGradient`: GRPO-family losses on rollouts sampled with the model's ``generate``,
  rewarded by plain Python callables, with group-normalized advantages, reused for
  ``num_iterations`` steps, an optional frozen reference for the KL term.
* :class:`Distill`: a divergence between the student's and a teacher's next-token distributions
  (``linear_distill_loss``), a mean over the window's tokens.
"""
from __future__ import annotations

import copy
import inspect
import math
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch
from torch import Tensor, nn

from .. import api as _api  # noqa: F401 - the losses below come from the package's public API
from ..api.linear_distill import linear_distill_loss
from ..api.linear_policy import linear_policy_loss
from ..api.linear_preference import LINEAR_PREFERENCE_LOSS_TYPES, linear_preference_loss
from ..api.linear_token_logprobs import linear_cross_entropy, linear_token_logprobs
from ..api.policy import policy_loss
from ..api.preference import DPO_LOSS_TYPES, preference_loss
from ..api.preference_free import cpo_loss, orpo_loss, simpo_loss
from .batches import IGNORE, completion_batch, completion_mask, decode, preference_batch, prompt_batch
from .cursor import DataCursor

Batch = Dict[str, Any]
Metrics = Dict[str, Tensor]

# Loss types of policy_loss whose policy term is a token mean over the window (TRL's dapo, cispo,
# vespo): they take the window's token count; the others take gradient_accumulation_steps.
_TOKEN_MEAN_TYPES = ("dapo", "cispo", "vespo")
# Preference loss types that need no reference model
_REFERENCE_FREE = ("simpo", "cpo", "orpo")


def _causal_lm_loss(model, loss_fn, **inputs):
    from ..models import causal_lm_loss  # transformers is imported only when a model is used
    return causal_lm_loss(model, loss_fn, **inputs)


def _check_options(options: Dict[str, Any], fns: Sequence[Callable], what: str, reserved=()) -> None:
    """``options`` are passed on to the loss functions ``fns`` at each step: a name that none of
    them takes (or one the objective sets itself, ``reserved``) is an error here, at construction,
    rather than a ``TypeError`` at the first step."""
    known = set()
    for fn in fns:
        known |= {n for n, p in inspect.signature(fn).parameters.items() if p.kind is p.KEYWORD_ONLY}
    known -= set(reserved)
    unknown = sorted(set(options) - known)
    if unknown:
        names = ", ".join(getattr(f, "__name__", str(f)) for f in fns)
        raise ValueError(f"{what}: unknown option(s) {', '.join(unknown)} (options passed on to {names}); "
                         f"known: {', '.join(sorted(known))}")


def rank_world() -> Tuple[int, int]:
    """``(rank, world size)`` of the default process group, ``(0, 1)`` without one."""
    dist = torch.distributed
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _frozen_copy(model: nn.Module) -> nn.Module:
    ref = copy.deepcopy(getattr(model, "module", model))  # the HF model inside a DDP wrapper
    ref.eval()
    for p in ref.parameters():
        p.requires_grad_(False)
    return ref


def _shifted(hidden: Tensor, labels: Tensor) -> Tuple[Tensor, Tensor]:
    """Position ``t`` predicts token ``t + 1``: hidden ``[:, :-1]`` against labels ``[:, 1:]``."""
    return hidden[:, :-1], labels[:, 1:].contiguous()


def _device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def _to(batch: Batch, device: torch.device) -> Batch:
    return {k: (v.to(device) if isinstance(v, Tensor) else v) for k, v in batch.items()}


class Objective:
    """Interface of the trainer's objectives (see the module docstring)."""

    name = "objective"
    # this process's rank and the number of ranks the trainer splits each global batch over (set
    # by the Trainer before bind)
    rank, world = 0, 1

    def _shard(self, records: List[dict]) -> List[dict]:
        """This rank's share of a global batch that every rank drew alike (the same seed): every
        ``world``-th record from ``rank``."""
        if self.world == 1:
            return records
        if len(records) < self.world:
            raise ValueError(f"batch_size: {type(self).__name__} needs at least one record per rank, got a "
                             f"global batch of {len(records)} for {self.world} ranks")
        return records[self.rank::self.world]

    def bind(self, model: nn.Module, config) -> None:
        """Called once by the trainer: the data cursor, frozen copies, anything sized by config."""
        self.config = config

    def step_batches(self, model: nn.Module) -> List[Batch]:
        """The ``config.grad_accum`` micro-batches of the next optimizer step."""
        raise NotImplementedError

    def loss(self, model: nn.Module, batch: Batch, window: Batch) -> Tuple[Tensor, Metrics]:
        """The micro-batch's share of the step's loss, and metrics that sum over the micro-batches
        to the step's (means already weighted by the micro-batch's share). ``window`` holds the
        step-wide normalizers from :meth:`window`."""
        raise NotImplementedError

    def window(self, batches: List[Batch]) -> Batch:
        return {}

    def state_dict(self) -> Dict[str, Any]:
        return {}

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        pass


class _RecordObjective(Objective):
    """Objectives over a list of records, taken in a seeded order by a :class:`DataCursor`."""

    def __init__(self, records: Sequence[dict], tokenizer, max_length: Optional[int] = None):
        if len(records) == 0:
            raise ValueError(f"records: expected at least one record for {type(self).__name__}, got none")
        self.records, self.tokenizer, self.max_length = list(records), tokenizer, max_length

    def bind(self, model, config) -> None:
        super().bind(model, config)
        self.cursor = DataCursor(len(self.records), seed=config.seed)

    def _next_records(self) -> List[dict]:
        """This rank's records of the next micro-batch (``batch_size`` records across all ranks)."""
        return self._shard([self.records[i] for i in self.cursor.take(self.config.batch_size)])

    def state_dict(self) -> Dict[str, Any]:
        return {"cursor": self.cursor.state_dict()}

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        self.cursor.load_state_dict(state["cursor"])


class _CompletionObjective(_RecordObjective):
    """Objectives over ``{"prompt", "completion"}`` records whose loss is a sum over the completion
    tokens, normalized by the window's token count (SFT, distillation)."""

    def step_batches(self, model) -> List[Batch]:
        out = []
        for _ in range(self.config.grad_accum):
            recs = self._next_records()
            out.append(completion_batch(self.tokenizer, [r["prompt"] for r in recs],
                                        [r["completion"] for r in recs], self.max_length))
        return out

    def window(self, batches) -> Batch:
        return {"tokens": sum(int((b["labels"][:, 1:] != IGNORE).sum()) for b in batches)}


class SFT(_CompletionObjective):
    """Supervised fine-tuning on ``{"prompt", "completion"}`` records: the cross-entropy of the
    completion tokens (and EOS), ``sum_tokens CE / tokens in the accumulation window``.

    Args:
        records: the data; tokenizer: encodes them (see :mod:`.batches`).
        label_smoothing, z_loss: as :func:`posttrain_kernels.linear_cross_entropy`.
        max_length: cut rows longer than this.
    """

    name = "sft"

    def __init__(self, records, tokenizer, *, label_smoothing: float = 0.0, z_loss: float = 0.0,
                 max_length: Optional[int] = None):
        super().__init__(records, tokenizer, max_length)
        self.label_smoothing, self.z_loss = label_smoothing, z_loss

    def loss(self, model, batch, window):
        batch = _to(batch, _device(model))
        backend = self.config.backend

        def fn(hidden, head):
            h, y = _shifted(hidden, batch["labels"])
            return linear_cross_entropy(h, head.weight, y, reduction="sum", label_smoothing=self.label_smoothing,
                                        z_loss=self.z_loss, backend=backend, **head.kwargs)

        total = _causal_lm_loss(model, fn, input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
        loss = total / max(window["tokens"], 1)
        n = int((batch["labels"][:, 1:] != IGNORE).sum())
        return loss, {"loss": loss.detach(), "tokens": torch.tensor(float(n))}


def sequence_logps(model, batch: Batch, backend: str, temperature: float = 1.0) -> Tensor:
    """``(S,)`` fp32 sums of the labelled tokens' log-probs of each row, no gradient."""
    def fn(hidden, head):
        h, y = _shifted(hidden, batch["labels"])
        lp, _ = linear_token_logprobs(h, head.weight, y, temperature=temperature, backend=backend, **head.kwargs)
        return (lp * (y != IGNORE)).sum(-1)

    with torch.no_grad():
        return _causal_lm_loss(model, fn, input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])


class Preference(_RecordObjective):
    """Preference optimization on ``{"prompt", "chosen", "rejected"}`` records with any loss of
    :func:`posttrain_kernels.linear_preference_loss` (the DPO family, a list of DPO types, SimPO,
    CPO, ORPO), a mean over the window's pairs.

    The reference: records carrying ``ref_chosen_logps`` and ``ref_rejected_logps`` (floats,
    precomputed sequence log-probs) use them; otherwise ``ref_model`` (default: a frozen copy of
    the model as it is when training starts). Reference-free types (``simpo``, ``cpo``, ``orpo``)
    use none.

    Args:
        loss_type, beta, average_log_prob, nll_alpha, loss_kwargs: as ``linear_preference_loss``.
    """

    name = "preference"

    def __init__(self, records, tokenizer, *, loss_type="sigmoid", beta: Optional[float] = None,
                 ref_model: Optional[nn.Module] = None, average_log_prob: bool = False,
                 nll_alpha: Optional[float] = None, max_length: Optional[int] = None, **loss_kwargs):
        super().__init__(records, tokenizer, max_length)
        types = (loss_type,) if isinstance(loss_type, str) else tuple(loss_type)
        bad = [t for t in types if t not in LINEAR_PREFERENCE_LOSS_TYPES or t in ("kto", "apo_zero_unpaired")]
        if not types or bad:
            paired = [t for t in LINEAR_PREFERENCE_LOSS_TYPES if t not in ("kto", "apo_zero_unpaired")]
            raise ValueError(f"loss_type: expected paired preference loss types among {', '.join(paired)}, "
                             f"got {loss_type!r}")
        self.loss_type, self.beta, self.ref_model = loss_type, beta, ref_model
        self.average_log_prob, self.nll_alpha, self.loss_kwargs = average_log_prob, nll_alpha, loss_kwargs
        self.needs_ref = types[0] not in _REFERENCE_FREE
        pair_fn = {"simpo": simpo_loss, "cpo": cpo_loss, "orpo": orpo_loss}.get(types[0], preference_loss)
        _check_options(loss_kwargs, [linear_preference_loss, pair_fn], "loss_kwargs", reserved=(
            "bias", "ref_logps", "loss_type", "beta", "average_log_prob", "nll_alpha", "backend", "chosen_lengths",
            "rejected_lengths", "rpo_alpha", "chosen_nll", "sft_weight", "cpo_alpha"))
        self.precomputed = all("ref_chosen_logps" in r and "ref_rejected_logps" in r for r in self.records)

    def bind(self, model, config) -> None:
        super().bind(model, config)
        if self.needs_ref and not self.precomputed and self.ref_model is None:
            self.ref_model = _frozen_copy(model)

    def step_batches(self, model) -> List[Batch]:
        out = []
        for _ in range(self.config.grad_accum):
            recs = self._next_records()
            b = preference_batch(self.tokenizer, recs, self.max_length)
            if self.needs_ref and self.precomputed:
                b["ref_logps"] = torch.tensor([float(r["ref_chosen_logps"]) for r in recs]
                                              + [float(r["ref_rejected_logps"]) for r in recs])
            out.append(b)
        return out

    def window(self, batches) -> Batch:
        return {"pairs": sum(b["input_ids"].shape[0] // 2 for b in batches)}

    def loss(self, model, batch, window):
        dev = _device(model)
        batch = _to(batch, dev)
        backend = self.config.backend
        ref = batch.get("ref_logps")
        if self.needs_ref and ref is None:
            ref = sequence_logps(self.ref_model, batch, backend).float()
        kwargs = dict(loss_type=self.loss_type, beta=self.beta, average_log_prob=self.average_log_prob,
                      nll_alpha=self.nll_alpha, backend=backend, **self.loss_kwargs)

        def fn(hidden, head):
            h, y = _shifted(hidden, batch["labels"])
            if head.softcap is not None:
                return self._softcapped(h, y, head, ref)
            h, bias = head.fold_scale(h)
            return linear_preference_loss(h, head.weight, y, bias=bias, ref_logps=ref, **kwargs)

        loss, metrics = _causal_lm_loss(model, fn, input_ids=batch["input_ids"],
                                        attention_mask=batch["attention_mask"])
        share = (batch["input_ids"].shape[0] // 2) / max(window["pairs"], 1)
        out = {"loss": loss.detach() * share}
        out.update({k: v.detach().float() * share for k, v in metrics.items()})
        return loss * share, out

    def _softcapped(self, h, y, head, ref):
        """A soft-capped head (Gemma 2/3): the token log-probs by ``linear_token_logprobs`` (which
        takes the soft-cap), then :func:`preference_loss` of their sums (DPO types only)."""
        types = (self.loss_type,) if isinstance(self.loss_type, str) else tuple(self.loss_type)
        if any(t not in DPO_LOSS_TYPES for t in types) or self.average_log_prob or self.nll_alpha:
            raise ValueError(f"loss_type: a soft-capped head supports the DPO loss types without "
                             f"average_log_prob / nll_alpha, got {self.loss_type!r}")
        lp, _ = linear_token_logprobs(h, head.weight, y, backend=self.config.backend, **head.kwargs)
        seq = (lp * (y != IGNORE)).sum(-1)
        b = seq.shape[0] // 2
        kw = {} if self.beta is None else {"beta": self.beta}
        return preference_loss(seq[:b], seq[b:], ref[:b], ref[b:], loss_type=self.loss_type, **kw,
                               **self.loss_kwargs)

    def state_dict(self):
        state = super().state_dict()
        if self.needs_ref and not self.precomputed:
            state["ref_model"] = self.ref_model.state_dict()
        return state

    def load_state_dict(self, state):
        super().load_state_dict(state)
        if "ref_model" in state:
            self.ref_model.load_state_dict(state["ref_model"])


RewardFn = Callable[..., Sequence[float]]


class PolicyGradient(_RecordObjective):
    """On-policy RL (GRPO family) on ``{"prompt", ...}`` records.

    Each generation: ``batch_size * grad_accum`` prompts, ``num_generations`` completions each,
    sampled with ``model.generate`` (``temperature``, ``max_new_tokens``); rewards
    ``r = sum_i w_i reward_fns[i](prompts=..., completions=..., **columns)`` (TRL's reward-function
    convention: lists in, a list of floats out; ``columns`` are the records' other fields, one list
    per field); advantages ``(r - mean_group) / (std_group + 1e-4)`` (TRL's ``scale_rewards=
    "group"``; ``scale_rewards=False``: no division). The rollouts then serve ``num_iterations``
    optimizer steps; with ``num_iterations > 1`` their log-probs under the sampling policy are kept
    as ``old_logps`` (the clipped ratio), else the step is on-policy (``old_logps=None``).

    Args:
        loss_type, beta (KL coefficient), epsilon_low/high, policy_kwargs: as
            :func:`posttrain_kernels.policy_loss`; ``beta > 0`` takes a frozen copy of the starting
            model as the reference (or ``ref_model``).
        mask_truncated_completions: completions without EOS get no loss (TRL's option).
        generation_kwargs: more arguments of ``model.generate`` (``suppress_tokens``, ...).
    """

    name = "policy_gradient"

    def __init__(self, records, tokenizer, reward_fns: Sequence[RewardFn], *, reward_weights=None,
                 num_generations: int = 4, max_new_tokens: int = 16, temperature: float = 1.0,
                 num_iterations: int = 1, loss_type: str = "dapo", beta: float = 0.0,
                 ref_model: Optional[nn.Module] = None, scale_rewards: bool = True,
                 mask_truncated_completions: bool = False, generation_kwargs: Optional[dict] = None,
                 **policy_kwargs):
        super().__init__(records, tokenizer)
        if callable(reward_fns):
            reward_fns = [reward_fns]
        if not reward_fns:
            raise ValueError("reward_fns: expected at least one reward function, got none")
        if reward_weights is not None and len(reward_weights) != len(reward_fns):
            raise ValueError(f"reward_weights: expected {len(reward_fns)} weights (one per reward function), "
                             f"got {len(reward_weights)}")
        if num_generations < 2:
            raise ValueError(f"num_generations: expected >= 2 (advantages are relative to the group), "
                             f"got {num_generations}")
        for name, v in (("max_new_tokens", max_new_tokens), ("num_iterations", num_iterations)):
            if v < 1:
                raise ValueError(f"{name}: expected >= 1, got {v}")
        _check_options(policy_kwargs, [linear_policy_loss, policy_loss], "policy_kwargs", reserved=(
            "bias", "ref_logps", "entropy", "temperature", "backend", "loss_type", "beta", "num_items_in_batch",
            "gradient_accumulation_steps"))
        self.reward_fns, self.reward_weights = list(reward_fns), reward_weights or [1.0] * len(reward_fns)
        self.num_generations, self.max_new_tokens, self.temperature = num_generations, max_new_tokens, temperature
        self.num_iterations, self.loss_type, self.beta = num_iterations, loss_type, beta
        self.ref_model, self.scale_rewards = ref_model, scale_rewards
        self.mask_truncated, self.policy_kwargs = mask_truncated_completions, policy_kwargs
        self.generation_kwargs = dict(generation_kwargs or {})
        self.rollouts: Optional[List[Batch]] = None
        self.uses = 0

    def bind(self, model, config) -> None:
        super().bind(model, config)
        if self.beta > 0 and self.ref_model is None:
            self.ref_model = _frozen_copy(model)

    # -- rollouts ----------------------------------------------------------------------------
    def _generate(self, model) -> List[Batch]:
        recs = self._shard([self.records[i] for i in self.cursor.take(self.config.batch_size * self.config.grad_accum)])
        g = self.num_generations
        prompts = [r["prompt"] for r in recs for _ in range(g)]
        tok = self.tokenizer
        enc = prompt_batch(tok, prompts)
        dev = _device(model)
        was_training = model.training
        model.eval()
        with torch.no_grad():
            out = getattr(model, "module", model).generate(input_ids=enc["input_ids"].to(dev), attention_mask=enc["attention_mask"].to(dev),
                                 do_sample=True, temperature=self.temperature, top_k=0, top_p=1.0,
                                 max_new_tokens=self.max_new_tokens, pad_token_id=tok.pad_token_id,
                                 eos_token_id=tok.eos_token_id, **self.generation_kwargs)
        model.train(was_training)
        p = enc["input_ids"].shape[1]
        comp = out[:, p:].cpu()
        mask, truncated = completion_mask(comp, tok.eos_token_id)
        texts = [decode(tok, row[m].tolist()) for row, m in zip(comp, mask)]
        columns = {k: [r[k] for r in recs for _ in range(g)] for k in recs[0] if k != "prompt"}
        rewards = torch.zeros(len(prompts))
        for w, fn in zip(self.reward_weights, self.reward_fns):
            values = fn(prompts=prompts, completions=texts, **columns)
            if len(values) != len(prompts):
                raise ValueError(f"reward_fns: {getattr(fn, '__name__', fn)} returned {len(values)} rewards "
                                 f"for {len(prompts)} completions")
            rewards += w * torch.tensor([float(v) for v in values])
        grouped = rewards.view(-1, g)
        adv = grouped - grouped.mean(dim=1, keepdim=True)
        if self.scale_rewards:
            adv = adv / (grouped.std(dim=1, keepdim=True) + 1e-4)
        adv = adv.reshape(-1)
        if self.mask_truncated:
            mask = mask & ~truncated.unsqueeze(1)
        seqs = out.cpu()
        attn = torch.cat([enc["attention_mask"], mask.long()], dim=1)
        labels = torch.where(mask, comp, torch.full_like(comp, IGNORE))
        n = len(prompts)
        per = n // self.config.grad_accum
        batches = []
        for i in range(0, n, per):
            sl = slice(i, i + per)
            batches.append({"input_ids": seqs[sl], "attention_mask": attn[sl], "labels": labels[sl],
                            "mask": mask[sl], "advantages": adv[sl], "rewards": rewards[sl],
                            "prompt_len": p})
        for b in batches:
            if self.num_iterations > 1:
                b["old_logps"] = self._token_logps(model, b)
            if self.beta > 0:
                b["ref_logps"] = self._token_logps(self.ref_model, b)
        return batches

    def _token_logps(self, model, b: Batch) -> Tensor:
        p = b["prompt_len"]
        dev = _device(model)
        ids, attn, y = b["input_ids"].to(dev), b["attention_mask"].to(dev), b["labels"].to(dev)

        def fn(hidden, head):
            lp, _ = linear_token_logprobs(hidden[:, p - 1:-1], head.weight, y, temperature=self.temperature,
                                          backend=self.config.backend, **head.kwargs)
            return lp

        with torch.no_grad():
            return _causal_lm_loss(model, fn, input_ids=ids, attention_mask=attn).cpu()

    def step_batches(self, model) -> List[Batch]:
        if self.rollouts is None or self.uses >= self.num_iterations:
            self.rollouts, self.uses = self._generate(model), 0
        self.uses += 1
        return self.rollouts

    def window(self, batches) -> Batch:
        return {"tokens": sum(int(b["mask"].sum()) for b in batches), "rows": sum(b["mask"].shape[0] for b in batches)}

    def loss(self, model, batch, window):
        dev = _device(model)
        b = _to(batch, dev)
        p = b["prompt_len"]
        kwargs = dict(self.policy_kwargs, loss_type=self.loss_type, beta=self.beta)
        if self.loss_type in _TOKEN_MEAN_TYPES and self.policy_kwargs.get("loss_agg_mode") in (None, "token-mean"):
            kwargs["num_items_in_batch"] = torch.tensor(float(max(window["tokens"], 1)), device=dev)
        else:  # the per-rank normalizers are means over this rank's rows: divided by every rank's share
            kwargs["gradient_accumulation_steps"] = self.config.grad_accum * self.world

        def fn(hidden, head):
            h = hidden[:, p - 1:-1]
            if head.softcap is not None:
                lp, ent = linear_token_logprobs(h, head.weight, b["labels"], temperature=self.temperature,
                                                return_entropy=True, backend=self.config.backend, **head.kwargs)
                return policy_loss(lp, b.get("old_logps"), b["advantages"], b["mask"], ref_logps=b.get("ref_logps"),
                                   entropy=ent, backend=self.config.backend, **kwargs)
            h, bias = head.fold_scale(h)
            return linear_policy_loss(h, head.weight, b["labels"], b.get("old_logps"), b["advantages"], b["mask"],
                                      bias=bias, ref_logps=b.get("ref_logps"), temperature=self.temperature,
                                      backend=self.config.backend, **kwargs)

        loss, metrics = _causal_lm_loss(model, fn, input_ids=b["input_ids"], attention_mask=b["attention_mask"])
        share = b["mask"].shape[0] / max(window["rows"], 1)
        out = {"loss": loss.detach(), "reward": b["rewards"].float().mean() * share,
               "tokens": torch.tensor(float(b["mask"].sum())),
               "completion_len": b["mask"].sum(1).float().mean() * share}
        out.update({k: v.detach().float() * share for k, v in metrics.items()})
        return loss, out

    def state_dict(self):
        state = super().state_dict()
        state.update({"rollouts": self.rollouts, "uses": self.uses})
        if self.beta > 0:
            state["ref_model"] = self.ref_model.state_dict()
        return state

    def load_state_dict(self, state):
        super().load_state_dict(state)
        self.rollouts, self.uses = state["rollouts"], state["uses"]
        if "ref_model" in state:
            self.ref_model.load_state_dict(state["ref_model"])


class Distill(_CompletionObjective):
    """Distillation of ``teacher`` into the trained model on ``{"prompt", "completion"}`` records:
    ``sum_tokens D(teacher || student) / tokens in the window`` over the completion tokens, by
    :func:`posttrain_kernels.linear_distill_loss` (both heads fused, no logits of either model),
    optionally mixed with the hard-label cross-entropy (``hard_label_weight``).

    The teacher's hidden states and head are read inside the teacher's forward (no gradient); the
    two models share the tokenizer (the student's vocabulary may be a prefix of the teacher's).
    """

    name = "distill"

    def __init__(self, records, tokenizer, teacher: nn.Module, *, divergence: str = "forward_kl",
                 beta: float = 0.5, temperature: float = 1.0, hard_label_weight: float = 0.0,
                 max_length: Optional[int] = None):
        super().__init__(records, tokenizer, max_length)
        self.teacher = teacher
        self.divergence, self.beta, self.temperature = divergence, beta, temperature
        self.hard_label_weight = hard_label_weight

    def bind(self, model, config) -> None:
        super().bind(model, config)
        # the teacher runs in eval mode under no_grad; its requires_grad flags stay as they are (it
        # may be a policy that a later stage trains again)
        self.teacher.eval()

    def loss(self, model, batch, window):
        batch = _to(batch, _device(model))
        inputs = dict(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
        with torch.no_grad():
            t_hidden, t_head = _causal_lm_loss(self.teacher, lambda h, head: (h.detach(), head), **inputs)
        if t_head.softcap is not None:
            raise ValueError("teacher: a soft-capped head is not supported by linear_distill_loss")
        t_hidden, t_bias = t_head.fold_scale(t_hidden)
        tw = t_head.weight.detach()
        w = self.hard_label_weight

        def fn(hidden, head):
            if head.softcap is not None:
                raise ValueError("model: a soft-capped head is not supported by linear_distill_loss")
            hs, y = _shifted(hidden, batch["labels"])
            hs, bias = head.fold_scale(hs)
            # reduction "sum" over the labelled tokens, divided by the window's: the divergence and
            # the cross-entropy are then both means over the window's tokens
            soft = linear_distill_loss(hs, head.weight, t_hidden[:, :-1], tw, labels=y, student_bias=bias,
                                       teacher_bias=None if t_bias is None else t_bias.detach(),
                                       divergence=self.divergence, beta=self.beta, temperature=self.temperature,
                                       reduction="sum", backend=self.config.backend)
            if w == 0:
                return soft
            hard = linear_cross_entropy(hs, head.weight, y, bias=bias, reduction="sum", backend=self.config.backend)
            return (1 - w) * soft + w * hard

        total = _causal_lm_loss(model, fn, **inputs)
        loss = total / max(window["tokens"], 1)
        n = int((batch["labels"][:, 1:] != IGNORE).sum())
        return loss, {"loss": loss.detach(), "tokens": torch.tensor(float(n))}
