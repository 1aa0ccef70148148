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


def job_id_of(res: subprocess.CompletedProcess) -> int:
    """The job id ``sbatch --parsable`` printed; when it printed none, sbatch's own words."""
    first = res.stdout.strip().split(";")[0].splitlines()[:1]
    if not first or not first[0].isdigit():
        raise AssertionError(
            f"sbatch printed no job id (exit {res.returncode}); stdout {res.stdout.strip()!r}, "
            f"stderr: {res.stderr.strip() or '(empty)'}"
        )
    return int(first[0])
