"""``base: null`` (recipes/smollm2_svamp.yaml): the demo's driver on a pretrained model. The model
of ``common`` is the base — evaluated once alone and once with the reference, reused while
``common`` is unchanged — every arm trains from it (no base checkpoint in its recipe), the held-out
problems are left out of training (``data.skip_first``), and the curves, table and plot carry
each greedy evaluation's Wilson 95 % interval. Stand-ins for opsd-train and opsd-eval write the
files the real ones write (their own tests cover them); the real runs are in docs/real_model.md.
"""

from __future__ import annotations

import json
from pathlib import Path

from omegaconf import OmegaConf

ROOT = Path(__file__).resolve().parents[1]
RECIPE = str(ROOT / "recipes" / "smollm2_svamp.yaml")
# (step, accuracy, 95 % low, high) the stand-in trainer reports per arm
REACHED = {"opsd": (0.10, 0.066, 0.149), "grpo": (0.05, 0.027, 0.090), "sft": (0.20, 0.150, 0.261)}


def _report(acc, lo, hi, **extra):
    figures = {"avg@1": acc, "avg@1_ci95": [lo, hi], "response_length": 120.0}
    figures.update(truncation_rate=0.12, repetition_rate=0.2, marker_rate=0.0, **extra)
    return {"benchmarks": {"svamp": figures}}


def test_pretrained_base_is_evaluated_once_and_every_arm_starts_from_it(tmp_path, monkeypatch):
    from opsd_megatron import demo
    from opsd_megatron.eval import cli as eval_cli

    data = tmp_path / "svamp.jsonl"
    rows = [{"problem": f"{i} + 1?", "solution": f"{i} + 1 = {i + 1}.", "answer": str(i + 1)}
            for i in range(6)]  # fmt: skip
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    evals, trained = [], []

    def fake_eval(argv):
        recipe, reference, _, tag = argv
        cfg = OmegaConf.load(recipe)
        assert "megatron_dir" not in cfg.model or cfg.model.megatron_dir is None
        evals.append((tag, reference))
        ref = reference == "eval.with_reference=true"
        out = Path(cfg.trainer.output_dir) / "eval" / f"{tag}.json"
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(_report(*((0.4, 0.33, 0.47) if ref else (0.04, 0.02, 0.077)))))
        return 0

    def fake_run(recipe):
        cfg = OmegaConf.load(recipe)
        name = Path(recipe).parent.name
        trained.append(name)
        # every arm from the pretrained model, never a base checkpoint; the held-out rows left out
        assert cfg.model.hf_dir == "models/smollm2-135m-instruct"
        assert OmegaConf.select(cfg, "model.megatron_dir") is None
        assert cfg.data.skip_first == 200 and cfg.eval.max_problems == 200
        out = Path(cfg.trainer.output_dir)
        acc, lo, hi = REACHED[name]
        key = "reference_tokens" if name == "sft" else "generated_tokens"
        lines = [{"step": s, key: 1000.0} for s in range(1, 25)]
        if name == "sft":  # the trainer logs a length of 0 where nothing is sampled
            for m in lines:
                m["response_length"] = 0.0
        else:  # responses grow from 100 to 146 tokens; agreement rises
            for m in lines:
                m.update(response_length=98.0 + 2 * m["step"], top1_agreement=0.8 + m["step"] / 200)
        for s, a in ((12, acc / 2), (24, acc)):
            lines[s - 1]["eval/avg@1"] = a
            (out / "eval").mkdir(parents=True, exist_ok=True)
            report = _report(a, lo if s == 24 else 0.0, hi if s == 24 else 0.1)
            (out / "eval" / f"step_{s:06d}.json").write_text(json.dumps(report))
        (out / "metrics.jsonl").write_text("".join(json.dumps(m) + "\n" for m in lines))

    monkeypatch.setattr(eval_cli, "main", fake_eval)
    monkeypatch.setattr(demo, "_run", fake_run)
    over = [
        f"output_dir={tmp_path / 'out'}",
        f"common.data.source={data}",
        f"common.eval.benchmarks=[{data}]",
        *(f"arms.{a}=null" for a in OmegaConf.load(RECIPE).arms if a not in REACHED),
    ]
    d = demo.load_demo(RECIPE, over)
    summary = demo.run_demo(d)
    assert evals == [
        ("alone", "eval.with_reference=false"),
        ("reference", "eval.with_reference=true"),
    ]
    assert trained == ["opsd", "grpo", "sft"]
    assert summary["base_accuracy"] == 0.04 and summary["base_teacher_accuracy"] == 0.4
    opsd = summary["arms"]["opsd"]["curve"]
    assert opsd[0] == (0.0, 0.04, 0.02, 0.077)  # the base, with its interval
    assert [p[0] for p in opsd] == [0.0, 12000.0, 24000.0]
    assert opsd[-1] == (24000.0, 0.10, 0.066, 0.149)
    assert summary["arms"]["sft"]["tokens"] == 24000.0  # SFT: reference tokens
    table = (tmp_path / "out" / "table.md").read_text()
    assert "base: 4.0 % [2.0, 7.7] alone" in table
    assert "| base (no training) | 0 | 4.0 % [2.0, 7.7] |" in table
    assert "| sft | 24000 | 20.0 % [15.0, 26.1] | 120.0 | 12.0 % | 20.0 % | 0.00 |" in table
    assert (tmp_path / "out" / "accuracy.png").stat().st_size > 10_000
    # the training trace: the mean of the first four steps, of the last four
    assert summary["arms"]["opsd"]["trace"]["response_length"] == [103.0, 143.0]
    assert summary["arms"]["grpo"]["trace"]["top1_agreement"] == [0.8125, 0.9125]
    assert (
        "| opsd | 103 → 143 | 0.812 → 0.912 |" in table
        and "| sft |" not in table.split("During")[1]
    )

    evals.clear()
    demo.run_demo(demo.load_demo(RECIPE, over))  # unchanged common: the base's reports reused
    assert evals == []
    demo.run_demo(demo.load_demo(RECIPE, over + ["common.eval.max_new_tokens=128"]))
    assert [t for t, _ in evals] == ["alone", "reference"]  # changed: evaluated again
