"""Phase timers that mean the same on CUDA as on CPU."""

from __future__ import annotations

import time

import torch


def wall_clock(device: torch.device) -> float:
    """``time.perf_counter()`` after the device's queued work: CUDA kernels run asynchronously,
    so without the synchronize a phase's time would land in whichever phase next waits on it."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()
