"""The launcher's teardown (platform/local_processes.py): every rank left is killed at once, and
after Ctrl-C or SIGTERM a watchdog ends a teardown that blocks, with every thread's stack on
stderr, instead of hanging the terminal (the real Ctrl-C and SIGTERM runs are in
tests/train/test_preemption.py)."""

from __future__ import annotations

import multiprocessing as mp
import signal
import subprocess
import sys
import textwrap
import time

from opsd_megatron.platform import local_processes


class _Rank:
    """A rank that never exits by itself; records the launcher's calls."""

    def __init__(self, pid, events):
        self.pid, self.events, self.killed = pid, events, False

    def join(self, timeout=None):
        self.events.append(("join", self.pid, timeout))
        if not self.killed:
            time.sleep(timeout)  # waits it out, as a live rank does

    def is_alive(self):
        return not self.killed


def test_stop_kills_every_rank_left_at_once(monkeypatch):
    """One grace period for all ranks, then every kill before any reaping: none trains on while
    another is waited for."""
    events = []
    ranks = [_Rank(pid, events) for pid in (11, 12, 13)]

    def kill(pid):
        events.append(("kill", pid, None))
        next(r for r in ranks if r.pid == pid).killed = True

    monkeypatch.setattr(local_processes, "_kill_tree", kill)
    local_processes._stop(ranks, grace_s=0.5, reap_s=20)
    kinds = [e[0] for e in events]
    assert kinds == ["join"] * 3 + ["kill"] * 3 + ["join"] * 3, events
    assert sum(e[2] for e in events[:3]) <= 0.5 + 1e-3  # the grace is shared, not per rank
    assert all(e[2] <= 20 for e in events[6:])  # one reaping deadline


def test_a_real_rank_is_killed_and_reaped():
    ctx = mp.get_context("spawn")
    p = ctx.Process(target=time.sleep, args=(600,))
    p.start()
    local_processes._stop([p], grace_s=0.2)
    assert not p.is_alive() and p.exitcode == -9


def test_a_blocked_teardown_after_ctrl_c_ends_with_the_stacks():
    script = textwrap.dedent(
        """
        import os, signal, time
        from opsd_megatron.platform import local_processes as lp
        lp.TEARDOWN_WATCHDOG_S = 1.0
        lp._exit_on_signals()
        try:
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(5)
        except KeyboardInterrupt:
            time.sleep(60)  # a teardown that blocks
        """
    )
    t0 = time.monotonic()
    run = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=50,
        preexec_fn=terminal_sigint,
    )  # fmt: skip
    assert time.monotonic() - t0 < 40, "the watchdog did not end the blocked teardown"
    assert run.returncode == 1, run.stderr
    assert "Timeout (0:00:01)!" in run.stderr, run.stderr  # faulthandler's dump ...
    assert 'File "<string>", line 10' in run.stderr, run.stderr  # ... names the blocked line


def terminal_sigint() -> None:
    """In the child: SIGINT as a terminal gives it. A shell starting the suite in the background
    (``pytest ... &``) ignores SIGINT, every child inherits that, and an ignored SIGINT stays
    ignored on purpose (the test below)."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def test_an_ignored_sigint_stays_ignored():
    script = textwrap.dedent(
        """
        import signal
        from opsd_megatron.platform import local_processes as lp
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        previous = lp._exit_on_signals()
        assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN, "nohup'd run now dies on ^C"
        assert signal.SIGTERM in previous and signal.SIGINT not in previous
        lp._restore(previous)
        assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL
        """
    )
    run = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert run.returncode == 0, run.stderr
