"""Benchmarks of the fused-linear preference losses (DPO, ORPO, SimPO, KTO): forward + backward time
and peak extra memory of ``linear_preference_loss`` side by side with the materialized reference,
Liger-Kernel's chunked losses (when installed) and the head GEMMs alone, in one run."""
from __future__ import annotations

import importlib
import time
from typing import Callable, Dict, List, Optional

import torch

from posttrain_kernels import linear_preference_loss
from posttrain_kernels.dispatch import live_backends

from .measure import peak_extra_bytes, time_call

PREFERENCE_OPS = ("linear_dpo", "linear_orpo", "linear_simpo", "linear_kto")

# Each op: our loss_type and options, Liger's class and options (the same semantics), and whether
# the loss has a reference model (whose forward GEMM is part of the floor).
_CONFIG = {
    "linear_dpo": (dict(loss_type="sigmoid", beta=0.1), "LigerFusedLinearDPOLoss",
                   dict(beta=0.1, use_ref_model=True), True),
    "linear_orpo": (dict(loss_type="orpo", beta=0.1), "LigerFusedLinearORPOLoss",
                    dict(beta=0.1, compute_nll_loss=True), False),
    "linear_simpo": (dict(loss_type="simpo", beta=2.0, gamma=0.5), "LigerFusedLinearSimPOLoss",
                     dict(beta=2.0, gamma=0.5, compute_nll_loss=False), False),
    "linear_kto": (dict(loss_type="kto", beta=0.1), "LigerFusedLinearKTOLoss",
                   dict(beta=0.1, use_ref_model=True), True),
}


def _liger(op: str) -> Optional[Callable]:
    """Liger's chunked loss of ``op`` as ``fn(inputs) -> loss``, or None without liger-kernel."""
    try:
        mod = importlib.import_module("liger_kernel.chunked_loss")
    except Exception:  # not installed, or its dependencies are missing
        return None
    _, cls_name, opts, _ = _CONFIG[op]
    loss_fn = getattr(mod, cls_name)(**opts)

    def run(x):
        if op == "linear_dpo":
            out = loss_fn(x["weight"], x["hidden"], x["labels"], ref_input=x["ref_hidden"],
                          ref_weight=x["ref_weight"])
        elif op == "linear_kto":
            out = loss_fn(x["hidden"], x["weight"], x["labels"], preference_labels=x["desirable"],
                          ref_input=x["ref_hidden"], ref_weight=x["ref_weight"], kl=x["kl"])
        else:
            out = loss_fn(x["weight"], x["hidden"], x["labels"])
        return out[0] if isinstance(out, tuple) else out
    return run


def implementations(op: str, device: torch.device) -> Dict[str, Callable]:
    ours, _, _, has_ref = _CONFIG[op]

    def call(x, backend):
        kw = dict(ours)
        if has_ref:
            kw.update(ref_hidden=x["ref_hidden"], ref_weight=x["ref_weight"])
        if op == "linear_kto":
            kw.update(desirable=x["desirable"], kl=x["kl"])
        return linear_preference_loss(x["hidden"], x["weight"], x["labels"], backend=backend, **kw)[0]

    impls: Dict[str, Callable] = {"eager": lambda x: call(x, "reference")}
    liger = _liger(op)
    if liger is not None:
        impls["liger-kernel chunked"] = liger
    live = live_backends()
    for name in (("triton", "cuda") if device.type == "cuda" else ("cpu", "torch")):
        if live[name]:
            impls[f"ptk {name}"] = lambda x, b=name: call(x, b)
    impls["GEMMs alone (floor)"] = _floor(has_ref)
    return impls


def _floor(has_ref: bool) -> Callable:
    """The head GEMMs no implementation can avoid: the policy's forward, the reference's forward
    (when the loss has one), and the two gradient GEMMs, whole and with nothing else."""
    def floor(x):
        h = x["hidden"].reshape(-1, x["hidden"].shape[-1])
        w = x["weight"]
        with torch.no_grad():
            z = h @ w.t()
            if has_ref:
                x["ref_hidden"].reshape(-1, h.shape[-1]) @ x["ref_weight"].t()
            z @ w
            z.t() @ h
        return torch.zeros((), requires_grad=True)
    return floor


def make_inputs(op: str, pairs: int, tokens: int, hidden_size: int, vocab: int, dtype: torch.dtype,
                device: torch.device) -> dict:
    gen = torch.Generator(device="cpu").manual_seed(0)
    s = 2 * pairs
    x = dict(
        hidden=torch.randn(s, tokens, hidden_size, generator=gen),
        weight=torch.randn(vocab, hidden_size, generator=gen) / hidden_size ** 0.5,
        ref_hidden=torch.randn(s, tokens, hidden_size, generator=gen),
        ref_weight=torch.randn(vocab, hidden_size, generator=gen) / hidden_size ** 0.5,
        labels=torch.randint(0, vocab, (s, tokens), generator=gen),
        desirable=torch.arange(s) % 2 == 0,
        kl=torch.tensor(0.05),
    )
    out = {k: (v.to(device=device, dtype=dtype) if v.is_floating_point() and v.dim() > 0 else v.to(device))
           for k, v in x.items()}
    out["hidden"].requires_grad_(True)
    out["weight"].requires_grad_(True)
    return out


def run_preference(op: str, dtype: torch.dtype, pairs: int, tokens: int, hidden_size: int, vocab: int,
                   device: torch.device, repeats: int, warmup: int, progress: Callable[[str], None],
                   only: Optional[List[str]], row_cls, select) -> list:
    x = make_inputs(op, pairs, tokens, hidden_size, vocab, dtype, device)
    return run_loss(op, select(implementations(op, device), only), x, dtype, vocab, device, repeats, warmup,
                    progress, row_cls)


def run_loss(op: str, impls: Dict[str, Callable], x: dict, dtype: torch.dtype, vocab: int, device: torch.device,
             repeats: int, warmup: int, progress: Callable[[str], None], row_cls,
             params: tuple = ("hidden", "weight")) -> list:
    """Time and peak memory of each ``impls[name](x) -> loss`` (forward + backward into the tensors
    ``x[p]`` for ``p`` in ``params``), and a check that they all compute the same loss."""
    grad_bytes = sum(x[p].numel() * x[p].element_size() for p in params)
    first = x[params[0]]
    n_tokens = first.numel() // first.shape[-1]
    values = {}
    out = []
    for i, (name, fn) in enumerate(impls.items()):
        progress(f"[{op} {str(dtype)[6:]}] {i + 1}/{len(impls)} {name}")

        def step(fn=fn):
            for p in params:
                x[p].grad = None
            loss = fn(x)
            loss.backward()
            return loss

        t0 = time.perf_counter()
        values[name] = step().detach()  # compile / first-call cost, and the value compared below
        progress(f"    first call {time.perf_counter() - t0:.1f} s, loss {float(values[name]):.6f}")
        for p in params:
            x[p].grad = None
        peak = peak_extra_bytes(step, device)
        for p in params:
            x[p].grad = None
        t = time_call(step, device, repeats, max(0, warmup - 1))
        for p in params:
            x[p].grad = None
        out.append(row_cls(op=op, device=str(device), dtype=str(dtype)[6:], rows=n_tokens, vocab=vocab,
                           impl=name, time_ms=t * 1e3, peak_extra_mib=None if peak is None else peak / 2**20,
                           grad_mib=grad_bytes / 2**20,
                           peak_over_grad=None if peak is None else peak / grad_bytes, runs=repeats))
    # every implementation computes the same loss (the floor computes none)
    eager = values["eager"]
    for name, v in values.items():
        if not name.endswith("(floor)") and not torch.allclose(v.float(), eager.float(), rtol=1e-4, atol=1e-4):
            progress(f"    WARNING: {name} loss {float(v):.6f} differs from eager {float(eager):.6f}")
    return out
