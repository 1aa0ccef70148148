"""Training algorithms sharing data, rollouts, model, checkpoints and logging: each implements
the phases of ``base.Algorithm`` (rollout, score, per-token loss). ``algorithm: opsd|sft|grpo``."""

from __future__ import annotations

from opsd_megatron.algorithms.base import Algorithm, Rollouts, Scored
from opsd_megatron.algorithms.step_data import StepData
from opsd_megatron.config import OPSDConfig
from opsd_megatron.models.teacher import Teacher

__all__ = ["Algorithm", "StepData", "Rollouts", "Scored", "build_algorithm"]


def build_algorithm(
    cfg: OPSDConfig, source: StepData, teacher: Teacher, vocab_size: int
) -> Algorithm:
    """The configured algorithm, built from the config sections it needs."""
    from opsd_megatron.algorithms.grpo import GRPO
    from opsd_megatron.algorithms.opsd import OPSD
    from opsd_megatron.algorithms.sft import SFT
    from opsd_megatron.data.grading import Grader

    if cfg.algorithm == "opsd":
        peers = None
        if cfg.teacher.context != "reference":  # reference-free: graded rollouts as context
            peers = (cfg.teacher.context, Grader(cfg.eval.grade_timeout, cfg.eval.answer_format))
        return OPSD(
            source, cfg.loss, cfg.data, teacher, vocab_size, cfg.rollout.num_rollouts, peers
        )
    if cfg.algorithm == "sft":
        return SFT(source, cfg.sft, vocab_size)
    if cfg.algorithm == "grpo":
        return GRPO(
            source,
            cfg.grpo,
            cfg.rollout.logprob_distribution,
            teacher,
            Grader(cfg.eval.grade_timeout, cfg.eval.answer_format),  # the reward reads as eval
            vocab_size,
            fused=cfg.loss.fused,
        )
    raise ValueError(f"algorithm must be opsd|sft|grpo, got {cfg.algorithm!r}")
