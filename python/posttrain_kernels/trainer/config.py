"""The training configuration shared by every objective."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Dict, Optional

SCHEDULES = ("constant", "linear", "cosine")


@dataclass
class TrainConfig:
    """Options of :class:`~posttrain_kernels.trainer.Trainer`.

    Attributes:
        steps: optimizer steps.
        batch_size: examples per micro-batch (prompts for ``PolicyGradient``, pairs for
            ``Preference``).
        grad_accum: micro-batches per optimizer step. The loss of a step is normalized over the whole
            window (SFT and distillation: by the window's loss tokens; preference: by its pairs;
            policy gradient: by its completion tokens for the token-mean loss types), so one step
            with ``grad_accum=k`` equals one step on a ``k`` times larger batch.
        lr, weight_decay, betas: AdamW.
        warmup_steps: linear warmup from 0 to ``lr``.
        schedule: ``"constant"``, ``"linear"`` (to 0 at ``steps``) or ``"cosine"`` (to 0).
        max_grad_norm: clip the global gradient norm to this (``None``: no clipping).
        bf16: run the model under ``torch.autocast(dtype=torch.bfloat16)`` (the losses accumulate
            in fp32 whatever the input dtype).
        seed: seeds the data order, the sampling of rollouts and everything else random.
        backend: the losses' backend (``"auto"``, ``"cpu"``, ``"triton"``, ``"cuda"``,
            ``"torch"`` or ``"reference"``: the materialized eager losses, to compare).
        out_dir: where ``metrics.jsonl`` and ``checkpoint.pt`` go (``None``: nowhere).
        checkpoint_every: write a checkpoint every this many steps (0: only at the end, if
            ``out_dir`` is set).
        log_every: print a metrics line every this many steps (the progress bar updates each step).
        progress: show the progress bar on stderr.
    """

    steps: int = 100
    batch_size: int = 8
    grad_accum: int = 1
    lr: float = 1e-3
    weight_decay: float = 0.0
    betas: tuple = (0.9, 0.999)
    warmup_steps: int = 0
    schedule: str = "cosine"
    max_grad_norm: Optional[float] = 1.0
    bf16: bool = False
    seed: int = 0
    backend: str = "auto"
    out_dir: Optional[str] = None
    checkpoint_every: int = 0
    log_every: int = 10
    progress: bool = True

    def __post_init__(self) -> None:
        for name in ("steps", "batch_size", "grad_accum"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name}: expected an integer >= 1, got {value!r}")
        for name in ("warmup_steps", "checkpoint_every", "log_every"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise ValueError(f"{name}: expected an integer >= 0, got {value!r}")
        if not (isinstance(self.lr, (int, float)) and self.lr > 0):
            raise ValueError(f"lr: expected a number > 0, got {self.lr!r}")
        if self.schedule not in SCHEDULES:
            raise ValueError(f"schedule: expected one of {', '.join(SCHEDULES)}, got {self.schedule!r}")
        if self.max_grad_norm is not None and not self.max_grad_norm > 0:
            raise ValueError(f"max_grad_norm: expected a number > 0 or None, got {self.max_grad_norm!r}")
        self.betas = tuple(self.betas)

    @classmethod
    def from_dict(cls, values: Dict[str, Any], where: str = "config") -> "TrainConfig":
        """A config from a mapping (a YAML/JSON section); unknown keys are an error naming them."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"{where}: unknown option(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}")
        return cls(**values)

    def to_dict(self) -> Dict[str, Any]:
        return dataclasses.asdict(self)
