"""Reference-free OPSD (``teacher.context=peer_success``, algorithms/peer.py): peer selection by
hand, and a real 2-step run on a dataset without solutions whose loss and gradient norm equal the
fp64 HF (+ peft) recomputation in which each rollout's teacher reads its chosen peer and rollouts
without a correct peer are left out. The grader is replaced by a parity rule (a correct rollout
has an even number of characters), so a random model's rollouts are half correct; the real
grader is tested in tests/data."""

from __future__ import annotations

import json

import pytest

from opsd_megatron.algorithms.peer import peer_index, peer_solutions
from opsd_megatron.testing import run_distributed
from opsd_megatron.train.resolved import resolve
from tests.train.reference_steps import reference_step, saved_weights
from tests.train.tiny import RECIPE, metrics, overrides, rollouts

LORA = {"rank": 8, "alpha": 16.0}


def test_each_rollout_reads_the_next_correct_peer_of_its_group():
    correct = [True, False, True, False, False, False, False, True]
    assert peer_index(correct, 4) == [2, 2, 0, 0, 7, 7, 7, None]  # 7 has no other correct
    problems = [{"solution": "ref"}] * 4 + [{"solution": None}] * 4
    texts = [f"t{i}" for i in range(8)]
    assert peer_solutions(problems, texts, correct, 4, "peer_success") == (
        ["t2", "t2", "t0", "t0", "t7", "t7", "t7", None]
    )
    assert peer_solutions(problems[:4] * 2, texts, correct, 4, "peer_success_or_reference") == (
        ["t2", "t2", "t0", "t0", "t7", "t7", "t7", "ref"]
    )
    with pytest.raises(ValueError, match="groups of 4"):
        peer_index(correct[:6], 4)


def _parity(text: str) -> bool:
    return len(text) % 2 == 0


def _rank_with_parity_grader(resolved):
    from opsd_megatron.data import grading
    from opsd_megatron.train.cli import _rank_entry

    grading.Grader.grade = lambda self, output, answer, answer_type=None: grading.Grade(
        _parity(output), output, "parity"
    )
    return _rank_entry(resolved)


def test_peer_success_run_matches_the_fp64_reference(tmp_path):
    from opsd_megatron.config import load_config
    from opsd_megatron.data.tokenizer import load_tokenizer

    data = tmp_path / "no_solutions.jsonl"
    data.write_text(
        "".join(
            json.dumps({"id": f"p{i}", "problem": f"{i}+{i}", "answer": str(2 * i)}) + "\n"
            for i in range(10, 30)
        )
    )
    extra = [f"data.source={data}", "teacher.context=peer_success", "rollout.num_rollouts=2"]
    out = tmp_path / "run"
    args = overrides(
        out, 1, 1, 2, [*extra, "trainer.global_batch_size=8", "checkpoint.keep_last=3"]
    )
    run_distributed(_rank_with_parity_grader, 1, resolve(RECIPE, args, 1), timeout=300)
    rows = metrics(out)
    after1 = run_distributed(saved_weights, 1, str(out), [1], timeout=300)[0][1]
    initial = {k: v * 0 if "lora_B" in k else v for k, v in after1.items()}
    tok = load_tokenizer(load_config(RECIPE).model.tokenizer)

    def chosen(saved):  # written out for G = 2: rollout i reads its partner i ^ 1 if correct
        texts = [tok.decode(r["response_ids"], skip_special_tokens=True) for r in saved]
        return [texts[i ^ 1] if _parity(texts[i ^ 1]) else None for i in range(len(texts))]

    skipped = 0
    for step, weights in ((1, initial), (2, after1)):
        picks = chosen(rollouts(out, step))
        assert rows[step - 1]["peer_skipped"] == sum(p is None for p in picks)
        skipped += sum(p is None for p in picks)
        loss, norm = reference_step(
            out, step, weights, LORA, cfg_overrides=tuple(extra), teacher_solutions=chosen
        )
        got = rows[step - 1]
        assert abs(got["loss"] - loss) <= 1e-5 * abs(loss), (step, got["loss"], loss)
        assert abs(got["grad_norm"] - norm) <= 1e-4 * norm, (step, got["grad_norm"], norm)
    assert 0 < skipped < 16, "some rollouts read a peer and some had none"
