"""What one training step costs, one meter for Table 3 (tasks/experiment.py) and
benchmarks/step_overhead.py.

Time: wall time of `method.step` on a batch, synchronised on CUDA. Memory: the peak during one step
— on CPU the process's resident set (Linux VmHWM, reset before the step, weights included, as a
GPU's peak memory would be), on CUDA the peak allocated memory — and how far it rose above what
was resident before the step.
"""
from __future__ import annotations

import ctypes
import time
from pathlib import Path

import torch

from iga.train.methods import Method
from iga.train.sft import Batch


def _status_mib(field: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024  # kB
    raise RuntimeError(f"no {field} in /proc/self/status")


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def step_time(method: Method, batch: Batch, device: torch.device) -> float:
    """Seconds for one step, gradients cleared before it."""
    method.model.zero_grad(set_to_none=True)
    _sync(device)
    t0 = time.perf_counter()
    method.step(batch)
    _sync(device)
    return time.perf_counter() - t0


def step_memory(method: Method, batch: Batch, device: torch.device) -> tuple[float, float]:
    """(peak MiB during one step, MiB it rose above what was in use before the step)."""
    method.model.zero_grad(set_to_none=True)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device) / 2**20
        method.step(batch)
        torch.cuda.synchronize(device)
        peak = torch.cuda.max_memory_allocated(device) / 2**20
        return peak, peak - before
    # Give freed heap back to the OS, then restart the peak counter (Linux clear_refs 5): the peak is
    # this step's, not an earlier one's. (getrusage's ru_maxrss cannot be reset, and a spawned child
    # inherits its parent's.)
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    Path("/proc/self/clear_refs").write_text("5")
    before = _status_mib("VmRSS")
    method.step(batch)
    peak = _status_mib("VmHWM")
    return peak, peak - before
