"""Preference losses (DPO family, KTO, SimPO, CPO, ORPO) on per-sequence log-probs.

Every loss type and option is checked, values and gradients with respect to the policy log-probs,
against an independent eager implementation written here in float64 from TRL 1.16's code and the
papers' formulas (literal transcriptions, no stabilization), and, where TRL is installed, against
TRL itself: ``DPOTrainer._compute_loss`` and ``KTOTrainer._compute_loss`` run on trainer objects
built with ``object.__new__`` and a stand-in model that returns given per-token log-probs, and
``CPOTrainer`` / ``ORPOTrainer.get_batch_loss_metrics`` with a stand-in ``concatenated_forward``.
"""
import math
import re
from collections import defaultdict
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from posttrain_kernels.api.preference import (DPO_LOSS_TYPES, F_DIVERGENCE_LOSS_TYPES, KTO_METRICS,
                                              PREFERENCE_METRICS, kto_loss, ld_sequence_logps,
                                              preference_loss, wpo_log_weights)
from posttrain_kernels.api.preference_free import (ORPO_MAX_AVG_LOGP, ORPO_METRICS, cpo_loss, orpo_loss,
                                                   simpo_loss)
from posttrain_kernels.modules import CPOLoss, DPOLoss, KTOLoss, ORPOLoss, SimPOLoss

DTYPES = [torch.float32, torch.bfloat16]
BATCHES = [1, 3, 8]
# label_smoothing each loss type is tested with (exo_pair needs eps > 0, robust eps < 0.5)
EPS = {"robust": 0.2, "exo_pair": 1e-3, "aot": 0.1, "aot_unpaired": 0.1}
VALUE_TOL = dict(rtol=2e-5, atol=2e-5)
GRAD_TOL = {torch.float32: dict(rtol=1e-4, atol=1e-6), torch.bfloat16: dict(rtol=1.6e-2, atol=1e-5)}


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """The tensors here have a few elements; some CPU kernels (log_sigmoid) still open an OpenMP
    region per call, which costs milliseconds on a busy machine. One thread keeps the file fast."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


# ----------------------------------------------------------------------------------------------
# independent float64 references (TRL 1.16 code / published formulas, transcribed literally)


def ref_f_scores(u, f_type, coef):
    if f_type == "reverse_kl":
        return u
    if f_type == "forward_kl":
        return 1 - torch.exp(-u)
    if f_type == "js_divergence":
        return math.log(2) + F.logsigmoid(u)
    if abs(coef - 1.0) < 1e-6:
        return u
    t = torch.clamp((coef - 1.0) * u, max=80.0)
    return (torch.exp(t) - 1.0) * (1.0 / (coef - 1.0))


def ref_dpo(pc, pr, rc, rr, *, loss_types=("sigmoid",), weights=None, beta=0.1, ls=0.0, lc=None, lr=None,
            f_type="reverse_kl", coef=0.5, w=None, rpo_alpha=None, nll=None, tau=0.05, bco_delta=0.0):
    """TRL 1.16 DPOTrainer._compute_loss on sequence log-probs (float64), with cDPO label smoothing
    on "sigmoid" (TRL 0.x / the DPO reference code) and RPO (TRL 0.x: + rpo_alpha * nll before the
    WPO weight)."""
    pc, pr, rc, rr = pc.double(), pr.double(), rc.double(), rr.double()
    c, r = pc - rc, pr - rr
    sc, sr = ref_f_scores(c, f_type, coef), ref_f_scores(r, f_type, coef)
    d = sc - sr
    weights = weights or [1.0] * len(loss_types)
    terms = list(zip(loss_types, weights)) + ([("sft", rpo_alpha)] if rpo_alpha is not None else [])
    loss = 0.0
    for lt, wt in terms:
        if lt == "sigmoid":
            x = beta * d
            per = -F.logsigmoid(x) * (1 - ls) - F.logsigmoid(-x) * ls
        elif lt == "hinge":
            per = torch.relu(1 - beta * d)
        elif lt == "ipo":
            dd = sc / lc.double().clamp(min=1.0) - sr / lr.double().clamp(min=1.0)
            per = (dd - 1 / (2 * beta)) ** 2
        elif lt == "sigmoid_norm":
            dd = sc / lc.double().clamp(min=1.0) - sr / lr.double().clamp(min=1.0)
            per = -F.logsigmoid(beta * dd)
        elif lt == "exo_pair":
            eps = torch.tensor(ls, dtype=torch.float64)
            per = (torch.sigmoid(beta * d) * (F.logsigmoid(beta * d) - torch.log1p(-eps))
                   + torch.sigmoid(-beta * d) * (F.logsigmoid(-beta * d) - torch.log(eps)))
        elif lt == "nca_pair":
            per = -F.logsigmoid(beta * c) - 0.5 * F.logsigmoid(-beta * c) - 0.5 * F.logsigmoid(-beta * r)
        elif lt == "robust":
            per = ((-(1 - ls) * F.logsigmoid(beta * d)) - (-ls * F.logsigmoid(-beta * d))) / (1 - 2 * ls)
        elif lt == "bco_pair":
            per = -F.logsigmoid(beta * c - bco_delta) - F.logsigmoid(-(beta * r - bco_delta))
        elif lt == "sppo_hard":
            per = (c - 0.5 / beta) ** 2 + (r + 0.5 / beta) ** 2
        elif lt == "aot":
            delta = torch.sort(pc - pr)[0] - torch.sort(rc - rr)[0]
            per = -F.logsigmoid(beta * delta) * (1 - ls) - F.logsigmoid(-beta * delta) * ls
        elif lt == "aot_unpaired":
            delta = torch.sort(c)[0] - torch.sort(r)[0]
            per = -F.logsigmoid(beta * delta) * (1 - ls) - F.logsigmoid(-beta * delta) * ls
        elif lt == "apo_zero":
            per = (1 - torch.sigmoid(beta * c)) + torch.sigmoid(beta * r)
        elif lt == "apo_down":
            per = torch.sigmoid(beta * c) + (1 - torch.sigmoid(beta * (c - r)))
        elif lt == "discopop":
            x = beta * d
            mod = torch.sigmoid(x / tau)
            per = -F.logsigmoid(x) * (1 - mod) + torch.exp(-x) * mod
        elif lt == "sft":
            n = nll.double()
            per = n.expand(pc.shape[0]) if n.dim() == 0 else n
        else:
            raise AssertionError(lt)
        if w is not None:
            per = per * w.double()
        loss = loss + per.mean() * wt
    cr, rw = beta * c.detach(), beta * r.detach()
    metrics = {"rewards/chosen": cr.mean(), "rewards/rejected": rw.mean(),
               "rewards/accuracies": (cr > rw).double().mean(), "rewards/margins": (cr - rw).mean(),
               "logps/chosen": pc.detach().mean(), "logps/rejected": pr.detach().mean(),
               "nll_loss": torch.zeros((), dtype=torch.float64) if nll is None else nll.detach().double().mean()}
    return loss, metrics


def ref_kto(pc, pr, rc, rr, *, kl_p=None, kl_r=None, kl=None, loss_type="kto", beta=0.1, dw=1.0, uw=1.0):
    """TRL 1.16 KTOTrainer._compute_loss (float64)."""
    pc, pr, rc, rr = pc.double(), pr.double(), rc.double(), rr.double()
    if loss_type == "kto":
        z = (kl_p.double() - kl_r.double()).mean().detach() if kl is None else torch.tensor(float(kl)).double()
        z = z.clamp(min=0)
    else:
        z = torch.zeros((), dtype=torch.float64)
    cl, rl = pc - rc, pr - rr
    if loss_type == "kto":
        closs, rloss = 1 - torch.sigmoid(beta * (cl - z)), 1 - torch.sigmoid(beta * (z - rl))
    else:
        closs, rloss = 1 - torch.sigmoid(beta * cl), torch.sigmoid(beta * rl)
    losses = torch.cat((dw * closs, uw * rloss))
    return losses.nanmean(), z


def ref_cpo(pc, pr, *, loss_type="sigmoid", beta=0.1, ls=0.0, gamma=0.5, alpha=0.0, cpo_alpha=1.0, nll=None):
    """TRL 1.16 CPOTrainer.cpo_loss + get_batch_loss_metrics on (already averaged where TRL averages)
    log-probs (float64)."""
    pc, pr = pc.double(), pr.double()
    if alpha != 0.0:
        uc, ur = (1 - torch.exp(pc).pow(-alpha)) / alpha, (1 - torch.exp(pr).pow(-alpha)) / alpha
    else:
        uc, ur = pc, pr
    z = uc - ur
    if loss_type == "simpo":
        z = z - gamma / beta
        losses = -F.logsigmoid(beta * z) * (1 - ls) - F.logsigmoid(-beta * z) * ls
    elif loss_type == "sigmoid":
        losses = -F.logsigmoid(beta * z) * (1 - ls) - F.logsigmoid(-beta * z) * ls
    elif loss_type == "hinge":
        losses = torch.relu(1 - beta * z)
    else:
        losses = (z - 1 / (2 * beta)) ** 2
    loss = losses.mean()
    if cpo_alpha != 0:
        loss = loss + cpo_alpha * nll.double().mean()
    return loss, beta * uc.detach(), beta * ur.detach()


def ref_orpo(lc, lr, *, beta=0.1, nll=None):
    """ORPO paper Eq. (4)/(7), as TRL's odds_ratio_loss, on average log-probs (float64)."""
    lc, lr = lc.double(), lr.double()
    log_odds = (lc - lr) - (torch.log1p(-torch.exp(lc)) - torch.log1p(-torch.exp(lr)))
    ratio = F.logsigmoid(log_odds)
    loss = -beta * ratio.mean() + (0.0 if nll is None else nll.double().mean())
    return loss, ratio.mean(), log_odds.mean()


# ----------------------------------------------------------------------------------------------
# data


def make_pairs(b, dtype=torch.float32, seed=0, zero_len=False):
    """Realistic sequence log-probs: sums of per-token log-probs in [-2.2, -0.2], the reference
    within a few nats of the policy. The policy tensors are leaves that require grad."""
    g = torch.Generator().manual_seed(seed + 17 * b)
    lc = torch.randint(1, 40, (b,), generator=g)
    lr = torch.randint(1, 40, (b,), generator=g)
    if zero_len and b > 0:
        lc[0] = 0
        lr[-1] = 0
    pc = -(torch.rand(b, generator=g) * 2 + 0.2) * lc
    pr = -(torch.rand(b, generator=g) * 2 + 0.2) * lr
    rc = torch.where(lc > 0, pc + torch.randn(b, generator=g) * 3, torch.zeros(b))
    rr = torch.where(lr > 0, pr + torch.randn(b, generator=g) * 3, torch.zeros(b))
    leaf = lambda t: t.to(dtype).requires_grad_(True)  # noqa: E731
    return SimpleNamespace(pc=leaf(pc), pr=leaf(pr), rc=rc.to(dtype), rr=rr.to(dtype), lc=lc, lr=lr,
                           nll=torch.tensor(1.3, requires_grad=True),
                           nll_seq=(torch.rand(b, generator=g) + 0.5).requires_grad_(True),
                           wc=-torch.rand(b, generator=g), wr=-torch.rand(b, generator=g))


def close(got, want, rtol=2e-5, atol=2e-5, msg=""):
    """``|got - want| <= atol + rtol * |want|`` elementwise, in float64 (a cheaper assert_close)."""
    got, want = torch.as_tensor(got).detach().double(), torch.as_tensor(want).detach().double()
    assert got.shape == want.shape, (msg, got.shape, want.shape)
    ok = torch.isclose(got, want, rtol=rtol, atol=atol, equal_nan=False)
    assert bool(ok.all()), f"{msg}: got {got[~ok].tolist()} want {want[~ok].tolist()}"


def grads(loss, inputs):
    return torch.autograd.grad(loss, inputs, allow_unused=True)


def assert_grads(got, want, dtype):
    for g, w in zip(got, want):
        if w is None:
            assert g is None or torch.count_nonzero(g) == 0
            continue
        assert g.dtype == w.dtype
        close(g, w, **GRAD_TOL[dtype], msg="grad")


def assert_metrics(got, want, keys=PREFERENCE_METRICS, tol=VALUE_TOL):
    assert tuple(got) == tuple(keys)
    for k in keys:
        assert got[k].dtype == torch.float32 and got[k].dim() == 0 and not got[k].requires_grad, k
    ks = [k for k in keys if k in want]
    close(torch.stack([got[k].double() for k in ks]),
          torch.stack([torch.as_tensor(want[k]).double().reshape(()) for k in ks]), **tol, msg=str(ks))


def check_dpo(d, dtype, *, inputs=None, **kw):
    """preference_loss against ref_dpo: value, metrics, gradients w.r.t. the policy log-probs (and
    the NLL when there is one)."""
    ref_kw = dict(loss_types=kw.get("loss_type", ("sigmoid",)), weights=kw.get("loss_weights"),
                  beta=kw.get("beta", 0.1), ls=kw.get("label_smoothing", 0.0), lc=d.lc, lr=d.lr,
                  f_type=kw.get("f_divergence_type", "reverse_kl"), coef=kw.get("f_alpha_divergence_coef", 0.5),
                  rpo_alpha=kw.get("rpo_alpha"), nll=kw.get("chosen_nll"), tau=kw.get("discopop_tau", 0.05),
                  bco_delta=float(kw.get("bco_delta") or 0.0))
    if isinstance(ref_kw["loss_types"], str):
        ref_kw["loss_types"] = (ref_kw["loss_types"],)
    if kw.get("use_weighting"):
        ref_kw["w"] = (kw["wpo_weights"] if kw.get("wpo_weights") is not None
                       else torch.exp(kw["chosen_wpo_logps"]) * torch.exp(kw["rejected_wpo_logps"]))
    kw.setdefault("chosen_lengths", d.lc)
    kw.setdefault("rejected_lengths", d.lr)
    inputs = inputs or [d.pc, d.pr] + ([kw["chosen_nll"]] if kw.get("chosen_nll") is not None else [])
    loss, metrics = preference_loss(d.pc, d.pr, d.rc, d.rr, **kw)
    want, want_metrics = ref_dpo(d.pc, d.pr, d.rc, d.rr, **ref_kw)
    assert loss.dtype == torch.float32 and loss.dim() == 0
    close(loss, want, **VALUE_TOL, msg="loss")
    assert_metrics(metrics, want_metrics)
    assert_grads(grads(loss, inputs), grads(want, inputs), dtype)
    return loss


# ----------------------------------------------------------------------------------------------
# preference_loss against the reference


@pytest.mark.parametrize("b", BATCHES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("loss_type", DPO_LOSS_TYPES)
def test_dpo_loss_types(loss_type, dtype, b):
    d = make_pairs(b, dtype)
    kw = dict(loss_type=loss_type, label_smoothing=EPS.get(loss_type, 0.0))
    if loss_type == "sft":
        kw["chosen_nll"] = d.nll
    check_dpo(d, dtype, **kw)


@pytest.mark.parametrize("eps", [0.1, 0.3])
@pytest.mark.parametrize("loss_type", ["sigmoid", "robust", "exo_pair", "aot", "aot_unpaired"])
def test_dpo_label_smoothing(loss_type, eps):
    check_dpo(make_pairs(8, seed=1), torch.float32, loss_type=loss_type, label_smoothing=eps)


@pytest.mark.parametrize("beta", [0.01, 0.5, 3.0])
@pytest.mark.parametrize("loss_type", ["sigmoid", "ipo", "sppo_hard", "discopop", "apo_down"])
def test_dpo_beta(loss_type, beta):
    check_dpo(make_pairs(8, seed=2), torch.float32, loss_type=loss_type, beta=beta)


@pytest.mark.parametrize("tau", [0.01, 0.05, 0.5])
def test_discopop_tau(tau):
    check_dpo(make_pairs(8, seed=3), torch.float32, loss_type="discopop", discopop_tau=tau)


@pytest.mark.parametrize("f_type,coef", [("forward_kl", 0.5), ("js_divergence", 0.5), ("alpha_divergence", 0.5),
                                         ("alpha_divergence", 1.0), ("alpha_divergence", 1.5)])
@pytest.mark.parametrize("loss_type", F_DIVERGENCE_LOSS_TYPES)
def test_dpo_f_divergence(loss_type, f_type, coef):
    d = make_pairs(8, seed=4)
    kw = dict(loss_type=loss_type, f_divergence_type=f_type, f_alpha_divergence_coef=coef,
              label_smoothing=EPS.get(loss_type, 0.0))
    if loss_type == "sft":
        kw["chosen_nll"] = d.nll
    check_dpo(d, torch.float32, **kw)


def test_alpha_divergence_clamp_and_limit():
    # (alpha - 1) * logratio beyond 80 is clamped as TRL does (finite, no gradient past it) and
    # alpha = 1 is the reverse KL
    d = make_pairs(4, seed=5)
    d.rc = d.pc.detach() + torch.tensor([200.0, -200.0, 0.5, -0.5])
    loss = check_dpo(d, torch.float32, f_divergence_type="alpha_divergence", f_alpha_divergence_coef=0.5)
    assert torch.isfinite(loss)
    a, _ = preference_loss(d.pc, d.pr, d.rc, d.rr, f_divergence_type="alpha_divergence", f_alpha_divergence_coef=1.0)
    b, _ = preference_loss(d.pc, d.pr, d.rc, d.rr)
    torch.testing.assert_close(a, b)


@pytest.mark.parametrize("types,weights", [
    (["sigmoid", "bco_pair", "sft"], [0.8, 0.2, 1.0]),  # MPO, as in TRL's docs
    (["ipo", "hinge"], None),
    (["apo_zero", "nca_pair", "sigmoid_norm", "sppo_hard"], [0.5, -0.25, 2.0, 0.0]),
])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_dpo_multiple_loss_types(types, weights, dtype):
    d = make_pairs(8, dtype, seed=6)
    kw = dict(loss_type=types, loss_weights=weights)
    if "sft" in types:
        kw["chosen_nll"] = d.nll
    check_dpo(d, dtype, **kw)


@pytest.mark.parametrize("source", ["logps", "weights"])
@pytest.mark.parametrize("loss_type", ["sigmoid", "ipo", "bco_pair", "discopop", "sft"])
def test_dpo_wpo_weighting(loss_type, source):
    d = make_pairs(8, seed=7)
    wc, wr = d.wc.clone().requires_grad_(True), d.wr.clone().requires_grad_(True)
    kw = dict(loss_type=loss_type, use_weighting=True)
    if source == "logps":
        kw.update(chosen_wpo_logps=wc, rejected_wpo_logps=wr)
    else:
        kw.update(wpo_weights=torch.exp(wc) * torch.exp(wr))
    if loss_type == "sft":
        kw["chosen_nll"] = d.nll_seq
    check_dpo(d, torch.float32, **kw)
    # the weights are detached: no gradient reaches them
    loss, _ = preference_loss(d.pc, d.pr, d.rc, d.rr, chosen_lengths=d.lc, rejected_lengths=d.lr, **kw)
    assert not loss.requires_grad or all(
        g is None for g in torch.autograd.grad(loss, [wc, wr], allow_unused=True))


@pytest.mark.parametrize("weighting", [False, True])
@pytest.mark.parametrize("nll_shape", ["scalar", "per_pair"])
def test_dpo_rpo(nll_shape, weighting):
    d = make_pairs(8, seed=8)
    nll = d.nll if nll_shape == "scalar" else d.nll_seq
    kw = dict(loss_type="sigmoid", rpo_alpha=0.7, chosen_nll=nll)
    if weighting:
        kw.update(use_weighting=True, chosen_wpo_logps=d.wc, rejected_wpo_logps=d.wr)
    check_dpo(d, torch.float32, **kw)
    # RPO is the "sft" loss type added with weight rpo_alpha
    a, _ = preference_loss(d.pc, d.pr, d.rc, d.rr, **kw)
    kw.pop("rpo_alpha")
    kw.update(loss_type=["sigmoid", "sft"], loss_weights=[1, 0.7])
    b, _ = preference_loss(d.pc, d.pr, d.rc, d.rr, **kw)
    torch.testing.assert_close(a, b)


@pytest.mark.parametrize("delta", [0.0, 0.3, torch.tensor(-0.8), torch.tensor([1.5])])
def test_bco_delta(delta):
    d = make_pairs(8, seed=9)
    check_dpo(d, torch.float32, loss_type="bco_pair", bco_delta=delta)


def test_reference_free():
    d = make_pairs(8, seed=10)
    got, m = preference_loss(d.pc, d.pr, reference_free=True, loss_type=["sigmoid", "ipo"],
                             chosen_lengths=d.lc, rejected_lengths=d.lr)
    zeros = torch.zeros(8)
    want, wm = ref_dpo(d.pc, d.pr, zeros, zeros, loss_types=("sigmoid", "ipo"), lc=d.lc, lr=d.lr)
    torch.testing.assert_close(got.double(), want, **VALUE_TOL)
    assert_metrics(m, wm)
    # "sft" alone needs no reference
    loss, m = preference_loss(d.pc, d.pr, loss_type="sft", chosen_nll=d.nll)
    torch.testing.assert_close(loss, d.nll.detach())


def test_dpo_float64_and_float16_inputs():
    for loss_type in DPO_LOSS_TYPES:
        d64 = make_pairs(3, torch.float64, seed=11)
        kw = dict(loss_type=loss_type, label_smoothing=EPS.get(loss_type, 0.0), chosen_lengths=d64.lc,
                  rejected_lengths=d64.lr, chosen_nll=d64.nll)
        loss, _ = preference_loss(d64.pc, d64.pr, d64.rc, d64.rr, **kw)
        assert loss.dtype == torch.float32
        g = torch.autograd.grad(loss, [d64.pc, d64.pr], allow_unused=True)
        assert all(x is None or x.dtype == torch.float64 for x in g)
        d16 = make_pairs(3, torch.float16, seed=11)
        loss16, _ = preference_loss(d16.pc, d16.pr, d16.rc, d16.rr, **kw)
        assert loss16.dtype == torch.float32 and torch.isfinite(loss16), loss_type


# ----------------------------------------------------------------------------------------------
# extremes, zero-length sequences, empty batches


def extreme_pairs(dtype, b=8, seed=12):
    g = torch.Generator().manual_seed(seed)
    pick = lambda: torch.where(torch.rand(b, generator=g) < 0.5, torch.tensor(-1e4), torch.tensor(0.0))  # noqa: E731
    pc, pr, rc, rr = pick(), pick(), pick(), pick()
    pc[0], pr[0], rc[0], rr[0] = -1e4, 0.0, 0.0, -1e4  # the most extreme pair both ways
    pc[1], pr[1], rc[1], rr[1] = 0.0, -1e4, -1e4, 0.0
    return SimpleNamespace(pc=pc.to(dtype).requires_grad_(True), pr=pr.to(dtype).requires_grad_(True),
                           rc=rc.to(dtype), rr=rr.to(dtype), lc=torch.full((b,), 7), lr=torch.full((b,), 5),
                           nll=torch.tensor(1e4, requires_grad=True))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("loss_type", DPO_LOSS_TYPES)
def test_dpo_extreme_logps(loss_type, dtype):
    d = extreme_pairs(dtype)
    kw = dict(loss_type=loss_type, label_smoothing=EPS.get(loss_type, 0.0), chosen_lengths=d.lc,
              rejected_lengths=d.lr, chosen_nll=d.nll if loss_type == "sft" else None)
    loss, metrics = preference_loss(d.pc, d.pr, d.rc, d.rr, **kw)
    g = torch.autograd.grad(loss, [d.pc, d.pr], allow_unused=True)
    assert torch.isfinite(loss)
    assert all(x is None or torch.isfinite(x).all() for x in g)
    assert all(torch.isfinite(v) for v in metrics.values())
    want, _ = ref_dpo(d.pc, d.pr, d.rc, d.rr, loss_types=(loss_type,), ls=EPS.get(loss_type, 0.0), lc=d.lc,
                      lr=d.lr, nll=d.nll)
    if torch.isfinite(want):  # TRL's DiscoPOP formula is inf * 0 = nan here; the stable form is not
        torch.testing.assert_close(loss.double(), want, rtol=1e-5, atol=1e-4)
        assert_grads(g, torch.autograd.grad(want, [d.pc, d.pr], allow_unused=True), dtype)


def test_discopop_stable_where_trl_overflows():
    # x = beta * d very negative: exp(-x) * sigmoid(x / tau) underflows to 0 in the stable form
    pc = torch.tensor([-1e4, -50.0], requires_grad=True)
    pr, rc, rr = torch.tensor([0.0, 0.0]), torch.tensor([0.0, 0.0]), torch.tensor([-1e4, 0.0])
    loss, _ = preference_loss(pc, pr, rc, rr, loss_type="discopop")
    x = 0.1 * (pc.detach().double() - rc.double() - (pr.double() - rr.double()))
    per = -F.logsigmoid(x) * torch.sigmoid(-x / 0.05) + torch.exp(F.logsigmoid(x / 0.05) - x)
    torch.testing.assert_close(loss.double(), per.mean(), rtol=1e-6, atol=1e-6)
    (g,) = torch.autograd.grad(loss, [pc])
    assert torch.isfinite(g).all()


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("loss_type", ["sigmoid", "ipo", "sigmoid_norm", "sppo_hard", "aot", "discopop", "sft"])
def test_dpo_zero_length_sequences(loss_type, dtype):
    d = make_pairs(3, dtype, seed=13, zero_len=True)
    kw = dict(loss_type=loss_type, label_smoothing=EPS.get(loss_type, 0.0))
    if loss_type == "sft":
        kw["chosen_nll"] = d.nll
    loss = check_dpo(d, dtype, **kw)
    assert torch.isfinite(loss)


def test_all_pairs_zero_length():
    z = torch.zeros(4, requires_grad=True)
    zl = torch.zeros(4, dtype=torch.long)
    for lt in DPO_LOSS_TYPES:
        loss, m = preference_loss(z, z, z.detach(), z.detach(), loss_type=lt, label_smoothing=EPS.get(lt, 0.0),
                                  chosen_lengths=zl, rejected_lengths=zl, chosen_nll=torch.tensor(0.0))
        assert torch.isfinite(loss), lt
        assert all(torch.isfinite(v) for v in m.values())


@pytest.mark.parametrize("loss_type", DPO_LOSS_TYPES)
def test_dpo_empty_batch(loss_type):
    e = torch.zeros(0, requires_grad=True)
    el = torch.zeros(0, dtype=torch.long)
    wpo = loss_type not in ("aot", "aot_unpaired")
    loss, m = preference_loss(e, e * 1, e.detach(), e.detach(), loss_type=loss_type,
                              label_smoothing=EPS.get(loss_type, 0.0), chosen_lengths=el, rejected_lengths=el,
                              chosen_nll=torch.zeros(0), use_weighting=wpo, wpo_weights=torch.zeros(0) if wpo else None)
    assert loss.dtype == torch.float32 and loss.dim() == 0 and loss == 0
    assert tuple(m) == PREFERENCE_METRICS and all(v == 0 for v in m.values())
    if loss.requires_grad:
        (g,) = torch.autograd.grad(loss, [e], allow_unused=True)
        assert g is None or g.shape == (0,)


def test_metric_keys_identical_across_loss_types():
    d = make_pairs(3, seed=14)
    keys = set()
    for lt in DPO_LOSS_TYPES:
        _, m = preference_loss(d.pc, d.pr, d.rc, d.rr, loss_type=lt, label_smoothing=EPS.get(lt, 0.0),
                               chosen_lengths=d.lc, rejected_lengths=d.lr, chosen_nll=d.nll)
        keys.add(tuple(m))
    for lt in ("sigmoid", "hinge", "ipo", "simpo"):
        _, m = cpo_loss(d.pc, d.pr, d.lc, d.lr, loss_type=lt, chosen_nll=d.nll)
        keys.add(tuple(m))
    keys.add(tuple(simpo_loss(d.pc, d.pr, d.lc, d.lr)[1]))
    assert keys == {PREFERENCE_METRICS}
    assert tuple(orpo_loss(d.pc, d.pr, d.lc, d.lr)[1]) == ORPO_METRICS
    for lt, kw in (("kto", dict(kl=0.1)), ("apo_zero_unpaired", {})):
        assert tuple(kto_loss(d.pc, d.pr, d.rc, d.rr, loss_type=lt, **kw)[1]) == KTO_METRICS


# ----------------------------------------------------------------------------------------------
# LD-DPO and WPO helpers


def ref_ld(tok, mask, other_len, alpha):
    """TRL 1.16 ld_alpha code (per-token log-probs are 0 outside the completion)."""
    tok = tok.double() * mask
    pos = mask.cumsum(1)
    shared = torch.minimum(mask.sum(1), other_len).unsqueeze(1)
    return (tok * ((pos > 0) & (pos <= shared))).sum(1) + alpha * (tok * (pos > shared)).sum(1)


@pytest.mark.parametrize("alpha", [0.0, 0.5, 1.0])
def test_ld_sequence_logps(alpha):
    g = torch.Generator().manual_seed(15)
    b, t = 5, 9
    tok_c = (-torch.rand(b, t, generator=g) * 3).requires_grad_(True)
    tok_r = (-torch.rand(b, t + 2, generator=g) * 3).requires_grad_(True)
    mc = torch.zeros(b, t, dtype=torch.long)
    mr = torch.zeros(b, t + 2, dtype=torch.long)
    for i, (s, n, m) in enumerate([(1, 3, 5), (0, 9, 2), (2, 0, 4), (3, 4, 0), (0, 0, 0)]):
        mc[i, s:s + n] = 1
        mr[i, 1:1 + m] = 1
    got_c, got_r = ld_sequence_logps(tok_c, tok_r, mc, mr, ld_alpha=alpha)
    want_c = ref_ld(tok_c, mc, mr.sum(1), alpha)
    want_r = ref_ld(tok_r, mr, mc.sum(1), alpha)
    torch.testing.assert_close(got_c.double(), want_c)
    torch.testing.assert_close(got_r.double(), want_r)
    gc = torch.autograd.grad(got_c.sum() + got_r.sum(), [tok_c, tok_r])
    wc = torch.autograd.grad(want_c.sum() + want_r.sum(), [tok_c, tok_r])
    for a, w in zip(gc, wc):
        torch.testing.assert_close(a, w)
    if alpha == 1.0:  # the plain sums
        torch.testing.assert_close(got_c, (tok_c * mc).sum(1))
    # -inf outside the completion contributes nothing
    tok_inf = tok_c.detach().masked_fill(mc == 0, float("-inf"))
    c_inf, _ = ld_sequence_logps(tok_inf, tok_r.detach(), mc, mr, ld_alpha=alpha)
    torch.testing.assert_close(c_inf, got_c.detach())


def test_wpo_log_weights():
    g = torch.Generator().manual_seed(16)
    tok = (-torch.rand(4, 6, generator=g) * 3).requires_grad_(True)
    lssp = -torch.rand(4, 6, generator=g)
    mask = torch.tensor([[1, 1, 1, 0, 0, 0], [0, 1, 1, 1, 1, 1], [0, 0, 0, 0, 0, 0], [1, 1, 1, 1, 1, 1]])
    got = wpo_log_weights(tok, lssp, mask.bool())
    want = ((tok.detach() - lssp) * mask).sum(1) / mask.sum(1).clamp_min(1)
    torch.testing.assert_close(got, want)
    assert not got.requires_grad


# ----------------------------------------------------------------------------------------------
# KTO


def make_kto(bc, br, bk, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed + 7 * bc + br)
    mk = lambda n: -(torch.rand(n, generator=g) * 40 + 1)  # noqa: E731
    pc, pr = mk(bc), mk(br)
    return SimpleNamespace(pc=pc.to(dtype).requires_grad_(True), pr=pr.to(dtype).requires_grad_(True),
                           rc=(pc + torch.randn(bc, generator=g) * 3).to(dtype),
                           rr=(pr + torch.randn(br, generator=g) * 3).to(dtype),
                           kp=mk(bk).to(dtype), g=g)


@pytest.mark.parametrize("sizes,shift", [((3, 5, 8), 2.0), ((1, 1, 2), -2.0), ((8, 0, 8), 2.0), ((0, 3, 3), 2.0)])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("loss_type", ["kto", "apo_zero_unpaired"])
def test_kto(loss_type, dtype, sizes, shift):  # shift: raw KL positive, or negative (clamped at 0)
    bc, br, bk = sizes
    d = make_kto(bc, br, bk, dtype)
    kr = (d.kp.float() - shift + torch.randn(bk, generator=d.g)).to(dtype)
    kw = dict(loss_type=loss_type, beta=0.2, desirable_weight=1.33, undesirable_weight=0.7)
    if loss_type == "kto":
        kw.update(policy_KL_logps=d.kp, ref_KL_logps=kr)
    loss, m = kto_loss(d.pc, d.pr, d.rc, d.rr, **kw)
    want, z = ref_kto(d.pc, d.pr, d.rc, d.rr, kl_p=d.kp, kl_r=kr, loss_type=loss_type, beta=0.2, dw=1.33, uw=0.7)
    torch.testing.assert_close(loss.double(), want, **VALUE_TOL)
    cr, rw = 0.2 * (d.pc.double() - d.rc.double()), 0.2 * (d.pr.double() - d.rr.double())
    mean = lambda x: x.sum() / max(x.numel(), 1)  # noqa: E731
    assert_metrics(m, {"kl": z, "rewards/chosen": mean(cr), "rewards/rejected": mean(rw),
                       "rewards/margins": mean(cr) - mean(rw), "logps/chosen": mean(d.pc.double()),
                       "logps/rejected": mean(d.pr.double())}, keys=KTO_METRICS)
    assert_grads(grads(loss, [d.pc, d.pr]), grads(want, [d.pc, d.pr]), dtype)
    if loss_type == "kto":  # the same with the KL point passed in
        loss2, m2 = kto_loss(d.pc, d.pr, d.rc, d.rr, kl=(d.kp.double() - kr.double()).mean().float(),
                             loss_type="kto", beta=0.2, desirable_weight=1.33, undesirable_weight=0.7)
        torch.testing.assert_close(loss2, loss, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(m2["kl"], m["kl"], rtol=1e-5, atol=1e-6)


def test_kto_kl_detached_and_clamped():
    d = make_kto(3, 3, 4)
    kp = d.kp.clone().requires_grad_(True)
    loss, m = kto_loss(d.pc, d.pr, d.rc, d.rr, policy_KL_logps=kp, ref_KL_logps=kp.detach() + 5.0)
    assert m["kl"] == 0  # negative raw KL clamps to 0
    assert torch.autograd.grad(loss, [kp], allow_unused=True)[0] is None
    loss, m = kto_loss(d.pc, d.pr, d.rc, d.rr, kl=torch.tensor(-1.0))
    assert m["kl"] == 0


def test_kto_empty_and_extreme():
    e = torch.zeros(0, requires_grad=True)
    loss, m = kto_loss(e, e * 1, e.detach(), e.detach(), policy_KL_logps=torch.zeros(0), ref_KL_logps=torch.zeros(0))
    assert loss == 0 and all(v == 0 for v in m.values()) and tuple(m) == KTO_METRICS
    x = torch.tensor([-1e4, 0.0, 0.0], requires_grad=True)
    y = torch.tensor([0.0, -1e4], requires_grad=True)
    loss, m = kto_loss(x, y, torch.tensor([0.0, -1e4, 0.0]), torch.tensor([-1e4, 0.0]),
                       policy_KL_logps=torch.tensor([0.0, -1e4]), ref_KL_logps=torch.tensor([-1e4, 0.0]))
    gx, gy = torch.autograd.grad(loss, [x, y])
    assert torch.isfinite(loss) and torch.isfinite(gx).all() and torch.isfinite(gy).all()
    assert all(torch.isfinite(v) for v in m.values())


# ----------------------------------------------------------------------------------------------
# CPO, SimPO, ORPO


@pytest.mark.parametrize("b,alpha", [(1, 0.0), (3, 0.25), (8, 0.0)])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("loss_type", ["sigmoid", "hinge", "ipo", "simpo"])
def test_cpo(loss_type, dtype, b, alpha):
    d = make_pairs(b, dtype, seed=20)
    kw = dict(loss_type=loss_type, beta=0.3, label_smoothing=0.1, cpo_alpha=0.6, simpo_gamma=0.4, alpha=alpha)
    loss, m = cpo_loss(d.pc, d.pr, d.lc, d.lr, chosen_nll=d.nll, **kw)
    avg = loss_type in ("ipo", "simpo")
    lc = d.pc.double() / d.lc.clamp(min=1) if avg else d.pc
    lr = d.pr.double() / d.lr.clamp(min=1) if avg else d.pr
    want, cr, rw = ref_cpo(lc, lr, loss_type=loss_type, beta=0.3, ls=0.1, gamma=0.4, alpha=alpha, cpo_alpha=0.6,
                           nll=d.nll)
    torch.testing.assert_close(loss.double(), want, **VALUE_TOL)
    assert_metrics(m, {"rewards/chosen": cr.mean(), "rewards/rejected": rw.mean(),
                       "rewards/accuracies": (cr > rw).double().mean(), "rewards/margins": (cr - rw).mean(),
                       "logps/chosen": lc.detach().double().mean(), "logps/rejected": lr.detach().double().mean(),
                       "nll_loss": d.nll.detach()})
    ins = [d.pc, d.pr, d.nll]
    assert_grads(grads(loss, ins), grads(want, ins), dtype)


@pytest.mark.parametrize("b", BATCHES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_simpo(dtype, b):
    d = make_pairs(b, dtype, seed=21, zero_len=True)
    loss, m = simpo_loss(d.pc, d.pr, d.lc, d.lr)
    lc, lr = d.pc.double() / d.lc.clamp(min=1), d.pr.double() / d.lr.clamp(min=1)
    x = 2.0 * (lc - lr) - 0.5  # SimPO paper Eq. (6), beta 2.0, gamma 0.5
    want = -F.logsigmoid(x).mean()
    torch.testing.assert_close(loss.double(), want, **VALUE_TOL)
    assert_grads(grads(loss, [d.pc, d.pr]), grads(want, [d.pc, d.pr]), dtype)
    torch.testing.assert_close(m["rewards/chosen"].double(), 2.0 * lc.detach().mean(), **VALUE_TOL)
    # with smoothing and an NLL term it is CPO's simpo
    a, ma = simpo_loss(d.pc, d.pr, d.lc, d.lr, beta=1.5, gamma=0.8, label_smoothing=0.2, sft_weight=0.4,
                       chosen_nll=d.nll_seq)
    c, mc = cpo_loss(d.pc, d.pr, d.lc, d.lr, loss_type="simpo", beta=1.5, simpo_gamma=0.8, label_smoothing=0.2,
                     cpo_alpha=0.4, chosen_nll=d.nll_seq)
    torch.testing.assert_close(a, c)
    assert all(torch.equal(ma[k], mc[k]) for k in ma)


@pytest.mark.parametrize("b,nll", [(1, "scalar"), (3, "none"), (8, "per_pair")])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_orpo(dtype, b, nll):
    d = make_pairs(b, dtype, seed=22)
    n = {"none": None, "scalar": d.nll, "per_pair": d.nll_seq}[nll]
    loss, m = orpo_loss(d.pc, d.pr, d.lc, d.lr, chosen_nll=n, beta=0.25)
    lc, lr = d.pc.double() / d.lc, d.pr.double() / d.lr
    want, ratio, log_odds = ref_orpo(lc, lr, beta=0.25, nll=n)
    torch.testing.assert_close(loss.double(), want, **VALUE_TOL)
    cr, rw = 0.25 * lc.detach(), 0.25 * lr.detach()
    assert_metrics(m, {"rewards/chosen": cr.mean(), "rewards/rejected": rw.mean(),
                       "rewards/accuracies": (cr > rw).double().mean(), "rewards/margins": (cr - rw).mean(),
                       "logps/chosen": lc.detach().mean(), "logps/rejected": lr.detach().mean(),
                       "nll_loss": 0.0 if n is None else n.detach().double().mean(),
                       "log_odds_ratio": ratio, "log_odds_chosen": log_odds}, keys=ORPO_METRICS,
                   tol=dict(rtol=1e-4, atol=1e-5))
    ins = [d.pc, d.pr] + ([n] if n is not None else [])
    assert_grads(grads(loss, ins), grads(want, ins), dtype)


def test_orpo_log_probs_at_zero_and_extremes():
    # zero-length completions and certain ones (avg log-prob 0): TRL's formula is -inf - -inf;
    # here the average is clamped to ORPO_MAX_AVG_LOGP inside log(1 - exp(.)), no gradient there
    pc = torch.tensor([0.0, 0.0, -1e4, -3.0, 0.0], requires_grad=True)
    pr = torch.tensor([0.0, -1e4, 0.0, -6.0, -1e-9], requires_grad=True)
    lens = torch.tensor([0, 5, 5, 3, 4])
    loss, m = orpo_loss(pc, pr, lens, lens, chosen_nll=torch.tensor(0.5))
    gc, gr = torch.autograd.grad(loss, [pc, pr])
    assert torch.isfinite(loss) and torch.isfinite(gc).all() and torch.isfinite(gr).all()
    assert all(torch.isfinite(v) for v in m.values())
    lc = (pc.detach().double() / lens.clamp(min=1)).clamp(max=ORPO_MAX_AVG_LOGP)
    lr = (pr.detach().double() / lens.clamp(min=1)).clamp(max=ORPO_MAX_AVG_LOGP)
    want, _, _ = ref_orpo(lc, lr, nll=torch.tensor(0.5))
    torch.testing.assert_close(loss.double(), want, rtol=1e-5, atol=1e-5)
    e = torch.zeros(0, requires_grad=True)
    loss, m = orpo_loss(e, e * 1, torch.zeros(0), torch.zeros(0))
    assert loss == 0 and all(v == 0 for v in m.values())


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_reference_free_extremes_and_zero_length(dtype):
    d = extreme_pairs(dtype)
    d.lc[2] = 0
    for fn, kw in ((cpo_loss, dict(loss_type="sigmoid", chosen_nll=d.nll)),
                   (cpo_loss, dict(loss_type="hinge", chosen_nll=d.nll)),
                   (cpo_loss, dict(loss_type="ipo", chosen_nll=d.nll)),
                   (cpo_loss, dict(loss_type="simpo", chosen_nll=d.nll)),
                   (simpo_loss, {}), (orpo_loss, dict(chosen_nll=d.nll))):
        loss, m = fn(d.pc, d.pr, d.lc, d.lr, **kw)
        g = torch.autograd.grad(loss, [d.pc, d.pr])
        assert torch.isfinite(loss) and all(torch.isfinite(x).all() for x in g), (fn.__name__, kw)
        assert all(torch.isfinite(v) for v in m.values())
    e = torch.zeros(0, requires_grad=True)
    for lt in ("sigmoid", "hinge", "ipo", "simpo"):
        loss, m = cpo_loss(e, e * 1, torch.zeros(0), torch.zeros(0), loss_type=lt, cpo_alpha=0.0)
        assert loss == 0 and all(v == 0 for v in m.values())


# ----------------------------------------------------------------------------------------------
# modules


def test_dpo_module_matches_function():
    d = make_pairs(8, seed=30)
    mod = DPOLoss(loss_type=["sigmoid", "ipo"], loss_weights=[1.0, 0.5], beta=0.2, use_weighting=True)
    a, ma = mod(d.pc, d.pr, d.rc, d.rr, chosen_lengths=d.lc, rejected_lengths=d.lr, chosen_wpo_logps=d.wc,
                rejected_wpo_logps=d.wr)
    b, mb = preference_loss(d.pc, d.pr, d.rc, d.rr, loss_type=["sigmoid", "ipo"], loss_weights=[1.0, 0.5], beta=0.2,
                            use_weighting=True, chosen_lengths=d.lc, rejected_lengths=d.lr, chosen_wpo_logps=d.wc,
                            rejected_wpo_logps=d.wr)
    torch.testing.assert_close(a, b)
    assert all(torch.equal(ma[k], mb[k]) for k in ma)
    assert "sigmoid" in repr(mod)


class RunningMomentsTRL:
    """TRL 0.x trl.trainer.utils.RunningMoments (single process), for the old bco_pair delta."""

    def __init__(self):
        self.mean, self.var, self.count = 0.0, 1.0, 1e-24

    def update(self, xs):
        xs_count = xs.numel()
        xs_var, xs_mean = torch.var_mean(xs, unbiased=False)
        delta = xs_mean.double().item() - self.mean
        tot = self.count + xs_count
        self.mean += delta * xs_count / tot
        self.count = tot


def test_dpo_module_bco_running_mean():
    mod = DPOLoss(loss_type="bco_pair", beta=0.1, bco_running_mean=True)
    rm = RunningMomentsTRL()
    for step in range(4):
        d = make_pairs(5, seed=31 + step)
        rewards = torch.cat((0.1 * (d.pc - d.rc), 0.1 * (d.pr - d.rr))).mean().detach()
        rm.update(rewards)
        loss, _ = mod(d.pc, d.pr, d.rc, d.rr)
        want, _ = ref_dpo(d.pc, d.pr, d.rc, d.rr, loss_types=("bco_pair",), bco_delta=rm.mean)
        torch.testing.assert_close(loss.double(), want, **VALUE_TOL)
        assert_grads(grads(loss, [d.pc, d.pr]), grads(want, [d.pc, d.pr]), torch.float32)
    assert int(mod.bco_steps) == 4 and "bco_reward_mean" in mod.state_dict()
    mod.eval()  # evaluation uses the state without moving it
    before = mod.bco_reward_mean.clone()
    d = make_pairs(5, seed=40)
    loss, _ = mod(d.pc, d.pr, d.rc, d.rr)
    want, _ = ref_dpo(d.pc, d.pr, d.rc, d.rr, loss_types=("bco_pair",), bco_delta=float(before))
    torch.testing.assert_close(loss.double(), want, **VALUE_TOL)
    assert torch.equal(mod.bco_reward_mean, before) and int(mod.bco_steps) == 4
    mod.train()  # a batch that fails validation leaves the state alone
    with pytest.raises(ValueError, match="rejected_logps"):
        mod(d.pc, d.pr[:3], d.rc, d.rr)
    assert int(mod.bco_steps) == 4
    with pytest.raises(ValueError, match="bco_delta"):
        mod(d.pc, d.pr, d.rc, d.rr, bco_delta=0.1)


def test_other_modules_match_functions():
    d = make_pairs(6, seed=32)
    pairs = [
        (SimPOLoss(beta=2.5, gamma=1.0)(d.pc, d.pr, d.lc, d.lr),
         simpo_loss(d.pc, d.pr, d.lc, d.lr, beta=2.5, gamma=1.0)),
        (CPOLoss(loss_type="ipo", cpo_alpha=0.5)(d.pc, d.pr, d.lc, d.lr, chosen_nll=d.nll),
         cpo_loss(d.pc, d.pr, d.lc, d.lr, loss_type="ipo", cpo_alpha=0.5, chosen_nll=d.nll)),
        (ORPOLoss(beta=0.3)(d.pc, d.pr, d.lc, d.lr, chosen_nll=d.nll),
         orpo_loss(d.pc, d.pr, d.lc, d.lr, beta=0.3, chosen_nll=d.nll)),
        (KTOLoss(beta=0.2, desirable_weight=2.0)(d.pc, d.pr, d.rc, d.rr, kl=0.3),
         kto_loss(d.pc, d.pr, d.rc, d.rr, beta=0.2, desirable_weight=2.0, kl=0.3)),
    ]
    for (a, ma), (b, mb) in pairs:
        torch.testing.assert_close(a, b)
        assert ma.keys() == mb.keys() and all(torch.equal(ma[k], mb[k]) for k in ma)


def test_module_constructors_validate():
    with pytest.raises(ValueError, match="beta"):
        DPOLoss(beta=0.0)
    with pytest.raises(ValueError, match="loss_type"):
        DPOLoss(loss_type="nope")
    with pytest.raises(ValueError, match="bco_running_mean"):
        DPOLoss(loss_type="sigmoid", bco_running_mean=True)
    with pytest.raises(ValueError, match="beta"):
        SimPOLoss(beta=-1)
    with pytest.raises(ValueError, match="loss_type"):
        CPOLoss(loss_type="kto")
    with pytest.raises(ValueError, match="beta"):
        ORPOLoss(beta=0)
    with pytest.raises(ValueError, match="desirable_weight"):
        KTOLoss(desirable_weight=-1.0)


# ----------------------------------------------------------------------------------------------
# validation errors name the argument


def _v():
    return make_pairs(4, seed=50)


@pytest.mark.parametrize("call,exc,match", [
    (lambda d: preference_loss(d.pc, d.pr[:3], d.rc, d.rr), ValueError, r"rejected_logps.*\(4,\).*chosen_logps"),
    (lambda d: preference_loss(d.pc, d.pr, d.rc[:2], d.rr), ValueError, r"ref_chosen_logps.*chosen_logps"),
    (lambda d: preference_loss(d.pc, d.pr, d.rc, d.rr[:1]), ValueError, r"ref_rejected_logps.*chosen_logps"),
    (lambda d: preference_loss(d.pc, d.pr, d.rc, d.rr, loss_type="ipo", chosen_lengths=d.lc[:3],
                               rejected_lengths=d.lr), ValueError, r"chosen_lengths.*chosen_logps"),
    (lambda d: preference_loss(d.pc.view(2, 2), d.pr, d.rc, d.rr), ValueError, r"chosen_logps.*1-D"),
    (lambda d: preference_loss(d.lc, d.pr, d.rc, d.rr), TypeError, r"chosen_logps.*float"),
    (lambda d: preference_loss([1.0], d.pr, d.rc, d.rr), TypeError, r"chosen_logps.*torch.Tensor"),
    (lambda d: preference_loss(d.pc, d.pr, d.rc, d.rr, beta=0.0), ValueError, r"beta.*> 0"),
    (lambda d: preference_loss(d.pc, d.pr, d.rc, d.rr, beta=-0.1), ValueError, r"beta"),
    (lambda d: preference_loss(d.pc, d.pr, d.rc, d.rr, beta=float("nan")), ValueError, r"beta"),
    (lambda d: preference_loss(d.pc, d.pr), ValueError, r"ref_chosen_logps.*'sigmoid'"),
    (lambda d: preference_loss(d.pc, d.pr, loss_type=["sft", "hinge"], chosen_nll=d.nll), ValueError,
     r"ref_chosen_logps.*'hinge'"),
    (lambda d: preference_loss(d.pc, d.pr, d.rc, None), ValueError, r"ref_rejected_logps.*'sigmoid'"),
    (lambda d: preference_loss(d.pc, d.pr, d.rc, d.rr, reference_free=True), ValueError,
     r"ref_chosen_logps.*reference_free"),
    (lambda d: preference_loss(d.pc, d.pr, d.rc, d.rr, loss_type="dpo"), ValueError,
     r"loss_type.*'sigmoid', 'hinge', 'ipo'.*'dpo'"),
    (lambda d: preference_loss(d.pc, d.pr, d.rc, d.rr, loss_type=[]), ValueError, r"loss_type"),
    (lambda d: preference_loss(d.pc, d.pr, d.rc, d.rr, loss_type=["sigmoid", "ipo"], loss_weights=[1.0],
                               chosen_lengths=d.lc, rejected_lengths=d.lr), ValueError,
     r"loss_weights.*2 weight.*got 1"),
    (lambda d: preference_loss(d.pc, d.pr, d.rc, d.rr, loss_weights=[1.0, 2.0]), ValueError, r"loss_weights"),
    (lambda d: preference_loss(d.pc, d.pr, d.rc, d.rr, loss_weights=0.5), TypeError, r"loss_weights"),
    (lambda d: preference_loss(d.pc, d.pr, d.rc, d.rr, loss_weights=[float("inf")]), ValueError,
     r"loss_weights"),
    (lambda d: preference_loss(d.pc, d.pr, d.rc, d.rr, loss_type="ipo"), ValueError, r"chosen_lengths.*'ipo'"),
    (lambda d: preference_loss(d.pc, d.pr, d.rc, d.rr, loss_type="sigmoid_norm", chosen_lengths=d.lc),
     ValueError, r"rejected_lengths.*'sigmoid_norm'"),
    (lambda d: preference_loss(d.pc, d.pr, d.rc, d.rr, loss_type="ipo", chosen_lengths=d.lc.bool(),
                               rejected_lengths=d.lr), TypeError, r"chosen_lengths"),
    (lambda d: preference_loss(d.pc, d.pr, d.rc, d.rr, loss_type="sft"), ValueError, r"chosen_nll.*'sft'"),
    (lambda d: preference_loss(d.pc, d.pr, d.rc, d.rr, rpo_alpha=1.0), ValueError, r"chosen_nll.*rpo_alpha"),
    (lambda d: preference_loss(d.pc, d.pr, d.rc, d.rr, rpo_alpha=1.0, chosen_nll=d.nll_seq[:2]), ValueError,
     r"chosen_nll.*\(4,\)"),
    (lambda d: preference_loss(d.pc, d.pr, d.rc, d.rr, use_weighting=True), ValueError,
     r"chosen_wpo_logps.*use_weighting"),
    (lambda d: preference_loss(d.pc, d.pr, d.rc, d.rr, use_weighting=True, chosen_wpo_logps=d.wc), ValueError,
     r"rejected_wpo_logps"),
    (lambda d: preference_loss(d.pc, d.pr, d.rc, d.rr, use_weighting=True, wpo_weights=d.wc, chosen_wpo_logps=d.wc,
                               rejected_wpo_logps=d.wr), ValueError, r"wpo_weights.*both"),
    (lambda d: preference_loss(d.pc, d.pr, d.rc, d.rr, wpo_weights=d.wc), ValueError, r"wpo_weights.*use_weighting"),
    (lambda d: preference_loss(d.pc, d.pr, d.rc, d.rr, use_weighting=True, wpo_weights=d.wc[:1]), ValueError,
     r"wpo_weights.*chosen_logps"),
    (lambda d: preference_loss(d.pc, d.pr, d.rc, d.rr, loss_type="aot", use_weighting=True, wpo_weights=d.wc),
     ValueError, r"use_weighting.*'aot'"),
    (lambda d: preference_loss(d.pc, d.pr, d.rc, d.rr, loss_type="nca_pair", f_divergence_type="forward_kl"),
     ValueError, r"f_divergence_type.*nca_pair"),
    (lambda d: preference_loss(d.pc, d.pr, d.rc, d.rr, f_divergence_type="kl"), ValueError,
     r"f_divergence_type.*reverse_kl"),
    (lambda d: preference_loss(d.pc, d.pr, d.rc, d.rr, f_alpha_divergence_coef=float("nan")), ValueError,
     r"f_alpha_divergence_coef"),
    (lambda d: preference_loss(d.pc, d.pr, d.rc, d.rr, loss_type="robust", label_smoothing=0.5), ValueError,
     r"label_smoothing.*'robust'"),
    (lambda d: preference_loss(d.pc, d.pr, d.rc, d.rr, loss_type="exo_pair"), ValueError,
     r"label_smoothing.*'exo_pair'"),
    (lambda d: preference_loss(d.pc, d.pr, d.rc, d.rr, label_smoothing=1.5), ValueError, r"label_smoothing"),
    (lambda d: preference_loss(d.pc, d.pr, d.rc, d.rr, discopop_tau=0.0), ValueError, r"discopop_tau"),
    (lambda d: preference_loss(d.pc, d.pr, d.rc, d.rr, rpo_alpha=float("inf"), chosen_nll=d.nll), ValueError,
     r"rpo_alpha"),
    (lambda d: preference_loss(d.pc, d.pr, d.rc, d.rr, loss_type="bco_pair", bco_delta=torch.zeros(2)),
     ValueError, r"bco_delta"),
    (lambda d: preference_loss(d.pc, d.pr, d.rc, d.rr, loss_type="bco_pair", bco_delta=float("nan")),
     ValueError, r"bco_delta"),
    # KTO
    (lambda d: kto_loss(d.pc, d.pr, d.rc[:3], d.rr, kl=0.0), ValueError, r"ref_chosen_logps.*chosen_logps"),
    (lambda d: kto_loss(d.pc, d.pr, d.rc, d.rr[:3], kl=0.0), ValueError, r"ref_rejected_logps.*rejected_logps"),
    (lambda d: kto_loss(d.pc, d.pr, None, d.rr, kl=0.0), ValueError, r"ref_chosen_logps.*'kto'"),
    (lambda d: kto_loss(d.pc, d.pr, d.rc, d.rr), ValueError, r"policy_KL_logps.*'kto'"),
    (lambda d: kto_loss(d.pc, d.pr, d.rc, d.rr, policy_KL_logps=d.pc), ValueError, r"ref_KL_logps"),
    (lambda d: kto_loss(d.pc, d.pr, d.rc, d.rr, policy_KL_logps=d.pc, ref_KL_logps=d.rc[:2]), ValueError,
     r"ref_KL_logps.*policy_KL_logps"),
    (lambda d: kto_loss(d.pc, d.pr, d.rc, d.rr, kl=0.1, policy_KL_logps=d.pc, ref_KL_logps=d.rc), ValueError,
     r"kl.*both"),
    (lambda d: kto_loss(d.pc, d.pr, d.rc, d.rr, loss_type="apo_zero_unpaired", kl=0.1), ValueError,
     r"kl.*apo_zero_unpaired"),
    (lambda d: kto_loss(d.pc, d.pr, d.rc, d.rr, kl=0.0, beta=0), ValueError, r"beta"),
    (lambda d: kto_loss(d.pc, d.pr, d.rc, d.rr, kl=0.0, loss_type="sigmoid"), ValueError,
     r"loss_type.*'kto', 'apo_zero_unpaired'"),
    (lambda d: kto_loss(d.pc, d.pr, d.rc, d.rr, kl=0.0, undesirable_weight=-1), ValueError, r"undesirable_weight"),
    (lambda d: kto_loss(d.pc, d.pr, d.rc, d.rr, kl=torch.zeros(3)), ValueError, r"kl"),
    # CPO / SimPO / ORPO
    (lambda d: cpo_loss(d.pc, d.pr[:2], chosen_nll=d.nll), ValueError, r"rejected_logps.*chosen_logps"),
    (lambda d: cpo_loss(d.pc, d.pr), ValueError, r"chosen_nll.*cpo_alpha"),
    (lambda d: cpo_loss(d.pc, d.pr, loss_type="simpo", chosen_nll=d.nll), ValueError, r"chosen_lengths.*'simpo'"),
    (lambda d: cpo_loss(d.pc, d.pr, d.lc, d.lr[:1], loss_type="ipo", chosen_nll=d.nll), ValueError,
     r"rejected_lengths.*chosen_logps"),
    (lambda d: cpo_loss(d.pc, d.pr, chosen_nll=d.nll, beta=0.0), ValueError, r"beta"),
    (lambda d: cpo_loss(d.pc, d.pr, chosen_nll=d.nll, loss_type="orpo"), ValueError,
     r"loss_type.*'sigmoid', 'hinge', 'ipo', 'simpo'"),
    (lambda d: cpo_loss(d.pc, d.pr, chosen_nll=d.nll, alpha=float("nan")), ValueError, r"alpha"),
    (lambda d: simpo_loss(d.pc, d.pr, d.lc, d.lr, beta=0.0), ValueError, r"beta"),
    (lambda d: simpo_loss(d.pc, d.pr, d.lc, d.lr, sft_weight=1.0), ValueError, r"chosen_nll.*sft_weight"),
    (lambda d: simpo_loss(d.pc, d.pr, None, d.lr), ValueError, r"chosen_lengths"),
    (lambda d: simpo_loss(d.pc, d.pr, d.lc, d.lr, label_smoothing=-0.1), ValueError, r"label_smoothing"),
    (lambda d: orpo_loss(d.pc, d.pr, d.lc, d.lr, beta=-1.0), ValueError, r"beta"),
    (lambda d: orpo_loss(d.pc, d.pr[:3], d.lc, d.lr), ValueError, r"rejected_logps.*chosen_logps"),
    (lambda d: orpo_loss(d.pc, d.pr, d.lc[:3], d.lr), ValueError, r"chosen_lengths.*chosen_logps"),
    (lambda d: orpo_loss(d.pc, d.pr, d.lc, d.lr, chosen_nll=torch.zeros(2, 2)), ValueError, r"chosen_nll"),
    # helpers
    (lambda d: ld_sequence_logps(d.pc.view(4, 1), d.pr.view(4, 1), d.lc.view(4, 1) > 0, d.lr.view(4, 1) > 0,
                                 ld_alpha=1.5), ValueError, r"ld_alpha"),
    (lambda d: ld_sequence_logps(d.pc.view(4, 1), d.pr.view(4, 1), d.lc.view(2, 2) > 0, d.lr.view(4, 1) > 0,
                                 ld_alpha=0.5), ValueError, r"chosen_mask.*chosen_token_logps"),
    (lambda d: ld_sequence_logps(d.pc.view(4, 1), d.pr.view(2, 2), d.lc.view(4, 1) > 0, d.lr.view(2, 2) > 0,
                                 ld_alpha=0.5), ValueError, r"rejected_token_logps.*chosen_token_logps"),
    (lambda d: ld_sequence_logps(d.pc.view(4, 1), d.pr.view(4, 1), d.pc.view(4, 1), d.lr.view(4, 1) > 0,
                                 ld_alpha=0.5), TypeError, r"chosen_mask"),
    (lambda d: wpo_log_weights(d.pc.view(2, 2), d.pr.view(4, 1), d.lc.view(2, 2) > 0), ValueError,
     r"log_sum_sq_probs.*token_logps"),
    (lambda d: wpo_log_weights(d.pc.view(2, 2), d.pr.view(2, 2), d.lc.view(4, 1) > 0), ValueError,
     r"mask.*token_logps"),
])
def test_validation_errors(call, exc, match):
    with pytest.raises(exc, match=match):
        call(_v())


def test_no_host_sync_in_loss_code():
    root = Path(__file__).resolve().parents[1] / "python" / "posttrain_kernels"
    for rel in ("api/preference.py", "api/preference_free.py", "modules/preference.py"):
        src = (root / rel).read_text()
        assert not re.search(r"\.item\(\)|\.tolist\(\)|\.cpu\(\)", src), rel


# ----------------------------------------------------------------------------------------------
# parity with TRL itself


@pytest.fixture(scope="module")
def trl():
    pytest.importorskip("trl")
    dpo = pytest.importorskip("trl.trainer.dpo_trainer")
    kto = pytest.importorskip("trl.trainer.kto_trainer")
    cpo = pytest.importorskip("trl.experimental.cpo.cpo_trainer")
    orpo = pytest.importorskip("trl.experimental.orpo.orpo_trainer")
    return SimpleNamespace(DPOTrainer=dpo.DPOTrainer, KTOTrainer=kto.KTOTrainer, CPOTrainer=cpo.CPOTrainer,
                           ORPOTrainer=orpo.ORPOTrainer)


class FakeModel:
    """Stands in for the policy with TRL's fused LM head: returns given per-token outputs."""

    training = True

    def __init__(self, outputs, kl_outputs=None, kl_input_ids=None):
        self.outputs, self.kl_outputs, self.kl_input_ids = outputs, kl_outputs, kl_input_ids

    def __call__(self, **kwargs):
        if self.kl_input_ids is not None and kwargs["input_ids"] is self.kl_input_ids:
            return self.kl_outputs
        return self.outputs


ACCEL = SimpleNamespace(device=torch.device("cpu"), gather_for_metrics=lambda x: x, gather=lambda x: x)


def _fake_trainer(cls, model, **attrs):
    tr = object.__new__(cls)
    tr.__dict__.update(model=model, accelerator=ACCEL, aux_loss_enabled=False, _tp_size=1, _total_train_tokens=0,
                       _metrics={"train": defaultdict(list), "eval": defaultdict(list)}, **attrs)
    return tr


def token_batch(n, t, dtype=torch.float32, seed=0, zero_len=False):
    """Per-token log-probs (leaf, (n, t)) with a completion mask: TRL's layout, where the
    completion_mask of the input_ids is (n, t + 1) and the log-probs line up with its [:, 1:]."""
    g = torch.Generator().manual_seed(seed)
    cm = torch.zeros(n, t + 1, dtype=torch.long)
    for i in range(n):
        start = int(torch.randint(1, 4, (), generator=g))
        length = 0 if (zero_len and i == 0) else int(torch.randint(1, t + 1 - start + 1, (), generator=g))
        cm[i, start:start + length] = 1
    tok = (-torch.rand(n, t, generator=g) * 3).to(dtype).requires_grad_(True)
    return tok, cm, g


def run_trl_dpo(trl, tok, cm, ref_c, ref_r, *, loss_types, loss_weights=None, beta=0.1, ls=0.0,
                f_type="reverse_kl", coef=0.5, use_weighting=False, ld_alpha=None, tau=0.05, lssp=None):
    n, t = tok.shape
    sm = cm[:, 1:]
    outputs = SimpleNamespace(log_probs=tok * sm, entropy=torch.rand(n, t), mean_logits=torch.randn(n, t),
                              is_top1=torch.rand(n, t) > 0.5, log_sum_sq_probs=lssp)
    model = FakeModel(outputs)
    tr = _fake_trainer(trl.DPOTrainer, model, ld_alpha=ld_alpha, precompute_ref_logps=True, f_divergence_type=f_type,
                       f_alpha_divergence_coef=coef, loss_types=list(loss_types),
                       loss_weights=loss_weights or [1.0] * len(loss_types), beta=beta, label_smoothing=ls,
                       use_weighting=use_weighting, args=SimpleNamespace(discopop_tau=tau))
    inputs = dict(input_ids=torch.randint(0, 50, (n, t + 1)), attention_mask=torch.ones(n, t + 1, dtype=torch.long),
                  completion_mask=cm, ref_chosen_logps=ref_c, ref_rejected_logps=ref_r)
    loss = trl.DPOTrainer._compute_loss(tr, model, inputs, False)
    return loss, {k: v[-1] for k, v in tr._metrics["train"].items()}


def ours_dpo(tok, cm, ref_c, ref_r, *, ld_alpha=None, lssp=None, **kw):
    b = tok.shape[0] // 2
    sm = cm[:, 1:]
    if ld_alpha is None:
        seq = (tok * sm).sum(1)
        c, r = seq[:b], seq[b:]
    else:
        c, r = ld_sequence_logps(tok[:b], tok[b:], sm[:b], sm[b:], ld_alpha=ld_alpha)
    lens = cm.sum(1)
    if kw.get("use_weighting"):
        w = wpo_log_weights(tok, lssp, sm)
        kw.update(chosen_wpo_logps=w[:b], rejected_wpo_logps=w[b:])
    if "sft" in kw.get("loss_type", ()):
        kw["chosen_nll"] = -tok[:b][sm[:b].bool()].mean()
    return preference_loss(c, r, ref_c, ref_r, chosen_lengths=lens[:b], rejected_lengths=lens[b:], **kw)


def check_trl_dpo(trl, b, *, dtype=torch.float32, zero_len=False, seed=0, trl_kw=None, check_grad=True, **kw):
    tok, cm, g = token_batch(2 * b, 9, dtype, seed=seed, zero_len=zero_len)
    ref = (tok.detach().float() * cm[:, 1:]).sum(1) + torch.randn(2 * b, generator=g) * 2
    ref_c, ref_r = ref[:b].to(dtype), ref[b:].to(dtype)
    lssp = -torch.rand(tok.shape, generator=g) if kw.get("use_weighting") else None
    trl_kw = dict(trl_kw or {})
    want, want_m = run_trl_dpo(trl, tok, cm, ref_c, ref_r, lssp=lssp, **trl_kw)
    got, got_m = ours_dpo(tok, cm, ref_c, ref_r, lssp=lssp, ld_alpha=trl_kw.get("ld_alpha"), **kw)
    tol = VALUE_TOL if dtype == torch.float32 else dict(rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(got, want.float(), **tol)
    for k in ("rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins", "logps/chosen",
              "logps/rejected"):
        torch.testing.assert_close(got_m[k].double(), torch.tensor(want_m[k]).double(), **tol, msg=k)
    if not check_grad:
        return
    (g_got,) = torch.autograd.grad(got, [tok])
    (g_want,) = torch.autograd.grad(want, [tok])
    torch.testing.assert_close(g_got, g_want, **(GRAD_TOL[dtype] if dtype == torch.float32
                                                 else dict(rtol=3e-2, atol=1e-3)))


@pytest.mark.parametrize("b", [1, 3])
@pytest.mark.parametrize("loss_type", DPO_LOSS_TYPES)
def test_trl_parity_dpo_loss_types(trl, loss_type, b):
    eps = EPS.get(loss_type, 0.0)
    check_trl_dpo(trl, b, seed=b, loss_type=loss_type, label_smoothing=eps,
                  trl_kw=dict(loss_types=[loss_type], ls=eps))


@pytest.mark.parametrize("loss_type", ["sigmoid", "ipo", "sigmoid_norm", "sppo_hard"])
def test_trl_parity_dpo_zero_length_and_bf16(trl, loss_type):
    check_trl_dpo(trl, 3, zero_len=True, seed=5, loss_type=loss_type, trl_kw=dict(loss_types=[loss_type]))
    check_trl_dpo(trl, 3, dtype=torch.bfloat16, seed=6, loss_type=loss_type, trl_kw=dict(loss_types=[loss_type]))


@pytest.mark.parametrize("f_type,coef", [("forward_kl", 0.5), ("js_divergence", 0.5), ("alpha_divergence", 0.3),
                                         ("alpha_divergence", 1.0)])
@pytest.mark.parametrize("loss_type", ["sigmoid", "ipo", "robust", "discopop"])
def test_trl_parity_dpo_f_divergence(trl, loss_type, f_type, coef):
    eps = EPS.get(loss_type, 0.0)
    check_trl_dpo(trl, 3, seed=7, loss_type=loss_type, label_smoothing=eps, f_divergence_type=f_type,
                  f_alpha_divergence_coef=coef,
                  trl_kw=dict(loss_types=[loss_type], ls=eps, f_type=f_type, coef=coef))


@pytest.mark.parametrize("loss_type", ["sigmoid", "hinge", "ipo", "apo_down"])
def test_trl_parity_dpo_wpo(trl, loss_type):
    # TRL 1.16's use_weighting multiplies the per-sequence loss in place: with "hinge" the relu output
    # cannot backpropagate ("modified by an inplace operation"), so values only there; with "sft" (an
    # expanded scalar) the forward itself raises, so it is not compared (test_dpo_wpo_weighting covers it)
    check_trl_dpo(trl, 3, seed=8, loss_type=loss_type, use_weighting=True, check_grad=loss_type != "hinge",
                  trl_kw=dict(loss_types=[loss_type], use_weighting=True))


@pytest.mark.parametrize("ld_alpha", [0.0, 0.4, 1.0])
def test_trl_parity_dpo_ld_alpha(trl, ld_alpha):
    check_trl_dpo(trl, 4, seed=9, zero_len=True, loss_type="sigmoid",
                  trl_kw=dict(loss_types=["sigmoid"], ld_alpha=ld_alpha))


def test_trl_parity_dpo_multi_loss(trl):
    types, weights = ["sigmoid", "bco_pair", "sft"], [0.8, 0.2, 1.0]
    check_trl_dpo(trl, 3, seed=10, loss_type=types, loss_weights=weights,
                  trl_kw=dict(loss_types=types, loss_weights=weights, beta=0.3), beta=0.3)
    types, weights = ["ipo", "aot", "exo_pair"], [1.0, 0.5, 2.0]
    check_trl_dpo(trl, 3, seed=11, loss_type=types, loss_weights=weights, label_smoothing=1e-3,
                  trl_kw=dict(loss_types=types, loss_weights=weights, ls=1e-3))


@pytest.mark.parametrize("labels", [[1, 0, 1, 1, 0], [1, 1, 1], [0, 0], [1, 0]])
@pytest.mark.parametrize("loss_type", ["kto", "apo_zero_unpaired"])
def test_trl_parity_kto(trl, loss_type, labels):
    n, t = len(labels), 8
    tok, cm, g = token_batch(n, t, seed=20 + n)
    kl_tok, kl_cm, _ = token_batch(n, t, seed=40 + n)
    kl_tok = kl_tok.detach()
    calc = loss_type == "kto"
    sm, kl_sm = cm[:, 1:], kl_cm[:, 1:]
    ref = (tok.detach() * sm).sum(1) + torch.randn(n, generator=g) * 2
    ref_kl = (kl_tok * kl_sm).sum(1) + torch.randn(n, generator=g) - 0.5
    kl_ids = torch.randint(0, 50, (n, t + 1))
    outputs = SimpleNamespace(log_probs=tok * sm, entropy=torch.rand(n, t), mean_logits=torch.randn(n, t))
    model = FakeModel(outputs, SimpleNamespace(log_probs=kl_tok * kl_sm), kl_ids)
    tr = _fake_trainer(trl.KTOTrainer, model, loss_type=loss_type, beta=0.15, desirable_weight=1.2,
                       undesirable_weight=0.8, calculate_KL=calc, precompute_ref_logps=True)
    lab = torch.tensor(labels)
    batch = dict(label=lab, input_ids=torch.randint(0, 50, (n, t + 1)), attention_mask=torch.ones(n, t + 1),
                 completion_mask=cm, KL_input_ids=kl_ids, KL_attention_mask=torch.ones(n, t + 1),
                 KL_completion_mask=kl_cm, ref_logps=ref, ref_KL_logps=ref_kl)
    want = trl.KTOTrainer._compute_loss(tr, model, batch, False)
    want_m = {k: v[-1] for k, v in tr._metrics["train"].items()}
    seq = (tok * sm).sum(1)
    keep, drop = lab.bool(), ~lab.bool()
    kw = dict(policy_KL_logps=(kl_tok * kl_sm).sum(1), ref_KL_logps=ref_kl) if calc else {}
    got, got_m = kto_loss(seq[keep], seq[drop], ref[keep], ref[drop], loss_type=loss_type, beta=0.15,
                          desirable_weight=1.2, undesirable_weight=0.8, **kw)
    torch.testing.assert_close(got, want, **VALUE_TOL)
    for k in KTO_METRICS:
        if k in want_m:  # TRL leaves out a mean over an empty set
            torch.testing.assert_close(got_m[k].double(), torch.tensor(want_m[k]).double(), **VALUE_TOL, msg=k)
    torch.testing.assert_close(torch.autograd.grad(got, [tok], retain_graph=True)[0],
                               torch.autograd.grad(want, [tok])[0], **GRAD_TOL[torch.float32])


def _pair_outputs(b, seed):
    tok, cm, g = token_batch(2 * b, 10, seed=seed)
    sm = cm[:, 1:]
    seq, lens = (tok * sm).sum(1), sm.sum(1)
    nll = -tok[:b][sm[:b].bool()].mean()
    return tok, seq, lens, nll


@pytest.mark.parametrize("alpha", [0.0, 0.3])
@pytest.mark.parametrize("loss_type", ["sigmoid", "hinge", "ipo", "simpo"])
def test_trl_parity_cpo(trl, loss_type, alpha):
    b = 3
    tok, seq, lens, nll = _pair_outputs(b, seed=60)
    avg = loss_type in ("ipo", "simpo")
    trl_logps = seq / lens if avg else seq  # TRL's get_batch_logps(average_log_prob=...)
    cfg = dict(loss_type=loss_type, beta=0.2, label_smoothing=0.1, simpo_gamma=0.7, alpha=alpha, cpo_alpha=0.5)
    tr = _fake_trainer(trl.CPOTrainer, None, **cfg)
    tr.concatenated_forward = lambda model, batch: (trl_logps[:b], trl_logps[b:], torch.zeros(b, 2, 5),
                                                    torch.zeros(b, 2, 5), nll)
    want, want_m = tr.get_batch_loss_metrics(None, {})
    got, got_m = cpo_loss(seq[:b], seq[b:], lens[:b], lens[b:], chosen_nll=nll, **cfg)
    torch.testing.assert_close(got, want, **VALUE_TOL)
    for k in PREFERENCE_METRICS:
        torch.testing.assert_close(got_m[k].double(), torch.tensor(want_m[k]).double(), **VALUE_TOL, msg=k)
    torch.testing.assert_close(torch.autograd.grad(got, [tok], retain_graph=True)[0],
                               torch.autograd.grad(want, [tok])[0], **GRAD_TOL[torch.float32])
    if loss_type == "simpo" and alpha == 0.0:
        got_s, _ = simpo_loss(seq[:b], seq[b:], lens[:b], lens[b:], beta=0.2, gamma=0.7, label_smoothing=0.1,
                              sft_weight=0.5, chosen_nll=nll)
        torch.testing.assert_close(got_s, want, **VALUE_TOL)


def test_trl_parity_orpo(trl):
    b = 4
    tok, seq, lens, nll = _pair_outputs(b, seed=70)
    avg = seq / lens
    tr = _fake_trainer(trl.ORPOTrainer, None, beta=0.25)
    tr.concatenated_forward = lambda model, batch: (avg[:b], avg[b:], torch.zeros(b, 2, 5), torch.zeros(b, 2, 5), nll)
    want, want_m = tr.get_batch_loss_metrics(None, {})
    got, got_m = orpo_loss(seq[:b], seq[b:], lens[:b], lens[b:], chosen_nll=nll, beta=0.25)
    torch.testing.assert_close(got, want, **VALUE_TOL)
    for k in ORPO_METRICS:
        torch.testing.assert_close(got_m[k].double(), torch.tensor(want_m[k]).double(), **VALUE_TOL, msg=k)
    torch.testing.assert_close(torch.autograd.grad(got, [tok], retain_graph=True)[0],
                               torch.autograd.grad(want, [tok])[0], **GRAD_TOL[torch.float32])
