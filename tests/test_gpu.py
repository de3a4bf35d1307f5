"""GPU-only checks (skipped without a CUDA device): the Triton and CUDA backends at real sizes."""
import pytest
import torch

import posttrain_kernels as ptk
from posttrain_kernels.reference import cross_entropy_reference, token_logprobs_reference
from conftest import LIVE
from test_token_logprobs import check

pytestmark = pytest.mark.gpu

GPU_BACKENDS = [b for b in ("triton", "cuda") if LIVE.get(b)]


@pytest.mark.parametrize("backend", GPU_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("vocab", [1, 7, 4097, 32000, 151936])
@pytest.mark.parametrize("k", [1, 5])
def test_gpu_matches_reference(backend, dtype, vocab, k):
    check(backend, "cuda", 37, vocab, k, dtype, "some", 0.7, extreme=vocab > 2, entropy=True)


@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_gpu_many_rows(backend):
    logits = torch.randn(70000, 33, device="cuda")
    labels = torch.randint(0, 33, (70000,), device="cuda")
    lp, h = ptk.token_logprobs(logits, labels, return_entropy=True, backend=backend)
    lr, hr = token_logprobs_reference(logits, labels, 1.0, -100, True)
    torch.testing.assert_close(lp, lr, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(h, hr, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_gpu_int64_offsets(backend):
    # rows x vocab > 2^31 elements: offsets must be computed in int64
    if torch.cuda.get_device_properties(0).total_memory < 24 * 2**30:
        pytest.skip("needs 24 GiB of GPU memory")
    rows, vocab = 17000, 128256
    logits = torch.randn(rows, vocab, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    labels = torch.randint(0, vocab, (rows,), device="cuda")
    loss = ptk.cross_entropy(logits, labels, backend=backend)
    loss.backward()
    tail = slice(rows - 4, rows)
    ref = cross_entropy_reference(logits.detach()[tail], labels[tail], reduction="none")
    got = ptk.cross_entropy(logits.detach()[tail], labels[tail], reduction="none", backend=backend)
    torch.testing.assert_close(got, ref, atol=1e-4, rtol=1e-4)
    assert torch.isfinite(logits.grad[tail].float()).all()
    assert logits.grad[tail].float().abs().sum() > 0


@pytest.mark.parametrize("backend", GPU_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_gpu_linear_cross_entropy(backend, dtype, reduction):
    """The fused-linear path on the GPU: bf16 GEMMs with the fp32 weight-gradient accumulation
    (addmm with out_dtype), in-place chunk gradients, chunks that do not divide the rows."""
    from posttrain_kernels.reference import linear_cross_entropy_reference
    g = torch.Generator(device="cuda").manual_seed(0)
    h = torch.randn(1000, 256, device="cuda", generator=g).to(dtype)
    w = (torch.randn(32003, 256, device="cuda", generator=g) / 16).to(dtype)
    y = torch.randint(0, 32003, (1000,), device="cuda", generator=g)
    y[::7] = -100

    def run(fn, dt):
        hh, ww = h.to(dt).requires_grad_(True), w.to(dt).requires_grad_(True)
        out = fn(hh, ww)
        (out.sum() if out.dim() else out).backward()
        return out.detach().double(), hh.grad.double(), ww.grad.double()

    got = run(lambda a, b: ptk.linear_cross_entropy(a, b, y, reduction=reduction, chunk_size=300,
                                                    backend=backend), dtype)
    oracle = run(lambda a, b: linear_cross_entropy_reference(a, b, y, reduction=reduction), torch.float64)
    tol = 1e-4 if dtype == torch.float32 else 3e-2
    for a, b in zip(got, oracle):
        assert (a - b).norm() <= tol * b.norm() + 1e-6


@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_gpu_linear_logprobs_peak_memory(backend):
    """bf16, 16384 tokens x H=4096 x V=131072: extra memory beyond the gradients under 1 GiB."""
    if torch.cuda.get_device_properties(0).total_memory < 40 * 2**30:
        pytest.skip("needs 40 GiB of GPU memory")
    n, hd, v = 16384, 4096, 131072
    h = torch.randn(n, hd, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    w = (torch.randn(v, hd, device="cuda", dtype=torch.bfloat16) / 64).requires_grad_(True)
    y = torch.randint(0, v, (n,), device="cuda")
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    lp, ent = ptk.linear_token_logprobs(h, w, y, return_entropy=True, backend=backend)
    (lp.sum() + ent.sum()).backward()
    torch.cuda.synchronize()
    grads = (h.numel() + w.numel()) * 2
    extra = torch.cuda.max_memory_allocated() - base - grads
    assert extra < 2**30 + v * hd * 4, extra / 2**20  # the fp32 weight-gradient accumulator aside
