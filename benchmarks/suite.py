"""Benchmarks of the token log-prob family: forward + backward time and peak extra memory of the
fused backends side by side with the eager reference, ``torch.compile`` of it, and TRL's
``selective_log_softmax`` when TRL is installed, all in one run."""
from __future__ import annotations

import importlib
from dataclasses import asdict, dataclass
from typing import Callable, Dict, List, Optional

import time

import torch

from posttrain_kernels.ops.linear_head import logits_element_size, use_vocab_blocks
from posttrain_kernels import cross_entropy, linear_cross_entropy, linear_token_logprobs, token_logprobs
from posttrain_kernels.dispatch import live_backends
from posttrain_kernels.reference import (cross_entropy_reference, linear_cross_entropy_reference,
                                         linear_token_logprobs_reference, token_logprobs_reference)

from .measure import copy_bandwidth, peak_extra_bytes, time_call
from .distill import DISTILL_OPS, run_distill
from .policy import POLICY_OPS, run_policy
from .preference import PREFERENCE_OPS, run_preference

OPS = ("logprobs", "logprobs+entropy", "cross_entropy", "linear_cross_entropy",
       "linear_logprobs+entropy") + PREFERENCE_OPS + POLICY_OPS + DISTILL_OPS
LINEAR_OPS = ("linear_cross_entropy", "linear_logprobs+entropy")


@dataclass
class Row:
    op: str
    device: str
    dtype: str
    rows: int
    vocab: int
    impl: str
    time_ms: float
    peak_extra_mib: Optional[float]
    grad_mib: float
    peak_over_grad: Optional[float]
    speedup_vs_eager: Optional[float] = None
    speedup_vs_compile: Optional[float] = None
    pct_copy_bandwidth: Optional[float] = None
    tflops: Optional[float] = None  # fused-linear ops: the floor's GEMM flops / time
    runs: int = 0  # timed runs behind time_ms
    timed_by_first_call: bool = False  # slower than slow_s: timed by its one (memory) call

    @property
    def working_mib(self) -> Optional[float]:
        """Peak extra memory besides the input gradients (which every implementation returns)."""
        return None if self.peak_extra_mib is None else max(0.0, self.peak_extra_mib - self.grad_mib)

    def as_dict(self) -> dict:
        return asdict(self)


def _trl_functions() -> Dict[str, Callable]:
    try:
        utils = importlib.import_module("trl.trainer.utils")
    except Exception:  # not installed, or its dependencies are missing
        return {}
    out = {}
    if hasattr(utils, "selective_log_softmax"):
        out["logprobs"] = lambda x, y: utils.selective_log_softmax(x, y).float().sum()
    if hasattr(utils, "selective_log_softmax_and_entropy"):
        def both(x, y):
            lp, h = utils.selective_log_softmax_and_entropy(x, y)
            return lp.float().sum() + h.float().sum()
        out["logprobs+entropy"] = both
    return out


def implementations(op: str, device: torch.device, compile_reference: bool) -> Dict[str, Callable]:
    """name -> fn(logits, labels) returning a scalar whose backward is the benchmarked backward."""
    impls: Dict[str, Callable] = {}
    if op == "cross_entropy":
        ref = lambda x, y: cross_entropy_reference(x, y)  # noqa: E731
        impls["eager"] = ref
        impls["torch F.cross_entropy"] = lambda x, y: torch.nn.functional.cross_entropy(x, y)
        if compile_reference:
            impls["torch.compile"] = torch.compile(ref)
    else:
        ent = op == "logprobs+entropy"

        def ref(x, y):
            lp, h = token_logprobs_reference(x, y, 1.0, -100, ent)
            return lp.sum() + (h.sum() if ent else 0.0)

        impls["eager"] = ref
        if compile_reference:
            impls["torch.compile"] = torch.compile(ref)
        trl = _trl_functions()
        if op in trl:
            impls["trl " + ("selective_log_softmax" if op == "logprobs" else
                            "selective_log_softmax_and_entropy")] = trl[op]
    live = live_backends()
    names = ["cpu", "torch"] if device.type == "cpu" else ["triton", "cuda"]
    for name in names:
        if not live.get(name):
            continue
        if op == "cross_entropy":
            impls[f"ptk {name}"] = lambda x, y, b=name: cross_entropy(x, y, backend=b)
        else:
            ent = op == "logprobs+entropy"

            def fused(x, y, b=name, ent=ent):
                lp, h = token_logprobs(x, y, return_entropy=ent, backend=b)
                return lp.sum() + (h.sum() if ent else 0.0)

            impls[f"ptk {name}"] = fused
    return impls


def linear_implementations(op: str, device: torch.device, compile_reference: bool) -> Dict[str, Callable]:
    """name -> fn(hidden, weight, labels) returning a scalar (fused-linear ops)."""
    impls: Dict[str, Callable] = {}
    live = live_backends()
    names = [n for n in (["cpu", "torch"] if device.type == "cpu" else ["triton", "cuda"]) if live.get(n)]
    if op == "linear_cross_entropy":
        ref = lambda h, w, y: linear_cross_entropy_reference(h, w, y)  # noqa: E731
        impls["eager"] = ref
        if compile_reference:
            impls["torch.compile"] = torch.compile(ref)
        opts_cls = getattr(torch.nn, "LinearCrossEntropyOptions", None)
        if opts_cls is not None and hasattr(torch.nn.functional, "linear_cross_entropy"):
            impls["torch F.linear_cross_entropy chunked"] = lambda h, w, y: torch.nn.functional.linear_cross_entropy(
                h, w, y, options=opts_cls())
        try:
            from cut_cross_entropy import linear_cross_entropy as cce
            # its Triton kernels on the GPU; its torch.compile implementation on the CPU
            cce_impl = "cce" if device.type == "cuda" else "torch_compile"
            impls["cut-cross-entropy"] = lambda h, w, y: cce(h, w, y, impl=cce_impl)
        except Exception:
            pass
        if device.type == "cuda":  # Liger's fused-linear cross-entropy is Triton only
            try:
                liger = importlib.import_module("liger_kernel.transformers").LigerFusedLinearCrossEntropyLoss()
                impls["liger-kernel fused linear CE"] = lambda h, w, y: liger(w, h, y)
            except Exception:
                pass
        for n in names:
            impls[f"ptk {n}"] = lambda h, w, y, b=n: linear_cross_entropy(h, w, y, backend=b)
    else:
        def ref(h, w, y):
            lp, ent = linear_token_logprobs_reference(h, w, y, return_entropy=True)
            return lp.sum() + ent.sum()
        impls["eager"] = ref
        if compile_reference:
            impls["torch.compile"] = torch.compile(ref)
        for n in names:
            def fused(h, w, y, b=n):
                lp, ent = linear_token_logprobs(h, w, y, return_entropy=True, backend=b)
                return lp.sum() + ent.sum()
            impls[f"ptk {n}"] = fused
    impls["GEMMs alone (floor)"] = _gemm_floor(op)
    return impls


def _floor_gemms(op: str, weight: torch.Tensor) -> int:
    return 3 if (op == "linear_cross_entropy" and not use_vocab_blocks(weight, True)) else 4


def _gemm_floor(op: str) -> Callable:
    """The head GEMMs the fused path runs (logits once or twice, then d hidden and d weight), whole
    and in the dtype the fused path multiplies in (fp32 for bf16 on CPUs without bf16 GEMMs), with
    nothing else: the time no chunked implementation can beat. Three GEMMs for the cross-entropy of
    an fp32 head (gradients computed in the forward), four otherwise (the backward recomputes the
    logits: log-probs, and bf16/fp16 heads, whose backward walks vocabulary blocks). Its memory
    column is not meaningful."""
    def floor(h, w, y):
        n_gemms = _floor_gemms(op, w)
        with torch.no_grad():
            if logits_element_size(w, False) == 4:
                h, w = h.float(), w.float()
            for _ in range(n_gemms - 2):
                z = h @ w.t()
            z @ w
            z.t() @ h
        return torch.zeros((), requires_grad=True)
    return floor


def run_linear(op: str, dtype: torch.dtype, rows: int, hidden_size: int, vocab: int,
               device: torch.device, repeats: int, warmup: int, compile_reference: bool,
               progress: Callable[[str], None], slow_s: float = 60.0,
               only: Optional[List[str]] = None) -> List[Row]:
    gen = torch.Generator(device="cpu").manual_seed(0)
    hidden = torch.randn(rows, hidden_size, generator=gen).to(device=device, dtype=dtype).requires_grad_(True)
    weight = (torch.randn(vocab, hidden_size, generator=gen) / hidden_size ** 0.5).to(
        device=device, dtype=dtype).requires_grad_(True)
    labels = torch.randint(0, vocab, (rows,), generator=gen).to(device)
    grad_bytes = (hidden.numel() + weight.numel()) * hidden.element_size()
    impls = _select(linear_implementations(op, device, compile_reference), only)
    # effective rate: the floor's GEMMs (2 * rows * H * V flops each) over the measured time; for
    # log-probs with entropy that is the 8 x tokens x H x V convention of GPU kernel papers
    flops = _floor_gemms(op, weight) * 2.0 * rows * hidden_size * vocab
    out: List[Row] = []
    for i, (name, fn) in enumerate(impls.items()):
        progress(f"[{op} {str(dtype)[6:]}] {i + 1}/{len(impls)} {name}")

        def step(fn=fn):
            hidden.grad = None
            weight.grad = None
            fn(hidden, weight, labels).backward()

        # the memory call comes first and doubles as the first warm-up; an implementation slower
        # than slow_s is timed by that call alone (bf16 GEMMs on CPUs without bf16 units take
        # minutes per step)
        t0 = time.perf_counter()
        peak = peak_extra_bytes(step, device)
        t_first = time.perf_counter() - t0
        hidden.grad = weight.grad = None
        slow = t_first > slow_s
        if slow:
            t, runs = t_first, 1
        else:
            t, runs = time_call(step, device, repeats, max(0, warmup - 1)), repeats
        hidden.grad = weight.grad = None
        out.append(Row(op=op, device=str(device), dtype=str(dtype)[6:], rows=rows, vocab=vocab,
                       impl=name, time_ms=t * 1e3,
                       peak_extra_mib=None if peak is None else peak / 2**20,
                       grad_mib=grad_bytes / 2**20,
                       peak_over_grad=None if peak is None else peak / grad_bytes, runs=runs,
                       timed_by_first_call=slow, tflops=flops / t / 1e12))
    return out


def _select(impls: Dict[str, Callable], only: Optional[List[str]]) -> Dict[str, Callable]:
    """The implementations whose name contains one of ``only`` (all when None); eager is always
    kept, as every ratio is taken against it."""
    if not only:
        return impls
    return {k: f for k, f in impls.items() if k == "eager" or any(o in k for o in only)}


def _add_speedups(op_rows: List[Row]) -> None:
    base = {r.impl: r.time_ms for r in op_rows}
    for r in op_rows:
        r.speedup_vs_eager = base["eager"] / r.time_ms
        if "torch.compile" in base:
            r.speedup_vs_compile = base["torch.compile"] / r.time_ms


def run_suite(ops: List[str], dtypes: List[torch.dtype], rows: int, vocab: int,
              device: torch.device, repeats: int, warmup: int, compile_reference: bool,
              progress: Callable[[str], None] = print, linear_rows: int = 2048,
              hidden_size: int = 1024, linear_dtypes: Optional[List[torch.dtype]] = None,
              slow_s: float = 60.0, only: Optional[List[str]] = None,
              preference_shape: tuple = (4, 256, 512), policy_shape: tuple = (8, 256, 512),
              distill_hidden: tuple = (512, 1024)) -> List[Row]:
    results: List[Row] = []
    bw = copy_bandwidth(rows * vocab * 2, device) if device.type == "cuda" else None
    for op in ops:
        if op in DISTILL_OPS:
            for dtype in (dtypes if linear_dtypes is None else linear_dtypes):
                op_rows = run_distill(op, dtype, rows, vocab, linear_rows, *distill_hidden, device, repeats, warmup,
                                      compile_reference, progress, only, Row, _select)
                _add_speedups(op_rows)
                results.extend(op_rows)
            continue
        if op in PREFERENCE_OPS or op in POLICY_OPS:
            runner, shape = (run_preference, preference_shape) if op in PREFERENCE_OPS else (run_policy, policy_shape)
            for dtype in (dtypes if linear_dtypes is None else linear_dtypes):
                op_rows = runner(op, dtype, *shape, vocab, device, repeats, warmup, progress, only, Row, _select)
                _add_speedups(op_rows)
                results.extend(op_rows)
            continue
        if op in LINEAR_OPS:
            for dtype in (dtypes if linear_dtypes is None else linear_dtypes):
                op_rows = run_linear(op, dtype, linear_rows, hidden_size, vocab, device, repeats,
                                     warmup, compile_reference, progress, slow_s, only)
                _add_speedups(op_rows)
                results.extend(op_rows)
            continue
        impls = _select(implementations(op, device, compile_reference), only)
        for dtype in dtypes:
            gen = torch.Generator(device="cpu").manual_seed(0)
            logits = (torch.randn(rows, vocab, generator=gen) * 2).to(device=device, dtype=dtype)
            logits.requires_grad_(True)
            labels = torch.randint(0, vocab, (rows,), generator=gen).to(device)
            grad_bytes = logits.numel() * logits.element_size()
            op_rows: List[Row] = []
            for i, (name, fn) in enumerate(impls.items()):
                progress(f"[{op} {str(dtype)[6:]}] {i + 1}/{len(impls)} {name}")

                def step(fn=fn):
                    logits.grad = None
                    fn(logits, labels).backward()

                t = time_call(step, device, repeats, warmup)
                logits.grad = None
                peak = peak_extra_bytes(step, device)
                logits.grad = None
                row = Row(op=op, device=str(device), dtype=str(dtype)[6:], rows=rows, vocab=vocab,
                          impl=name, time_ms=t * 1e3, runs=repeats,
                          peak_extra_mib=None if peak is None else peak / 2**20,
                          grad_mib=grad_bytes / 2**20,
                          peak_over_grad=None if peak is None else peak / grad_bytes)
                if bw is not None and name.startswith("ptk"):
                    # the fused forward reads the logits once, the backward reads them and writes
                    # the gradient once: 3 passes over rows x vocab elements
                    row.pct_copy_bandwidth = 100.0 * 3 * grad_bytes / t / bw
                op_rows.append(row)
            _add_speedups(op_rows)
            results.extend(op_rows)
            del logits
    return results
