"""Ahead-of-time compile of the CUDA kernels (no GPU needed): nvcc for sm_80 and sm_90.

Runs wherever nvcc is found (on PATH or /usr/local/cuda/bin/nvcc) and is skipped elsewhere. Each
case compiles one file of csrc/cuda/*.cu (every one of them: token_logprobs.cu, distill.cu, ...)
to an object file with ``-Xptxas -v`` and checks that
  * nvcc succeeds (stderr is shown on failure),
  * ptxas reports no register spills (spill stores / loads) in any kernel,
  * the compiler prints no warning pointing into csrc/.
"""
from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
# Every CUDA source of the extension (the list CMakeLists.txt compiles), found by glob so that a new
# file is covered without editing this test; the known ones must be there.
SOURCES = sorted(p.relative_to(REPO) for p in (REPO / "csrc" / "cuda").glob("*.cu"))
EXPECTED_SOURCES = {"token_logprobs.cu", "distill.cu"}
COMPILE_TIMEOUT_S = 240  # one file and arch takes ~10-20 s on 2 cores; generous for slow CI machines


def _find_nvcc() -> str | None:
    for cand in (shutil.which("nvcc"), "/usr/local/cuda/bin/nvcc"):
        if cand and os.path.isfile(cand) and os.access(cand, os.X_OK):
            return cand
    return None


NVCC = _find_nvcc()

needs_nvcc = pytest.mark.skipif(NVCC is None, reason="nvcc not found (PATH, /usr/local/cuda/bin)")

_ENTRY_RE = re.compile(r"Compiling entry function '([^']+)' for '(sm_\d+)'")
_SPILL_RE = re.compile(r"(\d+) bytes spill stores, (\d+) bytes spill loads")
_REGS_RE = re.compile(r"Used (\d+) registers")


def _ptxas_report(text: str) -> list[dict]:
    """Per kernel: name, arch, registers, spill stores / loads (bytes), from ``ptxas -v``."""
    kernels: list[dict] = []
    current: dict | None = None
    for line in text.splitlines():
        m = _ENTRY_RE.search(line)
        if m:
            current = {"name": m.group(1), "arch": m.group(2), "regs": None,
                       "spill_stores": None, "spill_loads": None}
            kernels.append(current)
            continue
        if current is None:
            continue
        m = _SPILL_RE.search(line)
        if m:
            current["spill_stores"], current["spill_loads"] = int(m.group(1)), int(m.group(2))
        m = _REGS_RE.search(line)
        if m:
            current["regs"] = int(m.group(1))
    return kernels


def test_every_cuda_source_is_covered() -> None:
    """Runs without nvcc too: every .cu file is compiled below and built by CMakeLists.txt."""
    names = {p.name for p in SOURCES}
    assert EXPECTED_SOURCES <= names, f"missing CUDA sources: {sorted(EXPECTED_SOURCES - names)}"
    cmake = (REPO / "CMakeLists.txt").read_text()
    unbuilt = [str(p) for p in SOURCES if p.as_posix() not in cmake]
    assert not unbuilt, f"CUDA sources not compiled by CMakeLists.txt: {unbuilt}"


@needs_nvcc
@pytest.mark.parametrize("source", SOURCES, ids=[p.stem for p in SOURCES])
@pytest.mark.parametrize("arch", ["80", "90"])
def test_cu_compiles_without_spills(source: Path, arch: str, tmp_path: Path) -> None:
    assert (REPO / source).is_file(), f"missing {REPO / source}"
    obj = tmp_path / f"{source.stem}_sm{arch}.o"
    cmd = [
        NVCC, "-std=c++17", "-O3", "-I", "csrc", "-c", str(source), "-o", str(obj),
        "-gencode", f"arch=compute_{arch},code=sm_{arch}", "-Xptxas", "-v",
    ]
    try:
        proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True,
                              timeout=COMPILE_TIMEOUT_S)
    except subprocess.TimeoutExpired as exc:
        pytest.fail(f"nvcc for sm_{arch} took longer than {COMPILE_TIMEOUT_S} s: {exc}")
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, (
        f"nvcc failed for {source} sm_{arch} (exit {proc.returncode}):\n{' '.join(cmd)}\n{proc.stderr}"
    )
    assert obj.is_file() and obj.stat().st_size > 0, f"nvcc produced no object file {obj}"

    kernels = _ptxas_report(output)
    assert kernels, f"ptxas -v reported no kernels for sm_{arch}:\n{output}"
    incomplete = [k["name"] for k in kernels if k["spill_stores"] is None]
    assert not incomplete, f"no spill report for {incomplete}:\n{output}"
    spilling = [k for k in kernels if k["spill_stores"] or k["spill_loads"]]
    assert not spilling, "register spills on sm_{}:\n{}".format(
        arch, "\n".join(f"  {k['name']}: {k['regs']} registers, {k['spill_stores']} B spill "
                        f"stores, {k['spill_loads']} B spill loads" for k in spilling))

    warnings = [line for line in output.splitlines()
                if "warning" in line.lower() and "csrc" in line]
    assert not warnings, f"compiler warnings in csrc/ for sm_{arch}:\n" + "\n".join(warnings)
