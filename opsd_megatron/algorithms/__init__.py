"""Training algorithms sharing data, rollouts, model, checkpoints and logging: each one prepares
the step's micro-batches and defines the per-response-token loss. ``algorithm: opsd|sft|grpo``."""

from __future__ import annotations


def build_algorithm(cfg):
    from opsd_megatron.algorithms.grpo import GRPO
    from opsd_megatron.algorithms.opsd import OPSD
    from opsd_megatron.algorithms.sft import SFT

    algorithms = {"opsd": OPSD, "sft": SFT, "grpo": GRPO}
    if cfg.algorithm not in algorithms:
        raise ValueError(f"algorithm must be one of {sorted(algorithms)}, got {cfg.algorithm!r}")
    return algorithms[cfg.algorithm]()
