"""GPU probe for a lent device (run by benchmarks/gpu_session.sh): which fp32-accumulating GEMM path
this torch takes, and a profile of one fused-linear log-prob + entropy step at the issue's size,
so that a slow result can be explained from the same call.

    python3 -m benchmarks.gpu_probe [tokens hidden vocab]
"""
from __future__ import annotations

import sys

import torch

import posttrain_kernels as ptk
from posttrain_kernels.api.linear_token_logprobs import _schedule


def addmm_out_dtype_works() -> bool:
    """Whether ``torch.addmm(acc, a, b, out_dtype=float32, out=acc)`` accumulates bf16 products in
    fp32 in place (what ``accumulate_product`` relies on for the bf16 gradient sums)."""
    a = torch.randn(64, 32, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(32, 48, device="cuda", dtype=torch.bfloat16)
    acc = torch.ones(64, 48, device="cuda")
    try:
        torch.addmm(acc, a, b, out_dtype=torch.float32, out=acc)
    except (TypeError, RuntimeError) as e:
        print(f"addmm(out_dtype=float32, out=acc): unsupported ({type(e).__name__}: {e})")
        return False
    want = 1.0 + a.double() @ b.double()
    err = float((acc.double() - want).abs().max())
    print(f"addmm(out_dtype=float32, out=acc): works, max error {err:.2e} against fp64")
    return err < 1e-3


def profile_step(n: int, h: int, v: int) -> None:
    g = torch.Generator(device="cuda").manual_seed(0)
    hidden = torch.randn(n, h, device="cuda", generator=g).bfloat16().requires_grad_(True)
    weight = (torch.randn(v, h, device="cuda", generator=g) / h ** 0.5).bfloat16().requires_grad_(True)
    labels = torch.randint(0, v, (n,), device="cuda", generator=g)
    print("schedule (chunk rows, (tile rows, tile cols)):", _schedule(None, n, weight, False))

    def step():
        hidden.grad = weight.grad = None
        lp, ent = ptk.linear_token_logprobs(hidden, weight, labels, return_entropy=True, backend="triton")
        (lp.sum() + ent.sum()).backward()

    for _ in range(2):
        step()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    step()
    end.record()
    torch.cuda.synchronize()
    ms = start.elapsed_time(end)
    print(f"one step {ms:.1f} ms = {8 * n * h * v / ms / 1e9:.0f} effective TFLOP/s")
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        step()
        torch.cuda.synchronize()
    for key in ("device_time_total", "cuda_time_total"):  # the name changed across torch versions
        try:
            print(prof.key_averages().table(sort_by=key, row_limit=14, max_name_column_width=60))
            break
        except Exception as e:  # noqa: BLE001
            print(f"profile table by {key}: {e}")


if __name__ == "__main__":
    print(torch.__version__, torch.cuda.get_device_name())
    addmm_out_dtype_works()
    dims = [int(x) for x in sys.argv[1:4]] or [16384, 4096, 131072]
    profile_step(*dims)
