"""The multi-node path every cluster job takes, for real: ``launch/opsd_70b.slurm``'s shape (one
``srun`` task per node, ``torchrun --nnodes 4`` with the c10d rendezvous on the first node from
``scontrol show hostnames``) on the four-node SLURM cluster of ``.ci/slurm_cluster.sh`` (nodes
n1..n4 on this machine), with the tiny recipe at TP2 x PP2, one gloo rank per node
(``GPUS_PER_NODE=0 PROCS_PER_NODE=1``: the torchrun path less CUDA).

A four-node job preempted by USR1 checkpoints on every node, requeues itself and resumes, and
its losses equal the same recipe's in one process group on one node (the local launcher) to fp32
round-off; a node lost mid-run ends the job within seconds (``srun --kill-on-bad-exit``; a hung
collective would end after ``OPSD_COLLECTIVE_TIMEOUT_S``), its log names the node, the last
complete checkpoint verifies and a two-node resubmission resumes from it (resharded to PP1);
``scancel`` of that running job leaves no process of it.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.launch.slurm_jobs import job as _job
from tests.launch.slurm_jobs import job_id_of

ROOT = Path(__file__).resolve().parents[2]
NODES = 4
TINY = [
    "parallel.tensor_model_parallel_size=2",
    "parallel.pipeline_model_parallel_size=2",
    "trainer.global_batch_size=4",
    "trainer.micro_batch_size=2",
    "rollout.max_new_tokens=8",
    "logging.progress_bar=false",
    "logging.tensorboard=false",
    "checkpoint.save_interval=1",
    "checkpoint.keep_last=10",
]


def _nodes_up() -> str | None:
    try:
        out = subprocess.run(
            ["sinfo", "-h", "-N", "-o", "%N %T"], capture_output=True, text=True, timeout=10
        ).stdout
    except (OSError, subprocess.TimeoutExpired):
        return "no SLURM cluster answers (run .ci/slurm_cluster.sh)"
    idle = [line for line in out.splitlines() if line.endswith(" idle")]
    if len(idle) < NODES:
        return f"needs {NODES} idle SLURM nodes, sinfo says {out.strip()!r} (.ci/slurm_cluster.sh)"
    return None


pytestmark = pytest.mark.skipif(_nodes_up() is not None, reason=str(_nodes_up()))


def _env(out: Path) -> dict:
    return {
        **os.environ,
        "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}",
        "OPSD_OUTPUT_DIR": str(out),
        "RECIPE": "recipes/tiny_cpu.yaml",
        "GPUS_PER_NODE": "0",
        "PROCS_PER_NODE": "1",
        "OMP_NUM_THREADS": "1",  # four nodes share this machine's cores
        "OPSD_COLLECTIVE_TIMEOUT_S": "60",
    }


def _sbatch(tmp_path: Path, out: Path, *args: str, nodes: int = NODES, wait: bool = False):
    """Submit launch/opsd_70b.slurm as a user would, less its GPUs; returns (job id, result)."""
    cmd = [
        "sbatch", "--parsable", f"--nodes={nodes}", "--gpus-per-node=0",
        f"--output={tmp_path}/slurm-%j.out", *(["--wait"] if wait else []),
        str(ROOT / "launch" / "opsd_70b.slurm"), *TINY, *args,
    ]  # fmt: skip
    res = subprocess.run(cmd, cwd=ROOT, env=_env(out), capture_output=True, text=True, timeout=900)
    return job_id_of(res), res


def _losses(out: Path) -> list[float]:
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in rows]


def _job_processes(out: Path) -> list[str]:
    ps = subprocess.run(["ps", "-eww", "-o", "pid,args"], capture_output=True, text=True).stdout
    return [line for line in ps.splitlines() if str(out) in line and "ps -eww" not in line]


def _wait_for_steps(out: Path, job_id: int, n: int, limit: float = 300) -> None:
    deadline = time.monotonic() + limit
    while not (out / "metrics.jsonl").is_file() or len(_losses(out)) < n:
        state = _job(job_id).get("JobState")
        assert time.monotonic() < deadline and state in ("PENDING", "RUNNING", "CONFIGURING"), state
        time.sleep(0.5)


@pytest.fixture(scope="module")
def straight(tmp_path_factory) -> list[float]:
    """The recipe's losses in one process group on one node (the local launcher), 5 steps."""
    out = tmp_path_factory.mktemp("straight")
    ran = subprocess.run(
        [sys.executable, "-m", "opsd_megatron.train.cli", "recipes/tiny_cpu.yaml", *TINY,
         "trainer.max_steps=5", f"trainer.output_dir={out}"],
        cwd=ROOT, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert ran.returncode == 0, ran.stderr[-3000:]
    return _losses(out)


def test_a_preempted_four_node_job_requeues_resumes_and_equals_one_node(tmp_path, straight):
    """USR1 to the batch step (what ``--signal=B:USR1@900`` sends) after step 1: every rank
    checkpoints, the whole four-node job requeues itself, the rerun resumes — and the losses of
    the five steps equal the one-node run's to fp32 round-off."""
    out = tmp_path / "preempted"
    job_id, res = _sbatch(tmp_path, out, "trainer.max_steps=5")
    assert res.returncode == 0, res.stderr
    _wait_for_steps(out, job_id, 1)
    subprocess.run(["scancel", "--signal=USR1", "--batch", str(job_id)], check=True)
    deadline = time.monotonic() + 600
    while (job := _job(job_id)).get("JobState") != "COMPLETED" or job.get("Restarts") != "1":
        assert time.monotonic() < deadline, f"job {job_id} not finished after requeue: {job}"
        assert job.get("JobState") not in ("FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL"), job
        assert job.get("JobState") != "COMPLETED", f"finished without a requeue: {job}"
        time.sleep(1)
    log = (tmp_path / f"slurm-{job_id}.out").read_text()
    assert "rendezvous n1:" in log, log[:2000]  # the first node of n[1-4], by name
    assert "stopped for preemption at step" in log and "resumed from" in log, log[-3000:]
    assert job["NumNodes"] == str(NODES) and job["ExitCode"] == "0:0", job
    got = _losses(out)
    assert len(got) == len(straight) == 5, (got, straight)
    assert max(abs(a - b) for a, b in zip(got, straight)) <= 1e-6 * max(map(abs, straight)), (
        got,
        straight,
    )
    for step in range(1, 6):  # ranks on four nodes wrote one complete checkpoint per step
        assert (out / "checkpoints" / f"step_{step:06d}" / "trainer_state.json").is_file()


def _node_ranks(node: str, out: Path) -> list[int]:
    """PIDs of this job's training ranks on ``node`` (their environment says where; their
    arguments name the job's output directory: another test's job may share the node)."""
    pids = []
    for proc in Path("/proc").iterdir():
        try:
            env = (proc / "environ").read_bytes().split(b"\0")
            args = (proc / "cmdline").read_bytes()
        except (OSError, ValueError):
            continue
        if f"SLURMD_NODENAME={node}".encode() in env and str(out).encode() in args:
            if b"torchrun" not in args:
                pids.append(int(proc.name))
    return pids


def test_a_lost_node_ends_the_job_and_a_smaller_resubmission_resumes_until_scancel(tmp_path):
    """The ranks of n4 killed mid-run: the job fails within a bounded time (no hang), its log
    names the node, and the last complete checkpoint verifies. A two-node resubmission (TP2 x
    PP1: fewer nodes, as after a requeue) resumes from it, resharding the four-node checkpoint;
    ``scancel`` of that running job then leaves no process of it. (One job per claim would start
    four more ranks per claim: these share two jobs.)"""
    from opsd_megatron.train.checkpointing import candidates, problems_with

    out = tmp_path / "lost"
    job_id, res = _sbatch(tmp_path, out, "trainer.max_steps=200")
    assert res.returncode == 0, res.stderr
    _wait_for_steps(out, job_id, 2)
    victims = _node_ranks("n4", out)
    assert victims, "no rank found on n4"
    t0 = time.monotonic()
    for pid in victims:
        os.kill(pid, 9)
    while _job(job_id).get("JobState") in ("RUNNING", "COMPLETING", "CONFIGURING"):
        assert time.monotonic() - t0 < 180, "the job hangs after losing a node"
        time.sleep(0.5)
    ended_s = time.monotonic() - t0
    log = (tmp_path / f"slurm-{job_id}.out").read_text()
    assert _job(job_id)["JobState"] in ("FAILED", "NODE_FAIL", "CANCELLED"), _job(job_id)
    assert "n4" in log, log[-3000:]
    # the killed job's processes exit (a rank on a surviving node waits out its collective's
    # failure; under a full suite on 2 cores that took over 30 s)
    deadline = time.monotonic() + 120
    while _job_processes(out):
        assert time.monotonic() < deadline, _job_processes(out)
        time.sleep(0.5)
    cfg = _cfg(out)
    newest = next(d for d in candidates(cfg) if not problems_with(d))
    step = int(newest.name.split("_")[1])
    print(f"lost node: the job ended {ended_s:.0f} s after its ranks died")

    job2, res = _sbatch(
        tmp_path, out, "trainer.max_steps=200", "parallel.pipeline_model_parallel_size=1", nodes=2
    )
    assert res.returncode == 0, res.stderr
    # step + 2: a line the killed job cannot have written (it logged at most one step past its
    # newest complete checkpoint)
    _wait_for_steps(out, job2, step + 2)
    log2 = (tmp_path / f"slurm-{job2}.out").read_text()
    assert f"resumed from {newest} at step {step}" in log2, log2[-3000:]
    assert "'pp': 2" in log2 and "'pp': 1" in log2, log2[-3000:]  # resharded, and says so
    assert _job(job2)["NumNodes"] == "2" and len(_job_processes(out)) >= 2, _job_processes(out)
    subprocess.run(["scancel", str(job2)], check=True)
    deadline = time.monotonic() + 60
    while _job_processes(out):
        assert time.monotonic() < deadline, _job_processes(out)
        time.sleep(0.5)
    while (state := _job(job2).get("JobState")) == "COMPLETING":  # slurmd's epilogue
        assert time.monotonic() < deadline + 60, state
        time.sleep(0.5)
    assert state == "CANCELLED", state


def _cfg(out: Path):
    from opsd_megatron.config import load_config

    return load_config(ROOT / "recipes" / "tiny_cpu.yaml", [*TINY, f"trainer.output_dir={out}"])
