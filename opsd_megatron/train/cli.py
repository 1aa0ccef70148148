"""``opsd-train RECIPE.yaml [key=value ...]``: train OPSD on megatron-core.

Under torchrun (WORLD_SIZE set) this process is one rank (NCCL on GPUs, gloo on CPU). Otherwise
it starts TP*PP*DP local processes itself (gloo), so the tiny recipes run anywhere.
Before any rank starts, the recipe, every path, the data files and the resume decision are
checked (``train/resume.py``: an output directory holding another run's checkpoint is refused);
an input error is one line, ``opsd-train: error: <where>: <what>`` (exit 2; ``--debug`` adds the
traceback). ``--dry-run`` does all of that, prints the overrides and the layout (``--verbose``:
the whole resolved config), and exits.
A layout the memory planner (``opsd-plan``) says cannot fit the GPU is refused unless ``--force``.
"""

from __future__ import annotations

import argparse
import signal
import sys
from pathlib import Path

from opsd_megatron.config import ConfigError, to_yaml
from opsd_megatron.errors import UserError, guarded, report
from opsd_megatron.plan_config import refuse_unfit_layout
from opsd_megatron.platform import known_warnings, log
from opsd_megatron.platform.launch import launched_world_size, run_ranks
from opsd_megatron.train.preemption import FLAG_FILE, PREEMPTED_EXIT_CODE
from opsd_megatron.train.resolved import resolve


def _gpu_gib() -> float:
    import torch

    if torch.cuda.is_available():
        return torch.cuda.get_device_properties(0).total_memory / 2**30
    return 80.0


def _rank_entry(resolved):
    """One rank: the run exactly as the launcher resolved it (config, layout, resume plan)."""
    import torch

    from opsd_megatron.train.loop import run

    if not torch.cuda.is_available():  # free on CPU; part of what makes a CPU run repeatable
        torch.use_deterministic_algorithms(True, warn_only=True)

    return run(resolved)


def main(argv=None) -> int:
    """``opsd-train``: check the recipe, paths, data, layout fit and resume plan before any rank
    starts (one-line errors, exit 2), then run the ranks (spawned on CPU, or as torchrun's);
    returns the exit code (130 on Ctrl-C, the preemption code for a requeue)."""
    p = argparse.ArgumentParser(
        prog="opsd-train", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("recipe", help="YAML recipe, e.g. recipes/tiny_cpu.yaml")
    p.add_argument(
        "overrides", nargs="*", help="key=value overrides, e.g. trainer.max_steps=10 loss.beta=0"
    )
    p.add_argument(
        "--dry-run",
        action="store_true",
        help="validate the recipe, paths, data and resume decision, print the config and layout, "
        "exit",
    )
    p.add_argument(
        "--force", action="store_true", help="start even if opsd-plan says the layout does not fit"
    )
    p.add_argument(
        "--gpu-gib",
        type=float,
        default=None,
        help="GPU memory the layout must fit (default: this machine's GPU, else 80 for an "
        "A100-80GB)",
    )
    p.add_argument(
        "--verbose",
        action="store_true",
        help="print the whole resolved config (always written to OUT/config.yaml)",
    )
    p.add_argument(
        "--debug",
        action="store_true",
        help="show the traceback of an input error, not just its line",
    )
    args = p.parse_intermixed_args(argv)  # options and key=value overrides in any order
    try:  # everything a user can get wrong is found here, before any rank or model exists
        resolved = resolve(args.recipe, args.overrides, launched_world_size())
        cfg, layout, plan = resolved.cfg, resolved.layout, resolved.resume
        refusal = (
            None
            if args.force or plan.action == "finished"
            else refuse_unfit_layout(cfg, layout, args.gpu_gib or _gpu_gib())
        )
        if refusal:
            raise ConfigError(refusal)
    except UserError as err:
        return report("opsd-train", err, args.debug)
    log.set_name(cfg.logging.name or cfg.algorithm)
    for note in plan.notes:
        log.say(note)
    if plan.action == "finished":  # nothing is rewritten
        log.say(
            f"{cfg.trainer.output_dir}: finished at step {plan.step} ({plan.checkpoint}); nothing "
            "to do (to train further: trainer.max_steps=<more>)"
        )
        return 0
    if args.verbose:
        print(to_yaml(cfg))
    else:  # the whole config goes to OUT/config.yaml
        log.say(f"{args.recipe} {' '.join(args.overrides)}".strip())
    log.say(f"layout: {layout.describe()}")
    if plan.action == "resume":
        log.say(f"will resume from {plan.checkpoint} (step {plan.step}) once its manifest verifies")
    if args.dry_run:
        return 0
    if (
        launched_world_size() is None
    ):  # local ranks: SIGUSR1 to this launcher asks them to checkpoint and stop
        flag = Path(cfg.trainer.output_dir) / FLAG_FILE
        signal.signal(
            signal.SIGUSR1,
            lambda *_: (flag.parent.mkdir(parents=True, exist_ok=True), flag.touch()),
        )
    with known_warnings.silenced():  # platform/known_warnings.py: each with why
        code, results = guarded(
            "opsd-train",
            args.debug,
            lambda: run_ranks(
                _rank_entry,
                layout.world_size,
                resolved,  # decided once, here: no rank reloads the recipe or re-decides
                threads_per_rank=cfg.trainer.threads_per_rank,
            ),
        )
    if code is not None:  # Ctrl-C: the last complete checkpoint stands
        return code
    if any(isinstance(r, dict) and r.get("preempted") for r in results):
        return PREEMPTED_EXIT_CODE  # launch/common.sh requeues the job on this code
    return 0


if __name__ == "__main__":
    sys.exit(main())
