"""``opsd-demo --seeds N [--jobs J]`` (demo.run_seeds): every seed triple runs the whole
demonstration in its own directory, and the spread over seeds (per arm and evaluation: mean,
min, max; the lift's mean, min, max) lands in OUT/summary.json and OUT/accuracy.png. The
demonstration itself is a stand-in here (tests/test_demo.py trains for real); the spread is
checked against numbers computed by hand."""

from __future__ import annotations

import json
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from opsd_megatron import demo

ROOT = Path(__file__).resolve().parents[1]
SEEDS = "seeds=[[1234, 42, 0], [1, 1, 1], [2, 2, 2]]"
# per triple: base accuracy, OPSD accuracy at the two evaluations
SCRIPT = {
    (1234, 42, 0): (0.1, [0.3, 0.9]),
    (1, 1, 1): (0.2, [0.4, 0.6]),
    (2, 2, 2): (0.0, [0.1, 0.5]),
}


def _fake_run_demo(calls):
    lock = threading.Lock()

    def run(d):
        triple = (
            d.common["model"]["init_seed"],
            d.common["trainer"]["seed"],
            d.common["rollout"]["seed"],
        )
        base, accs = SCRIPT[triple]
        with lock:
            calls.append((triple, d.output_dir, d.common["trainer"]["threads_per_rank"]))
        curve = [[0.0, base]] + [[1000.0 * (i + 1), a] for i, a in enumerate(accs)]
        arm = {
            "curve": curve,
            "final_accuracy": accs[-1],
            "accuracy_at": {str(50 * (i + 1)): a for i, a in enumerate(accs)},
        }
        return {
            "base_accuracy": base,
            "base_teacher_accuracy": 0.95,
            "final_accuracy": accs[-1],
            "lift": accs[-1] - base,
            "arms": {"opsd": arm},
        }

    return run


@pytest.mark.parametrize("jobs", [1, 2])
def test_seeds_write_the_spread_over_seed_triples(tmp_path, monkeypatch, jobs):
    calls = []
    monkeypatch.setattr(demo, "run_demo", _fake_run_demo(calls))
    d = demo.load_demo(str(ROOT / "recipes" / "demo_cpu.yaml"), [f"output_dir={tmp_path}", SEEDS])
    executor = ThreadPoolExecutor(jobs) if jobs > 1 else None
    summary = demo.run_seeds(d, 3, jobs=jobs, executor=executor)

    assert sorted(c[0] for c in calls) == sorted(SCRIPT)
    for triple, out, threads in calls:
        assert out == str(tmp_path / ("seed_" + "_".join(map(str, triple))))
        assert threads == (2 if jobs == 1 else 1)  # the recipe's 2 threads, shared by 2 jobs
    assert summary["seeds"] == [[1234, 42, 0], [1, 1, 1], [2, 2, 2]]  # the recipe's order
    written = json.loads((tmp_path / "summary.json").read_text())
    assert written["seeds"] == summary["seeds"]
    points = written["spread"]["opsd"]["points"]
    assert [round(p["mean"], 6) for p in points] == [0.1, round(0.8 / 3, 6), round(2.0 / 3, 6)]
    assert [(p["min"], p["max"]) for p in points] == [(0.0, 0.2), (0.1, 0.4), (0.5, 0.9)]
    lifts = [0.8, 0.4, 0.5]
    assert written["lift"]["lift_min"] == pytest.approx(min(lifts))
    assert written["lift"]["lift_max"] == pytest.approx(max(lifts))
    assert written["lift"]["lift_mean"] == pytest.approx(sum(lifts) / 3)
    assert (tmp_path / "accuracy.png").stat().st_size > 10_000


def test_seeds_flag_each_triple_whose_lift_falls_short_of_a_claim(tmp_path, monkeypatch, capsys):
    """Lifts at step 50: +0.2, +0.2, +0.1; at step 100: +0.8, +0.4, +0.5 (SCRIPT). A claim of
    +15 at 50 flags [2, 2, 2] alone, +45 at 100 flags [1, 1, 1] alone; a claim at a step never
    evaluated flags every triple."""
    monkeypatch.setattr(demo, "run_demo", _fake_run_demo([]))
    recipe = str(ROOT / "recipes" / "demo_cpu.yaml")
    claims = "claims=[{step: 50, lift: 0.15}, {step: 100, lift: 0.45}, {step: 70, lift: 0.0}]"
    assert demo.main([recipe, "--seeds", "3", f"output_dir={tmp_path}", SEEDS, claims]) == 0
    out = capsys.readouterr().out
    written = json.loads((tmp_path / "summary.json").read_text())
    assert written["lift_at"]["50"] == pytest.approx([0.2, 0.2, 0.1])
    assert written["lift_at"]["100"] == pytest.approx([0.8, 0.4, 0.5])
    assert written["below_claim"] == [
        "seeds [2, 2, 2]: lift at step 50 +10 points, claim +15",
        "seeds [1, 1, 1]: lift at step 100 +40 points, claim +45",
        *(f"seeds {t}: lift at step 70 not evaluated, claim +0" for t in SCRIPT_ORDER),
    ]
    assert "[demo] OPSD lift at step 100: +80, +40, +50" in out
    assert "[demo] BELOW THE CLAIM: seeds [1, 1, 1]: lift at step 100 +40 points" in out
    bad = [recipe, "--seeds", "1", f"output_dir={tmp_path}", "claims=[{step: 0, lift: 0.4}]"]
    assert demo.main(bad) == 2
    assert "claims: step must be >= 1" in capsys.readouterr().err


SCRIPT_ORDER = ["[1234, 42, 0]", "[1, 1, 1]", "[2, 2, 2]"]


def test_triples_beyond_the_recipes_list_and_bad_options(tmp_path, capsys):
    d = demo.load_demo(str(ROOT / "recipes" / "demo_cpu.yaml"), [f"output_dir={tmp_path}"])
    assert d.seeds[1] == [5, 5, 5]  # the recipe's own list, then (k, k, k) not already listed:
    assert d.seed_triples(10)[5:] == [(1, 1, 1), (2, 2, 2), (3, 3, 3), (4, 4, 4), (7, 7, 7)]
    recipe = str(ROOT / "recipes" / "demo_cpu.yaml")
    assert demo.main([recipe, "--jobs", "2", f"output_dir={tmp_path}"]) == 2
    assert "--jobs must be >= 1 and needs --seeds" in capsys.readouterr().err
    assert demo.main([recipe, "--seeds", "0", f"output_dir={tmp_path}"]) == 2
    assert "--seeds must be >= 1" in capsys.readouterr().err
