"""The effective head of a PEFT LoRA layer on the LM head, differentiable in the adapters.

With base weight ``W (V, H)``, bias ``b`` and active adapters ``i`` (``A_i (r_i, H)``,
``B_i (V, r_i)``, scaling ``s_i``, dropout ``d_i``), PEFT computes

    logits = x @ W.T + b + sum_i s_i * d_i(x) @ A_i.T @ B_i.T  (+ s_i * b_i with lora_bias)

which is exactly one linear map of concatenated features:

    features = [x | s_1 * d_1(x) @ A_1.T | ... ]       (..., H + sum_i r_i)
    weight   = [W | B_1 | ... ]                          (V, H + sum_i r_i)
    bias     = b + sum_i s_i * b_i

The dropout mask is drawn once, as PEFT draws it, so the identity is exact in training mode
too. ``A_i`` runs as a module call (its hooks apply) and gets its gradient through the features;
``W`` and ``B_i`` are read inside the ``__call__`` of their own modules (nested), so FSDP / ZeRO-3
has gathered them when the concatenation copies them. Extra memory: one ``(V, H + r)`` copy.
"""
from __future__ import annotations

import sys
from typing import Callable, List, Tuple

import torch
from torch import Tensor, nn

from .forward_patch import call_inside
from .head import UnsupportedModelError


def peft_classes():
    """``(BaseTunerLayer, lora.Linear, ModulesToSaveWrapper)`` when peft is imported, else None
    (without peft imported no module can be a PEFT layer, so peft is never imported here)."""
    if "peft" not in sys.modules:
        return None
    from peft.tuners.lora import Linear as LoraLinear
    from peft.tuners.tuners_utils import BaseTunerLayer
    try:
        from peft.utils import ModulesToSaveWrapper
    except ImportError:  # pragma: no cover - older layouts
        from peft.utils.other import ModulesToSaveWrapper
    return BaseTunerLayer, LoraLinear, ModulesToSaveWrapper


def active_adapters(module, owner: str = "model") -> List[Tuple[str, nn.Module, nn.Module,
                                                                 nn.Module, float]]:
    """``[(name, lora_A, lora_B, dropout, scaling)]`` of the adapters the layer's forward would
    add now (none when adapters are disabled or merged into the base weight). Raises
    :class:`UnsupportedModelError` (naming ``owner``) for LoRA variants (DoRA, aLoRA, ...) and
    ``fan_in_fan_out``."""
    if module.disable_adapters or module.merged:
        return []
    out = []
    for name in module.active_adapters:
        if name not in module.lora_A:
            continue
        variant = getattr(module, "lora_variant", {}).get(name)
        dora = getattr(module, "use_dora", {}).get(name, False)
        if variant is not None or dora:
            kind = type(variant).__name__ if variant is not None else "DoRA"
            raise UnsupportedModelError(
                f"{owner}: the PEFT LoRA layer on the LM head: adapter {name!r} is a LoRA variant "
                f"({kind}), expected plain LoRA (merge the adapter, or leave the head out of "
                "target_modules)")
        if getattr(module, "fan_in_fan_out", False):
            raise UnsupportedModelError(
                f"{owner}: the PEFT LoRA layer on the LM head: fan_in_fan_out=True, expected False "
                "(an nn.Linear head)")
        out.append((name, module.lora_A[name], module.lora_B[name], module.lora_dropout[name],
                    module.scaling[name]))
    return out


def _nested(modules: List[nn.Module], body: Callable, dummy: Tensor):
    """``body()`` run inside the ``__call__`` of every module of ``modules`` at once."""
    if not modules:
        return body()
    return call_inside(modules[0], lambda *_a, **_k: _nested(modules[1:], body, dummy), dummy)


def lora_head_forward(module, x: Tensor, base_forward: Callable, finish: Callable) -> Tensor:
    """Forward of an intercepted ``peft.tuners.lora.Linear`` head on hidden states ``x (..., H)``.

    ``base_forward(base, x)`` handles the base layer alone (no active adapter); ``finish(features,
    weight, bias)`` receives the concatenated features / weight / bias described in the module
    docstring, inside the base layer's call, and returns what the head returns."""
    base = module.get_base_layer()
    adapters = active_adapters(module)
    if not adapters:
        return call_inside(base, lambda inp, *a, **k: base_forward(base, inp), x)
    feats = [x]
    for _, lora_a, _, dropout, scaling in adapters:
        cast = getattr(module, "_cast_input_dtype", None)
        xa = cast(x, lora_a.weight.dtype) if callable(cast) else x.to(lora_a.weight.dtype)
        feats.append((lora_a(dropout(xa)) * scaling).to(x.dtype))
    features = torch.cat(feats, dim=-1)
    lora_bs = [b for _, _, b, _, _ in adapters]
    scalings = [s for _, _, _, _, s in adapters]

    def base_body(inp, *args, **kwargs):
        w, b = base.weight, base.bias  # read inside the base layer's call: gathered

        def inside_all():
            weight = torch.cat([w] + [lb.weight.to(w.dtype) for lb in lora_bs], dim=1)
            bias = b
            for lb, s in zip(lora_bs, scalings):
                if getattr(lb, "bias", None) is not None:  # lora_bias=True
                    extra = lb.bias.to(w.dtype) * s
                    bias = extra if bias is None else bias + extra
            return weight, bias

        weight, bias = _nested(lora_bs, inside_all, inp.new_empty(0))
        return finish(inp, weight, bias)

    return call_inside(base, base_body, features)
