"""End-to-end 2-step runs at TP=2, PP=2 and DP=2 on CPU; step 1's loss equals a single-process
fp64 reference (HF transformers on the run's own rollouts) to 1e-5 relative."""

from __future__ import annotations

import pytest
import torch

from opsd_megatron.testing import run_distributed
from opsd_megatron.train.cli import _rank_entry
from tests.train.tiny import RECIPE, metrics, overrides, reference_first_step_loss, rollouts


@pytest.mark.parametrize("tp,pp,world", [(2, 1, 2), (1, 2, 2), (1, 1, 2)], ids=["tp2", "pp2", "dp2"])
def test_two_steps_and_first_loss_matches_reference(tmp_path, tp, pp, world):
    out = tmp_path / "run"
    run_distributed(_rank_entry, world, RECIPE, overrides(out, tp, pp), timeout=300)
    rows = metrics(out)
    assert [r["step"] for r in rows] == [1, 2]
    assert all(torch.isfinite(torch.tensor(r["loss"])) and r["skipped"] == 0 for r in rows)
    assert len(rollouts(out, 1)) == 4
    want = reference_first_step_loss(out)
    assert want > 0
    assert abs(rows[0]["loss"] - want) <= 1e-5 * abs(want), (rows[0]["loss"], want)
    assert (out / "checkpoints" / "step_000002" / "trainer_state.json").is_file()
    assert (out / "loss.png").is_file() and (out / "summary.json").is_file()
