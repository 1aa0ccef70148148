"""The distributed test harness itself: results, failures, deaths and hangs are all reported."""

from __future__ import annotations

import os
import time

import pytest
import torch
import torch.distributed as dist

from opsd_megatron.testing import DistributedRunError, run_distributed


def _sum_ranks(scale):
    t = torch.tensor([float(dist.get_rank() + 1)])
    dist.all_reduce(t)
    return {
        "rank": dist.get_rank(),
        "world": dist.get_world_size(),
        "sum": t * scale,
        "threads": torch.get_num_threads(),
    }


def _fail_on_rank_one():
    if dist.get_rank() == 1:
        raise ValueError("boom on purpose")
    dist.barrier()


def _die_on_rank_zero():
    if dist.get_rank() == 0:
        os._exit(3)
    dist.barrier()


def _hang():
    time.sleep(600)


def test_results_come_back_in_rank_order():
    out = run_distributed(_sum_ranks, 3, 2.0)
    assert [o["rank"] for o in out] == [0, 1, 2]
    assert all(o["world"] == 3 and o["threads"] == 1 for o in out)
    assert all(torch.equal(o["sum"], torch.tensor([12.0])) for o in out)


def test_rank_exception_fails_with_its_traceback():
    with pytest.raises(DistributedRunError, match=r"(?s)rank 1.*ValueError: boom on purpose"):
        run_distributed(_fail_on_rank_one, 2, timeout=60)


def test_dead_rank_is_reported_with_exit_code():
    with pytest.raises(DistributedRunError, match="rank 0 ---\nprocess exited with code 3"):
        run_distributed(_die_on_rank_zero, 2, timeout=60)


def test_hang_times_out():
    """The harness's own timeout ends the hang (no wall-clock assertion: the message says it
    fired)."""
    with pytest.raises(DistributedRunError, match="still running after 3 s"):
        run_distributed(_hang, 2, timeout=3)
