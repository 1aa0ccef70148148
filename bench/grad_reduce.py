"""Gradient reduction per step at DP=2 on CPU/gloo: the old trainer's loop (one all_reduce per
parameter) against megatron-core's DDP (contiguous fp32 buffer, bucketed all-reduce /
reduce-scatter), on a model with many small parameters (LoRA r=8 on a 12-layer model: ~100
adapter tensors). Prints milliseconds per step and the ratio; no assertion (timings vary).

    .venv/bin/python bench/grad_reduce.py [--steps 20]
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.distributed as dist

from opsd_megatron.testing import run_distributed

ARCH = dict(
    model_type="qwen3",
    vocab_size=512,
    hidden_size=256,
    intermediate_size=512,
    num_hidden_layers=12,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=64,
    tie_word_embeddings=True,
)


def _bench(steps: int, distributed: bool):
    from megatron.core import parallel_state as ps

    from opsd_megatron.config import LoRAConfig, OPSDConfig
    from opsd_megatron.models import arch_from_hf_config, build_gpt_model
    from opsd_megatron.models.lora import apply_lora
    from opsd_megatron.models.loss_contract import finalize_gradients
    from opsd_megatron.platform import initialize_model_parallel
    from opsd_megatron.train.optimizer import wrap_and_build, zero_grads

    groups = initialize_model_parallel(1, 1)
    model = build_gpt_model(
        arch_from_hf_config(ARCH), torch.float32, initialize=True, groups=groups
    )
    apply_lora(model, LoRAConfig(rank=8, alpha=16.0))
    params = [p for p in model.parameters() if p.requires_grad]
    group = ps.get_data_parallel_group()

    for p in params:  # the old loop: one collective per parameter
        p.grad = torch.randn_like(p)
    dist.barrier()
    t0 = time.perf_counter()
    for _ in range(steps):
        for p in params:
            dist.all_reduce(p.grad, group=group)
    loop_ms = (time.perf_counter() - t0) / steps * 1e3

    cfg = OPSDConfig()
    cfg.optimizer.distributed = distributed
    ddp, opt = wrap_and_build(cfg, model, torch.float32)
    for p in params:
        p.main_grad.normal_()
    dist.barrier()
    t0 = time.perf_counter()
    for _ in range(steps):
        finalize_gradients(ddp)
    ddp_ms = (time.perf_counter() - t0) / steps * 1e3
    zero_grads(ddp, opt)
    return len(params), loop_ms, ddp_ms


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--steps", type=int, default=20)
    args = ap.parse_args()
    for distributed in (False, True):
        n, loop_ms, ddp_ms = run_distributed(_bench, 2, args.steps, distributed, timeout=600)[0]
        kind = "reduce-scatter (distributed optimizer)" if distributed else "all-reduce"
        print(
            f"DP=2, {n} trainable tensors: per-parameter loop {loop_ms:.1f} ms/step, megatron DDP "
            f"{kind} "
            f"{ddp_ms:.1f} ms/step -> {loop_ms / ddp_ms:.1f}x"
        )


if __name__ == "__main__":
    main()
