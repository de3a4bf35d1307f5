"""torch.library.opcheck on every custom op of the package, and torch.compile(fullgraph=True) of a
training step around each loss family (forward values and gradients equal eager), on CPU.

Compilation is slow on a CPU-only machine: few cases, tiny shapes."""
import pytest
import torch

import posttrain_kernels as ptk
import posttrain_kernels.ops.distill  # noqa: F401  (registers torch.ops.posttrain_kernels.*)
import posttrain_kernels.ops.policy  # noqa: F401
import posttrain_kernels.ops.token_logprobs  # noqa: F401
from conftest import LIVE
from posttrain_kernels.ops.registration import TRITON_TRACEABLE
from test_compile import IGN, compile_counted, fresh_dynamo, make  # noqa: F401  (fixture)

BACKENDS = [pytest.param("torch", id="torch"),
            pytest.param("cpu", id="cpu", marks=pytest.mark.skipif(not LIVE["cpu"], reason="_C not built"))]
ops = torch.ops.posttrain_kernels

# every torch.library.custom_op of the package; test_every_custom_op_is_covered keeps this honest
COVERED = {"token_logprobs_forward", "token_logprobs_backward", "token_logprobs_backward_",
           "cross_entropy_forward", "cross_entropy_backward", "cross_entropy_backward_", "cross_entropy_fused_",
           "distill_forward", "distill_backward", "distill_backward_", "distill_fused_",
           "policy_token_loss_forward", "policy_token_loss_backward"}


def test_every_custom_op_is_covered():
    registered = {name for name in dir(ops) if not name.startswith("_") and isinstance(
        getattr(ops, name), torch._ops.OpOverloadPacket)}
    # where the ops are triton_ops, each has an opaque <op>_native companion (ops/registration.py)
    expected = COVERED | ({f"{name}_native" for name in COVERED} if TRITON_TRACEABLE else set())
    assert registered == expected, f"custom ops without an opcheck: {sorted(registered - expected)}"


def _opcheck(op, args, kwargs=None):
    torch.library.opcheck(op, args, kwargs)


# --------------------------------------------------------------------------------------------
# opcheck: the in-place (mutating) token log-prob / cross-entropy ops (the out-of-place ones are
# checked in test_compile.py)


@pytest.mark.parametrize("backend", BACKENDS)
def test_opcheck_token_logprobs_inplace(backend):
    logits, labels = make(5, 19, k=3)
    _, ent, lse = ops.token_logprobs_forward(logits, labels, 1.0 / 0.7, IGN, True, backend)
    for g_logp, g_ent in ((torch.randn(5, 3), torch.randn(5)), (torch.randn(5, 3), None),
                          (None, torch.randn(5))):
        _opcheck(ops.token_logprobs_backward_.default,
                 (logits.clone(), labels, lse, ent, g_logp, g_ent, 1.0 / 0.7, IGN, backend))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["float32", "bfloat16"])
def test_opcheck_cross_entropy_inplace(backend, dtype):
    logits, labels = make(5, 19, dtype=dtype)
    _, lse = ops.cross_entropy_forward(logits, labels, IGN, 0.1, 1e-4, 30.0, backend)
    g = torch.randn(5)
    _opcheck(ops.cross_entropy_backward_.default,
             (logits.clone(), labels, lse, g, IGN, 0.1, 1e-4, 30.0, backend))
    # a block of columns of wider rows (the vocab-blocked fused-linear path)
    _opcheck(ops.cross_entropy_backward_.default,
             (logits.clone(), labels.clamp(max=7), lse, g, IGN, 0.1, 0.0, 0.0, backend, 40))
    _opcheck(ops.cross_entropy_fused_.default, (logits.clone(), labels, g, IGN, 0.1, 1e-4, 30.0, backend))
    _opcheck(ops.cross_entropy_fused_.default, (logits.clone(), labels, g, IGN, 0.0, 0.0, 0.0, backend))


# --------------------------------------------------------------------------------------------
# opcheck: distillation


def _distill_inputs(dtype=torch.float32, with_labels=True):
    s, labels = make(5, 19, dtype=dtype, seed=1)
    t, _ = make(5, 19, dtype=dtype, seed=2)
    return s, t, (labels if with_labels else None)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("divergence", [0, 2, 4], ids=["forward_kl", "jsd", "skew_reverse_kl"])
def test_opcheck_distill(backend, divergence):
    for dtype, with_labels in ((torch.float32, True), (torch.bfloat16, False)):
        s, t, labels = _distill_inputs(dtype, with_labels)
        args = (IGN, divergence, 0.3, 1.0 / 0.7)
        _opcheck(ops.distill_forward.default, (s.clone().requires_grad_(True), t, labels, *args, backend))
        _, stats = ops.distill_forward(s, t, labels, *args, backend)
        g = torch.randn(5)
        _opcheck(ops.distill_backward.default, (s, t, labels, *args, stats, g, backend))
        _opcheck(ops.distill_backward_.default, (s.clone(), t, labels, *args, stats, g, backend))
        _opcheck(ops.distill_fused_.default, (s.clone(), t.clone(), labels, *args, g, backend))


# --------------------------------------------------------------------------------------------
# opcheck: policy


def _policy_inputs(b=3, t=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    lp = -torch.rand(b, t, generator=g) * 2
    old = lp + 0.2 * torch.randn(b, t, generator=g)
    ref = lp + 0.2 * torch.randn(b, t, generator=g)
    ent = torch.rand(b, t, generator=g) * 3
    adv = torch.randn(b, generator=g)
    mask = torch.rand(b, t, generator=g) > 0.3
    mask[:, 0] = True
    return lp, old, adv, mask, ref, ent


def _policy_opts(loss_type, backend):
    # loss_type, epsilon_low, epsilon_high, delta, clip_ratio_c, sapo_temperature_pos,
    # sapo_temperature_neg, beta, kl_estimator, use_bias_correction_kl, backend
    return (loss_type, 0.2, 0.28, None, None, 1.0, 1.05, 0.04, "k3", False, backend)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", ["grpo", "gspo_seq", "cispo_thr"])
def test_opcheck_policy(backend, case):
    lp, old, adv, mask, ref, ent = _policy_inputs()
    loss_type = {"grpo": "grpo", "gspo_seq": "gspo", "cispo_thr": "cispo"}[case]
    opts = _policy_opts(loss_type, backend)
    kw = {}
    if case == "gspo_seq":
        kw = dict(sequence_level=True)
    if case == "cispo_thr":
        kw = dict(entropy_threshold=torch.tensor([1.0]), importance_sampling_ratio=torch.rand(3) + 0.5)
    _opcheck(ops.policy_token_loss_forward.default,
             (lp.clone().requires_grad_(True), old, adv, mask, ref, ent.clone().requires_grad_(True), *opts), kw)
    _, part = ops.policy_token_loss_forward(lp, old, adv, mask, ref, ent, *opts, **kw)
    bkw = dict(partials=part, **kw)
    if case == "cispo_thr":
        bkw.update(entropy=ent)
    g = torch.randn(3)
    _opcheck(ops.policy_token_loss_backward.default, (lp, old, adv, mask, ref, g, torch.randn(3), *opts),
             dict(bkw, grad_entropy_q=torch.randn(3)))
    _opcheck(ops.policy_token_loss_backward.default, (lp, old, adv, mask, ref, g, None, *opts), bkw)


# --------------------------------------------------------------------------------------------
# torch.compile(fullgraph=True) of a training step per family: loss (+ metrics) and the gradients
# of every differentiable input equal eager


def _step(fn, inputs, grad_idx):
    """fn(*inputs) -> loss or (loss, metrics dict); backward of the loss; returns the loss, the
    metrics and the gradients of inputs[i] for i in grad_idx."""
    xs = [x.detach().clone().requires_grad_(i in grad_idx) if torch.is_tensor(x) and x.is_floating_point()
          else x for i, x in enumerate(inputs)]
    out = fn(*xs)
    loss, metrics = out if isinstance(out, tuple) else (out, {})
    loss.backward()
    return loss.detach(), {k: v.detach() for k, v in metrics.items()}, [xs[i].grad for i in grad_idx]


def check_compiled_step(fn, inputs, grad_idx, *ops_traced, atol=1e-6, rtol=1e-5):
    compiled, cnt = compile_counted(fn)
    l_e, m_e, g_e = _step(fn, inputs, grad_idx)
    l_c, m_c, g_c = _step(compiled, inputs, grad_idx)
    graphs = [g for g in cnt.graphs if any("call" in n.op for n in g.graph.nodes)]
    assert len(graphs) == 1, f"{len(graphs)} graphs captured, expected 1"
    code = graphs[0].code
    for name in ops_traced:
        assert f"posttrain_kernels.{name}" in code, f"{name} not traced as one op:\n{code}"
    torch.testing.assert_close(l_c, l_e, atol=atol, rtol=rtol)
    assert m_c.keys() == m_e.keys()
    for k in m_e:
        torch.testing.assert_close(m_c[k], m_e[k], atol=atol, rtol=rtol, msg=lambda s, k=k: f"metric {k}: {s}")
    for i, a, b in zip(grad_idx, g_c, g_e):
        assert a is not None and b is not None, f"input {i}: no gradient"
        torch.testing.assert_close(a, b, atol=atol, rtol=rtol, msg=lambda s, i=i: f"grad of input {i}: {s}")


@pytest.mark.parametrize("backend", BACKENDS + [pytest.param("auto", id="auto")])
def test_compiled_distill_loss(backend):
    def fn(s, t, y):
        return ptk.distill_loss(s, t, labels=y, divergence="jsd", beta=0.3, temperature=0.7, backend=backend)

    s, t, labels = _distill_inputs()
    check_compiled_step(fn, (s.view(1, 5, 19), t.view(1, 5, 19), labels.view(1, 5)), [0], "distill_forward")


@pytest.mark.skipif(not LIVE["triton"], reason="triton not installed")
def test_compiled_triton_backend_resolution():
    # resolve_backend("triton") asks whether triton imports (importlib, not traced by dynamo): a
    # constant to torch.compile, no graph break (the kernels run in the interpreter on CPU)
    def fn(s, t, y):
        return ptk.distill_loss(s, t, labels=y, backend="triton") + ptk.cross_entropy(s, y, backend="triton")

    s, t, labels = _distill_inputs()
    check_compiled_step(fn, (s, t, labels), [0], "distill_forward", "cross_entropy_forward")


def test_compiled_topk_distill_loss():
    def fn(s, ids, lq, y):
        return ptk.topk_distill_loss(s, ids, lq, divergence="reverse_kl", tail="bucket", labels=y,
                                     temperature=0.7, backend="cpu" if LIVE["cpu"] else "torch")

    s, labels = make(5, 19, seed=3)
    t, _ = make(5, 19, seed=4)
    lq, ids = torch.log_softmax(t, -1).topk(4, dim=-1)
    check_compiled_step(fn, (s, ids, lq, labels), [0], "token_logprobs_forward")


@pytest.mark.parametrize("path", ["torch", "fused_op"])
def test_compiled_policy_loss(path, monkeypatch):
    # on CPU the public function takes the torch path; "fused_op" forces the path that runs the
    # custom op policy_token_loss_forward (its backend "torch": the op's PyTorch implementation)
    if path == "fused_op":
        from posttrain_kernels.api import policy as api_policy
        monkeypatch.setattr(api_policy, "_fused_backend", lambda o, logps, mask: "torch")

    def fn(lp, old, adv, mask, ref, ent):
        return ptk.policy_loss(lp, old, adv, mask, ref_logps=ref, entropy=ent, loss_type="dapo", beta=0.04,
                               entropy_coef=0.01, epsilon_high=0.28, backend="torch")

    lp, old, adv, mask, ref, ent = _policy_inputs()
    ops_traced = ("policy_token_loss_forward",) if path == "fused_op" else ()
    check_compiled_step(fn, (lp, old, adv, mask, ref, ent), [0, 5], *ops_traced)


def test_compiled_preference_loss():
    def fn(c, r, rc, rr):
        return ptk.preference_loss(c, r, rc, rr, loss_type="sigmoid", beta=0.1, label_smoothing=0.1)

    g = torch.Generator().manual_seed(5)
    c, r, rc, rr = (-torch.rand(4, generator=g) * 20 for _ in range(4))
    check_compiled_step(fn, (c, r, rc, rr), [0, 1])


# --------------------------------------------------------------------------------------------
# the fused-linear losses (autograd.Functions looping over chunks of rows): chunk_size 4 for
# several chunks on 7 rows


def _linear_inputs(rows=7, d=8, vocab=13, seed=6):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(rows, d, generator=g)
    w = torch.randn(vocab, d, generator=g) * 0.5
    b = torch.randn(vocab, generator=g) * 0.1
    labels = torch.randint(0, vocab, (rows,), generator=g)
    labels[1] = IGN
    return h, w, b, labels


@pytest.mark.parametrize("backend", BACKENDS)
def test_compiled_linear_cross_entropy(backend):
    def fn(h, w, b, y):
        return ptk.linear_cross_entropy(h, w, y, bias=b, label_smoothing=0.1, z_loss=1e-4, chunk_size=4,
                                        backend=backend)

    check_compiled_step(fn, _linear_inputs(), [0, 1, 2])


def test_compiled_linear_token_logprobs():
    def fn(h, w, y, wt):
        logp, ent = ptk.linear_token_logprobs(h, w, y, temperature=0.7, return_entropy=True, chunk_size=4,
                                              backend="cpu" if LIVE["cpu"] else "torch")
        return (logp * wt).sum() + 0.1 * ent.sum()

    h, w, _, labels = _linear_inputs()
    check_compiled_step(fn, (h, w, labels, torch.randn(7)), [0, 1])


def test_compiled_linear_preference_loss():
    def fn(h, w, y, ref):
        return ptk.linear_preference_loss(h, w, y, ref_logps=ref, loss_type="sigmoid", beta=0.1, chunk_size=2,
                                          backend="cpu" if LIVE["cpu"] else "torch")

    g = torch.Generator().manual_seed(7)
    h = torch.randn(4, 3, 8, generator=g)  # 2 pairs (chosen rows first, then rejected), 3 tokens
    w = torch.randn(13, 8, generator=g) * 0.5
    labels = torch.randint(0, 13, (4, 3), generator=g)
    labels[:, 0] = IGN
    ref = -torch.rand(4, generator=g) * 5
    check_compiled_step(fn, (h, w, labels, ref), [0, 1])


def _linear_policy_inputs():
    g = torch.Generator().manual_seed(8)
    h = torch.randn(2, 4, 8, generator=g)
    w = torch.randn(13, 8, generator=g) * 0.5
    labels = torch.randint(0, 13, (2, 4), generator=g)
    old = -torch.rand(2, 4, generator=g) * 3
    adv = torch.randn(2, generator=g)
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0]], dtype=torch.bool)
    return h, w, labels, old, adv, mask


def test_compiled_linear_policy_loss():
    def fn(h, w, y, old, adv, mask):
        return ptk.linear_policy_loss(h, w, y, old, adv, mask, loss_type="grpo", temperature=0.7, chunk_size=4,
                                      backend="cpu" if LIVE["cpu"] else "torch")

    h, w, labels, old, adv, mask = _linear_policy_inputs()
    check_compiled_step(fn, (h, w, labels, old, adv, mask), [0, 1])


@pytest.mark.skipif(not LIVE["triton"], reason="triton not installed")
def test_compiled_linear_policy_loss_with_fused_policy_op(monkeypatch):
    # the policy term of linear_policy_loss resolves its backend itself ("auto"): with the fused
    # policy op there (CUDA tensors, or here POSTTRAIN_KERNELS_BACKEND=triton under the
    # interpreter), the token gradient taken by torch.func under torch.compile must not go through
    # the custom op (torch.func cannot differentiate one)
    monkeypatch.setenv("POSTTRAIN_KERNELS_BACKEND", "triton")

    def fn(h, w, y, old, adv, mask):
        return ptk.linear_policy_loss(h, w, y, old, adv, mask, loss_type="grpo", temperature=0.7,
                                      chunk_size=4, backend="cpu" if LIVE["cpu"] else "torch")

    h, w, labels, old, adv, mask = _linear_policy_inputs()
    # (the fused op traced: its metrics, outside torch.func)
    check_compiled_step(fn, (h, w, labels, old, adv, mask), [0, 1], "policy_token_loss_forward", atol=1e-5)


def test_compiled_linear_distill_loss():
    def fn(hs, ws, ht, wt, y):
        return ptk.linear_distill_loss(hs, ws, ht, wt, labels=y, divergence="jsd", beta=0.3, temperature=0.7,
                                       hard_label_weight=0.2, chunk_size=4,
                                       backend="cpu" if LIVE["cpu"] else "torch")

    hs, ws, _, labels = _linear_inputs(seed=9)
    ht, wt, _, _ = _linear_inputs(d=6, seed=10)
    check_compiled_step(fn, (hs, ws, ht, wt, labels), [0, 1])
