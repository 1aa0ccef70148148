"""The trainer's options in real runs (TP=1, 2 steps, the tiny recipe), each against an fp64
HF-transformers (+ peft) recomputation on the run's own rollouts: the sampled-token objective (with
and without its reverse-KL baseline) and the loss temperature, token-mean reduction, term and
token clipping, the teacher's top-K (tail bucket and renormalised), the KL to the initial policy,
teacher-entropy token weights, several rollouts per problem with top-k/top-p sampling, an EMA and a
current teacher (whose weights must move as documented), and a run started from ``model.hf_dir``.
Loss to 1e-5 and gradient norm to 1e-4 relative at both steps; and each option must change the
reference by far more than that, so an ignored option fails."""

from __future__ import annotations

import pytest
import torch

from opsd_megatron.testing import run_distributed
from opsd_megatron.train.cli import _rank_entry
from opsd_megatron.train.resolved import resolve
from tests.train.reference_steps import reference_step, saved_weights
from tests.train.tiny import RECIPE, metrics, overrides, reference_first_step_loss, rollouts

LORA = {"rank": 8, "alpha": 16.0}  # the tiny recipe's
WEIGHTS = {
    "token_weight": "teacher_entropy",
    "entropy_threshold": 2.7,
    "low_confidence_weight": 0.25,
}
VARIANTS = {
    "sampled_token+temperature+baseline": (
        ["loss.kind=sampled_token", "loss.temperature=0.7", "loss.baseline=reverse_kl"],
        {"kind": "sampled_token", "temperature": 0.7, "baseline": "reverse_kl"},
        [
            {"kind": "jsd", "temperature": 0.7},
            {"kind": "sampled_token", "baseline": "reverse_kl"},
            {"kind": "sampled_token", "temperature": 0.7},
        ],
    ),
    "ref_kl+token_weight": (
        ["loss.ref_kl_coef=0.5", "loss.token_weight=teacher_entropy"]
        + ["loss.entropy_threshold=2.7", "loss.low_confidence_weight=0.25"],
        {"ref_kl_coef": 0.5, **WEIGHTS},
        [WEIGHTS, {"ref_kl_coef": 0.5}],
    ),
    "token_mean+term_clip": (
        ["loss.reduction=token_mean", "loss.term_clip=0.02", "rollout.max_new_tokens=32"],
        {"reduction": "token_mean", "term_clip": 0.02},
        [{"term_clip": 0.02}, {"reduction": "token_mean"}],
    ),
    "token_clip": (
        ["loss.token_clip=0.3"],
        {"token_clip": 0.3},
        [{}],
    ),
    "two_rollouts+top_k+top_p": (
        ["rollout.num_rollouts=2", "rollout.top_k=6", "rollout.top_p=0.9"],
        {},
        [],
    ),
    "teacher_top_k_tail": (
        ["loss.teacher_top_k=5"],
        {"teacher_top_k": 5},
        [{}, {"teacher_top_k": 5, "top_k_mode": "renorm"}],
    ),
    "teacher_top_k_renorm": (
        ["loss.teacher_top_k=5", "loss.top_k_mode=renorm"],
        {"teacher_top_k": 5, "top_k_mode": "renorm"},
        [{"teacher_top_k": 5}],
    ),
    # asymmetric values: rate 0.75 and 1 - rate differ, JSD_0.3 differs from JSD_0.7 (so a swapped
    # EMA rate or a beta read as 1 - beta fails here)
    "teacher_ema+beta": (
        ["teacher.update=ema", "teacher.ema_rate=0.75", "loss.beta=0.3"],
        {},
        [],
    ),
    "teacher_context_answer": (["data.teacher_context=answer"], {}, []),
    "teacher_current": (["teacher.update=current"], {}, []),
}


def _teacher_weights(name: str, after_step1: dict):
    """The teacher's adapters at step 2. At step 1 B = 0, so A gets no gradient and is unchanged:
    EMA(rate) of (A0, 0) and (A1, B1) is (A1, (1 - rate) * B1); the current teacher is (A1, B1)."""
    if name.startswith("teacher_ema"):
        return {k: v * 0.25 if "lora_B" in k else v for k, v in after_step1.items()}
    if name == "teacher_current":
        return after_step1
    return None


def _close(got: dict, loss: float, norm: float, what: str) -> None:
    assert abs(got["loss"] - loss) <= 1e-5 * abs(loss), (what, got["loss"], loss)
    assert abs(got["grad_norm"] - norm) <= 1e-4 * norm, (what, got["grad_norm"], norm)


@pytest.mark.parametrize("name", list(VARIANTS))
def test_option_in_a_real_run_matches_the_fp64_reference(tmp_path, name):
    extra, loss_cfg, without = VARIANTS[name]
    out = tmp_path / "run"
    args = overrides(out, 1, 1, 2, [*extra, "checkpoint.keep_last=3"])
    run_distributed(_rank_entry, 1, resolve(RECIPE, args, 1), timeout=300)
    rows = metrics(out)
    assert [r["step"] for r in rows] == [1, 2] and all(r["skipped"] == 0 for r in rows)
    if "token_weight" in name:  # the threshold splits the tokens: both weights are exercised
        assert all(0.05 < r["low_confidence_fraction"] < 0.95 for r in rows), rows
    if name == "token_clip":  # the clip splits the tokens: capped and passed both exercised
        assert all(0.05 < r["token_clipped_fraction"] < 0.95 for r in rows), rows
    after1 = run_distributed(saved_weights, 1, str(out), [1], timeout=300)[0][1]
    initial = {k: v * 0 if "lora_B" in k else v for k, v in after1.items()}  # B = 0, A unchanged
    teacher2 = _teacher_weights(name, after1)
    data = tuple(x for x in extra if x.startswith("data."))  # prompts: the reference needs them
    beta = float(next((x.split("=")[1] for x in extra if x.startswith("loss.beta=")), 0.5))
    for step, weights, teacher in ((1, initial, None), (2, after1, teacher2)):
        loss, norm = reference_step(
            out,
            step,
            weights,
            LORA,
            beta,
            loss=loss_cfg,
            teacher_weights=teacher,
            cfg_overrides=data,
        )
        _close(rows[step - 1], loss, norm, f"{name} step {step}")
    if data:  # the teacher read only the answer: with the full solution the reference differs
        loss, _ = reference_step(out, 2, after1, LORA, beta, loss=loss_cfg)
        assert abs(rows[1]["loss"] - loss) > 1e-3 * abs(loss), "the teacher context did not change"
    # the option matters: without it the reference is far from what the run computed
    for other in without:
        loss, _ = reference_step(out, 2, after1, LORA, beta, loss=other, teacher_weights=teacher2)
        assert abs(rows[1]["loss"] - loss) > 1e-3 * abs(loss), (name, other)
    if beta != 0.5:  # beta read as 1 - beta would give another loss
        loss, _ = reference_step(
            out, 2, after1, LORA, 1 - beta, loss=loss_cfg, teacher_weights=teacher2
        )
        assert abs(rows[1]["loss"] - loss) > 1e-3 * abs(loss), "beta and 1 - beta"
    if teacher2 is not None:
        loss, _ = reference_step(out, 2, after1, LORA, beta, loss=loss_cfg)
        assert abs(rows[1]["loss"] - loss) > 1e-3 * abs(loss), "the teacher did not move"
        swapped = (
            {k: v * 3 if "lora_B" in k else v for k, v in teacher2.items()}
            if "ema" in name
            else None
        )
        if swapped is not None:  # rate read as 1 - rate: (A1, rate * B1)
            loss, _ = reference_step(
                out, 2, after1, LORA, beta, loss=loss_cfg, teacher_weights=swapped
            )
            assert abs(rows[1]["loss"] - loss) > 1e-3 * abs(loss), "rate and 1 - rate"
    if name.startswith("two_rollouts"):
        ids = [r["id"] for r in rollouts(out, 1)]
        assert len(ids) == 4 and ids[0::2] == ids[1::2], "each problem twice, side by side"
        assert all(r["sampler_logprob_error"] <= 1e-5 for r in rows)  # truncated on both sides


def test_a_run_from_hf_dir_starts_from_those_weights(tmp_path):
    from opsd_megatron.config import load_config
    from tests.train.tiny import hf_initial_model

    hf_dir = tmp_path / "hf"
    cfg = load_config(RECIPE, [])
    hf_initial_model(cfg).float().save_pretrained(hf_dir, safe_serialization=True)
    out = tmp_path / "run"
    args = overrides(out, 1, 1, 1, [f"model.hf_dir={hf_dir}", "model.architecture=null"])
    run_distributed(_rank_entry, 1, resolve(RECIPE, args, 1), timeout=300)
    want = reference_first_step_loss(out)
    assert abs(metrics(out)[0]["loss"] - want) <= 1e-5 * want, (metrics(out)[0]["loss"], want)
    # its base is saved like a random-init run's, so it exports the same way: base + adapters
    from opsd_megatron.models.convert import convert_megatron_to_hf
    from tests.models.test_conversion import _tensors

    convert_megatron_to_hf(out / "base_model", tmp_path / "base_hf", dtype="float32")
    base, src = _tensors(tmp_path / "base_hf"), _tensors(hf_dir)
    assert base.keys() == src.keys() and all(torch.equal(base[k], src[k]) for k in src)


def _run_with_a_nan_at_step_2(resolved):
    """Rank function: the real trainer, with the loss of step 2's first micro-batch made NaN."""
    from opsd_megatron.algorithms.opsd import OPSD
    from opsd_megatron.train.cli import _rank_entry

    real, calls = OPSD.per_token_loss, []

    def poisoned(self, student_BRV, mb, groups):
        loss, diag = real(self, student_BRV, mb, groups)
        calls.append(1)
        return (loss * float("nan") if len(calls) == 3 else loss), diag  # 2 micro-batches/step

    OPSD.per_token_loss = poisoned
    return _rank_entry(resolved)


def test_a_nan_step_in_a_real_run_is_skipped_counted_and_changes_no_weight(tmp_path):
    out = tmp_path / "run"
    args = overrides(out, 1, 1, 3, ["checkpoint.keep_last=3"])
    summary = run_distributed(_run_with_a_nan_at_step_2, 1, resolve(RECIPE, args, 1), timeout=300)[
        0
    ]
    rows = metrics(out)
    assert [r["skipped"] for r in rows] == [0, 1, 0] and summary["skipped_steps"] == 1
    assert rows[2]["skipped_steps"] == 1 and rows[2]["loss"] == rows[2]["loss"]  # finite again
    w = run_distributed(saved_weights, 1, str(out), [1, 2, 3], timeout=300)[0]
    assert all(torch.equal(w[1][k], w[2][k]) for k in w[1]), "the NaN step changed weights"
    assert any(not torch.equal(w[2][k], w[3][k]) for k in w[2]), "step 3 trains again"
