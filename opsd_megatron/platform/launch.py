"""Run an entry point on every rank: under torchrun (WORLD_SIZE set) this process is one rank
(NCCL on GPUs, gloo on CPU); otherwise ``world`` local gloo processes are started."""

from __future__ import annotations

import os
from datetime import timedelta

import torch
import torch.distributed as dist


def launched_world_size() -> int | None:
    """The world size torchrun/SLURM launched with, or None when opsd-train starts the ranks
    itself."""
    return int(os.environ["WORLD_SIZE"]) if "WORLD_SIZE" in os.environ else None


def run_ranks(entry, world: int, *args, threads_per_rank: int | None = None):
    """Run ``fn`` on every rank: this process under torchrun, else ``world`` local processes."""
    if launched_world_size() is not None:
        if torch.cuda.is_available():
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
        # a lost peer fails the job after this long instead of hanging it: gloo's collectives
        # time out; NCCL's watchdog aborts (TORCH_NCCL_ASYNC_ERROR_HANDLING=1, launch/common.sh)
        timeout = timedelta(seconds=float(os.environ.get("OPSD_COLLECTIVE_TIMEOUT_S", 1800)))
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo", timeout=timeout)
        try:
            return [entry(*args)]
        finally:
            dist.destroy_process_group()
    from opsd_megatron.platform.local_processes import run_distributed

    threads = threads_per_rank or max(
        1, (os.cpu_count() or 1) // world
    )  # share the cores between ranks
    return run_distributed(entry, world, *args, timeout=7 * 24 * 3600, threads_per_rank=threads)
