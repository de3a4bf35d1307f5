"""linear_distill_loss against the materialized path (backend="reference") by error budget: every
divergence, the hard-label mix, reductions, masks, vocabularies of different sizes, fp32 / bf16."""
import pytest
import torch

import posttrain_kernels as ptk
from budget import assert_within_budget
from conftest import fused_backends

RTOL = {torch.float32: 1e-5, torch.bfloat16: 3e-2}

# the fused backends whose tensors live on the CPU (these tests build CPU tensors; the GPU backends
# are tested in test_gpu.py)
CPU_BACKENDS = [p for p in fused_backends(include_triton=False) if p.values[1] == "cpu"]


def make(vs, vt, mask, hs=16, ht=24, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = dict(hs=torch.randn(3, 7, hs, generator=g), ws=torch.randn(vs, hs, generator=g) / hs ** 0.5,
             bs=torch.randn(vs, generator=g) * 0.1, ht=torch.randn(3, 7, ht, generator=g),
             wt=torch.randn(vt, ht, generator=g) / ht ** 0.5, bt=torch.randn(vt, generator=g) * 0.1)
    labels = torch.randint(0, min(vs, vt), (3, 7), generator=g)
    if mask == "some":
        labels[:, :2] = -100
    elif mask == "all":
        labels[:] = -100
    return x, (None if mask == "none" else labels)


def run(backend, dtype, x, labels, **kw):
    h, w, b = [x[k].detach().to(dtype).requires_grad_(True) for k in ("hs", "ws", "bs")]
    loss = ptk.linear_distill_loss(h, w, x["ht"].to(dtype), x["wt"].to(dtype), labels=labels, student_bias=b,
                                   teacher_bias=x["bt"].to(dtype), backend=backend, **kw)
    loss.backward()
    return [loss.detach(), h.grad, w.grad, b.grad]


def check(backend, dtype, x, labels, **kw):
    got = run(backend, dtype, x, labels, **kw)
    ref = run("reference", dtype, x, labels, **kw)
    oracle = run("reference", torch.float64, x, labels, **kw)
    for name, a, b, c in zip(["loss", "grad hidden", "grad weight", "grad bias"], got, ref, oracle):
        assert torch.isfinite(a.float()).all(), name
        assert_within_budget(a, b, c, atol=2e-6, rtol=RTOL[dtype], what=name)
    return got


@pytest.mark.parametrize("backend,device", CPU_BACKENDS)
@pytest.mark.parametrize("divergence,beta", [("forward_kl", 0.5), ("reverse_kl", 0.5), ("jsd", 0.3), ("jsd", 0.0),
                                             ("skew_kl", 0.2), ("skew_reverse_kl", 0.7), ("tvd", 0.5)])
@pytest.mark.parametrize("hard", [0.0, 0.4])
@pytest.mark.parametrize("reduction", ["batchmean", "sum", "mean"])
def test_divergences(backend, device, divergence, beta, hard, reduction):
    x, labels = make(61, 61, "some")
    check(backend, torch.float32, x, labels, divergence=divergence, beta=beta, hard_label_weight=hard,
          reduction=reduction, temperature=0.8, chunk_size=5)


@pytest.mark.parametrize("backend,device", CPU_BACKENDS)
@pytest.mark.parametrize("vs,vt", [(50, 56), (56, 50), (7, 7), (1, 1)])
@pytest.mark.parametrize("mask", ["none", "some", "all"])
def test_vocab_sizes_and_masks(backend, device, vs, vt, mask):
    x, labels = make(vs, vt, mask)
    hard = 0.0 if labels is None else 0.5
    got = check(backend, torch.float32, x, labels, divergence="jsd", beta=0.5, hard_label_weight=hard)
    if mask == "all":
        assert all((t == 0).all() for t in got)


@pytest.mark.parametrize("backend,device", CPU_BACKENDS)
def test_bf16(backend, device):
    x, labels = make(97, 97, "some")
    check(backend, torch.bfloat16, x, labels, divergence="forward_kl", hard_label_weight=0.3, chunk_size=8)


def test_no_grad_and_bad_input():
    x, labels = make(20, 20, "some")
    with torch.no_grad():
        a = ptk.linear_distill_loss(x["hs"], x["ws"], x["ht"], x["wt"], labels=labels, backend="torch")
    b = ptk.linear_distill_loss(x["hs"], x["ws"], x["ht"], x["wt"], labels=labels, backend="reference")
    torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="labels"):
        ptk.linear_distill_loss(x["hs"], x["ws"], x["ht"], x["wt"], hard_label_weight=0.5, backend="torch")
    with pytest.raises(ValueError, match="teacher_hidden"):
        ptk.linear_distill_loss(x["hs"], x["ws"], x["ht"][:2], x["wt"], backend="torch")
    with pytest.raises(ValueError, match="teacher_weight"):
        ptk.linear_distill_loss(x["hs"], x["ws"], x["ht"], x["wt"][:, :5], backend="torch")
    with pytest.raises(TypeError, match="teacher_hidden"):
        ptk.linear_distill_loss(x["hs"], x["ws"], x["ht"].bfloat16(), x["wt"], backend="torch")
    with pytest.raises(ValueError, match="hard_label_weight"):
        ptk.linear_distill_loss(x["hs"], x["ws"], x["ht"], x["wt"], labels=labels, hard_label_weight=1.5,
                                backend="torch")
    with pytest.raises(ValueError, match="reduction"):
        ptk.linear_distill_loss(x["hs"], x["ws"], x["ht"], x["wt"], reduction="none", backend="torch")
