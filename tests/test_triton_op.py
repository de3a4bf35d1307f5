"""The ops as ``torch.library.triton_op``s (``posttrain_kernels.ops.registration``): where Triton
compiles (no ``TRITON_INTERPRET``), ``torch.compile`` must see our Triton kernels inside the ops,
not an opaque call.

On any machine: a subprocess without ``TRITON_INTERPRET`` (``triton_op_worker.py``) registers the
ops as ``triton_op``s and traces a compiled training step of every family (``triton_op_cases.py``)
with ``backend="triton"`` down to AOTAutograd's joint forward + backward graph, static and
dynamic shapes: each graph must launch exactly the family's kernels and keep no opaque
``posttrain_kernels`` op. The CPU backends, reached through the same registration, compile and
run with eager's numbers.

With a GPU (in-process: no interpreter there): inductor compiles and runs every family with
``backend="triton"``; the loss and gradients equal eager's, the generated code contains the
kernels, and ``torch.library.opcheck`` passes on the Triton ops with CUDA tensors."""
import json
import os
import re
import subprocess
import sys

import pytest
import torch

import posttrain_kernels.ops.distill  # noqa: F401  (registers torch.ops.posttrain_kernels.*)
import posttrain_kernels.ops.policy  # noqa: F401
import posttrain_kernels.ops.token_logprobs  # noqa: F401
from conftest import HAS_CUDA, LIVE
from posttrain_kernels.ops import registration
from triton_op_cases import CASES, EMULATED_CASES, IGN, run_step

HERE = os.path.dirname(os.path.abspath(__file__))
ops = torch.ops.posttrain_kernels


@pytest.fixture(scope="module")
def worker():
    try:
        import triton  # noqa: F401
    except ImportError:
        pytest.skip("triton not installed")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, os.path.join(HERE, "triton_op_worker.py"), "trace", "emulated", "native"],
                          env=env, capture_output=True, text=True, timeout=1200)
    lines = [x for x in proc.stdout.splitlines() if x.startswith("RESULT ")]
    assert proc.returncode == 0 and lines, f"worker failed ({proc.returncode}):\n{proc.stderr[-4000:]}"
    return json.loads(lines[-1][len("RESULT "):])


def test_worker_registers_triton_ops(worker):
    assert worker["triton_traceable"] is True


@pytest.mark.parametrize("shapes", ["static", "dynamic"])
@pytest.mark.parametrize("case", sorted(CASES))
def test_compiled_graph_launches_the_kernels(worker, case, shapes):
    got = worker["trace"][f"{case}/{shapes}"]
    assert "error" not in got, got.get("error")
    assert set(got["opaque"]) == CASES[case].opaque, f"ops called opaquely: {got['opaque']}"
    assert set(got["kernels"]) == CASES[case].kernels, got["kernels"]


@pytest.mark.parametrize("compiler", ["aot_eager", "inductor"])
@pytest.mark.parametrize("case", EMULATED_CASES)
def test_compiled_graph_computes_eager_numbers(worker, case, compiler):
    """The compiled graph of the triton_ops, run with the kernel launches emulated."""
    got = worker["emulated"][f"{case}/{compiler}"]
    assert "error" not in got, got.get("error")
    assert got["max_abs_diff"] <= 1e-5 * max(1.0, got["max_abs"]), got


@pytest.mark.parametrize("case", ["token_logprobs", "cross_entropy", "distill_loss", "linear_cross_entropy"])
def test_native_backends_through_triton_op(worker, case):
    got = worker["native"][case]
    assert "error" not in got, got.get("error")
    assert got["max_abs_diff"] <= 1e-5, got


def test_registration_follows_the_interpreter():
    """Interpreted kernels cannot be traced: under TRITON_INTERPRET the ops are plain custom ops
    (no ``_native`` companions); compiled Triton gets ``triton_op``s listing their kernels."""
    from torch._library.triton import get_triton_kernels_for_op

    companions = hasattr(ops, "token_logprobs_forward_native")
    listed = [k.fn.__name__ for k in get_triton_kernels_for_op("posttrain_kernels::token_logprobs_forward")]
    assert companions == registration.TRITON_TRACEABLE
    if registration.TRITON_TRACEABLE:
        assert "_token_logprobs_fwd_kernel" in listed and "_token_logprobs_bwd_kernel" in listed
    else:
        assert listed == []


# --------------------------------------------------------------------------------------------
# GPU: inductor runs the kernels itself

gpu = pytest.mark.skipif(not (HAS_CUDA and registration.TRITON_TRACEABLE and LIVE["triton"]),
                         reason="needs a CUDA device and compiled Triton")




@gpu
@pytest.mark.parametrize("dynamic", [False, True], ids=["static", "dynamic"])
@pytest.mark.parametrize("case", sorted(CASES))
def test_inductor_runs_the_kernels(case, dynamic):
    from torch._inductor.utils import run_and_get_code

    c = CASES[case]
    inputs = c.build("cuda")
    fn = c.step("triton")
    torch._dynamo.reset()
    eager = run_step(fn, inputs, c.grad_idx)
    compiled = torch.compile(fn, fullgraph=True, dynamic=dynamic)
    got, code = run_and_get_code(lambda: run_step(compiled, inputs, c.grad_idx))
    code = "\n".join(code)
    for name in c.kernels:
        assert name in code, f"{name} is not in inductor's code"
    called = set(re.findall(r"torch\.ops\.posttrain_kernels\.(\w+)", code))
    assert called == c.opaque, f"ops of the package called opaquely: {called}"
    for a, b in zip(got, eager):
        torch.testing.assert_close(a, b, atol=2e-5, rtol=2e-5)


@gpu
def test_opcheck_triton_ops_cuda():
    g = torch.Generator().manual_seed(0)
    logits = (torch.randn(5, 19, generator=g) * 3).cuda()
    labels = torch.randint(0, 19, (5, 3), generator=g).cuda()
    labels[1] = IGN
    _, ent, lse = ops.token_logprobs_forward(logits, labels, 1.0 / 0.7, IGN, True, "triton")
    glogp, gent = torch.randn(5, 3).cuda(), torch.randn(5).cuda()
    torch.library.opcheck(ops.token_logprobs_forward.default,
                          (logits.clone().requires_grad_(True), labels, 1.0 / 0.7, IGN, True, "triton"))
    torch.library.opcheck(ops.token_logprobs_backward.default,
                          (logits, labels, lse, ent, glogp, gent, 1.0 / 0.7, IGN, "triton"))
    torch.library.opcheck(ops.token_logprobs_backward_.default,
                          (logits.clone(), labels, lse, ent, glogp, gent, 1.0 / 0.7, IGN, "triton"))
    y = labels[:, 0].contiguous()
    gl = torch.randn(5).cuda()
    torch.library.opcheck(ops.cross_entropy_forward.default,
                          (logits.clone().requires_grad_(True), y, IGN, 0.1, 1e-4, 30.0, "triton"))
    _, lse1 = ops.cross_entropy_forward(logits, y, IGN, 0.1, 1e-4, 30.0, "triton")
    torch.library.opcheck(ops.cross_entropy_backward.default, (logits, y, lse1, gl, IGN, 0.1, 1e-4, 30.0, "triton"))
    torch.library.opcheck(ops.cross_entropy_backward_.default,
                          (logits.clone(), y, lse1, gl, IGN, 0.1, 1e-4, 30.0, "triton"))
    torch.library.opcheck(ops.cross_entropy_fused_.default, (logits.clone(), y, gl, IGN, 0.1, 1e-4, 30.0, "triton"))
    t = (torch.randn(5, 19, generator=g) * 3).cuda()
    args = (IGN, 2, 0.3, 1.0 / 0.7)
    torch.library.opcheck(ops.distill_forward.default, (logits.clone().requires_grad_(True), t, y, *args, "triton"))
    _, stats = ops.distill_forward(logits, t, y, *args, "triton")
    torch.library.opcheck(ops.distill_backward.default, (logits, t, y, *args, stats, gl, "triton"))
    torch.library.opcheck(ops.distill_backward_.default, (logits.clone(), t, y, *args, stats, gl, "triton"))
    torch.library.opcheck(ops.distill_fused_.default, (logits.clone(), t.clone(), y, *args, gl, "triton"))


@gpu
def test_opcheck_policy_triton_ops_cuda():
    lp, old, adv, mask, ref, ent = CASES["policy_loss"].build("cuda")
    opts = ("dapo", 0.2, 0.28, None, None, 1.0, 1.05, 0.04, "k3", False, "triton")
    torch.library.opcheck(ops.policy_token_loss_forward.default,
                          (lp.clone().requires_grad_(True), old, adv, mask, ref, ent, *opts))
    _, partials = ops.policy_token_loss_forward(lp, old, adv, mask, ref, ent, *opts)
    g = torch.randn(3).cuda()
    torch.library.opcheck(ops.policy_token_loss_backward.default,
                          (lp, old, adv, mask, ref, g, g, *opts), {"partials": partials, "entropy": ent})
