"""Where every algorithm's step starts: this DP rank's problems, their student prompts, the
rollout engine that answers them, and the micro-batches they are packed into."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import torch.distributed as dist

from opsd_megatron.algorithms.base import Rollouts
from opsd_megatron.algorithms.batches import MicroBatch, micro_batches
from opsd_megatron.config import DataConfig
from opsd_megatron.data.prompts import student_prompt_ids
from opsd_megatron.data.response_stats import response_stats
from opsd_megatron.data.tokenizer import Tokenizer
from opsd_megatron.platform.parallel import ParallelGroups
from opsd_megatron.rollout.base import RolloutEngine


def request_seed(seed: int, step: int, problem: int, sample: int) -> int:
    """A 63-bit seed for one rollout request (BLAKE2b: stable across Python versions)."""
    digest = hashlib.blake2b(f"{seed}:{step}:{problem}:{sample}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & (2**63 - 1)


@dataclass
class StepData:
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
    seed: int = 0  # rollout.seed: the root of every request's seed
    micro_batch_tokens: int | None = None  # trainer.micro_batch_tokens: micro-batches by budget

    def _my_share(self, step_batch: list) -> list:
        share = len(step_batch) // self.groups.dp_size
        return step_batch[self.groups.dp_rank * share : (self.groups.dp_rank + 1) * share]

    def problems_for_step(self, step: int, repeats: int = 1) -> list[dict]:
        """This DP rank's problems for ``step`` (each ``repeats`` times): a deterministic walk over
        the data, so a resumed run draws what the uninterrupted one would have."""
        per_step = self.global_batch_size // repeats
        n = len(self.problems)
        batch = [self.problems[(step * per_step + i) % n] for i in range(per_step)]
        return self._my_share([p for p in batch for _ in range(repeats)])

    def request_seeds(self, step: int, repeats: int = 1) -> list[int]:
        """One seed per rollout of this rank, from (rollout.seed, step, problem's place in the
        step, sample index): the same on every TP rank and PP stage, and after a resume."""
        per_step = self.global_batch_size // repeats
        keys = [(i, r) for i in range(per_step) for r in range(repeats)]
        return [request_seed(self.seed, step, i, r) for i, r in self._my_share(keys)]

    def student_prompts(self, problems: list[dict]) -> list[list[int]]:
        """Chat-formatted student prompts (the problem alone) as token ids."""
        return [student_prompt_ids(self.tokenizer, self.data, p["problem"]) for p in problems]

    def sample(self, step: int, repeats: int = 1) -> Rollouts:
        """The student's rollouts for ``step``: ``repeats`` per problem, from the problem alone."""
        problems = self.problems_for_step(step, repeats)
        prompts = self.student_prompts(problems)
        seeds = self.request_seeds(step, repeats)
        result = self.sampler.generate(prompts, self.max_new_tokens, seeds)
        if self.save_dir is not None:
            self._save(step, problems, result)
        return Rollouts(
            step,
            problems,
            prompts,
            result.responses,
            result.logprobs,
            result.num_tokens,
            list(result.finished),
        )

    def micro_batches(
        self,
        prompts: list[list[int]],
        responses: list[list[int]],
        logprobs: list[list[float]] | None,
    ) -> list[MicroBatch]:
        """The step's sequences as micro-batches (``batches.micro_batches``)."""
        return micro_batches(
            prompts,
            responses,
            logprobs,
            self.micro_batch_size,
            self.tokenizer.pad_token_id,
            self.groups.device,
            self.micro_batch_tokens,
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


def step_response_stats(
    rollouts: Rollouts, tokenizer: Tokenizer, groups: ParallelGroups, markers
) -> dict[str, float]:
    """``data/response_stats.py``'s figures over the whole step's sampled responses (gathered over
    DP: a few kB of text), the same on every rank."""
    mine = [
        (tokenizer.decode(r, skip_special_tokens=True), len(r), not fin)
        for r, fin in zip(rollouts.responses, rollouts.finished)
    ]
    parts = [mine]
    if groups.dp_size > 1:
        parts = [None] * groups.dp_size
        dist.all_gather_object(parts, mine, group=groups.dp)
    rows = [row for part in parts for row in part]
    return response_stats(
        [t for t, _, _ in rows], [n for _, n, _ in rows], [c for _, _, c in rows], markers
    )
