"""``opsd-plan RECIPE.yaml [key=value ...] [--gpu-gib 80] [--world N]``: per-GPU memory of the
recipe's layout, term by term, whether it fits the GPU, the smallest layout that does if not, and
the launch command it implies."""

from __future__ import annotations

import argparse
import sys

from opsd_megatron.config import ConfigError, load_config, validate_layout
from opsd_megatron.models.from_config import arch_of
from opsd_megatron.plan_config import launch_command, plan_input
from opsd_megatron.planner import GIB, plan, smallest_fitting_layout


def main(argv=None) -> int:
    """``opsd-plan``: print the per-GPU memory terms of the recipe's layout, whether it fits, the
    smallest layout that does and its launch command; returns 0, 1 (nothing fits) or 2 (bad
    input)."""
    ap = argparse.ArgumentParser(prog="opsd-plan", description=__doc__)
    ap.add_argument("recipe")
    ap.add_argument("overrides", nargs="*")
    ap.add_argument(
        "--gpu-gib", type=float, default=80.0, help="GPU memory to fit (A100-80GB by default)"
    )
    ap.add_argument(
        "--world", type=int, default=None, help="GPUs in the job (default: the recipe's layout)"
    )
    args = ap.parse_intermixed_args(argv)  # options and key=value overrides in any order
    try:
        cfg = load_config(args.recipe, args.overrides)
        layout = validate_layout(cfg, args.world, arch=arch_of(cfg.model))
    except (ConfigError, ValueError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    p = plan_input(cfg, layout)
    terms = plan(p)
    print(f"{args.recipe}: {layout.describe()}")
    for k, v in terms.items():
        print(f"  {k:<20} {v / GIB:9.2f} GiB")
    fits = terms["total"] <= args.gpu_gib * GIB
    print(f"fits a {args.gpu_gib:.0f} GiB GPU: {'yes' if fits else 'no'}")
    chosen = p if fits else smallest_fitting_layout(p, args.gpu_gib * GIB)
    if chosen is None:
        print("no layout up to 128 GPUs fits")
        return 1
    if not fits:
        print(
            f"smallest layout that fits: TP {chosen.tp} x PP {chosen.pp} x DP {chosen.dp} "
            f"({plan(chosen)['total'] / GIB:.1f} GiB per GPU)"
        )
    print(launch_command(args.recipe, chosen))
    return 0


if __name__ == "__main__":
    sys.exit(main())
