"""Subprocess of test_triton_op.py: the ops as ``torch.library.triton_op``s on a machine without a
GPU. Run without ``TRITON_INTERPRET`` (so the kernels are compiled-mode ``JITFunction``s and the ops
register as ``triton_op``s); prints one JSON object.

``trace``: ``torch.compile(fullgraph=True)`` of each case in ``triton_op_cases`` with
``backend="triton"`` down to AOTAutograd's joint forward + backward graph, which is captured and
never run (the kernels cannot launch on a CPU). Reports the Triton kernels the graph launches and
any ``posttrain_kernels`` op left opaque. torch's mutation analysis of each kernel compiles it to
Triton IR for a target: without a GPU, a stand-in driver names sm_90.

``emulated``: the compiled steps of the families that launch only the token log-prob and
cross-entropy kernels (the fused one writes its gradient over its input), run
on the CPU with each launch emulated in PyTorch, through ``aot_eager`` and through inductor's own
generated wrapper: AOTAutograd's functionalized graph (each in-place launch made functional,
mutated buffers cloned or not) and inductor's buffer planning around the kernels must give the
eager CPU backend's loss and gradients, which a trace alone cannot show.

``native``: the same ops with the CPU backends, compiled by inductor and run, against eager: the
path through the ``<op>_native`` companions."""
import json
import os
import sys

assert "TRITON_INTERPRET" not in os.environ, "run without TRITON_INTERPRET"

import torch  # noqa: E402
import triton  # noqa: E402
from torch._dynamo.backends.common import aot_autograd  # noqa: E402
from torch._functorch.partitioners import default_partition  # noqa: E402
from torch._higher_order_ops.triton_kernel_wrap import kernel_side_table  # noqa: E402

import posttrain_kernels  # noqa: E402,F401
from posttrain_kernels import dispatch  # noqa: E402
from posttrain_kernels.ops import registration  # noqa: E402

sys.path.insert(0, os.path.dirname(__file__))
from triton_op_cases import CASES, EMULATED_CASES, run_step  # noqa: E402

if not torch.cuda.is_available():
    from triton.backends.compiler import GPUTarget

    class _StandInDriver:
        def get_current_target(self):
            return GPUTarget("cuda", 90, 32)

    triton.runtime.driver.set_active(_StandInDriver())
# the public functions accept backend="triton" on CPU tensors only when interpreting; the ops were
# registered above (compiled mode), and the trace launches no kernel
dispatch.triton_interpreting = lambda: True


class _Captured(Exception):
    pass


def joint_graph(fn, inputs, dynamic):
    joints = []

    def partition(joint, joint_inputs, **kw):
        joints.append(joint)
        return default_partition(joint, joint_inputs, **kw)

    def never_run(gm, example_inputs):
        def run(*args):
            raise _Captured
        return run

    backend = aot_autograd(fw_compiler=never_run, bw_compiler=never_run, partition_fn=partition)
    torch._dynamo.reset()
    compiled = torch.compile(fn, backend=backend, fullgraph=True, dynamic=dynamic)
    try:
        compiled(*inputs)
    except _Captured:
        pass
    assert len(joints) == 1, f"{len(joints)} joint graphs"
    return joints[0]


def graph_contents(gm):
    """The kernels the graph launches, and the names of the package's ops it calls (directly, or
    functionalized: ``auto_functionalized*(op, ...)``)."""
    kernels, opaque = [], []
    for node in gm.graph.nodes:
        if node.op != "call_function":
            continue
        target = str(node.target)
        if "triton_kernel_wrapper" in target:
            kernel = kernel_side_table.get_kernel(node.kwargs["kernel_idx"])
            kernels.append(getattr(kernel, "fn", kernel).__name__)
            continue
        if "auto_functionalized" in target and node.args:
            target = str(node.args[0])
        if target.startswith("posttrain_kernels."):
            opaque.append(target.split(".")[1])
    return kernels, opaque


def trace():
    out = {}
    for name, case in CASES.items():
        for dynamic in (False, True):
            inputs = [x.detach().clone().requires_grad_(i in case.grad_idx) if x.is_floating_point() else x
                      for i, x in enumerate(case.build("cpu"))]
            try:
                kernels, opaque = graph_contents(joint_graph(case.step("triton"), inputs, dynamic))
                out[f"{name}/{'dynamic' if dynamic else 'static'}"] = {"kernels": kernels, "opaque": opaque}
            except Exception as e:  # reported, judged by the test
                out[f"{name}/{'dynamic' if dynamic else 'static'}"] = {"error": f"{type(e).__name__}: {e}"[:2000]}
    return out


def _rows(t, n, k, stride_row, stride_k):
    return t.as_strided((n, k), (stride_row, stride_k), t.storage_offset())


def _emulate_token_logprobs_fwd(a):
    """``_token_logprobs_fwd_kernel`` in PyTorch, from its launch arguments (see its docstring)."""
    x = a["logits_ptr"].float() * a["inv_t"]
    n, v = x.shape
    lab = _rows(a["labels_ptr"], n, a["K"], a["stride_labels_row"], a["stride_labels_k"])
    valid = lab != a["ignore_index"]
    rows = valid.any(1)
    lse = torch.logsumexp(x, 1)
    a["logp_ptr"].copy_(torch.where(valid, x.gather(1, lab.clamp(0, v - 1)) - lse[:, None], 0.0))
    a["lse_ptr"].copy_(torch.where(rows, lse, 0.0))
    if a["HAS_ENTROPY"]:
        a["entropy_ptr"].copy_(torch.where(rows, lse - (torch.softmax(x, 1) * x).sum(1), 0.0))


def _emulate_token_logprobs_bwd(a):
    """``_token_logprobs_bwd_kernel`` in PyTorch, from its launch arguments."""
    x = a["logits_ptr"].float() * a["inv_t"]
    n, v = x.shape
    lab = _rows(a["labels_ptr"], n, a["K"], a["stride_labels_row"], a["stride_labels_k"])
    valid = lab != a["ignore_index"]
    lse = a["lse_ptr"][:n, None]
    p = torch.exp(x - lse)
    g = torch.zeros(n, a["K"])
    if a["HAS_GRAD_LOGP"]:
        g = _rows(a["grad_logp_ptr"], n, a["K"], a["stride_glogp_row"], a["stride_glogp_k"]).float()
    g = torch.where(valid, g, 0.0)
    grad = torch.zeros(n, v).scatter_add_(1, lab.clamp(0, v - 1), g) - g.sum(1, keepdim=True) * p
    if a["HAS_GRAD_ENTROPY"]:
        gh = _rows(a["grad_entropy_ptr"], n, 1, a["stride_gent"], 0)
        grad = grad - gh * p * (x - lse + a["entropy_ptr"][:n, None])
    a["grad_logits_ptr"].copy_(torch.where(valid.any(1)[:, None], grad * a["inv_t"], 0.0))


def _cross_entropy_rows(a, logits):
    """x (soft-capped), the labels, the valid rows, lse and the loss of the cross-entropy kernels."""
    x = logits.float()
    if a["HAS_SOFTCAP"]:
        x = a["softcap"] * torch.tanh(x * a["inv_softcap"])
    n, v = x.shape
    lab = a["labels_ptr"].as_strided((n,), (a["stride_labels"],), a["labels_ptr"].storage_offset())
    valid = lab != a["ignore_index"]
    lse = torch.logsumexp(x, 1)
    eps = a["label_smoothing"]
    x_y = x.gather(1, lab.clamp(0, v - 1)[:, None])[:, 0]
    loss = (1 - eps) * (lse - x_y) + eps * (lse - x.mean(1)) + a["z_loss"] * lse * lse
    return x, lab, valid, torch.where(valid, lse, 0.0), torch.where(valid, loss, 0.0)


def _cross_entropy_grad(a, x, lab, valid, lse, eps_per_class):
    n, v = x.shape
    g = a["grad_loss_ptr"].as_strided((n,), (a["stride_gloss"],), a["grad_loss_ptr"].storage_offset())
    p = torch.exp(x - lse[:, None])
    in_block = (lab >= 0) & (lab < v)
    onehot = torch.zeros(n, v).scatter_(1, lab.clamp(0, v - 1)[:, None], in_block[:, None].float())
    grad = p * (1 + 2 * a["z_loss"] * lse[:, None]) - (1 - a["label_smoothing"]) * onehot - eps_per_class
    if a["HAS_SOFTCAP"]:
        grad = grad * (1 - (x * a["inv_softcap"]) ** 2)
    return torch.where(valid[:, None], g[:, None] * grad, 0.0)


def _emulate_cross_entropy_fwd(a):
    _, _, _, lse, loss = _cross_entropy_rows(a, a["logits_ptr"])
    a["loss_ptr"].copy_(loss)
    a["lse_ptr"].copy_(lse)


def _emulate_cross_entropy_bwd(a):
    x, lab, valid, _, _ = _cross_entropy_rows(a, a["logits_ptr"])
    lse = a["lse_ptr"][:x.shape[0]]
    grad = _cross_entropy_grad(a, x, lab, valid, lse, a["eps_per_class"])
    a["grad_logits_ptr"].copy_(grad.to(a["grad_logits_ptr"].dtype))


def _emulate_cross_entropy_fused(a):
    x, lab, valid, lse, loss = _cross_entropy_rows(a, a["logits_ptr"])
    a["loss_ptr"].copy_(loss)
    a["lse_ptr"].copy_(lse)
    grad = _cross_entropy_grad(a, x, lab, valid, lse, a["label_smoothing"] / x.shape[1])
    a["logits_ptr"].copy_(grad.to(a["logits_ptr"].dtype))


EMULATED = {"_token_logprobs_fwd_kernel": _emulate_token_logprobs_fwd,
            "_token_logprobs_bwd_kernel": _emulate_token_logprobs_bwd,
            "_cross_entropy_fwd_kernel": _emulate_cross_entropy_fwd,
            "_cross_entropy_bwd_kernel": _emulate_cross_entropy_bwd,
            "_cross_entropy_fused_kernel": _emulate_cross_entropy_fused}


class _EmulatedInductorKernel:
    """What inductor's wrapper launches for one of our kernels (``async_compile.triton`` of its
    source), emulated: the arguments in the kernel's order without the constexprs inductor baked
    into the source, then the grid."""

    def __init__(self, kernel, source):
        import ast
        import re

        declared = ast.literal_eval(re.search(r"'declared_constexpr_names': (\[[^\]]*\])", source).group(1))
        constants = ast.literal_eval(re.search(r"'constants': (\{[^}]*\})", source).group(1))
        self.names = [a for a in kernel.arg_names if a not in declared]
        self.constants = {k: v for k, v in constants.items() if k in declared}
        self.emulate = EMULATED[kernel.__name__]

    def run(self, *args, **kwargs):
        values = dict(zip(self.names, args))
        values.update(self.constants)
        self.emulate(values)


class _EmulatedLaunch:
    def __init__(self, kernel):
        self.arg_names = kernel.arg_names
        self.run = EMULATED[kernel.__name__]

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            kwargs.update(zip(self.arg_names, args))
            self.run(kwargs)
        return launch


def emulated():
    """The compiled steps of the families whose graphs launch only the token log-prob and
    cross-entropy kernels, each launch emulated in PyTorch (the kernels cannot run on a CPU in compiled mode), must give the
    eager CPU backend's loss and gradients: through ``aot_eager`` (AOTAutograd's functionalized
    graph, its clones and its reuse of the kernels' outputs) and through inductor (its wrapper's
    buffer planning, reuse and in-place decisions around the kernels)."""
    import re

    from posttrain_kernels.kernels import token_logprobs as token_kernels
    from torch._inductor import async_compile

    get_kernel = kernel_side_table.get_kernel
    compile_triton = async_compile.AsyncCompile.triton

    def inductor_kernel(self, kernel_name, source_code, device_str="cuda"):
        ours = re.search(r"\ndef (_(?:token_logprobs|cross_entropy)_(?:fwd|bwd|fused)_kernel)\(", source_code)
        if ours and "custom_kernel=True" in source_code:
            return _EmulatedInductorKernel(getattr(token_kernels, ours.group(1)), source_code)
        return compile_triton(self, kernel_name, source_code, device_str)

    def kernel_for(idx):
        kernel = get_kernel(idx)
        # the graph's own launches run emulated; torch's mutation analysis keeps the real kernel
        if sys._getframe(1).f_code.co_name != "triton_kernel_wrapper_mutation_dense":
            return kernel
        return _EmulatedLaunch(getattr(kernel, "fn", kernel))

    kernel_side_table.get_kernel = kernel_for
    async_compile.AsyncCompile.triton = inductor_kernel
    reference = "cpu" if dispatch.live_backends()["cpu"] else "torch"
    out = {}
    try:
        for name in EMULATED_CASES:
            case = CASES[name]
            inputs = case.build("cpu")
            want = run_step(case.step(reference), inputs, case.grad_idx)
            for compiler in ("aot_eager", "inductor"):
                torch._dynamo.reset()
                try:
                    got = run_step(torch.compile(case.step("triton"), backend=compiler, fullgraph=True), inputs,
                                   case.grad_idx)
                    out[f"{name}/{compiler}"] = {
                        "max_abs_diff": max(float((a - b).abs().max()) for a, b in zip(want, got)),
                        "max_abs": max(float(a.abs().max()) for a in want)}
                except Exception as e:
                    out[f"{name}/{compiler}"] = {"error": f"{type(e).__name__}: {e}"[:2000]}
    finally:
        kernel_side_table.get_kernel = get_kernel
        async_compile.AsyncCompile.triton = compile_triton
    return out




def native():
    backend = "cpu" if dispatch.live_backends()["cpu"] else "torch"
    out = {}
    for name in ("token_logprobs", "cross_entropy", "distill_loss", "linear_cross_entropy"):
        case = CASES[name]
        inputs = case.build("cpu")
        fn = case.step(backend)
        torch._dynamo.reset()
        try:
            eager = run_step(fn, inputs, case.grad_idx)
            compiled = run_step(torch.compile(fn, fullgraph=True), inputs, case.grad_idx)
            out[name] = {"max_abs_diff": max(float((a - b).abs().max()) for a, b in zip(eager, compiled)),
                         "backend": backend}
        except Exception as e:
            out[name] = {"error": f"{type(e).__name__}: {e}"[:2000]}
    return out


if __name__ == "__main__":
    result = {"triton_traceable": registration.TRITON_TRACEABLE}
    for mode in sys.argv[1:]:
        result[mode] = {"trace": trace, "native": native, "emulated": emulated}[mode]()
    print("RESULT " + json.dumps(result))
