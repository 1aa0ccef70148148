r"""Vocab-parallel log-probability of given tokens: log p(y_n) = s_{n,y_n}/τ − log Σ_v
exp(s_{n,v}/τ).

Legend: N tokens (leading dims flattened), V local vocab shard.

Gradient: ∂ log p(y_n)/∂s_{n,v} = (1[v = y_n] − p_{n,v}) / τ, computed from the shard alone; the
forward reduces only per-token scalars (row max, sum of exponentials, the target's logit, which
lives on exactly one rank). This is megatron-core's ``vocab_parallel_cross_entropy`` with the sign
flipped, plus temperature, padded-vocab masking and fp64 support.

With ``top_k``/``top_p`` the log-prob is that of the rollout's sampling distribution (temperature,
then top-k, then top-p, renormalised: ``losses/truncation.py``): the support is found without a
gradient, the tokens outside it are set to −inf, and the gradient is (1[v = y_n] − p̃_{n,v}) / τ
on the support, 0 elsewhere. The given token is always in the support (a token the sampler drew
but that the trainer's rounding puts just outside would otherwise get −inf). This costs one
masked copy of the logits.
"""

from __future__ import annotations

import torch

from opsd_megatron.losses.truncation import is_truncated, truncate
from opsd_megatron.losses.validation import check_floating, check_temperature, check_tokens
from opsd_megatron.losses.vocab_parallel import (
    DEFAULT_CHUNK_ELEMENTS,
    all_reduce_per_token,
    chunk_log_probs,
    global_softmax_stats,
    group_size,
    real_columns,
    resolve_chunk_elements,
    token_chunks,
    vocab_shard,
    working_dtype,
)


def _local_target_index(tokens_N: torch.Tensor, start: int, real: int):
    """Column of each token inside this shard, and whether the shard holds it."""
    local = tokens_N - start
    owned = (local >= 0) & (local < real)
    return torch.where(owned, local, torch.zeros_like(local)), owned


class _VocabParallelTokenLogProb(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits_NV, tokens_N, temperature, vocab_size, group, chunk_elements):
        dtype = working_dtype(logits_NV)
        shard = vocab_shard(logits_NV.shape[1], vocab_size, group)
        max_1N, log_sum_1N = global_softmax_stats(
            [logits_NV], shard, temperature, dtype, chunk_elements, group
        )
        index_N, owned_N = _local_target_index(tokens_N, shard.start, shard.real)
        picked = logits_NV.gather(1, index_N[:, None])[:, 0].to(dtype)
        picked = torch.where(owned_N, (picked - max_1N[0]) / temperature, torch.zeros_like(picked))
        target_1N = all_reduce_per_token(picked[None], "sum", group)
        ctx.save_for_backward(logits_NV, index_N, owned_N, max_1N[0], log_sum_1N[0])
        ctx.params = (temperature, shard, chunk_elements, dtype)
        return target_1N[0] - log_sum_1N[0]

    @staticmethod
    def backward(ctx, grad_N):
        logits_NV, index_N, owned_N, max_N, log_sum_N = ctx.saved_tensors
        temperature, shard, chunk_elements, dtype = ctx.params
        grad_NV = torch.empty_like(logits_NV)
        grad_NV[:, shard.real :] = 0  # Megatron's padded vocab columns
        for sl in token_chunks(logits_NV.shape[0], shard.width, chunk_elements):
            p = torch.exp(
                chunk_log_probs(logits_NV[sl], max_N[sl], log_sum_N[sl], shard, temperature, dtype)
            )
            g = -p
            rows = torch.nonzero(owned_N[sl], as_tuple=True)[0]
            g[rows, index_N[sl][rows]] += 1.0
            g = g * (grad_N[sl, None].to(dtype) / temperature)
            grad_NV[sl, : shard.real] = g.to(grad_NV.dtype)
        return grad_NV, None, None, None, None, None


def vocab_parallel_token_logprobs(
    logits: torch.Tensor,
    tokens: torch.Tensor,
    *,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    vocab_size: int | None = None,
    group=None,
    chunk_elements: int | None = DEFAULT_CHUNK_ELEMENTS,
) -> torch.Tensor:
    """log p(tokens) ``[...]`` from vocab-sharded ``logits [..., V/tp]`` (fp32, or fp64 for fp64
    input); ``top_k > 0`` / ``top_p < 1``: under the truncated sampling distribution."""
    check_floating("logits", logits)
    check_tokens(tokens, logits)
    check_temperature(temperature)
    width = logits.shape[-1]
    limit = vocab_size if vocab_size is not None else width * group_size(group)
    if tokens.numel() and (int(tokens.min()) < 0 or int(tokens.max()) >= limit):
        raise ValueError(
            f"token ids must be in [0, {limit}), got range [{int(tokens.min())}, "
            f"{int(tokens.max())}]"
        )
    logits_NV, tokens_N = logits.reshape(-1, width), tokens.reshape(-1).long()
    if is_truncated(top_k, top_p):
        logits_NV = _outside_support_to_minus_inf(
            logits_NV, tokens_N, temperature, top_k, top_p, vocab_size, group, chunk_elements
        )
    out = _VocabParallelTokenLogProb.apply(
        logits_NV,
        tokens_N,
        float(temperature),
        vocab_size,
        group,
        resolve_chunk_elements(chunk_elements, logits.device),
    )
    return out.reshape(tokens.shape)


def _outside_support_to_minus_inf(
    logits_NV, tokens_N, temperature, top_k, top_p, vocab_size, group, chunk_elements
) -> torch.Tensor:
    """The logits with every real column outside the sampling support (and no given token) at
    −inf; token chunks bound the working set, each a collective over ``group``."""
    shard = vocab_shard(logits_NV.shape[1], vocab_size, group)
    dtype = working_dtype(logits_NV)
    outside = torch.zeros(logits_NV.shape, dtype=torch.bool, device=logits_NV.device)
    chunk = resolve_chunk_elements(chunk_elements, logits_NV.device)
    for sl in token_chunks(logits_NV.shape[0], shard.width, chunk):
        z = real_columns(logits_NV[sl].detach(), shard, dtype) / temperature
        outside[sl, : shard.real] = torch.isinf(truncate(z, top_k, top_p, group))
    index_N, owned_N = _local_target_index(tokens_N, shard.start, shard.real)
    rows = torch.nonzero(owned_N, as_tuple=True)[0]
    outside[rows, index_N[rows]] = False
    return logits_NV.masked_fill(outside, -torch.inf)
