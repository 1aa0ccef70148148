"""The LR schedule (linear warmup, then cosine to min_lr, or constant) against torch's own
schedulers (LinearLR then CosineAnnealingLR), step by step, including after a state-dict reload."""

from __future__ import annotations

import pytest
import torch

from opsd_megatron.config import load_config
from opsd_megatron.train.optimizer import LRSchedule, lr_lambda
from tests.train.tiny import RECIPE


class _Groups:  # what LRSchedule touches of a megatron optimizer
    def __init__(self):
        self.param_groups = [{"lr": None}, {"lr": None}]


def _torch_reference(lr, min_lr, steps, warmup, schedule):
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=lr)
    after = (
        torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=steps - warmup, eta_min=min_lr)
        if schedule == "cosine"
        else torch.optim.lr_scheduler.ConstantLR(opt, factor=1.0, total_iters=0)
    )
    if warmup:
        ramp = torch.optim.lr_scheduler.LinearLR(
            opt, start_factor=1 / warmup, total_iters=warmup - 1
        )
        sched = torch.optim.lr_scheduler.SequentialLR(opt, [ramp, after], milestones=[warmup])
    else:
        sched = after
    values = []
    for _ in range(steps):
        values.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    return values


@pytest.mark.parametrize(
    "schedule,warmup_ratio,min_lr",
    [("cosine", 0.1, 0.0), ("cosine", 0.2, 1e-3), ("constant", 0.1, 0.0), ("cosine", 0.0, 0.0)],
)
def test_schedule_matches_torch_schedulers(schedule, warmup_ratio, min_lr):
    steps, lr = 50, 1e-2
    cfg = load_config(
        RECIPE,
        [
            f"trainer.max_steps={steps}",
            f"optimizer.lr={lr}",
            f"optimizer.min_lr={min_lr}",
            f"optimizer.warmup_ratio={warmup_ratio}",
            f"optimizer.schedule={schedule}",
        ],
    )
    groups = _Groups()
    ours = LRSchedule(groups, lr, lr_lambda(cfg))
    seen = []
    for _ in range(steps):
        assert groups.param_groups[0]["lr"] == groups.param_groups[1]["lr"]
        seen.append(groups.param_groups[0]["lr"])
        ours.step()
    ref = _torch_reference(lr, min_lr, steps, int(round(warmup_ratio * steps)), schedule)
    assert max(abs(a - b) for a, b in zip(seen, ref)) <= 1e-12 * lr, list(zip(seen, ref))[:12]
    resumed = LRSchedule(_Groups(), lr, lr_lambda(cfg))
    resumed.load_state_dict({"last_step": 17})
    assert resumed.optimizer.param_groups[0]["lr"] == seen[17]


def test_decay_steps_fix_the_horizon_whatever_max_steps():
    """optimizer.decay_steps (Megatron's --lr-decay-iters): a 30-step run and the first 30 steps
    of an 80-step run have the same rates when both decay over 80 steps, unlike without it."""
    over = ["optimizer.lr=1e-2", "optimizer.warmup_ratio=0.1", "optimizer.schedule=cosine"]

    def rates(max_steps, decay=None):
        extra = [f"optimizer.decay_steps={decay}"] if decay else []
        cfg = load_config(RECIPE, [*over, f"trainer.max_steps={max_steps}", *extra])
        f = lr_lambda(cfg)
        return [f(i) for i in range(30)]

    assert rates(30, 80) == rates(80, 80) == rates(80)
    assert rates(30) != rates(80)
