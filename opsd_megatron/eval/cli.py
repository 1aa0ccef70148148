"""``opsd-eval RECIPE.yaml [key=value ...] [--checkpoint OUT/checkpoints/step_N] [--tag NAME]``

Evaluates the recipe's model (its base weights, plus a training checkpoint's adapters or weights
when given) on ``eval.benchmarks`` with the paper's sampling (Table 5, overridable as ``eval.*``),
writing ``OUT/eval/<tag>.json`` and a Markdown table. Launch like opsd-train.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from opsd_megatron.config import ConfigError, load_config, validate_layout
from opsd_megatron.errors import UserError, guarded
from opsd_megatron.errors import report as report_error
from opsd_megatron.models.from_config import arch_of
from opsd_megatron.platform import known_warnings, log
from opsd_megatron.platform.launch import launched_world_size, run_ranks
from opsd_megatron.preflight import check_eval_run


def _recorded_lora(model_dir: Path):
    """The LoRAConfig a training checkpoint was written with (None: full-parameter weights)."""
    from opsd_megatron.config import LoRAConfig
    from opsd_megatron.models.checkpoint import read_checkpoint_metadata

    block = read_checkpoint_metadata(model_dir)[1].get("lora")
    return LoRAConfig(**block) if block else None


def _rank_entry(cfg, layout, checkpoint, tag):
    """One rank: the config and layout the launcher resolved (never reloaded here)."""
    import torch.distributed as dist

    from opsd_megatron.data.tokenizer import load_tokenizer

    log.set_name("eval")
    from opsd_megatron.eval.runner import evaluate
    from opsd_megatron.models.checkpoint import load_model_checkpoint
    from opsd_megatron.models.from_config import arch_of, build_model, params_dtype
    from opsd_megatron.models.lora import apply_lora
    from opsd_megatron.platform import initialize_model_parallel

    arch = arch_of(cfg.model)
    groups = initialize_model_parallel(layout.tp, layout.pp, seed=cfg.model.init_seed)
    model = build_model(cfg, arch, params_dtype(cfg.model), groups)
    if checkpoint:  # the adapters the checkpoint recorded, never the recipe's lora section
        recorded = _recorded_lora(Path(checkpoint) / "model")
        if recorded is not None:
            if cfg.lora is not None and recorded != cfg.lora and dist.get_rank() == 0:
                print(
                    f"[eval] {checkpoint}: using its recorded LoRA {recorded} (the recipe says "
                    f"{cfg.lora})",
                    flush=True,
                )
            apply_lora(model, recorded)
        load_model_checkpoint(model, Path(checkpoint) / "model", adapters_only=recorded is not None)
    return evaluate(model, load_tokenizer(cfg.model.tokenizer), cfg, arch, groups, tag)


def resolve(recipe: str, overrides: list[str], world_size: int | None, checkpoint=None):
    """(config, layout) checked once in the launching process (``UserError`` if it must not
    start): the ranks receive them as is."""
    cfg = load_config(recipe, overrides)
    if not cfg.eval.benchmarks:
        raise ConfigError(
            "eval.benchmarks is empty: e.g. eval.benchmarks=[../shared/data/aime24.jsonl]"
        )
    check_eval_run(cfg, checkpoint)
    return cfg, validate_layout(cfg, world_size, arch=arch_of(cfg.model))


def main(argv=None) -> int:
    """``opsd-eval``: check the recipe, benchmarks and checkpoint, then evaluate on every rank and
    print the report; returns the exit code."""
    p = argparse.ArgumentParser(
        prog="opsd-eval", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("recipe")
    p.add_argument("overrides", nargs="*", help="key=value overrides, e.g. eval.n_samples=4")
    p.add_argument(
        "--checkpoint",
        default=None,
        help="a training checkpoint directory (OUT/checkpoints/step_N)",
    )
    p.add_argument("--tag", default="eval", help="name of the report files under OUT/eval/")
    p.add_argument(
        "--dry-run",
        action="store_true",
        help="check the recipe, paths and benchmark files, then exit",
    )
    p.add_argument(
        "--debug",
        action="store_true",
        help="show the traceback of an input error, not just its line",
    )
    args = p.parse_intermixed_args(argv)  # options and key=value overrides in any order
    try:  # paths, benchmark files and the checkpoint are checked before any rank starts
        cfg, layout = resolve(args.recipe, args.overrides, launched_world_size(), args.checkpoint)
    except UserError as err:
        return report_error("opsd-eval", err, args.debug)
    if args.dry_run:
        print(f"[eval] {layout.describe()}; benchmarks {list(cfg.eval.benchmarks)}", flush=True)
        return 0
    with known_warnings.silenced():  # platform/known_warnings.py: each with why
        code, reports = guarded(
            "opsd-eval",
            args.debug,
            lambda: run_ranks(
                _rank_entry, layout.world_size, cfg, layout, args.checkpoint, args.tag
            ),
        )
    if code is not None:
        return code
    report = reports[0]
    if report is not None:
        print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
