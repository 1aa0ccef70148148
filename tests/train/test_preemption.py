"""Preemption: SIGUSR1 to the launcher (as SLURM's --signal=B:USR1 delivers it to the batch step)
makes every rank checkpoint after the current step and exit with code 75; rerunning resumes there
and finishes."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time

from tests.platform.test_local_processes import terminal_sigint
from tests.train.tiny import RECIPE, metrics, overrides

# every checkpoint stays: the tests wait for step 1's, which keep_last would prune within two
# steps — a window a loaded machine's polling can miss now that steps are fast
KEEP_ALL = ["checkpoint.keep_last=100"]


def test_sigusr1_checkpoints_and_exits_for_requeue(tmp_path):
    out = tmp_path / "run"
    cmd = [
        sys.executable,
        "-m",
        "opsd_megatron.train.cli",
        RECIPE,
        *overrides(out, tp=2, steps=6, extra=["checkpoint.save_interval=100"]),
    ]
    proc = subprocess.Popen(
        cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True
    )
    deadline = time.monotonic() + 300
    while not (out / "metrics.jsonl").exists() or not (out / "metrics.jsonl").read_text().strip():
        assert proc.poll() is None and time.monotonic() < deadline
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGUSR1)
    assert proc.wait(timeout=300) == 75
    assert (out / "PREEMPTED").is_file(), "the marker launch/common.sh requeues on"
    saved = sorted(p.name for p in (out / "checkpoints").iterdir() if p.name.startswith("step_"))
    assert len(saved) == 1 and saved[0] < "step_000006", saved
    stopped_at = int(saved[0].split("_")[1])
    assert [r["step"] for r in metrics(out)][-1] == stopped_at

    (out / "PREEMPT").touch()  # the file form, as launch/common.sh writes it: honoured and cleared
    assert subprocess.run(cmd, capture_output=True, timeout=300).returncode == 75
    assert not (out / "PREEMPT").exists()
    assert subprocess.run(cmd, capture_output=True, timeout=300).returncode == 0
    assert not (out / "PREEMPTED").exists()
    assert [r["step"] for r in metrics(out)] == list(range(1, 7))


def _group_members(pgid: int, wait_s: float) -> list[str]:
    """Command lines of the processes still in process group ``pgid`` after up to ``wait_s``."""
    import psutil

    deadline = time.monotonic() + wait_s
    while True:
        left = []
        for p in psutil.process_iter(["pid", "cmdline"]):
            with contextlib.suppress(psutil.Error, ProcessLookupError):
                if os.getpgid(p.pid) == pgid and p.status() != psutil.STATUS_ZOMBIE:
                    left.append(f"{p.pid}: {' '.join(p.info['cmdline'] or [])[:160]}")
        if not left or time.monotonic() > deadline:
            return left
        time.sleep(0.5)


def test_ctrl_c_exits_130_with_one_line_and_keeps_checkpoints(tmp_path):
    import signal as sig

    out = tmp_path / "run"
    cmd = [
        sys.executable,
        "-m",
        "opsd_megatron.train.cli",
        RECIPE,
        *overrides(out, tp=2, steps=50, extra=KEEP_ALL),
    ]
    # stderr to a file, not a pipe: what a terminal user sees is the launcher's exit, and a pipe
    # would also wait for any straggler that inherited it
    err_file = tmp_path / "stderr.txt"
    with err_file.open("w") as err_out:
        proc = subprocess.Popen(
            cmd, stdout=subprocess.DEVNULL, stderr=err_out, text=True, start_new_session=True,
            preexec_fn=terminal_sigint,
        )  # fmt: skip
    deadline = time.monotonic() + 300
    while not (out / "checkpoints" / "step_000001" / "trainer_state.json").exists():
        assert proc.poll() is None and time.monotonic() < deadline, "training ended before Ctrl-C"
        time.sleep(0.1)
    os.killpg(proc.pid, sig.SIGINT)  # what a terminal's Ctrl-C sends: the whole process group
    try:
        proc.wait(timeout=120)
    except subprocess.TimeoutExpired:  # never leave the ranks behind; say where it stood
        os.killpg(proc.pid, sig.SIGKILL)
        proc.wait()
        raise AssertionError(
            f"still running 120 s after Ctrl-C; its stderr ended with: "
            f"{err_file.read_text()[-3000:]}"
        ) from None
    left = _group_members(proc.pid, wait_s=30)  # the ranks and their helpers go with it
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, sig.SIGKILL)
    err = err_file.read_text()
    assert not left, f"left running 30 s after the launcher exited: {left}"
    assert proc.returncode == 130
    assert "Traceback" not in err and err.strip().splitlines()[-1] == "opsd-train: interrupted"
    assert (out / "checkpoints" / "step_000001" / "trainer_state.json").is_file()


def test_sigterm_to_the_launcher_takes_its_ranks_with_it(tmp_path):
    """``kill PID`` of opsd-train (SIGTERM to the launcher alone, not its group): the ranks — the
    forkserver's children, not the launcher's — are killed too instead of training on unseen
    (found when a killed launcher left a SmolLM2 rank running for 45 minutes)."""
    import signal as sig

    out = tmp_path / "run"
    cmd = [
        sys.executable,
        "-m",
        "opsd_megatron.train.cli",
        RECIPE,
        *overrides(out, tp=2, steps=50, extra=KEEP_ALL),
    ]
    proc = subprocess.Popen(
        cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True
    )
    try:
        deadline = time.monotonic() + 300
        while not (out / "checkpoints" / "step_000001" / "trainer_state.json").exists():
            assert proc.poll() is None and time.monotonic() < deadline, "training ended early"
            time.sleep(0.1)
        proc.send_signal(sig.SIGTERM)
        proc.wait(timeout=120)
        left = _group_members(proc.pid, wait_s=30)
        assert not left, f"left running after the launcher got SIGTERM: {left}"
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, sig.SIGKILL)
