"""Fused-linear policy-gradient loss against the materialized path (backend="reference"), by error
budget: loss types, options, groupings that keep or recompute the logits, fp32 / bf16."""
import pytest
import torch

import posttrain_kernels as ptk
from posttrain_kernels.api.policy import POLICY_METRIC_KEYS
from posttrain_kernels.ops import linear_head
from budget import assert_within_budget
from conftest import HAS_CUDA, LIVE, fused_backends

RTOL = {torch.float32: 1e-5, torch.bfloat16: 3e-2}
B, T, H, V = 4, 9, 16, 97


def make(seed=0):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(B, T, H, generator=g)
    weight = torch.randn(V, H, generator=g) / H ** 0.5
    bias = torch.randn(V, generator=g) * 0.1
    labels = torch.randint(0, V, (B, T), generator=g)
    mask = torch.rand(B, T, generator=g) > 0.25
    mask[2] = False                     # an empty completion
    labels[~mask] = -100
    old = -4.0 + 0.3 * torch.randn(B, T, generator=g)
    adv = torch.randn(B, generator=g)
    ref_hidden = torch.randn(B, T, H, generator=g)
    ref_weight = torch.randn(V, H, generator=g) / H ** 0.5
    return hidden, weight, bias, labels, mask, old, adv, ref_hidden, ref_weight


def run(backend, dtype, *, chunk_size=None, ref="hidden", on_policy=False, temperature=0.8, device="cpu", **kw):
    hidden, weight, bias, labels, mask, old, adv, rh, rw = make()
    h, w, b = [x.detach().to(device=device, dtype=dtype).requires_grad_(True) for x in (hidden, weight, bias)]
    labels, mask, old, adv = (x.to(device) for x in (labels, mask, old, adv))
    refs = {}
    if ref == "hidden":
        refs = dict(ref_hidden=rh.to(device=device, dtype=dtype), ref_weight=rw.to(device=device, dtype=dtype))
    elif ref == "logps":
        refs = dict(ref_logps=-4.0 + 0.2 * torch.randn(B, T, generator=torch.Generator().manual_seed(9)).to(device))
    loss, metrics = ptk.linear_policy_loss(h, w, labels, None if on_policy else old, adv, mask, bias=b,
                                           temperature=temperature, chunk_size=chunk_size, backend=backend,
                                           **refs, **kw)
    loss.backward()
    return [t.cpu() for t in (loss.detach(), h.grad, w.grad, b.grad)], {k: v.cpu() for k, v in metrics.items()}


def check(backend, dtype, device="cpu", **kw):
    got, got_m = run(backend, dtype, device=device, **kw)
    ref, ref_m = run("reference", dtype, **kw)
    oracle, oracle_m = run("reference", torch.float64, **kw)
    for name, a, b_, c in zip(["loss", "grad hidden", "grad weight", "grad bias"], got, ref, oracle):
        assert torch.isfinite(a.float()).all(), name
        assert_within_budget(a, b_, c, atol=2e-5, rtol=RTOL[dtype], what=name)
    assert tuple(got_m) == POLICY_METRIC_KEYS
    for k in got_m:
        assert_within_budget(got_m[k], ref_m[k], oracle_m[k], atol=2e-5, rtol=RTOL[dtype], what=k)


@pytest.mark.parametrize("backend,device", fused_backends(include_triton=False))
@pytest.mark.parametrize("loss_type", ["grpo", "bnpo", "dr_grpo", "dapo", "cispo", "sapo", "gspo", "luspo", "vespo"])
@pytest.mark.parametrize("chunk_size", [None, 2 * T, 5], ids=["one-group", "two-rows", "recompute"])
def test_loss_types(backend, device, loss_type, chunk_size):
    kw = dict(loss_type=loss_type, beta=0.04)
    if loss_type == "cispo":
        kw["epsilon_high"] = 5.0
    check(backend, torch.float32, device, chunk_size=chunk_size, **kw)


@pytest.mark.parametrize("backend,device", fused_backends(include_triton=False))
@pytest.mark.parametrize("options", [
    dict(loss_type="dapo", entropy_coef=0.01, beta=0.04, kl_estimator="k2"),
    dict(loss_type="dapo", num_items_in_batch=40),
    dict(loss_type="grpo", epsilon_high=0.28, delta=1.5, clip_ratio_c=3.0),
    dict(loss_type="grpo", beta=0.1, kl_estimator="low_var_kl", use_bias_correction_kl=False, ref="logps"),
    dict(loss_type="grpo", top_entropy_quantile=0.5, entropy_coef=0.01),
    dict(loss_type="dapo", loss_agg_mode="seq-mean-token-sum"),
    dict(loss_type="dapo", on_policy=True, ref=None),
    dict(loss_type="grpo", off_policy_mask_threshold=0.1),
    dict(loss_type="dr_grpo", max_completion_length=16, temperature=1.0),
], ids=lambda d: "-".join(f"{k}" for k in d))
def test_options(backend, device, options):
    check(backend, torch.float32, device, chunk_size=2 * T, **options)


@pytest.mark.parametrize("backend,device", fused_backends(include_triton=False))
@pytest.mark.parametrize("gemm_mode", ["cpu-upcast", "native-bf16-gemm"])
def test_bf16(backend, device, gemm_mode, monkeypatch):
    if gemm_mode == "cpu-upcast" and device != "cpu":
        pytest.skip("cpu-upcast is a CPU-only mode")
    monkeypatch.setattr(linear_head, "cpu_has_fast_low_precision_gemm", lambda: gemm_mode != "cpu-upcast")
    check(backend, torch.bfloat16, device, chunk_size=2 * T, loss_type="dapo", beta=0.04, entropy_coef=0.01)


@pytest.mark.skipif(not LIVE["triton"], reason="triton not runnable here")
def test_triton():
    check("triton", torch.float32, "cuda" if HAS_CUDA else "cpu", chunk_size=2 * T, loss_type="grpo", beta=0.04)


def test_three_gemms_when_a_group_fits(monkeypatch):
    calls = []
    real = linear_head._Head.logits
    monkeypatch.setattr(linear_head._Head, "logits", lambda self, h: calls.append(h.shape[0]) or real(self, h))
    run("cpu" if LIVE["cpu"] else "torch", torch.float32, chunk_size=2 * T, ref="logps", loss_type="grpo")
    assert calls == [2 * T] * (B // 2)  # one logits GEMM per group, never recomputed


def test_bad_input():
    hidden, weight, bias, labels, mask, old, adv, rh, rw = make()
    with pytest.raises(ValueError, match="loss_type"):
        ptk.linear_policy_loss(hidden, weight, labels, old, adv, mask, loss_type="nope", backend="torch")
    with pytest.raises(ValueError, match="advantages"):
        ptk.linear_policy_loss(hidden, weight, labels, old, adv[:3], mask, backend="torch")
    with pytest.raises(ValueError, match="ref_weight"):
        ptk.linear_policy_loss(hidden, weight, labels, old, adv, mask, ref_hidden=rh, backend="torch")
    with pytest.raises(ValueError, match="either ref_logps"):
        ptk.linear_policy_loss(hidden, weight, labels, old, adv, mask, ref_hidden=rh, ref_weight=rw,
                               ref_logps=old, backend="torch")
    with pytest.raises(ValueError, match=r"hidden: expected shape \(B, T, H\)"):
        ptk.linear_policy_loss(hidden.reshape(-1, H), weight, labels.reshape(-1), old, adv, mask, backend="torch")
