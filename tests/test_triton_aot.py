"""Ahead-of-time compilation of the Triton kernels for sm_80 and sm_90 (no GPU needed).

Every (kernel, constexpr flags, logits dtype) of the token log-prob ``aot_specs()`` -- with the
BLOCK_V / num_warps the launchers pick at vocab 128256 -- and of the policy-loss ``aot_specs()``
(BLOCK_T at 8192 tokens) and of the distillation ``aot_specs()`` (vocab 128256) goes through
``triton.compile(ASTSource(...), GPUTarget(...))`` down to PTX, which catches what the interpreter
forgives (types, layouts, unsupported ops); the bundled ``ptxas -v`` then reports registers and
spills, and any spill fails the test.

Compilation runs in a subprocess without TRITON_INTERPRET: the interpreter test module sets it for
the whole session, and under it ``@triton.jit`` returns an InterpretedFunction, not a JITFunction.
"""
import json
import os
import re
import subprocess
import sys

import pytest

triton = pytest.importorskip("triton")

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NVIDIA_BIN = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")
ARCHS = {80: "sm_80", 90: "sm_90a"}  # Triton's PTX for capability 90 targets sm_90a


def _ptxas(cap):
    """The bundled ptxas Triton itself uses for ``cap``: Triton 3.9 emits PTX 9.x for sm_90+ and
    assembles it with ``ptxas-blackwell`` (CUDA 13); ``ptxas`` (CUDA 12.x) serves sm_80."""
    blackwell = os.path.join(NVIDIA_BIN, "ptxas-blackwell")
    if cap >= 90 and os.path.exists(blackwell):
        return blackwell
    return os.path.join(NVIDIA_BIN, "ptxas")
VOCAB = 128256

# Runs in the subprocess: compile every spec for the capabilities in argv[2:], write PTX to argv[1],
# print one JSON record per kernel.
_COMPILE_SCRIPT = r"""
import json, os, sys
try:
    from posttrain_kernels.kernels import distill as dk, policy as pk, token_logprobs as tk
except ImportError:
    from kernels import distill as dk, policy as pk, token_logprobs as tk
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

out_dir, vocab, caps = sys.argv[1], int(sys.argv[2]), [int(c) for c in sys.argv[3:]]
# the integers the JIT would see as multiples of 16 at this vocab (contiguous logits / grads)
div16_ints = ({"stride_logits_row", "stride_student_row", "stride_teacher_row", "V"} if vocab % 16 == 0
              else set())
specs = tk.aot_specs(vocab) + pk.aot_specs() + dk.aot_specs(vocab)
for i, (kernel, signature, constexprs, num_warps) in enumerate(specs):
    names = list(signature)
    # pointers 16-byte aligned, as the JIT specializes them for torch allocations
    attrs = {(names.index(n),): [["tt.divisibility", 16]] for n, ty in signature.items()
             if ty.startswith("*") or (n in div16_ints and ty.startswith("i"))}
    flags = {k: v for k, v in constexprs.items() if isinstance(v, bool)}
    for cap in caps:
        src = ASTSource(kernel, signature, constexprs=constexprs, attrs=attrs)
        compiled = triton.compile(src, target=GPUTarget("cuda", cap, 32), options={"num_warps": num_warps})
        dtype = signature.get("logits_ptr", signature.get("logps_ptr", signature.get("student_ptr")))[1:]
        block = constexprs.get("BLOCK_V", constexprs.get("BLOCK_T"))
        # integer constexpr flags (K == 1, LOSS, KL_EST) by value, boolean ones by name when set
        ints = [k.lower() + str(v) for k, v in constexprs.items()
                if k.isupper() and type(v) is int and not k.startswith("BLOCK")]
        tag = "_".join([kernel.__name__.strip("_"), dtype] + ints
                       + [k.lower() for k, v in flags.items() if v] + ["sm%d" % cap])
        path = os.path.join(out_dir, tag + ".ptx")
        with open(path, "w") as f:
            f.write(compiled.asm["ptx"])
        print(json.dumps({"tag": tag, "kernel": kernel.__name__, "dtype": dtype,
                          "flags": flags, "block_v": block, "num_warps": num_warps,
                          "cap": cap, "ptx": path, "shared": compiled.metadata.shared}), flush=True)
"""


def _compile_all(out_dir, caps):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # the JIT default; silences the 3.9 warning
    # fallback import of `kernels` from the source tree when the package is not installed
    env["PYTHONPATH"] = os.pathsep.join(p for p in (env.get("PYTHONPATH", ""), REPO) if p)
    # one subprocess per capability, run concurrently
    procs = [subprocess.Popen([sys.executable, "-c", _COMPILE_SCRIPT, str(out_dir), str(VOCAB), str(cap)],
                              env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for cap in caps]
    records = []
    for proc in procs:
        try:
            stdout, stderr = proc.communicate(timeout=900)
        except subprocess.TimeoutExpired:
            proc.kill()
            stdout, stderr = proc.communicate()
        assert proc.returncode == 0, f"AOT compilation failed:\n{stdout}\n{stderr[-6000:]}"
        records += [json.loads(line) for line in stdout.splitlines() if line.startswith("{")]
    return records


_RE_FUNC = re.compile(r"Compiling entry function '(\w+)' for '(\w+)'")
_RE_SPILL = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")
_RE_REGS = re.compile(r"Used (\d+) registers")


def _ptxas_info(ptx_path, cap):
    proc = subprocess.run([_ptxas(cap), "-v", "--gpu-name", ARCHS[cap], ptx_path, "-o", os.devnull],
                          capture_output=True, text=True, timeout=300)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, f"ptxas failed on {ptx_path}:\n{out}"
    spill, regs = _RE_SPILL.search(out), _RE_REGS.search(out)
    assert spill and regs, f"unexpected ptxas -v output:\n{out}"
    stack, stores, loads = (int(g) for g in spill.groups())
    return {"regs": int(regs.group(1)), "stack": stack, "spill_stores": stores, "spill_loads": loads}


@pytest.fixture(scope="module")
def compiled(tmp_path_factory):
    missing = [_ptxas(cap) for cap in ARCHS if not os.path.exists(_ptxas(cap))]
    if missing:
        pytest.skip(f"bundled ptxas not found: {missing}")
    return _compile_all(tmp_path_factory.mktemp("ptx"), sorted(ARCHS))


@pytest.mark.parametrize("cap", sorted(ARCHS))
def test_aot_compile_no_spills(compiled, cap):
    records = [r for r in compiled if r["cap"] == cap]
    # 2 dtypes x (2 K specializations x (2 fwd entropy flags + 3 bwd grad-flag combinations)
    #             + 3 cross-entropy kernels (fwd, bwd, fused) x 2 softcap flags)
    # + policy loss: 2 dtypes x 15 flag combinations x (fwd, bwd)
    # + distillation: 2 dtypes x 6 divergences x (fwd, bwd)
    assert len(records) == 32 + 60 + 24, [r["tag"] for r in records]
    assert len({r["tag"] for r in records}) == len(records)
    lines, spilled = [], []
    for r in records:
        info = _ptxas_info(r["ptx"], cap)
        lines.append(f"{r['tag']:<70} BLOCK_V={r['block_v']} warps={r['num_warps']} "
                     f"regs={info['regs']:>3} stack={info['stack']} spill st/ld={info['spill_stores']}/"
                     f"{info['spill_loads']} smem={r['shared']}")
        if info["spill_stores"] or info["spill_loads"]:
            spilled.append(r["tag"])
    print(f"\n{os.path.basename(_ptxas(cap))} -v --gpu-name {ARCHS[cap]} (vocab {VOCAB}):\n" + "\n".join(lines))
    assert not spilled, f"register spills in: {spilled}\n" + "\n".join(lines)
