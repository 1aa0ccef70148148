"""Preemption: SLURM warns a job before stopping it (``--signal=B:USR1@120``); the batch script
(launch/common.sh) then touches ``OUT/PREEMPT``. A rank may also get SIGUSR1 itself. After the
current step all ranks agree (one all-reduce of a flag), write a checkpoint and stop with
``PREEMPTED_EXIT_CODE``, which the launch script turns into ``scontrol requeue``; the requeued job
resumes from that checkpoint."""

from __future__ import annotations

import signal
from pathlib import Path

import torch
import torch.distributed as dist

PREEMPTED_EXIT_CODE = 75  # EX_TEMPFAIL: "try again later"
FLAG_FILE = "PREEMPT"  # written by the launcher: please checkpoint and stop
STOPPED_FILE = "PREEMPTED"  # written by the trainer: stopped for preemption, requeue me
_received = False


def _handler(signum, frame):
    global _received
    _received = True


def install() -> None:
    signal.signal(signal.SIGUSR1, _handler)


def requested(output_dir: str, device: torch.device) -> bool:
    """Collective: True on every rank if any rank got SIGUSR1 or ``OUT/PREEMPT`` exists.
    ``device``: the rank's (NCCL reduces only accelerator tensors)."""
    flag_file = Path(output_dir) / FLAG_FILE
    local = _received or (dist.get_rank() == 0 and flag_file.exists())
    flag = torch.tensor([1.0 if local else 0.0], device=device)
    dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    return bool(flag.item())


def acknowledge(output_dir: str, step: int) -> None:
    """Rank 0, after the checkpoint: clear the request, leave the marker the launcher requeues
    on."""
    (Path(output_dir) / FLAG_FILE).unlink(missing_ok=True)
    (Path(output_dir) / STOPPED_FILE).write_text(f"{step}\n")


def clear_marker(output_dir: str) -> None:
    """Rank 0, at start: a (re)started run is no longer the preempted one."""
    (Path(output_dir) / STOPPED_FILE).unlink(missing_ok=True)
