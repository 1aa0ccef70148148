"""Micro-batches by token budget (``trainer.micro_batch_tokens``): the step's rows, longest first,
grouped so that rows x the group's longest sequence stays within the budget, each group padded
only to its own longest row. The same rollouts (cut to lengths 1..8 so that every group differs)
go through the padded path and the budgeted one in real multi-process runs; every trainable
parameter's gradient shard and every logged statistic are compared:

* TP2 with sequence parallelism, LoRA: OPSD, SFT, GRPO (fixed advantages: a random model earns
  no reward);
* PP2, full-parameter training (frozen-copy teacher): the pipeline sends each micro-batch's shape
  ahead of it (``variable_seq_lengths``);
* TP2 x PP2, LoRA.

Tolerance 1e-5 absolute (fp32); measured ≤ 2e-7 on gradients and ≤ 3e-6 on statistics (the summation
order changes with the grouping); the statistics are token means over the step, so the old mean of
per-micro-batch means (0.10 off here, groups of 3+1 against 2+2) fails. The budget must actually
regroup: each case checks that the micro-batch shapes differ from the padded path's and stay within
the budget."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from opsd_megatron.algorithms.step_data import micro_batches, token_budget_groups
from opsd_megatron.config import ConfigError, load_config
from opsd_megatron.testing import run_distributed
from tests.train.tiny import RECIPE, overrides

TOL, BUDGET = 1e-5, 360
FULL = ["lora=null", "teacher.weights=frozen_copy"]


def _both_ways(tp, pp, extra):
    from opsd_megatron.algorithms import build_algorithm
    from opsd_megatron.losses import global_normalizer
    from opsd_megatron.models.loss_contract import finalize_gradients
    from opsd_megatron.train.components import build_components
    from opsd_megatron.train.metrics import share_stats
    from opsd_megatron.train.optimizer import zero_grads
    from opsd_megatron.train.step import student_pass
    from tests.train.tiny import rank_layout

    cfg = load_config(
        RECIPE,
        overrides("/tmp/unused-budget", tp, pp, extra=["model.dtype=float32", "grpo.group_size=2",
                                                       f"trainer.micro_batch_tokens={BUDGET}",
                                                       *extra]),
    )  # fmt: skip
    c = build_components(cfg, rank_layout(cfg))
    report = {}
    for algorithm in ("opsd", "sft", "grpo"):
        run = dataclasses.replace(cfg, algorithm=algorithm)
        rollouts, results = None, []
        for budget in (None, BUDGET):
            source = dataclasses.replace(c.algorithm.source, micro_batch_tokens=budget)
            alg = build_algorithm(run, source, c.teacher, c.arch.vocab_size)
            rollouts = rollouts or _varied(alg.rollout(0))
            mbs = alg.score(rollouts).micro_batches
            if algorithm == "grpo":  # fixed per-row advantages and the full mask
                n = len(rollouts.responses)
                for mb in mbs:
                    rows = torch.tensor(mb.rows)
                    mb.advantages_B = torch.linspace(-1.0, 1.0, n)[rows]
                    r_max = mb.response_mask_BR.shape[1]
                    lengths = torch.tensor(mb.student.response_lengths)
                    mb.response_mask_BR = torch.arange(r_max)[None, :] < lengths[:, None]
            norm = global_normalizer([m.response_mask_BR for m in mbs], cfg.loss.reduction,
                                     c.groups.dp)  # fmt: skip
            zero_grads(c.ddp, c.optimizer)
            stats = student_pass(dataclasses.replace(c, cfg=run), alg, mbs, norm)
            finalize_gradients(c.ddp)
            keys = sorted(k for k in stats.means if k != "loss")
            keys = _same_keys(keys, c)
            shared = share_stats(stats, ["loss", *keys], {"loss"}, c.groups)
            grads = {
                n: p.main_grad.detach().clone()
                for n, p in c.model.named_parameters()
                if p.requires_grad
            }
            shapes = [tuple(mb.student.tokens_BT.shape) for mb in mbs]
            results.append((shared, grads, shapes))
        (s0, g0, shapes0), (s1, g1, shapes1) = results
        report[algorithm] = {
            "stats": max(abs(s0[k] - s1[k]) for k in s0),
            "grads": max(float((g0[n] - g1[n]).abs().max()) for n in g0),
            "grad_scale": max(float(g0[n].abs().max()) for n in g0),
            "padded": shapes0,
            "budgeted": shapes1,
        }
    return report


def _same_keys(keys, c):
    """The statistic names, the same on every rank (off the last stage the dict is empty)."""
    import torch.distributed as dist

    everyone = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, keys)
    return max(everyone, key=len)


def _varied(rollouts):
    """The step's rollouts cut to lengths 1..n (so that micro-batches differ in width)."""
    n = len(rollouts.responses)
    cut = [r[: 1 + i % 8] for i, r in enumerate(rollouts.responses)]
    lps = (
        None
        if rollouts.logprobs is None
        else [lp[: len(c)] for lp, c in zip(rollouts.logprobs, cut)]
    )
    assert n > 1
    return dataclasses.replace(rollouts, responses=cut, logprobs=lps)


@pytest.mark.parametrize(
    "tp,pp,world,extra",
    [
        (2, 1, 2, ["parallel.sequence_parallel=true"]),
        (1, 2, 2, FULL),
        (2, 2, 4, []),
    ],
    ids=["tp2-sp-lora", "pp2-full", "tp2xpp2-lora"],
)
def test_token_budget_micro_batches_equal_the_padded_path(tp, pp, world, extra):
    for report in run_distributed(_both_ways, world, tp, pp, extra, timeout=400):
        for algorithm, r in report.items():
            assert r["grad_scale"] > 1e-4, (algorithm, r)  # something is trained
            assert r["grads"] <= TOL and r["stats"] <= TOL, (algorithm, r)
            assert r["budgeted"] != r["padded"], (algorithm, "the budget regrouped nothing")
            assert all(b * t <= BUDGET for b, t in r["budgeted"]), r["budgeted"]


def test_groups_are_filled_longest_first_within_the_budget():
    lengths = [5, 9, 3, 9, 4, 2]
    assert token_budget_groups(lengths, 18) == [[1, 3], [0, 4, 2], [5]]
    assert token_budget_groups(lengths, 9) == [[1], [3], [0], [4, 2], [5]]
    with pytest.raises(ConfigError, match=r"trainer.micro_batch_tokens=8 .* \(9 tokens"):
        token_budget_groups(lengths, 8)


def test_each_budget_micro_batch_is_as_wide_as_its_own_longest_row():
    """Padding every micro-batch to the step's longest row (what the budget exists to avoid) fails
    here: the groups are [2, 0], [3, 4], [1], of widths 11, 9 and 6."""
    prompts = [[1] * n for n in (3, 5, 2, 7, 4)]
    responses = [[2] * n for n in (6, 1, 9, 2, 5)]
    mbs = micro_batches(prompts, responses, None, 2, 0, "cpu", max_tokens=24)
    assert [mb.rows for mb in mbs] == [[2, 0], [3, 4], [1]]
    assert [mb.student.tokens_BT.shape[1] for mb in mbs] == [11, 9, 6]
    assert [mb.response_tokens_BR.shape[1] for mb in mbs] == [9, 5, 1]


def test_a_budget_below_one_sequence_is_a_config_error():
    with pytest.raises(ConfigError, match="trainer.micro_batch_tokens=16 is smaller"):
        load_config(RECIPE, ["trainer.micro_batch_tokens=16", "rollout.max_new_tokens=32"])
