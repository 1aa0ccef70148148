r"""Fused output layer + vocab-parallel token log-probs: log p(y_n) = s_{n,y}/τ − log Σ_v exp(s_v/τ)
with s = h W^T computed one token chunk at a time (``losses/linear_jsd.py``'s scheme; the
gradient (1[v = y] − p_v)/τ of ``losses/token_logprob.py``). Used by the sampled-token objective
(``vocab_parallel_linear_sampled_token_loss``), GRPO/SFT and the sampler-error metric.

Legend: N tokens, H hidden size, V local vocab shard.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from opsd_megatron.losses.linear_jsd import chunk_tokens_for, vocab_parallel_linear_jsd
from opsd_megatron.losses.sampled_token import BASELINES, SampledTokenOutput
from opsd_megatron.losses.token_logprob import _local_target_index
from opsd_megatron.losses.validation import check_temperature
from opsd_megatron.losses.vocab_parallel import (
    all_reduce_per_token,
    chunk_log_probs,
    global_softmax_stats,
    group_size,
    token_chunks,
    vocab_shard,
    working_dtype,
)


class _LinearTokenLogProb(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h, w, tokens, temperature, vocab_size, group, chunk, reduce):
        dtype = working_dtype(h, w)
        shard = vocab_shard(w.shape[0], vocab_size, group)
        n = h.shape[0]
        out = torch.empty(n, dtype=dtype, device=h.device)
        max_N, log_sum_N = torch.empty_like(out), torch.empty_like(out)
        index_N, owned_N = _local_target_index(tokens, shard.start, shard.real)
        step = chunk * shard.width
        for sl in token_chunks(n, shard.width, step):
            s = h[sl] @ w.T
            m, z = global_softmax_stats([s], shard, temperature, dtype, step, group)
            max_N[sl], log_sum_N[sl] = m[0], z[0]
            picked = s.gather(1, index_N[sl, None])[:, 0].to(dtype)
            picked = torch.where(owned_N[sl], (picked - m[0]) / temperature, 0.0)
            out[sl] = all_reduce_per_token(picked[None], "sum", group)[0] - z[0]
        ctx.save_for_backward(h, w, index_N, owned_N, max_N, log_sum_N)
        ctx.params = (temperature, shard, dtype, group, step, reduce)
        return out

    @staticmethod
    def backward(ctx, grad_N):
        h, w, index_N, owned_N, max_N, log_sum_N = ctx.saved_tensors
        temperature, shard, dtype, group, step, reduce = ctx.params
        grad_h = torch.zeros_like(h) if ctx.needs_input_grad[0] else None
        grad_w = torch.zeros_like(w) if ctx.needs_input_grad[1] else None
        real = w[: shard.real]
        for sl in token_chunks(h.shape[0], shard.width, step):
            s = h[sl] @ w.T
            g = -torch.exp(chunk_log_probs(s, max_N[sl], log_sum_N[sl], shard, temperature, dtype))
            rows = torch.nonzero(owned_N[sl], as_tuple=True)[0]
            g[rows, index_N[sl][rows]] += 1.0
            g = (g * (grad_N[sl, None].to(dtype) / temperature)).to(w.dtype)
            if grad_h is not None:
                grad_h[sl] = g @ real
            if grad_w is not None:
                grad_w[: shard.real] += g.T @ h[sl]
        if grad_h is not None and reduce and group_size(group) > 1:
            dist.all_reduce(grad_h, group=group)
        return grad_h, grad_w, None, None, None, None, None, None


def vocab_parallel_linear_token_logprobs(
    hidden_NH: torch.Tensor,
    weight_VH: torch.Tensor,
    tokens_N: torch.Tensor,
    *,
    temperature: float = 1.0,
    vocab_size: int | None = None,
    group=None,
    chunk_tokens: int | None = None,
    reduce_hidden_grad: bool = True,
) -> torch.Tensor:
    """log p(tokens) ``[N]`` of softmax(h W^T / τ) over the real vocabulary, from ``[N, H]`` hidden
    states and this rank's ``[V/tp, H]`` shard; differentiable w.r.t. both."""
    check_temperature(temperature)
    if hidden_NH.dim() != 2 or tokens_N.shape != hidden_NH.shape[:1]:
        raise ValueError(
            f"hidden {tuple(hidden_NH.shape)} must be [tokens, hidden] and tokens "
            f"{tuple(tokens_N.shape)} [tokens]"
        )
    limit = vocab_size if vocab_size is not None else weight_VH.shape[0] * group_size(group)
    if tokens_N.numel() and (int(tokens_N.min()) < 0 or int(tokens_N.max()) >= limit):
        raise ValueError(f"token ids must be in [0, {limit})")
    chunk = chunk_tokens_for(weight_VH.shape[0], chunk_tokens, hidden_NH.device)
    return _LinearTokenLogProb.apply(
        hidden_NH,
        weight_VH,
        tokens_N.long(),
        float(temperature),
        vocab_size,
        group,
        chunk,
        reduce_hidden_grad,
    )


def vocab_parallel_linear_sampled_token_loss(
    student_hidden_NH: torch.Tensor,
    teacher_hidden_NH: torch.Tensor,
    weight_VH: torch.Tensor,
    tokens_N: torch.Tensor,
    *,
    temperature: float = 1.0,
    vocab_size: int | None = None,
    group=None,
    chunk_tokens: int | None = None,
    teacher_weight_VH: torch.Tensor | None = None,
    reduce_hidden_grad: bool = True,
    baseline: str = "none",
) -> SampledTokenOutput:
    """The sampled-token objective −sg[Â]·log p_S(ŷ), Â = log p_T(ŷ) − log p_S(ŷ) (+ sg[KL(p_S ‖
    p_T)] with ``baseline="reverse_kl"``), from hidden states (``losses/sampled_token.py``, no
    importance weight)."""
    if baseline not in BASELINES:
        raise ValueError(f"baseline must be one of {BASELINES}, got {baseline!r}")
    kw = dict(
        temperature=temperature, vocab_size=vocab_size, group=group, chunk_tokens=chunk_tokens
    )
    student_lp = vocab_parallel_linear_token_logprobs(
        student_hidden_NH, weight_VH, tokens_N, reduce_hidden_grad=reduce_hidden_grad, **kw
    )
    with torch.no_grad():
        w_t = weight_VH if teacher_weight_VH is None else teacher_weight_VH
        teacher_lp = vocab_parallel_linear_token_logprobs(
            teacher_hidden_NH.detach(), w_t.detach(), tokens_N, **kw
        )
    advantage = (teacher_lp - student_lp).detach()
    if baseline == "reverse_kl":
        with torch.no_grad():
            advantage = advantage + vocab_parallel_linear_jsd(
                student_hidden_NH.detach(),
                teacher_hidden_NH.detach(),
                weight_VH.detach(),
                beta=1.0,
                teacher_weight_VH=w_t.detach(),
                **kw,
            ).loss.to(advantage.dtype)
    loss = -advantage * student_lp
    return SampledTokenOutput(
        loss, advantage, student_lp.detach(), teacher_lp, torch.ones_like(advantage)
    )
