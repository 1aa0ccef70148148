r"""The sampling distribution's support, vocab-parallel: temperature, then top-k, then top-p.

Legend: N rows (one next token each), V local vocab shard, K top-k candidates.

The rollout engines sample from — and report log-probs of — the truncated, renormalised
distribution (vLLM's ``processed_logprobs``); the trainer computes the same log-probs for the
sampler-error metric and GRPO's ratio from the same support, so the two agree to rounding:

* top-k: each rank's local top-k values are gathered (``[N, tp*K]``, never vocab-sized); the
  global k-th value is the per-row cut-off (ties with it are kept, as vLLM keeps them).
* top-p, over the top-k-renormalised probabilities: the smallest set of most likely tokens whose
  mass is ≥ p, found as the largest cut-off θ with Σ_{p_v ≥ θ} p_v ≥ p by bisection, each step
  an all-reduce of per-row masses. vLLM removes the least likely tokens while their cumulative
  mass stays ≤ 1 − p: the same set up to ties.
"""

from __future__ import annotations

import torch

from opsd_megatron.losses.vocab_parallel import (
    VocabShard,
    all_gather_candidates,
    all_reduce_per_token,
    global_softmax_stats,
)

TOP_P_BISECTION_STEPS = 40


def global_topk_cutoff(z_NV: torch.Tensor, k: int, group) -> torch.Tensor:
    """Per row, the k-th largest value over all shards ``[N]``."""
    k_local = min(k, z_NV.shape[1])
    local = (
        torch.topk(z_NV, k_local, dim=1).values
        if k_local
        else z_NV.new_full((z_NV.shape[0], 0), -torch.inf)
    )
    if k_local < k:
        local = torch.cat([local, local.new_full((local.shape[0], k - k_local), -torch.inf)], dim=1)
    return torch.topk(all_gather_candidates(local, group), k, dim=1).values[:, -1]


def log_normalizer(z_NV: torch.Tensor, group) -> torch.Tensor:
    """log Σ_v exp(z_v) over all shards ``[N]`` (a shard may hold no real column at all)."""
    whole = VocabShard(0, z_NV.shape[1], z_NV.shape[1])
    row_max, log_sum = global_softmax_stats([z_NV], whole, 1.0, z_NV.dtype, 1 << 20, group)
    return row_max[0] + log_sum[0]


def _row_max(x_NV: torch.Tensor) -> torch.Tensor:
    if x_NV.shape[1] == 0:
        return x_NV.new_full((x_NV.shape[0],), -torch.inf)
    return x_NV.amax(dim=1)


def top_p_cutoff(p_NV: torch.Tensor, top_p: float, group) -> torch.Tensor:
    """Largest θ with Σ_{p_v ≥ θ} p_v ≥ top_p, per row ``[N]`` (mass is non-increasing in θ)."""
    lo = torch.zeros(p_NV.shape[0], dtype=p_NV.dtype, device=p_NV.device)
    hi = all_reduce_per_token(_row_max(p_NV)[None].clone(), "max", group)[0]
    for _ in range(TOP_P_BISECTION_STEPS):
        mid = (lo + hi) / 2
        mass = all_reduce_per_token(
            torch.where(p_NV >= mid[:, None], p_NV, 0.0).sum(dim=1)[None], "sum", group
        )[0]
        ok = mass >= top_p
        lo = torch.where(ok, mid, lo)
        hi = torch.where(ok, hi, mid)
    return lo


def truncate(z_NV: torch.Tensor, top_k: int, top_p: float, group) -> torch.Tensor:
    """``z`` (logits already divided by the temperature, real columns only) with the tokens
    outside the top-k / top-p support set to −inf. Collective over ``group``; no gradient."""
    with torch.no_grad():
        keep = z_NV
        if top_k > 0:
            cut = global_topk_cutoff(z_NV, top_k, group)
            keep = torch.where(z_NV >= cut[:, None], z_NV, -torch.inf)
        if top_p < 1.0:
            p = torch.exp(keep - log_normalizer(keep, group)[:, None])
            keep = torch.where(p >= top_p_cutoff(p, top_p, group)[:, None], keep, -torch.inf)
    return keep


def is_truncated(top_k: int, top_p: float) -> bool:
    return top_k > 0 or top_p < 1.0
