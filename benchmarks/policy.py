"""Benchmark of the fused-linear policy-gradient loss (GRPO family): ``linear_policy_loss`` side by
side with the materialized reference, Liger-Kernel's ``LigerFusedLinearGRPOLoss`` (when installed)
and the head GEMMs alone, in one run. Reference log-probs precomputed, as Liger's benchmark does."""
from __future__ import annotations

import importlib
from typing import Callable, Dict, List, Optional

import torch

from posttrain_kernels import linear_policy_loss
from posttrain_kernels.dispatch import live_backends

from .preference import run_loss

POLICY_OPS = ("linear_grpo",)

# DAPO (TRL's default loss type) with a KL term (beta, k3) and clip-higher; the same in Liger.
_OURS = dict(loss_type="dapo", beta=0.04, epsilon_low=0.2, epsilon_high=0.28, use_bias_correction_kl=True)
_LIGER = dict(loss_type="dapo", beta=0.04, epsilon_low=0.2, epsilon_high=0.28, use_ref_model=True,
              use_bias_correction_kl=True)


def implementations(device: torch.device) -> Dict[str, Callable]:
    def call(x, backend):
        return linear_policy_loss(x["hidden"], x["weight"], x["labels"], x["old_logps"], x["advantages"],
                                  x["mask"], ref_logps=x["ref_logps"], backend=backend, **_OURS)[0]

    impls: Dict[str, Callable] = {"eager": lambda x: call(x, "reference")}
    try:
        mod = importlib.import_module("liger_kernel.chunked_loss")
        liger = mod.LigerFusedLinearGRPOLoss(**_LIGER)

        def run_liger(x):
            out = liger(x["hidden"], x["weight"], x["labels"], x["mask"].long(), x["advantages"],
                        ref_per_token_logps=x["ref_logps"], old_per_token_logps=x["old_logps"])
            return out[0] if isinstance(out, tuple) else out
        impls["liger-kernel chunked"] = run_liger
    except Exception:  # not installed, or its dependencies are missing
        pass
    live = live_backends()
    for name in (("triton", "cuda") if device.type == "cuda" else ("cpu", "torch")):
        if live[name]:
            impls[f"ptk {name}"] = lambda x, b=name: call(x, b)

    def floor(x):
        """The head's forward GEMM and its two gradient GEMMs, whole, with nothing else."""
        h = x["hidden"].reshape(-1, x["hidden"].shape[-1])
        w = x["weight"]
        with torch.no_grad():
            z = h @ w.t()
            z @ w
            z.t() @ h
        return torch.zeros((), requires_grad=True)
    impls["GEMMs alone (floor)"] = floor
    return impls


def make_inputs(completions: int, tokens: int, hidden_size: int, vocab: int, dtype: torch.dtype,
                device: torch.device) -> dict:
    gen = torch.Generator(device="cpu").manual_seed(0)
    labels = torch.randint(0, vocab, (completions, tokens), generator=gen)
    mask = torch.ones(completions, tokens, dtype=torch.bool)
    mask[1, tokens // 2:] = False  # one shorter completion
    x = dict(
        hidden=torch.randn(completions, tokens, hidden_size, generator=gen).to(device=device, dtype=dtype),
        weight=(torch.randn(vocab, hidden_size, generator=gen) / hidden_size ** 0.5).to(device=device, dtype=dtype),
        labels=labels.to(device), mask=mask.to(device),
        advantages=torch.randn(completions, generator=gen).to(device),
        old_logps=(-10.0 + 0.1 * torch.randn(completions, tokens, generator=gen)).to(device),
        ref_logps=(-10.0 + 0.1 * torch.randn(completions, tokens, generator=gen)).to(device),
    )
    x["hidden"].requires_grad_(True)
    x["weight"].requires_grad_(True)
    return x


def run_policy(op: str, dtype: torch.dtype, completions: int, tokens: int, hidden_size: int, vocab: int,
               device: torch.device, repeats: int, warmup: int, progress: Callable[[str], None],
               only: Optional[List[str]], row_cls, select) -> list:
    x = make_inputs(completions, tokens, hidden_size, vocab, dtype, device)
    return run_loss(op, select(implementations(device), only), x, dtype, vocab, device, repeats, warmup,
                    progress, row_cls)
