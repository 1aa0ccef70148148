r"""Vocab-parallel generalized Jensen-Shannon divergence between teacher and student (paper eq. 7).

Legend: N tokens (leading dims flattened), V local vocab shard, K stacked per-token statistics.

Per token, with p_S = softmax(s / τ), p_T = softmax(t / τ) over the real vocabulary:

    JSD_β = β·KL(p_T ‖ m) + (1−β)·KL(p_S ‖ m),     m = β·p_T + (1−β)·p_S,

written as a sum of per-vocab-entry terms e_v = β·p_T,v·(log p_T,v − log m_v)
+ (1−β)·p_S,v·(log p_S,v − log m_v). The formula tends to 0 at both ends, so β=0 is defined as
forward KL(p_T ‖ p_S), e_v = p_T,v·(log p_T,v − log p_S,v), and β=1 as reverse KL(p_S ‖ p_T),
e_v = p_S,v·(log p_S,v − log p_T,v) (the convention of TRL's GKD and the OPSD code).

Gradient (student only; the teacher is a fixed target). With l = log p_S and g_v = ∂(Σ e)/∂l_v:

    g_v = (1−β)·p_S,v·(l_v − log m_v)      for 0<β<1
    g_v = −p_T,v                            for β=0
    g_v = p_S,v·(l_v − log p_T,v + 1)       for β=1
    ∂JSD/∂s_v = (g_v − p_S,v·Σ_u g_u) / τ.

Σ_u g_u is a per-token scalar reduced in the forward, so the backward needs no communication.

Per-term clip (``term_clip``, the OPSD code's ``jsd_token_clip``): each e_v is replaced by
min(e_v, clip) before summing; clamped terms pass no gradient (their g_v is zero).
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from opsd_megatron.losses.compiled import kernels, normalize
from opsd_megatron.losses.jsd_math import JSDMath  # noqa: F401  (re-exported: the math's home)
from opsd_megatron.losses.validation import check_logits_pair, check_temperature
from opsd_megatron.losses.vocab_parallel import (
    DEFAULT_CHUNK_ELEMENTS,
    all_reduce_per_token,
    global_softmax_stats,
    resolve_chunk_elements,
    token_chunks,
    vocab_shard,
    working_dtype,
)


class JSDOutput(NamedTuple):
    """Per-token results ``[...]``; only ``loss`` carries a gradient."""

    loss: torch.Tensor
    student_entropy: torch.Tensor
    teacher_entropy: torch.Tensor


class _VocabParallelJSD(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx,
        student_NV,
        teacher_NV,
        beta,
        temperature,
        vocab_size,
        term_clip,
        group,
        chunk_elements,
        compile_mode,
    ):
        dtype = working_dtype(student_NV, teacher_NV)
        shard = vocab_shard(student_NV.shape[1], vocab_size, group)
        n = student_NV.shape[0]
        max_2N, log_sum_2N = global_softmax_stats(
            [student_NV, teacher_NV], shard, temperature, dtype, chunk_elements, group
        )

        # Per-token partial sums over this shard: divergence, Σg, −H_S, −H_T.
        partial_4N = torch.zeros(4, n, dtype=dtype, device=student_NV.device)
        partials, _ = kernels(compile_mode, student_NV.device)
        for sl in token_chunks(n, shard.width, chunk_elements):
            partial_4N[:, sl] = partials(
                student_NV[sl], teacher_NV[sl], max_2N[0, sl], log_sum_2N[0, sl],
                max_2N[1, sl], log_sum_2N[1, sl], shard, temperature, beta, term_clip, dtype,
            )  # fmt: skip
        totals_4N = all_reduce_per_token(partial_4N, "sum", group)

        ctx.save_for_backward(student_NV, teacher_NV, max_2N, log_sum_2N, totals_4N[1].clone())
        ctx.params = (beta, temperature, term_clip, shard, chunk_elements, dtype, compile_mode)
        student_entropy_N, teacher_entropy_N = -totals_4N[2], -totals_4N[3]
        ctx.mark_non_differentiable(student_entropy_N, teacher_entropy_N)
        return totals_4N[0].clone(), student_entropy_N, teacher_entropy_N

    @staticmethod
    def backward(ctx, grad_loss_N, _grad_hs, _grad_ht):
        student_NV, teacher_NV, max_2N, log_sum_2N, sum_g_N = ctx.saved_tensors
        if grad_loss_N is None:
            return (None,) * 9
        beta, temperature, term_clip, shard, chunk_elements, dtype, compile_mode = ctx.params
        _, student_grad = kernels(compile_mode, student_NV.device)
        grad_NV = torch.empty_like(student_NV)
        grad_NV[:, shard.real :] = 0  # Megatron's padded vocab columns
        for sl in token_chunks(student_NV.shape[0], shard.width, chunk_elements):
            grad = student_grad(
                student_NV[sl], teacher_NV[sl], max_2N[0, sl], log_sum_2N[0, sl],
                max_2N[1, sl], log_sum_2N[1, sl], sum_g_N[sl], grad_loss_N[sl],
                shard, temperature, beta, term_clip, dtype,
            )  # fmt: skip
            grad_NV[sl, : shard.real] = grad.to(grad_NV.dtype)
        return grad_NV, None, None, None, None, None, None, None, None


def vocab_parallel_jsd_with_entropy(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    *,
    beta: float,
    temperature: float = 1.0,
    vocab_size: int | None = None,
    term_clip: float | None = None,
    group=None,
    chunk_elements: int | None = DEFAULT_CHUNK_ELEMENTS,
    compile: str = "false",
) -> JSDOutput:
    """Per-token JSD_β plus student and teacher entropies from the same pass (see module doc).

    ``student_logits``/``teacher_logits``: ``[..., V/tp]`` vocab shards (any float dtype; math in
    fp32, or fp64 when fed fp64). ``vocab_size``: the real vocabulary; Megatron's padded columns
    beyond it are ignored. ``group``: the tensor-parallel group (None: unsharded). ``compile``:
    ``loss.compile`` (auto|true|false, ``compiled.py``). Returns
    per-token tensors ``[...]``; only the loss is differentiable, and only w.r.t. the student.
    """
    check_logits_pair(student_logits, teacher_logits)
    check_temperature(temperature)
    if not 0.0 <= beta <= 1.0:
        raise ValueError(f"beta must be in [0, 1], got {beta}")
    if term_clip is not None and term_clip <= 0:
        raise ValueError(f"term_clip must be > 0 or None, got {term_clip}")
    lead = student_logits.shape[:-1]
    width = student_logits.shape[-1]
    loss, hs, ht = _VocabParallelJSD.apply(
        student_logits.reshape(-1, width),
        teacher_logits.detach().reshape(-1, width),
        float(beta),
        float(temperature),
        vocab_size,
        term_clip,
        group,
        resolve_chunk_elements(chunk_elements, student_logits.device),
        normalize(compile),
    )
    return JSDOutput(loss.reshape(lead), hs.reshape(lead), ht.reshape(lead))


def vocab_parallel_jsd(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    *,
    beta: float,
    temperature: float = 1.0,
    vocab_size: int | None = None,
    term_clip: float | None = None,
    group=None,
    chunk_elements: int | None = DEFAULT_CHUNK_ELEMENTS,
    compile: str = "false",
) -> torch.Tensor:
    """Per-token generalized JSD_β ``[...]`` between vocab-sharded student and teacher logits."""
    return vocab_parallel_jsd_with_entropy(
        student_logits,
        teacher_logits,
        beta=beta,
        temperature=temperature,
        vocab_size=vocab_size,
        term_clip=term_clip,
        group=group,
        chunk_elements=chunk_elements,
        compile=compile,
    ).loss
