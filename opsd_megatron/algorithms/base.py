"""The interface every training algorithm implements: the three phases of one step.

``rollout(step)`` draws this DP rank's problems and their responses (sampled by the student, or
for SFT the reference solutions); ``score(rollouts)`` turns them into micro-batches with what the
loss needs (OPSD: the teacher's logits; GRPO: rewards and advantages; SFT: nothing more);
``per_token_loss`` is the loss on each response token given the student's next-token
distributions (``Logits``, or ``Hidden`` with ``loss.fused``: one interface). The trainer
(``train/step.py``) runs rollout -> score -> student pass -> gradient reduction -> optimizer step.

Legend: B micro-batch rows, R response length.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch

from opsd_megatron.algorithms.step_data import MicroBatch, Rollouts, Scored
from opsd_megatron.losses.distributions import Hidden, Logits
from opsd_megatron.platform.parallel import ParallelGroups


@dataclass
class Diagnostic:
    """A per-token figure ``[B, R]`` logged as its mean over ``mask_BR`` (None: the response
    mask), summed over micro-batches and DP ranks by token count."""

    values_BR: torch.Tensor
    mask_BR: torch.Tensor | None = None


class Algorithm(Protocol):
    """What ``train_step`` calls on OPSD, SFT and GRPO alike."""

    stat_names: tuple[
        str, ...
    ]  # the per-token diagnostics ``per_token_loss`` returns (logged as means)

    def rollout(self, step: int) -> Rollouts:
        """This rank's problems for ``step`` and their responses."""
        ...

    def score(self, rollouts: Rollouts) -> Scored:
        """Micro-batches carrying everything the loss needs beside the student's logits."""
        ...

    def per_token_loss(
        self, student: Logits | Hidden, mb: MicroBatch, groups: ParallelGroups
    ) -> tuple[torch.Tensor, dict[str, Diagnostic]]:
        """Loss per response token ``[B, R]`` (masked and reduced by the trainer) and the
        diagnostics named in ``stat_names``."""
        ...
