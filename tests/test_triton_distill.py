"""The Triton distillation kernels (``kernels/distill.py``) against the contract and oracle of
``posttrain_kernels.backends.torch_distill``: loss, row stats and the student gradient, for every
divergence (jsd at beta 0 / 0.3 / 1, the skew KLs at alpha 0.1 / 0.6 / 1), fp32 / bf16, odd
vocabularies, skipped rows, temperatures, -inf logits, |logits| up to 1e4, strided rows and ``out=``.

Without a GPU the kernels run on CPU tensors under TRITON_INTERPRET=1; shapes stay small.
Error budget: against an fp64 evaluation of the contract's formulas on the same fp32-scaled inputs,
the kernel may err at most twice what torch_distill (fp32) errs, plus a small tolerance relative to
what each element is computed from (``p |G| + p |c|`` for a gradient ``p (G - c)``, which
cancels); bf16 gradients also get their rounding to bf16. The backward is checked from the kernel's
own forward stats (the contract's input), so that its check does not depend on how either forward
rounded the lse.
"""
import os

import pytest
import torch

HAS_CUDA = torch.cuda.is_available()
if not HAS_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before the kernels are first imported

triton = pytest.importorskip("triton")

from posttrain_kernels.backends import torch_distill as td  # noqa: E402
from posttrain_kernels.kernels import distill as dk  # noqa: E402

# the interpreter evaluates the masked-off branches of tl.where on -inf too (numpy's "invalid value"
# / "divide by zero" warnings); the results are checked below
pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning")

DEV = "cuda" if HAS_CUDA else "cpu"
IGNORE = -100
NINF = float("-inf")

# (name, beta); jsd's beta 0 / 1 are forward / reverse KL, the skew KLs take alpha = beta
CONFIGS = ([("forward_kl", 0.5), ("reverse_kl", 0.5)] + [("jsd", b) for b in (0.0, 0.3, 1.0)]
           + [(d, a) for d in ("skew_kl", "skew_reverse_kl") for a in (0.1, 0.6, 1.0)] + [("tvd", 0.5)])
CONFIG_IDS = [f"{d}-{b}" for d, b in CONFIGS]
DTYPES = [torch.float32, torch.bfloat16]


@pytest.fixture(autouse=True, scope="module")
def _interpreter_env():
    """TRITON_INTERPRET=1 while this module's tests run on CPU tensors."""
    with pytest.MonkeyPatch.context() as mp:
        if not HAS_CUDA:
            mp.setenv("TRITON_INTERPRET", "1")
        yield


# --------------------------------------------------------------------------------------------
# oracle: the contract's formulas in fp64


def _scaled(x, inv_t):
    # the fp32 product both backends compute, then exact arithmetic
    return (x.float() * inv_t).double()


def oracle_forward(student, teacher, labels, divergence, beta, inv_t):
    eff = td._effective(divergence, beta)
    s, t = _scaled(student, inv_t), _scaled(teacher, inv_t)
    lse_s, lse_t = torch.logsumexp(s, -1), torch.logsumexp(t, -1)
    ls, lt = s - lse_s[:, None], t - lse_t[:, None]
    loss, g = td._row_terms(ls, lt, eff, beta)
    p = ls.exp()
    if g is None:
        c = c_mag = torch.zeros_like(loss)
    else:
        pg = torch.where(p > 0, p * g, torch.zeros_like(p))
        c, c_mag = pg.sum(-1), pg.abs().sum(-1)
    stats = torch.stack([lse_s, lse_t, c], -1)
    if labels is not None:
        skip = labels == IGNORE
        loss, c_mag = loss.masked_fill(skip, 0.0), c_mag.masked_fill(skip, 0.0)
        stats = stats.masked_fill(skip[:, None], 0.0)
    return loss, stats, c_mag


def oracle_backward(student, teacher, labels, divergence, beta, inv_t, stats, grad_loss):
    eff = td._effective(divergence, beta)
    s, t = _scaled(student, inv_t), _scaled(teacher, inv_t)
    stats = stats.double()
    ls, lt = s - stats[:, 0:1], t - stats[:, 1:2]
    p = ls.exp()
    zero = torch.zeros_like(p)
    if eff == 0:
        ds, mag = p - lt.exp(), p + lt.exp()
    else:
        g = td._row_terms(ls, lt, eff, beta)[1]
        c = stats[:, 2:3]
        ds = torch.where(p > 0, p * (g - c), zero)
        mag = torch.where(p > 0, p * (g.abs() + c.abs()), zero)  # what G - c cancels from
    scale = (grad_loss.float() * inv_t).double()[:, None]
    ds, mag = ds * scale, mag * scale.abs()
    if labels is not None:
        skip = (labels == IGNORE)[:, None]
        ds, mag = ds.masked_fill(skip, 0.0), mag.masked_fill(skip, 0.0)
    return ds, mag


# --------------------------------------------------------------------------------------------
# inputs


def strided(x, pad):
    """``x`` as the first columns of a wider buffer: row stride V + pad, unit column stride."""
    n, v = x.shape
    buf = torch.full((n, v + pad), float("nan"), dtype=x.dtype, device=x.device)
    buf[:, :v] = x
    view = buf[:, :v]
    assert view.stride(0) == v + pad or n == 1
    return view


def make(n, v, dtype, seed, labels="some", ninf=True, scale=3.0):
    """(student, teacher, labels): random logits (teacher correlated with student), -inf on a
    few shared columns; skipped rows hold NaN (they must not be read)."""
    g = torch.Generator().manual_seed(seed)
    student = torch.randn(n, v, generator=g) * scale
    teacher = 0.7 * student + torch.randn(n, v, generator=g) * scale
    if ninf and v >= 7:
        cols = torch.arange(2, v, 37)
        student[:, cols] = NINF
        teacher[:, cols] = NINF
    if labels == "none":
        lab = None
    else:
        lab = torch.randint(0, v, (n,), generator=g)
        if labels == "some" and n > 1:
            lab[1] = IGNORE  # (n == 1: labels given, none ignored)
        elif labels == "all":
            lab[:] = IGNORE
        skip = lab == IGNORE
        student[skip] = float("nan")
        teacher[skip] = float("nan")
        lab = lab.to(DEV)
    return student.to(dtype).to(DEV), teacher.to(dtype).to(DEV), lab


def grad_loss_for(n, labels, seed):
    g = torch.Generator().manual_seed(seed + 1)
    gl = torch.randn(n, generator=g)
    if labels is not None:
        gl[(labels == IGNORE).cpu()] = float("nan")  # never read for skipped rows
    return gl.to(DEV)


# --------------------------------------------------------------------------------------------
# checks


def _err(a, oracle):
    """|a - oracle| in fp64, 0 where both are the same infinity."""
    a, o = a.double(), oracle.double()
    return torch.where(a == o, torch.zeros_like(a), (a - o).abs())


def assert_budget(what, got, ref, oracle, *, atol, rtol, mag=None):
    """Element-wise ``|got - oracle| <= 2 max|ref - oracle| + atol + rtol mag`` (``mag``:
    ``|oracle|`` unless given), torch_distill's error being ``ref``'s."""
    assert got.shape == oracle.shape, (what, tuple(got.shape), tuple(oracle.shape))
    assert not torch.isnan(got).any(), f"{what}: nan in kernel output"
    assert not torch.isnan(oracle).any(), f"{what}: nan in oracle"
    if mag is None:
        mag = torch.nan_to_num(oracle.double().abs(), posinf=0.0)
    e_got, e_ref = _err(got, oracle), _err(ref, oracle)
    bound = 2 * e_ref.max() + atol + rtol * mag
    bad = ~(e_got <= bound)
    assert not bad.any(), (f"{what}: {int(bad.sum())} elements out of budget, worst error "
                           f"{float(e_got.max()):.3e} (reference {float(e_ref.max()):.3e}); "
                           f"got {got[bad][:4].tolist()} want {oracle[bad][:4].tolist()}")


def check(student, teacher, labels, name, beta, temperature, *, grad_loss=None, out=None):
    code = td.DIVERGENCE_CODES[name]
    inv_t = 1.0 / temperature
    n, v = student.shape

    loss, stats = dk.distill_forward(student, teacher, labels, IGNORE, code, beta, inv_t)
    assert loss.dtype == stats.dtype == torch.float32
    assert loss.shape == (n,) and stats.shape == (n, 3) and stats.is_contiguous()
    r_loss, r_stats = td.distill_forward(student, teacher, labels, IGNORE, code, beta, inv_t)
    o_loss, o_stats, c_mag = oracle_forward(student, teacher, labels, code, beta, inv_t)
    assert not torch.isnan(loss).any() and not torch.isnan(stats).any()
    assert_budget("loss", loss, r_loss, o_loss, atol=1e-6, rtol=2e-6)
    assert_budget("lse", stats[:, :2], r_stats[:, :2], o_stats[:, :2], atol=1e-6, rtol=2e-7)
    assert_budget("c", stats[:, 2], r_stats[:, 2], o_stats[:, 2], atol=1e-6, rtol=2e-6, mag=c_mag)

    if grad_loss is None:
        grad_loss = grad_loss_for(n, labels, seed=n * 1000 + v)
    grad = dk.distill_backward(student, teacher, labels, IGNORE, code, beta, inv_t, stats, grad_loss, out=out)
    if out is not None:
        assert grad is out
    assert grad.dtype == student.dtype and grad.shape == (n, v) and grad.is_contiguous()
    r_grad = td.distill_backward(student, teacher, labels, IGNORE, code, beta, inv_t, stats, grad_loss)
    o_grad, mag = oracle_backward(student, teacher, labels, code, beta, inv_t, stats, grad_loss)
    if student.dtype != torch.float32:
        # stored in bf16 from fp32 values that agree to a few fp32 ulps: the GPU rounds to
        # nearest (half an ulp, 2^-8 relative), the interpreter truncates (up to one ulp, 2^-7)
        mag = mag + (2.0 ** -7 / 2e-6) * o_grad.abs()
    assert_budget("grad", grad, r_grad, o_grad, atol=1e-7, rtol=2e-6, mag=mag)

    if labels is not None:  # skipped rows: exactly 0 everywhere
        skip = (labels == IGNORE)
        assert (loss[skip] == 0).all() and (stats[skip] == 0).all() and (grad[skip] == 0).all()
    return loss, stats, grad


def test_codes_match_contract():
    assert dk.DIVERGENCE_CODES == td.DIVERGENCE_CODES
    for code in td.DIVERGENCE_CODES.values():
        for beta in (0.0, 0.3, 1.0):
            assert dk.effective_divergence(code, beta) == td._effective(code, beta)


# every divergence x dtype x vocabulary: 3 rows (one skipped), -inf on shared columns, strided
# rows; temperature and out= alternate over the vocabularies so each divergence sees both
@pytest.mark.parametrize("v", [1, 7, 300, 4097])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("name,beta", CONFIGS, ids=CONFIG_IDS)
def test_divergences(name, beta, dtype, v):
    k = [1, 7, 300, 4097].index(v)
    temperature = 0.7 if (k + DTYPES.index(dtype)) % 2 else 1.0
    student, teacher, labels = make(3, v, dtype, seed=17 * k + 3)
    student, teacher = strided(student, 5), strided(teacher, 16)
    out = torch.empty((3, v), dtype=dtype, device=DEV).fill_(float("nan")) if k % 2 else None
    check(student, teacher, labels, name, beta, temperature, out=out)


# label modes x row counts x temperatures, at one odd vocabulary
@pytest.mark.parametrize("temperature", [1.0, 0.7])
@pytest.mark.parametrize("n", [1, 3])
@pytest.mark.parametrize("labels", ["none", "some", "all"])
@pytest.mark.parametrize("name,beta", CONFIGS, ids=CONFIG_IDS)
def test_labels_rows_temperatures(name, beta, labels, n, temperature):
    student, teacher, lab = make(n, 37, torch.float32, seed=n + 11, labels=labels)
    loss, stats, grad = check(student, teacher, lab, name, beta, temperature)
    if labels == "all":
        assert (loss == 0).all() and (stats == 0).all() and (grad == 0).all()


def _teacher_only_ninf_finite(name, beta):
    """Whether the contract is finite where q == 0 < p (reverse KL: infinite; skew KL at alpha 1:
    the oracle's 0 * (0 / 0))."""
    eff = td._effective(td.DIVERGENCE_CODES[name], beta)
    return eff != 1 and not (name == "skew_kl" and beta == 1.0)


# |logits| up to 1e4 and -inf on one side only (p == 0 < q: forward KL is +inf, as in the oracle)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("name,beta", CONFIGS, ids=CONFIG_IDS)
def test_extreme_values(name, beta, dtype):
    v = 300
    student, teacher, labels = make(3, v, torch.float32, seed=5, scale=4.0)
    student[0, 5], student[0, 6], teacher[0, 5], teacher[0, 9] = 1e4, -1e4, -1e4, 1e4
    student[2] = (torch.randn(v, generator=torch.Generator().manual_seed(9)) * 3e3).clamp(-1e4, 1e4)
    teacher[2] = (student[2] + torch.randn(v, generator=torch.Generator().manual_seed(10)) * 2e3).clamp(-1e4, 1e4)
    student[2, 20], teacher[2, 21] = 1e4, 1e4
    student[0, 11], student[2, 12] = NINF, NINF  # student only
    if _teacher_only_ninf_finite(name, beta):
        teacher[0, 13], teacher[2, 14] = NINF, NINF
    loss, _, grad = check(student.to(dtype), teacher.to(dtype), labels, name, beta, 0.7)
    assert not torch.isnan(grad).any()


def test_skew_kl_alpha_one_is_zero():
    """skew_kl at alpha 1 is KL(q || q) = 0 with a zero gradient, also where q == 0 < p."""
    student, teacher, _ = make(2, 50, torch.float32, seed=3, labels="none")
    teacher[:, 4] = NINF
    loss, stats = dk.distill_forward(student, teacher, None, IGNORE, td.DIVERGENCE_CODES["skew_kl"], 1.0, 1.0)
    grad = dk.distill_backward(student, teacher, None, IGNORE, td.DIVERGENCE_CODES["skew_kl"], 1.0, 1.0,
                               stats, torch.ones(2, device=DEV))
    assert loss.abs().max() < 1e-6 and (stats[:, 2] == 0).all() and (grad == 0).all()


def test_layouts_and_broadcast_grad():
    """Column-strided inputs (copied), mixed dtypes, a broadcast grad_loss, int32 labels, names."""
    base_s = torch.randn(40, 3, device=DEV)
    base_t = torch.randn(40, 3, device=DEV, dtype=torch.bfloat16)
    student, teacher = base_s.t(), base_t.t()  # [3, 40], column stride 3
    labels = torch.tensor([3, IGNORE, 0], dtype=torch.int32, device=DEV)
    gl = torch.tensor(0.5, device=DEV).expand(3)
    for name, beta in (("jsd", 0.3), ("skew_reverse_kl", 0.6)):
        loss, stats, grad = check(student, teacher, labels.long(), name, beta, 1.0, grad_loss=gl)
        loss2, stats2 = dk.distill_forward(student.contiguous(), teacher.contiguous(), labels, IGNORE, name,
                                           beta, 1.0)
        assert torch.equal(loss, loss2) and torch.equal(stats, stats2)


def test_empty_and_validation():
    s = torch.randn(0, 9, device=DEV)
    loss, stats = dk.distill_forward(s, s, None, IGNORE, 0, 0.5, 1.0)
    assert loss.shape == (0,) and stats.shape == (0, 3)
    assert dk.distill_backward(s, s, None, IGNORE, 0, 0.5, 1.0, stats, loss).shape == (0, 9)
    s, t = torch.randn(2, 9, device=DEV), torch.randn(2, 9, device=DEV)
    with pytest.raises(ValueError, match="teacher"):
        dk.distill_forward(s, t[:, :8], None, IGNORE, 0, 0.5, 1.0)
    with pytest.raises(TypeError, match="student"):
        dk.distill_forward(s.long(), t, None, IGNORE, 0, 0.5, 1.0)
    with pytest.raises(ValueError, match="labels"):
        dk.distill_forward(s, t, torch.zeros(3, dtype=torch.long, device=DEV), IGNORE, 0, 0.5, 1.0)
    with pytest.raises(ValueError, match="divergence"):
        dk.distill_forward(s, t, None, IGNORE, 6, 0.5, 1.0)
    with pytest.raises(ValueError, match="beta"):
        dk.distill_forward(s, t, None, IGNORE, 3, 1.5, 1.0)
    loss, stats = dk.distill_forward(s, t, None, IGNORE, 0, 0.5, 1.0)
    with pytest.raises(ValueError, match="stats"):
        dk.distill_backward(s, t, None, IGNORE, 0, 0.5, 1.0, stats[:, :2], loss)
    with pytest.raises(ValueError, match="grad_loss"):
        dk.distill_backward(s, t, None, IGNORE, 0, 0.5, 1.0, stats, loss[:1])
    with pytest.raises(ValueError, match="out"):
        dk.distill_backward(s, t, None, IGNORE, 0, 0.5, 1.0, stats, loss, out=torch.empty(9, 2, device=DEV).t())
