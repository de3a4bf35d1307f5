"""cross_entropy on every fused backend against the reference (error budget against the fp64
oracle) and against torch.nn.functional.cross_entropy where the two overlap (no z-loss, no
soft-capping): values for every reduction and gradients with random upstream gradients."""
import itertools

import pytest
import torch
import torch.nn.functional as F

import posttrain_kernels as ptk
from posttrain_kernels.reference import cross_entropy_reference
from budget import assert_within_budget
from conftest import LIVE, fused_backends

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
IGN = -100
# Floors of the budget: losses are fp32 outputs; gradients are stored in the logits dtype.
VALUE_ATOL = 2e-5
GRAD_RTOL = {torch.float32: 1e-6, torch.bfloat16: 8e-3, torch.float16: 1e-3}
# (label_smoothing, z_loss, softcap): every combination of the three options.
OPTIONS = list(itertools.product([0.0, 0.1], [0.0, 1e-4], [None, 30.0]))


def opt_id(o):
    eps, z, cap = o
    return f"ls{eps}-z{z}-cap{cap}"


def make_case(rows, vocab, dtype, mask, extreme=False, ninf=False, seed=0):
    """Random logits (scale 3) and labels; ``extreme``: +-1e4 entries (a hot +1e4 per row, one row at
    -1e4 everywhere), ``ninf``: also -inf entries (never on a label or on the hot entry)."""
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(rows, vocab, generator=g) * 3
    labels = torch.randint(0, vocab, (rows,), generator=g)
    if extreme and vocab > 2:
        hot = torch.randint(0, vocab, (rows,), generator=g)
        logits[torch.arange(rows), hot] = 1e4
        logits[0] = -1e4
        logits[0, labels[0]] = -1e4 + 5
        logits[1, :: 3] = -1e4
        if ninf:
            m = torch.rand(rows, vocab, generator=g) < 0.3
            m[torch.arange(rows), labels] = False
            m[torch.arange(rows), hot] = False
            m[0] = False
            logits[m] = float("-inf")
    if mask == "some":
        labels[1::3] = IGN
    elif mask == "all":
        labels[:] = IGN
    return logits.to(dtype), labels


def run(backend, device, logits, labels, opts, reduction, upstream):
    """(loss, grad) of ``sum(upstream * loss)`` (``upstream`` a scalar or per-row fp64 tensor)."""
    eps, z, cap = opts
    x = logits.detach().clone().to(device).requires_grad_(True)
    y = labels.to(device)
    if backend == "reference":
        loss = cross_entropy_reference(x, y, IGN, eps, z, cap, reduction)
    else:
        loss = ptk.cross_entropy(x, y, label_smoothing=eps, z_loss=z, softcap=cap,
                                 reduction=reduction, backend=backend)
    (loss.double() * upstream.to(device).view(loss.shape)).sum().backward()
    return loss.detach().cpu(), x.grad.cpu()


def upstream_for(rows, reduction, seed=1):
    g = torch.Generator().manual_seed(seed)
    if reduction == "none":
        return torch.randn(rows, generator=g, dtype=torch.float64)
    return torch.randn((), generator=g, dtype=torch.float64)


def check(backend, device, rows, vocab, dtype, mask, opts, reduction, extreme=False, ninf=False):
    logits, labels = make_case(rows, vocab, dtype, mask, extreme, ninf)
    up = upstream_for(rows, reduction)
    loss, gx = run(backend, device, logits, labels, opts, reduction, up)
    loss_r, gx_r = run("reference", "cpu", logits, labels, opts, reduction, up)
    loss_o, gx_o = run("reference", "cpu", logits.double(), labels, opts, reduction, up)
    assert loss.dtype == torch.float32, loss.dtype
    assert loss.shape == loss_o.shape == (labels.shape if reduction == "none" else ())
    assert gx.dtype == dtype and gx.shape == logits.shape
    # The saved per-row lse is fp32: at |x| ~ 1e4 its rounding (ulp(|x|) / 2) is a floor every
    # kernel keeping O(rows) fp32 state shares; the z-loss gradient scales it by 1 + 2 z lse.
    floor = 0.0
    if extreme:
        fin = logits.double()[torch.isfinite(logits.double())].abs().max()
        xmax = float(fin) if opts[2] is None else min(float(fin), opts[2])
        floor = 2.0 * xmax * 2.0 ** -24 * (1.0 + 2.0 * opts[1] * xmax)
    n_valid = max(int((labels != IGN).sum()), 1)
    value_floor = floor * (rows if reduction == "sum" else 1)
    assert_within_budget(loss, loss_r, loss_o, atol=VALUE_ATOL + value_floor, rtol=1e-6, what="loss")
    grad_scale = float(up.abs().max()) / (n_valid if reduction == "mean" else 1)
    assert_within_budget(gx, gx_r, gx_o, atol=1e-5 + floor * grad_scale, rtol=GRAD_RTOL[dtype],
                         what="grad")
    ignored = labels == IGN
    assert (gx[ignored] == 0).all(), "ignored rows must get no gradient"
    if reduction == "none":
        assert (loss[ignored] == 0).all(), "ignored rows must have loss 0"


@pytest.mark.parametrize("backend,device", fused_backends(include_triton=False))
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d)[6:])
@pytest.mark.parametrize("vocab", [1, 7, 4097, 32003])
@pytest.mark.parametrize("mask", ["none", "some", "all"])
@pytest.mark.parametrize("opts", OPTIONS, ids=opt_id)
def test_matches_reference(backend, device, dtype, vocab, mask, opts):
    # reduction="none" with a random upstream gradient per row: every option combination
    rows = 4 if vocab == 32003 else 13
    check(backend, device, rows, vocab, dtype, mask, opts, "none")


@pytest.mark.parametrize("backend,device", fused_backends(include_triton=False))
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d)[6:])
@pytest.mark.parametrize("vocab", [1, 4097, 32003])
@pytest.mark.parametrize("mask", ["none", "some", "all"])
@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("opts", [(0.0, 0.0, None), (0.1, 1e-4, 30.0)], ids=opt_id)
def test_reductions_match_reference(backend, device, dtype, vocab, mask, reduction, opts):
    rows = 4 if vocab == 32003 else 13
    check(backend, device, rows, vocab, dtype, mask, opts, reduction)


@pytest.mark.parametrize("backend,device", fused_backends(include_triton=False))
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d)[6:])
@pytest.mark.parametrize("vocab", [7, 4097])
@pytest.mark.parametrize("opts", OPTIONS, ids=opt_id)
def test_extreme_logits(backend, device, dtype, vocab, opts):
    # -inf entries only without label smoothing: with eps > 0 the loss has the term
    # eps * (lse - mean_j x_j), infinite by definition when some x_j = -inf.
    ninf = opts[0] == 0.0
    check(backend, device, 9, vocab, dtype, "some", opts, "none", extreme=True, ninf=ninf)


@pytest.mark.parametrize("backend,device", fused_backends(include_triton=False))
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_extreme_logits_reduced(backend, device, reduction):
    check(backend, device, 9, 4097, torch.float32, "some", (0.0, 1e-4, None), reduction,
          extreme=True, ninf=True)


@pytest.mark.skipif(not LIVE["triton"], reason="triton not runnable here")
# the interpreter evaluates both sides of tl.where with numpy (inf - inf on masked lanes)
@pytest.mark.filterwarnings("ignore::RuntimeWarning")
@pytest.mark.parametrize("dtype,vocab,mask,reduction,opts,extreme", [
    (torch.float32, 7, "none", "mean", (0.0, 0.0, None), False),
    (torch.float32, 1, "all", "mean", (0.0, 0.0, None), False),
    (torch.bfloat16, 300, "some", "none", (0.1, 1e-4, 30.0), False),
    (torch.float16, 4097, "some", "sum", (0.1, 0.0, None), False),
    (torch.float32, 4097, "some", "none", (0.0, 1e-4, None), True),
    (torch.bfloat16, 7, "some", "none", (0.0, 0.0, 30.0), True),
    (torch.float16, 33, "none", "none", (0.1, 1e-4, 30.0), True),
    (torch.float32, 2049, "some", "mean", (0.1, 0.0, 30.0), False),
], ids=lambda v: str(v).replace("torch.", "") if not isinstance(v, tuple) else opt_id(v))
def test_triton_through_api(dtype, vocab, mask, reduction, opts, extreme):
    device = "cuda" if torch.cuda.is_available() else "cpu"
    check("triton", device, 5, vocab, dtype, mask, opts, reduction, extreme=extreme,
          ninf=extreme and opts[0] == 0.0)


# --------------------------------------------------------------------------------------------
# against torch.nn.functional.cross_entropy (no z-loss, no soft-capping)


def torch_ce(logits, labels, eps, reduction):
    """torch.nn.functional.cross_entropy with our ignore_index."""
    return F.cross_entropy(logits, labels, ignore_index=IGN, label_smoothing=eps, reduction=reduction)


@pytest.mark.parametrize("backend,device", fused_backends(include_triton=False))
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d)[6:])
@pytest.mark.parametrize("vocab", [1, 7, 4097, 32003])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("eps", [0.0, 0.1])
def test_matches_torch(backend, device, dtype, vocab, reduction, eps):
    rows = 4 if vocab == 32003 else 13
    logits, labels = make_case(rows, vocab, dtype, "some")
    up = upstream_for(rows, reduction)
    loss, gx = run(backend, device, logits, labels, (eps, 0.0, None), reduction, up)
    grads = {}
    for key, xin in (("fp32", logits.float()), ("fp64", logits.double())):
        xin.requires_grad_(True)
        want = torch_ce(xin, labels, eps, reduction)
        (want.double() * up.view(want.shape)).sum().backward()
        grads[key] = xin.grad
        if key == "fp32":
            assert loss.dtype == torch.float32 and loss.shape == want.shape
            torch.testing.assert_close(loss, want.detach(), atol=2e-5, rtol=2e-6)
    # Gradients by error budget against torch in fp64: torch's own fp32 gradient (rounded to the
    # logits dtype, as the kernels store it) sets the budget; PyTorch's label-smoothing gradient
    # errs by ~1e-5 relative at V = 32003, more than the fused kernels do.
    assert_within_budget(gx, grads["fp32"].to(dtype), grads["fp64"], atol=1e-6,
                         rtol=GRAD_RTOL[dtype], what="grad vs F.cross_entropy")


@pytest.mark.parametrize("backend,device", fused_backends(include_triton=False))
@pytest.mark.parametrize("eps", [0.0, 0.1])
def test_matches_torch_extreme_fp32(backend, device, eps):
    logits, labels = make_case(9, 4097, torch.float32, "some", extreme=True, ninf=eps == 0.0)
    up = upstream_for(9, "none")
    loss, gx = run(backend, device, logits, labels, (eps, 0.0, None), "none", up)
    x = logits.clone().requires_grad_(True)
    want = torch_ce(x, labels, eps, "none")
    (want.double() * up).sum().backward()
    assert torch.isfinite(loss).all() and torch.isfinite(gx).all()
    # lse rounding at |x| ~ 1e4: ~1e-3 absolute on the loss, ~1e-3 relative on the gradient
    torch.testing.assert_close(loss, want.detach(), atol=3e-3, rtol=1e-6)
    torch.testing.assert_close(gx, x.grad, atol=3e-3, rtol=1e-5)


# --------------------------------------------------------------------------------------------
# reductions and fully ignored batches


@pytest.mark.parametrize("backend,device", fused_backends(include_triton=False))
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d)[6:])
@pytest.mark.parametrize("opts", [(0.0, 0.0, None), (0.1, 1e-4, 30.0)], ids=opt_id)
def test_all_ignored_mean_is_zero(backend, device, dtype, opts):
    logits, labels = make_case(6, 37, dtype, "all")
    x = logits.clone().to(device).requires_grad_(True)
    eps, z, cap = opts
    loss = ptk.cross_entropy(x, labels.to(device), label_smoothing=eps, z_loss=z, softcap=cap, backend=backend)
    assert loss.dtype == torch.float32 and loss.shape == ()
    assert loss.item() == 0.0, "all-ignored mean must be exactly 0, not nan"
    loss.backward()
    assert x.grad is not None and x.grad.dtype == dtype
    assert torch.equal(x.grad, torch.zeros_like(x)), "all-ignored mean must give a zero gradient"
    # PyTorch gives nan here; we deliberately differ
    assert torch.isnan(F.cross_entropy(logits.float(), labels, ignore_index=IGN))
    for reduction in ("sum", "none"):
        out = ptk.cross_entropy(logits.to(device), labels.to(device), reduction=reduction, backend=backend)
        assert out.dtype == torch.float32 and (out == 0).all()


@pytest.mark.parametrize("backend,device", fused_backends(include_triton=False))
@pytest.mark.parametrize("opts", [(0.0, 0.0, None), (0.1, 1e-4, 30.0)], ids=opt_id)
def test_mean_divides_by_non_ignored_rows(backend, device, opts):
    logits, labels = make_case(10, 50, torch.float32, "none")
    labels[[0, 3, 4, 9]] = IGN  # 6 valid rows
    logits, labels = logits.to(device), labels.to(device)
    eps, z, cap = opts
    kw = dict(label_smoothing=eps, z_loss=z, softcap=cap, backend=backend)
    per_row = ptk.cross_entropy(logits, labels, reduction="none", **kw)
    total = ptk.cross_entropy(logits, labels, reduction="sum", **kw)
    mean = ptk.cross_entropy(logits, labels, reduction="mean", **kw)
    torch.testing.assert_close(total, per_row.sum())
    torch.testing.assert_close(mean, per_row.sum() / 6)
    torch.testing.assert_close(mean, per_row[labels != IGN].mean())
    # and the gradient of the mean is that of the sum divided by the same count
    x1 = logits.clone().requires_grad_(True)
    x2 = logits.clone().requires_grad_(True)
    ptk.cross_entropy(x1, labels, reduction="mean", **kw).backward()
    ptk.cross_entropy(x2, labels, reduction="sum", **kw).backward()
    torch.testing.assert_close(x1.grad, x2.grad / 6)


@pytest.mark.parametrize("backend,device", fused_backends(include_triton=False))
def test_leading_shapes_noncontiguous_and_module(backend, device):
    torch.manual_seed(0)
    base = torch.randn(2, 6, 50).to(device)
    logits = base[:, :-1]  # (2, 5, 50), not viewable as one row stride
    labels = torch.randint(0, 50, (2, 5)).to(device)
    labels[0, 1] = IGN
    out = ptk.cross_entropy(logits, labels, reduction="none", backend=backend)
    assert out.shape == (2, 5)
    torch.testing.assert_close(out, cross_entropy_reference(logits, labels, reduction="none"),
                               atol=1e-5, rtol=1e-5)
    mod = ptk.CrossEntropyLoss(label_smoothing=0.1, backend=backend)
    torch.testing.assert_close(mod(logits, labels),
                               F.cross_entropy(logits.reshape(-1, 50), labels.reshape(-1),
                                               label_smoothing=0.1), atol=1e-5, rtol=1e-5)
    # vocabulary not unit-stride, int32 labels, custom ignore_index
    lt = torch.randn(50, 8).to(device).t()
    lab = torch.randint(0, 50, (8,), dtype=torch.int32).to(device)
    lab[2] = -1
    got = ptk.cross_entropy(lt, lab, ignore_index=-1, reduction="none", backend=backend)
    want = F.cross_entropy(lt, lab.long(), ignore_index=-1, reduction="none")
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("backend,device", fused_backends(include_triton=False))
def test_does_not_mutate_inputs_and_double_backward(backend, device):
    torch.manual_seed(0)
    logits = torch.randn(7, 33).to(device).requires_grad_(True)
    labels = torch.randint(0, 33, (7,)).to(device)
    before, lab_before = logits.detach().clone(), labels.clone()
    loss = ptk.cross_entropy(logits, labels, label_smoothing=0.1, z_loss=1e-4, softcap=30.0,
                             backend=backend)
    loss.backward(retain_graph=True)
    g1 = logits.grad.clone()
    loss.backward()
    torch.testing.assert_close(logits.grad, 2 * g1)
    assert torch.equal(logits.detach(), before) and torch.equal(labels, lab_before)
