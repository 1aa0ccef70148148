"""Vocab-parallel next-token sampling: temperature, top-k, top-p, without gathering the vocabulary.

Legend: B rows (one next token each), V local vocab shard, K top-k candidates.

* Sampling is Gumbel-max: argmax_v (z_v + g_v), g_v i.i.d. Gumbel(0,1), z = logits/τ. Each rank
  draws noise for its own shard, takes its local max, and one all-reduce picks the winner.
* top-k: each rank's local top-k values are all-gathered ([tp, B, K], never vocab-sized); the
  global k-th value is the per-row cut-off.
* top-p: the per-row probability cut-off θ (keep p_v ≥ θ, the smallest such set with mass ≥ top_p)
  is found by bisection, each step an all-reduce of per-row masses.
* The returned log-prob is log softmax(z)[token] over the whole real vocabulary at temperature τ
  — what the trainer computes for the same token — not of the truncated distribution.
* τ = 0 is greedy decoding: the global argmax of the logits (the same local-max + all-reduce,
  without noise; top-k/top-p cannot remove the argmax), its log-prob reported at τ = 1.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from opsd_megatron.losses.vocab_parallel import (
    VocabShard,
    all_reduce_per_token,
    global_softmax_stats,
    group_size,
    vocab_shard,
)

TOP_P_BISECTION_STEPS = 40


def _global_topk_cutoff(z_BV: torch.Tensor, k: int, group) -> torch.Tensor:
    k_local = min(k, z_BV.shape[1])
    local = (
        torch.topk(z_BV, k_local, dim=1).values
        if k_local
        else z_BV.new_full((z_BV.shape[0], 0), -torch.inf)
    )
    if k_local < k:
        local = torch.cat([local, local.new_full((local.shape[0], k - k_local), -torch.inf)], dim=1)
    if group_size(group) > 1:
        parts = [torch.empty_like(local) for _ in range(group_size(group))]
        dist.all_gather(parts, local.contiguous(), group=group)
        local = torch.cat(parts, dim=1)
    return torch.topk(local, k, dim=1).values[:, -1]


def _log_normalizer(z_BV: torch.Tensor, group) -> torch.Tensor:
    """log Σ_v exp(z_v) over all shards (a shard may hold no real column at all)."""
    whole = VocabShard(0, z_BV.shape[1], z_BV.shape[1])
    row_max, log_sum = global_softmax_stats([z_BV], whole, 1.0, z_BV.dtype, 1 << 20, group)
    return row_max[0] + log_sum[0]


def _row_max(x_BV: torch.Tensor) -> torch.Tensor:
    if x_BV.shape[1] == 0:
        return x_BV.new_full((x_BV.shape[0],), -torch.inf)
    return x_BV.amax(dim=1)


def _top_p_cutoff(p_BV: torch.Tensor, top_p: float, group) -> torch.Tensor:
    """Largest θ with Σ_{p_v ≥ θ} p_v ≥ top_p, per row, by bisection (mass is non-increasing in θ)."""
    lo = torch.zeros(p_BV.shape[0], dtype=p_BV.dtype, device=p_BV.device)
    hi = all_reduce_per_token(_row_max(p_BV)[None].clone(), "max", group)[0]
    for _ in range(TOP_P_BISECTION_STEPS):
        mid = (lo + hi) / 2
        mass = all_reduce_per_token(
            torch.where(p_BV >= mid[:, None], p_BV, 0.0).sum(dim=1)[None], "sum", group
        )[0]
        ok = mass >= top_p
        lo = torch.where(ok, mid, lo)
        hi = torch.where(ok, hi, mid)
    return lo


def sample_next_tokens(
    logits_BV: torch.Tensor,
    *,
    temperature: float,
    top_k: int = 0,
    top_p: float = 1.0,
    generator: torch.Generator,
    vocab_size: int | None = None,
    group=None,
):
    """Sample one token per row from vocab-sharded logits; returns (global ids [B], log-probs [B]).
    ``temperature=0``: greedy."""
    shard = vocab_shard(logits_BV.shape[1], vocab_size, group)
    greedy = temperature == 0
    z = logits_BV[:, : shard.real].float() / (1.0 if greedy else temperature)
    log_z = _log_normalizer(z, group)
    keep = z
    if top_k > 0 and not greedy:
        keep = torch.where(z >= _global_topk_cutoff(z, top_k, group)[:, None], keep, -torch.inf)
    if top_p < 1.0 and not greedy:
        p = torch.exp(keep - _log_normalizer(keep, group)[:, None])
        keep = torch.where(p >= _top_p_cutoff(p, top_p, group)[:, None], keep, -torch.inf)
    if greedy:
        score = z.double()
    else:
        u = torch.rand(keep.shape, generator=generator, dtype=torch.float64).clamp_(1e-300, 1.0)
        score = keep.double() - torch.log(-torch.log(u))
    if score.shape[1] == 0:
        best, idx = (
            score.new_full((score.shape[0],), -torch.inf),
            torch.zeros(score.shape[0], dtype=torch.long),
        )
    else:
        best, idx = score.max(dim=1)
    winner = all_reduce_per_token(best[None].clone(), "max", group)[0]
    mine = (best == winner) & torch.isfinite(best)
    token = torch.where(mine, idx + shard.start, torch.full_like(idx, -1)).double()
    token = all_reduce_per_token(token[None], "max", group)[0].long()
    picked = torch.where(mine, z.gather(1, idx[:, None])[:, 0] if z.shape[1] else best.float(), 0.0)
    logprob = all_reduce_per_token(picked[None].double(), "sum", group)[0] - log_z.double()
    return token, logprob.float()
