"""Helpers of the ahead-of-time compilation specs of every Triton kernel module (tests/test_triton_aot.py)."""
from typing import Dict, Tuple


def jit_like(signature: Dict[str, str], ones: Tuple[str, ...]) -> Tuple[Dict[str, str], Dict[str, int]]:
    """Mark the integer arguments the JIT would see equal to 1 as constexpr 1 (it specializes them)."""
    sig = dict(signature)
    consts = {}
    for name in ones:
        sig[name] = "constexpr"
        consts[name] = 1
    return sig, consts
