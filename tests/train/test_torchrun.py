"""The torchrun path (``platform/launch.py``: WORLD_SIZE set, this process is one rank): the
README's ``torchrun --nproc-per-node N -m opsd_megatron.train.cli RECIPE`` on CPU/gloo, TP=2, 2
steps; its first loss equals an fp64 HF-transformers recomputation on its own rollouts (as the
self-launched runs' do in test_e2e.py)."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
from pathlib import Path

from tests.train.tiny import RECIPE, metrics, overrides, reference_first_step_loss


def test_torchrun_two_ranks_train_and_match_the_fp64_reference(tmp_path):
    torchrun = Path(sys.executable).with_name("torchrun")
    assert torchrun.is_file() or shutil.which("torchrun"), "torch ships torchrun"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    with (
        socket.socket() as s
    ):  # a free port for the rendezvous (torchrun's static rendezvous needs one)
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    under = tmp_path / "torchrun"
    cmd = [
        str(torchrun),
        "--nproc-per-node",
        "2",
        "--master-port",
        str(port),
        "-m",
        "opsd_megatron.train.cli",
        RECIPE,
        *overrides(under, tp=2, steps=2),
        "logging.progress_bar=true",  # into a pipe: plain lines, not a redrawn bar
    ]
    proc = subprocess.Popen(
        cmd,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
        start_new_session=True,
    )  # its own process group: a hang kills the ranks too
    try:
        out, err = proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    assert proc.returncode == 0, err[-3000:]
    progress = [ln for ln in out.splitlines() if ln.startswith("[opsd] step ")]
    assert [ln.split(")")[0] for ln in progress] == [
        "[opsd] step 1/2 (50%",
        "[opsd] step 2/2 (100%",
    ]
    assert "\x1b" not in out and "\r" not in out, "no escape codes or carriage returns in a log"
    rows = metrics(under)
    assert [m["step"] for m in rows] == [1, 2] and all(m["skipped"] == 0 for m in rows)
    want = reference_first_step_loss(under)  # fp64 HF transformers on the run's own rollouts
    assert abs(rows[0]["loss"] - want) <= 1e-5 * abs(want), (rows[0]["loss"], want)
