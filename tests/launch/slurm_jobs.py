"""What the real-SLURM tests ask the cluster about a job."""

from __future__ import annotations

import re
import subprocess


def job(job_id: int) -> dict:
    """``scontrol show job``'s fields (JobState, Restarts, ExitCode, NumNodes, ...)."""
    text = subprocess.run(
        ["scontrol", "show", "job", str(job_id)], capture_output=True, text=True
    ).stdout
    return dict(re.findall(r"(\w+)=(\S*)", text))


def job_id_of(stdout: str) -> int:
    """The job id ``sbatch --parsable`` printed."""
    return int(stdout.strip().split(";")[0].splitlines()[0])
