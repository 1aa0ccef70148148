"""The command-line/config surface: unknown keys, bad types and impossible layouts give the promised
errors; every recipe in recipes/ loads and validates; documented commands work."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from opsd_megatron.config import ConfigError, load_config, validate_layout
from opsd_megatron.models.from_config import arch_of

ROOT = Path(__file__).resolve().parents[1]
RECIPES = sorted((ROOT / "recipes").glob("*.yaml"))
TINY = ROOT / "recipes" / "tiny_cpu.yaml"


DEMOS = [
    r for r in RECIPES if "arms" in (yaml.safe_load(r.read_text()) or {})
]  # opsd-demo recipes: stages of training recipes


@pytest.mark.parametrize("recipe", [r for r in RECIPES if r not in DEMOS], ids=lambda r: r.stem)
def test_every_recipe_loads_and_validates(recipe):
    cfg = load_config(recipe)
    layout = validate_layout(cfg, arch=arch_of(cfg.model))
    assert layout.world_size == layout.tp * layout.pp * layout.dp


@pytest.mark.parametrize("recipe", DEMOS, ids=lambda r: r.stem)
def test_demo_recipes_validate_every_stage(recipe, tmp_path):
    from opsd_megatron.demo import _stage_recipe, load_demo

    d = load_demo(str(recipe), [f"output_dir={tmp_path}"])
    base = load_config(_stage_recipe(d, "base", d.base or {}, None))
    if d.base is not None:  # a base trained by the demo (else: the pretrained model of common)
        assert (
            base.algorithm == "sft"
            and base.eval.teacher_too
            and base.trainer.max_steps % base.eval.interval == 0
        )
    base_model = None if d.base is None else str(tmp_path / "base_model")
    for name, stage in d.arms.items():
        cfg = load_config(_stage_recipe(d, name, stage, base_model))
        validate_layout(cfg, arch=arch_of(base.model))
        assert cfg.trainer.output_dir == str(tmp_path / name)
    assert set(d.arms) == DEMO_ARMS[recipe.stem]


DEMO_ARMS = {
    "demo_cpu": {"opsd", "sft", "grpo"},
    "smollm2_svamp": {
        "opsd",
        "opsd_long",
        "opsd_lr1e3",
        "opsd_fkl",
        "opsd_fkl_clip",
        "opsd_fkl_token_clip",
        "opsd_ref_kl",
        "grpo",
        "grpo_lr1e3",
        "sft",
    },
    "demo_variants": {
        "opsd",
        "answer_only",
        "sampled_token",
        "sampled_token_baseline",
        "ref_kl",
        "peer_success",
    },
}


def test_demo_recipe_errors_name_the_problem(tmp_path):
    from opsd_megatron.demo import load_demo

    bad = tmp_path / "bad.yaml"
    bad.write_text("outputdir: x\narms: {opsd: {}}\n")
    with pytest.raises(
        ConfigError, match="bad.yaml:1: unknown config key 'outputdir'; did you mean 'output_dir'"
    ):
        load_demo(str(bad), [])
    bad.write_text("arms: {sft: {}}\n")
    with pytest.raises(ConfigError, match="arms.opsd is required"):
        load_demo(str(bad), [])
    d = load_demo(str(DEMOS[0]), [f"output_dir={tmp_path}", "arms.opsd.loss.beta=2"])
    from opsd_megatron.demo import _stage_recipe

    with pytest.raises(ConfigError, match="demo stage 'opsd'.*loss.beta"):
        _stage_recipe(d, "opsd", d.arms["opsd"], None)
    bad.write_text(
        "arms: {opsd: {loss: {beta: 0.1}}, x: {from: opsd, loss: {kind: sampled_token}}}\n"
    )
    x = load_demo(str(bad), []).arms["x"]  # a variant: the other arm's overrides, then its own
    assert x["loss"] == {"beta": 0.1, "kind": "sampled_token"} and "from" not in x
    bad.write_text("arms: {opsd: {}, x: {from: nope}}\n")
    with pytest.raises(ConfigError, match="arms.x.from='nope' must name an arm"):
        load_demo(str(bad), [])
    from opsd_megatron.demo import _check_data

    v = load_demo(str(ROOT / "recipes" / "demo_variants.yaml"), [f"output_dir={tmp_path}"])
    with pytest.raises(ConfigError, match="demo stage 'peer_success': data.source=.*answers_only"):
        _check_data(v)  # before any stage trains: the answers-only file is not prepared


def test_renamed_teacher_keys_still_load_with_a_warning(tmp_path):
    """teacher.kind -> teacher.update, teacher.model.kind -> teacher.weights (and .offload), in a
    recipe and as overrides; the new names load silently."""
    old = tmp_path / "old.yaml"
    old.write_text(
        f"defaults_from: {TINY}\nlora: null\nteacher: {{kind: ema, model: {{kind: frozen_copy, "
        f"offload: true}}}}\n"
    )
    with pytest.warns(FutureWarning, match="old.yaml: 'teacher.kind' is now 'teacher.update'"):
        cfg = load_config(old)
    assert (cfg.teacher.update, cfg.teacher.weights, cfg.teacher.offload) == (
        "ema",
        "frozen_copy",
        True,
    )
    with pytest.warns(FutureWarning, match="override 'teacher.model.kind=frozen_copy'"):
        cfg = load_config(
            TINY, ["lora=null", "teacher.model.kind=frozen_copy", "teacher.kind=current"]
        )
    assert (cfg.teacher.update, cfg.teacher.weights) == ("current", "frozen_copy")
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        cfg = load_config(TINY, ["teacher.update=ema", "teacher.weights=lora_base"])
    assert (cfg.teacher.update, cfg.teacher.weights) == ("ema", "lora_base")
    with pytest.raises(ConfigError, match="teacher.weights must be lora_base|frozen_copy"):
        load_config(TINY, ["teacher.weights=copy"])


def test_paper_defaults():
    cfg = load_config(ROOT / "recipes" / "qwen3_8b.yaml")
    assert (cfg.optimizer.lr, cfg.optimizer.warmup_ratio, cfg.optimizer.schedule) == (
        2e-5,
        0.1,
        "cosine",
    )
    assert (
        cfg.trainer.global_batch_size,
        cfg.rollout.num_rollouts,
        cfg.rollout.max_new_tokens,
    ) == (32, 1, 2048)
    assert (cfg.rollout.temperature, cfg.loss.beta, cfg.lora.rank, cfg.lora.alpha) == (
        1.2,
        0.5,
        64,
        128.0,
    )
    assert (
        cfg.teacher.update == "fixed"
        and not cfg.data.student_thinking
        and cfg.data.teacher_thinking
    )
    official = load_config(ROOT / "recipes" / "qwen3_8b_official.yaml")
    assert (official.loss.beta, official.rollout.max_new_tokens, official.rollout.temperature) == (
        0.0,
        1024,
        1.1,
    )
    assert (official.rollout.top_p, official.rollout.top_k, official.optimizer.lr) == (
        0.95,
        20,
        5e-6,
    )
    assert (official.optimizer.grad_clip, official.loss.term_clip) == (0.1, 0.06)
    assert official.lora.rank == 64, "variants inherit the rest from their base recipe"


def test_overrides_apply_and_unknown_keys_name_the_closest():
    cfg = load_config(
        TINY, ["trainer.max_steps=7", "loss.beta=0.1", "parallel.tensor_model_parallel_size=1"]
    )
    assert (cfg.trainer.max_steps, cfg.loss.beta) == (7, 0.1)
    with pytest.raises(
        ConfigError,
        match="unknown config key 'trainer.max_stesp'; did you mean 'trainer.max_steps'",
    ):
        load_config(TINY, ["trainer.max_stesp=3"])
    with pytest.raises(ConfigError, match="unknown config key 'los'; did you mean 'loss'"):
        load_config(TINY, ["los.beta=3"])


def test_bad_types_and_values_name_the_key():
    with pytest.raises(ConfigError, match=r"bad value for 'trainer.max_steps' \(expected int\)"):
        load_config(TINY, ["trainer.max_steps=lots"])
    with pytest.raises(ConfigError, match="loss.beta must be in"):
        load_config(TINY, ["loss.beta=1.5"])
    with pytest.raises(ConfigError, match="must be key=value"):
        load_config(TINY, ["trainer.max_steps"])


def test_recipe_file_errors(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("trainer: {max_steps: [\n")
    with pytest.raises(ConfigError, match="bad.yaml: not valid YAML"):
        load_config(bad)
    bad.write_text("trainer: {max_step: 3}\nmodel: {architecture: {model_type: qwen3}}\n")
    with pytest.raises(ConfigError, match="bad.yaml:1: unknown config key 'trainer.max_step'"):
        load_config(bad)
    with pytest.raises(ConfigError, match="recipe file not found"):
        load_config(tmp_path / "missing.yaml")


@pytest.mark.parametrize(
    "ovr, world, match",
    [
        (["parallel.tensor_model_parallel_size=3"], 3, "does not divide num_attention_heads=4"),
        (
            ["parallel.pipeline_model_parallel_size=3", "parallel.tensor_model_parallel_size=1"],
            3,
            "does not divide num_hidden_layers=2",
        ),
        ([], 3, "world size 3 is not divisible"),
        (
            ["trainer.global_batch_size=6", "trainer.micro_batch_size=4"],
            2,
            "global_batch_size=6 is not divisible",
        ),
    ],
)
def test_impossible_layouts(ovr, world, match):
    with pytest.raises(ConfigError, match=match):
        validate_layout(load_config(TINY, ovr), world, arch=arch_of(load_config(TINY, ovr).model))


def _cli(*args):
    return subprocess.run(
        [sys.executable, "-m", "opsd_megatron.train.cli", *args],
        capture_output=True,
        text=True,
        cwd=ROOT,
    )


def test_cli_dry_run_prints_config_and_layout():
    out = _cli(
        str(ROOT / "recipes" / "qwen3_8b.yaml"),
        "model.megatron_dir=null",
        "model.tokenizer=builtin:arith",
        "data.source=synthetic:arith",
        "data.problem_field=problem",
        "data.solution_field=solution",
        "--dry-run",
        "--verbose",  # the whole config; without it the overrides and the layout
    )  # the recipe's own paths exist only on a cluster
    assert out.returncode == 0, out.stderr
    assert "world 8 = TP 1 x PP 1 x DP 8" in out.stdout and "beta: 0.5" in out.stdout


def test_options_and_overrides_in_any_order(capsys):
    from opsd_megatron.eval.cli import main as eval_main
    from opsd_megatron.train.cli import main as train_main

    assert train_main([str(TINY), "--dry-run", "trainer.max_steps=3", "--verbose"]) == 0
    assert "max_steps: 3" in capsys.readouterr().out
    assert (
        eval_main(
            [
                str(TINY),
                "--tag",
                "ref",
                "eval.with_reference=true",
                "eval.benchmarks=[synthetic:arith:4]",
                "--dry-run",
            ]
        )
        == 0
    )


def test_cli_bad_override_exits_2_with_message():
    out = _cli(str(TINY), "trainer.max_stesp=1", "--dry-run")
    assert out.returncode == 2 and "did you mean 'trainer.max_steps'" in out.stderr


def test_demo_cli_reports_bad_input(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("arms: {sft: {}}\n")
    for recipe, message in (
        (tmp_path / "missing.yaml", "missing.yaml"),
        (bad, "arms.opsd is required"),
    ):
        out = subprocess.run(
            [sys.executable, "-m", "opsd_megatron.demo", str(recipe)],
            capture_output=True,
            text=True,
        )
        assert out.returncode == 2 and message in out.stderr, out.stderr


@pytest.mark.parametrize(
    "override,message",
    [
        ("trainer.micro_batch_size=0", "trainer.micro_batch_size must be >= 1, got 0"),
        ("trainer.global_batch_size=0", "trainer.global_batch_size must be >= 1, got 0"),
        ("checkpoint.save_interval=0", "checkpoint.save_interval must be >= 1, got 0"),
        ("trainer.max_steps=-1", "trainer.max_steps must be >= 1, got -1"),
        ("rollout.temperature=-1", "rollout.temperature must be >= 0 (0: greedy), got -1.0"),
        ("rollout.top_p=1.5", "rollout.top_p must be in (0, 1], got 1.5"),
        ("loss.temperature=0", "loss.temperature must be > 0, got 0.0"),
        ("optimizer.lr=0", "optimizer.lr must be > 0, got 0.0"),
        ("optimizer.precision=fp8", "optimizer.precision must be fp32|bf16"),
        ("lora.rank=0", "lora.rank must be >= 1, got 0"),
    ],
)
def test_bad_numbers_are_one_line_naming_key_and_value(override, message, capsys):
    from opsd_megatron.train.cli import main

    assert main([str(ROOT / "recipes" / "tiny_cpu.yaml"), override, "--dry-run"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0], err


@pytest.mark.parametrize(
    "ovr,match",
    [
        (["loss.ref_kl_coef=0.1", "teacher.update=ema"], "ref_kl_coef needs teacher.update=fixed"),
        (["loss.ref_kl_coef=-1"], "ref_kl_coef must be >= 0"),
        (["loss.token_clip=0"], "token_clip must be > 0"),
        (["loss.kind=sampled_token", "loss.token_clip=0.1"], "needs loss.kind=jsd, got 0.1 with"),
        (["loss.baseline=reverse_kl"], "applies to loss.kind=sampled_token only"),
        (["loss.kind=sampled_token", "loss.baseline=mean"], "loss.baseline must be none"),
        (
            ["loss.kind=sampled_token", "loss.teacher_top_k=8"],
            "teacher_top_k applies to loss.kind=jsd",
        ),
        (["loss.teacher_top_k=5000"], r"teacher_top_k must be in \[0, 4096\]"),
        (["loss.teacher_top_k=8", "loss.top_k_mode=bucket"], "top_k_mode must be tail|renorm"),
        (["logging.uncertainty_markers=[wait, '']"], "uncertainty_markers must be non-empty"),
        (["teacher.context=peer_success"], "needs algorithm=opsd and rollout.num_rollouts >= 2"),
        (["teacher.context=peers"], "teacher.context must be reference|peer_success"),
    ],
)
def test_self_distillation_options_refuse_what_they_cannot_do(ovr, match):
    with pytest.raises(ConfigError, match=match):
        load_config(TINY, ovr)
