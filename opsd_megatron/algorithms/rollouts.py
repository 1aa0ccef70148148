"""Where every algorithm's step starts: this DP rank's problems, their student prompts, the
rollout engine that answers them, and the micro-batches they are packed into."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from opsd_megatron.algorithms.base import Rollouts
from opsd_megatron.algorithms.batches import MicroBatch, micro_batches
from opsd_megatron.config import DataConfig
from opsd_megatron.data.prompts import student_prompt_ids
from opsd_megatron.data.tokenizer import Tokenizer
from opsd_megatron.platform.parallel import ParallelGroups
from opsd_megatron.rollout.base import RolloutEngine


@dataclass
class RolloutSource:
    """What every algorithm's step draws from: problems, prompts, the rollout engine, packing."""

    problems: list[dict]
    global_batch_size: int
    micro_batch_size: int
    tokenizer: Tokenizer
    data: DataConfig  # the prompt templates
    sampler: RolloutEngine
    max_new_tokens: int
    groups: ParallelGroups
    save_dir: Path | None = None  # write every rollout to save_dir/step_N_dpR.jsonl

    def problems_for_step(self, step: int, repeats: int = 1) -> list[dict]:
        """This DP rank's problems for ``step`` (each ``repeats`` times): a deterministic walk over
        the data, so a resumed run draws what the uninterrupted one would have."""
        per_step = self.global_batch_size // repeats
        n = len(self.problems)
        batch = [self.problems[(step * per_step + i) % n] for i in range(per_step)]
        batch = [p for p in batch for _ in range(repeats)]
        share = len(batch) // self.groups.dp_size
        return batch[self.groups.dp_rank * share : (self.groups.dp_rank + 1) * share]

    def student_prompts(self, problems: list[dict]) -> list[list[int]]:
        """Chat-formatted student prompts (the problem alone) as token ids."""
        return [student_prompt_ids(self.tokenizer, self.data, p["problem"]) for p in problems]

    def sample(self, step: int, repeats: int = 1) -> Rollouts:
        """The student's rollouts for ``step``: ``repeats`` per problem, from the problem alone."""
        problems = self.problems_for_step(step, repeats)
        prompts = self.student_prompts(problems)
        result = self.sampler.generate(prompts, self.max_new_tokens)
        if self.save_dir is not None:
            self._save(step, problems, result)
        return Rollouts(
            step, problems, prompts, result.responses, result.logprobs, result.num_tokens
        )

    def micro_batches(
        self,
        prompts: list[list[int]],
        responses: list[list[int]],
        logprobs: list[list[float]] | None,
    ) -> list[MicroBatch]:
        """The step's sequences as micro-batches of ``micro_batch_size`` rows, all of one width."""
        return micro_batches(
            prompts, responses, logprobs, self.micro_batch_size, self.tokenizer.pad_token_id
        )

    def _save(self, step: int, problems, result) -> None:
        if self.groups.tp_rank or self.groups.pp_rank:
            return
        self.save_dir.mkdir(parents=True, exist_ok=True)
        with (self.save_dir / f"step_{step + 1:06d}_dp{self.groups.dp_rank}.jsonl").open("w") as f:
            for p, r, lp, fin in zip(problems, result.responses, result.logprobs, result.finished):
                f.write(
                    json.dumps(
                        {
                            "id": p["id"],
                            "problem": p["problem"],
                            "response_ids": r,
                            "logprobs": lp,
                            "finished": fin,
                            "response": self.tokenizer.decode(r),
                        }
                    )
                    + "\n"
                )
