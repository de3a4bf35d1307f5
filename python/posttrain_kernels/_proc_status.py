"""Fields of ``/proc/self/status`` (Linux): the resident set and its high-water mark, for the
peak-memory figures of the benchmarks and the trainer."""
from __future__ import annotations

from typing import Optional


def status_kib(field: str) -> Optional[int]:
    """The value in KiB of a ``/proc/self/status`` field (``"VmRSS"``, ``"VmHWM"``), or None where
    it cannot be read (not Linux)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def reset_hwm() -> bool:
    """Reset ``VmHWM`` to the current resident set (``/proc/self/clear_refs``); False where that is
    not possible."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False
