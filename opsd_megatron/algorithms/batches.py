"""Micro-batches shared by the algorithms: a packed student sequence per row plus per-response-token
tensors ``[B, R]`` aligned by response index.

Legend: B micro-batch rows, T sequence length, R response length, V local vocab shard.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from opsd_megatron.data.prompts import PackedBatch, pack


@dataclass
class MicroBatch:
    """One micro-batch of the student pass: packed student rows and per-response-token tensors."""

    student: PackedBatch
    response_mask_BR: torch.Tensor
    response_tokens_BR: torch.Tensor
    sampler_logprobs_BR: torch.Tensor
    sampled: bool  # the responses were sampled (OPSD, GRPO), not reference solutions (SFT)
    extras: dict = field(default_factory=dict)  # per algorithm: teacher logits, advantages, ...

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
) -> list[MicroBatch]:
    """Micro-batches of one step, all padded to one width: the pipeline schedule sends fixed shapes.
    Built on the host from Python lists, then moved to ``device`` (the rank's): the one seam where
    a step's data reaches the accelerator."""
    width = max(len(p) + len(r) for p, r in zip(prompts, responses))
    out = []
    for s in range(0, len(prompts), micro):
        resp = responses[s : s + micro]
        r_max = max(1, max(len(r) for r in resp))
        mask = torch.zeros(len(resp), r_max, dtype=torch.bool)
        tokens = torch.full((len(resp), r_max), pad_id, dtype=torch.long)
        lps = torch.zeros(len(resp), r_max)
        for i, r in enumerate(resp):
            mask[i, : len(r)] = True
            tokens[i, : len(r)] = torch.tensor(r, dtype=torch.long)
            if logprobs is not None:
                lps[i, : len(r)] = torch.tensor(logprobs[s + i])
        out.append(
            MicroBatch(
                pack(prompts[s : s + micro], resp, pad_id, pad_to=width, device=device),
                mask.to(device),
                tokens.to(device),
                lps.to(device),
                logprobs is not None,
            )
        )
    return out
