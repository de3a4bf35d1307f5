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
