"""Benchmarks of the distillation family: ``distill_loss`` from logits against the eager reference
and its ``torch.compile``; ``linear_distill_loss`` from hidden states against the materialized path,
Liger-Kernel's ``LigerFusedLinearJSDLoss`` (when installed) and the head GEMMs alone; one run."""
from __future__ import annotations

import importlib
from typing import Callable, Dict, List, Optional

import torch

from posttrain_kernels import distill_loss, linear_distill_loss
from posttrain_kernels.dispatch import live_backends
from posttrain_kernels.reference import distill_loss_reference

from .preference import run_loss

DISTILL_OPS = ("distill_jsd", "linear_distill_jsd")
_BETA = 0.5  # TRL GKD's default JSD beta (symmetric: the same loss under Liger's convention)


def _fused_names(device: torch.device):
    live = live_backends()
    return [n for n in (("triton", "cuda") if device.type == "cuda" else ("cpu", "torch")) if live[n]]


def logits_implementations(device: torch.device, compile_reference: bool) -> Dict[str, Callable]:
    def eager(x):
        return distill_loss_reference(x["student"], x["teacher"], divergence="jsd", beta=_BETA)
    impls: Dict[str, Callable] = {"eager": eager}
    if compile_reference:
        impls["torch.compile"] = torch.compile(eager)
    for name in _fused_names(device):
        impls[f"ptk {name}"] = lambda x, b=name: distill_loss(x["student"], x["teacher"], divergence="jsd",
                                                              beta=_BETA, backend=b)
    return impls


def linear_implementations(device: torch.device) -> Dict[str, Callable]:
    def call(x, backend):
        return linear_distill_loss(x["hidden"], x["weight"], x["t_hidden"], x["t_weight"], divergence="jsd",
                                   beta=_BETA, backend=backend)
    impls: Dict[str, Callable] = {"eager": lambda x: call(x, "reference")}
    try:
        mod = importlib.import_module("liger_kernel.chunked_loss")
        liger = mod.LigerFusedLinearJSDLoss(weight_hard_loss=0.0, weight_soft_loss=1.0, beta=_BETA, temperature=1.0)

        def run_liger(x):
            h = x["hidden"].reshape(-1, x["hidden"].shape[-1])
            th = x["t_hidden"].reshape(-1, x["t_hidden"].shape[-1])
            out = liger(h, x["weight"], th, x["t_weight"], x["labels"].reshape(-1))
            return out[0] if isinstance(out, tuple) else out
        impls["liger-kernel chunked"] = run_liger
    except Exception:  # not installed, or its dependencies are missing
        pass
    for name in _fused_names(device):
        impls[f"ptk {name}"] = lambda x, b=name: call(x, b)

    def floor(x):
        """Student and teacher forward GEMMs and the student's two gradient GEMMs, whole."""
        h, w = x["hidden"], x["weight"]
        with torch.no_grad():
            z = h @ w.t()
            x["t_hidden"] @ x["t_weight"].t()
            z @ w
            z.t() @ h
        return torch.zeros((), requires_grad=True)
    impls["GEMMs alone (floor)"] = floor
    return impls


def run_distill(op: str, dtype: torch.dtype, rows: int, vocab: int, linear_rows: int, hidden: int,
                teacher_hidden: int, device: torch.device, repeats: int, warmup: int, compile_reference: bool,
                progress: Callable[[str], None], only: Optional[List[str]], row_cls, select) -> list:
    gen = torch.Generator(device="cpu").manual_seed(0)
    if op == "distill_jsd":
        x = dict(student=(torch.randn(rows, vocab, generator=gen) * 2).to(device=device, dtype=dtype),
                 teacher=(torch.randn(rows, vocab, generator=gen) * 2).to(device=device, dtype=dtype))
        x["student"].requires_grad_(True)
        return run_loss(op, select(logits_implementations(device, compile_reference), only), x, dtype, vocab,
                        device, repeats, warmup, progress, row_cls, params=("student",))
    x = dict(hidden=torch.randn(linear_rows, hidden, generator=gen),
             weight=torch.randn(vocab, hidden, generator=gen) / hidden ** 0.5,
             t_hidden=torch.randn(linear_rows, teacher_hidden, generator=gen),
             t_weight=torch.randn(vocab, teacher_hidden, generator=gen) / teacher_hidden ** 0.5)
    x = {k: v.to(device=device, dtype=dtype) for k, v in x.items()}
    x["labels"] = torch.randint(0, vocab, (linear_rows,), generator=gen).to(device)
    x["hidden"].requires_grad_(True)
    x["weight"].requires_grad_(True)
    return run_loss(op, select(linear_implementations(device), only), x, dtype, vocab, device, repeats, warmup,
                    progress, row_cls)
