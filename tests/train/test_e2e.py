"""End-to-end 3-step runs on CPU at TP=2, PP=2, DP=2, TP=2 x PP=2 (LoRA) and full-parameter PP=2
with tied embeddings. Step 1's loss equals a single-process fp64 reference (HF transformers on the
run's own rollouts) to 1e-5 relative; steps 2 and 3 — where the adapters are no longer zero and
the student differs from the teacher — equal an fp64 HF (+ peft) recomputation from the weights
the run saved after the step before: loss to 1e-5, gradient norm to 1e-4 relative. The gradient
norm is what a wrong DP sum, TP reduction or tied-embedding sum across stages changes. The
per-token diagnostics (top-1 agreement, teacher log-prob, divergence by third) equal the same fp64
recomputation to 1e-5, and the response figures equal a count over the saved rollouts."""

from __future__ import annotations

import math

import pytest
import torch

from opsd_megatron.config import load_config
from opsd_megatron.data.response_stats import repetition_rate
from opsd_megatron.data.tokenizer import load_tokenizer
from opsd_megatron.testing import run_distributed
from opsd_megatron.train.cli import _rank_entry
from opsd_megatron.train.resolved import resolve
from tests.train.reference_steps import reference_step, saved_weights
from tests.train.tiny import RECIPE, metrics, overrides, reference_first_step_loss, rollouts

FULL = ["lora=null", "teacher.weights=frozen_copy"]
LAYOUTS = [(2, 1, 2, []), (1, 2, 2, []), (1, 1, 2, []), (2, 2, 4, []), (1, 2, 2, FULL)]


IDS = ["tp2", "pp2", "dp2", "tp2xpp2", "full-pp2-tied"]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """Each layout's 3-step run, once per module (the export test reuses the TP2 one)."""
    done = {}

    def get(name: str):
        if name not in done:
            tp, pp, world, extra = LAYOUTS[IDS.index(name)]
            out = tmp_path_factory.mktemp(name) / "run"
            args = overrides(out, tp, pp, 3, [*extra, "checkpoint.keep_last=3"])
            run_distributed(_rank_entry, world, resolve(RECIPE, args, world), timeout=400)
            done[name] = out
        return done[name]

    return get


@pytest.mark.parametrize("tp,pp,world,extra", LAYOUTS, ids=IDS)
def test_three_steps_match_the_fp64_reference(trained, request, tp, pp, world, extra):
    out = trained(request.node.callspec.id)
    rows = metrics(out)
    assert [r["step"] for r in rows] == [1, 2, 3]
    assert all(torch.isfinite(torch.tensor(r["loss"])) and r["skipped"] == 0 for r in rows)
    assert len(rollouts(out, 1)) == 4
    want = reference_first_step_loss(out)
    assert want > 0
    assert abs(rows[0]["loss"] - want) <= 1e-5 * abs(want), (rows[0]["loss"], want)
    lora_cfg = load_config(RECIPE, extra).lora
    lora = None if lora_cfg is None else {"rank": lora_cfg.rank, "alpha": lora_cfg.alpha}
    weights = run_distributed(saved_weights, 1, str(out), [1, 2], timeout=300)[0]
    for k in (2, 3):
        diagnostics = {}
        loss, norm = reference_step(out, k, weights[k - 1], lora, diagnostics=diagnostics)
        got = rows[k - 1]
        for key, want in diagnostics.items():  # losses/diagnostics.py through the real step
            assert abs(got[key] - want) <= 1e-5 * max(1.0, abs(want)), (k, key, got[key], want)
        assert abs(got["loss"] - loss) <= 1e-5 * abs(loss), (k, got["loss"], loss)
        assert abs(got["grad_norm"] - norm) <= 1e-4 * norm, (k, got["grad_norm"], norm)
    assert rows[1]["loss"] != rows[0]["loss"] and weights[1] != {}
    tok = load_tokenizer(load_config(RECIPE).model.tokenizer)
    for k, got in enumerate(rows, 1):  # the response figures over every DP rank's rollouts
        saved = rollouts(out, k)
        texts = [tok.decode(r["response_ids"], skip_special_tokens=True) for r in saved]
        lengths = sorted(len(r["response_ids"]) for r in saved)
        assert got["truncation_rate"] == sum(not r["finished"] for r in saved) / len(saved)
        assert got["response_length_p90"] == lengths[math.ceil(0.9 * len(lengths)) - 1]
        assert got["repetition_rate"] == pytest.approx(
            sum(repetition_rate(t) for t in texts) / len(saved)
        )
    for got in rows:  # the phase timers: four phases that make up the step, the sampler's inside
        phases = [got[f"time/{k}"] for k in ("rollout", "score", "student", "optimizer")]
        assert min(phases) > 0 and sum(phases) == pytest.approx(got["time/step"], rel=1e-9)
        assert 0 < got["time/prefill"] < got["time/decode"] < got["time/rollout"], got
    assert (out / "checkpoints" / "step_000003" / "trainer_state.json").is_file()
    assert (out / "loss.png").is_file() and (out / "summary.json").is_file()


def test_trained_student_exports_to_hf(trained, tmp_path):
    """The 3-step TP=2 run, exported through tools/convert_megatron_to_hf with its adapters merged,
    loads in transformers; adapted tensors moved away from the base, the rest did not."""
    from transformers import AutoModelForCausalLM

    from opsd_megatron.models.convert import convert_megatron_to_hf
    from tests.models.test_conversion import _tensors

    out = trained("tp2")
    convert_megatron_to_hf(out / "base_model", tmp_path / "base_hf")
    convert_megatron_to_hf(
        out / "base_model",
        tmp_path / "student_hf",
        adapters=out / "checkpoints" / "step_000003" / "model",
    )
    base, student = _tensors(tmp_path / "base_hf"), _tensors(tmp_path / "student_hf")
    assert base.keys() == student.keys()
    moved = {k for k in base if not torch.equal(base[k], student[k])}
    assert moved and all("proj" in k for k in moved), sorted(moved)[:5]
    assert any("q_proj" in k for k in moved) and any("down_proj" in k for k in moved)
    assert (tmp_path / "student_hf" / "tokenizer.json").is_file()
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "student_hf")
    assert torch.isfinite(model(torch.tensor([[1, 2, 3]])).logits).all()
