"""Any loss of the library from a causal LM's final hidden states and head, computed inside the
model's forward: the generic mechanism of :mod:`posttrain_kernels.models`.

Mechanism. During ``model(**model_inputs)`` the forward of the output-embedding module
(``model.get_output_embeddings()``) is replaced, and restored afterwards even on exceptions. The
replacement receives the final hidden states, reads the head's weight and bias *inside the
module's call* (FSDP / DeepSpeed ZeRO-3 have gathered them there, and a PEFT LoRA adapter enters
differentiably: :mod:`.lora_head`), calls ``loss_fn(hidden, head)`` and returns, in place of the
``(..., V)`` logits, a ``(..., K)`` probe with ``K = 10`` known values. Whatever the model does
after its head (soft-capping, scaling, ``.float()``) therefore costs nothing, and what it made
of the probe is compared with the :class:`LogitTransform` read from its config, which the loss
received: a transform that was not read raises :class:`UnsupportedModelError` instead of a
silently wrong loss.

Backward under parameter sharding. The loss's backward needs the head weight again; FSDP and
ZeRO-3 re-gather a module's parameters when the gradient reaches the module's *outputs*. So the
loss tensors are routed through the head's output and the model's ``logits``: the probe is an
output of an autograd node that takes the loss tensors as inputs, and the returned loss tensors
are identities that also take the model's logits as input (and send them a zero gradient). The
loss's backward thus runs only after the gradient passed the head's output and its hooks.
"""
from __future__ import annotations

import contextlib
from typing import Any, Callable, List, Optional

import torch
from torch import Tensor, nn
from torch.utils import _pytree as pytree

from .forward_patch import original_forward, patched_forward
from .head import Head, UnsupportedModelError, is_dtensor, model_name, output_embeddings, unwrap
from .logit_transform import PROBE, LogitTransform, check_probe, probe_tensor
from .lora_head import active_adapters, lora_head_forward, peft_classes


class _Bridge(torch.autograd.Function):
    """probe -> probe, with the loss tensors as (gradient-less) inputs: the loss's backward nodes
    wait for this node, which runs after the head's output hooks."""

    @staticmethod
    def forward(ctx, probe, *tensors):
        ctx.n = len(tensors)
        return probe.clone()

    @staticmethod
    def backward(ctx, grad):
        return (None,) * (1 + ctx.n)


class _Reattach(torch.autograd.Function):
    """(logits, *tensors) -> tensors; the logits get a zero gradient, so the backward goes through
    the model's output, its hooks, and the head's output hooks before the loss's own backward."""

    @staticmethod
    def forward(ctx, logits, *tensors):
        ctx.logits_meta = (logits.shape, logits.dtype, logits.device)
        return tuple(t.view_as(t) for t in tensors)

    @staticmethod
    def backward(ctx, *grads):
        shape, dtype, device = ctx.logits_meta
        return (torch.zeros(shape, dtype=dtype, device=device),) + grads


def _grad_leaves(result):
    leaves, spec = pytree.tree_flatten(result)
    idx = [i for i, t in enumerate(leaves)
           if isinstance(t, Tensor) and t.requires_grad and t.is_floating_point()]
    return leaves, spec, idx


def _is_plain_linear(module: nn.Module) -> bool:
    return isinstance(module, nn.Linear) and original_forward(module) is nn.Linear.forward


def _not_linear(module: nn.Module, model) -> UnsupportedModelError:
    fwd = original_forward(module)
    why = ("its forward was replaced on the instance" if fwd is None else
           f"{type(module).__name__}.forward is not nn.Linear.forward" if isinstance(module, nn.Linear)
           else f"it is a {type(module).__name__}, not an nn.Linear")
    return UnsupportedModelError(
        f"{model_name(model)}: the output embeddings (model.get_output_embeddings()) must compute "
        f"hidden @ weight.T + bias like nn.Linear, but {why} (quantized, custom or otherwise "
        "non-linear heads are not supported)")


def _plan(module: nn.Module, model) -> List[tuple]:
    """``[(module, kind)]`` to intercept, kind ``"linear"`` or ``"lora"``; raises for heads that
    cannot be expressed as ``(weight, bias)``."""
    if _is_plain_linear(module):
        return [(module, "linear")]
    peft = peft_classes()
    if peft is not None:
        base_tuner, lora_linear, modules_to_save = peft
        if isinstance(module, modules_to_save):  # lm_head in modules_to_save: the active copy runs
            inner = [module.original_module] + list(module.modules_to_save.values())
            return [p for m in inner for p in _plan(m, model)]
        if isinstance(module, lora_linear) and original_forward(module) is type(module).forward:
            base = module.get_base_layer()
            if not _is_plain_linear(base):
                raise _not_linear(base, model)
            active_adapters(module, model_name(model))  # raises early for variants
            return [(module, "lora")]
        if isinstance(module, base_tuner):
            raise UnsupportedModelError(
                f"{model_name(model)}: the LM head is wrapped by the PEFT layer "
                f"{type(module).__name__}; posttrain_kernels.models supports plain LoRA "
                "(peft.tuners.lora.Linear) and modules_to_save on the head")
    raise _not_linear(module, model)


def _check_weight(model, weight: Tensor, bias: Optional[Tensor]) -> None:
    if is_dtensor(weight):
        raise UnsupportedModelError(
            f"{model_name(model)}: the head weight is a DTensor inside the forward (tensor "
            "parallelism); posttrain_kernels.models needs the full (V, H) weight there, as FSDP "
            "and ZeRO-3 provide")
    if weight.dim() != 2 or not weight.is_floating_point() or weight.numel() == 0:
        raise UnsupportedModelError(
            f"{model_name(model)}: expected a 2-D floating head weight (V, H) inside the forward, "
            f"got {tuple(weight.shape)} {weight.dtype} (a sharded parameter read outside the "
            "gathering of FSDP / ZeRO-3, or a quantized head)")
    if bias is not None and tuple(bias.shape) != (weight.shape[0],):
        raise UnsupportedModelError(
            f"{model_name(model)}: expected a head bias of shape ({weight.shape[0]},), got "
            f"{tuple(bias.shape)}")


class _Interception:
    def __init__(self, model, loss_fn, transform: LogitTransform):
        self.model, self.loss_fn, self.transform = model, loss_fn, transform
        self.calls = 0
        self.done = False
        self.result = None
        self.probe_dtype = None

    def finish(self, hidden: Tensor, weight: Tensor, bias: Optional[Tensor]) -> Tensor:
        self.calls += 1
        if self.calls > 1:
            raise UnsupportedModelError(
                f"{model_name(self.model)}: the forward called its output embeddings more than "
                "once; posttrain_kernels.models needs exactly one call (the LM head)")
        _check_weight(self.model, weight, bias)
        t = self.transform
        if t.vocab_size is not None and t.vocab_size < weight.shape[0]:
            weight = weight[: t.vocab_size]
            bias = None if bias is None else bias[: t.vocab_size]
        head = Head(weight, bias, t.softcap, t.logit_scale)
        result = self.loss_fn(hidden, head)
        self.result = result
        self.done = True
        dev = hidden.device.type
        dtype = (torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else hidden.dtype)
        self.probe_dtype = dtype
        probe = probe_tensor(hidden.shape[:-1], dtype, hidden.device)
        leaves, _, idx = _grad_leaves(result)
        if idx and torch.is_grad_enabled():
            probe = _Bridge.apply(probe, *[leaves[i] for i in idx])
        return probe

    def linear_forward(self, module: nn.Module, x: Tensor) -> Tensor:
        return self.finish(x, module.weight, module.bias)  # read inside module.__call__

    def forward_for(self, module: nn.Module, kind: str) -> Callable:
        def forward(x, *args, **kwargs):
            extra = [f"{k}={v!r}" for k, v in kwargs.items() if v is not None]
            if args or extra:  # e.g. PEFT's per-sample adapter_names
                raise UnsupportedModelError(
                    f"{model_name(self.model)}: the head was called with arguments besides the "
                    f"hidden states ({len(args)} positional, {', '.join(extra) or 'no keywords'}), "
                    "which posttrain_kernels.models cannot fuse (mixed-adapter batches included)")
            if kind == "linear":
                return self.linear_forward(module, x)
            return lora_head_forward(module, x, self.linear_forward, self.finish)

        return forward


def _logits_of(outputs):
    logits = getattr(outputs, "logits", None)
    if logits is None and isinstance(outputs, (tuple, list)) and outputs:
        logits = outputs[0]
    return logits


def causal_lm_loss(
    model: nn.Module,
    loss_fn: Callable[[Tensor, Head], Any],
    *,
    logit_transform: Optional[LogitTransform] = None,
    check_logits: bool = True,
    return_outputs: bool = False,
    **model_inputs,
):
    """``loss_fn(hidden, head)`` computed inside ``model(**model_inputs)``, with no logits in memory.

    Args:
        model: a ``transformers`` causal LM (``*ForCausalLM``, or a multimodal
            ``*ForConditionalGeneration``), possibly wrapped by PEFT, DDP, FSDP or a DeepSpeed
            engine: anything with ``get_output_embeddings()`` (itself or in ``.module``) whose
            forward calls that module once on the final hidden states. Its head must be an
            ``nn.Linear`` (tied or not, with or without bias), a PEFT LoRA layer over one (see
            :mod:`.lora_head`: the adapter gets its gradient, dropout included, exactly), or a
            PEFT ``modules_to_save`` copy of one.
        loss_fn: called once, inside the head's forward, as ``loss_fn(hidden, head)``:

            * ``hidden``: the head's input features, ``(B, T, H')`` in the model's compute dtype:
              the final hidden states (``H' = H``), or for a LoRA head
              ``[x | s_i * dropout_i(x) @ A_i.T ...]`` (``H' = H + sum r_i``; ``hidden[..., :H]``
              is ``x``). Row ``[b, t]`` predicts token ``t + 1``: shift the labels, not the
              hidden states (see :func:`next_token_labels`).
            * ``head``: a :class:`Head` with ``weight (V, H')``, ``bias (V,)`` or None,
              ``softcap`` and ``logit_scale``, such that the model's logits are
              ``softcap(logit_scale * (hidden @ weight.T + bias))``. Pass it on as
              ``ptk.linear_cross_entropy(hidden, head.weight, labels, **head.kwargs)`` (or
              ``head.fold_scale(hidden)`` for losses without ``logit_scale``).

            It may return any tensor, or tuple / list / dict of them (e.g. ``(loss, metrics)``).
        logit_transform: the :class:`LogitTransform` to apply; by default
            ``LogitTransform.from_model(model)`` (soft-cap, logit scale and vocabulary
            truncation from the config).
        check_logits: compare what the model does after its head with ``logit_transform``
            (one device sync per call); a mismatch raises :class:`UnsupportedModelError`.
        return_outputs: also return the model's outputs (their ``logits`` are the ``(B, T, 10)``
            probe, not logits; other fields such as ``aux_loss`` are the model's).
        **model_inputs: the model's inputs (``input_ids``, ``attention_mask``, ``position_ids``,
            ``pixel_values``, ...). ``use_cache`` defaults to False; ``labels`` is refused
            (labels belong to ``loss_fn``; the model would compute its own loss on the probe).

    Returns:
        What ``loss_fn`` returned (``(result, outputs)`` with ``return_outputs=True``), its
        tensors differentiable in everything they depend on: hidden states and through them the
        model's body, head weight and bias (a tied head sums both gradients into the
        embedding), LoRA adapters. Under FSDP / ZeRO-3 the head weight is read where it is
        gathered, and the loss's backward runs after the gradient has passed the head's output
        (where those frameworks re-gather it).

    Raises:
        UnsupportedModelError (a ``TypeError``): no output embeddings, a head that is not
            linear, a head not called (or called twice) by the forward, a post-head transform
            other than ``logit_transform``, a tensor-parallel head.
        ValueError: ``labels`` in ``model_inputs``.

    Not supported: a model compiled as a whole with ``torch.compile`` (compile its layers
    instead), tensor-parallel (DTensor) heads, quantized heads, activation checkpointing that
    re-runs the head's forward in the backward.
    """
    if "labels" in model_inputs:
        raise ValueError("labels: expected no labels among the model inputs (compute the loss on "
                         "them in loss_fn; the model would build its own loss on the placeholder "
                         "logits), got labels=...")
    if not callable(loss_fn):
        raise TypeError(f"loss_fn: expected a callable loss_fn(hidden, head), got "
                        f"{type(loss_fn).__name__}")
    if logit_transform is None:
        logit_transform = LogitTransform.from_model(model)
    elif not isinstance(logit_transform, LogitTransform):
        raise TypeError(f"logit_transform: expected a LogitTransform or None, got "
                        f"{type(logit_transform).__name__}")
    module = output_embeddings(model)
    plan = _plan(module, model)
    state = _Interception(model, loss_fn, logit_transform)
    model_inputs.setdefault("use_cache", False)
    with contextlib.ExitStack() as stack:
        for m, kind in plan:
            stack.enter_context(patched_forward(m, state.forward_for(m, kind)))
        try:
            outputs = model(**model_inputs)
        except UnsupportedModelError:
            raise
        except Exception as e:
            if state.done:  # raised by the model's own code after the head
                raise UnsupportedModelError(
                    f"{model_name(model)}: the forward failed after its head returned the "
                    f"(..., {len(PROBE)}) placeholder for the logits ({type(e).__name__}: {e}); "
                    "the model does something with the logits posttrain_kernels.models cannot "
                    "fuse") from e
            raise
    if state.calls == 0:
        raise UnsupportedModelError(
            f"{model_name(model)}: the forward never called its output embeddings "
            f"({type(module).__name__}); posttrain_kernels.models needs a model that computes its "
            "logits by calling model.get_output_embeddings() on the final hidden states")
    logits = _logits_of(outputs)
    if check_logits:
        check_probe(model, logits, logit_transform, state.probe_dtype)
    result = state.result
    leaves, spec, idx = _grad_leaves(result)
    if (idx and torch.is_grad_enabled() and isinstance(logits, Tensor) and logits.requires_grad):
        new = _Reattach.apply(logits, *[leaves[i] for i in idx])
        for i, t in zip(idx, new):
            leaves[i] = t
        result = pytree.tree_unflatten(leaves, spec)
    return (result, outputs) if return_outputs else result


__all__ = ["causal_lm_loss", "unwrap"]
