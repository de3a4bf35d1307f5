"""torch.compile(fullgraph=True) traces the public functions through their custom ops, forward and
backward, with the same numbers as eager; torch.library.opcheck on the four custom ops.

Compilation is slow on a CPU-only machine: few cases, tiny shapes."""
import pytest
import torch
from torch._dynamo.testing import CompileCounterWithBackend

import posttrain_kernels as ptk
import posttrain_kernels.ops.token_logprobs  # noqa: F401  (registers torch.ops.posttrain_kernels.*)
from conftest import LIVE

COMPILE_BACKENDS = [pytest.param("torch", id="torch"),
                    pytest.param("cpu", id="cpu",
                                 marks=pytest.mark.skipif(not LIVE["cpu"], reason="_C not built"))]
IGN = -100


@pytest.fixture(autouse=True)
def fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def compile_counted(fn, **kw):
    """torch.compile(fn, fullgraph=True) through inductor, counting the graphs dynamo captures."""
    cnt = CompileCounterWithBackend("inductor")
    return torch.compile(fn, fullgraph=True, backend=cnt, **kw), cnt


def assert_traced(cnt, *op_names, frames=1):
    # (with dynamic=True dynamo may also capture an empty graph: not counted)
    graphs = [g for g in cnt.graphs if any("call" in n.op for n in g.graph.nodes)]
    assert len(graphs) == frames, f"{len(graphs)} graphs captured, expected {frames}"
    code = "\n".join(g.code for g in graphs)
    for name in op_names:
        assert f"posttrain_kernels.{name}" in code, f"{name} not traced as one op:\n{code}"


def make(rows, vocab, k=None, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    logits = (torch.randn(rows, vocab, generator=g) * 3).to(dtype)
    shape = (rows,) if k is None else (rows, k)
    labels = torch.randint(0, vocab, shape, generator=g)
    labels[1] = IGN
    return logits, labels


def grad_of(fn, logits, *args):
    x = logits.detach().clone().requires_grad_(True)
    outs = fn(x, *args)
    outs = outs if isinstance(outs, tuple) else (outs,)
    obj = sum(o.sum() * (i + 1) for i, o in enumerate(outs) if o is not None)
    obj.backward()
    return tuple(o.detach() for o in outs), x.grad


@pytest.mark.parametrize("backend", COMPILE_BACKENDS)
def test_compiled_token_logprobs(backend):
    def fn(x, y, w):
        logp, ent = ptk.token_logprobs(x, y, temperature=0.7, return_entropy=True, backend=backend)
        return logp * w, ent

    logits, labels = make(6, 33, k=2)
    w = torch.randn(6, 2)
    compiled, cnt = compile_counted(fn)
    (lp_e, h_e), g_e = grad_of(fn, logits, labels, w)
    (lp_c, h_c), g_c = grad_of(compiled, logits, labels, w)
    assert_traced(cnt, "token_logprobs_forward")
    torch.testing.assert_close(lp_c, lp_e, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(h_c, h_e, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(g_c, g_e, atol=1e-6, rtol=1e-6)
    assert (lp_c[1] == 0).all() and h_c[1] == 0 and (g_c[1] == 0).all()


@pytest.mark.parametrize("backend", COMPILE_BACKENDS)
def test_compiled_cross_entropy(backend):
    def fn(x, y):
        return ptk.cross_entropy(x, y, label_smoothing=0.1, z_loss=1e-4, softcap=30.0,
                                 reduction="mean", backend=backend)

    logits, labels = make(6, 33, dtype=torch.bfloat16)
    compiled, cnt = compile_counted(fn)
    (l_e,), g_e = grad_of(fn, logits, labels)
    (l_c,), g_c = grad_of(compiled, logits, labels)
    assert_traced(cnt, "cross_entropy_forward")
    assert l_c.dtype == torch.float32 and g_c.dtype == torch.bfloat16
    torch.testing.assert_close(l_c, l_e, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(g_c, g_e, atol=0, rtol=0)
    assert (g_c[1] == 0).all()


@pytest.mark.parametrize("backend", COMPILE_BACKENDS)
def test_compiled_all_ignored(backend):
    def fn(x, y):
        loss = ptk.cross_entropy(x, y, reduction="mean", backend=backend)
        logp, ent = ptk.token_logprobs(x, y, return_entropy=True, backend=backend)
        return loss + logp.sum() + ent.sum()

    logits, _ = make(5, 17)
    labels = torch.full((5,), IGN)
    compiled, cnt = compile_counted(fn)
    (loss,), grad = grad_of(compiled, logits, labels)
    assert_traced(cnt, "cross_entropy_forward", "token_logprobs_forward")
    assert loss.item() == 0.0, "all-ignored mean under torch.compile must be 0, not nan"
    assert torch.equal(grad, torch.zeros_like(logits))


@pytest.mark.parametrize("backend", COMPILE_BACKENDS)
def test_compiled_dynamic_rows(backend):
    # one graph with a symbolic number of rows serves several batch sizes (fake impls are symbolic)
    def fn(x, y):
        return ptk.cross_entropy(x, y, reduction="mean", backend=backend)

    compiled, cnt = compile_counted(fn, dynamic=True)
    for rows in (4, 7, 9):
        logits, labels = make(rows, 13, seed=rows)
        (l_e,), g_e = grad_of(fn, logits, labels)
        (l_c,), g_c = grad_of(compiled, logits, labels)
        torch.testing.assert_close(l_c, l_e, atol=1e-6, rtol=1e-6)
        torch.testing.assert_close(g_c, g_e, atol=1e-7, rtol=1e-6)
    assert_traced(cnt, "cross_entropy_forward")


# --------------------------------------------------------------------------------------------
# opcheck: schema, fake (meta) implementations, autograd registration, AOT dispatch


def _opcheck(op, args):
    torch.library.opcheck(op, args)


@pytest.mark.parametrize("backend", COMPILE_BACKENDS)
@pytest.mark.parametrize("entropy", [True, False])
def test_opcheck_token_logprobs(backend, entropy):
    ops = torch.ops.posttrain_kernels
    logits, labels = make(5, 19, k=3)
    x = logits.requires_grad_(True)
    _opcheck(ops.token_logprobs_forward.default, (x, labels, 1.0 / 0.7, IGN, entropy, backend))
    logp, ent, lse = ops.token_logprobs_forward(logits.detach(), labels, 1.0 / 0.7, IGN, True, backend)
    g_logp = torch.randn(5, 3)
    g_ent = torch.randn(5) if entropy else None
    _opcheck(ops.token_logprobs_backward.default,
             (logits.detach(), labels, lse, ent, g_logp, g_ent, 1.0 / 0.7, IGN, backend))
    # and with no log-prob gradient (only the entropy's)
    _opcheck(ops.token_logprobs_backward.default,
             (logits.detach(), labels, lse, ent, None, torch.randn(5), 1.0 / 0.7, IGN, backend))


@pytest.mark.parametrize("backend", COMPILE_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["float32", "bfloat16"])
def test_opcheck_cross_entropy(backend, dtype):
    ops = torch.ops.posttrain_kernels
    logits, labels = make(5, 19, dtype=dtype)
    x = logits.requires_grad_(True)
    _opcheck(ops.cross_entropy_forward.default, (x, labels, IGN, 0.1, 1e-4, 30.0, backend))
    _opcheck(ops.cross_entropy_forward.default, (x, labels, IGN, 0.0, 0.0, 0.0, backend))
    _, lse = ops.cross_entropy_forward(logits.detach(), labels, IGN, 0.1, 1e-4, 30.0, backend)
    _opcheck(ops.cross_entropy_backward.default,
             (logits.detach(), labels, lse, torch.randn(5), IGN, 0.1, 1e-4, 30.0, backend))


# --------------------------------------------------------------------------------------------
# label range under torch.compile: the Python check is skipped while tracing (by design), so the
# backend itself must not read outside the row for a label >= V.

@pytest.mark.parametrize("op", ["token_logprobs", "cross_entropy"])
@pytest.mark.parametrize("backend", [pytest.param("torch", id="torch"),
                                     pytest.param("cpu", id="cpu", marks=[
                                         pytest.mark.skipif(not LIVE["cpu"], reason="_C not built")])])
def test_compiled_out_of_range_label_is_an_error(op, backend):
    def fn(x, y):
        if op == "token_logprobs":
            return ptk.token_logprobs(x, y, backend=backend)[0]
        return ptk.cross_entropy(x, y, reduction="none", backend=backend)

    logits = torch.randn(3, 5)
    labels = torch.tensor([0, 5, 1])  # 5 == V: out of range, in the middle row
    with pytest.raises(ValueError):
        fn(logits, labels)  # eager: the Python check
    compiled = torch.compile(fn, fullgraph=True)
    with pytest.raises((RuntimeError, ValueError, IndexError)):
        compiled(logits, labels)
