"""``opsd-plan RECIPE.yaml [key=value ...] [--gpu-gib 80] [--world N]``: per-GPU memory of the
recipe's layout, term by term, whether it fits the GPU, the smallest layout that does if not, and
the launch command it implies."""

from __future__ import annotations

import argparse
import sys

from opsd_megatron.config import ConfigError, load_config, validate_layout
from opsd_megatron.planner import GIB, PlanInput, plan, smallest_fitting_layout
from opsd_megatron.train.optimizer import use_distributed_optimizer


def plan_input(cfg, layout) -> PlanInput:
    bytes_per_param = 4 if cfg.model.dtype == "float32" else 2
    r = cfg.rollout
    student = cfg.data.max_problem_tokens + r.max_new_tokens + 64
    return PlanInput(arch=cfg.model.arch(), tp=layout.tp, pp=layout.pp, dp=layout.dp,
                     bytes_per_param=bytes_per_param, lora_rank=cfg.lora.rank if cfg.lora else None,
                     micro_batch_size=cfg.trainer.micro_batch_size, micro_batches_per_rank=layout.grad_accumulation,
                     student_seq_len=student, response_len=r.max_new_tokens,
                     frozen_teacher_copy=cfg.lora is None and not cfg.teacher.model.offload,
                     vllm_gpu_fraction=0.0 if r.engine == "megatron" else r.vllm.gpu_memory_utilization,
                     rollouts_per_rank=cfg.trainer.global_batch_size // layout.dp, recompute=cfg.model.recompute,
                     sequence_parallel=cfg.parallel.sequence_parallel and layout.tp > 1,
                     distributed_optimizer=use_distributed_optimizer(cfg),
                     master_fp32=cfg.optimizer.precision == "fp32")


def launch_command(recipe: str, p: PlanInput, gpus_per_node: int = 8) -> str:
    world = p.tp * p.pp * p.dp
    over = f"parallel.tensor_model_parallel_size={p.tp} parallel.pipeline_model_parallel_size={p.pp} " \
           f"parallel.data_parallel_size={p.dp}"
    if world <= gpus_per_node:
        return f"torchrun --nproc-per-node {world} -m opsd_megatron.train.cli {recipe} {over}"
    return f"RECIPE={recipe} sbatch --nodes {world // gpus_per_node} launch/opsd_70b.slurm {over}"

def refuse_unfit_layout(cfg, layout, gpu_gib: float) -> str | None:
    """None when the planner says the layout fits ``gpu_gib``; otherwise the reason, with the
    smallest layout that fits, for the trainer to refuse to start."""
    p = plan_input(cfg, layout)
    total = plan(p)["total"]
    if total <= gpu_gib * GIB:
        return None
    better = smallest_fitting_layout(p, gpu_gib * GIB)
    hint = (f"; the smallest layout that fits is TP {better.tp} x PP {better.pp} x DP {better.dp}" if better
            else "; no layout up to 128 GPUs fits")
    return (f"the planner estimates {total / GIB:.1f} GiB per GPU for {layout.describe()}, more than the "
            f"{gpu_gib:.0f} GiB GPU{hint} (see opsd-plan; pass --force to start anyway)")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="opsd-plan", description=__doc__)
    ap.add_argument("recipe")
    ap.add_argument("overrides", nargs="*")
    ap.add_argument("--gpu-gib", type=float, default=80.0, help="GPU memory to fit (A100-80GB by default)")
    ap.add_argument("--world", type=int, default=None, help="GPUs in the job (default: the recipe's layout)")
    args = ap.parse_intermixed_args(argv)  # options and key=value overrides in any order
    try:
        cfg = load_config(args.recipe, args.overrides)
        layout = validate_layout(cfg, args.world)
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
        print(f"smallest layout that fits: TP {chosen.tp} x PP {chosen.pp} x DP {chosen.dp} "
              f"({plan(chosen)['total'] / GIB:.1f} GiB per GPU)")
    print(launch_command(args.recipe, chosen))
    return 0


if __name__ == "__main__":
    sys.exit(main())
