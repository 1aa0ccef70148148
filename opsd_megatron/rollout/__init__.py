"""Rollout engines: the Megatron-native sampler (CPU and GPU, TP/PP) and, optionally, vLLM."""

from opsd_megatron.rollout.base import RolloutEngine, RolloutResult

__all__ = ["RolloutEngine", "RolloutResult"]
