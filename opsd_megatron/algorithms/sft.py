"""Supervised fine-tuning: cross-entropy on the reference solution given the student prompt (or,
for a deterministic ``sft.teacher_prompt_fraction`` of examples, the teacher prompt), masked to
the solution's tokens (the solution is followed by the end-of-turn token)."""

from __future__ import annotations

import zlib

from opsd_megatron.algorithms.base import Rollouts, Scored
from opsd_megatron.algorithms.step_data import MicroBatch, StepData
from opsd_megatron.config import SFTConfig
from opsd_megatron.data.prompts import teacher_prompt_ids
from opsd_megatron.losses.distributions import Hidden, Logits
from opsd_megatron.platform.parallel import ParallelGroups


class SFT:
    """SFT's phases: reference solutions as the responses, no scoring beyond packing."""

    stat_names: tuple[str, ...] = ()

    def __init__(self, source: StepData, sft: SFTConfig, vocab_size: int):
        self.source, self.sft, self.vocab_size = source, sft, vocab_size

    def rollout(self, step: int) -> Rollouts:
        """No sampling: the "responses" are the reference solutions, each after its prompt."""
        src, tok = self.source, self.source.tokenizer
        problems = src.problems_for_step(step)
        student = src.student_prompts(problems)
        frac = self.sft.teacher_prompt_fraction
        prompts = [
            teacher_prompt_ids(tok, src.data, p["problem"], p["solution"], p.get("answer"))
            if (zlib.crc32(f"{step}:{i}".encode()) % 1000) < frac * 1000
            else student[i]
            for i, p in enumerate(problems)
        ]
        targets = [
            tok.encode(p["solution"], add_special_tokens=False) + [tok.eos_token_id]
            for p in problems
        ]
        return Rollouts(step, problems, prompts, targets, None, 0)

    def score(self, rollouts: Rollouts) -> Scored:
        """Pack the (prompt, reference) pairs; count the reference tokens trained on."""
        mbs = self.source.micro_batches(rollouts.prompts, rollouts.responses, None)
        return Scored(
            mbs,
            {
                "generated_tokens": 0.0,
                "reference_tokens": float(sum(len(t) for t in rollouts.responses)),
            },
        )

    def per_token_loss(self, student: Logits | Hidden, mb: MicroBatch, groups: ParallelGroups):
        """−log p_S(y*_n) per reference token."""
        logprobs = student.token_logprobs(
            mb.response_tokens_BR,
            vocab_size=self.vocab_size,
            group=groups.tp if groups is not None else None,
        )
        return -logprobs, {}
