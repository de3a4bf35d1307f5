"""What a causal LM does to its logits after the head (soft-capping, scaling, vocabulary
truncation), read from its config and checked against what its forward actually does.

No import of ``transformers``: configs are read by attribute name, so any config object works.
"""
from __future__ import annotations

import itertools
import math
from dataclasses import dataclass
from typing import Any, List, Optional, Sequence, Tuple

import torch
from torch import Tensor

from .head import UnsupportedModelError, model_config, model_name

# Config attributes with the meaning they have in the transformers models that define them.
SOFTCAP_ATTRS = ("final_logit_softcapping",  # Gemma 2/3/3n/4, PaliGemma, VaultGemma, Mistral-Large-4, ...
                 "logits_soft_cap")  # RecurrentGemma
MULTIPLY_ATTRS = ("logit_scale",  # Cohere, Cohere2
                  "lm_head_multiplier",  # Falcon-H1
                  "output_multiplier")  # MuseSpark (before the soft-cap)
DIVIDE_ATTRS = ("logits_scaling",)  # Granite family (muP)
VOCAB_ATTRS = ("unpadded_vocab_size",)  # Inkling: logits[..., :unpadded_vocab_size]

#: Values the intercepted head returns in place of the logits (the same at every position); what
#: the model's forward makes of them shows its post-head transform. They span the range of real
#: logits and are exact in bfloat16 and float16.
PROBE = (-100.0, -24.0, -3.0, -0.375, 0.0, 0.5, 2.0, 7.0, 40.0, 96.0)


def _number(value) -> Optional[float]:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None  # None, strings (MPT's "inv_sqrt_d_model"), ... are not read
    value = float(value)
    return value if math.isfinite(value) else None


def _configs(model) -> List[Any]:
    """The model's config and, first, its decoder text config when it nests one."""
    cfg = model_config(model)
    if cfg is None:
        return []
    out = []
    get_text = getattr(cfg, "get_text_config", None)
    if callable(get_text):
        try:
            text = get_text(decoder=True)
        except Exception:  # noqa: BLE001 - an odd config: fall back to the top-level one
            text = None
        if text is not None and text is not cfg:
            out.append(text)
    out.append(cfg)
    return out


def _lookup(configs: Sequence[Any], name: str) -> Optional[float]:
    for cfg in configs:
        value = _number(getattr(cfg, name, None))
        if value is not None:
            return value
    return None


@dataclass(frozen=True)
class LogitTransform:
    """``logits = softcap(logit_scale * (hidden @ weight[:vocab_size].T + bias[:vocab_size]))`` with
    ``softcap(z) = c * tanh(z / c)`` (identity when ``softcap is None``): the logit transforms the
    fused losses can apply in their kernels.

    Attributes:
        softcap: ``None`` or ``c > 0``.
        logit_scale: a finite number multiplying the head's output (1.0: none).
        vocab_size: keep only the first ``vocab_size`` rows of the head (``None``: all of them).
        sources: where each value came from, for messages (e.g. ``"config.logit_scale=0.0625"``).
    """

    softcap: Optional[float] = None
    logit_scale: float = 1.0
    vocab_size: Optional[int] = None
    sources: Tuple[str, ...] = ()

    def __post_init__(self):
        if self.softcap is not None and not (_number(self.softcap) and self.softcap > 0):
            raise ValueError(f"softcap: expected None or a finite number > 0, got {self.softcap!r}")
        if _number(self.logit_scale) is None:
            raise ValueError(f"logit_scale: expected a finite number, got {self.logit_scale!r}")
        if self.vocab_size is not None and (not isinstance(self.vocab_size, int)
                                            or isinstance(self.vocab_size, bool)
                                            or self.vocab_size < 1):
            raise ValueError(f"vocab_size: expected None or a positive int, got {self.vocab_size!r}")

    @classmethod
    def from_model(cls, model) -> "LogitTransform":
        """Read from ``model.config`` (and its decoder text config, checked first):

        * soft-cap ``c``: ``final_logit_softcapping`` or ``logits_soft_cap``;
        * ``logit_scale``: the product of ``logit_scale``, ``lm_head_multiplier`` and
          ``output_multiplier``, divided by ``logits_scaling`` (Granite's convention);
        * ``vocab_size``: ``unpadded_vocab_size``.

        Only numeric values count (``None`` or strings are skipped). The reading is checked against
        the model's forward by :func:`~posttrain_kernels.models.causal_lm_loss`; a model that uses
        one of these names with another meaning gets a clear error there, and can be handled by
        passing the right ``LogitTransform`` explicitly.
        """
        configs = _configs(model)
        sources = []
        softcap = None
        for name in SOFTCAP_ATTRS:
            value = _lookup(configs, name)
            if value is not None and value > 0:
                softcap = value
                sources.append(f"config.{name}={value!r}")
                break
        scale = 1.0
        for name in MULTIPLY_ATTRS:
            value = _lookup(configs, name)
            if value is not None:
                scale *= value
                sources.append(f"config.{name}={value!r}")
        for name in DIVIDE_ATTRS:
            value = _lookup(configs, name)
            if value is not None:
                if value == 0:
                    raise UnsupportedModelError(
                        f"{model_name(model)}: config.{name}: expected a non-zero divisor of the "
                        f"logits, got {value!r}")
                scale /= value
                sources.append(f"config.{name}={value!r} (divides)")
        vocab = None
        for name in VOCAB_ATTRS:
            value = _lookup(configs, name)
            if value is not None and value == int(value) and value >= 1:
                vocab = int(value)
                sources.append(f"config.{name}={vocab}")
        return cls(softcap, scale, vocab, tuple(sources))

    def apply(self, z: Tensor) -> Tensor:
        """The transform of head outputs ``z`` (any shape, elementwise)."""
        if self.logit_scale != 1.0:
            z = z * self.logit_scale
        if self.softcap is not None:
            z = torch.tanh(z / self.softcap) * self.softcap
        return z

    def describe(self) -> str:
        body = "z" if self.logit_scale == 1.0 else f"{self.logit_scale!r} * z"
        if self.softcap is not None:
            body = f"{self.softcap!r} * tanh(({body}) / {self.softcap!r})"
        src = f" (from {', '.join(self.sources)})" if self.sources else " (nothing in the config)"
        return body + src


def probe_tensor(lead: Sequence[int], dtype: torch.dtype, device) -> Tensor:
    """``(*lead, len(PROBE))``: the placeholder the intercepted head returns."""
    p = torch.tensor(PROBE, dtype=dtype, device=device)
    return p.repeat(*lead, 1) if len(lead) else p.clone()


def _alternatives(model, observed: Tensor) -> List[str]:
    """Readings of the config values other than :meth:`LogitTransform.from_model`'s that explain
    ``observed`` (float64 ``(K,)``), for the error message."""
    configs = _configs(model)
    scales = [(n, _lookup(configs, n)) for n in MULTIPLY_ATTRS + DIVIDE_ATTRS]
    scales = [(n, v) for n, v in scales if v not in (None, 0.0)]
    caps = [None] + [(n, v) for n in SOFTCAP_ATTRS if (v := _lookup(configs, n)) and v > 0]
    z = torch.tensor(PROBE, dtype=torch.float64)
    found = []
    for cap in caps:
        for choice in itertools.product((None, "*", "/"), repeat=len(scales)):
            s, parts = 1.0, []
            for (name, v), how in zip(scales, choice):
                if how == "*":
                    s, parts = s * v, parts + [f"* config.{name}"]
                elif how == "/":
                    s, parts = s / v, parts + [f"/ config.{name}"]
            t = LogitTransform(None if cap is None else cap[1], s)
            if _matches(observed[None], t.apply(z), torch.float32):
                desc = "z " + " ".join(parts) if parts else "z"
                if cap is not None:
                    desc = f"softcap_{{config.{cap[0]}}}({desc})"
                found.append(f"{desc} = LogitTransform(softcap={t.softcap!r}, logit_scale={s!r})")
    return found


def _matches(got: Tensor, expected: Tensor, dtype: torch.dtype) -> Tensor:
    eps = torch.finfo(dtype).eps
    return ((got - expected).abs() <= 8 * eps * (1.0 + expected.abs())).all(dim=-1)


def check_probe(model, logits, transform: LogitTransform, probe_dtype: torch.dtype) -> None:
    """Raise :class:`UnsupportedModelError` unless the model turned the probe into
    ``transform.apply(PROBE)`` at every position (one device sync)."""
    name = model_name(model)
    k = len(PROBE)
    if not isinstance(logits, Tensor):
        raise UnsupportedModelError(
            f"{name}: expected the model's output to hold the logits (a tensor in `.logits` or "
            f"first), got {type(logits).__name__}; pass check_logits=False to skip the check of "
            "what the model does after its head")
    if logits.dim() < 1 or logits.shape[-1] != k or not logits.is_floating_point():
        raise UnsupportedModelError(
            f"{name}: the model changes the shape or dtype of the logits after its head (the "
            f"intercepted head returned (..., {k}) {probe_dtype}, the model returned "
            f"{tuple(logits.shape)} {logits.dtype}): not a transform posttrain_kernels can fuse")
    dtype = probe_dtype if torch.finfo(probe_dtype).eps > torch.finfo(logits.dtype).eps else logits.dtype
    got = logits.detach().reshape(-1, k).to(torch.float64)
    expected = transform.apply(torch.tensor(PROBE, dtype=torch.float64, device=got.device))
    ok = _matches(got, expected, dtype)
    if bool(ok.all()):
        return
    row = got[int((~ok).nonzero()[0, 0])].cpu()
    alts = _alternatives(model, row)
    hint = ("; the config values explain it read as: " + "; ".join(alts) +
            ": pass logit_transform=LogitTransform(...) accordingly") if alts else (
        "; no reading of the config explains it")
    raise UnsupportedModelError(
        f"{name}: after its head the model maps head outputs z = {list(PROBE)} to "
        f"{[round(v, 4) for v in row.tolist()]}, expected {transform.describe()} = "
        f"{[round(v, 4) for v in expected.cpu().tolist()]}: a logit transform posttrain_kernels "
        f"did not read from the config{hint}")
