"""How much memory a piece of work takes at its peak, measured (not estimated from shapes).

CUDA: the caching allocator's peak over what was allocated before. CPU, on Linux: the process's
peak resident set (``VmHWM``), reset through ``/proc/self/clear_refs`` first, after glibc has given
its free pages back (``malloc_trim``), so that the work's allocations show as new pages. Other
threads' allocations meanwhile count too: measure before they start (the inference process
measures each model as it loads, before any model serves).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import gc
from collections.abc import Callable
from pathlib import Path

import torch

STATUS = Path("/proc/self/status")


def _vm(field: str) -> int:
    for line in STATUS.read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise OSError(f"no {field} in {STATUS}")


def _trim() -> None:
    try:
        ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def peak_bytes(fn: Callable[[], object], device: torch.device | str = "cpu") -> int | None:
    """Run ``fn()`` -> the bytes it added at its peak over what was in use before; None where this
    platform cannot tell (a CPU without /proc's peak reset)."""
    device = torch.device(device)
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        before = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        fn()
        torch.cuda.synchronize(device)
        return max(0, torch.cuda.max_memory_allocated(device) - before)
    try:
        _trim()
        Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS
        before = _vm("VmRSS")
        fn()
        return max(0, _vm("VmHWM") - before)
    except OSError:
        return None
