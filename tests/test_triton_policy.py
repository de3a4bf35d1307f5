"""The fused policy loss (Triton kernels of ``kernels/policy.py`` behind the custom ops of
``posttrain_kernels.ops.policy``) against the PyTorch path of ``policy_loss``: the loss, every
metric and the gradients w.r.t. ``logps`` and ``entropy``, for each loss type (token- and
sequence-level) and option (off-policy mask, entropy quantile, importance_sampling_ratio, ...).

Without a GPU the kernels run on CPU tensors under TRITON_INTERPRET=1 (``backend="triton"``); with
one, on CUDA tensors. Shapes are small (the interpreter runs every tile in numpy). Both paths do
their math in fp32 from the same (upcast) inputs, so they agree to fp32 rounding (different
summation orders); bf16 gradients, rounded to bf16 by both, to one bf16 ulp.
"""
import math
import os

import pytest
import torch

HAS_CUDA = torch.cuda.is_available()
if not HAS_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before the kernels are first imported

triton = pytest.importorskip("triton")

from posttrain_kernels.api.policy import POLICY_METRIC_KEYS, policy_loss  # noqa: E402
from posttrain_kernels.modules.policy import PolicyLoss  # noqa: E402
from posttrain_kernels.ops import policy as policy_ops  # noqa: E402

DEV = "cuda" if HAS_CUDA else "cpu"
TOKEN_LEVEL = ("grpo", "bnpo", "dr_grpo", "dapo", "cispo", "sapo")
FUSED = TOKEN_LEVEL + ("gspo", "luspo", "vespo")  # every loss type
CLIPPED = ("grpo", "bnpo", "dr_grpo", "dapo", "gspo", "luspo")
AGG_MODES = ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum", "seq-mean-token-sum-norm")


@pytest.fixture(autouse=True, scope="module")
def _interpreter_env():
    """TRITON_INTERPRET=1 while this module's tests run on CPU tensors."""
    with pytest.MonkeyPatch.context() as mp:
        if not HAS_CUDA:
            mp.setenv("TRITON_INTERPRET", "1")
        yield


@pytest.fixture
def fused_calls(monkeypatch):
    """Counts the calls of the fused forward op (to tell the fused path from the fallback)."""
    calls = []
    real = policy_ops.policy_token_loss_forward

    def spy(*args, **kwargs):
        calls.append(args[-1])
        return real(*args, **kwargs)

    monkeypatch.setattr(policy_ops, "policy_token_loss_forward", spy)
    return calls


def make(b, t, dtype=torch.float32, seed=0, gap=0.4, per_token_adv=False, weights=False, empty_row=True,
         garbage=True):
    """Random (logps, old, adv, mask, ref, entropy); masked positions hold NaN / inf garbage."""
    g = torch.Generator().manual_seed(seed)
    lp = -torch.rand(b, t, generator=g) * 3.0 - 0.05
    old = lp + gap * torch.randn(b, t, generator=g)
    ref = lp + 0.3 * torch.randn(b, t, generator=g)
    ent = torch.rand(b, t, generator=g) * 2.0
    adv = torch.randn(b, t, generator=g) if per_token_adv else torch.randn(b, generator=g)
    mask = torch.rand(b, t, generator=g) > 0.25
    mask[0, 0] = True
    if empty_row and b > 1:
        mask[1] = False
    if garbage:
        lp[~mask] = float("nan")
        old[~mask] = float("inf")
        ref[~mask] = -float("inf")
        ent[~mask] = float("nan")
        if per_token_adv:
            adv[~mask] = float("nan")
    if weights:
        mask = mask.float() * (0.5 + torch.rand(b, t, generator=g))
    dev = lambda x: x.to(DEV)  # noqa: E731
    return (dev(lp.to(dtype)), dev(old.to(dtype)), dev(adv), dev(mask), dev(ref.to(dtype)), dev(ent.to(dtype)))


def run(backend, lp, old, adv, mask, ent=None, **kw):
    lp_ = lp.detach().clone().requires_grad_(True)
    ent_ = None if ent is None else ent.detach().clone().requires_grad_(True)
    loss, metrics = policy_loss(lp_, old, adv, mask, entropy=ent_, backend=backend, **kw)
    loss.backward()
    return loss.detach(), metrics, lp_.grad, None if ent_ is None else ent_.grad


def check(lp, old, adv, mask, ent=None, calls=None, **kw):
    """The fused path (backend="triton") against the torch path; returns the fused results."""
    got = run("triton", lp, old, adv, mask, ent, **kw)
    exp = run("torch", lp, old, adv, mask, ent, **kw)
    if calls is not None:
        assert calls == ["triton"], calls
    loss, metrics, g_lp, g_ent = got
    e_loss, e_metrics, e_lp, e_ent = exp
    assert loss.dtype == e_loss.dtype and loss.shape == ()
    torch.testing.assert_close(loss, e_loss, rtol=2e-5, atol=1e-6)
    assert tuple(metrics) == tuple(e_metrics) == POLICY_METRIC_KEYS
    for k in POLICY_METRIC_KEYS:
        assert metrics[k].dtype == torch.float32 and metrics[k].shape == () and not metrics[k].requires_grad, k
        torch.testing.assert_close(metrics[k], e_metrics[k], rtol=2e-5, atol=1e-6, msg=lambda m: f"{k}: {m}")
    tol = dict(rtol=2e-5, atol=1e-8) if lp.dtype == torch.float32 else dict(rtol=1.6e-2, atol=1e-6)
    assert g_lp.dtype == lp.dtype and not torch.isnan(g_lp).any()
    torch.testing.assert_close(g_lp, e_lp, **tol)
    assert (g_ent is None) == (e_ent is None)
    if g_ent is not None:
        torch.testing.assert_close(g_ent, e_ent, **tol)
    return got


# --------------------------------------------------------------------------------------------
# every fused loss type, shape and dtype


SHAPES = [(b, t) for b in (1, 3) for t in (1, 7, 130)]
# (the sequence-level types and vespo: test_row_options)
CASES = ([pytest.param(lt, b, t, torch.float32, id=f"{lt}-{b}x{t}-fp32") for lt in TOKEN_LEVEL for b, t in SHAPES]
         + [pytest.param(lt, b, t, torch.bfloat16, id=f"{lt}-{b}x{t}-bf16") for lt in TOKEN_LEVEL
            for b, t in ((1, 7), (3, 130))])


@pytest.mark.parametrize("loss_type,b,t,dtype", CASES)
def test_loss_types(loss_type, b, t, dtype, fused_calls):
    lp, old, adv, mask, ref, ent = make(b, t, dtype, seed=b * 100 + t)
    kw = dict(loss_type=loss_type, ref_logps=ref, beta=0.05, entropy_coef=0.01)
    if loss_type in CLIPPED:
        kw.update(epsilon_high=0.28, delta=1.4, clip_ratio_c=1.6)
    if loss_type == "cispo":
        kw.update(epsilon_high=1.1)
    check(lp, old, adv, mask, ent, calls=fused_calls, **kw)


@pytest.mark.parametrize("kl_estimator", ["k1", "k2", "k3", "low_var_kl"])
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
@pytest.mark.parametrize("beta", [0.0, 0.07])
def test_kl_estimators(kl_estimator, bias, beta, fused_calls):
    lp, old, adv, mask, ref, _ = make(3, 130, seed=7)
    check(lp, old, adv, mask, calls=fused_calls, loss_type="grpo", ref_logps=ref, beta=beta,
          kl_estimator=kl_estimator, use_bias_correction_kl=bias)


@pytest.mark.parametrize("agg", AGG_MODES)
@pytest.mark.parametrize("loss_type", ["grpo", "sapo"])
def test_aggregation_modes(agg, loss_type, fused_calls):
    lp, old, adv, mask, ref, ent = make(3, 7, seed=11)
    kw = dict(max_completion_length=9) if agg == "seq-mean-token-sum-norm" else {}
    check(lp, old, adv, mask, ent, calls=fused_calls, loss_type=loss_type, loss_agg_mode=agg,
          entropy_coef=0.02, gradient_accumulation_steps=3, **kw)


@pytest.mark.parametrize("count", [37, 0, "tensor"])
@pytest.mark.parametrize("loss_type", ["dapo", "cispo"])
def test_num_items_in_batch(count, loss_type, fused_calls):
    lp, old, adv, mask, ref, ent = make(3, 130, seed=13)
    n = torch.tensor(41, device=DEV) if count == "tensor" else count
    check(lp, old, adv, mask, ent, calls=fused_calls, loss_type=loss_type, num_items_in_batch=n,
          entropy_coef=0.01, gradient_accumulation_steps=2)


OPTIONS = {
    "on_policy": dict(old=None),
    "on_policy_kl": dict(old=None, ref=True, beta=0.1),
    "per_token_adv": dict(data=dict(per_token_adv=True)),
    "weights": dict(data=dict(weights=True), ref=True, beta=0.04),
    "truncated": dict(is_truncated=True),
    "delta": dict(delta=1.25),
    "dual_clip": dict(clip_ratio_c=1.4),
    "delta_dual_asym": dict(delta=1.5, clip_ratio_c=2.0, epsilon_low=0.1, epsilon_high=0.3),
    "eps_zero": dict(epsilon_low=0.0, epsilon_high=0.0),
    "entropy_no_bonus": dict(ent=True),
    "entropy_bonus": dict(ent=True, entropy_coef=-0.03),
    "no_mask_garbage": dict(data=dict(garbage=False, empty_row=False)),
}


def _applies(loss_type, name):
    """delta and dual clip: clipped types only; cispo's epsilon_high is eps_max > 0."""
    opt = OPTIONS[name]
    if loss_type not in CLIPPED and ("delta" in opt or "clip_ratio_c" in opt):
        return False
    return not (loss_type == "cispo" and name == "eps_zero")


@pytest.mark.parametrize("loss_type,name", [(lt, n) for lt in ("grpo", "dapo", "cispo", "sapo") for n in OPTIONS
                                            if _applies(lt, n)])
def test_options(loss_type, name, fused_calls):
    opt = dict(OPTIONS[name])
    lp, old, adv, mask, ref, ent = make(3, 130, seed=17, **opt.pop("data", {}))
    if opt.pop("old", True) is None:
        old = None
    kw = dict(loss_type=loss_type)
    if opt.pop("ref", False):
        kw["ref_logps"] = ref
    if opt.pop("is_truncated", False):
        kw["is_truncated"] = torch.tensor([False, False, True], device=DEV)
    use_ent = opt.pop("ent", False)
    if loss_type == "cispo" and "epsilon_high" not in opt:
        opt["epsilon_high"] = 1.15
    kw.update(opt)
    check(lp, old, adv, mask, ent if use_ent else None, calls=fused_calls, **kw)


def test_module_form_is_fused(fused_calls):
    lp, old, adv, mask, ref, ent = make(3, 7, seed=19)
    mod = PolicyLoss(loss_type="grpo", beta=0.02, backend="triton")
    loss, metrics = mod(lp, old, adv, mask, ref_logps=ref)
    e_loss, e_metrics = policy_loss(lp, old, adv, mask, ref_logps=ref, loss_type="grpo", beta=0.02,
                                    backend="torch")
    assert fused_calls == ["triton"]
    torch.testing.assert_close(loss, e_loss, rtol=2e-5, atol=1e-6)
    for k in POLICY_METRIC_KEYS:
        torch.testing.assert_close(metrics[k], e_metrics[k], rtol=2e-5, atol=1e-6)


# --------------------------------------------------------------------------------------------
# row statistics (sequence-level ratio, vespo's weight, off-policy mask), entropy quantile, isr


def build(name, opt, b, t, dtype=torch.float32, seed=0):
    """(lp, old, adv, mask, ent, kw) for the option set ``opt`` (keys beyond policy_loss's: data,
    old=None, ref, ent, samp, isr="row"/"token", trunc)."""
    opt = dict(opt)
    lp, old, adv, mask, ref, ent = make(b, t, dtype, seed=seed, **opt.pop("data", {}))
    valid = mask if mask.dtype == torch.bool else mask != 0
    g = torch.Generator().manual_seed(seed + 1)
    if opt.pop("old", True) is None:
        old = None
    kw = {}
    if opt.pop("ref", False):
        kw["ref_logps"] = ref
    if opt.pop("samp", False):
        base = lp if old is None else old
        samp = base.float() + 0.2 * torch.randn(b, t, generator=g).to(DEV)
        kw["sampling_logps"] = torch.where(valid, samp, float("nan")).to(dtype)
    isr = opt.pop("isr", None)
    if isr == "row":
        kw["importance_sampling_ratio"] = (0.3 + torch.rand(b, generator=g)).to(DEV)
    elif isr == "token":  # NaN where masked: never read
        kw["importance_sampling_ratio"] = torch.where(valid, 0.3 + torch.rand(b, t, generator=g).to(DEV),
                                                      float("nan"))
    if opt.pop("trunc", False):
        kw["is_truncated"] = (torch.arange(b) == b - 1).to(DEV)
    use_ent = opt.pop("ent", False)
    kw.update(opt)
    return lp, old, adv, mask, (ent if use_ent else None), kw


ROW_OPTIONS = {
    "gspo": dict(loss_type="gspo", ref=True, beta=0.05, ent=True, entropy_coef=0.01, delta=1.4, clip_ratio_c=1.6),
    "luspo": dict(loss_type="luspo", ref=True, beta=0.05, clip_ratio_c=1.6),
    "grpo_seq": dict(loss_type="grpo", importance_sampling_level="sequence", ent=True, entropy_coef=0.01),
    "vespo": dict(loss_type="vespo", ref=True, beta=0.05, ent=True, entropy_coef=0.01, isr="token"),
    "top_q": dict(loss_type="dapo", ent=True, top_entropy_quantile=0.4, entropy_coef=0.02),
    "opsm": dict(loss_type="grpo", off_policy_mask_threshold=0.02, samp=True),
    "isr": dict(loss_type="dapo", isr="token", ref=True, beta=0.05),
}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("t", [1, 7, 130])
@pytest.mark.parametrize("name", list(ROW_OPTIONS))
def test_row_options(name, t, dtype, fused_calls):
    """Each newly fused option, T = 1 / 7 / 130 (one tile, last partial), a row without tokens and
    NaN / inf padding, fp32 and bf16."""
    lp, old, adv, mask, ent, kw = build(name, ROW_OPTIONS[name], 3, t, dtype, seed=t)
    check(lp, old, adv, mask, ent, calls=fused_calls, **kw)


ROW_VARIANTS = {
    "sapo_seq": dict(loss_type="sapo", importance_sampling_level="sequence", ref=True, beta=0.05),
    "cispo_seq": dict(loss_type="cispo", importance_sampling_level="sequence", epsilon_high=1.1, ref=True,
                      beta=0.05),
    "vespo_no_isr": dict(loss_type="vespo"),
    "gspo_per_token_adv": dict(loss_type="gspo", data=dict(per_token_adv=True), clip_ratio_c=1.6, ref=True,
                               beta=0.05),
    "gspo_on_policy": dict(loss_type="gspo", old=None, ref=True, beta=0.1),
    "gspo_weights_truncated": dict(loss_type="gspo", data=dict(weights=True), trunc=True, ref=True, beta=0.04),
    "gspo_no_bias_k2": dict(loss_type="gspo", ref=True, beta=0.07, kl_estimator="k2", use_bias_correction_kl=False),
    "gspo_eps_zero": dict(loss_type="gspo", epsilon_low=0.0, epsilon_high=0.0),
    "luspo_isr_row": dict(loss_type="luspo", isr="row"),
    "vespo_isr_row": dict(loss_type="vespo", isr="row"),
    "vespo_params_per_token_adv": dict(loss_type="vespo", data=dict(per_token_adv=True), vespo_k_pos=1.5,
                                       vespo_lambda_pos=0.5, vespo_k_neg=4.0, vespo_lambda_neg=0.0),
    "isr_row": dict(loss_type="dapo", isr="row"),
    "opsm_default_old": dict(loss_type="dapo", off_policy_mask_threshold=-0.01),
    "opsm_per_token_adv": dict(loss_type="sapo", data=dict(per_token_adv=True), off_policy_mask_threshold=0.0,
                               samp=True),
    "top_q_zero_sapo": dict(loss_type="sapo", ent=True, top_entropy_quantile=0.0, entropy_coef=0.01),
    "top_q_truncated_no_bonus": dict(loss_type="cispo", epsilon_high=1.2, ent=True, top_entropy_quantile=0.7,
                                     trunc=True),
    "everything_gspo": dict(loss_type="gspo", data=dict(per_token_adv=True, weights=True), trunc=True, ref=True,
                            beta=0.05, ent=True, entropy_coef=0.01, top_entropy_quantile=0.6,
                            off_policy_mask_threshold=0.02, samp=True, isr="token", delta=1.3, clip_ratio_c=1.5),
    "everything_vespo": dict(loss_type="vespo", data=dict(weights=True), ref=True, beta=0.05, ent=True,
                             entropy_coef=0.01, top_entropy_quantile=0.5, off_policy_mask_threshold=0.0,
                             samp=True, isr="row"),
    "everything_dapo": dict(loss_type="dapo", ref=True, beta=0.05, kl_estimator="low_var_kl", ent=True,
                            entropy_coef=-0.01, top_entropy_quantile=0.3, off_policy_mask_threshold=0.01,
                            isr="token", clip_ratio_c=2.0, num_items_in_batch=50),
}


@pytest.mark.parametrize("name", list(ROW_VARIANTS))
def test_row_option_variants(name, fused_calls):
    lp, old, adv, mask, ent, kw = build(name, ROW_VARIANTS[name], 3, 130, seed=5)
    check(lp, old, adv, mask, ent, calls=fused_calls, **kw)


@pytest.mark.parametrize("agg", AGG_MODES)
def test_sequence_level_aggregation_modes(agg, fused_calls):
    lp, old, adv, mask, ent, kw = build("gspo", ROW_OPTIONS["gspo"], 3, 7, seed=59)
    extra = dict(max_completion_length=9) if agg == "seq-mean-token-sum-norm" else {}
    check(lp, old, adv, mask, ent, calls=fused_calls, loss_agg_mode=agg, gradient_accumulation_steps=2,
          **kw, **extra)


@pytest.mark.parametrize("name", ["gspo", "vespo", "top_q", "opsm"])
def test_row_options_empty_mask(name, fused_calls):
    """No loss token at all: loss 0, finite metrics, gradients exactly 0."""
    lp, old, adv, mask, ent, kw = build(name, ROW_OPTIONS[name], 3, 7, seed=61)
    mask = torch.zeros_like(mask)
    loss, metrics, g_lp, g_ent = check(lp, old, adv, mask, ent, calls=fused_calls, **kw)
    assert loss.item() == 0.0
    assert all(math.isfinite(v.item()) for v in metrics.values())
    assert torch.equal(g_lp, torch.zeros_like(g_lp))
    assert g_ent is None or torch.equal(g_ent, torch.zeros_like(g_ent))


def test_everything_empty_rows_zero_gradient(fused_calls):
    """Rows without tokens (and NaN / inf padding in every input) with every row option on."""
    lp, old, adv, mask, ent, kw = build("everything_gspo", ROW_VARIANTS["everything_gspo"], 3, 7, seed=67)
    _, _, g_lp, g_ent = check(lp, old, adv, mask, ent, calls=fused_calls, **kw)
    out = mask == 0
    out[-1] = True  # the truncated row
    assert torch.equal(g_lp[out], torch.zeros_like(g_lp[out]))
    assert torch.equal(g_ent[out], torch.zeros_like(g_ent[out]))


# --------------------------------------------------------------------------------------------
# empty rows, empty batches, extreme values


@pytest.mark.parametrize("agg", AGG_MODES)
def test_empty_mask(agg, fused_calls):
    """A batch without any loss token: finite loss (0) and metrics, gradients exactly 0, no NaN."""
    lp, old, adv, mask, ref, ent = make(3, 7, seed=23)
    mask = torch.zeros_like(mask)
    got = check(lp, old, adv, mask, ent, calls=fused_calls, loss_type="grpo", loss_agg_mode=agg, ref_logps=ref,
                beta=0.1, entropy_coef=0.01, clip_ratio_c=2.0)
    loss, metrics, g_lp, g_ent = got
    assert loss.item() == 0.0
    assert all(math.isfinite(v.item()) for v in metrics.values())
    assert torch.equal(g_lp, torch.zeros_like(g_lp)) and torch.equal(g_ent, torch.zeros_like(g_ent))


@pytest.mark.parametrize("loss_type", FUSED)
def test_empty_rows_zero_gradient(loss_type, fused_calls):
    """Rows without tokens (and padding holding NaN / inf) get exactly 0 gradient, never NaN."""
    lp, old, adv, mask, ref, ent = make(3, 7, seed=29)
    assert not mask[1].any()
    _, _, g_lp, g_ent = check(lp, old, adv, mask, ent, calls=fused_calls, loss_type=loss_type, ref_logps=ref,
                              beta=0.1, entropy_coef=0.01)
    assert torch.equal(g_lp[~mask], torch.zeros_like(g_lp[~mask]))
    assert torch.equal(g_ent[~mask], torch.zeros_like(g_ent[~mask]))


@pytest.mark.parametrize("loss_type", FUSED)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_extreme_log_ratios(loss_type, dtype, fused_calls):
    """|logps - old_logps| far past the clamp at 20 (and about +-20), the reference far away too.

    (``ref - logps`` stays away from 0: there the bias-corrected KL gradient ``r (1 - e^d) + r kl``
    cancels to ``-r d`` and, at ``r = e^20``, both paths return the fp32 rounding of ``e^d``, not
    the same digits.)"""
    lp, old, adv, mask, ref, ent = make(3, 130, dtype, seed=31, garbage=False, empty_row=False)
    gaps = torch.tensor([60.0, -60.0, 20.0, -20.0, 19.5, -25.0, 0.0, 1e4, -1e4], device=DEV)
    ref_gaps = torch.tensor([30.0, -30.0, 2.2, -2.0, 1.5, -1.0, 25.0, -25.0, 1.2, -3.0, 1e4], device=DEV)
    old = (lp.float() - gaps.repeat(130 // len(gaps) + 1)[:130]).to(dtype)
    ref = (lp.float() + ref_gaps.repeat(130 // len(ref_gaps) + 1)[:130]).to(dtype)
    kw = dict(loss_type=loss_type, ref_logps=ref, beta=0.1, kl_estimator="low_var_kl", entropy_coef=0.01)
    if loss_type in CLIPPED:
        kw.update(clip_ratio_c=3.0, delta=2.0)
    if loss_type == "cispo":
        kw.update(epsilon_high=2.0)
    _, metrics, g_lp, _ = check(lp, old, adv, mask, ent, calls=fused_calls, **kw)
    assert all(math.isfinite(v.item()) for v in metrics.values())
    assert torch.isfinite(g_lp).all()


# --------------------------------------------------------------------------------------------
# the ops themselves: both backends, several tiles per row


@pytest.mark.parametrize("block_t", [16, 32])
@pytest.mark.parametrize("loss_type,kl", [("grpo", "k3"), ("cispo", "k2"), ("sapo", "low_var_kl"), ("dapo", "k1")])
def test_ops_backends_agree_multi_tile(loss_type, kl, block_t):
    """Launchers with a small BLOCK_T (T = 130: several tiles, the last partial) against the torch
    implementation of the ops, per token and per row, forward and backward."""
    from posttrain_kernels.kernels import policy as kp

    lp, old, adv, mask, ref, ent = make(3, 130, seed=37, per_token_adv=True, weights=True)
    opts = (loss_type, 0.2, 1.2 if loss_type == "cispo" else 0.28, 1.3, 1.5, 1.0, 1.05, 0.1, kl, True)
    tok, part = kp.policy_token_loss_forward(lp, old, adv, mask, ref, ent, *opts, block_t=block_t)
    e_tok, e_part = policy_ops.policy_token_loss_forward(lp, old, adv, mask, ref, ent, *opts, "torch")
    torch.testing.assert_close(tok, e_tok, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(part, e_part, rtol=1e-5, atol=1e-5)
    assert torch.equal(tok[mask == 0], torch.zeros_like(tok[mask == 0]))
    g = torch.randn(3, device=DEV)
    h = torch.randn(3, device=DEV)
    g_lp, g_h = kp.policy_token_loss_backward(lp, old, adv, mask, ref, g, h, *opts, block_t=block_t)
    e_lp, e_h = policy_ops.policy_token_loss_backward(lp, old, adv, mask, ref, g, h, *opts, "torch")
    torch.testing.assert_close(g_lp, e_lp, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(g_h, e_h, rtol=1e-6, atol=0.0)
    g_lp2, g_h2 = kp.policy_token_loss_backward(lp, old, adv, mask, ref, g, None, *opts, block_t=block_t)
    assert torch.equal(g_lp2, g_lp) and g_h2.numel() == 0


OPS_ROW_CASES = {
    "gspo_opsm": dict(loss_type="gspo", sequence_level=True, off_policy_threshold=0.01, samp=True, isr="token"),
    "sapo_seq_topq": dict(loss_type="sapo", sequence_level=True, thr=True),
    "vespo": dict(loss_type="vespo", isr="row", thr=True, off_policy_threshold=0.0),
    "cispo_isr_topq": dict(loss_type="cispo", isr="token", thr=True),
}


@pytest.mark.parametrize("block_t", [32])
@pytest.mark.parametrize("name", list(OPS_ROW_CASES))
def test_ops_row_statistics_multi_tile(name, block_t):
    """The launchers' row pass and per-token pass over several tiles (T = 130, BLOCK_T 32)
    against the torch implementation of the ops: per token, every partial column, and the backward
    with the three upstream row gradients (loss, entropy, entropy_q)."""
    from posttrain_kernels.kernels import policy as kp

    case = dict(OPS_ROW_CASES[name])
    lp, old, adv, mask, ref, ent = make(3, 130, seed=71, per_token_adv=True, weights=True)
    valid = mask != 0
    g = torch.Generator().manual_seed(73)
    kw = dict(sequence_level=case.pop("sequence_level", False),
              off_policy_threshold=case.pop("off_policy_threshold", None),
              vespo_k_pos=1.5, vespo_lambda_pos=2.5, vespo_k_neg=2.5, vespo_lambda_neg=1.5)
    if case.pop("samp", False):
        kw["sampling_logps"] = old + 0.2 * torch.randn(3, 130, generator=g).to(DEV)
    isr = case.pop("isr", None)
    if isr == "row":
        kw["importance_sampling_ratio"] = (0.3 + torch.rand(3, generator=g)).to(DEV)
    elif isr == "token":
        kw["importance_sampling_ratio"] = torch.where(valid, 0.3 + torch.rand(3, 130, generator=g).to(DEV), 7.0)
    if case.pop("thr", False):
        kw["entropy_threshold"] = torch.quantile(ent[valid].float(), 0.5).reshape(1)
    loss_type = case.pop("loss_type")
    opts = (loss_type, 0.2, 1.2 if loss_type == "cispo" else 0.28, 1.3, 1.5, 1.0, 1.05, 0.1, "k3", True)
    tok, part = kp.policy_token_loss_forward(lp, old, adv, mask, ref, ent, *opts, block_t=block_t, **kw)
    e_tok, e_part = policy_ops.policy_token_loss_forward(lp, old, adv, mask, ref, ent, *opts, "torch", **kw)
    torch.testing.assert_close(tok, e_tok, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(part, e_part, rtol=1e-5, atol=1e-5)
    bkw = {k: v for k, v in kw.items() if k != "sampling_logps"}
    gl, gh, ghq = (torch.randn(3, generator=g).to(DEV) for _ in range(3))
    g_lp, g_h = kp.policy_token_loss_backward(lp, old, adv, mask, ref, gl, gh, *opts, block_t=block_t,
                                              partials=part, entropy=ent, grad_entropy_q=ghq, **bkw)
    e_lp, e_h = policy_ops.policy_token_loss_backward(lp, old, adv, mask, ref, gl, gh, *opts, "torch",
                                                      partials=e_part, entropy=ent, grad_entropy_q=ghq, **bkw)
    torch.testing.assert_close(g_lp, e_lp, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(g_h, e_h, rtol=1e-6, atol=1e-7)
    if kw["sequence_level"] or kw["off_policy_threshold"] is not None or loss_type == "vespo":
        with pytest.raises(ValueError, match="^partials:"):
            kp.policy_token_loss_backward(lp, old, adv, mask, ref, gl, None, *opts, entropy=ent, **bkw)


def test_ops_layout_and_opcheck():
    """Kernel and op agree on the partials layout and loss kinds; the op's schema, fake and
    autograd registrations pass torch.library.opcheck."""
    from posttrain_kernels.kernels import policy as kp

    assert kp.PARTIAL_COLUMNS == policy_ops.PARTIAL_COLUMNS
    assert kp.LOSS_KINDS == policy_ops.LOSS_KINDS
    assert tuple(kp.KL_ESTIMATORS) == policy_ops.KL_ESTIMATORS
    lp, old, adv, mask, ref, ent = make(2, 5, seed=41, garbage=False)
    lp.requires_grad_(True)
    ent.requires_grad_(True)
    args = (lp, old, adv, mask, ref, ent, "grpo", 0.2, 0.28, None, 3.0, 1.0, 1.05, 0.1, "k3", True, "triton")
    torch.library.opcheck(policy_ops.policy_token_loss_forward, args,
                          test_utils=("test_schema", "test_autograd_registration", "test_faketensor"))
    extra = dict(sampling_logps=old, importance_sampling_ratio=adv.abs() + 0.5,
                 entropy_threshold=ent.detach().median().reshape(1), sequence_level=True, off_policy_threshold=0.0)
    torch.library.opcheck(policy_ops.policy_token_loss_forward, args, extra,
                          test_utils=("test_schema", "test_autograd_registration", "test_faketensor"))


# --------------------------------------------------------------------------------------------
# what stays on the torch path


@pytest.mark.parametrize("case", ["fp64", "empty", "mask_requires_grad"])
def test_fallbacks(case, fused_calls):
    """What stays on the torch path with backend="triton": float64 logps, an empty logps, and
    float mask weights that are themselves differentiated."""
    lp, old, adv, mask, ref, ent = make(3, 7, seed=43)
    kw = dict(loss_type="gspo", entropy=ent, top_entropy_quantile=0.5, off_policy_mask_threshold=0.1,
              importance_sampling_ratio=torch.rand(3, device=DEV))
    if case == "fp64":
        lp, old = lp.double(), old.double()
    elif case == "empty":
        lp, old, mask = lp[:, :0], old[:, :0], mask[:, :0]
        del kw["entropy"], kw["top_entropy_quantile"]
    else:
        mask = mask.float().requires_grad_(True)
    loss, metrics = policy_loss(lp, old, adv, mask, backend="triton", **kw)
    e_loss, e_metrics = policy_loss(lp, old, adv, mask, backend="torch", **kw)
    assert fused_calls == []
    assert torch.equal(loss, e_loss)
    assert all(torch.equal(metrics[k], e_metrics[k]) for k in POLICY_METRIC_KEYS)


@pytest.mark.parametrize("backend", ["auto", "torch", "cpu", "cuda", "reference"])
def test_other_backends_on_cpu_are_not_fused(backend, fused_calls):
    """CPU tensors: only an explicit backend="triton" (under the interpreter) takes the fused path;
    the other backend names keep running the torch path, as before the kernels."""
    lp, old, adv, mask, _, _ = make(3, 7, seed=47)
    loss, _ = policy_loss(lp.cpu(), old.cpu(), adv.cpu(), mask.cpu(), loss_type="grpo", backend=backend)
    e_loss, _ = policy_loss(lp.cpu(), old.cpu(), adv.cpu(), mask.cpu(), loss_type="grpo", backend="torch")
    assert fused_calls == [] and torch.equal(loss, e_loss)


@pytest.mark.skipif(HAS_CUDA, reason="CPU tensors without the interpreter")
def test_triton_on_cpu_needs_the_interpreter(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    lp, old, adv, mask, _, _ = make(3, 7, seed=53)
    with pytest.raises(ValueError, match=r"^backend='triton': tensors on cpu need a CUDA device"):
        policy_loss(lp, old, adv, mask, loss_type="grpo", backend="triton")
