"""Build every component of one rank's run from the resolved config and layout (decided once, by
the launcher): process groups, tokenizer, model (+ LoRA), teacher, optimizer and LR schedule,
rollout engine, data, and the algorithm over them. Nothing here runs a step."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from opsd_megatron.algorithms import Algorithm, StepData, build_algorithm
from opsd_megatron.config import Layout, OPSDConfig
from opsd_megatron.data.tokenizer import Tokenizer
from opsd_megatron.models import loss_contract
from opsd_megatron.models.from_config import arch_of, build_model, params_dtype
from opsd_megatron.models.hf_config import ArchSpec
from opsd_megatron.models.teacher import Teacher
from opsd_megatron.platform.parallel import ParallelGroups
from opsd_megatron.rollout.base import RolloutEngine
from opsd_megatron.train.optimizer import LRSchedule, lr_lambda, wrap_and_build

if TYPE_CHECKING:
    from megatron.core.distributed import DistributedDataParallel
    from megatron.core.optimizer import MegatronOptimizer


@dataclass
class Components:
    """Everything one rank of a run holds, built once by ``build_components``."""

    cfg: OPSDConfig
    layout: Layout
    groups: ParallelGroups
    arch: ArchSpec
    tokenizer: Tokenizer
    model: torch.nn.Module  # the megatron module (sampler, teacher, evaluation, checkpoints)
    # the same module in megatron's DDP: what the training schedule runs
    ddp: DistributedDataParallel
    teacher: Teacher
    optimizer: MegatronOptimizer  # fp32 master weights for 16-bit parameters
    scheduler: LRSchedule
    sampler: RolloutEngine
    problems: list[dict]
    params_dtype: torch.dtype
    algorithm: Algorithm


def _sampler(
    cfg: OPSDConfig,
    model,
    arch: ArchSpec,
    tokenizer: Tokenizer,
    groups: ParallelGroups,
    problems: list[dict],
) -> RolloutEngine:
    from opsd_megatron.data.tokenizer import stop_token_ids

    r = cfg.rollout
    if r.engine == "vllm":  # needs the optional extra; fails with a clear ImportError otherwise
        from opsd_megatron.data.prompts import student_prompt_ids
        from opsd_megatron.rollout.vllm_engine import VLLMEngine

        longest = max(len(student_prompt_ids(tokenizer, cfg.data, p["problem"])) for p in problems)
        # Adam's two fp32 moments per trainable parameter appear at the first step, after vLLM
        # has taken its share of the free memory (sharded over DP by the distributed optimizer)
        moments = 8 * sum(p.numel() for p in model.parameters() if p.requires_grad)
        if cfg.optimizer.use_distributed():
            moments //= groups.dp_size
        return VLLMEngine(
            model,
            arch,
            cfg,
            tokenizer,
            stop_token_ids(tokenizer),
            groups,
            longest_prompt=longest,
            reserve_bytes=moments,
            rows=cfg.trainer.global_batch_size // groups.dp_size,
        )
    from opsd_megatron.rollout.megatron_sampler import MegatronSampler

    return MegatronSampler(
        model,
        temperature=r.temperature,
        top_k=r.top_k,
        top_p=r.top_p,
        stop_ids=stop_token_ids(tokenizer),
        pad_id=tokenizer.pad_token_id,
        vocab_size=arch.vocab_size,
        seed=r.seed,
        groups=groups,
    )


def build_components(cfg: OPSDConfig, layout: Layout) -> Components:
    """Collective: every rank builds its share of the run (model stage, optimizer shard, data)
    on ``layout``, the one the launcher checked."""
    from opsd_megatron.data.dataset import load_problems
    from opsd_megatron.data.tokenizer import load_tokenizer
    from opsd_megatron.models.lora import apply_lora, enable_input_grads
    from opsd_megatron.platform import initialize_model_parallel

    arch = arch_of(cfg.model)
    groups = initialize_model_parallel(layout.tp, layout.pp, seed=cfg.model.init_seed)
    tokenizer = load_tokenizer(cfg.model.tokenizer)
    if len(tokenizer) > arch.vocab_size:
        raise ValueError(
            f"tokenizer has {len(tokenizer)} tokens but the model's vocab_size is {arch.vocab_size}"
        )
    dtype = params_dtype(cfg.model)
    model = build_model(cfg, arch, dtype, groups)
    if cfg.lora is not None:
        apply_lora(model, cfg.lora)
        if cfg.model.recompute:
            enable_input_grads(model)
    teacher = Teacher(model, cfg.teacher, build_model=lambda: build_model(cfg, arch, dtype, groups))
    ddp, optimizer = wrap_and_build(cfg, model, dtype)
    loss_contract.configure_model(model, ddp)  # with overlap: one gradient sync per step
    # token-budget micro-batches differ in rows and width: at PP>1 the pipeline then sends each
    # activation's shape ahead of it (megatron-core 0.16.1 p2p_communication._communicate_shapes)
    model.config.variable_seq_lengths = (
        groups.pp_size > 1 and cfg.trainer.micro_batch_tokens is not None
    )
    scheduler = LRSchedule(optimizer, cfg.optimizer.lr, lr_lambda(cfg))
    problems = load_problems(
        cfg.data,
        lambda text: len(tokenizer.encode(text, add_special_tokens=False)),
        solution_required=cfg.teacher.context == "reference",
    ).rows
    sampler = _sampler(cfg, model, arch, tokenizer, groups, problems)
    t = cfg.trainer
    step_data = StepData(
        problems=problems,
        global_batch_size=t.global_batch_size,
        micro_batch_size=t.micro_batch_size,
        tokenizer=tokenizer,
        data=cfg.data,
        sampler=sampler,
        max_new_tokens=cfg.rollout.max_new_tokens,
        groups=groups,
        save_dir=Path(t.output_dir) / "rollouts" if t.save_rollouts else None,
        seed=cfg.rollout.seed,
        micro_batch_tokens=t.micro_batch_tokens,
    )
    return Components(
        cfg=cfg,
        layout=layout,
        groups=groups,
        arch=arch,
        tokenizer=tokenizer,
        model=model,
        ddp=ddp,
        teacher=teacher,
        optimizer=optimizer,
        scheduler=scheduler,
        sampler=sampler,
        problems=problems,
        params_dtype=dtype,
        algorithm=build_algorithm(cfg, step_data, teacher, arch.vocab_size),
    )
