"""Timing and peak-memory measurement, on CPU and CUDA alike.

Peak memory on CUDA comes from the caching allocator's statistics; on CPU from the process's
resident-set high-water mark (Linux: VmHWM, reset through /proc/self/clear_refs), measured around a
single call after warm-up, minus the resident set before it. Large tensors are mmapped by the
allocator, so their pages leave the resident set when they are freed and the difference is the
extra memory the call needed at its peak.
"""
from __future__ import annotations

import gc
import statistics
import time
from typing import Callable, Optional

import torch

from posttrain_kernels._proc_status import reset_hwm, status_kib


def _pin_glibc_mmap_threshold() -> None:
    """Make glibc serve every large allocation with mmap (and return it on free).

    By default glibc raises its mmap threshold after large frees (up to 32 MiB), after which freed
    tensors stay in the heap and no longer show in the resident set; an explicit threshold turns
    that adjustment off, so VmHWM - VmRSS measures the extra memory of a call.
    """
    if _LIBC is None:
        return
    m_trim_threshold, m_mmap_threshold = -1, -3
    _LIBC.mallopt(m_mmap_threshold, 1 << 20)
    _LIBC.mallopt(m_trim_threshold, 1 << 20)


def _load_glibc():
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt, libc.malloc_trim  # noqa: B018 - glibc only
        return libc
    except (OSError, AttributeError):
        return None


_LIBC = _load_glibc()
_pin_glibc_mmap_threshold()


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_call(fn: Callable[[], object], device: torch.device, repeats: int, warmup: int) -> float:
    """Median wall time of ``fn`` in seconds over ``repeats`` runs after ``warmup`` runs."""
    for _ in range(warmup):
        fn()
    _sync(device)
    times = []
    for _ in range(repeats):
        _sync(device)
        t0 = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def peak_extra_bytes(fn: Callable[[], object], device: torch.device) -> Optional[int]:
    """Peak memory above what was allocated before one call of ``fn`` (None if not measurable)."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        fn()
        torch.cuda.synchronize(device)
        return torch.cuda.max_memory_allocated(device) - base
    # Free heap chunks left by earlier cases could serve this call's allocations without new
    # resident pages; giving them back to the kernel first makes every page the call touches count.
    if _LIBC is not None:
        _LIBC.malloc_trim(0)
    if not reset_hwm():
        return None
    base = status_kib("VmRSS")
    fn()
    peak = status_kib("VmHWM")
    if base is None or peak is None:
        return None
    return max(0, (peak - base) * 1024)


def copy_bandwidth(nbytes: int, device: torch.device, repeats: int = 5) -> float:
    """Measured device-to-device copy bandwidth in bytes/s (read + write counted)."""
    src = torch.empty(nbytes // 2, dtype=torch.bfloat16, device=device).fill_(1)
    dst = torch.empty_like(src)
    t = time_call(lambda: dst.copy_(src), device, repeats, warmup=2)
    return 2 * src.numel() * 2 / t
