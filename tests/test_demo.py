"""The learning demonstration (recipes/demo_cpu.yaml), reduced for CI: the shipped base (seeds
[1234, 42, 0], SFT until it reads references and, by the Wilson lower bound of its accuracy
alone, has begun to solve alone: ``base_until``), then OPSD_STEPS OPSD steps from it under two
(trainer, rollout) seed pairs. The base must use the reference (>= 90 %) while solving few
problems alone; each OPSD run must lift held-out accuracy by at least LIFT points — the claim
README.md states for step 60 (recipe ``claims``); rerunning an arm reproduces it exactly.

Measured here (2026-12-07, README table: five seed triples, each its own base, one thread per
rank): the step-60 lifts were +69 (the shipped triple), +57, +55, +54, +45 for [5, 5, 5],
[6, 6, 6], [11, 12, 13], [101, 102, 103]; by step 100 +64 to +79. This test's two pairs: +69 and
+64. LIFT sits 10 points below the smallest, so last-bit differences between machines, which
sampling amplifies, cannot flip it; an update that teaches nothing stays near 0, and OPSD from an
edge base (5 % alone) reached +13 by step 100 (issue 42).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
OPSD_STEPS = 60
LIFT = 0.35  # README: every triple lifts >= +35 by step 60 (recipe claims)
REDUCED = [
    f"arms.opsd.trainer.max_steps={OPSD_STEPS}",
    "arms.sft=null",
    "arms.grpo=null",
    "common.logging.tensorboard=false",
    "common.logging.progress_bar=false",
    f"common.eval.interval={OPSD_STEPS}",
    # one thread per rank: as the README table was measured (the shipped triple's run is that
    # table's row), and no oversubscription beside the other pytest worker
    "common.trainer.threads_per_rank=1",
]


def _metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "opsd" / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.timeout(
    1800
)  # ≈9 min on 2 idle cores (275 base steps, 16 evaluations, 122 OPSD steps); more when shared
def test_demo_lifts_held_out_accuracy_over_seeds_deterministically(tmp_path):
    from opsd_megatron.demo import _run, _stage_recipe, load_demo, run_demo

    d = load_demo(
        str(ROOT / "recipes" / "demo_cpu.yaml"), REDUCED + [f"output_dir={tmp_path / 'demo'}"]
    )
    assert {c.step: c.lift for c in d.claims}[OPSD_STEPS] == LIFT, "CI holds the recipe's claim"
    summary = run_demo(d)
    assert summary["base_teacher_accuracy"] >= 0.9, (
        "the base solves problems when shown the reference"
    )
    assert summary["base_accuracy"] <= 0.5, "…and only part of them alone"
    assert summary["steps"] == OPSD_STEPS and summary["generated_tokens"] > OPSD_STEPS * 16 * 10
    assert (tmp_path / "demo" / "accuracy.png").stat().st_size > 10_000
    lifts = {(42, 0): summary["lift"]}
    base_model = str(
        tmp_path
        / "demo"
        / "base"
        / "checkpoints"
        / f"step_{summary['base']['steps']:06d}"
        / "model"
    )
    other = {
        **d.arms["opsd"],
        "trainer": {"max_steps": OPSD_STEPS, "seed": 7},
        "rollout": {"temperature": 0.7, "seed": 7},
    }
    d.output_dir = str(tmp_path / "seed7")
    _run(_stage_recipe(d, "opsd", other, base_model))
    final = [m["eval/avg@1"] for m in _metrics(tmp_path / "seed7") if "eval/avg@1" in m][-1]
    lifts[(7, 7)] = final - summary["base_accuracy"]
    print(f"base {summary['base']}; lifts at step {OPSD_STEPS}: {lifts}")
    assert all(lift >= LIFT for lift in lifts.values()), lifts

    d.output_dir = str(tmp_path / "again")  # the first seed pair again, 2 steps: the same numbers
    _run(_stage_recipe(d, "opsd", {**d.arms["opsd"], "trainer": {"max_steps": 2}}, base_model))
    again = _metrics(tmp_path / "again")
    first = _metrics(tmp_path / "demo")[: len(again)]
    for key in ("loss", "generated_tokens", "grad_norm"):
        assert [m[key] for m in first] == [m[key] for m in again], f"same seed, different {key}"


def test_base_trains_on_until_it_reads_references_and_solves_some_alone(tmp_path, monkeypatch):
    """``base_until``: the base stage is extended in rounds until both accuracies are reached,
    or its step cap; each round's recipe asks for more steps (the trainer resumes). A stand-in for
    the trainer writes the evaluation a scripted base would reach at each step count."""
    from omegaconf import OmegaConf

    from opsd_megatron import demo

    reached = {200: (0.0, 0.74), 250: (0.01, 0.90), 300: (0.04, 0.97), 350: (0.12, 0.99)}
    asked = []

    def fake_run(recipe):
        cfg = OmegaConf.load(recipe)
        steps = cfg.trainer.max_steps
        assert cfg.eval.interval == (200 if steps == 200 else 50)  # each round evaluates its end
        asked.append(steps)
        alone, teacher = reached[steps]
        line = {"step": steps, "eval/avg@1": alone, "eval_teacher/avg@1": teacher}
        with (Path(recipe).parent / "metrics.jsonl").open("a") as f:
            f.write(json.dumps(line) + "\n")

    monkeypatch.setattr(demo, "_run", fake_run)
    over = [f"output_dir={tmp_path}", "base.trainer.max_steps=200", "base.eval.interval=200"]
    until = ["base_until.teacher_accuracy=0.95", "base_until.accuracy=0.05",
             "base_until.accuracy_lower_bound=false"]  # fmt: skip
    d = demo.load_demo(
        str(ROOT / "recipes" / "demo_cpu.yaml"),
        over + until + ["base_until.extend_steps=50", "base_until.max_steps=1000"],
    )
    assert demo._train_base(d) == {"accuracy": 0.12, "teacher_accuracy": 0.99, "steps": 350}
    assert asked == [200, 250, 300, 350]
    asked.clear()
    (tmp_path / "base" / "metrics.jsonl").unlink()
    d = demo.load_demo(
        str(ROOT / "recipes" / "demo_cpu.yaml"),
        over + until + ["base_until.max_steps=300", "base_until.extend_steps=50"],
    )
    assert demo._train_base(d)["steps"] == 300 and asked == [200, 250, 300]  # the cap


def test_the_shipped_protocol_refuses_a_base_at_the_edge_of_its_criterion(tmp_path, monkeypatch):
    """A base that solves 5 of 100 alone (and every problem with the reference) may solve 2 % in
    truth, and OPSD barely moved such a base (issue 42: +13 in 100 steps); the shipped recipe judges
    the accuracy alone by its Wilson 95 % lower bound, so it trains on to 11 of 100 (lower bound
    6.2 %) — where the plain rule would have stopped at 5 and 8."""
    from omegaconf import OmegaConf

    from opsd_megatron import demo
    from opsd_megatron.eval.metrics import wilson_interval

    reached = {200: (2, 0.74), 225: (5, 1.0), 250: (8, 1.0), 275: (11, 1.0), 300: (30, 1.0)}
    asked = []

    def fake_run(recipe):
        steps = OmegaConf.load(recipe).trainer.max_steps
        asked.append(steps)
        solved, teacher = reached[steps]
        run = Path(recipe).parent
        (run / "eval").mkdir(exist_ok=True)
        report = {"avg@1": solved / 100, "avg@1_ci95": list(wilson_interval(solved, 100))}
        (run / "eval" / f"step_{steps:06d}.json").write_text(
            json.dumps({"benchmarks": {"synthetic_arith": report}})
        )
        line = {"step": steps, "eval/avg@1": solved / 100, "eval_teacher/avg@1": teacher}
        with (run / "metrics.jsonl").open("a") as f:
            f.write(json.dumps(line) + "\n")

    monkeypatch.setattr(demo, "_run", fake_run)
    d = demo.load_demo(str(ROOT / "recipes" / "demo_cpu.yaml"), [f"output_dir={tmp_path}"])
    assert demo._train_base(d) == {"accuracy": 0.11, "teacher_accuracy": 1.0, "steps": 275}
    assert asked == [200, 225, 250, 275]
    (tmp_path / "base" / "metrics.jsonl").unlink()
    plain = demo.load_demo(
        str(ROOT / "recipes" / "demo_cpu.yaml"),
        [f"output_dir={tmp_path}", "base_until.accuracy_lower_bound=false"],
    )
    assert demo._train_base(plain)["steps"] == 225  # the edge base the plain rule accepts
