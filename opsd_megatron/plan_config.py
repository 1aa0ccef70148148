"""The memory planner applied to a run's config: its input (``plan_input``), the trainer's
refusal of a layout that does not fit, and the launch command for a layout. The planner reads the
same config defaults the trainer does (vLLM's share, the distributed optimizer)."""

from __future__ import annotations

from opsd_megatron.config import Layout, OPSDConfig
from opsd_megatron.models.from_config import arch_of
from opsd_megatron.planner import GIB, PlanInput, plan, smallest_fitting_layout

PROMPT_TEMPLATE_TOKENS = 64  # the chat template around a problem, at most (an upper bound)


def plan_input(cfg: OPSDConfig, layout: Layout) -> PlanInput:
    """The planner's input for a run: what the trainer will hold per GPU under ``layout``."""
    bytes_per_param = 4 if cfg.model.dtype == "float32" else 2
    r = cfg.rollout
    student = cfg.data.max_problem_tokens + r.max_new_tokens + PROMPT_TEMPLATE_TOKENS
    return PlanInput(
        arch=arch_of(cfg.model),
        tp=layout.tp,
        pp=layout.pp,
        dp=layout.dp,
        bytes_per_param=bytes_per_param,
        lora_rank=cfg.lora.rank if cfg.lora else None,
        micro_batch_size=cfg.trainer.micro_batch_size,
        micro_batch_tokens=cfg.trainer.micro_batch_tokens,
        micro_batches_per_rank=layout.grad_accumulation,
        student_seq_len=student,
        response_len=r.max_new_tokens,
        frozen_teacher_copy=cfg.lora is None and not cfg.teacher.offload,
        fused=cfg.loss.fused,
        ref_pass=cfg.algorithm == "opsd" and cfg.loss.ref_kl_coef > 0,
        vllm=r.vllm if r.engine == "vllm" else None,
        vllm_seq_len=vllm_model_len(cfg),
        rollouts_per_rank=cfg.trainer.global_batch_size // layout.dp,
        recompute=cfg.model.recompute,
        sequence_parallel=cfg.parallel.sequence_parallel and layout.tp > 1,
        distributed_optimizer=cfg.optimizer.use_distributed(),
        master_fp32=cfg.optimizer.precision == "fp32",
    )


def vllm_model_len(cfg: OPSDConfig) -> int:
    """vLLM's max_model_len as the planner sees it: prompts bounded by ``data.max_problem_tokens``
    plus the chat template (the engine uses the longest prompt it actually has)."""
    longest = cfg.data.max_problem_tokens + PROMPT_TEMPLATE_TOKENS
    limit = arch_of(cfg.model).max_position_embeddings
    return cfg.rollout.vllm.model_len(longest, cfg.rollout.max_new_tokens, limit)


def launch_command(recipe: str, p: PlanInput, gpus_per_node: int = 8) -> str:
    """How to start the recipe at the layout ``p``: torchrun on one node, sbatch beyond."""
    world = p.tp * p.pp * p.dp
    over = (
        f"parallel.tensor_model_parallel_size={p.tp} parallel.pipeline_model_parallel_size={p.pp} "
        f"parallel.data_parallel_size={p.dp}"
    )
    if world <= gpus_per_node:
        return f"torchrun --nproc-per-node {world} -m opsd_megatron.train.cli {recipe} {over}"
    return f"RECIPE={recipe} sbatch --nodes {world // gpus_per_node} launch/opsd_70b.slurm {over}"


def refuse_unfit_layout(cfg: OPSDConfig, layout: Layout, gpu_gib: float) -> str | None:
    """None when the planner says the layout fits ``gpu_gib``; otherwise the reason, with the
    smallest layout that fits, for the trainer to refuse to start."""
    p = plan_input(cfg, layout)
    total = plan(p)["total"]
    if total <= gpu_gib * GIB:
        return None
    better = smallest_fitting_layout(p, gpu_gib * GIB)
    hint = (
        f"; the smallest layout that fits is TP {better.tp} x PP {better.pp} x DP {better.dp}"
        if better
        else "; no layout up to 128 GPUs fits"
    )
    return (
        f"the planner estimates {total / GIB:.1f} GiB per GPU for {layout.describe()}, more than "
        "the "
        f"{gpu_gib:.0f} GiB GPU{hint} (see opsd-plan; pass --force to start anyway)"
    )
