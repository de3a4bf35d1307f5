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
        # fresh leaves each run (h.to(h.dtype) would be h itself, made a grad-requiring leaf
        # by the first run, so the fp64 oracle's h.to(float64) would be no leaf)
        hh, ww = h.detach().to(dt).requires_grad_(True), w.detach().to(dt).requires_grad_(True)
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


# ------------------------------------------------------------------------------------------------
# Distillation: the native CUDA kernels (backend="cuda": csrc/cuda/distill.cu) against
# torch_distill (the contract) and its fp64 evaluation, with the budgets of the CPU kernels' tests.
# ------------------------------------------------------------------------------------------------

from posttrain_kernels._extension import load_extension  # noqa: E402
from posttrain_kernels.backends import native  # noqa: E402
from posttrain_kernels.backends import torch_distill as TD  # noqa: E402
from budget import assert_within_budget  # noqa: E402
import test_distill_kernels as TDK  # noqa: E402  (helpers only: cases, inputs, fp64 oracle, budgets)

_EXT = load_extension()
needs_cuda_distill = pytest.mark.skipif(
    not LIVE.get("cuda") or _EXT is None or not hasattr(_EXT, "distill_forward_cuda"),
    reason="the native extension has no CUDA distillation kernels (or no CUDA device)")
DISTILL_VOCABS = [1, 7, 4097, 32003]


def _cuda_layout(x: torch.Tensor, how: str, pad: int) -> torch.Tensor:
    """TDK.layout on the GPU: the same values with padded rows or a non-unit stride along V (a
    plain .cuda() of such a view would make it contiguous)."""
    n, v = x.shape
    x = x.cuda()
    if how == "row_strided":
        big = torch.full((n, v + pad), float("nan"), dtype=x.dtype, device="cuda")
        big[:, pad // 2: pad // 2 + v] = x
        return big[:, pad // 2: pad // 2 + v]
    if how == "col_strided":
        big = torch.full((n, 2 * v), float("nan"), dtype=x.dtype, device="cuda")
        big[:, ::2] = x
        return big[:, ::2]
    return x.contiguous()


def _cuda_run(student, teacher, labels, code, beta, inv_t, grad_loss, out_mode):
    """native.cuda's forward + backward, the backward into each kind of destination."""
    cu = native.cuda
    loss, stats = cu.distill_forward(student, teacher, labels, TDK.IGNORE, code, beta, inv_t)
    args = (teacher, labels, TDK.IGNORE, code, beta, inv_t, stats, grad_loss)
    if out_mode is None:
        grad = cu.distill_backward(student, *args)
    elif out_mode == "fresh":
        out = torch.full(student.shape, float("nan"), dtype=student.dtype, device="cuda")
        grad = cu.distill_backward(student, *args, out=out)
        assert grad is out
    elif out_mode == "inplace":  # written over (a contiguous copy of) the student by the kernel itself
        s2 = student.contiguous().clone()
        assert native.NativeBackend._distill_out_ok(s2, s2, teacher)
        grad = cu.distill_backward(s2, *args, out=s2)
        assert grad is s2
    elif out_mode == "strided":  # a non-contiguous out: filled through a buffer
        out = torch.full(student.shape[::-1], float("nan"), dtype=student.dtype, device="cuda").t()
        grad = cu.distill_backward(student, *args, out=out)
        assert grad is out
    else:
        raise AssertionError(out_mode)
    torch.cuda.synchronize()
    return loss.cpu(), stats.cpu(), grad.cpu()


def _check_cuda_distill(code, beta, dtype, vocab, case, seed=0):
    name, rows, label_mode, temperature, logits, how, out_mode = case
    inv_t = 1.0 / temperature
    s, t = TDK.make_case(rows, vocab, dtype, logits, code, beta, seed)
    labels = TDK.make_labels(rows, label_mode, vocab, seed)
    grad_loss = torch.randn(rows, generator=torch.Generator().manual_seed(seed + 3))

    want_l, want_st, want_g = TDK.oracle64(s, t, labels, code, beta, inv_t, grad_loss)
    ref_l, ref_st = TD.distill_forward(s, t, labels, TDK.IGNORE, code, beta, inv_t)
    ref_g = TD.distill_backward(s, t, labels, TDK.IGNORE, code, beta, inv_t, ref_st, grad_loss)
    got_l, got_st, got_g = _cuda_run(_cuda_layout(s, how, 13), _cuda_layout(t, how, 6),
                                     None if labels is None else labels.cuda(), code, beta, inv_t,
                                     grad_loss.cuda(), out_mode)

    assert got_l.dtype == torch.float32 and got_l.shape == (rows,)
    assert got_st.dtype == torch.float32 and got_st.shape == (rows, 3)
    assert got_g.dtype == dtype and got_g.shape == (rows, vocab)
    for x in (got_l, got_st, got_g):
        assert not torch.isnan(x).any(), "nan in a CUDA output"
    tag = f"{name} V={vocab} {dtype} code={code} beta={beta}"
    if code in (3, 4) and beta == 1.0:
        assert (got_l == 0).all() and (got_st[:, 2] == 0).all() and (got_g == 0).all()
    assert_within_budget(got_l, ref_l, want_l, atol=TDK.ATOL, rtol=TDK.RTOL, what=f"loss {tag}")
    for i, what in enumerate(("lse_s", "lse_t", "c")):
        assert_within_budget(got_st[:, i], ref_st[:, i], want_st[:, i], atol=TDK.ATOL, rtol=TDK.RTOL,
                             what=f"{what} {tag}")
    g_scale = float(want_g.abs().max()) if want_g.numel() else 0.0
    g_floor = 5e-7 * float(grad_loss.abs().max()) * inv_t
    assert_within_budget(got_g, ref_g, want_g, atol=g_floor + TDK.GRAD_RTOL[dtype] * g_scale,
                         what=f"grad {tag}")
    if logits != "extreme":  # directly against torch_distill where the inputs are moderate
        torch.testing.assert_close(got_l, ref_l, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(got_st, ref_st, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(got_g.float(), ref_g.float(), rtol=TDK.GRAD_ULP[dtype],
                                   atol=g_floor + 2 * TDK.GRAD_RTOL[dtype] * g_scale)
    if labels is not None:  # skipped rows: exactly 0 everywhere
        skip = labels == TDK.IGNORE
        assert (got_l[skip] == 0).all() and (got_st[skip] == 0).all() and (got_g[skip] == 0).all()


@needs_cuda_distill
@pytest.mark.parametrize("case", TDK.CASES, ids=[c[0] for c in TDK.CASES])
@pytest.mark.parametrize("vocab", DISTILL_VOCABS)
@pytest.mark.parametrize("dtype", TDK.DTYPES, ids=lambda d: str(d).split(".")[-1])
@pytest.mark.parametrize("divergence,beta", TDK.DIVERGENCES, ids=[f"{d}-{b}" for d, b in TDK.DIVERGENCES])
def test_gpu_cuda_distill_kernels(divergence, beta, dtype, vocab, case):
    """Every divergence (jsd's beta 0 / 1 and the skews' alpha 1 included), fp32 / bf16 / fp16, odd
    vocabularies, ignored rows, -inf and |x| ~ 1e4 logits, padded / column-strided rows, and the
    backward into a new buffer, a given one, a strided one, and in place over the student."""
    _check_cuda_distill(TD.DIVERGENCE_CODES[divergence], beta, dtype, vocab, case)


# Known failure, seen on an H100 (benchmarks/results/nvidia-h100-80gb-hbm3/test_gpu.log): for TVD
# the loss of identical rows is 0 (< 2e-6) but 4% of the gradient elements get up to 1.1e-4, where
# the CPU kernel gives exact zeros. TVD's G = sign(p - q) / 2 turns rounding into a sign: the two
# fp32 lse's of the row seem to differ by an ulp; computing the sign from ls - lt instead of p - q
# was tried on the device and changed nothing, so the cause is not established yet.
_TVD_IDENTICAL_ROWS = pytest.mark.xfail(strict=True, reason="CUDA TVD gradient noise on identical rows (see above)")


@needs_cuda_distill
@pytest.mark.parametrize("divergence,beta", [
    pytest.param(d, b, marks=_TVD_IDENTICAL_ROWS) if d == "tvd" else (d, b) for d, b in TDK.DIVERGENCES],
    ids=[f"{d}-{b}" for d, b in TDK.DIVERGENCES])
def test_gpu_cuda_distill_identical_rows_give_zero(divergence, beta):
    code = TD.DIVERGENCE_CODES[divergence]
    x = (torch.randn(4, 1000, generator=torch.Generator().manual_seed(code)) * 3).cuda()
    loss, stats = native.cuda.distill_forward(x, x.clone(), None, TDK.IGNORE, code, beta, 0.7)
    grad = native.cuda.distill_backward(x, x.clone(), None, TDK.IGNORE, code, beta, 0.7, stats,
                                        torch.ones(4, device="cuda"))
    torch.testing.assert_close(loss, torch.zeros_like(loss), rtol=0, atol=2e-6)
    torch.testing.assert_close(grad, torch.zeros_like(grad), rtol=0, atol=1e-6)


@needs_cuda_distill
def test_gpu_cuda_distill_infinite_forward_kl_has_finite_gradient():
    g = torch.Generator().manual_seed(0)
    s = torch.randn(2, 300, generator=g)
    t = torch.randn(2, 300, generator=g)
    s[0, 5] = float("-inf")
    for code, beta in ((0, 0.5), (2, 0.0)):
        loss, stats = native.cuda.distill_forward(s.cuda(), t.cuda(), None, TDK.IGNORE, code, beta, 1.0)
        ref, _ = TD.distill_forward(s, t, None, TDK.IGNORE, code, beta, 1.0)
        loss = loss.cpu()
        assert torch.isinf(loss[0]) and loss[0] > 0 and torch.isinf(ref[0])
        torch.testing.assert_close(loss[1], ref[1])
        grad = native.cuda.distill_backward(s.cuda(), t.cuda(), None, TDK.IGNORE, code, beta, 1.0, stats,
                                            torch.ones(2, device="cuda")).cpu()
        assert torch.isfinite(grad).all()
        torch.testing.assert_close(grad[0, 5], -torch.softmax(t[0], -1)[5], rtol=1e-5, atol=1e-8)


@needs_cuda_distill
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_gpu_cuda_distill_in_place_over_teacher_and_op(dtype):
    """The backward written over the teacher buffer, and the in-place custom op of the fused-linear
    loss (distill_backward_, over the student's chunk buffer), against a fresh buffer."""
    from posttrain_kernels.ops import distill as distill_ops
    g = torch.Generator().manual_seed(1)
    s = (torch.randn(9, 4099, generator=g) * 2).to(dtype).cuda()
    t = (torch.randn(9, 4099, generator=g) * 2).to(dtype).cuda()
    labels = torch.tensor([1, -100, 3, 4, -100, 6, 7, 8, 0], device="cuda")
    gl = torch.randn(9, generator=g).cuda()
    for code, beta in ((0, 0.5), (2, 0.3), (4, 0.6), (5, 0.5)):
        loss, stats = native.cuda.distill_forward(s, t, labels, -100, code, beta, 0.8)
        want = native.cuda.distill_backward(s, t, labels, -100, code, beta, 0.8, stats, gl)
        t2 = t.clone()
        got = native.cuda.distill_backward(s, t2, labels, -100, code, beta, 0.8, stats, gl, out=t2)
        assert got is t2
        torch.testing.assert_close(got, want, rtol=0, atol=0)
        s2 = s.clone()
        distill_ops.distill_backward_(s2, t, labels, -100, code, beta, 0.8, stats, gl, "cuda")
        torch.testing.assert_close(s2, want, rtol=0, atol=0)


@needs_cuda_distill
def test_gpu_cuda_distill_dispatch_and_public_api():
    """backend="cuda" runs the native kernels (not the PyTorch fallback) and matches the reference
    through the public API: values and gradients, bf16 at a real vocabulary, many rows."""
    from posttrain_kernels.dispatch import distill_launchers
    from posttrain_kernels.reference import distill_loss_reference
    assert distill_launchers("cuda") is native.cuda
    g = torch.Generator(device="cuda").manual_seed(0)
    for dtype, (n, v) in ((torch.float32, (70000, 33)), (torch.bfloat16, (64, 151936))):
        s = (torch.randn(n, v, device="cuda", generator=g) * 2).to(dtype)
        t = (torch.randn(n, v, device="cuda", generator=g) * 2).to(dtype)
        labels = torch.randint(0, v, (n,), device="cuda", generator=g)
        labels[::5] = -100
        for divergence, beta in (("forward_kl", 0.5), ("jsd", 0.5), ("reverse_kl", 0.5)):
            got, ref = [], []
            for backend, out in (("cuda", got), ("reference", ref)):
                if backend == "cuda":
                    x = s.clone().requires_grad_(True)
                    loss = ptk.distill_loss(x, t, labels=labels, divergence=divergence, beta=beta,
                                            temperature=0.9, backend="cuda")
                else:  # the fp64 oracle on the same (rounded) inputs
                    x = s.double().requires_grad_(True)
                    loss = distill_loss_reference(x, t.double(), labels, divergence, beta, 0.9, -100,
                                                  "batchmean")
                loss.backward()
                out += [loss.detach().double(), x.grad.double()]
            tol = 1e-4 if dtype == torch.float32 else 1e-2  # bf16: the gradient is stored in bf16
            for a, b in zip(got, ref):
                assert (a - b).norm() <= tol * b.norm() + 1e-6, (divergence, dtype)
