"""Run a function on N real local processes joined by a gloo process group; collect what each
returns.

Used by every distributed test (sharded code runs for real, no mocked collectives, and per-rank
results are compared with a single-process reference) and by the tools when they run on one
machine without torchrun (e.g. checkpoint conversion at TP=2 on CPU).

* Processes come from a ``forkserver`` that preloads torch and megatron-core once, so each rank
  starts in ~0.1 s yet never inherits OpenMP threads from the pytest process (fork-after-OpenMP
  can hang).
* Rendezvous uses a ``TCPStore`` opened by the parent on 127.0.0.1 with an OS-chosen port, so
  concurrent runs never race for a port.
* Each rank runs with one intra-op thread, like one GPU per rank.
* Any rank that raises, dies, or is still running at the timeout fails the run with that rank's
  traceback (or exit code); all ranks are then killed so nothing hangs the suite.
"""

from __future__ import annotations

import faulthandler
import multiprocessing as mp
import os
import pickle
import queue
import signal
import time
import traceback
from datetime import timedelta
from typing import Any, Callable

import psutil
import torch
import torch.distributed as dist

_PRELOAD = ["torch", "torch.distributed", "megatron.core", "opsd_megatron"]


class DistributedRunError(RuntimeError):
    """A rank failed, died or timed out; the message holds each failing rank's report.
    ``user_error``: the first rank's message when it failed on a user error (bad input), else
    None."""

    def __init__(self, message: str, user_error: str | None = None):
        super().__init__(message)
        self.user_error = user_error


def _rank_main(fn, rank, world_size, port, args, kwargs, results, threads):
    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        RANK=str(rank),
        LOCAL_RANK=str(rank),
        WORLD_SIZE=str(world_size),
        OMP_NUM_THREADS=str(threads),
    )
    torch.set_num_threads(threads)
    try:
        store = dist.TCPStore(
            "127.0.0.1", port, world_size, is_master=False, timeout=timedelta(seconds=60)
        )
        dist.init_process_group(
            "gloo", store=store, rank=rank, world_size=world_size, timeout=timedelta(seconds=120)
        )
        out = fn(*args, **kwargs)
        # Plain pickle copies tensor data by value; torch's shared-memory reducers would hand the
        # parent file descriptors that vanish when this process exits.
        results.put((rank, "ok", pickle.dumps(out)))
    except BaseException as err:  # noqa: BLE001 - everything must reach the parent
        from opsd_megatron.errors import user_error_of

        results.put((rank, "error", (traceback.format_exc(), user_error_of(err))))
    finally:
        try:
            from megatron.core import parallel_state

            parallel_state.destroy_model_parallel()
        except Exception:  # noqa: BLE001
            pass
        if dist.is_initialized():
            dist.destroy_process_group()


def _stop(procs, grace_s: float, reap_s: float = 30.0) -> None:
    """Give the ranks ``grace_s`` to exit, then kill every one left at once (not one by one: a
    rank left running while another is reaped keeps training and writing). A killed rank may
    take seconds to vanish — a thread in an fsync of a checkpoint finishes its write first — so
    the reaping shares one deadline."""
    deadline = time.monotonic() + grace_s
    for p in procs:
        p.join(timeout=max(0.0, deadline - time.monotonic()))
    alive = [p for p in procs if p.is_alive()]
    for p in alive:
        _kill_tree(p.pid)
    deadline = time.monotonic() + reap_s
    for p in alive:
        p.join(timeout=max(0.0, deadline - time.monotonic()))


def _kill_tree(pid: int) -> None:
    """Kill a rank and whatever it started (e.g. checkpoint writer processes), so nothing
    lingers."""
    try:
        proc = psutil.Process(pid)
        for child in proc.children(recursive=True) + [proc]:
            child.kill()
    except psutil.NoSuchProcess:
        pass


# After Ctrl-C or SIGTERM the launcher kills the ranks and exits within seconds; should anything
# in that teardown block, a watchdog dumps every thread's stack to stderr and exits after this.
TEARDOWN_WATCHDOG_S = 60.0


def _exit_on_signals():
    """While ranks run, SIGTERM (``kill PID``) and SIGINT (Ctrl-C) unwind through
    ``run_distributed``'s ``finally``, which kills the ranks: by default SIGTERM would end this
    process at once and leave the ranks (the forkserver's children, not ours) running. Either
    signal also arms the teardown watchdog. Returns the handlers to restore, or None off the main
    thread, where handlers cannot be set."""

    def _unwind(signum, frame):
        faulthandler.dump_traceback_later(TEARDOWN_WATCHDOG_S, exit=True)
        if signum == signal.SIGINT:
            raise KeyboardInterrupt
        raise SystemExit(128 + signum)

    try:  # a signal the caller ignores (nohup, a background job's SIGINT) stays ignored
        return {
            sig: signal.signal(sig, _unwind)
            for sig in (signal.SIGTERM, signal.SIGINT)
            if signal.getsignal(sig) is not signal.SIG_IGN
        }
    except ValueError:
        return None


def _restore(previous) -> None:
    for sig, handler in (previous or {}).items():
        signal.signal(sig, handler if handler is not None else signal.SIG_DFL)


def _context():
    ctx = mp.get_context("forkserver")
    ctx.set_forkserver_preload(_PRELOAD)
    return ctx


def run_distributed(
    fn: Callable[..., Any],
    world_size: int,
    *args,
    timeout: float = 180.0,
    threads_per_rank: int = 1,
    **kwargs,
) -> list[Any]:
    """Run ``fn(*args, **kwargs)`` on ``world_size`` gloo ranks; return the per-rank results.

    ``fn`` must be importable by name (a module-level function) and its result picklable. The
    process group is initialised before ``fn`` runs and destroyed after.
    """
    ctx = _context()
    master = dist.TCPStore(
        "127.0.0.1",
        0,
        world_size + 1,
        is_master=True,
        wait_for_workers=False,
        timeout=timedelta(seconds=60),
    )
    results = ctx.Queue()
    procs = [
        ctx.Process(
            target=_rank_main,
            daemon=False,  # ranks may start helpers (dist_checkpointing)
            args=(fn, rank, world_size, master.port, args, kwargs, results, threads_per_rank),
        )
        for rank in range(world_size)
    ]
    for p in procs:
        p.start()
    previous = _exit_on_signals()
    reports: dict[int, tuple[str, Any]] = {}
    deadline = time.monotonic() + timeout
    grace_end = None  # after the first failure, collect the others' reports briefly, then stop
    try:
        while len(reports) < world_size:
            now = time.monotonic()
            if grace_end is not None and now > grace_end:
                break
            if now > deadline:
                for r in range(world_size):
                    reports.setdefault(
                        r, ("error", (f"still running after {timeout:.0f} s (hang?)", None))
                    )
                break
            try:
                rank, status, payload = results.get(timeout=0.2)
                reports[rank] = (status, payload)
            except queue.Empty:
                pass
            failing = any(st == "error" for st, _ in reports.values()) or any(
                p.exitcode not in (None, 0) for p in procs
            )
            if failing and grace_end is None:
                grace_end = time.monotonic() + 2.0
        for r, p in enumerate(procs):
            if r not in reports and p.exitcode not in (None, 0):
                reports[r] = ("error", (f"process exited with code {p.exitcode}", None))
        for r in range(world_size):
            reports.setdefault(
                r, ("error", ("did not report (stopped after another rank failed)", None))
            )
    # after success the ranks exit by themselves; after a failure or Ctrl-C they are killed
    finally:
        clean = len(reports) == world_size and all(st == "ok" for st, _ in reports.values())
        _stop(procs, grace_s=5.0 if clean else 0.5)
        _restore(previous)
        del master
    failed = {r: payload for r, (status, payload) in sorted(reports.items()) if status == "error"}
    if failed:
        text = "\n".join(f"--- rank {r} ---\n{msg}" for r, (msg, _) in failed.items())
        user = next((u for _, u in failed.values() if u), None)
        raise DistributedRunError(
            f"{len(failed)} of {world_size} ranks failed:\n{text}", user_error=user
        )
    return [pickle.loads(reports[r][1]) for r in range(world_size)]
