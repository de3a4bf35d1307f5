"""The C++ CPU distillation kernels (``posttrain_kernels.backends.native.cpu``) against the PyTorch
launchers of ``backends/torch_distill.py`` (the contract and oracle, itself checked against an
autograd reference elsewhere): loss, stats and the student's gradient, by error budget against an
fp64 evaluation of the same formulas (the native error may not exceed twice torch_distill's fp32
error plus a small floor), and directly against torch_distill."""
import math

import pytest
import torch

from posttrain_kernels._extension import load_extension
from posttrain_kernels.backends import native
from posttrain_kernels.backends import torch_distill as TD
from budget import assert_within_budget

_EXT = load_extension()
pytestmark = pytest.mark.skipif(
    _EXT is None or not hasattr(_EXT, "distill_forward_cpu") or not hasattr(_EXT, "distill_backward_cpu"),
    reason="the native extension has no CPU distillation kernels")

IGNORE = -100
DIVERGENCES = [("forward_kl", 0.5), ("reverse_kl", 0.5), ("jsd", 0.0), ("jsd", 0.3), ("jsd", 1.0),
               ("skew_kl", 0.1), ("skew_kl", 0.6), ("skew_kl", 1.0), ("skew_reverse_kl", 0.1),
               ("skew_reverse_kl", 0.6), ("skew_reverse_kl", 1.0), ("tvd", 0.5)]
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
VOCABS = [1, 7, 4097, 32003]
# (name, rows, labels, temperature, logits, layout, out)
CASES = [
    ("plain", 5, None, 1.0, "normal", "contiguous", None),
    ("masked", 5, "some", 0.7, "normal", "row_strided", "fresh"),
    ("ninf", 5, "some", 1.0, "ninf", "contiguous", "inplace"),
    ("extreme", 5, None, 0.7, "extreme", "row_strided", "strided"),
    ("all_ignored", 5, "all", 0.7, "ninf", "contiguous", "fresh"),
    ("single_row", 1, None, 0.7, "extreme", "col_strided", None),
]
# Floors of the budgets: loss and stats are fp32 outputs; gradients are stored in the student's
# dtype (relative to the largest gradient of the case).
ATOL = 2e-5
RTOL = 2e-6
GRAD_RTOL = {torch.float32: 2e-6, torch.bfloat16: 8e-3, torch.float16: 1e-3}
# element-wise, directly against torch_distill: fp32 summation order, one low-precision ulp
GRAD_ULP = {torch.float32: 1e-4, torch.bfloat16: 2 ** -7, torch.float16: 2 ** -10}


def _effective(code: int, beta: float) -> int:
    return TD._effective(code, beta)


def make_case(rows, vocab, dtype, logits, code, beta, seed=0):
    g = torch.Generator().manual_seed(seed + 1000 * code + vocab)
    s = torch.randn(rows, vocab, generator=g, dtype=torch.float64) * 3
    t = 0.6 * s + torch.randn(rows, vocab, generator=g, dtype=torch.float64) * 2
    if logits == "ninf" and vocab > 2:
        eff = _effective(code, beta)
        u = torch.rand(rows, vocab, generator=g)
        both = u < 0.2
        s_only = (u >= 0.2) & (u < 0.3)  # p = 0 where q > 0: forward KL is +inf (kept: its gradient is finite)
        t_only = (u >= 0.3) & (u < 0.4)  # q = 0 where p > 0: reverse KL is +inf and its gradient undefined
        if eff == 1:
            t_only[:] = False
        for m in (both, s_only, t_only):
            m[:, 0] = False  # every row keeps a finite logit on both sides
        s[both | s_only] = float("-inf")
        t[both | t_only] = float("-inf")
    elif logits == "extreme" and vocab > 2:
        hot_s = torch.randint(0, vocab, (rows,), generator=g)
        hot_t = torch.randint(0, vocab, (rows,), generator=g)
        s[torch.arange(rows), hot_s] = 1e4
        t[torch.arange(rows)[1::2], hot_t[1::2]] = 1e4
        s[0] = -1e4
        s[0, 1] = -1e4 + 5
        t[0, :3] = torch.tensor([-1e4, 1e4 - 3, 1e4])
        neg = torch.rand(rows, vocab, generator=g) < 0.2
        neg[:, :2] = False
        neg[torch.arange(rows), hot_s] = False
        t[neg] = -1e4
    elif logits == "extreme":  # V in {1, 2}: large magnitudes still
        s[:, 0] = 1e4
        t[:, 0] = -1e4
    return s.to(dtype), t.to(dtype)


def make_labels(rows, mode, vocab, seed=0):
    if mode is None:
        return None
    g = torch.Generator().manual_seed(seed + 7)
    labels = torch.randint(0, max(vocab, 1), (rows,), generator=g)
    if mode == "some":
        labels[1::2] = IGNORE
    elif mode == "all":
        labels[:] = IGNORE
    return labels


def layout(x: torch.Tensor, how: str, pad: int) -> torch.Tensor:
    """The same values with another memory layout: rows padded (row stride > V), or a non-unit
    stride along V (the launcher then makes them contiguous)."""
    n, v = x.shape
    if how == "row_strided":
        big = torch.full((n, v + pad), float("nan"), dtype=x.dtype)
        big[:, pad // 2: pad // 2 + v] = x
        return big[:, pad // 2: pad // 2 + v]
    if how == "col_strided":
        big = torch.full((n, 2 * v), float("nan"), dtype=x.dtype)
        big[:, ::2] = x
        return big[:, ::2]
    return x.contiguous()


def oracle64(student, teacher, labels, code, beta, inv_t, grad_loss):
    """torch_distill's formulas evaluated in fp64 (its _row_terms on fp64 log-probs), from the scaled
    logits ``s = student * inv_t`` rounded to fp32 as every backend computes them first (with
    |logits| ~ 1e4 that rounding alone moves a divergence by ~1e-3 relative: no fp32 backend can
    do better, so it is the input here, not an error)."""
    s = (student.float() * inv_t).double()
    t = (teacher.float() * inv_t).double()
    lse_s, lse_t = torch.logsumexp(s, -1), torch.logsumexp(t, -1)
    ls, lt = s - lse_s[:, None], t - lse_t[:, None]
    eff = _effective(code, beta)
    loss, g = TD._row_terms(ls, lt, eff, beta)
    p = ls.exp()
    c = torch.zeros_like(loss) if g is None else torch.where(p > 0, p * g, torch.zeros_like(p)).sum(-1)
    if eff == 0:
        ds = p - lt.exp()
    else:
        ds = torch.where(p > 0, p * (g - c[:, None]), torch.zeros_like(p))
    grad = ds * (grad_loss.double() * inv_t)[:, None]
    stats = torch.stack([lse_s, lse_t, c], -1)
    if labels is not None:
        skip = labels == IGNORE
        loss = loss.masked_fill(skip, 0.0)
        stats = stats.masked_fill(skip[:, None], 0.0)
        grad = grad.masked_fill(skip[:, None], 0.0)
    return loss, stats, grad


def native_run(student, teacher, labels, code, beta, inv_t, grad_loss, out_mode):
    cpu = native.cpu
    loss, stats = cpu.distill_forward(student, teacher, labels, IGNORE, code, beta, inv_t)
    args = (teacher, labels, IGNORE, code, beta, inv_t, stats, grad_loss)
    if out_mode is None:
        grad = cpu.distill_backward(student, *args)
    elif out_mode == "fresh":
        out = torch.full(student.shape, float("nan"), dtype=student.dtype)
        grad = cpu.distill_backward(student, *args, out=out)
        assert grad is out
    elif out_mode == "inplace":  # the gradient written over (a contiguous copy of) the student
        s2 = student.contiguous().clone()
        grad = cpu.distill_backward(s2, *args, out=s2)
        assert grad is s2
    elif out_mode == "strided":  # a non-contiguous out: filled through a buffer
        out = torch.full(student.shape[::-1], float("nan"), dtype=student.dtype).t()
        grad = cpu.distill_backward(student, *args, out=out)
        assert grad is out
    else:
        raise AssertionError(out_mode)
    return loss, stats, grad


def check(code, beta, dtype, vocab, case, seed=0):
    name, rows, label_mode, temperature, logits, how, out_mode = case
    inv_t = 1.0 / temperature
    s, t = make_case(rows, vocab, dtype, logits, code, beta, seed)
    labels = make_labels(rows, label_mode, vocab, seed)
    grad_loss = torch.randn(rows, generator=torch.Generator().manual_seed(seed + 3))
    student, teacher = layout(s, how, 13), layout(t, how, 6)

    want_l, want_st, want_g = oracle64(s, t, labels, code, beta, inv_t, grad_loss)
    ref_l, ref_st = TD.distill_forward(student, teacher, labels, IGNORE, code, beta, inv_t)
    ref_g = TD.distill_backward(student, teacher, labels, IGNORE, code, beta, inv_t, ref_st, grad_loss)
    got_l, got_st, got_g = native_run(student, teacher, labels, code, beta, inv_t, grad_loss, out_mode)

    assert got_l.dtype == torch.float32 and got_l.shape == (rows,)
    assert got_st.dtype == torch.float32 and got_st.shape == (rows, 3)
    assert got_g.dtype == dtype and got_g.shape == (rows, vocab)
    for x in (got_l, got_st, got_g):
        assert not torch.isnan(x).any(), "nan in a native output"
    tag = f"{name} V={vocab} {dtype} code={code} beta={beta}"
    if code in (3, 4) and beta == 1.0:
        # r = q (skew_kl) or r = p (skew_reverse_kl): loss, c and gradient vanish identically
        assert (got_l == 0).all() and (got_st[:, 2] == 0).all() and (got_g == 0).all()
    assert_within_budget(got_l, ref_l, want_l, atol=ATOL, rtol=RTOL, what=f"loss {tag}")
    for i, what in enumerate(("lse_s", "lse_t", "c")):
        assert_within_budget(got_st[:, i], ref_st[:, i], want_st[:, i], atol=ATOL, rtol=RTOL, what=f"{what} {tag}")
    g_scale = float(want_g.abs().max()) if want_g.numel() else 0.0
    # fp32 rounding of G - c (terms of size ~1) times the upstream factor: a few fp32 ulps
    g_floor = 5e-7 * float(grad_loss.abs().max()) * inv_t
    assert_within_budget(got_g, ref_g, want_g, atol=g_floor + GRAD_RTOL[dtype] * g_scale, what=f"grad {tag}")

    # directly against torch_distill (same fp32 formulas): close where the inputs are moderate
    if logits != "extreme":
        torch.testing.assert_close(got_l, ref_l, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(got_st, ref_st, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(got_g.float(), ref_g.float(), rtol=GRAD_ULP[dtype],
                                   atol=g_floor + 2 * GRAD_RTOL[dtype] * g_scale)
    if labels is not None:
        skip = labels == IGNORE
        assert (got_l[skip] == 0).all() and (got_st[skip] == 0).all() and (got_g[skip] == 0).all()


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
@pytest.mark.parametrize("vocab", VOCABS)
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).split(".")[-1])
@pytest.mark.parametrize("divergence,beta", DIVERGENCES, ids=[f"{d}-{b}" for d, b in DIVERGENCES])
def test_native_distill_matches_torch_distill(divergence, beta, dtype, vocab, case):
    check(TD.DIVERGENCE_CODES[divergence], beta, dtype, vocab, case)


@pytest.mark.parametrize("divergence,beta", DIVERGENCES, ids=[f"{d}-{b}" for d, b in DIVERGENCES])
def test_identical_rows_give_zero(divergence, beta):
    """Student == teacher: every divergence is 0 (ties of tvd's sign included), so is the gradient."""
    code = TD.DIVERGENCE_CODES[divergence]
    x = torch.randn(4, 1000, generator=torch.Generator().manual_seed(code)) * 3
    loss, stats = native.cpu.distill_forward(x, x.clone(), None, IGNORE, code, beta, 0.7)
    grad = native.cpu.distill_backward(x, x.clone(), None, IGNORE, code, beta, 0.7, stats, torch.ones(4))
    torch.testing.assert_close(loss, torch.zeros(4), rtol=0, atol=2e-6)
    torch.testing.assert_close(grad, torch.zeros_like(grad), rtol=0, atol=1e-6)  # fp32 rounding of G - c


def test_infinite_forward_kl_and_gradient_stay_finite():
    """p = 0 where q > 0: KL(q || p) = +inf, as torch_distill; its gradient p - q is finite."""
    g = torch.Generator().manual_seed(0)
    s = torch.randn(2, 300, generator=g)
    t = torch.randn(2, 300, generator=g)
    s[0, 5] = float("-inf")
    for code, beta in ((0, 0.5), (2, 0.0)):
        loss, stats = native.cpu.distill_forward(s, t, None, IGNORE, code, beta, 1.0)
        ref, _ = TD.distill_forward(s, t, None, IGNORE, code, beta, 1.0)
        assert math.isinf(loss[0]) and loss[0] > 0 and math.isinf(ref[0])
        torch.testing.assert_close(loss[1], ref[1])
        grad = native.cpu.distill_backward(s, t, None, IGNORE, code, beta, 1.0, stats, torch.ones(2))
        assert torch.isfinite(grad).all()
        torch.testing.assert_close(grad[0, 5], -torch.softmax(t[0], -1)[5], rtol=1e-5, atol=1e-8)


def test_out_may_be_the_teacher_or_overlap_it():
    g = torch.Generator().manual_seed(0)
    s = torch.randn(3, 200, generator=g)
    t = torch.randn(3, 200, generator=g)
    loss, stats = native.cpu.distill_forward(s, t, None, IGNORE, 2, 0.3, 1.0)
    want = TD.distill_backward(s, t, None, IGNORE, 2, 0.3, 1.0, stats, torch.ones(3))
    t2 = t.clone()
    got = native.cpu.distill_backward(s, t2, None, IGNORE, 2, 0.3, 1.0, stats, torch.ones(3), out=t2)
    assert got is t2
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-7)
    # out overlapping the teacher without being it: computed into a buffer first
    big = torch.cat([torch.zeros(1, 200), t]).reshape(-1)
    t3 = big[200:].view(3, 200)
    out = big[100: 100 + 600].view(3, 200)
    got = native.cpu.distill_backward(s, t3, None, IGNORE, 2, 0.3, 1.0, stats, torch.ones(3), out=out)
    assert got is out
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-7)


def test_out_of_another_dtype_is_cast_into():
    g = torch.Generator().manual_seed(0)
    s = torch.randn(2, 50, generator=g).bfloat16()
    t = torch.randn(2, 50, generator=g).bfloat16()
    loss, stats = native.cpu.distill_forward(s, t, None, IGNORE, 0, 0.5, 1.0)
    out = torch.empty(2, 50)
    got = native.cpu.distill_backward(s, t, None, IGNORE, 0, 0.5, 1.0, stats, torch.ones(2), out=out)
    assert got is out
    want = native.cpu.distill_backward(s, t, None, IGNORE, 0, 0.5, 1.0, stats, torch.ones(2))
    torch.testing.assert_close(got, want.float(), rtol=0, atol=0)


def test_empty_rows():
    s = torch.randn(0, 10)
    loss, stats = native.cpu.distill_forward(s, s, None, IGNORE, 2, 0.5, 1.0)
    assert loss.shape == (0,) and stats.shape == (0, 3)
    grad = native.cpu.distill_backward(s, s, None, IGNORE, 2, 0.5, 1.0, stats, torch.ones(0))
    assert grad.shape == (0, 10)


def test_errors():
    s = torch.randn(2, 8)
    # without CUDA kernels in _C: NotImplementedError; with them, CPU tensors are the wrong device
    with pytest.raises((NotImplementedError, ValueError), match="cuda"):
        native.cuda.distill_forward(s, s, None, IGNORE, 0, 0.5, 1.0)
    with pytest.raises((NotImplementedError, ValueError), match="cuda"):
        native.cuda.distill_backward(s, s, None, IGNORE, 0, 0.5, 1.0, torch.zeros(2, 3), torch.ones(2))
    with pytest.raises(TypeError, match="teacher"):
        native.cpu.distill_forward(s, s.double(), None, IGNORE, 0, 0.5, 1.0)
    with pytest.raises(TypeError, match="student"):
        native.cpu.distill_forward(s.double(), s.double(), None, IGNORE, 0, 0.5, 1.0)
    with pytest.raises(ValueError, match="teacher"):
        native.cpu.distill_forward(s, s[:, :4], None, IGNORE, 0, 0.5, 1.0)
    with pytest.raises(ValueError, match="stats"):
        native.cpu.distill_backward(s, s, None, IGNORE, 0, 0.5, 1.0, torch.zeros(2), torch.ones(2))
    with pytest.raises(ValueError, match="divergence"):
        native.cpu.distill_forward(s, s, None, IGNORE, 9, 0.5, 1.0)


FUSED_CASES = [c for c in CASES if c[5] != "col_strided"]  # the fused kernel writes over unit-stride rows


@pytest.mark.skipif(_EXT is None or not hasattr(_EXT, "distill_fused_cpu"), reason="no fused CPU kernel")
@pytest.mark.parametrize("case", FUSED_CASES, ids=[c[0] for c in FUSED_CASES])
@pytest.mark.parametrize("vocab", [1, 7, 4097])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=lambda d: str(d).split(".")[-1])
@pytest.mark.parametrize("divergence,beta", DIVERGENCES, ids=[f"{d}-{b}" for d, b in DIVERGENCES])
def test_fused_equals_forward_then_backward(divergence, beta, dtype, vocab, case):
    """distill_fused_ (forward + gradient over the student, teacher as scratch; fp32 rows stage the
    gradient's factors between passes) gives the loss, stats and gradient of distill_forward +
    distill_backward, within the same budget against the fp64 oracle."""
    code = TD.DIVERGENCE_CODES[divergence]
    name, rows, label_mode, temperature, logits, how, _ = case
    inv_t = 1.0 / temperature
    s, t = make_case(rows, vocab, dtype, logits, code, beta)
    labels = make_labels(rows, label_mode, vocab)
    grad_loss = torch.randn(rows, generator=torch.Generator().manual_seed(3))
    student, teacher = layout(s, how, 13), layout(t, how, 6)
    want_l, want_st, want_g = oracle64(s, t, labels, code, beta, inv_t, grad_loss)
    ref_l, ref_st = native.cpu.distill_forward(student, teacher, labels, IGNORE, code, beta, inv_t)
    ref_g = native.cpu.distill_backward(student, teacher, labels, IGNORE, code, beta, inv_t, ref_st, grad_loss)
    s_buf, t_buf = student.clone(), teacher.clone()  # the kernel's scratch: not the inputs above
    got_l, got_st = native.cpu.distill_fused_(s_buf, t_buf, labels, IGNORE, code, beta, inv_t, grad_loss)
    got_g = s_buf
    tag = f"fused {name} V={vocab} {dtype} {divergence} beta={beta}"
    assert not torch.isnan(got_l).any() and not torch.isnan(got_g).any(), tag
    # the forward's arithmetic (the compiler may contract a multiply-add differently): fp32 rounding
    torch.testing.assert_close(got_l, ref_l, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(got_st, ref_st, rtol=1e-5, atol=1e-6)
    g_scale = float(want_g.abs().max()) if want_g.numel() else 0.0
    g_floor = 5e-7 * float(grad_loss.abs().max()) * inv_t
    atol = g_floor + GRAD_RTOL[dtype] * g_scale
    assert_within_budget(got_g, ref_g, want_g, atol=atol, what=f"grad {tag}")
    torch.testing.assert_close(got_g.float(), ref_g.float(), rtol=GRAD_ULP[dtype], atol=2 * atol)
    if labels is not None:
        assert (got_g[labels == IGNORE] == 0).all(), tag


def test_fused_op_falls_back_where_there_is_no_fused_kernel():
    """The public op runs forward + in-place backward on backends without a fused kernel (torch),
    with the numbers of the C++ one."""
    from posttrain_kernels.ops import distill as ops
    s, t = make_case(6, 97, torch.float32, "normal", 2, 0.3)
    labels = make_labels(6, "some", 97)
    g = torch.rand(6)
    out = {}
    for backend in ("torch", "cpu"):
        sb, tb = s.clone(), t.clone()
        loss, stats = ops.distill_fused_(sb, tb, labels, IGNORE, 2, 0.3, 0.8, g, backend)
        out[backend] = (loss, stats, sb)
    for a, b in zip(out["torch"], out["cpu"]):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
