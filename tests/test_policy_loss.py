"""policy_loss / value_loss (PPO / GRPO family) against an independent eager implementation written
here from the published formulas and TRL 1.16's GRPOTrainer._compute_loss, against TRL itself (its
own _compute_loss on a stub trainer), and for bad inputs, odd shapes, empty rows and overflow."""
import math
from collections import defaultdict
from types import SimpleNamespace

import pytest
import torch

from posttrain_kernels.api.policy import (KL_ESTIMATORS, LOSS_AGG_MODES, LOSS_TYPES, POLICY_METRIC_KEYS,
                                          VALUE_METRIC_KEYS, policy_loss, value_loss)
from posttrain_kernels.modules.policy import PolicyLoss, ValueLoss

F64 = torch.float64
CLIPPED = ("grpo", "bnpo", "dr_grpo", "dapo", "gspo", "luspo")


# --------------------------------------------------------------------------------------------
# independent reference: one row at a time, only the valid tokens (boolean indexing), float64


def ref_policy(lp, old, adv, mask, *, ref=None, ent=None, samp=None, isr=None, trunc=None,
               loss_type="dapo", agg=None, level=None, eps_low=0.2, eps_high=None, delta=None,
               clip_c=None, tpos=1.0, tneg=1.05, kpos=2.0, lpos=3.0, kneg=3.0, lneg=2.0, beta=0.0,
               kl_est="k3", bias=True, ent_coef=0.0, top_q=1.0, opsm=None, n_items=None,
               max_len=None, ga=1):
    """Returns (loss, metrics) in float64; differentiable w.r.t. lp (and ent)."""
    B, T = lp.shape
    lp = lp.to(F64)
    old = lp.detach() if old is None else old.detach().to(F64)
    w = mask.to(F64).clone()
    if trunc is not None:
        w[trunc] = 0.0
    eps_high = eps_low if eps_high is None else eps_high
    base = "grpo" if loss_type == "gspo" else loss_type
    if level is None:
        level = "sequence" if loss_type in ("gspo", "luspo") else "token"
    agg = agg or {"grpo": "seq-mean-token-mean", "sapo": "seq-mean-token-mean", "bnpo": "token-mean",
                  "dapo": "token-mean", "cispo": "token-mean", "vespo": "token-mean",
                  "dr_grpo": "seq-mean-token-sum-norm", "luspo": "seq-mean-token-sum"}[base]
    if top_q < 1.0:
        sel = ent.detach().float()[w != 0]
        thr = torch.quantile(sel, 1.0 - top_q).item() if sel.numel() else math.inf

    rows = []  # per row: dict of per-valid-token tensors
    for b in range(B):
        idx = w[b] != 0
        x, xo, wt = lp[b][idx], old[b][idx], w[b][idx]
        n = int(idx.sum())
        if adv.dim() == 1:
            A = adv[b].to(F64).expand(n)
        elif adv.shape[1] == 1:
            A = adv[b, 0].to(F64).expand(n)
        else:
            A = adv[b][idx].to(F64)
        lr = torch.clamp(x - xo, -20.0, 20.0)
        if level == "token":
            r = torch.exp(lr)
        else:
            s = ((x - xo) * wt).sum() / max(float(wt.sum()), 1.0)
            r = torch.exp(torch.clamp(s, -20.0, 20.0)).expand(n)
        low = high = dual = torch.zeros(n, dtype=torch.bool)
        if base in CLIPPED:
            r1 = r if delta is None else torch.clamp(r, max=delta)
            pg1 = -A * r1
            pg2 = -A * torch.clamp(r, 1 - eps_low, 1 + eps_high)
            l = torch.maximum(pg1, pg2)
            if clip_c is not None:
                pg3 = -A * clip_c
                dual = (A < 0) & (l > pg3)
                l = torch.where(A < 0, torch.minimum(pg3, l), l)
            low = (r1 < 1 - eps_low) & (A < 0)
            high = (r1 > 1 + eps_high) & (A > 0)
        elif base == "cispo":
            l = -torch.clamp(r, max=eps_high).detach() * A * x
            high = (r > eps_high) & (A > 0)
        elif base == "sapo":
            tau = torch.where(A > 0, torch.tensor(tpos, dtype=F64), torch.tensor(tneg, dtype=F64))
            l = -(4.0 / tau) * torch.sigmoid(tau * (r - 1)) * A
        else:  # vespo
            logw = (lr.detach() * wt).sum()
            if isr is not None:
                ir = isr[b][idx] if isr.dim() == 2 and isr.shape[1] == T and T > 1 else isr[b].reshape(-1)
                logw = logw + torch.clamp(torch.log(ir.to(F64)), math.log(1e-8), 20.0).sum()
            logw = torch.clamp(logw, math.log(1e-8), 20.0)
            k = torch.where(A >= 0, torch.tensor(kpos, dtype=F64), torch.tensor(kneg, dtype=F64))
            lam = torch.where(A >= 0, torch.tensor(lpos, dtype=F64), torch.tensor(lneg, dtype=F64)).clamp(min=1e-4)
            phi = torch.exp(lam + k * logw - lam * torch.exp(logw))
            l = -phi * A * x
        if opsm is not None:
            s_lp = xo if samp is None else samp[b][idx].to(F64)
            kl_seq = (torch.nan_to_num(s_lp - x.detach(), nan=0.0) * wt).sum() / max(float(wt.sum()), 1.0)
            l = l * ((A >= 0) | (kl_seq <= opsm)).to(F64)
        emask = torch.ones(n, dtype=F64)
        if top_q < 1.0:
            emask = (ent[b][idx].detach().float() >= thr).to(F64)
            l = l * emask
        if isr is not None and base != "vespo":
            ir = isr[b][idx] if isr.dim() == 2 and isr.shape[1] == T and T > 1 else isr[b].reshape(-1)
            l = l * ir.to(F64)
        kl = None
        if ref is not None:
            d = ref[b][idx].to(F64) - x
            if kl_est == "k1":
                kl = -d
            elif kl_est == "k2":
                kl = 0.5 * d ** 2
            elif kl_est == "k3":
                kl = torch.exp(d) - d - 1
            else:
                dc = torch.clamp(d, -20, 20)
                kl = torch.clamp(torch.exp(dc) - dc - 1, -10, 10)
            if bias:
                kl = kl * r
            if beta != 0:
                l = l + beta * kl
        rows.append(dict(l=l, w=wt, r=r, lr=lr, low=low, high=high, dual=dual, kl=kl, n=n,
                         ent=None if ent is None else ent[b][idx].to(F64), emask=emask))

    W = sum(float(rw["w"].sum()) for rw in rows)
    tot = sum(((rw["l"] * rw["w"]).sum() for rw in rows), torch.zeros((), dtype=F64))
    if agg == "token-mean":
        loss = tot / max(float(n_items), 1.0) if n_items is not None else tot / max(W, 1.0) / ga
    elif agg == "seq-mean-token-mean":
        loss = sum((rw["l"] * rw["w"]).sum() / max(float(rw["w"].sum()), 1.0) for rw in rows) / max(B, 1) / ga
    elif agg == "seq-mean-token-sum":
        loss = sum((rw["l"] * rw["w"]).sum() for rw in rows) / max(B, 1) / ga
    else:
        loss = tot / (max(B, 1) * (max_len or T)) / ga
    loss = loss + torch.zeros((), dtype=F64)
    policy = loss
    if ent_coef != 0:
        num = sum((rw["ent"] * rw["w"] * rw["emask"]).sum() for rw in rows)
        den = sum(float((rw["w"] * rw["emask"]).sum()) for rw in rows)
        loss = loss - ent_coef * num / max(den, 1.0) / ga

    # metrics
    def tok_mean(key):
        return sum(float((rw[key].detach().to(F64) * rw["w"]).sum()) for rw in rows) / max(W, 1.0)

    seq = level == "sequence" and (adv.dim() == 1 or adv.shape[1] == 1)

    def flag_mean(key):
        # one value per sequence, over all rows (empty rows: ratio 1, not clipped)
        if seq or (key == "r" and level == "sequence"):
            vals = [float(rw[key][0].detach()) if rw["n"] else (1.0 if key == "r" else 0.0) for rw in rows]
            return sum(vals) / max(B, 1)
        return tok_mean(key)

    def extreme(key, fn):
        vals = []
        for rw in rows:
            if seq:
                vals.append(float(rw[key][0].detach()) if rw["n"] else 0.0)
            elif rw["n"]:
                vals.append(float((rw[key].detach().to(F64) * rw["w"]).sum()) / max(float(rw["w"].sum()), 1.0))
        return fn(vals) if vals else 0.0

    for rw in rows:
        rw["region"] = rw["low"] | rw["high"]
        rw["neg_lr"] = -rw["lr"]
    metrics = {
        "policy_loss": float(policy.detach()),
        "kl": tok_mean("kl") if ref is not None else 0.0,
        "entropy": tok_mean("ent") if ent is not None else 0.0,
        "approx_kl": tok_mean("neg_lr"),
        "ratio_mean": flag_mean("r"),
        "clip_ratio/low_mean": flag_mean("low"),
        "clip_ratio/high_mean": flag_mean("high"),
        "clip_ratio/region_mean": flag_mean("region"),
        "clip_ratio/low_min": extreme("low", min),
        "clip_ratio/high_max": extreme("high", max),
        "clip_ratio/dual_mean": flag_mean("dual"),
    }
    return loss, metrics


# map from this file's short option names to policy_loss keywords
KW = dict(ref="ref_logps", ent="entropy", samp="sampling_logps", isr="importance_sampling_ratio",
          trunc="is_truncated", agg="loss_agg_mode", level="importance_sampling_level",
          eps_low="epsilon_low", eps_high="epsilon_high", clip_c="clip_ratio_c",
          tpos="sapo_temperature_pos", tneg="sapo_temperature_neg", kpos="vespo_k_pos",
          lpos="vespo_lambda_pos", kneg="vespo_k_neg", lneg="vespo_lambda_neg", kl_est="kl_estimator",
          bias="use_bias_correction_kl", ent_coef="entropy_coef", top_q="top_entropy_quantile",
          opsm="off_policy_mask_threshold", n_items="num_items_in_batch",
          max_len="max_completion_length", ga="gradient_accumulation_steps")


def ours(lp, old, adv, mask, **kw):
    return policy_loss(lp, old, adv, mask, **{KW.get(k, k): v for k, v in kw.items()})


def make(B=4, T=7, dtype=torch.float32, seed=0, adv_shape="B", spread=0.3, empty_row=True):
    g = torch.Generator().manual_seed(seed)
    lp = (-torch.rand(B, T, generator=g, dtype=F64) * 3).to(dtype)
    old = (lp.to(F64) + spread * torch.randn(B, T, generator=g, dtype=F64)).to(dtype)
    ref = (lp.to(F64) + 0.3 * torch.randn(B, T, generator=g, dtype=F64)).to(dtype)
    ent = (torch.rand(B, T, generator=g, dtype=F64) * 2).to(dtype)
    lengths = torch.randint(1, T + 1, (B,), generator=g)
    mask = torch.arange(T)[None, :] < lengths[:, None]
    if empty_row and B > 2:
        mask[1] = False
    shape = {"B": (B,), "B1": (B, 1), "BT": (B, T)}[adv_shape]
    adv = torch.randn(*shape, generator=g, dtype=F64).to(dtype)
    return lp, old, ref, ent, mask, adv


def check(kw, B=4, T=7, dtype=torch.float32, adv_shape="B", seed=0, spread=0.3, with_ent_grad=False,
          atol=None, empty_row=True, extra=None):
    lp, old, ref, ent, mask, adv = make(B, T, dtype, seed, adv_shape, spread, empty_row)
    kw = dict(kw)
    if kw.pop("use_ref", False):
        kw["ref"] = ref
    if kw.pop("use_ent", False):
        kw["ent"] = ent
    if extra:
        kw.update(extra(B, T, lp, mask))
    lp1 = lp.clone().requires_grad_(True)
    lp2 = lp.clone().requires_grad_(True)
    ins = [lp1]
    ins2 = [lp2]
    if with_ent_grad:
        e1 = kw["ent"].clone().requires_grad_(True)
        e2 = kw["ent"].clone().requires_grad_(True)
        ins.append(e1)
        ins2.append(e2)
    kw1 = dict(kw, ent=e1) if with_ent_grad else kw
    kw2 = dict(kw, ent=e2) if with_ent_grad else kw
    got, gm = ours(lp1, old, adv, mask, **kw1)
    want, wm = ref_policy(lp2, old, adv, mask, **kw2)
    tol = atol if atol is not None else (1e-5 if dtype == torch.float32 else 1e-2)
    assert got.dtype == torch.float32 and got.dim() == 0
    torch.testing.assert_close(got.double(), want, atol=tol, rtol=tol)
    gg = torch.autograd.grad(got, ins, allow_unused=True)
    wg = torch.autograd.grad(want, ins2, allow_unused=True)
    for a, b in zip(gg, wg):
        a = torch.zeros_like(ins[0]) if a is None else a
        b = torch.zeros_like(ins2[0]) if b is None else b
        assert a.dtype == ins[0].dtype
        assert torch.isfinite(a.float()).all()
        torch.testing.assert_close(a.double(), b.double(), atol=tol, rtol=tol)
    assert set(gm) == set(POLICY_METRIC_KEYS)
    for k in POLICY_METRIC_KEYS:
        assert gm[k].dtype == torch.float32 and gm[k].dim() == 0 and not gm[k].requires_grad, k
        assert math.isclose(float(gm[k]), wm[k], rel_tol=1e-4, abs_tol=max(tol, 1e-5)), (k, float(gm[k]), wm[k])
    return got, gm


# --------------------------------------------------------------------------------------------
# each loss type and option against the reference


@pytest.mark.parametrize("loss_type", LOSS_TYPES)
@pytest.mark.parametrize("adv_shape", ["B", "B1", "BT"])
def test_loss_types(loss_type, adv_shape):
    check(dict(loss_type=loss_type), adv_shape=adv_shape, spread=0.4)


@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_loss_types_on_policy(loss_type):
    lp, _, _, _, mask, adv = make()
    a = lp.clone().requires_grad_(True)
    b = lp.clone().requires_grad_(True)
    got, gm = policy_loss(a, None, adv, mask, loss_type=loss_type)
    want, _ = ref_policy(b, None, adv, mask, loss_type=loss_type)
    torch.testing.assert_close(got.double(), want)
    torch.testing.assert_close(torch.autograd.grad(got, a)[0].double(), torch.autograd.grad(want, b)[0].double())
    assert float(gm["ratio_mean"]) == 1.0 and float(gm["approx_kl"]) == 0.0


@pytest.mark.parametrize("loss_type", CLIPPED)
@pytest.mark.parametrize("eps", [(0.2, None), (0.2, 0.28), (0.1, 0.5), (1.0, 0.0)])
def test_epsilon_low_high(loss_type, eps):
    check(dict(loss_type=loss_type, eps_low=eps[0], eps_high=eps[1]), spread=0.6, adv_shape="BT")


@pytest.mark.parametrize("loss_type", ["grpo", "dapo", "gspo"])
@pytest.mark.parametrize("delta,clip_c", [(1.5, None), (None, 3.0), (1.4, 2.0), (None, 1.01)])
def test_delta_and_dual_clip(loss_type, delta, clip_c):
    _, gm = check(dict(loss_type=loss_type, delta=delta, clip_c=clip_c), spread=1.5, adv_shape="BT", seed=3)
    if clip_c is not None and delta is None and loss_type != "gspo":
        assert float(gm["clip_ratio/dual_mean"]) > 0  # the bound binds somewhere at this spread


def test_dual_clip_formula():
    """verl: for A < 0, loss = min(max(-A r, -A clip(r)), -A c)."""
    lp = torch.tensor([[3.0, 0.0, -3.0]], requires_grad=True)
    old = torch.zeros(1, 3)
    adv = torch.full((1, 3), -1.0)
    mask = torch.ones(1, 3, dtype=torch.bool)
    loss, m = policy_loss(lp, old, adv, mask, loss_type="bnpo", clip_ratio_c=3.0)
    r = torch.exp(torch.tensor([3.0, 0.0, -3.0]))
    per = torch.minimum(torch.maximum(r, torch.clamp(r, 0.8, 1.2)), torch.tensor(3.0))
    torch.testing.assert_close(loss, per.mean())
    g, = torch.autograd.grad(loss, lp)
    assert g[0, 0] == 0  # bound binds: constant -A c
    torch.testing.assert_close(float(m["clip_ratio/dual_mean"]), 1 / 3)


@pytest.mark.parametrize("kl_est", KL_ESTIMATORS)
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("loss_type,level", [("dapo", None), ("grpo", "sequence"), ("cispo", None)])
def test_kl(kl_est, bias, loss_type, level):
    check(dict(loss_type=loss_type, level=level, beta=0.04, kl_est=kl_est, bias=bias, use_ref=True))


def test_kl_reported_when_beta_zero():
    lp, old, ref, _, mask, adv = make()
    l0, m0 = policy_loss(lp, old, adv, mask)
    l1, m1 = policy_loss(lp, old, adv, mask, ref_logps=ref)
    assert torch.equal(l0, l1) and float(m0["kl"]) == 0.0 and float(m1["kl"]) > 0


@pytest.mark.parametrize("loss_type", ["grpo", "dapo", "sapo"])
@pytest.mark.parametrize("top_q", [1.0, 0.5, 0.2, 0.0])
@pytest.mark.parametrize("ent_coef", [0.0, 0.01])
def test_entropy_bonus_and_quantile(loss_type, top_q, ent_coef):
    check(dict(loss_type=loss_type, top_q=top_q, ent_coef=ent_coef, use_ent=True, ga=2),
          with_ent_grad=ent_coef != 0)


@pytest.mark.parametrize("loss_type", ["grpo", "dapo", "gspo", "vespo"])
@pytest.mark.parametrize("with_samp", [False, True])
def test_off_policy_mask(loss_type, with_samp):
    def extra(B, T, lp, mask):
        g = torch.Generator().manual_seed(7)
        out = {}
        if with_samp:
            s = lp.double() + 0.5 * torch.randn(B, T, generator=g, dtype=F64)
            s[0, 0] = float("nan")  # an unscorable token gives no evidence
            out["samp"] = s.float()
        return out
    check(dict(loss_type=loss_type, opsm=0.05), spread=0.5, adv_shape="B", extra=extra, seed=5)


@pytest.mark.parametrize("loss_type", LOSS_TYPES)
@pytest.mark.parametrize("isr_shape", ["BT", "B1"])
def test_importance_sampling_ratio(loss_type, isr_shape):
    def extra(B, T, lp, mask):
        g = torch.Generator().manual_seed(11)
        shape = (B, T) if isr_shape == "BT" else (B, 1)
        isr = torch.exp(0.2 * torch.randn(*shape, generator=g)).clamp(max=3.0)
        if isr_shape == "BT":
            isr = torch.where(mask, isr, 1.0)
        return {"isr": isr}
    check(dict(loss_type=loss_type), extra=extra)


@pytest.mark.parametrize("loss_type", ["grpo", "dapo", "dr_grpo", "luspo"])
def test_truncated_completions(loss_type):
    def extra(B, T, lp, mask):
        return {"trunc": torch.tensor([True] + [False] * (B - 1))}
    check(dict(loss_type=loss_type, use_ent=True, top_q=0.5), extra=extra)
    # same as zeroing the truncated rows of the mask (TRL's mask_truncated_completions)
    lp, old, _, ent, mask, adv = make()
    trunc = torch.tensor([False, False, True, False])
    a, ma = policy_loss(lp, old, adv, mask, loss_type=loss_type, is_truncated=trunc, entropy=ent)
    b, mb = policy_loss(lp, old, adv, mask & ~trunc[:, None], loss_type=loss_type, entropy=ent)
    assert torch.equal(a, b) and all(torch.equal(ma[k], mb[k]) for k in ma)


@pytest.mark.parametrize("loss_type", ["grpo", "bnpo", "dapo", "luspo", "dr_grpo", "sapo"])
@pytest.mark.parametrize("agg", LOSS_AGG_MODES)
def test_loss_agg_modes(loss_type, agg):
    check(dict(loss_type=loss_type, agg=agg, ga=3))


@pytest.mark.parametrize("n_items", [10, 37.5, torch.tensor(23), torch.tensor(0.0)])
@pytest.mark.parametrize("loss_type", ["dapo", "cispo", "vespo"])
def test_num_items_in_batch(n_items, loss_type):
    check(dict(loss_type=loss_type, n_items=n_items, ga=4))


def test_dapo_without_count_equals_bnpo():
    lp, old, _, _, mask, adv = make()
    a, _ = policy_loss(lp, old, adv, mask, loss_type="dapo", gradient_accumulation_steps=2)
    b, _ = policy_loss(lp, old, adv, mask, loss_type="bnpo", gradient_accumulation_steps=2)
    assert torch.equal(a, b)


@pytest.mark.parametrize("max_len", [None, 7, 512])
def test_dr_grpo_max_completion_length(max_len):
    check(dict(loss_type="dr_grpo", max_len=max_len))


def test_gspo_is_grpo_at_sequence_level():
    lp, old, _, _, mask, adv = make()
    a, ma = policy_loss(lp, old, adv, mask, loss_type="gspo")
    b, mb = policy_loss(lp, old, adv, mask, loss_type="grpo", importance_sampling_level="sequence")
    assert torch.equal(a, b) and all(torch.equal(ma[k], mb[k]) for k in ma)


@pytest.mark.parametrize("temps", [(1.0, 1.05), (0.5, 2.0)])
def test_sapo_temperatures(temps):
    check(dict(loss_type="sapo", tpos=temps[0], tneg=temps[1]), spread=0.8, adv_shape="BT")


@pytest.mark.parametrize("params", [(2.0, 3.0, 3.0, 2.0), (1.0, 0.5, 4.0, 1.0)])
def test_vespo_params(params):
    check(dict(loss_type="vespo", kpos=params[0], lpos=params[1], kneg=params[2], lneg=params[3]),
          spread=0.05, adv_shape="B")


def test_float_mask_weights():
    lp, old, ref, ent, mask, adv = make()
    wmask = mask.float() * torch.linspace(0.5, 1.5, 7)[None, :]
    for lt in ("grpo", "dapo", "gspo", "dr_grpo"):
        a = lp.clone().requires_grad_(True)
        b = lp.clone().requires_grad_(True)
        got, _ = policy_loss(a, old, adv, wmask, loss_type=lt, ref_logps=ref, beta=0.1)
        want, _ = ref_policy(b, old, adv, wmask, loss_type=lt, ref=ref, beta=0.1)
        torch.testing.assert_close(got.double(), want, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(torch.autograd.grad(got, a)[0].double(), torch.autograd.grad(want, b)[0].double(),
                                   atol=1e-5, rtol=1e-5)
    # a 0/1 float mask is the bool mask
    x, _ = policy_loss(lp, old, adv, mask.float(), loss_type="grpo")
    y, _ = policy_loss(lp, old, adv, mask, loss_type="grpo")
    assert torch.equal(x, y)


# --------------------------------------------------------------------------------------------
# dtypes, shapes, empty rows, overflow, padding garbage


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("loss_type", ["grpo", "dapo", "cispo", "sapo", "gspo", "vespo"])
def test_low_precision_inputs(dtype, loss_type):
    check(dict(loss_type=loss_type, beta=0.04, use_ref=True, use_ent=True, ent_coef=0.01), dtype=dtype,
          with_ent_grad=True, spread=0.1)


def test_float64_inputs():
    lp, old, _, _, mask, adv = make(dtype=F64)
    loss, m = policy_loss(lp, old, adv, mask, loss_type="grpo")
    want, _ = ref_policy(lp, old, adv, mask, loss_type="grpo")
    assert loss.dtype == F64 and m["ratio_mean"].dtype == torch.float32
    torch.testing.assert_close(loss, want)


@pytest.mark.parametrize("B,T", [(1, 1), (1, 7), (3, 1), (5, 7), (2, 33)])
@pytest.mark.parametrize("loss_type", ["grpo", "dapo", "dr_grpo", "luspo", "vespo"])
def test_odd_shapes(B, T, loss_type):
    check(dict(loss_type=loss_type, use_ref=True, beta=0.02, use_ent=True, top_q=0.5), B=B, T=T, empty_row=False)


@pytest.mark.parametrize("loss_type", LOSS_TYPES)
@pytest.mark.parametrize("agg", [None] + list(LOSS_AGG_MODES))
def test_all_rows_empty(loss_type, agg):
    lp, old, ref, ent, mask, adv = make()
    lp = lp.requires_grad_(True)
    ent = ent.requires_grad_(True)
    loss, m = policy_loss(lp, old, adv, torch.zeros_like(mask), loss_type=loss_type, loss_agg_mode=agg,
                          ref_logps=ref, beta=0.1, entropy=ent, entropy_coef=0.1, top_entropy_quantile=0.5,
                          off_policy_mask_threshold=0.1)
    assert float(loss.detach()) == 0.0
    g = torch.autograd.grad(loss, [lp, ent])
    assert all(torch.equal(x, torch.zeros_like(x)) for x in g)
    assert all(math.isfinite(float(v)) for v in m.values())


def test_empty_batch():
    lp = torch.zeros(0, 5, requires_grad=True)
    for lt in LOSS_TYPES:
        loss, m = policy_loss(lp, None, torch.zeros(0), torch.zeros(0, 5, dtype=torch.bool), loss_type=lt)
        assert float(loss.detach()) == 0.0 and set(m) == set(POLICY_METRIC_KEYS)
        assert all(math.isfinite(float(v)) for v in m.values())


@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_empty_row_gets_no_gradient(loss_type):
    lp, old, ref, ent, mask, adv = make()
    lp = lp.requires_grad_(True)
    loss, _ = policy_loss(lp, old, adv, mask, loss_type=loss_type, ref_logps=ref, beta=0.1)
    g, = torch.autograd.grad(loss, lp)
    assert torch.isfinite(g).all() and torch.equal(g[~mask], torch.zeros_like(g[~mask]))


@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_padding_garbage_is_ignored(loss_type):
    lp, old, ref, ent, mask, adv = make(adv_shape="BT")
    dirty = [t.clone() for t in (lp, old, ref, ent, adv)]
    for i, t in enumerate(dirty):
        t[~mask] = [float("nan"), float("inf"), -float("inf"), float("nan"), float("inf")][i]
    kw = dict(loss_type=loss_type, beta=0.1, entropy_coef=0.01, top_entropy_quantile=0.5)
    a = lp.clone().requires_grad_(True)
    b = dirty[0].clone().requires_grad_(True)
    clean, mc = policy_loss(a, old, adv, mask, ref_logps=ref, entropy=ent, **kw)
    dirty_l, md = policy_loss(b, dirty[1], dirty[4], mask, ref_logps=dirty[2], entropy=dirty[3], **kw)
    assert torch.equal(clean, dirty_l)
    ga, = torch.autograd.grad(clean, a)
    gb, = torch.autograd.grad(dirty_l, b)
    assert torch.equal(ga, gb) and torch.isfinite(gb).all()
    assert all(torch.equal(mc[k], md[k]) for k in mc)


@pytest.mark.parametrize("loss_type", LOSS_TYPES)
@pytest.mark.parametrize("gap", [30.0, 200.0, 1e4])
def test_ratio_overflow(loss_type, gap):
    """log(pi / pi_old) of +-gap: exp would overflow (TRL gives inf / NaN); the log-ratio is clamped
    to [-20, 20] (as verl), so the loss and gradients stay finite and match the reference."""
    lp, old, ref, ent, mask, adv = make(adv_shape="BT")
    sign = torch.where(torch.arange(7) % 2 == 0, 1.0, -1.0)
    old = lp - gap * sign[None, :]
    a = lp.clone().requires_grad_(True)
    b = lp.clone().requires_grad_(True)
    kw = dict(loss_type=loss_type, kl_est="low_var_kl", beta=0.1, ref=ref)
    if loss_type in CLIPPED:
        kw["clip_c"] = 3.0
    got, gm = ours(a, old, adv, mask, **kw)
    want, _ = ref_policy(b, old, adv, mask, **kw)
    assert torch.isfinite(got)
    g, = torch.autograd.grad(got, a)
    assert torch.isfinite(g).all()
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(g.double(), torch.autograd.grad(want, b)[0].double(), rtol=1e-5, atol=1e-5)
    assert all(math.isfinite(float(v)) for v in gm.values())


def test_no_host_sync_meta_tensors():
    """Every input on the meta device (no data at all): any .item() / bool(tensor) would raise."""
    d = "meta"
    lp = torch.randn(3, 5, device=d, requires_grad=True)
    mask = torch.ones(3, 5, dtype=torch.bool, device=d)
    for lt in LOSS_TYPES:
        kw = dict(clip_ratio_c=3.0, delta=2.0) if lt in CLIPPED else {}
        if lt in ("dapo", "cispo", "vespo"):
            kw["num_items_in_batch"] = torch.tensor(12, device=d)
        loss, m = policy_loss(lp, torch.randn(3, 5, device=d), torch.randn(3, device=d), mask, loss_type=lt,
                              ref_logps=torch.randn(3, 5, device=d), beta=0.1,
                              entropy=torch.rand(3, 5, device=d), entropy_coef=0.1, top_entropy_quantile=0.3,
                              off_policy_mask_threshold=0.5, is_truncated=torch.zeros(3, dtype=torch.bool, device=d),
                              importance_sampling_ratio=torch.ones(3, 5, device=d), **kw)
        torch.autograd.grad(loss, lp)
        assert loss.device.type == "meta" and set(m) == set(POLICY_METRIC_KEYS)
    loss, _ = value_loss(lp, torch.randn(3, 5, device=d), torch.randn(3, 5, device=d), mask)
    torch.autograd.grad(loss, lp)


@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_metric_key_set_fixed(loss_type):
    lp, old, ref, ent, mask, adv = make()
    for kw in ({}, dict(ref_logps=ref), dict(entropy=ent), dict(ref_logps=ref, beta=0.1, entropy=ent,
                                                                 entropy_coef=0.1)):
        _, m = policy_loss(lp, old, adv, mask, loss_type=loss_type, **kw)
        assert tuple(m) == POLICY_METRIC_KEYS
        assert all(math.isfinite(float(v)) for v in m.values())
    _, m = policy_loss(lp, old, adv, mask, loss_type=loss_type)
    assert float(m["entropy"]) == 0.0 and float(m["kl"]) == 0.0


def test_gradients_only_to_logps_and_entropy():
    lp, old, ref, ent, mask, adv = make()
    ts = [t.clone().requires_grad_(True) for t in (lp, old, ref, ent, adv)]
    loss, _ = policy_loss(ts[0], ts[1], ts[4], mask, ref_logps=ts[2], entropy=ts[3], beta=0.1, entropy_coef=0.1)
    g = torch.autograd.grad(loss, ts, allow_unused=True)
    assert g[0] is not None and g[3] is not None
    assert g[1] is None and g[2] is None and g[4] is None


# --------------------------------------------------------------------------------------------
# value loss


def ref_value(v, old, R, mask, c, agg="token-mean"):
    v = v.to(F64)
    l1 = (v - R.to(F64)) ** 2
    if c is None:
        l = l1
    else:
        vc = old.to(F64) + torch.clamp(v - old.to(F64), -c, c)
        l = torch.max(l1, (vc - R.to(F64)) ** 2)
    w = mask.to(F64)
    if agg == "token-mean":
        return 0.5 * (l * w).sum() / w.sum().clamp(min=1)
    if agg == "seq-mean-token-mean":
        return 0.5 * ((l * w).sum(-1) / w.sum(-1).clamp(min=1)).mean()
    if agg == "seq-mean-token-sum":
        return 0.5 * (l * w).sum(-1).mean()
    return 0.5 * (l * w).sum() / (v.shape[0] * v.shape[1])


@pytest.mark.parametrize("c", [0.2, 0.05, None])
@pytest.mark.parametrize("agg", LOSS_AGG_MODES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_value_loss(c, agg, dtype):
    g = torch.Generator().manual_seed(1)
    v = torch.randn(4, 6, generator=g).to(dtype)
    old = (v.float() + 0.3 * torch.randn(4, 6, generator=g)).to(dtype)
    R = torch.randn(4, 6, generator=g)
    mask = torch.rand(4, 6, generator=g) > 0.3
    mask[2] = False
    a = v.clone().requires_grad_(True)
    b = v.clone().requires_grad_(True)
    loss, m = value_loss(a, old, R, mask, cliprange_value=c, loss_agg_mode=agg)
    want = ref_value(b, old, R, mask, c, agg)
    tol = 1e-5 if dtype == torch.float32 else 1e-2
    torch.testing.assert_close(loss.double(), want, atol=tol, rtol=tol)
    torch.testing.assert_close(torch.autograd.grad(loss, a)[0].double(), torch.autograd.grad(want, b)[0].double(),
                               atol=tol, rtol=tol)
    assert tuple(m) == VALUE_METRIC_KEYS and all(math.isfinite(float(x)) for x in m.values())
    if c == 0.05:
        assert float(m["vf_clipfrac"]) > 0
    mod_loss, _ = ValueLoss(cliprange_value=c, loss_agg_mode=agg)(v, old, R, mask)
    torch.testing.assert_close(mod_loss, loss.detach())


def test_value_loss_empty_and_on_policy():
    v = torch.randn(2, 3, requires_grad=True)
    loss, m = value_loss(v, None, torch.randn(2, 3), torch.zeros(2, 3, dtype=torch.bool))
    assert float(loss.detach()) == 0 and torch.equal(torch.autograd.grad(loss, v)[0], torch.zeros(2, 3))
    R = torch.randn(2, 3)
    a, _ = value_loss(v, None, R, torch.ones(2, 3, dtype=torch.bool))
    b, _ = value_loss(v, None, R, torch.ones(2, 3, dtype=torch.bool), cliprange_value=None)
    torch.testing.assert_close(a, b)
    c, _ = value_loss(v, None, R, torch.ones(2, 3, dtype=torch.bool), num_items_in_batch=12)
    torch.testing.assert_close(c, 0.5 * ((v - R) ** 2).sum() / 12)


# --------------------------------------------------------------------------------------------
# modules


def test_policy_module_matches_function():
    lp, old, ref, ent, mask, adv = make()
    mod = PolicyLoss(loss_type="dapo", epsilon_high=0.28, beta=0.04, entropy_coef=0.01, gradient_accumulation_steps=2)
    a, ma = mod(lp, old, adv, mask, ref_logps=ref, entropy=ent, num_items_in_batch=17)
    b, mb = policy_loss(lp, old, adv, mask, loss_type="dapo", epsilon_high=0.28, beta=0.04, entropy_coef=0.01,
                        gradient_accumulation_steps=2, ref_logps=ref, entropy=ent, num_items_in_batch=17)
    assert torch.equal(a, b) and all(torch.equal(ma[k], mb[k]) for k in ma)
    c, _ = mod(lp, old, adv, mask, ref_logps=ref, entropy=ent, gradient_accumulation_steps=1)
    d, _ = policy_loss(lp, old, adv, mask, loss_type="dapo", epsilon_high=0.28, beta=0.04, entropy_coef=0.01,
                       ref_logps=ref, entropy=ent)
    assert torch.equal(c, d)
    assert "dapo" in repr(mod)


@pytest.mark.parametrize("kw,match", [
    (dict(loss_type="ppo"), r"^loss_type: expected one of"),
    (dict(epsilon_low=1.5), r"^epsilon_low: "),
    (dict(loss_type="luspo", importance_sampling_level="token"), r"^importance_sampling_level: "),
    (dict(loss_type="sapo", clip_ratio_c=3.0), r"^clip_ratio_c: "),
    (dict(gradient_accumulation_steps=0), r"^gradient_accumulation_steps: "),
])
def test_module_checks_config_at_construction(kw, match):
    with pytest.raises(ValueError, match=match):
        PolicyLoss(**kw)


def test_value_module_checks_config():
    with pytest.raises(ValueError, match=r"^cliprange_value: "):
        ValueLoss(cliprange_value=0)
    with pytest.raises(ValueError, match=r"^loss_agg_mode: "):
        ValueLoss(loss_agg_mode="mean")


# --------------------------------------------------------------------------------------------
# validation


def _good():
    lp, old, ref, ent, mask, adv = make(B=3, T=5)
    return lp, old, adv, mask, ref, ent


@pytest.mark.parametrize("kw,exc,match", [
    # options
    (dict(loss_type="ppo"), ValueError, r"^loss_type: expected one of \('grpo', 'bnpo', 'dr_grpo', 'dapo', 'cispo', "
                                        r"'sapo', 'gspo', 'luspo', 'vespo'\), got 'ppo'"),
    (dict(kl_estimator="k4"), ValueError, r"^kl_estimator: expected one of \('k1', 'k2', 'k3', 'low_var_kl'\)"),
    (dict(loss_agg_mode="mean"), ValueError, r"^loss_agg_mode: expected one of \('token-mean', "),
    (dict(importance_sampling_level="seq"), ValueError, r"^importance_sampling_level: expected one of"),
    (dict(epsilon_low=1.2), ValueError, r"^epsilon_low: expected a value in \[0.0, 1.0\], got 1.2"),
    (dict(epsilon_low=-0.1), ValueError, r"^epsilon_low: expected a value in \[0.0, 1.0\]"),
    (dict(epsilon_low="a"), TypeError, r"^epsilon_low: expected a number"),
    (dict(epsilon_high=-0.1), ValueError, r"^epsilon_high: "),
    (dict(loss_type="cispo", epsilon_high=0.0), ValueError, r"^epsilon_high: "),
    (dict(loss_type="cispo", epsilon_low=0.0), ValueError, r"^epsilon_high: loss_type='cispo'"),
    (dict(delta=0.0), ValueError, r"^delta: expected a finite number > 0"),
    (dict(loss_type="cispo", delta=2.0), ValueError, r"^delta: the two-sided bound applies to the clipped"),
    (dict(clip_ratio_c=1.0), ValueError, r"^clip_ratio_c: expected a number > 1"),
    (dict(clip_ratio_c=float("nan")), ValueError, r"^clip_ratio_c: expected a finite number"),
    (dict(loss_type="vespo", clip_ratio_c=3.0), ValueError, r"^clip_ratio_c: dual-clip applies"),
    (dict(loss_type="luspo", importance_sampling_level="token"), ValueError,
     r"^importance_sampling_level: loss_type='luspo' is a sequence-level loss"),
    (dict(loss_type="gspo", importance_sampling_level="token"), ValueError,
     r"^importance_sampling_level: loss_type='gspo' is grpo with sequence-level"),
    (dict(loss_type="vespo", importance_sampling_level="sequence"), ValueError,
     r"^importance_sampling_level: loss_type='vespo' computes"),
    (dict(sapo_temperature_pos=0.0), ValueError, r"^sapo_temperature_pos: "),
    (dict(sapo_temperature_neg=-1.0), ValueError, r"^sapo_temperature_neg: "),
    (dict(vespo_k_pos=float("inf")), ValueError, r"^vespo_k_pos: "),
    (dict(beta=float("nan")), ValueError, r"^beta: expected a finite number"),
    (dict(use_bias_correction_kl=1), TypeError, r"^use_bias_correction_kl: expected a bool"),
    (dict(entropy_coef=float("inf")), ValueError, r"^entropy_coef: "),
    (dict(top_entropy_quantile=1.5), ValueError, r"^top_entropy_quantile: expected a value in \[0.0, 1.0\]"),
    (dict(off_policy_mask_threshold=float("nan")), ValueError, r"^off_policy_mask_threshold: "),
    (dict(max_completion_length=512), ValueError, r"^max_completion_length: only the 'seq-mean-token-sum-norm'"),
    (dict(loss_type="dr_grpo", max_completion_length=0), ValueError, r"^max_completion_length: expected an int >= 1"),
    (dict(loss_type="dr_grpo", max_completion_length=5.0), TypeError, r"^max_completion_length: expected an int"),
    (dict(gradient_accumulation_steps=0), ValueError, r"^gradient_accumulation_steps: expected an int >= 1"),
    (dict(gradient_accumulation_steps=2.0), TypeError, r"^gradient_accumulation_steps: expected an int"),
    (dict(backend="gpu"), ValueError, r"^backend: expected one of"),
    # options that need a tensor
    (dict(beta=0.1), ValueError, r"^ref_logps: required when beta != 0"),
    (dict(entropy_coef=0.1), ValueError, r"^entropy: required when entropy_coef != 0"),
    (dict(top_entropy_quantile=0.2), ValueError, r"^entropy: required when top_entropy_quantile < 1"),
    # counts
    (dict(loss_type="grpo", num_items_in_batch=10), ValueError, r"^num_items_in_batch: only 'token-mean'"),
    (dict(loss_type="bnpo", num_items_in_batch=10), ValueError, r"^num_items_in_batch: .*local token count"),
    (dict(num_items_in_batch=-1), ValueError, r"^num_items_in_batch: expected a value in"),
    (dict(num_items_in_batch="10"), TypeError, r"^num_items_in_batch: expected a number"),
    (dict(num_items_in_batch=torch.ones(2)), ValueError, r"^num_items_in_batch: expected a number or a one-element"),
    (dict(num_items_in_batch=torch.tensor(True)), TypeError, r"^num_items_in_batch: expected an integer or floating"),
])
def test_bad_options(kw, exc, match):
    lp, old, adv, mask, _, _ = _good()
    with pytest.raises(exc, match=match):
        policy_loss(lp, old, adv, mask, **kw)


def test_bad_tensors():
    lp, old, adv, mask, ref, ent = _good()
    P = policy_loss
    with pytest.raises(TypeError, match=r"^logps: expected a torch\.Tensor, got list"):
        P(lp.tolist(), old, adv, mask)
    with pytest.raises(TypeError, match=r"^logps: expected a floating tensor .*got dtype torch\.int64"):
        P(lp.long(), old, adv, mask)
    with pytest.raises(ValueError, match=r"^logps: expected a 2-D \(B, T\) tensor .*got shape \(15,\)"):
        P(lp.reshape(-1), old.reshape(-1), adv, mask.reshape(-1))
    with pytest.raises(ValueError, match=r"^old_logps: expected shape \(3, 5\) \(the shape of logps\), got \(3, 4\)"):
        P(lp, old[:, :4], adv, mask)
    with pytest.raises(TypeError, match=r"^old_logps: expected a floating tensor"):
        P(lp, old.long(), adv, mask)
    for name in ("ref_logps", "entropy", "sampling_logps"):
        with pytest.raises(ValueError, match=rf"^{name}: expected shape \(3, 5\) \(the shape of logps\), got \(5, 3\)"):
            P(lp, old, adv, mask, **{name: ref.t().contiguous()})
    for bad in (torch.zeros(4), torch.zeros(3, 4), torch.zeros(3, 5, 1), torch.zeros(())):
        with pytest.raises(ValueError, match=r"^advantages: expected shape \(3,\), \(3, 1\) or \(3, 5\) .*logps"):
            P(lp, old, bad, mask)
    with pytest.raises(TypeError, match=r"^advantages: expected a floating tensor"):
        P(lp, old, adv.long(), mask)
    for dt in (torch.int64, torch.int32, torch.uint8):
        with pytest.raises(TypeError, match=r"^mask: expected a bool tensor .*got dtype torch\.(int64|int32|uint8) "
                                            r"\(convert an integer attention mask with mask\.bool\(\)\)"):
            P(lp, old, adv, mask.to(dt))
    with pytest.raises(ValueError, match=r"^mask: expected shape \(3, 5\) \(the shape of logps\), got \(3, 6\)"):
        P(lp, old, adv, torch.ones(3, 6, dtype=torch.bool))
    with pytest.raises(TypeError, match=r"^is_truncated: expected a bool tensor"):
        P(lp, old, adv, mask, is_truncated=torch.zeros(3))
    with pytest.raises(ValueError, match=r"^is_truncated: expected shape \(3,\)"):
        P(lp, old, adv, mask, is_truncated=torch.zeros(3, 1, dtype=torch.bool))
    with pytest.raises(ValueError, match=r"^importance_sampling_ratio: expected shape \(3,\), \(3, 1\) or \(3, 5\)"):
        P(lp, old, adv, mask, importance_sampling_ratio=torch.ones(3, 2))
    with pytest.raises(ValueError, match=r"^mask: expected a tensor on cpu \(the device of logps\), got meta"):
        P(lp, old, adv, mask.to("meta"))


def test_value_loss_bad_inputs():
    v = torch.randn(3, 5)
    mask = torch.ones(3, 5, dtype=torch.bool)
    with pytest.raises(ValueError, match=r"^values: expected a 2-D"):
        value_loss(v.reshape(-1), None, v.reshape(-1), mask.reshape(-1))
    with pytest.raises(ValueError, match=r"^returns: expected shape \(3, 5\) \(the shape of values\)"):
        value_loss(v, None, v[:, :2], mask)
    with pytest.raises(ValueError, match=r"^old_values: expected shape \(3, 5\) \(the shape of values\)"):
        value_loss(v, v[:2], v, mask)
    with pytest.raises(TypeError, match=r"^mask: expected a bool tensor"):
        value_loss(v, None, v, mask.long())
    with pytest.raises(ValueError, match=r"^cliprange_value: expected a finite number > 0"):
        value_loss(v, None, v, mask, cliprange_value=-0.2)
    with pytest.raises(ValueError, match=r"^loss_agg_mode: expected one of"):
        value_loss(v, None, v, mask, loss_agg_mode="sum")
    with pytest.raises(ValueError, match=r"^num_items_in_batch: only loss_agg_mode='token-mean'"):
        value_loss(v, None, v, mask, loss_agg_mode="seq-mean-token-sum", num_items_in_batch=3)
    with pytest.raises(ValueError, match=r"^max_completion_length: only loss_agg_mode='seq-mean-token-sum-norm'"):
        value_loss(v, None, v, mask, max_completion_length=8)


# --------------------------------------------------------------------------------------------
# parity with TRL 1.16: its own GRPOTrainer._compute_loss on a stub trainer


class _Accelerator:
    num_processes = 1
    sync_gradients = True

    def gather(self, t):
        return t

    gather_for_metrics = gather

    def reduce(self, t, reduction="sum"):
        return t

    def pad_across_processes(self, t, dim=0, pad_index=0):
        return t


@pytest.fixture(scope="module")
def grpo_trainer_cls():
    mod = pytest.importorskip("trl.trainer.grpo_trainer")
    return mod.GRPOTrainer


def trl_compute_loss(cls, lp, old, adv, mask, *, ref=None, ent=None, samp=None, isr=None, loss_type="dapo",
                     level="token", eps_low=0.2, eps_high=None, delta=None, tpos=1.0, tneg=1.05, beta=0.0,
                     bias=True, ent_coef=0.0, top_q=1.0, opsm=None, n_items=None, max_len=512, ga=1,
                     vespo=(2.0, 3.0, 3.0, 2.0)):
    tr = object.__new__(cls)
    B, T = lp.shape
    tr.loss_type = loss_type
    tr.importance_sampling_level = level
    tr.epsilon_low = eps_low
    tr.epsilon_high = eps_low if eps_high is None else eps_high
    tr.beta = beta
    tr.top_entropy_quantile = top_q
    tr.off_policy_mask_threshold = opsm
    tr.use_vllm = isr is not None
    tr.vllm_importance_sampling_correction = True
    tr.model = SimpleNamespace(training=True)
    tr.current_gradient_accumulation_steps = ga
    tr.accelerator = _Accelerator()
    tr.entropy_coef = ent_coef
    tr.use_adaptive_entropy = False
    tr._entropy_bonus_enabled = ent_coef != 0.0
    tr.aux_loss_enabled = False
    tr.max_completion_length = max_len
    tr._metrics = {"train": defaultdict(list), "eval": defaultdict(list)}
    tr.args = SimpleNamespace(use_bias_correction_kl=bias, delta=delta, sapo_temperature_pos=tpos,
                              sapo_temperature_neg=tneg, vespo_k_pos=vespo[0], vespo_lambda_pos=vespo[1],
                              vespo_k_neg=vespo[2], vespo_lambda_neg=vespo[3], steps_per_generation=ga,
                              entropy_target=0.2)
    entropies = torch.zeros(B, T) if ent is None else ent
    tr._get_per_token_logps_and_entropies = lambda *a, **k: (lp, entropies, None)
    inputs = {
        "prompt_ids": torch.zeros(B, 1, dtype=torch.long), "prompt_mask": torch.ones(B, 1, dtype=torch.long),
        "completion_ids": torch.zeros(B, T, dtype=torch.long), "completion_mask": mask.long(),
        "advantages": adv,
        "num_items_in_batch": torch.tensor(float(mask.sum()) if n_items is None else float(n_items)),
    }
    if old is not None:
        inputs["old_per_token_logps"] = old
    if ref is not None:
        inputs["ref_per_token_logps"] = ref
    if samp is not None:
        inputs["sampling_per_token_logps"] = samp
    if isr is not None:
        inputs["importance_sampling_ratio"] = isr
    loss = tr._compute_loss(None, inputs)
    return loss, {k: v[-1] for k, v in tr._metrics["train"].items()}


TRL_CASES = [
    dict(loss_type="dapo"),
    dict(loss_type="dapo", eps_high=0.28, n_items=40, ga=2),
    dict(loss_type="grpo", ga=3),
    dict(loss_type="grpo", level="sequence"),
    dict(loss_type="bnpo", ga=2),
    dict(loss_type="dr_grpo", max_len=16),
    dict(loss_type="cispo", eps_high=1.1),
    dict(loss_type="sapo"),
    dict(loss_type="sapo", tpos=0.7, tneg=1.6),
    dict(loss_type="luspo", level="sequence"),
    dict(loss_type="vespo"),
    dict(loss_type="grpo", delta=1.3),
    dict(loss_type="dapo", beta=0.05, use_ref=True),
    dict(loss_type="dapo", beta=0.05, use_ref=True, bias=False),
    dict(loss_type="grpo", level="sequence", beta=0.05, use_ref=True),
    dict(loss_type="dapo", use_ent=True, top_q=0.4),
    dict(loss_type="dapo", use_ent=True, ent_coef=0.02, ga=2),
    dict(loss_type="grpo", use_ent=True, ent_coef=0.02, top_q=0.5),
    dict(loss_type="dapo", opsm=0.05, use_samp=True),
    dict(loss_type="grpo", opsm=0.05),
    dict(loss_type="dapo", use_isr=True),
    dict(loss_type="vespo", use_isr=True),
    dict(loss_type="grpo", adv_shape="BT"),
    dict(loss_type="dapo", adv_shape="BT", opsm=0.05),
]


def _case_id(c):
    return "-".join(f"{k}={v}" for k, v in c.items())


@pytest.mark.parametrize("case", TRL_CASES, ids=_case_id)
@pytest.mark.parametrize("on_policy", [False, True])
def test_matches_trl(grpo_trainer_cls, case, on_policy):
    case = dict(case)
    lp, old, ref, ent, mask, adv = make(B=5, T=9, seed=2, adv_shape=case.pop("adv_shape", "B"), spread=0.25)
    if on_policy:
        old = None
    g = torch.Generator().manual_seed(4)
    trl_kw, our_kw = {}, {}
    if case.pop("use_ref", False):
        trl_kw["ref"] = our_kw["ref_logps"] = ref
    if case.pop("use_ent", False):
        trl_kw["ent"] = our_kw["entropy"] = ent
    if case.pop("use_samp", False):
        s = lp + 0.4 * torch.randn(lp.shape, generator=g)
        trl_kw["samp"] = our_kw["sampling_logps"] = s
    if case.pop("use_isr", False):
        isr = torch.where(mask, torch.exp(0.2 * torch.randn(lp.shape, generator=g)), 1.0)
        trl_kw["isr"] = our_kw["importance_sampling_ratio"] = isr
    trl_kw.update(case)
    lt = case["loss_type"]
    for short, name in (("level", "importance_sampling_level"), ("eps_high", "epsilon_high"), ("delta", "delta"),
                        ("tpos", "sapo_temperature_pos"), ("tneg", "sapo_temperature_neg"), ("beta", "beta"),
                        ("bias", "use_bias_correction_kl"), ("ent_coef", "entropy_coef"),
                        ("top_q", "top_entropy_quantile"), ("opsm", "off_policy_mask_threshold"),
                        ("ga", "gradient_accumulation_steps"), ("loss_type", "loss_type")):
        if short in case:
            our_kw[name] = case[short]
    if lt in ("dapo", "cispo", "vespo"):
        our_kw["num_items_in_batch"] = case.get("n_items", None)
        if our_kw["num_items_in_batch"] is None:
            our_kw["num_items_in_batch"] = torch.tensor(float(mask.sum()))
    if lt == "dr_grpo":
        our_kw["max_completion_length"] = case.get("max_len", 512)
    a = lp.clone().requires_grad_(True)
    b = lp.clone().requires_grad_(True)
    want, wm = trl_compute_loss(grpo_trainer_cls, b, old, adv, mask, **trl_kw)
    got, gm = policy_loss(a, old, adv, mask, **our_kw)
    torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(torch.autograd.grad(got, a)[0], torch.autograd.grad(want, b)[0], atol=1e-6, rtol=1e-5)
    # the metrics TRL logs, under our names
    names = {"kl": "kl", "entropy": "entropy", "clip_ratio/low_mean": "clip_ratio/low_mean",
             "clip_ratio/high_mean": "clip_ratio/high_mean", "clip_ratio/region_mean": "clip_ratio/region_mean",
             "clip_ratio/low_min": "clip_ratio/low_min", "clip_ratio/high_max": "clip_ratio/high_max",
             "cispo_clip_ratio": "clip_ratio/high_mean"}
    # (without entropies TRL gets zeros from the stub, and reports 0 as ours does)
    compared = 0
    for trl_name, our_name in names.items():
        if trl_name in wm and not math.isnan(wm[trl_name]):
            assert math.isclose(float(gm[our_name]), wm[trl_name], rel_tol=1e-5, abs_tol=1e-6), trl_name
            compared += 1
    assert compared >= 1
