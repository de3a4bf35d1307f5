"""distill_loss against the materialized reference (values and student gradients, by error budget),
against TRL's generalized_jsd_loss, and its input checks."""
import pytest
import torch

import posttrain_kernels as ptk
from posttrain_kernels.reference import distill_loss_reference
from budget import assert_within_budget
from conftest import HAS_CUDA, LIVE, fused_backends

RTOL = {torch.float32: 1e-5, torch.bfloat16: 3e-2}
CASES = [("forward_kl", 0.5), ("reverse_kl", 0.5), ("jsd", 0.0), ("jsd", 0.3), ("jsd", 1.0), ("skew_kl", 0.1),
         ("skew_kl", 1.0), ("skew_reverse_kl", 0.6), ("tvd", 0.5)]

# the fused backends whose tensors live on the CPU (these tests build CPU tensors; the GPU backends
# are tested in test_gpu.py)
CPU_BACKENDS = [p for p in fused_backends(include_triton=False) if p.values[1] == "cpu"]


def make(shape, v_s, v_t, mask, seed=0):
    g = torch.Generator().manual_seed(seed)
    s = torch.randn(*shape, v_s, generator=g) * 2
    t = torch.randn(*shape, v_t, generator=g) * 2
    labels = torch.randint(0, min(v_s, v_t), shape, generator=g)
    if mask == "some":
        labels.view(-1)[::3] = -100
    elif mask == "all":
        labels[:] = -100
    return s, t, (None if mask == "none" else labels)


def run(backend, dtype, s, t, labels, device="cpu", **kw):
    x = s.detach().to(device=device, dtype=dtype).requires_grad_(True)
    labels = None if labels is None else labels.to(device)
    loss = ptk.distill_loss(x, t.to(device=device, dtype=dtype), labels=labels, backend=backend, **kw)
    up = torch.randn(loss.shape, generator=torch.Generator().manual_seed(4), dtype=loss.dtype).to(device)
    loss.backward(up)
    return [loss.detach().cpu(), x.grad.cpu()]


def check(backend, dtype, s, t, labels, device="cpu", **kw):
    got = run(backend, dtype, s, t, labels, device, **kw)
    ref = run("reference", dtype, s, t, labels, **kw)
    oracle = run("reference", torch.float64, s, t, labels, **kw)
    assert got[0].dtype == torch.float32 and got[1].dtype == dtype
    for name, a, b, c in zip(["loss", "grad student"], got, ref, oracle):
        assert torch.isfinite(a.float()).all(), name
        assert_within_budget(a, b, c, atol=2e-6, rtol=RTOL[dtype], what=name)
    return got


@pytest.mark.parametrize("backend,device", CPU_BACKENDS)
@pytest.mark.parametrize("divergence,beta", CASES)
@pytest.mark.parametrize("reduction", ["batchmean", "sum", "mean", "none"])
@pytest.mark.parametrize("mask", ["none", "some", "all"])
def test_divergences(backend, device, divergence, beta, reduction, mask):
    s, t, labels = make((3, 5), 97, 97, mask)
    got = check(backend, torch.float32, s, t, labels, divergence=divergence, beta=beta, temperature=0.7,
                reduction=reduction)
    if mask == "all":
        assert (got[0] == 0).all() and (got[1] == 0).all()


@pytest.mark.parametrize("backend,device", CPU_BACKENDS)
@pytest.mark.parametrize("divergence,beta", [("forward_kl", 0.5), ("jsd", 0.5), ("skew_reverse_kl", 0.3)])
@pytest.mark.parametrize("v", [1, 7, 4097])
def test_sizes_and_bf16(backend, device, divergence, beta, v):
    for dtype in (torch.float32, torch.bfloat16):
        s, t, labels = make((6,), v, v, "some", seed=v)
        check(backend, dtype, s, t, labels, divergence=divergence, beta=beta)


@pytest.mark.parametrize("backend,device", CPU_BACKENDS)
def test_vocab_prefix_and_extremes(backend, device):
    """A teacher with a padded vocabulary (its extra columns dropped), -inf logits, |x| ~ 1e4."""
    s, t, labels = make((4,), 50, 64, "none")
    check(backend, torch.float32, s, t, labels, divergence="jsd", beta=0.5)
    s[0, :5] = t[0, :5] = float("-inf")  # impossible for both: contributes 0
    t[1, 3:9] = float("-inf")            # impossible for the teacher only: forward KL stays finite
    s[2] *= 5e3
    t[3] *= 5e3
    for div in ("forward_kl", "jsd", "tvd"):
        x = s.clone().requires_grad_(True)
        loss = ptk.distill_loss(x, t, divergence=div, backend=backend)
        loss.backward()
        assert torch.isfinite(loss) and torch.isfinite(x.grad).all()


@pytest.mark.skipif(not LIVE["triton"], reason="triton not runnable here")
def test_triton():
    pytest.importorskip("posttrain_kernels.kernels.distill")
    s, t, labels = make((2, 3), 97, 97, "some")
    for divergence, beta in [("forward_kl", 0.5), ("jsd", 0.3), ("tvd", 0.5)]:
        check("triton", torch.float32, s, t, labels, "cuda" if HAS_CUDA else "cpu", divergence=divergence, beta=beta,
              temperature=0.7)


@pytest.mark.parametrize("beta", [0.0, 0.5, 1.0])
@pytest.mark.parametrize("reduction", ["batchmean", "sum", "mean"])
def test_trl_generalized_jsd_loss(beta, reduction):
    gkd = pytest.importorskip("trl.experimental.gkd.gkd_trainer")
    s, t, labels = make((2, 6), 33, 33, "some")
    x_ours = s.clone().requires_grad_(True)
    x_trl = s.clone().requires_grad_(True)
    ours = ptk.distill_loss(x_ours, t, divergence="jsd", beta=beta, temperature=0.9, labels=labels,
                            reduction=reduction)
    trl = gkd.GKDTrainer.generalized_jsd_loss(x_trl, t, labels=labels, beta=beta, temperature=0.9,
                                              reduction=reduction)
    ours.backward()
    trl.backward()
    torch.testing.assert_close(ours, trl.float(), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(x_ours.grad, x_trl.grad, atol=1e-6, rtol=1e-5)


def test_num_items_in_batch():
    s, t, labels = make((2, 6), 33, 33, "some")
    got = ptk.distill_loss(s, t, labels=labels, num_items_in_batch=40, backend="torch")
    ref = distill_loss_reference(s, t, labels, reduction="sum") / 40
    torch.testing.assert_close(got, ref)


@pytest.mark.parametrize("kwargs,match", [
    (dict(divergence="kl"), "divergence"),
    (dict(divergence="jsd", beta=1.5), "beta"),
    (dict(divergence="skew_kl", beta=0.0), "beta"),
    (dict(temperature=0.0), "temperature"),
    (dict(reduction="avg"), "reduction"),
    (dict(labels=torch.zeros(3, dtype=torch.long)), "labels"),
])
def test_bad_input(kwargs, match):
    s, t, _ = make((4,), 10, 10, "none")
    with pytest.raises((ValueError, TypeError), match=match):
        ptk.distill_loss(s, t, backend="torch", **kwargs)
    with pytest.raises(ValueError, match="teacher_logits"):
        ptk.distill_loss(s, t[:3], backend="torch")
    with pytest.raises(TypeError, match="teacher_logits"):
        ptk.distill_loss(s, t.double(), backend="torch")


def _topk_independent(s, ids, lq, divergence, tail, temperature):
    """The sparse-teacher divergence written out: gather, renormalize or add the tail bucket."""
    lp_all = torch.log_softmax(s.double() / temperature, -1)
    lp = lp_all.gather(-1, ids)
    lq = lq.double()
    if tail == "bucket":
        lp = torch.cat([lp, torch.log1p(-lp.exp().sum(-1, keepdim=True)).clamp_min(torch.log(torch.tensor(1e-7)))], -1)
        lq = torch.cat([lq, torch.log1p(-lq.exp().sum(-1, keepdim=True)).clamp_min(torch.log(torch.tensor(1e-7)))], -1)
    else:
        lp = lp - torch.logsumexp(lp, -1, keepdim=True)
        lq = lq - torch.logsumexp(lq, -1, keepdim=True)
    p, q = lp.exp(), lq.exp()
    if divergence == "forward_kl":
        return (q * (lq - lp)).sum(-1)
    if divergence == "reverse_kl":
        return (p * (lp - lq)).sum(-1)
    return 0.5 * (p - q).abs().sum(-1)


@pytest.mark.parametrize("backend,device", CPU_BACKENDS)
@pytest.mark.parametrize("divergence", ["forward_kl", "reverse_kl", "tvd"])
@pytest.mark.parametrize("tail", ["renormalize", "bucket"])
@pytest.mark.parametrize("k", [1, 8])
def test_topk_distill(backend, device, divergence, tail, k):
    g = torch.Generator().manual_seed(k)
    s = torch.randn(3, 4, 60, generator=g) * 2
    teacher = torch.log_softmax(torch.randn(3, 4, 60, generator=g) * 2, -1)
    lq, ids = teacher.topk(k, -1)
    labels = torch.randint(0, 60, (3, 4), generator=g)
    labels[0] = -100
    x = s.clone().requires_grad_(True)
    got = ptk.topk_distill_loss(x, ids, lq, divergence=divergence, tail=tail, temperature=0.8, labels=labels,
                                reduction="sum", backend=backend)
    got.backward()
    xr = s.double().requires_grad_(True)
    per = _topk_independent(xr, ids, lq, divergence, tail, 0.8)
    want = torch.where(labels != -100, per, torch.zeros_like(per)).sum()
    want.backward()
    torch.testing.assert_close(got.double(), want, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(x.grad.double(), xr.grad, atol=1e-5, rtol=1e-4)
    assert (x.grad[0] == 0).all()


def test_topk_with_every_id_is_the_full_divergence():
    s, t, labels = make((2, 3), 20, 20, "some")
    lq, ids = torch.log_softmax(t, -1).topk(20, -1)
    full = ptk.distill_loss(s, t, divergence="jsd", beta=0.3, labels=labels, backend="torch")
    topk = ptk.topk_distill_loss(s, ids, lq, divergence="jsd", beta=0.3, labels=labels, backend="torch")
    torch.testing.assert_close(topk, full, atol=1e-5, rtol=1e-5)


def test_topk_bad_input():
    s = torch.randn(4, 10)
    ids = torch.randint(0, 10, (4, 3))
    with pytest.raises(ValueError, match="teacher_topk_logps"):
        ptk.topk_distill_loss(s, ids, torch.zeros(4, 2), backend="torch")
    with pytest.raises(ValueError, match="teacher_topk_ids"):
        ptk.topk_distill_loss(s, ids[:3], torch.zeros(3, 3), backend="torch")
    with pytest.raises(ValueError, match="tail"):
        ptk.topk_distill_loss(s, ids, torch.zeros(4, 3), tail="drop", backend="torch")
    with pytest.raises(TypeError, match="teacher_topk_ids"):
        ptk.topk_distill_loss(s, ids.float(), torch.zeros(4, 3), backend="torch")
