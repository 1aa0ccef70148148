"""The step's data, from problems to micro-batches: this DP rank's problems and their student
prompts, the rollout engine's answers (``Rollouts``), and their packing into the micro-batches the
student pass runs (``MicroBatch``: packed student rows plus per-response-token tensors ``[B, R]``
aligned by response index, and the typed fields each algorithm's ``score`` fills).

Legend: B micro-batch rows, T sequence length, R response length, H hidden size, V local vocab
shard.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist

from opsd_megatron.config import ConfigError, DataConfig
from opsd_megatron.data.prompts import PackedBatch, pack, student_prompt_ids
from opsd_megatron.data.response_stats import response_stats
from opsd_megatron.data.tokenizer import Tokenizer
from opsd_megatron.losses.distributions import Hidden, Logits
from opsd_megatron.platform.parallel import ParallelGroups
from opsd_megatron.rollout.base import RolloutEngine


@dataclass
class Rollouts:
    """One step's sequences on this DP rank, before scoring."""

    step: int
    problems: list[dict]
    prompts: list[list[int]]  # the student prompt's token ids
    responses: list[list[int]]  # sampled ids (the stop token included) or, for SFT, the reference
    logprobs: list[list[float]] | None  # the sampler's log p(token); None: not sampled (SFT)
    generated_tokens: int
    finished: list[bool] | None = None  # sampled: stopped on a stop token (False: hit the limit)


@dataclass
class Scored:
    """What the student pass consumes: micro-batches (with the typed fields ``score`` fills) and
    this rank's counts for the step's metrics (summed over DP)."""

    micro_batches: list[MicroBatch]
    counts: dict[str, float]


@dataclass
class MicroBatch:
    """One micro-batch of the student pass: packed student rows and per-response-token tensors."""

    student: PackedBatch
    response_mask_BR: torch.Tensor
    response_tokens_BR: torch.Tensor
    sampler_logprobs_BR: torch.Tensor
    sampled: bool  # the responses were sampled (OPSD, GRPO), not reference solutions (SFT)
    rows: list[int] = field(default_factory=list)  # the step's rollouts it holds, in row order
    teacher_input: PackedBatch | None = None  # OPSD: teacher prompt + the same responses
    # What ``Algorithm.score`` adds for its loss (on the last pipeline stage; None elsewhere):
    teacher: Logits | Hidden | None = None  # OPSD: the teacher's view of the responses
    reference: Logits | Hidden | None = None  # OPSD ref_kl: the initial policy's view
    advantages_B: torch.Tensor | None = None  # GRPO: group-normalised advantage per row
    reference_logprobs_BR: torch.Tensor | None = None  # GRPO KL: the initial policy's log p(ŷ)


def micro_batches(
    prompts: list[list[int]],
    responses: list[list[int]],
    logprobs: list[list[float]] | None,
    micro: int,
    pad_id: int,
    device: torch.device | str,
    max_tokens: int | None = None,
    teacher_prompts: list[list[int]] | None = None,
    keep: list[bool] | None = None,
) -> list[MicroBatch]:
    """The step's sequences as micro-batches, built on the host from Python lists, then moved to
    ``device`` (the rank's): the one seam where a step's data reaches the accelerator.

    ``max_tokens`` None: ``micro`` consecutive rows each, all padded to the step's longest sequence
    (the pipeline schedule's fixed shape). Else by token budget: ``token_budget_groups``, each
    padded to its own longest row. ``teacher_prompts``: each row's teacher prompt, packed with the
    same responses (``teacher_input``, padded to its own micro-batch's longest row); ``keep``:
    rows to leave out of the loss (False) keep no response token in the mask."""
    lengths = [len(p) + len(r) for p, r in zip(prompts, responses)]
    if max_tokens is None:
        groups = [
            list(range(s, min(s + micro, len(prompts)))) for s in range(0, len(prompts), micro)
        ]
        width = max(lengths)
    else:
        groups, width = token_budget_groups(lengths, max_tokens), None
    out = []
    for rows in groups:
        resp = [responses[i] for i in rows]
        r_max = max(1, max(len(r) for r in resp))
        mask = torch.zeros(len(resp), r_max, dtype=torch.bool)
        tokens = torch.full((len(resp), r_max), pad_id, dtype=torch.long)
        lps = torch.zeros(len(resp), r_max)
        for j, (i, r) in enumerate(zip(rows, resp)):
            mask[j, : len(r)] = keep is None or keep[i]
            tokens[j, : len(r)] = torch.tensor(r, dtype=torch.long)
            if logprobs is not None:
                lps[j, : len(r)] = torch.tensor(logprobs[i])
        packed = pack([prompts[i] for i in rows], resp, pad_id, pad_to=width, device=device)
        teacher = None
        if teacher_prompts is not None:
            teacher = pack([teacher_prompts[i] for i in rows], resp, pad_id, device=device)
        out.append(
            MicroBatch(
                packed,
                mask.to(device),
                tokens.to(device),
                lps.to(device),
                sampled=logprobs is not None,
                rows=rows,
                teacher_input=teacher,
            )
        )
    return out


def token_budget_groups(lengths: list[int], max_tokens: int) -> list[list[int]]:
    """Row indices grouped longest first so that rows x the group's longest length <= max_tokens
    (first fit in order of length: each group is as full as the next row allows)."""
    too_long = [n for n in lengths if n > max_tokens]
    if too_long:
        raise ConfigError(
            f"trainer.micro_batch_tokens={max_tokens} is smaller than a sequence of this step "
            f"({max(too_long)} tokens: prompt + response); raise it or leave it unset"
        )
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    groups: list[list[int]] = []
    for i in order:
        if groups and (len(groups[-1]) + 1) * lengths[groups[-1][0]] <= max_tokens:
            groups[-1].append(i)
        else:
            groups.append([i])
    return groups


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
        teacher_prompts: list[list[int]] | None = None,
        keep: list[bool] | None = None,
    ) -> list[MicroBatch]:
        """The step's sequences as micro-batches (``micro_batches`` above), on the rank's device."""
        return micro_batches(
            prompts,
            responses,
            logprobs,
            self.micro_batch_size,
            self.tokenizer.pad_token_id,
            self.groups.device,
            self.micro_batch_tokens,
            teacher_prompts,
            keep,
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
