"""launch/opsd_tiny.slurm on a real SLURM cluster (slurmctld + slurmd + munged on this machine,
started by `.ci/slurm_cluster.sh`): a job completes and writes its metrics and checkpoint; a job
preempted with USR1 checkpoints, requeues itself and the requeued run resumes to the end."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import time
from pathlib import Path

import pytest

from tests.launch.slurm_jobs import job as _job
from tests.launch.slurm_jobs import job_id_of

ROOT = Path(__file__).resolve().parents[2]
ARGS = [
    "trainer.global_batch_size=4",
    "trainer.micro_batch_size=2",
    "rollout.max_new_tokens=8",
    "logging.progress_bar=false",
    "logging.tensorboard=false",
    "checkpoint.save_interval=100",
]


def _cluster_up() -> str | None:
    if shutil.which("sbatch") is None:
        return (
            "SLURM is not installed (run .ci/slurm_cluster.sh as root to install and start a "
            "one-node cluster)"
        )
    try:
        idle = subprocess.run(
            ["sinfo", "-h", "-o", "%T"], capture_output=True, text=True, timeout=10
        ).stdout
    except subprocess.TimeoutExpired:
        return "sinfo timed out: no slurmctld answers (run .ci/slurm_cluster.sh)"
    return (
        None
        if "idle" in idle.split()
        else f"no idle SLURM node (sinfo: {idle.strip()!r}; run .ci/slurm_cluster.sh)"
    )


pytestmark = pytest.mark.skipif(_cluster_up() is not None, reason=str(_cluster_up()))


def _sbatch(
    tmp_path: Path, out: Path, *args: str, wait: bool = False
) -> tuple[int, subprocess.CompletedProcess]:
    env = {
        **os.environ,
        "PATH": f"{Path(os.sys.executable).parent}:{os.environ['PATH']}",
        "OPSD_OUTPUT_DIR": str(out),
    }
    cmd = (
        ["sbatch", "--parsable", f"--output={tmp_path}/slurm-%j.out"]
        + (["--wait"] if wait else [])
        + [str(ROOT / "launch" / "opsd_tiny.slurm"), *ARGS, *args]
    )
    res = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    return job_id_of(res), res


def _steps(out: Path) -> list[int]:
    return [int(m) for m in re.findall(r'"step": (\d+)', (out / "metrics.jsonl").read_text())]


def test_real_slurm_preemption_checkpoints_requeues_and_resumes(tmp_path):
    """(One job for both claims: it runs, is preempted, requeues and completes like any job.)"""
    out = tmp_path / "out"
    job_id, res = _sbatch(tmp_path, out, "trainer.max_steps=8")
    assert res.returncode == 0, res.stderr
    deadline = time.monotonic() + 300
    while not (out / "metrics.jsonl").is_file() or not _steps(out):
        assert time.monotonic() < deadline and _job(job_id).get("JobState") in (
            "PENDING",
            "RUNNING",
            "CONFIGURING",
        )
        time.sleep(0.2)
    # what `#SBATCH --signal=B:USR1@120` delivers before a preemption or the time limit
    subprocess.run(["scancel", "--signal=USR1", "--batch", str(job_id)], check=True)
    deadline = time.monotonic() + 600
    while (job := _job(job_id)).get("JobState") != "COMPLETED" or job.get("Restarts") != "1":
        assert time.monotonic() < deadline, f"job {job_id} not finished after requeue: {job}"
        assert job.get("JobState") not in ("FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL"), job
        time.sleep(1)
    log = (tmp_path / f"slurm-{job_id}.out").read_text()
    stopped_at = int((out / "PREEMPTED").read_text()) if (out / "PREEMPTED").exists() else None
    assert "stopped for preemption at step" in log and "resumed from" in log, log[-3000:]
    assert stopped_at is None, "the resumed run clears the preemption marker"
    assert job["ExitCode"] == "0:0"
    assert _steps(out) == list(range(1, 9)), (
        "the requeued run continues from the checkpoint, no step lost or repeated"
    )
    # ... and the job, as any completed one, leaves its metrics, checkpoint and lines
    assert (out / "checkpoints" / "step_000008" / "trainer_state.json").is_file()
    assert "[launch] job" in log and "[opsd] done" in log, log[-3000:]
