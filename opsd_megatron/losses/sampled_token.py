r"""Sampled-token OPSD objective (the paper's alternative to the full-vocabulary divergence).

For each sampled response token ŷ_n, with log-probs at temperature τ from vocab-parallel logits:

    A_n    = log p_T(ŷ_n) − log p_S(ŷ_n)                 (advantage, held constant)
    loss_n = −w_n · A_n · log p_S(ŷ_n)
    ∂loss_n/∂s = −w_n · A_n · ∂log p_S(ŷ_n)/∂s

i.e. a policy gradient whose per-token reward is the teacher-student log-ratio. ``w_n`` is 1, or,
when ``sampler_logprobs`` are given (rollouts from an engine whose numerics differ from the
trainer's, e.g. vLLM in bf16), the truncated importance weight
w_n = min(exp(log p_S(ŷ_n) − log p_sampler(ŷ_n)), ``importance_ratio_max``), held constant.

Control-variate baseline (``baseline="reverse_kl"``, vOPD, arXiv 2605.07865): since
E_{ŷ~p_S}[A_n] = −KL(p_S ‖ p_T)(s_n), the centred advantage

    Â_n = A_n + sg[KL(p_S ‖ p_T)(s_n)]

(the per-token reverse KL at the loss temperature, vocab-parallel through ``losses/jsd.py`` at
β = 1) leaves the expected gradient unchanged — E[b·∇log p_S(ŷ)] = 0 for any b that does not
depend on ŷ_n — and lowers its variance.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from opsd_megatron.losses.jsd import vocab_parallel_jsd
from opsd_megatron.losses.token_logprob import vocab_parallel_token_logprobs
from opsd_megatron.losses.validation import check_logits_pair
from opsd_megatron.losses.vocab_parallel import DEFAULT_CHUNK_ELEMENTS

BASELINES = ("none", "reverse_kl")


class SampledTokenOutput(NamedTuple):
    """Per-token tensors ``[...]``; only ``loss`` carries a gradient (to the student logits)."""

    loss: torch.Tensor
    advantage: torch.Tensor
    student_logprobs: torch.Tensor
    teacher_logprobs: torch.Tensor
    importance_weight: torch.Tensor


def vocab_parallel_sampled_token_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    tokens: torch.Tensor,
    *,
    temperature: float = 1.0,
    vocab_size: int | None = None,
    group=None,
    sampler_logprobs: torch.Tensor | None = None,
    importance_ratio_max: float = 2.0,
    baseline: str = "none",
    chunk_elements: int | None = DEFAULT_CHUNK_ELEMENTS,
) -> SampledTokenOutput:
    """Per-token sampled-token loss from vocab-sharded logits ``[..., V/tp]`` and tokens ``[...]``;
    ``baseline``: ``none`` or ``reverse_kl`` (module doc)."""
    check_logits_pair(student_logits, teacher_logits)
    if baseline not in BASELINES:
        raise ValueError(f"baseline must be one of {BASELINES}, got {baseline!r}")
    if importance_ratio_max <= 0:
        raise ValueError(f"importance_ratio_max must be > 0, got {importance_ratio_max}")
    kwargs = dict(
        temperature=temperature, vocab_size=vocab_size, group=group, chunk_elements=chunk_elements
    )
    student_lp = vocab_parallel_token_logprobs(student_logits, tokens, **kwargs)
    with torch.no_grad():
        teacher_lp = vocab_parallel_token_logprobs(teacher_logits.detach(), tokens, **kwargs)
    advantage = (teacher_lp - student_lp).detach()
    if baseline == "reverse_kl":
        with torch.no_grad():
            advantage = advantage + vocab_parallel_jsd(
                student_logits.detach(), teacher_logits.detach(), beta=1.0, **kwargs
            ).to(advantage.dtype)
    if sampler_logprobs is None:
        weight = torch.ones_like(advantage)
    else:
        if sampler_logprobs.shape != tokens.shape:
            raise ValueError(
                f"sampler_logprobs {tuple(sampler_logprobs.shape)} must match tokens "
                f"{tuple(tokens.shape)}"
            )
        log_ratio = student_lp.detach() - sampler_logprobs.to(student_lp.dtype)
        weight = torch.exp(log_ratio).clamp(max=importance_ratio_max)
    loss = -(weight * advantage) * student_lp
    return SampledTokenOutput(loss, advantage, student_lp.detach(), teacher_lp, weight)
