"""Sequence parallelism (and full activation recompute) change where activations live, not the
math: 3-step TP=2 runs with and without them sample the same rollouts and log the same losses and
gradient norms, for LoRA (adapters move between sequence shards themselves) and full-parameter
training (norm weights see sequence shards: their gradients are summed over TP)."""

from __future__ import annotations

import pytest

from opsd_megatron.testing import run_distributed
from opsd_megatron.train.cli import _rank_entry
from tests.train.tiny import RECIPE, metrics, overrides, rollouts


@pytest.mark.parametrize("mode", ["lora", "full"])
def test_sequence_parallel_and_recompute_train_exactly_like_plain_tp2(tmp_path, mode):
    extra = [] if mode == "lora" else ["lora=null", "teacher.model.kind=frozen_copy"]
    runs = {}
    for sp in (False, True):
        out = tmp_path / f"sp_{sp}"
        flags = [f"parallel.sequence_parallel={str(sp).lower()}", f"model.recompute={str(sp).lower()}"]
        run_distributed(_rank_entry, 2, RECIPE, overrides(out, 2, 1, steps=3, extra=[*extra, *flags]), timeout=300)
        runs[sp] = out
    plain, sp = metrics(runs[False]), metrics(runs[True])
    assert [m["step"] for m in sp] == [1, 2, 3]
    for a, b in zip(plain, sp):
        assert abs(a["loss"] - b["loss"]) <= 1e-5 * max(1.0, abs(a["loss"])), (a["loss"], b["loss"])
        assert abs(a["grad_norm"] - b["grad_norm"]) <= 1e-4 * max(1.0, a["grad_norm"]), (a, b)
        assert b["sampler_logprob_error"] <= 1e-4
    for step in (1, 2, 3):
        assert [r["response_ids"] for r in rollouts(runs[False], step)] == \
            [r["response_ids"] for r in rollouts(runs[True], step)]
