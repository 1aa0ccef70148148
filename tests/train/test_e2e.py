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


def test_trained_student_exports_to_hf(tmp_path):
    """A 2-step TP=2 run, exported through tools/convert_megatron_to_hf with its adapters merged,
    loads in transformers; adapted tensors moved away from the base, the rest did not."""
    from transformers import AutoModelForCausalLM

    from opsd_megatron.models.convert import convert_megatron_to_hf
    from tests.models.test_conversion import _tensors

    out = tmp_path / "run"
    run_distributed(_rank_entry, 2, RECIPE, overrides(out, 2, 1), timeout=300)
    convert_megatron_to_hf(out / "base_model", tmp_path / "base_hf")
    convert_megatron_to_hf(out / "base_model", tmp_path / "student_hf",
                           adapters=out / "checkpoints" / "step_000002" / "model")
    base, student = _tensors(tmp_path / "base_hf"), _tensors(tmp_path / "student_hf")
    assert base.keys() == student.keys()
    moved = {k for k in base if not torch.equal(base[k], student[k])}
    assert moved and all("proj" in k for k in moved), sorted(moved)[:5]
    assert any("q_proj" in k for k in moved) and any("down_proj" in k for k in moved)
    assert (tmp_path / "student_hf" / "tokenizer.json").is_file()
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "student_hf")
    assert torch.isfinite(model(torch.tensor([[1, 2, 3]])).logits).all()
