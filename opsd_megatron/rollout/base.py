"""The rollout-engine interface the trainer talks to."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol


@dataclass
class RolloutResult:
    """Sampled responses with the sampler's log-probs and whether each stopped."""

    responses: list[list[int]]  # sampled token ids per prompt, the stop token included if reached
    # the sampler's log p(token) under the sampling distribution: temperature, then top-k, then
    # top-p, renormalised (vLLM's processed log-probs); greedy: the full distribution at T=1
    logprobs: list[list[float]]
    finished: list[bool]  # stopped at a stop token (False: hit max_new_tokens)

    @property
    def num_tokens(self) -> int:
        return sum(len(r) for r in self.responses)


class RolloutEngine(Protocol):
    """A rollout engine: the Megatron-native sampler or colocated vLLM."""

    def generate(
        self, prompts: list[list[int]], max_new_tokens: int, seeds: list[int] | None = None
    ) -> RolloutResult:
        """Sample up to ``max_new_tokens`` after each prompt (token ids); collective over the
        model's ranks. ``seeds``: one per prompt (vLLM seeds each request with it; the Megatron
        sampler draws one batch-wide stream per call, its call count checkpointed)."""
        ...
