"""The parallel layout (TP x PP x DP, micro-batches per step), checked before anything is built."""

from __future__ import annotations

from dataclasses import dataclass

from opsd_megatron.config.base import ConfigError
from opsd_megatron.config.schema import OPSDConfig


@dataclass(frozen=True)
class Layout:
    """The one layout type: TP x PP x DP, sequence parallelism (only with TP > 1, as in
    Megatron-LM), and the micro-batches each DP rank runs per step. Checked from the config by
    ``validate_layout`` before any rank starts; the process groups built from it are
    ``platform.ParallelGroups``."""

    tp: int = 1
    pp: int = 1
    dp: int = 1
    sequence_parallel: bool = False
    grad_accumulation: int = 1

    def __post_init__(self):
        if self.tp == 1 and self.sequence_parallel:  # nothing to split the sequence over
            object.__setattr__(self, "sequence_parallel", False)

    @property
    def world_size(self) -> int:
        return self.tp * self.pp * self.dp

    def describe(self) -> str:
        return (
            f"world {self.world_size} = TP {self.tp} x PP {self.pp} x DP {self.dp}; "
            f"{self.grad_accumulation} micro-batch(es) per DP rank per step"
        )


def validate_layout(cfg: OPSDConfig, world_size: int | None = None, *, arch) -> Layout:
    """Check the parallel layout against the world size, the model and the batch before building.

    ``arch`` is the model's ``ArchSpec`` (``models.arch_of(cfg.model)``); it says which TP/PP
    splits its heads and layers allow."""
    p, t = cfg.parallel, cfg.trainer
    tp, pp = p.tensor_model_parallel_size, p.pipeline_model_parallel_size
    if world_size is None:
        world_size = tp * pp * (p.data_parallel_size or 1)
    if world_size % (tp * pp):
        raise ConfigError(
            f"world size {world_size} is not divisible by tensor_model_parallel_size*"
            f"pipeline_model_parallel_size = {tp}*{pp}"
        )
    dp = world_size // (tp * pp)
    if p.data_parallel_size is not None and p.data_parallel_size != dp:
        raise ConfigError(
            f"parallel.data_parallel_size={p.data_parallel_size} but world size {world_size} "
            f"= {tp}*{pp}*{dp}"
        )
    try:
        arch.check_layout(tp, pp)
    except ValueError as err:
        raise ConfigError(f"parallel: {err}") from err
    per_step = t.micro_batch_size * dp
    if t.global_batch_size % per_step:
        raise ConfigError(
            f"trainer.global_batch_size={t.global_batch_size} is not divisible by "
            f"trainer.micro_batch_size*dp = {t.micro_batch_size}*{dp}"
        )
    repeats = {"grpo": cfg.grpo.group_size, "opsd": cfg.rollout.num_rollouts}.get(cfg.algorithm, 1)
    if t.global_batch_size % (repeats * dp):
        raise ConfigError(
            f"trainer.global_batch_size={t.global_batch_size} must be divisible by the rollouts "
            f"per problem ({repeats}) x dp ({dp}), so no problem's rollouts straddle DP ranks"
        )
    if cfg.lora is not None and cfg.lora.rank % tp:
        raise ConfigError(
            f"lora.rank={cfg.lora.rank} is not divisible by tensor_model_parallel_size={tp}"
        )
    return Layout(
        tp=tp,
        pp=pp,
        dp=dp,
        sequence_parallel=p.sequence_parallel,
        grad_accumulation=t.global_batch_size // per_step,
    )
