"""Micro-batches shared by the algorithms: a packed student sequence per row plus per-response-token
tensors ``[B, R]`` aligned by response index.

Legend: B micro-batch rows, T sequence length, R response length, V local vocab shard.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from opsd_megatron.config import ConfigError
from opsd_megatron.data.prompts import PackedBatch, pack
from opsd_megatron.losses.distributions import Hidden, Logits


@dataclass
class MicroBatch:
    """One micro-batch of the student pass: packed student rows and per-response-token tensors."""

    student: PackedBatch
    response_mask_BR: torch.Tensor
    response_tokens_BR: torch.Tensor
    sampler_logprobs_BR: torch.Tensor
    sampled: bool  # the responses were sampled (OPSD, GRPO), not reference solutions (SFT)
    rows: list[int] = field(default_factory=list)  # the step's rollouts it holds, in row order
    # What ``Algorithm.score`` adds for its loss (on the last pipeline stage; None elsewhere):
    teacher: Logits | Hidden | None = None  # OPSD: the teacher's view of the responses
    reference: Logits | Hidden | None = None  # OPSD ref_kl: the initial policy's view
    advantages_B: torch.Tensor | None = None  # GRPO: group-normalised advantage per row
    reference_logprobs_BR: torch.Tensor | None = None  # GRPO KL: the initial policy's log p(ŷ)

    @property
    def device(self) -> torch.device:
        """Where this micro-batch lives (the rank's device): what per-row tensors added to it use."""
        return self.response_mask_BR.device


def response_rows(logits_BTV: torch.Tensor, batch: PackedBatch, r_max: int) -> torch.Tensor:
    """Logits at the positions that predict the response, aligned by response index: [B, R, V]."""
    b, _, v = logits_BTV.shape
    out = logits_BTV.new_zeros(b, r_max, v)
    for i in range(b):
        start, n = batch.prompt_lengths[i] - 1, batch.response_lengths[i]
        out[i, :n] = logits_BTV[i, start : start + n]
    return out


def micro_batches(
    prompts: list[list[int]],
    responses: list[list[int]],
    logprobs: list[list[float]] | None,
    micro: int,
    pad_id: int,
    device: torch.device | str = "cpu",
    max_tokens: int | None = None,
) -> list[MicroBatch]:
    """The step's sequences as micro-batches, built on the host from Python lists, then moved to
    ``device`` (the rank's): the one seam where a step's data reaches the accelerator.

    ``max_tokens`` None: ``micro`` consecutive rows each, all padded to the step's longest
    sequence (the pipeline schedule's fixed shape). Else by token budget: ``token_budget_groups``,
    each padded to its own longest row."""
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
            mask[j, : len(r)] = True
            tokens[j, : len(r)] = torch.tensor(r, dtype=torch.long)
            if logprobs is not None:
                lps[j, : len(r)] = torch.tensor(logprobs[i])
        packed = pack([prompts[i] for i in rows], resp, pad_id, pad_to=width, device=device)
        out.append(
            MicroBatch(
                packed,
                mask.to(device),
                tokens.to(device),
                lps.to(device),
                sampled=logprobs is not None,
                rows=rows,
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
