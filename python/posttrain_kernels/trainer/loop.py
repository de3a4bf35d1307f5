"""The training loop: an objective, AdamW, a learning-rate schedule, gradient accumulation and
clipping, metrics per step, atomic checkpoints that resume exactly."""
from __future__ import annotations

import contextlib
import math
import os
import time
from typing import Any, Callable, Dict, List, Optional

import torch
from torch import nn

from . import checkpoint as ckpt
from .config import TrainConfig
from .metrics_log import MetricsLog, PeakMemory
from .objectives import Objective, rank_world

METRICS_FILE = "metrics.jsonl"
CHECKPOINT_FILE = "checkpoint.pt"


def lr_lambda(config: TrainConfig) -> Callable[[int], float]:
    """The learning-rate multiplier of step ``s``: linear warmup over ``warmup_steps``, then
    constant, linear to 0, or cosine to 0 at ``steps``."""
    warm, total, kind = config.warmup_steps, config.steps, config.schedule

    def f(s: int) -> float:
        if warm and s < warm:
            return (s + 1) / warm
        if kind == "constant":
            return 1.0
        frac = (s - warm) / max(total - warm, 1)
        frac = min(max(frac, 0.0), 1.0)
        return 1.0 - frac if kind == "linear" else 0.5 * (1.0 + math.cos(math.pi * frac))

    return f


def _sum_over_ranks(values: Dict[str, Any]) -> Dict[str, Any]:
    """Each value summed over the ranks of the default process group (one all-reduce)."""
    keys = sorted(values)
    if not keys:
        return values
    t = torch.tensor([float(values[k]) for k in keys], dtype=torch.float64)
    torch.distributed.all_reduce(t)
    return {k: (int(round(x)) if isinstance(values[k], int) else torch.tensor(x))
            for k, x in zip(keys, t.tolist())}


class Trainer:
    """Trains ``model`` on ``objective`` for ``config.steps`` optimizer steps.

    Each step: the objective's ``grad_accum`` micro-batches, each loss (already normalized over
    the step's window) back-propagated under ``torch.autocast(bfloat16)`` when ``config.bf16``;
    gradient clipping to ``max_grad_norm``; AdamW; the schedule. Each step's record (``step``,
    ``loss``, the objective's metrics, ``lr``, ``grad_norm``, ``tokens``, ``tokens_per_s``,
    ``peak_mem_mib``, ``time_s``) goes to ``<out_dir>/metrics.jsonl`` and to the terminal;
    ``eval_fn(model) -> dict`` (optional) runs before the first step, every ``eval_every`` steps and
    after the last, its values logged as ``eval/<name>``.

    ``peak_mem_mib``: the step's peak memory above what was in use when it started (on CUDA the
    allocator's; on CPU the resident set's, Linux): activations, logits or their chunks, gradients,
    optimizer state created on the first step (see :class:`.metrics_log.PeakMemory`).

    Under ``torch.distributed`` (DDP, FSDP2: gradients averaged over the ranks), every rank draws
    the same global batches (same seed) and keeps every ``world``-th record of each; the window's
    normalizers (tokens, pairs, rows) are summed over the ranks, each rank's loss is scaled by the
    world size, and the logged metrics are the whole batch's: training equals one process on the
    global batches (``batch_size`` counts records across all ranks). Rank 0 alone writes the
    metrics and the checkpoints (whole under DDP; FSDP2's sharded state is not checkpointed yet).

    Checkpoints (``<out_dir>/checkpoint.pt``, written atomically every ``checkpoint_every`` steps
    and at the end) hold the model, the optimizer, the scheduler, the step, the objective's state
    (data position, rollouts in use, reference model) and every RNG state: ``train(resume=True)``
    continues exactly where the checkpoint was taken, with the same result as a run never
    interrupted (built with the same model, objective and config). ``distributed=False`` trains
    this process alone even inside a process group.
    """

    def __init__(self, model: nn.Module, objective: Objective, config: Optional[TrainConfig] = None, *,
                 eval_fn: Optional[Callable[[nn.Module], Dict[str, float]]] = None, eval_every: int = 0,
                 name: Optional[str] = None, distributed: Optional[bool] = None):
        self.model, self.objective = model, objective
        self.config = config or TrainConfig()
        self.eval_fn, self.eval_every = eval_fn, eval_every
        self.name = name or objective.name
        torch.manual_seed(self.config.seed)
        # distributed=None: split the batches over the default process group when there is one
        self.rank, self.world = rank_world() if distributed is not False else (0, 1)
        objective.rank, objective.world = self.rank, self.world
        objective.bind(model, self.config)
        params = [p for p in model.parameters() if p.requires_grad]
        if not params:
            raise ValueError("model: expected parameters with requires_grad=True, got none")
        self.optimizer = torch.optim.AdamW(params, lr=self.config.lr, betas=self.config.betas,
                                           weight_decay=self.config.weight_decay)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lr_lambda(self.config))
        self.step = 0
        self.device = next(model.parameters()).device
        out = self.config.out_dir
        self.metrics_path = os.path.join(out, METRICS_FILE) if out else None
        self.checkpoint_path = os.path.join(out, CHECKPOINT_FILE) if out else None
        if self.rank != 0:  # one writer: rank 0 logs and checkpoints (a DDP replica is whole)
            self.metrics_path = self.checkpoint_path = None
            self.config.progress = False
            self.config.log_every = 0

    # -- checkpoints ---------------------------------------------------------------------------
    def save_checkpoint(self, path: Optional[str] = None) -> str:
        path = path or self.checkpoint_path
        if path is None:
            raise ValueError("out_dir: a checkpoint needs config.out_dir (or a path), got None")
        ckpt.save_atomic({
            "step": self.step,
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "objective": self.objective.state_dict(),
            "rng": ckpt.rng_state(),
            "config": self.config.to_dict(),
        }, path)
        return path

    def load_checkpoint(self, path: Optional[str] = None) -> None:
        state = ckpt.load(path or self.checkpoint_path)
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.objective.load_state_dict(state["objective"])
        ckpt.set_rng_state(state["rng"])
        self.step = state["step"]

    # -- the loop ------------------------------------------------------------------------------
    def _autocast(self):
        if not self.config.bf16:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=torch.bfloat16)

    def _evaluate(self, log: MetricsLog) -> None:
        if self.eval_fn is None:
            return
        values = self.eval_fn(self.model)
        log.write({"step": self.step, **{f"eval/{k}": v for k, v in values.items()}})

    def train_step(self) -> Dict[str, Any]:
        """One optimizer step; returns its record (tensors as Python numbers)."""
        peak = PeakMemory(self.device)
        peak.reset()
        t0 = time.perf_counter()
        self.model.train()
        batches = self.objective.step_batches(self.model)
        world = self.world
        window = _sum_over_ranks(self.objective.window(batches)) if world > 1 else self.objective.window(batches)
        sums: Dict[str, torch.Tensor] = {}
        for batch in batches:
            with self._autocast():
                loss, metrics = self.objective.loss(self.model, batch, window)
            # each rank's loss is its share of the window's; DDP / FSDP average the gradients
            (loss * world if world > 1 else loss).backward()
            for k, v in metrics.items():
                v = v.detach().float().cpu()
                sums[k] = sums[k] + v if k in sums else v
        if world > 1:  # the ranks' shares add up to the step's metrics
            sums = _sum_over_ranks(sums)
        params = [p for g in self.optimizer.param_groups for p in g["params"]]
        if self.config.max_grad_norm is not None:
            grad_norm = torch.nn.utils.clip_grad_norm_(params, self.config.max_grad_norm)
        else:
            grad_norm = torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in params if p.grad is not None]))
        lr = self.scheduler.get_last_lr()[0]
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        dt = time.perf_counter() - t0
        record: Dict[str, Any] = {"step": self.step}
        record.update({k: float(v) for k, v in sums.items()})
        tokens = record.pop("tokens", None)
        record.update({"lr": lr, "grad_norm": float(grad_norm), "time_s": dt})
        if tokens is not None:
            record["tokens"] = int(tokens)
            record["tokens_per_s"] = tokens / dt
        record["peak_mem_mib"] = peak.peak_mib()
        return record

    def train(self, resume: bool = False) -> List[Dict[str, Any]]:
        """Runs to ``config.steps``; ``resume=True`` continues from ``<out_dir>/checkpoint.pt``.
        Returns the records of every step (and evaluation) of this run, as logged."""
        cfg = self.config
        log = MetricsLog(self.metrics_path, cfg.steps, cfg.progress, cfg.log_every, prefix=f"[{self.name}] ")
        if resume:
            self.load_checkpoint()
            log.truncate_after(self.step)
        elif self.metrics_path is not None and os.path.exists(self.metrics_path):
            os.remove(self.metrics_path)
        if self.step == 0:
            self._evaluate(log)
        while self.step < cfg.steps:
            record = self.train_step()
            log.write(record)
            if self.eval_every and self.step % self.eval_every == 0 and self.step < cfg.steps:
                self._evaluate(log)
            if cfg.checkpoint_every and self.step % cfg.checkpoint_every == 0 and self.checkpoint_path:
                self.save_checkpoint()
        if self.eval_fn is not None and (not log.history or "eval/" not in "".join(log.history[-1])):
            self._evaluate(log)
        if self.checkpoint_path is not None:
            self.save_checkpoint()
        return log.history
