"""Build every component of a run from the config: process groups, tokenizer, model (+ LoRA),
teacher, optimizer and LR schedule, rollout engine, data. Nothing here runs a step."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch

from opsd_megatron.config import Layout, OPSDConfig, validate_layout
from opsd_megatron.train.optimizer import LRSchedule, wrap_and_build


@dataclass
class Components:
    cfg: OPSDConfig
    layout: Layout
    arch: Any
    tokenizer: Any
    model: torch.nn.Module  # the megatron module (sampler, teacher, evaluation, checkpoints)
    ddp: torch.nn.Module  # the same module wrapped in megatron's DDP: what the training schedule runs
    teacher: Any
    optimizer: Any  # megatron's MegatronOptimizer (fp32 master weights for 16-bit parameters)
    scheduler: Any
    sampler: Any
    problems: list[dict]
    params_dtype: torch.dtype


def params_dtype(cfg: OPSDConfig) -> torch.dtype:
    if cfg.model.dtype == "auto":
        return torch.bfloat16 if torch.cuda.is_available() else torch.float32
    return getattr(torch, cfg.model.dtype)


def lr_lambda(cfg: OPSDConfig):
    """Linear warmup over warmup_ratio of max_steps, then cosine (or constant) down to min_lr."""
    o, steps = cfg.optimizer, cfg.trainer.max_steps
    warmup = int(round(o.warmup_ratio * steps))
    floor = o.min_lr / o.lr

    def f(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        if o.schedule == "constant":
            return 1.0
        progress = (step - warmup) / max(1, steps - warmup)
        return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))

    return f


def build_model(cfg: OPSDConfig, arch, dtype):
    from opsd_megatron.models import build_gpt_model
    from opsd_megatron.models.checkpoint import load_model_checkpoint
    from opsd_megatron.models.hf_io import HFCheckpointReader
    from opsd_megatron.models.hf_weights import load_hf_weights
    from opsd_megatron.models.random_init import RandomHFWeights

    model = build_gpt_model(arch, dtype, initialize=False, recompute=cfg.model.recompute,
                            sequence_parallel=cfg.parallel.sequence_parallel)
    if not (cfg.model.hf_dir or cfg.model.megatron_dir):
        with RandomHFWeights(arch, cfg.model.init_seed, cfg.model.init_std) as reader:  # same weights at any TP/PP
            load_hf_weights(model, reader, arch)
    elif cfg.model.hf_dir:
        with HFCheckpointReader(cfg.model.hf_dir) as reader:
            load_hf_weights(model, reader, arch)
    elif cfg.model.megatron_dir:
        load_model_checkpoint(model, cfg.model.megatron_dir)
    model.config.calculate_per_token_loss = True  # our loss is already globally normalised
    return model


def build_components(cfg: OPSDConfig) -> Components:
    import torch.distributed as dist

    from opsd_megatron.data.dataset import load_problems
    from opsd_megatron.data.tokenizer import load_tokenizer, stop_token_ids
    from opsd_megatron.models.lora import apply_lora, enable_input_grads
    from opsd_megatron.models.teacher import Teacher
    from opsd_megatron.platform import initialize_model_parallel
    from opsd_megatron.rollout.megatron_sampler import MegatronSampler

    arch = cfg.model.arch()
    layout = validate_layout(cfg, dist.get_world_size(), arch)
    initialize_model_parallel(layout.tp, layout.pp, seed=cfg.model.init_seed)
    tokenizer = load_tokenizer(cfg.model.tokenizer)
    if len(tokenizer) > arch.vocab_size:
        raise ValueError(f"tokenizer has {len(tokenizer)} tokens but the model's vocab_size is {arch.vocab_size}")
    dtype = params_dtype(cfg)
    model = build_model(cfg, arch, dtype)
    if cfg.lora is not None:
        apply_lora(model, cfg.lora)
        if cfg.model.recompute:
            enable_input_grads(model)
    teacher = Teacher(model, cfg.teacher.model, build_model=lambda: build_model(cfg, arch, dtype),
                      update=cfg.teacher.kind, ema_rate=cfg.teacher.ema_rate)
    ddp, optimizer = wrap_and_build(cfg, model, dtype)
    if ddp.ddp_config.overlap_grad_reduce:  # the schedule syncs grads on the last micro-batch only
        model.config.no_sync_func = ddp.no_sync
    scheduler = LRSchedule(optimizer, cfg.optimizer.lr, lr_lambda(cfg))
    r = cfg.rollout
    if r.engine == "vllm":  # needs the optional extra; fails with a clear ImportError otherwise
        from opsd_megatron.rollout.vllm_engine import VLLMEngine

        sampler = VLLMEngine(model, arch, cfg, tokenizer, stop_token_ids(tokenizer))
    else:
        sampler = MegatronSampler(model, temperature=r.temperature, top_k=r.top_k, top_p=r.top_p,
                                  stop_ids=stop_token_ids(tokenizer), pad_id=tokenizer.pad_token_id,
                                  vocab_size=arch.vocab_size, seed=r.seed)
    problems = load_problems(cfg.data, lambda text: len(tokenizer.encode(text, add_special_tokens=False))).rows
    return Components(cfg, layout, arch, tokenizer, model, ddp, teacher, optimizer, scheduler, sampler, problems,
                      dtype)
