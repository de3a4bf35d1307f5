"""Per-step metrics: a JSONL file (one object per step) and a progress bar on the terminal."""
from __future__ import annotations

import json
import math
import os
import sys
import time
from typing import Any, Dict, List, Optional, TextIO

import torch

from .._proc_status import reset_hwm, status_kib


class PeakMemory:
    """Peak extra memory of a step, above what was in use when it started: on CUDA the caching
    allocator's peak of allocated bytes; on CPU the process's peak resident set (Linux ``VmHWM``,
    reset before each step through ``/proc/self/clear_refs``) minus the resident set at the start.
    ``None`` where neither is readable. On CPU, freed memory that the C allocator keeps (rather than
    returning it to the system) is not seen again: the pipeline pins glibc's mmap threshold so
    that large tensors come and go with their pages (see ``posttrain_kernels.benchmarks.measure``).
    """

    def __init__(self, device: torch.device):
        self.device = device
        self.base: Optional[float] = None

    def reset(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
            self.base = torch.cuda.memory_allocated(self.device) / 2**20
            return
        if not reset_hwm():
            self.base = None
            return
        kib = status_kib("VmRSS")
        self.base = None if kib is None else kib / 1024

    def peak_mib(self) -> Optional[float]:
        if self.base is None:
            return None
        if self.device.type == "cuda":
            return torch.cuda.max_memory_allocated(self.device) / 2**20 - self.base
        kib = status_kib("VmHWM")
        return None if kib is None else max(0.0, kib / 1024 - self.base)


def to_float(value: Any) -> Any:
    """A metric as a plain Python number (tensors are read here, once per step, off the hot path)."""
    if isinstance(value, torch.Tensor):
        value = value.detach().float()
        return value.item() if value.numel() == 1 else value.mean().item()
    return value


class MetricsLog:
    """Writes each step's metrics to ``<out_dir>/metrics.jsonl`` and shows progress on ``stream``."""

    def __init__(self, path: Optional[str], total_steps: int, progress: bool, log_every: int,
                 prefix: str = "", stream: TextIO = sys.stderr):
        self.path, self.total, self.progress, self.log_every = path, total_steps, progress, log_every
        self.prefix, self.stream = prefix, stream
        self.t0 = time.perf_counter()
        self.history: List[Dict[str, Any]] = []

    def truncate_after(self, step: int) -> None:
        """Resuming at ``step``: drop the lines of later steps (written after the checkpoint)."""
        if self.path is None or not os.path.exists(self.path):
            return
        with open(self.path) as f:
            keep = [line for line in f if line.strip() and json.loads(line).get("step", 0) <= step]
        with open(self.path, "w") as f:
            f.writelines(keep)
        self.history = [json.loads(line) for line in keep]

    def write(self, record: Dict[str, Any]) -> None:
        record = {k: to_float(v) for k, v in record.items()}
        self.history.append(record)
        if self.path is not None:
            os.makedirs(os.path.dirname(os.path.abspath(self.path)), exist_ok=True)
            with open(self.path, "a") as f:
                f.write(json.dumps(record, allow_nan=True) + "\n")
        step = record.get("step", len(self.history))
        if self.progress:
            self._bar(step, record)
        if self.log_every and (step % self.log_every == 0 or step == self.total):
            self._line(record)

    def _bar(self, step: int, record: Dict[str, Any]) -> None:
        width = 24
        done = int(width * step / max(self.total, 1))
        elapsed = time.perf_counter() - self.t0
        loss = record.get("loss")
        loss_s = f" loss {loss:.4f}" if isinstance(loss, float) and math.isfinite(loss) else ""
        end = "\n" if step >= self.total else ""
        self.stream.write(f"\r{self.prefix}[{'#' * done}{'.' * (width - done)}] {step}/{self.total}"
                          f"{loss_s} {elapsed:.0f}s{end}")
        self.stream.flush()

    def _line(self, record: Dict[str, Any]) -> None:
        parts = []
        for k, v in record.items():
            if isinstance(v, float):
                parts.append(f"{k}={v:.4g}")
            elif v is not None:
                parts.append(f"{k}={v}")
        if self.progress:
            self.stream.write("\r")
        self.stream.write(f"{self.prefix}{' '.join(parts)}\n")
        self.stream.flush()
