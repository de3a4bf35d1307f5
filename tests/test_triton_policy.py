"""The fused policy loss (Triton kernels of ``kernels/policy.py`` behind the custom ops of
``posttrain_kernels.ops.policy``) against the PyTorch path of ``policy_loss``: the loss, every
metric and the gradients w.r.t. ``logps`` and ``entropy``, for each fused loss type and option.

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
FUSED = ("grpo", "bnpo", "dr_grpo", "dapo", "cispo", "sapo")
CLIPPED = ("grpo", "bnpo", "dr_grpo", "dapo")
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
CASES = ([pytest.param(lt, b, t, torch.float32, id=f"{lt}-{b}x{t}-fp32") for lt in FUSED for b, t in SHAPES]
         + [pytest.param(lt, b, t, torch.bfloat16, id=f"{lt}-{b}x{t}-bf16") for lt in FUSED
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


# --------------------------------------------------------------------------------------------
# what stays on the torch path


@pytest.mark.parametrize("kw", [
    dict(loss_type="gspo"), dict(loss_type="luspo"), dict(loss_type="vespo"),
    dict(loss_type="grpo", importance_sampling_level="sequence"),
    dict(loss_type="dapo", top_entropy_quantile=0.5, entropy=True),
    dict(loss_type="dapo", off_policy_mask_threshold=0.1),
    dict(loss_type="dapo", importance_sampling_ratio=True),
    dict(loss_type="dapo", float64=True),
], ids=["gspo", "luspo", "vespo", "seq_level", "top_q", "opsm", "isr", "fp64"])
def test_fallbacks(kw, fused_calls):
    kw = dict(kw)
    lp, old, adv, mask, ref, ent = make(3, 7, seed=43)
    if kw.pop("entropy", False):
        kw["entropy"] = ent
    if kw.pop("importance_sampling_ratio", False):
        kw["importance_sampling_ratio"] = torch.rand(3, device=DEV)
    if kw.pop("float64", False):
        lp, old = lp.double(), old.double()
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
