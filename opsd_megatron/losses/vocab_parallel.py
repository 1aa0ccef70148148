"""The one communication seam of the vocab-parallel losses, plus the shard bookkeeping they share.

Legend: N tokens (all leading dims flattened), V local vocab shard width, K a few stacked
per-token statistics.

With tensor parallelism each rank holds logits ``[N, V]`` for columns ``[start, start+V)`` of the
(padded) vocabulary. Every loss here needs only per-token scalars from the other ranks: the row
max, the sum of exponentials, and partial sums of the divergence. ``all_reduce_per_token`` is the
only function in the losses that communicates, and it refuses anything that is not a ``[K, N]``
stack of per-token scalars, so a full-vocab tensor can never be reduced or gathered by accident.
``all_gather_candidates`` is the one exception, for top-k truncation: each rank's ``[N, K]`` local
candidates (K at most ``MAX_CANDIDATES``), never the vocabulary.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator

import torch
import torch.distributed as dist

# Each fp32 temporary of a chunk holds at most this many elements, which bounds the working set
# regardless of N. None picks per device: on CPU 2**20 (4 MiB, cache-sized: measured ~3x faster
# than 2**24 here), on GPU 2**24 (64 MiB, large enough that kernel launches do not dominate).
DEFAULT_CHUNK_ELEMENTS = None
MAX_STACKED_STATS = 8
MAX_CANDIDATES = 4096  # the largest top-k whose per-rank candidates may cross ranks


@dataclass(frozen=True)
class VocabShard:
    """Which columns of the padded vocabulary this rank holds, and how many of them are real."""

    start: int
    width: int
    real: int  # columns [start, start+real) are real tokens; the rest is Megatron's padding


def vocab_shard(local_width: int, vocab_size: int | None, group) -> VocabShard:
    rank = dist.get_rank(group) if group_size(group) > 1 else 0
    start = rank * local_width
    if vocab_size is None:
        return VocabShard(start, local_width, local_width)
    padded = local_width * group_size(group)
    if not 0 < vocab_size <= padded:
        raise ValueError(
            f"vocab_size={vocab_size} must be in [1, {padded}] (local width {local_width} "
            f"x tensor-parallel size {group_size(group)})"
        )
    return VocabShard(start, local_width, max(0, min(local_width, vocab_size - start)))


def group_size(group) -> int:
    if group is None:
        return 1
    return dist.get_world_size(group)


def all_reduce_per_token(stats_KN: torch.Tensor, op: str, group) -> torch.Tensor:
    """All-reduce a ``[K, N]`` stack of per-token scalars over the TP group (in place, returned)."""
    if stats_KN.dim() != 2 or stats_KN.shape[0] > MAX_STACKED_STATS:
        raise AssertionError(
            f"only [K<={MAX_STACKED_STATS}, tokens] per-token stats may be reduced, "
            f"got {tuple(stats_KN.shape)}"
        )
    if group_size(group) == 1:
        return stats_KN
    reduce_op = {"max": dist.ReduceOp.MAX, "sum": dist.ReduceOp.SUM}[op]
    dist.all_reduce(stats_KN, op=reduce_op, group=group)
    return stats_KN


def all_gather_candidates(values_NK: torch.Tensor, group) -> torch.Tensor:
    """Concatenate every TP rank's ``[N, K]`` candidate values into ``[N, tp*K]`` (top-k)."""
    if values_NK.dim() != 2 or values_NK.shape[1] > MAX_CANDIDATES:
        raise AssertionError(
            f"only [tokens, K<={MAX_CANDIDATES}] candidates may be gathered, "
            f"got {tuple(values_NK.shape)}"
        )
    if group_size(group) == 1:
        return values_NK
    parts = [torch.empty_like(values_NK) for _ in range(group_size(group))]
    dist.all_gather(parts, values_NK.contiguous(), group=group)
    return torch.cat(parts, dim=1)


def resolve_chunk_elements(chunk_elements: int | None, device: torch.device) -> int:
    if chunk_elements is None:
        return 1 << 24 if device.type == "cuda" else 1 << 20
    if chunk_elements < 1:
        raise ValueError(f"chunk_elements must be >= 1, got {chunk_elements}")
    return chunk_elements


def token_chunks(num_tokens: int, width: int, chunk_elements: int) -> Iterator[slice]:
    """Token ranges whose ``[tokens, width]`` fp32 temporaries stay within ``chunk_elements``."""
    step = max(1, chunk_elements // max(width, 1))
    for begin in range(0, num_tokens, step):
        yield slice(begin, min(begin + step, num_tokens))


def working_dtype(*tensors: torch.Tensor) -> torch.dtype:
    """fp64 if any input is fp64 (reference-grade checks), else fp32 (bf16/fp16/fp32 inputs)."""
    return torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32


def real_columns(logits_NV: torch.Tensor, shard: VocabShard, dtype: torch.dtype) -> torch.Tensor:
    """Real (non-padding) columns of a chunk, upcast to the working dtype."""
    return logits_NV[:, : shard.real].to(dtype)


def chunk_log_probs(
    logits_NV: torch.Tensor,
    row_max_N: torch.Tensor,
    log_sum_N: torch.Tensor,
    shard: VocabShard,
    temperature: float,
    dtype: torch.dtype,
) -> torch.Tensor:
    """log softmax(logits / T) of a chunk's real columns, from the global per-token statistics.

    The row max is subtracted before dividing by T, so logits of magnitude 1e4 lose no precision
    to cancellation (x/T − logZ would, in fp32).
    """
    shifted = real_columns(logits_NV, shard, dtype) - row_max_N[:, None]
    if temperature != 1.0:
        shifted = shifted / temperature
    return shifted - log_sum_N[:, None]


def local_max_sumexp(x_NV: torch.Tensor, temperature: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Row max m of a shard and Σ exp((x − m)/T); (-inf, 0) for rows that are all -inf or empty."""
    n = x_NV.shape[0]
    if x_NV.shape[1] == 0:
        return (
            torch.full((n,), -torch.inf, dtype=x_NV.dtype, device=x_NV.device),
            torch.zeros(n, dtype=x_NV.dtype, device=x_NV.device),
        )
    m = x_NV.amax(dim=1)
    safe_m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
    return m, torch.exp((x_NV - safe_m[:, None]) / temperature).sum(dim=1)


def global_softmax_stats(
    logits_list: list[torch.Tensor],
    shard: VocabShard,
    temperature: float,
    dtype: torch.dtype,
    chunk_elements: int,
    group,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token global row max M and log Σ_v exp((x_v − M)/T) over the real vocabulary.

    Returns two ``[len(logits_list), N]`` tensors. One data pass, two per-token all-reduces.
    """
    n = logits_list[0].shape[0]
    local_max = torch.empty(len(logits_list), n, dtype=dtype, device=logits_list[0].device)
    local_sum = torch.empty_like(local_max)
    for sl in token_chunks(n, shard.width, chunk_elements):
        for i, logits in enumerate(logits_list):
            local_max[i, sl], local_sum[i, sl] = local_max_sumexp(
                real_columns(logits[sl], shard, dtype), temperature
            )
    row_max = all_reduce_per_token(local_max.clone(), "max", group)
    shift = torch.where(
        torch.isfinite(local_max),
        (local_max - row_max) / temperature,
        torch.full_like(local_max, -torch.inf),
    )
    total = all_reduce_per_token(local_sum * torch.exp(shift), "sum", group)
    return row_max, torch.log(total)
