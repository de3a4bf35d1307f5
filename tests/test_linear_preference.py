"""Fused-linear preference losses against the materialized path (backend="reference"), by error
budget: every loss family, the reference from hidden states or precomputed, chunkings that keep
or recompute a group's logits, masks, fp32 / bf16."""
import pytest
import torch

import posttrain_kernels as ptk
from posttrain_kernels.api.linear_preference import LINEAR_PREFERENCE_LOSS_TYPES
from posttrain_kernels.ops import linear_head
from posttrain_kernels.reference import linear_token_logprobs_reference
from budget import assert_within_budget
from conftest import HAS_CUDA, LIVE, fused_backends

RTOL = {torch.float32: 1e-5, torch.bfloat16: 3e-2}
B, T, H, V = 3, 9, 16, 97


def make(dtype, seed=0, b=B, t=T, h=H, v=V):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(2 * b, t, h, generator=g)
    weight = torch.randn(v, h, generator=g) / h ** 0.5
    bias = torch.randn(v, generator=g) * 0.1
    labels = torch.randint(0, v, (2 * b, t), generator=g)
    labels[:, :3] = -100          # the prompt
    labels[1, 6:] = -100          # right padding of one chosen completion
    labels[b + 2, 5:] = -100      # and of one rejected
    ref_hidden = torch.randn(2 * b, t, h, generator=g)
    ref_weight = torch.randn(v, h, generator=g) / h ** 0.5
    return [x.to(dtype) for x in (hidden, weight, bias)], labels, (ref_hidden.to(dtype), ref_weight.to(dtype))


def run(backend, dtype, loss_type, *, ref="hidden", chunk_size=None, mask_pair=False, device="cpu", **kw):
    (hidden, weight, bias), labels, (rh, rw) = make(torch.float32)
    if mask_pair:
        labels[0] = -100
        labels[B] = -100          # pair 0: both completions fully masked
    h, w, b = [x.detach().to(device=device, dtype=dtype).requires_grad_(True) for x in (hidden, weight, bias)]
    if loss_type in ("simpo", "cpo", "orpo"):
        refs = {}
    elif ref == "hidden":
        refs = dict(ref_hidden=rh.to(dtype), ref_weight=rw.to(dtype))
    else:
        with torch.no_grad():
            lp, _ = linear_token_logprobs_reference(rh.double(), rw.double(), labels)
        refs = dict(ref_logps=lp.sum(-1).float())
    if loss_type in ("kto", "apo_zero_unpaired"):
        kw = dict(kw, desirable=torch.tensor([True, False, True, True, False, False]))
        if loss_type == "kto":
            kw.setdefault("kl", 0.05)
    refs, kw = ({k: v.to(device) if torch.is_tensor(v) else v for k, v in d.items()} for d in (refs, kw))
    loss, metrics = ptk.linear_preference_loss(h, w, labels.to(device), bias=b, loss_type=loss_type,
                                               backend=backend, chunk_size=chunk_size, **refs, **kw)
    loss.backward()
    return [t.cpu() for t in (loss.detach(), h.grad, w.grad, b.grad)], {k: v.cpu() for k, v in metrics.items()}


def check(backend, dtype, loss_type, device="cpu", **kw):
    got, got_m = run(backend, dtype, loss_type, device=device, **kw)
    ref, ref_m = run("reference", dtype, loss_type, **kw)
    oracle, oracle_m = run("reference", torch.float64, loss_type, **kw)
    for name, a, b, c in zip(["loss", "grad hidden", "grad weight", "grad bias"], got, ref, oracle):
        assert torch.isfinite(a.float()).all(), name
        assert a.dtype == (torch.float32 if name == "loss" else dtype), name
        assert_within_budget(a, b, c, atol=2e-5, rtol=RTOL[dtype], what=name)
    assert set(got_m) == set(ref_m)
    for k in got_m:
        assert_within_budget(got_m[k], ref_m[k], oracle_m[k], atol=2e-5, rtol=RTOL[dtype], what=k)
    return got


PAIRED = [t for t in LINEAR_PREFERENCE_LOSS_TYPES if t not in ("kto", "apo_zero_unpaired", "sft")]


@pytest.mark.parametrize("backend,device", fused_backends(include_triton=False))
@pytest.mark.parametrize("loss_type", PAIRED + ["kto", "apo_zero_unpaired"])
@pytest.mark.parametrize("chunk_size", [None, 2 * T, 5], ids=["one-group", "pair-groups", "recompute"])
def test_every_loss_type(backend, device, loss_type, chunk_size):
    kw = {}
    if loss_type in ("exo_pair", "robust"):
        kw["label_smoothing"] = 0.1
    check(backend, torch.float32, loss_type, device, chunk_size=chunk_size, **kw)


@pytest.mark.parametrize("backend,device", fused_backends(include_triton=False))
@pytest.mark.parametrize("loss_type", ["sigmoid", "ipo", "simpo", "orpo", "kto"])
@pytest.mark.parametrize("gemm_mode", ["cpu-upcast", "native-bf16-gemm"])
def test_bf16(backend, device, loss_type, gemm_mode, monkeypatch):
    if gemm_mode == "cpu-upcast" and device != "cpu":
        pytest.skip("cpu-upcast is a CPU-only mode")
    monkeypatch.setattr(linear_head, "cpu_has_fast_low_precision_gemm", lambda: gemm_mode != "cpu-upcast")
    check(backend, torch.bfloat16, loss_type, device, chunk_size=2 * T)


@pytest.mark.parametrize("backend,device", fused_backends(include_triton=False))
@pytest.mark.parametrize("options", [
    dict(loss_type="sigmoid", ref="logps"),
    dict(loss_type="sigmoid", average_log_prob=True),
    dict(loss_type="sigmoid", nll_alpha=0.7),                                  # RPO
    dict(loss_type=["sigmoid", "bco_pair", "sft"], loss_weights=[0.8, 0.2, 1.0]),  # MPO
    dict(loss_type="sigmoid", f_divergence_type="js_divergence", beta=0.3),
    dict(loss_type="simpo", nll_alpha=0.5, gamma=0.3),
    dict(loss_type="orpo", nll_alpha=0.0, beta=0.2),
    dict(loss_type="cpo", nll_alpha=0.5),
    dict(loss_type="kto", kl=None, policy_KL_logps=torch.tensor([-30.0, -20.0, -25.0]),
         ref_KL_logps=torch.tensor([-31.0, -22.0, -20.0])),
    dict(loss_type="sigmoid", mask_pair=True),
    dict(loss_type="orpo", mask_pair=True),
], ids=lambda d: "-".join(f"{k}" for k in d))
def test_options(backend, device, options):
    check(backend, torch.float32, device=device, chunk_size=2 * T, **options)


@pytest.mark.skipif(not LIVE["triton"], reason="triton not runnable here")
def test_triton():
    check("triton", torch.float32, "sigmoid", "cuda" if HAS_CUDA else "cpu", chunk_size=2 * T)


def test_one_pass_when_a_group_fits(monkeypatch):
    """A group that fits the chunk keeps its logits: one logits GEMM per piece, none recomputed."""
    calls = []
    real = linear_head._Head.logits
    monkeypatch.setattr(linear_head._Head, "logits", lambda self, h: calls.append(h.shape[0]) or real(self, h))
    run("cpu" if LIVE["cpu"] else "torch", torch.float32, "orpo", chunk_size=2 * T)
    assert calls == [2 * T] * B  # each group (a pair: its chosen and rejected rows) once, in one GEMM
    calls.clear()
    run("cpu" if LIVE["cpu"] else "torch", torch.float32, "orpo", chunk_size=T - 1)
    assert len(calls) == 2 * 2 * B * 2  # each row in two pieces, computed then recomputed


def test_no_grad_and_frozen_head():
    (hidden, weight, bias), labels, (rh, rw) = make(torch.float32)
    with torch.no_grad():
        loss, m = ptk.linear_preference_loss(hidden, weight, labels, ref_hidden=rh, ref_weight=rw, backend="torch")
    ref, _ = ptk.linear_preference_loss(hidden, weight, labels, ref_hidden=rh, ref_weight=rw, backend="reference")
    torch.testing.assert_close(loss, ref, atol=1e-5, rtol=1e-5)
    h = hidden.clone().requires_grad_(True)
    loss, _ = ptk.linear_preference_loss(h, weight, labels, ref_hidden=rh, ref_weight=rw, backend="torch")
    loss.backward()
    assert h.grad is not None and torch.isfinite(h.grad).all()


@pytest.mark.parametrize("kwargs,match", [
    (dict(loss_type="nope"), "loss_type: expected one of"),
    (dict(loss_type=["sigmoid", "simpo"]), "only DPO loss types combine"),
    (dict(loss_type="sigmoid"), "ref"),                           # reference missing
    (dict(loss_type="simpo", average_log_prob=True), "average_log_prob"),
    (dict(loss_type="kto", ref_logps=torch.zeros(6)), "desirable"),
    (dict(loss_type="simpo", desirable=torch.ones(6, dtype=torch.bool)), "desirable"),
    (dict(loss_type="simpo", beta=0.0), "beta"),
    (dict(loss_type="sigmoid", ref_logps=torch.zeros(5)), "ref_logps: expected shape"),
    (dict(loss_type="sigmoid", ref_logps=torch.zeros(6), ref_hidden=torch.zeros(6, T, H),
          ref_weight=torch.zeros(V, H)), "either ref_logps"),
    (dict(loss_type="sigmoid", ref_hidden=torch.zeros(6, T, H)), "ref_weight"),
    (dict(loss_type="orpo", nll_alpha=-1.0), "nll_alpha"),
])
def test_bad_input(kwargs, match):
    (hidden, weight, _), labels, _ = make(torch.float32)
    with pytest.raises((ValueError, TypeError), match=match):
        ptk.linear_preference_loss(hidden, weight, labels, backend="torch", **kwargs)


def test_odd_batch_and_layout():
    (hidden, weight, _), labels, _ = make(torch.float32)
    with pytest.raises(ValueError, match="even number of sequences"):
        ptk.linear_preference_loss(hidden[:5], weight, labels[:5], loss_type="simpo", backend="torch")
    with pytest.raises(ValueError, match=r"hidden: expected shape \(S, T, H\)"):
        ptk.linear_preference_loss(hidden.reshape(-1, H), weight, labels.reshape(-1), loss_type="simpo",
                                   backend="torch")
