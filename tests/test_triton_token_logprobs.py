"""Triton token log-prob / cross-entropy kernels on CPU tensors under TRITON_INTERPRET=1.

The launchers of ``posttrain_kernels.kernels.token_logprobs`` are called directly and checked
against ``posttrain_kernels.reference`` by error budget: with the fp64 oracle (the reference on
``logits.double()``), ``err(kernel) <= 2 * err(reference in the same dtype) + tol`` where
``tol = atol + rtol * |oracle|`` element-wise (fp32 outputs: 1e-5 / 1e-5; bf16 / fp16 gradients,
which are stored in that dtype: rtol 1e-2), plus, for gradients, the rounding of the fp32 ``lse`` the
launcher contract saves between forward and backward: ``p_j`` recomputed from an fp32 ``lse`` is
off by a relative ``~2^-24 |lse|`` (0.06% at ``|logit| ~ 1e4``, where the eager reference, which
keeps the whole log-softmax, is exact), so each gradient element gets
``2^-23 (|lse| + |x_j|) p_j * (its upstream-gradient factor)`` on top.
"""
import os

# Interpreter mode for the kernels loaded below; the previous value is restored once they are
# loaded (and set again only while this module's tests run), so Triton kernels decorated later in
# the session (GPU tests) keep the real JIT.
_PREV_INTERPRET = os.environ.get("TRITON_INTERPRET")
os.environ["TRITON_INTERPRET"] = "1"  # before triton is imported anywhere below

import importlib.util  # noqa: E402
import math  # noqa: E402

import pytest  # noqa: E402

triton = pytest.importorskip("triton")
import torch  # noqa: E402
import triton.language as tl  # noqa: E402

from posttrain_kernels.reference import cross_entropy_reference, token_logprobs_reference  # noqa: E402


def _load_interpreted_module():
    """A private copy of the kernels module, decorated under TRITON_INTERPRET=1 whatever imported
    the shared ``posttrain_kernels.kernels.token_logprobs`` before (and without touching it)."""
    try:
        spec = importlib.util.find_spec("posttrain_kernels.kernels.token_logprobs")
    except ImportError:
        spec = None
    if spec is None:  # package not installed: run from the source tree (PYTHONPATH=python:.)
        spec = importlib.util.find_spec("kernels.token_logprobs")
    assert spec is not None and spec.origin, "kernels/token_logprobs.py not found"
    private = importlib.util.spec_from_file_location("_ptk_token_logprobs_interpreted", spec.origin)
    module = importlib.util.module_from_spec(private)
    private.loader.exec_module(module)
    return module


tk = _load_interpreted_module()


@triton.jit
def _tanh_test_kernel(x_ptr, y_ptr, n, BLOCK: tl.constexpr):
    offs = tl.arange(0, BLOCK)
    tl.store(y_ptr + offs, tk._tanh(tl.load(x_ptr + offs, mask=offs < n)), mask=offs < n)


if _PREV_INTERPRET is None:
    del os.environ["TRITON_INTERPRET"]
else:
    os.environ["TRITON_INTERPRET"] = _PREV_INTERPRET



@pytest.fixture(autouse=True, scope="module")
def _interpreter_env():
    """TRITON_INTERPRET=1 while this module's tests run (the interpreter checks it at call time)."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("TRITON_INTERPRET", "1")
        yield


DTYPES = [torch.float32, torch.bfloat16, torch.float16]
IGN = -100


def _tols(dtype):
    """(rtol, atol) for a gradient stored in ``dtype``."""
    return (1e-5, 1e-5) if dtype == torch.float32 else (1e-2, 1e-5)


def _abs_err(a, oracle):
    """|a - oracle| in fp64, 0 where both are the same infinity, inf where a is nan."""
    a, o = a.double(), oracle.double()
    e = torch.where(a == o, torch.zeros_like(a), (a - o).abs())
    return torch.nan_to_num(e, nan=math.inf)


def assert_budget(name, got, ref_same, oracle, rtol=1e-5, atol=1e-5, extra=None):
    """Element-wise: |got - oracle| <= 2 max|ref_same - oracle| + atol + rtol |oracle| (+ extra)."""
    assert got.shape == oracle.shape, f"{name}: shape {tuple(got.shape)} != {tuple(oracle.shape)}"
    assert not torch.isnan(oracle).any(), f"{name}: oracle has nan"
    assert not torch.isnan(got).any(), f"{name}: nan in kernel output"
    e_k = _abs_err(got, oracle)
    e_r = _abs_err(ref_same, oracle)
    mag = torch.nan_to_num(oracle.double().abs(), posinf=0.0)  # equal infinities already err 0
    bound = 2 * e_r.max() + atol + rtol * mag
    if extra is not None:
        bound = bound + extra
    bad = e_k > bound
    assert not bad.any(), (
        f"{name}: {int(bad.sum())} elements over budget; max err {e_k.max().item():.3e}, "
        f"worst excess {(e_k - bound).max().item():.3e}, reference err {e_r.max().item():.3e}"
    )


def make_logits(n, v, dtype, seed, scale=3.0, extreme=False, row_stride=None):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, v, generator=g) * scale
    if extreme:
        x[:, 0::5] = 1e4
        x[:, 2::5] = -1e4
        x[:, 3::7] = -math.inf
        x[0, 0] = 1e4 + 3.0
    if row_stride is not None and row_stride > v:  # rows padded: logits.stride(0) > V
        big = torch.full((n, row_stride), 7.0)
        big[:, :v] = x
        return big.to(dtype)[:, :v]
    return x.to(dtype)


def make_labels(n, k, v, mask, seed, ignore_index=IGN):
    g = torch.Generator().manual_seed(seed + 1)
    y = torch.randint(0, v, (n, k), generator=g)
    if mask == "some":
        y[1] = ignore_index  # a fully ignored row
        if k > 1:
            y[2, 0] = ignore_index
            y[min(3, n - 1), k - 1] = ignore_index
    elif mask == "all":
        y[:] = ignore_index
    return y


def tlp_oracle_and_ref(logits, labels, temperature, entropy, g, gh, ignore_index=IGN):
    """{"oracle": (logp, entropy, grad) of the reference on fp64 logits, "ref": the same on the
    kernel's dtype}; grad of sum(g * logp) + sum(gh * entropy)."""
    out = {}
    for key, xin in (("oracle", logits.detach().double()), ("ref", logits.detach().clone())):
        xin.requires_grad_(True)
        logp, ent = token_logprobs_reference(xin, labels, temperature, ignore_index, return_entropy=entropy)
        obj = 0.0
        if g is not None:
            obj = obj + (logp * g.to(logp.dtype)).sum()
        if gh is not None:
            obj = obj + (ent * gh.to(ent.dtype)).sum()
        grad = torch.autograd.grad(obj, xin)[0] if torch.is_tensor(obj) else torch.zeros_like(xin)
        out[key] = (logp.detach(), None if ent is None else ent.detach(), grad)
    return out


def tlp_lse_term(logits, labels, temperature, g, gh, ignore_index=IGN):
    """Extra gradient budget from the fp32 rounding of lse (and of x = logits / T)."""
    x = logits.double() / temperature
    lse = torch.logsumexp(x, dim=-1, keepdim=True)
    p = torch.exp(x - lse)
    keep = labels != ignore_index
    G = (g.double() * keep).sum(-1, keepdim=True) if g is not None else torch.zeros_like(lse)
    c = G.abs()
    if gh is not None:
        logp = torch.where(p > 0, x - lse, torch.zeros_like(x))
        H = -(p * logp).sum(-1, keepdim=True)
        c = c + gh.double().abs()[:, None] * ((logp + H).abs() + 1)
    finite_x = torch.where(torch.isfinite(x), x.abs(), torch.zeros_like(x))
    return 2.0 ** -23 * (lse.abs() + finite_x) * p * c / temperature


def run_tlp(logits, labels, temperature, entropy, with_glogp=True, with_gent=None, seed=0, ignore_index=IGN,
            g=None, gh=None):
    n, k = labels.shape
    if with_gent is None:
        with_gent = entropy
    gen = torch.Generator().manual_seed(seed + 2)
    if with_glogp and g is None:
        g = torch.randn(n, k, generator=gen)
    if with_gent and gh is None:
        gh = torch.randn(n, generator=gen)
    if not with_glogp:
        g = None
    if not with_gent:
        gh = None
    logits_before = logits.clone()
    labels_before = labels.clone()
    inv_t = 1.0 / temperature

    logp, ent, lse = tk.token_logprobs_forward(logits, labels, inv_t, ignore_index, entropy)
    assert logp.dtype == torch.float32 and logp.shape == (n, k) and logp.is_contiguous()
    assert lse.dtype == torch.float32 and lse.shape == (n,)
    if entropy:
        assert ent.dtype == torch.float32 and ent.shape == (n,)
    else:
        assert ent.numel() == 0

    assert entropy or gh is None, "test misuse: grad_entropy without entropy"
    ref = tlp_oracle_and_ref(logits, labels, temperature, entropy, g, gh, ignore_index)
    o_logp, o_ent, o_grad = ref["oracle"]
    r_logp, r_ent, r_grad = ref["ref"]
    assert_budget("logp", logp, r_logp, o_logp)
    ignored_rows = (labels == ignore_index).all(-1)
    if entropy:
        assert_budget("entropy", ent, r_ent, o_ent)
        assert (ent[ignored_rows] == 0).all()
    x64 = logits.double() / temperature
    o_lse = torch.where(ignored_rows, torch.zeros(n, dtype=torch.float64), torch.logsumexp(x64, -1))
    assert_budget("lse", lse, o_lse.float(), o_lse)
    assert (lse[ignored_rows] == 0).all()

    grad = tk.token_logprobs_backward(logits, labels, lse, ent if entropy else None, g, gh, inv_t, ignore_index)
    assert grad.dtype == logits.dtype and grad.shape == logits.shape and grad.is_contiguous()
    rtol, atol = _tols(logits.dtype)
    extra = tlp_lse_term(logits, labels, temperature, g, gh, ignore_index)
    assert_budget("grad_logits", grad, r_grad, o_grad, rtol, atol, extra)
    assert (grad[ignored_rows] == 0).all()
    # inputs untouched, outputs are new tensors
    assert torch.equal(logits, logits_before)
    assert torch.equal(labels, labels_before)
    for out in (logp, lse, grad):
        assert out.data_ptr() != logits.data_ptr()
    return logp, ent, lse, grad


# ----------------------------------------------------------------------------------------------
# token log-probs
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("mask", ["none", "some", "all"])
@pytest.mark.parametrize("k", [1, 5])
@pytest.mark.parametrize("v", [1, 7, 4097])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_token_logprobs(dtype, v, k, mask):
    n = 5
    seed = v * 10 + k
    logits = make_logits(n, v, dtype, seed)
    labels = make_labels(n, k, v, mask, seed)
    # entropy + grad_entropy at T = 0.7, then log-probs only at T = 1
    run_tlp(logits, labels, 0.7, entropy=True, seed=seed)
    run_tlp(logits, labels, 1.0, entropy=False, seed=seed)


@pytest.mark.parametrize("temperature", [1.0, 0.7])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_token_logprobs_extreme_logits(dtype, temperature):
    # +-1e4 and -inf entries, labels on -inf columns too
    n, v, k = 4, 300, 3
    logits = make_logits(n, v, dtype, 11, extreme=True)
    labels = make_labels(n, k, v, "some", 11)
    labels[0, 0] = 3  # a -inf logit: logp = -inf, no nan
    labels[2, 1] = 0  # a 1e4 logit
    logp, ent, _, grad = run_tlp(logits, labels, temperature, entropy=True, seed=11)
    assert logp[0, 0].item() == -math.inf
    assert torch.isfinite(ent).all() and torch.isfinite(grad.float()).all()


def multi_tile_edge_logits(dtype):
    """Two tiles of 4096: row 0 is -inf except one entry in the second tile (the first tile is
    all -inf: the running max stays -inf there), row 1 is a ramp (the running max moves at every
    tile), row 2 has an all -inf first tile and random values after it."""
    n, v = 3, 4100
    logits = torch.full((n, v), -math.inf)
    logits[0, 4098] = -5.0
    logits[1] = torch.linspace(-20.0, 20.0, v)
    logits[2, 4096:] = torch.randn(4, generator=torch.Generator().manual_seed(9)) * 3
    return logits.to(dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_token_logprobs_multi_tile_edges(dtype):
    logits = multi_tile_edge_logits(dtype)
    labels = torch.tensor([[4098, 5], [4099, 17], [4097, IGN]])
    logp, ent, lse, grad = run_tlp(logits, labels, 0.7, entropy=True, seed=3)
    assert ent[0].item() == 0.0 and logp[0, 0].item() == 0.0 and logp[0, 1].item() == -math.inf
    assert torch.isfinite(grad.float()).all()


@pytest.mark.parametrize("config", ["plain", "all"])
def test_cross_entropy_multi_tile_edges(config):
    eps, z, cap = CE_CONFIGS[config]
    logits = multi_tile_edge_logits(torch.float32)
    if eps > 0 and cap == 0.0:
        logits = torch.nan_to_num(logits, neginf=-1e4)
    labels = torch.tensor([4098, 4099, 4097])
    loss, _, grad = run_ce(logits, labels, eps, z, cap, seed=4)
    assert torch.isfinite(loss).all() and torch.isfinite(grad).all()


def test_token_logprobs_large_vocab_fp32():
    # a vocabulary that does not divide the tile (32003 = 7 * 4096 + 3331), padded rows
    n, v, k = 3, 32003, 2
    logits = make_logits(n, v, torch.float32, 5, row_stride=v + 13)
    assert logits.stride(0) == v + 13
    labels = make_labels(n, k, v, "some", 5)
    labels[0, 0] = v - 1
    run_tlp(logits, labels, 0.7, entropy=True, seed=5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_token_logprobs_grad_entropy_only(dtype):
    n, v, k = 5, 77, 2
    logits = make_logits(n, v, dtype, 21)
    labels = make_labels(n, k, v, "some", 21)
    run_tlp(logits, labels, 0.7, entropy=True, with_glogp=False, with_gent=True, seed=21)
    # entropy computed but not differentiated
    run_tlp(logits, labels, 1.0, entropy=True, with_glogp=True, with_gent=False, seed=22)


def test_token_logprobs_broadcast_upstream_grads():
    # grads from .sum() / .mean() arrive as stride-0 views
    n, v, k = 4, 50, 3
    logits = make_logits(n, v, torch.float32, 31, row_stride=64)
    labels = make_labels(n, k, v, "some", 31)
    g = torch.tensor(0.25).expand(n, k)
    gh = torch.tensor(-0.5).expand(n)
    assert g.stride() == (0, 0) and gh.stride() == (0,)
    run_tlp(logits, labels, 0.7, entropy=True, g=g, gh=gh)


def test_token_logprobs_no_grads_gives_zeros():
    logits = make_logits(3, 10, torch.bfloat16, 1)
    labels = make_labels(3, 1, 10, "none", 1)
    _, _, lse = tk.token_logprobs_forward(logits, labels, 1.0, IGN, False)
    grad = tk.token_logprobs_backward(logits, labels, lse, None, None, None, 1.0, IGN)
    assert grad.dtype == torch.bfloat16 and torch.equal(grad, torch.zeros_like(grad))


def test_token_logprobs_custom_ignore_index():
    # ignore_index may be a valid vocabulary id
    n, v, k = 4, 9, 2
    logits = make_logits(n, v, torch.float32, 41)
    labels = make_labels(n, k, v, "none", 41)
    labels[0] = 3
    labels[1, 0] = 3
    run_tlp(logits, labels, 1.0, entropy=True, seed=41, ignore_index=3)


def test_token_logprobs_empty_and_errors():
    logits = torch.zeros(0, 11)
    labels = torch.zeros(0, 2, dtype=torch.long)
    logp, ent, lse = tk.token_logprobs_forward(logits, labels, 1.0, IGN, True)
    assert logp.shape == (0, 2) and ent.shape == (0,) and lse.shape == (0,)
    x = torch.randn(2, 5)
    y = torch.zeros(2, 1, dtype=torch.long)
    _, _, lse = tk.token_logprobs_forward(x, y, 1.0, IGN, False)
    with pytest.raises(ValueError, match="entropy"):
        tk.token_logprobs_backward(x, y, lse, None, None, torch.ones(2), 1.0, IGN)
    with pytest.raises(ValueError, match="labels"):
        tk.token_logprobs_forward(x, y[:, 0], 1.0, IGN, False)
    with pytest.raises(TypeError, match="logits"):
        tk.token_logprobs_forward(x.double(), y, 1.0, IGN, False)


# ----------------------------------------------------------------------------------------------
# cross-entropy
# ----------------------------------------------------------------------------------------------


def run_ce(logits, labels, eps, z, softcap, seed=0, g=None, ignore_index=IGN):
    n, v = logits.shape
    if g is None:
        g = torch.randn(n, generator=torch.Generator().manual_seed(seed + 3))
    logits_before = logits.clone()
    loss, lse = tk.cross_entropy_forward(logits, labels, ignore_index, eps, z, softcap)
    assert loss.dtype == torch.float32 and loss.shape == (n,) and lse.shape == (n,)
    cap = softcap if softcap > 0 else None
    res = {}
    for key, xin in (("oracle", logits.detach().double()), ("ref", logits.detach().clone())):
        xin.requires_grad_(True)
        lr = cross_entropy_reference(xin, labels, ignore_index, eps, z, cap, reduction="none")
        gr = torch.autograd.grad((lr * g.to(lr.dtype)).sum(), xin)[0]
        res[key] = (lr.detach(), gr)
    (o_loss, o_grad), (r_loss, r_grad) = res["oracle"], res["ref"]
    assert_budget("loss", loss, r_loss, o_loss)
    ignored = labels == ignore_index
    x64 = logits.double()
    if cap is not None:
        x64 = cap * torch.tanh(x64 / cap)
    o_lse = torch.where(ignored, torch.zeros(n, dtype=torch.float64), torch.logsumexp(x64, -1))
    assert_budget("lse", lse, o_lse.float(), o_lse)
    assert (loss[ignored] == 0).all() and (lse[ignored] == 0).all()

    grad = tk.cross_entropy_backward(logits, labels, lse, g, ignore_index, eps, z, softcap)
    assert grad.dtype == logits.dtype and grad.shape == logits.shape and grad.is_contiguous()
    # lse-rounding budget: d grad_j ~ g p_j (|1 + 2 z lse| + 2|z|) * 2^-23 |lse|
    lse_c = torch.logsumexp(x64, -1, keepdim=True)
    p = torch.exp(x64 - lse_c)
    extra = 2.0 ** -23 * lse_c.abs() * p * g.double().abs()[:, None] * ((1 + 2 * z * lse_c).abs() + 2 * abs(z))
    rtol, atol = _tols(logits.dtype)
    assert_budget("grad_logits", grad, r_grad, o_grad, rtol, atol, extra)
    assert (grad[ignored] == 0).all()
    assert torch.equal(logits, logits_before)
    return loss, lse, grad


CE_CONFIGS = {
    "plain": (0.0, 0.0, 0.0),
    "smooth_z": (0.1, 1e-3, 0.0),
    "softcap": (0.0, 0.0, 5.0),
    "all": (0.2, 1e-4, 30.0),
}


@pytest.mark.parametrize("config", list(CE_CONFIGS))
@pytest.mark.parametrize("v", [1, 7, 4097])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_cross_entropy(dtype, v, config):
    eps, z, cap = CE_CONFIGS[config]
    n = 5
    seed = v + len(config)
    logits = make_logits(n, v, dtype, seed, scale=4.0)
    labels = make_labels(n, 1, v, "some", seed)[:, 0].contiguous()
    labels[2] = IGN
    run_ce(logits, labels, eps, z, cap, seed=seed)


@pytest.mark.parametrize("config", ["plain", "softcap", "all"])
def test_cross_entropy_all_ignored(config):
    eps, z, cap = CE_CONFIGS[config]
    logits = make_logits(4, 33, torch.bfloat16, 2)
    labels = torch.full((4,), IGN)
    loss, lse, grad = run_ce(logits, labels, eps, z, cap)
    assert torch.equal(loss, torch.zeros(4)) and torch.equal(grad, torch.zeros_like(grad))


@pytest.mark.parametrize("config", ["plain", "softcap", "all"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_cross_entropy_extreme_logits(dtype, config):
    eps, z, cap = CE_CONFIGS[config]
    n, v = 4, 300
    logits = make_logits(n, v, dtype, 13, extreme=True)
    if cap == 0.0 and eps > 0:  # -inf with label smoothing is an infinite loss; keep it finite
        logits = torch.nan_to_num(logits, neginf=-1e4)
    labels = make_labels(n, 1, v, "none", 13)[:, 0].contiguous()
    labels[1] = 0  # the 1e4 column
    labels[3] = IGN
    loss, _, grad = run_ce(logits, labels, eps, z, cap, seed=13)
    assert torch.isfinite(loss).all() and torch.isfinite(grad.float()).all()


def test_cross_entropy_large_vocab_fp32_broadcast_grad():
    n, v = 3, 32003
    logits = make_logits(n, v, torch.float32, 7, row_stride=v + 5)
    labels = torch.tensor([v - 1, IGN, 4096])
    g = torch.tensor(1.0 / 3).expand(n)
    run_ce(logits, labels, 0.1, 1e-4, 30.0, g=g)


def test_cross_entropy_empty():
    loss, lse = tk.cross_entropy_forward(torch.zeros(0, 5), torch.zeros(0, dtype=torch.long), IGN, 0.0, 0.0, 0.0)
    assert loss.shape == (0,) and lse.shape == (0,)


def test_tanh_helper_accuracy():
    mags = torch.cat([torch.logspace(-30, 1.5, 600), torch.tensor([0.2499999, 0.25, 0.2500001, 1e4, math.inf])])
    u = torch.cat([mags, -mags, torch.linspace(-20, 20, 801), torch.zeros(1)]).float()
    y = torch.empty_like(u)
    _tanh_test_kernel[(1,)](u, y, u.numel(), BLOCK=triton.next_power_of_2(u.numel()))
    ref = torch.tanh(u.double())
    rel = (y.double() - ref).abs() / ref.abs().clamp_min(1e-300)
    rel = torch.where(ref == 0, torch.where(y == 0, 0.0, math.inf), rel)
    assert rel.max().item() < 5e-7  # a few ulp
    assert y[torch.isinf(u)].abs().eq(1).all()


def test_launch_config():
    assert tk.launch_config(1) == (16, 1)
    assert tk.launch_config(7) == (16, 1)
    assert tk.launch_config(4097) == (4096, 8)
    assert tk.launch_config(128256) == (4096, 8)
    assert tk.launch_config(1000) == (1024, 4)
    for v in (1, 7, 300, 4097, 32003, 151936):
        block, warps = tk.launch_config(v)
        assert block & (block - 1) == 0 and 16 <= block <= tk.MAX_BLOCK_V and warps in (1, 2, 4, 8)


def test_out_of_range_labels_give_nan_without_reading():
    # labels are unchecked where the Python check cannot run (torch.compile, GPU tensors): the
    # kernels must not read outside the row and must make the error visible as nan
    logits = torch.randn(3, 5)
    labels = torch.tensor([[0], [5], [IGN]])
    logp, _, _ = tk.token_logprobs_forward(logits, labels, 1.0, IGN, False)
    assert torch.isfinite(logp[0]).all() and torch.isnan(logp[1]).all() and logp[2].item() == 0.0
    loss, _ = tk.cross_entropy_forward(logits, torch.tensor([-1, 1, IGN]), IGN, 0.0, 0.0, 0.0)
    assert torch.isnan(loss[0]) and torch.isfinite(loss[1]) and loss[2].item() == 0.0
