"""token_logprobs on every fused backend against the reference, by error budget, values and
gradients through both outputs."""
import math

import pytest
import torch

import posttrain_kernels as ptk
from posttrain_kernels.reference import token_logprobs_reference
from budget import assert_within_budget
from conftest import LIVE, fused_backends

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
# Floors of the budget: log-probs are fp32 outputs; gradients are stored in the logits dtype.
VALUE_ATOL = 2e-5
GRAD_RTOL = {torch.float32: 1e-6, torch.bfloat16: 8e-3, torch.float16: 1e-3}


def make_case(rows, vocab, k, dtype, mask, extreme, seed=0):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(rows, vocab, generator=g) * 3
    labels = torch.randint(0, vocab, (rows, k), generator=g)
    if extreme and vocab > 2:
        # +-1e4 entries and masked-out (-inf) vocabulary entries, never on a label
        hot = torch.randint(0, vocab, (rows,), generator=g)
        logits[torch.arange(rows), hot] = 1e4
        logits[0] = -1e4
        logits[0, labels[0, 0]] = -1e4 + 5
        ninf = torch.rand(rows, vocab, generator=g) < 0.3
        ninf.scatter_(1, labels, False)
        ninf[torch.arange(rows), hot] = False
        logits[ninf] = float("-inf")
    if mask == "some":
        labels[1::3, 0] = -100
        if rows > 2:
            labels[2, :] = -100
    elif mask == "all":
        labels[:] = -100
    return logits.to(dtype), labels


def run(backend, device, logits, labels, temperature, entropy, grads, single):
    x = logits.detach().clone().to(device).requires_grad_(True)
    y = labels.to(device)
    if single:
        y = y[..., 0]
    if backend == "reference":
        lp, h = token_logprobs_reference(x, y, temperature, -100, entropy)
    else:
        lp, h = ptk.token_logprobs(x, y, temperature=temperature, return_entropy=entropy, backend=backend)
    g_lp, g_h = grads
    loss = (lp.double() * g_lp.view(lp.shape).to(device)).sum()
    if entropy:
        loss = loss + (h.double() * g_h.to(device)).sum()
    loss.backward()
    return lp.detach().cpu(), (h.detach().cpu() if entropy else None), x.grad.cpu()


def check(backend, device, rows, vocab, k, dtype, mask, temperature, extreme, entropy):
    logits, labels = make_case(rows, vocab, k, dtype, mask, extreme)
    single = k == 1
    g = torch.Generator().manual_seed(1)
    grads = (torch.randn(rows, k, generator=g, dtype=torch.float64), torch.randn(rows, generator=g, dtype=torch.float64))
    lp, h, gx = run(backend, device, logits, labels, temperature, entropy, grads, single)
    lp_r, h_r, gx_r = run("reference", "cpu", logits, labels, temperature, entropy, grads, single)
    lp_o, h_o, gx_o = run("reference", "cpu", logits.double(), labels, temperature, entropy, grads, single)
    # The saved per-row state (lse) is fp32: at |x| ~ 1e4 its rounding, ulp(|x|) / 2, is a floor
    # that every kernel keeping O(rows) fp32 state shares.
    finite = logits.double()[torch.isfinite(logits.double())] / temperature
    state_floor = 2.0 * float(finite.abs().max()) * 2.0 ** -24 if extreme else 0.0
    assert lp.dtype == torch.float32 and lp.shape == lp_o.shape
    assert_within_budget(lp, lp_r, lp_o, atol=VALUE_ATOL + state_floor, rtol=1e-6, what="logp")
    if entropy:
        assert h.dtype == torch.float32
        assert_within_budget(h, h_r, h_o, atol=VALUE_ATOL + state_floor, rtol=1e-6, what="entropy")
    else:
        assert h is None
    assert gx.dtype == dtype
    # The lse's rounding moves each p_j by p_j * ulp, and the gradient carries p_j times the row's
    # upstream sum (sum_k g_k for the log-probs; g_h (1 + H + p log p) <= g_h (2 + log V) for the
    # entropy): the floor scales with it (K = 5 labels per row give ~5x the one-label floor).
    up = grads[0].abs().sum(-1) + (grads[1].abs() * (2.0 + math.log(vocab)) if entropy else 0.0)
    grad_floor = state_floor * max(1.0, float(up.max()))
    assert_within_budget(gx, gx_r, gx_o, atol=1e-5 + grad_floor, rtol=GRAD_RTOL[dtype], what="grad")
    ignored = (labels == -100).all(-1)
    assert (lp[labels[..., 0 if single else slice(None)] == -100] == 0).all() if single else (lp[labels == -100] == 0).all()
    assert (gx[ignored] == 0).all(), "ignored rows must get no gradient"


@pytest.mark.parametrize("backend,device", fused_backends(include_triton=False))
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d)[6:])
@pytest.mark.parametrize("vocab", [1, 7, 4097, 32003])
@pytest.mark.parametrize("k", [1, 5])
@pytest.mark.parametrize("mask", ["none", "some", "all"])
@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_matches_reference(backend, device, dtype, vocab, k, mask, temperature):
    rows = 6 if vocab == 32003 else 13
    check(backend, device, rows, vocab, k, dtype, mask, temperature, extreme=False, entropy=True)


@pytest.mark.parametrize("backend,device", fused_backends(include_triton=False))
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d)[6:])
@pytest.mark.parametrize("vocab", [7, 4097])
@pytest.mark.parametrize("entropy", [True, False])
def test_extreme_logits(backend, device, dtype, vocab, entropy):
    check(backend, device, 9, vocab, 2, dtype, "some", 0.7, extreme=True, entropy=entropy)


@pytest.mark.skipif(not LIVE["triton"], reason="triton not runnable here")
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d)[6:])
@pytest.mark.parametrize("vocab,k,mask,extreme", [(7, 1, "none", False), (4097, 5, "some", True),
                                                   (1, 1, "all", False), (300, 2, "some", False)])
def test_triton_through_api(dtype, vocab, k, mask, extreme):
    device = "cuda" if torch.cuda.is_available() else "cpu"
    check("triton", device, 5, vocab, k, dtype, mask, 0.7, extreme=extreme, entropy=True)


@pytest.mark.parametrize("backend,device", fused_backends(include_triton=False))
def test_leading_shapes_and_noncontiguous(backend, device):
    torch.manual_seed(0)
    base = torch.randn(2, 6, 50).to(device)
    logits = base[:, :-1]  # (2, 5, 50), not flattenable to one row stride -> handled
    labels = torch.randint(0, 50, (2, 5)).to(device)
    lp, h = ptk.token_logprobs(logits, labels, return_entropy=True, backend=backend)
    lr, hr = token_logprobs_reference(logits, labels, 1.0, -100, True)
    assert lp.shape == (2, 5) and h.shape == (2, 5)
    torch.testing.assert_close(lp, lr, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(h, hr, atol=1e-5, rtol=1e-5)
    # vocabulary not unit-stride
    lt = torch.randn(50, 8).to(device).t()
    lab = torch.randint(0, 50, (8,)).to(device)
    torch.testing.assert_close(ptk.token_logprobs(lt, lab, backend=backend)[0],
                               token_logprobs_reference(lt, lab)[0], atol=1e-5, rtol=1e-5)
    # int32 labels, custom ignore_index
    lab32 = lab.to(torch.int32)
    lab32[0] = -1
    out = ptk.token_logprobs(lt, lab32, ignore_index=-1, backend=backend)[0]
    assert out[0] == 0
    torch.testing.assert_close(out[1:], token_logprobs_reference(lt, lab)[0][1:], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("backend,device", fused_backends(include_triton=False))
def test_does_not_mutate_inputs_and_double_backward(backend, device):
    torch.manual_seed(0)
    logits = torch.randn(7, 33).to(device).requires_grad_(True)
    labels = torch.randint(0, 33, (7,)).to(device)
    before = logits.detach().clone()
    lab_before = labels.clone()
    lp, h = ptk.token_logprobs(logits, labels, return_entropy=True, backend=backend)
    (lp.sum() + h.sum()).backward(retain_graph=True)
    g1 = logits.grad.clone()
    (lp.sum() + h.sum()).backward()
    torch.testing.assert_close(logits.grad, 2 * g1)
    assert torch.equal(logits.detach(), before) and torch.equal(labels, lab_before)


@pytest.mark.parametrize("backend,device", fused_backends(include_triton=False))
def test_many_rows(backend, device):
    # more rows than a 65535-wide grid axis allows
    torch.manual_seed(0)
    logits = torch.randn(70000, 3).to(device)
    labels = torch.randint(0, 3, (70000,)).to(device)
    lp, _ = ptk.token_logprobs(logits, labels, backend=backend)
    torch.testing.assert_close(lp, token_logprobs_reference(logits, labels)[0], atol=1e-5, rtol=1e-5)


def test_only_entropy_gradient():
    torch.manual_seed(0)
    logits = torch.randn(4, 9, requires_grad=True)
    labels = torch.randint(0, 9, (4,))
    _, h = ptk.token_logprobs(logits, labels, return_entropy=True, backend="torch")
    h.sum().backward()
    x = logits.detach().clone().requires_grad_(True)
    token_logprobs_reference(x, labels, 1.0, -100, True)[1].sum().backward()
    torch.testing.assert_close(logits.grad, x.grad, atol=1e-6, rtol=1e-5)
