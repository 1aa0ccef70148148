"""Kill the training process (SIGKILL, not an exception) after a checkpoint, resume, and get the
uninterrupted run's per-step metrics exactly."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

from opsd_megatron.testing import run_distributed
from opsd_megatron.train.cli import _rank_entry
from opsd_megatron.train.resolved import resolve
from tests.train.tiny import RECIPE, metrics, overrides

TIMING = {"tokens_per_s", "peak_memory_gib"}  # and every time/<phase>


def _train(out, steps):
    return [
        sys.executable,
        "-m",
        "opsd_megatron.train.cli",
        RECIPE,
        *overrides(out, tp=2, steps=steps),
    ]


def _strip(rows):
    return [{k: v for k, v in r.items() if not _timing(k)} for r in rows]


def _timing(key: str) -> bool:
    return key in TIMING or key.startswith("time/")


def test_kill_and_resume_reproduces_uninterrupted_metrics(tmp_path):
    steps = 4
    straight = tmp_path / "straight"  # in-process ranks: the same trainer, no CLI start-up
    run_distributed(_rank_entry, 2, resolve(RECIPE, _train(straight, steps)[4:], 2), timeout=300)

    killed = tmp_path / "killed"
    proc = subprocess.Popen(
        _train(killed, steps),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    deadline = time.monotonic() + 300
    while not (killed / "checkpoints" / "step_000002" / "trainer_state.json").exists():
        assert proc.poll() is None, "training ended before it could be killed"
        assert time.monotonic() < deadline
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    done = [r["step"] for r in metrics(killed)]
    assert done and done[-1] < steps, f"the kill came too late to test anything: {done}"

    subprocess.run(_train(killed, steps), check=True, capture_output=True, timeout=300)
    assert _strip(metrics(killed)) == _strip(metrics(straight))
    remaining = sorted(
        p.name for p in (killed / "checkpoints").iterdir() if p.name.startswith("step_")
    )
    assert remaining == ["step_000003", "step_000004"], "keep_last=2"


def test_resume_at_another_layout_reshards_weights_and_optimizer(tmp_path):
    """A TP=2 run checkpointed at step 2 continues at TP=1: adapters and AdamW moments reshard."""
    out = tmp_path / "run"
    subprocess.run(_train(out, 2), check=True, capture_output=True, timeout=300)
    cmd = [sys.executable, "-m", "opsd_megatron.train.cli", RECIPE, *overrides(out, tp=1, steps=4)]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    assert "resuming at {'tp': 1" in res.stdout
    rows = metrics(out)
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    assert all(r["skipped"] == 0 and r["grad_norm"] > 0 for r in rows)
