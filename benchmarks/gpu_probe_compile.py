"""GPU probe (run by benchmarks/gpu_session.sh): a compiled fused-linear preference step against
eager, in variants that tell where a difference comes from. On an H200 (torch 2.11) inductor gave
it zero hidden-state gradients with its Triton kernels traced, so compiled preference losses now
launch them from opaque ops (``ops/linear_sequence_loss._ops``); the ``traced`` variants undo that
here. Variants: traced or opaque, under inductor or ``aot_eager`` (AOTAutograd's graph run op by
op), the CUDA backend, and the one-GEMM-per-group path (``chunk_size`` above the group). Prints the
largest difference of the loss and of each gradient, and writes inductor's code of the first
variant to ``$OUT/res/preference_inductor_code.py``.

    python3 -m benchmarks.gpu_probe_compile
"""
import os
import sys

import torch
from torch._inductor.utils import run_and_get_code

import posttrain_kernels as ptk
from posttrain_kernels.ops import linear_sequence_loss

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tests"))
from triton_op_cases import CASES, run_step  # noqa: E402




def make(backend, chunk):
    def fn(h, w, y, ref):
        return ptk.linear_preference_loss(h, w, y, ref_logps=ref, loss_type="sigmoid", beta=0.1, chunk_size=chunk,
                                          backend=backend)[0]
    return fn


def main():
    inputs = CASES["linear_preference_loss"].build("cuda")
    out = os.environ.get("OUT", "/tmp")
    opaque_ops = linear_sequence_loss._ops
    for traced, backend, compiler, chunk in ((True, "triton", "inductor", 2), (False, "triton", "inductor", 2),
                                             (True, "triton", "aot_eager", 2), (False, "cuda", "inductor", 2),
                                             (True, "triton", "inductor", 64), (True, "triton", "inductor", 3)):
        linear_sequence_loss._ops = ((lambda: linear_sequence_loss._Ops(lambda op: op)) if traced else opaque_ops)
        torch._dynamo.reset()
        want = run_step(make(backend, chunk), inputs, (0, 1))
        compiled = torch.compile(make(backend, chunk), backend=compiler, fullgraph=True)
        try:
            if traced and compiler == "inductor" and chunk == 2:
                got, code = run_and_get_code(lambda: run_step(compiled, inputs, (0, 1)))
                os.makedirs(os.path.join(out, "res"), exist_ok=True)
                with open(os.path.join(out, "res", "preference_inductor_code.py"), "w") as f:
                    f.write("\n\n# ----- next module -----\n\n".join(code))
            else:
                got = run_step(compiled, inputs, (0, 1))
            diffs = [float((a - b).abs().max()) for a, b in zip(got, want)]
            zero = [float(g.abs().max()) for g in got[1:]]
            print(f"{'traced' if traced else 'opaque'} {backend:6s} {compiler:9s} chunk {chunk:2d}: |d loss| {diffs[0]:.3g}  |d grad_h| {diffs[1]:.3g}  "
                  f"|d grad_w| {diffs[2]:.3g}  (max |grad_h| {zero[0]:.3g}, |grad_w| {zero[1]:.3g}; eager "
                  f"{float(want[1].abs().max()):.3g}, {float(want[2].abs().max()):.3g})", flush=True)
        except Exception as e:  # the variant's failure is the finding
            print(f"{'traced' if traced else 'opaque'} {backend:6s} {compiler:9s} chunk {chunk:2d}: "
                  f"{type(e).__name__}: {str(e)[:400]}", flush=True)


if __name__ == "__main__":
    main()
