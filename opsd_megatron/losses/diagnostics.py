r"""Per-token diagnostics of teacher and student on the student's response, vocab-parallel, no
gradient: whether they agree on the next token, how likely the teacher finds what the student
sampled, and where in the response the divergence sits.

Legend: B rows, R response positions, N tokens, V local vocab shard.

- ``vocab_parallel_argmax``: the global argmax of sharded logits: each rank's local max, one
  per-token MAX all-reduce of the values, then of the winning global index (ties: the largest
  index, the same on every rank and for both models);
- ``top1_agreement``: 1 where argmax p_T = argmax p_S (temperature does not move an argmax);
- ``teacher_logprob``: log p_T(ŷ_n) at the loss temperature;
- ``vocab_parallel_entropy``: the teacher's entropy, for ``loss.token_weight=teacher_entropy``;
- ``position_thirds``: masks of the first, middle and last third of each response (position
  i of a response of length L is in third ⌊3i/L⌋), to report ``divergence_first/middle/last``.
"""

from __future__ import annotations

import torch

from opsd_megatron.losses.jsd import JSDMath
from opsd_megatron.losses.token_logprob import vocab_parallel_token_logprobs
from opsd_megatron.losses.vocab_parallel import (
    all_reduce_per_token,
    chunk_log_probs,
    global_softmax_stats,
    resolve_chunk_elements,
    token_chunks,
    vocab_shard,
    working_dtype,
)


@torch.no_grad()
def vocab_parallel_argmax(logits: torch.Tensor, vocab_size: int | None = None, group=None):
    """Global argmax ids ``[...]`` of vocab-sharded ``logits [..., V/tp]`` (padding ignored)."""
    lead, width = logits.shape[:-1], logits.shape[-1]
    x = logits.reshape(-1, width)
    shard = vocab_shard(width, vocab_size, group)
    real = x[:, : shard.real].double()
    if real.shape[1] == 0:
        best = real.new_full((x.shape[0],), -torch.inf)
        idx = torch.zeros(x.shape[0], dtype=torch.long, device=x.device)
    else:
        best, idx = real.max(dim=1)
    winner = all_reduce_per_token(best[None].clone(), "max", group)[0]
    mine = (best == winner) & (real.shape[1] > 0)
    ids = torch.where(mine, idx + shard.start, torch.full_like(idx, -1)).double()
    return all_reduce_per_token(ids[None], "max", group)[0].long().reshape(lead)


@torch.no_grad()
def top1_agreement(student, teacher, vocab_size: int | None = None, group=None) -> torch.Tensor:
    """1.0 where the two sharded distributions have the same most likely token, else 0.0."""
    same = vocab_parallel_argmax(student, vocab_size, group) == vocab_parallel_argmax(
        teacher, vocab_size, group
    )
    return same.to(torch.float32)


@torch.no_grad()
def teacher_token_logprobs(teacher, tokens, temperature, vocab_size=None, group=None):
    """log p_T(ŷ_n) ``[...]`` at ``temperature`` (the loss's), vocab-parallel."""
    return vocab_parallel_token_logprobs(
        teacher, tokens, temperature=temperature, vocab_size=vocab_size, group=group
    )


@torch.no_grad()
def vocab_parallel_entropy(logits, temperature=1.0, vocab_size=None, group=None) -> torch.Tensor:
    """H(softmax(logits/τ)) per token ``[...]`` (fp32, fp64 for fp64 input), vocab-parallel: the
    softmax statistics and one per-token sum cross ranks."""
    lead, width = logits.shape[:-1], logits.shape[-1]
    x = logits.reshape(-1, width)
    dtype, shard = working_dtype(x), vocab_shard(width, vocab_size, group)
    chunk = resolve_chunk_elements(None, x.device)
    max_1N, log_sum_1N = global_softmax_stats([x], shard, temperature, dtype, chunk, group)
    partial = torch.zeros(1, x.shape[0], dtype=dtype, device=x.device)
    for sl in token_chunks(x.shape[0], shard.width, chunk):
        lp = chunk_log_probs(x[sl], max_1N[0, sl], log_sum_1N[0, sl], shard, temperature, dtype)
        partial[0, sl] = -JSDMath.neg_entropy_terms(lp).sum(dim=1)
    return all_reduce_per_token(partial, "sum", group)[0].reshape(lead)


def position_thirds(mask_BR: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Boolean masks ``[B, R]`` of each response's first, middle and last third."""
    lengths = mask_BR.sum(dim=1, keepdim=True).clamp(min=1)
    third = torch.arange(mask_BR.shape[1], device=mask_BR.device)[None] * 3 // lengths
    return tuple(mask_BR & (third == k) for k in range(3))
