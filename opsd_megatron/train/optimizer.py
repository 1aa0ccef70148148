"""Gradients and the optimizer through megatron-core: ``DistributedDataParallel`` (bucketed gradient
reduction into fp32 main-grad buffers) and ``get_megatron_optimizer`` (fp32 master weights and
AdamW moments for 16-bit parameters; with ``optimizer.distributed`` the master weights and moments
are sharded over DP: reduce-scatter of grads, all-gather of updated weights).

Why not a plain ``torch.optim.AdamW``: on bf16 parameters an update of lr·1 = 2e-5 to a weight of
0.1 is below bf16's resolution and is rounded away; the fp32 master copy keeps it.

What megatron does for us (``finalize_model_grads``, called as ``models/loss_contract.py`` says:
how megatron must scale our already globally normalised loss): the DP reduction, the TP sum of
TP-duplicated parameters with per-rank gradients (q/k layernorm, sequence-parallel norms and our
sequence-parallel LoRA adapters, which carry ``sequence_parallel``), and the sum of the tied
embedding's two copies across pipeline stages. Clipping uses megatron's global norm (TP-duplicated
and tied copies counted once).

What we keep: the step with a non-finite gradient norm is skipped (megatron only detects inf/NaN
with an fp16 loss scaler; for bf16/fp32 it would clip by NaN and write NaN weights), and the LR
schedule (:class:`LRSchedule`, one place, applied to megatron's param groups).
"""

from __future__ import annotations

import math

import torch

from opsd_megatron.config import OPSDConfig


def overlap_possible() -> bool:
    """Overlapping the reduction with the backward is for CUDA streams; on CPU it runs at the end
    (tests/train/test_loss_contract.py runs megatron's overlap hooks on gloo all the same)."""
    return torch.cuda.is_available()


def wrap_and_build(cfg: OPSDConfig, model: torch.nn.Module, dtype: torch.dtype):
    """(DDP-wrapped model for the schedule, megatron optimizer). ``model`` keeps its identity: the
    sampler, teacher, evaluation and checkpoints use it directly."""
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer

    o = cfg.optimizer
    distributed = o.use_distributed()
    master_fp32 = dtype in (torch.bfloat16, torch.float16) and o.precision == "fp32"
    if dtype == torch.float16 and master_fp32:
        raise ValueError("fp16 parameters need a loss scaler; train in bf16 (model.dtype=bfloat16)")
    ddp_cfg = DistributedDataParallelConfig(
        grad_reduce_in_fp32=master_fp32 or dtype == torch.float32,
        overlap_grad_reduce=overlap_possible() and o.overlap_grad_reduce,
        use_distributed_optimizer=distributed,
        bucket_size=o.bucket_mb * 2**20 // 4 if o.bucket_mb else None,
    )
    ddp = DistributedDataParallel(model.config, ddp_cfg, model)
    opt_cfg = OptimizerConfig(
        optimizer="adam",
        lr=o.lr,
        min_lr=o.min_lr,
        weight_decay=o.weight_decay,
        adam_beta1=o.betas[0],
        adam_beta2=o.betas[1],
        adam_eps=o.eps,
        clip_grad=o.grad_clip if o.grad_clip > 0 else 0.0,
        bf16=master_fp32 and dtype == torch.bfloat16,
        fp16=master_fp32 and dtype == torch.float16,
        params_dtype=dtype,
        use_distributed_optimizer=distributed,
    )
    optimizer = get_megatron_optimizer(opt_cfg, [ddp])
    return ddp, optimizer


def zero_grads(ddp, optimizer) -> None:
    ddp.zero_grad_buffer()
    optimizer.zero_grad()


def optimizer_step(optimizer, max_norm: float) -> tuple[float, bool]:
    """Clip to ``max_norm`` by the global norm and step; a non-finite norm skips the update and
    leaves the weights untouched. Returns (grad norm before clipping, applied)."""
    from megatron.core.optimizer.clip_grads import clip_grad_by_total_norm_fp32

    found_inf = optimizer.prepare_grads()  # model grads -> fp32 main grads
    norm = float(optimizer.get_grad_norm())
    if found_inf or not math.isfinite(norm):
        return float("nan"), False
    params = optimizer.get_parameters()
    if max_norm > 0 and params:
        clip_grad_by_total_norm_fp32(params, max_norm=max_norm, total_norm=norm)
    return norm, bool(optimizer.step_with_ready_grads())


def lr_lambda(cfg: OPSDConfig):
    """Linear warmup over warmup_ratio of the horizon, then cosine (or constant) down to min_lr.
    The horizon is ``optimizer.decay_steps`` (Megatron's ``--lr-decay-iters``) or max_steps: a run
    extended in rounds keeps one schedule."""
    o = cfg.optimizer
    steps = o.decay_steps or cfg.trainer.max_steps
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


class LRSchedule:
    """``lr = base_lr · fn(step)`` on every param group of a megatron optimizer (torch's
    ``LambdaLR`` accepts only a ``torch.optim.Optimizer``). Same interface as torch's schedulers."""

    def __init__(self, optimizer, base_lr: float, fn):
        self.optimizer, self.base_lr, self.fn, self.last_step = optimizer, base_lr, fn, 0
        self._apply()

    def _apply(self) -> None:
        lr = self.base_lr * self.fn(self.last_step)
        for group in self.optimizer.param_groups:
            group["lr"] = lr

    def step(self) -> None:
        self.last_step += 1
        self._apply()

    def get_last_lr(self) -> list[float]:
        return [self.base_lr * self.fn(self.last_step)]

    def state_dict(self) -> dict:
        return {"last_step": self.last_step}

    def load_state_dict(self, state: dict) -> None:
        self.last_step = int(state["last_step"])
        self._apply()
