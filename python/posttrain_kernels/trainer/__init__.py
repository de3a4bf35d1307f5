"""A thin training loop on the fused losses: objectives ``SFT``, ``Preference``,
``PolicyGradient`` and ``Distill`` for any Hugging Face causal LM (through
:mod:`posttrain_kernels.models`, so the logits are never built), with gradient accumulation,
bf16 autocast, clipping, a learning-rate schedule, per-step metrics (terminal + JSONL) and atomic
checkpoints that resume exactly::

    from posttrain_kernels.trainer import SFT, TrainConfig, Trainer

    trainer = Trainer(model, SFT(records, tokenizer), TrainConfig(steps=200, lr=1e-3, out_dir="run"))
    history = trainer.train()
"""
from .config import TrainConfig
from .loop import Trainer
from .objectives import SFT, Distill, Objective, PolicyGradient, Preference, sequence_logps

__all__ = ["Trainer", "TrainConfig", "Objective", "SFT", "Preference", "PolicyGradient", "Distill",
           "sequence_logps"]
