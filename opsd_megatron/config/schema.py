"""The whole run's configuration: one field per section (defaults follow the paper, Table 6 and
§4.1: AdamW lr 2e-5, warmup 0.1, cosine, global batch 32, 1 rollout per problem, 2048 new tokens
at temperature 1.2, JSD β=0.5, LoRA r=64 α=128, teacher fixed to the initial policy)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

from opsd_megatron.config.algorithm_sections import (
    EvalConfig,
    GRPOConfig,
    LossConfig,
    RolloutConfig,
    SFTConfig,
)
from opsd_megatron.config.base import ConfigError
from opsd_megatron.config.model_sections import (
    LoRAConfig,
    ModelConfig,
    OptimizerConfig,
    ParallelConfig,
    TeacherConfig,
)
from opsd_megatron.config.run_sections import (
    CheckpointConfig,
    DataConfig,
    LoggingConfig,
    TrainerConfig,
)


@dataclass
class OPSDConfig:
    """A run's whole configuration, one field per section."""

    algorithm: str = "opsd"  # opsd | sft | grpo
    model: ModelConfig = field(default_factory=ModelConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    lora: Optional[LoRAConfig] = field(default_factory=LoRAConfig)  # null: full-parameter training
    teacher: TeacherConfig = field(default_factory=TeacherConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    grpo: GRPOConfig = field(default_factory=GRPOConfig)
    sft: SFTConfig = field(default_factory=SFTConfig)
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    data: DataConfig = field(default_factory=DataConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)

    def __post_init__(self):
        if self.algorithm not in ("opsd", "sft", "grpo"):
            raise ConfigError(f"algorithm must be opsd|sft|grpo, got {self.algorithm!r}")
        if self.lora is None and self.teacher.weights == "lora_base":
            raise ConfigError(
                "lora is null (full-parameter training): set teacher.weights=frozen_copy"
            )
        if self.teacher.context != "reference" and (
            self.algorithm != "opsd" or self.rollout.num_rollouts < 2
        ):
            raise ConfigError(
                f"teacher.context={self.teacher.context} reads another rollout of the same "
                "problem: it needs algorithm=opsd and rollout.num_rollouts >= 2, got "
                f"{self.algorithm} and {self.rollout.num_rollouts}"
            )
        if self.loss.fused and (self.rollout.top_k or self.rollout.top_p < 1.0):
            raise ConfigError(
                "loss.fused computes log-probs of the tempered softmax only: it needs "
                f"rollout.top_k=0 and rollout.top_p=1 (got {self.rollout.top_k}, "
                f"{self.rollout.top_p}), or loss.fused=false"
            )
        budget, longest = self.trainer.micro_batch_tokens, self.rollout.max_new_tokens + 1
        if budget is not None and self.algorithm != "sft" and budget < longest:
            raise ConfigError(
                f"trainer.micro_batch_tokens={budget} is smaller than one sequence can be "
                f"(a prompt and rollout.max_new_tokens={longest - 1}): raise it or leave it unset"
            )
        if self.loss.ref_kl_coef and self.teacher.update != "fixed":
            raise ConfigError(
                "loss.ref_kl_coef needs teacher.update=fixed: the reference policy is the "
                f"teacher's weights, which with teacher.update={self.teacher.update} are not "
                "the initial policy"
            )
