r"""Fused output layer + vocab-parallel JSD_β: the loss from hidden states, logits never whole.

Legend: N tokens, H hidden size, V local vocab shard (this rank's rows of the output layer).

``losses/jsd.py`` needs both models' ``[N, V]`` logits; at 2k response tokens and a 152k
vocabulary that is the largest tensor of a step (and the teacher's is kept for every micro-batch
until the student pass). Here each rank projects one token chunk at a time through its shard of
the output layer, s = h_S W^T, t = h_T W_T^T (``[chunk, V]``), does the per-token reductions of
``jsd.py`` for that chunk (row max, sum of exponentials, divergence terms: three all-reduces of
per-token scalars), and drops it. Nothing larger than ``[chunk, V]`` is ever created but the
weight's own gradient.

Gradients, with ∂D/∂s = (g − p_S·Σg)/τ (``jsd.py``):

    ∂/∂h_S = (∂D/∂s) W          (this shard's part; summed over TP ranks, see below)
    ∂/∂W   = (∂D/∂s)^T h_S      (this shard's rows; tied embeddings / full-parameter training)

Each token's loss depends on its own row only, so with a frozen weight (LoRA: the output layer
is frozen) the forward computes every chunk's per-token ∂D_n/∂h_n = (∂D_n/∂s_n) W while the
chunk's logits are at hand and keeps that ``[N, H]``; the backward only scales it by the incoming
per-token gradient — three GEMMs per chunk in all, no recomputation (Liger-Kernel's fused linear
losses do the same). When the weight needs its gradient (Σ over tokens weighted by the incoming
gradient, unknown in the forward), the backward instead recomputes each chunk's logits from the
saved hidden states — one more pair of GEMMs per chunk for no stored logits. ``bench/fused_loss.py``
measures both (``--frozen-weight``).

The hidden-state gradient of a vocab shard is a partial sum over the vocabulary.
``reduce_hidden_grad=True`` all-reduces it over ``group`` (``[N, H]``, hidden-sized); pass False
when the hidden states reach the loss through megatron's ``copy_to_tensor_model_parallel_region``
or ``gather_from_sequence_parallel_region``, whose backward does that sum (as in megatron's own
output layer). The teacher's projection uses ``teacher_weight_VH`` when given (a frozen copy),
else the same shard, and carries no gradient.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from opsd_megatron.losses.compiled import normalize
from opsd_megatron.losses.jsd import JSDOutput, jsd_partials, jsd_student_grad
from opsd_megatron.losses.validation import check_temperature
from opsd_megatron.losses.vocab_parallel import (
    all_reduce_per_token,
    global_softmax_stats,
    group_size,
    token_chunks,
    vocab_shard,
    working_dtype,
)

# A chunk's fp32 [chunk, V] temporaries stay within this many elements (None: per device).
CPU_CHUNK_ELEMENTS, GPU_CHUNK_ELEMENTS = 1 << 20, 1 << 24


def chunk_tokens_for(width: int, chunk_tokens: int | None, device: torch.device) -> int:
    if chunk_tokens is not None:
        if chunk_tokens < 1:
            raise ValueError(f"chunk_tokens must be >= 1, got {chunk_tokens}")
        return chunk_tokens
    budget = GPU_CHUNK_ELEMENTS if device.type == "cuda" else CPU_CHUNK_ELEMENTS
    return max(1, budget // max(width, 1))


class _LinearJSD(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx,
        h_s,
        h_t,
        w,
        w_t,
        beta,
        temperature,
        vocab_size,
        term_clip,
        group,
        chunk,
        reduce,
        compile_mode,
    ):
        dtype = working_dtype(h_s, w)
        shard = vocab_shard(w.shape[0], vocab_size, group)
        n = h_s.shape[0]
        stats = torch.zeros(4, n, dtype=dtype, device=h_s.device)  # loss, Σg, −H_S, −H_T
        max_2N = torch.empty(2, n, dtype=dtype, device=h_s.device)
        log_sum_2N = torch.empty_like(max_2N)
        step = chunk * shard.width  # the softmax statistics see one chunk as one piece
        partials = jsd_partials.under(compile_mode, h_s.device)
        student_grad = jsd_student_grad.under(compile_mode, h_s.device)
        # frozen weight: each token's ∂D_n/∂h_n now, while the chunk's logits exist (module doc)
        precompute = ctx.needs_input_grad[0] and not ctx.needs_input_grad[2]
        unit_grad_h = torch.empty_like(h_s) if precompute else None
        for sl in token_chunks(n, shard.width, step):
            s, t = h_s[sl] @ w.T, h_t[sl] @ w_t.T
            m, z = global_softmax_stats([s, t], shard, temperature, dtype, step, group)
            max_2N[:, sl], log_sum_2N[:, sl] = m, z
            part = partials(
                s, t, m[0], z[0], m[1], z[1], shard, temperature, beta, term_clip, dtype
            )
            stats[:, sl] = all_reduce_per_token(part, "sum", group)
            if precompute:
                ones = torch.ones(s.shape[0], dtype=dtype, device=s.device)
                grad = student_grad(
                    s, t, m[0], z[0], m[1], z[1], stats[1, sl], ones,
                    shard, temperature, beta, term_clip, dtype,
                ).to(w.dtype)  # fmt: skip
                unit_grad_h[sl] = grad @ w[: shard.real]
        if precompute:  # the backward needs nothing else
            ctx.save_for_backward(unit_grad_h)
        else:
            ctx.save_for_backward(h_s, h_t, w, w_t, max_2N, log_sum_2N, stats[1].clone())
        ctx.params = (beta, temperature, term_clip, shard, dtype, group, step, reduce, compile_mode)
        hs, ht = -stats[2], -stats[3]
        ctx.mark_non_differentiable(hs, ht)
        return stats[0].clone(), hs, ht

    @staticmethod
    def backward(ctx, grad_loss_N, _gh_s, _gh_t):
        beta, temperature, term_clip, shard, dtype, group, step, reduce, compile_mode = ctx.params
        if grad_loss_N is None:
            return (None,) * 12
        if len(ctx.saved_tensors) == 1:  # frozen weight: scale the forward's per-token gradient
            (unit,) = ctx.saved_tensors
            grad_h = unit * grad_loss_N[:, None].to(unit.dtype)
            if reduce and group_size(group) > 1:
                dist.all_reduce(grad_h, group=group)
            return grad_h, None, None, None, None, None, None, None, None, None, None, None
        h_s, h_t, w, w_t, max_2N, log_sum_2N, sum_g_N = ctx.saved_tensors
        grad_h = torch.zeros_like(h_s) if ctx.needs_input_grad[0] else None
        grad_w = torch.zeros_like(w) if ctx.needs_input_grad[2] else None
        student_grad = jsd_student_grad.under(compile_mode, h_s.device)
        for sl in token_chunks(h_s.shape[0], shard.width, step):
            s, t = h_s[sl] @ w.T, h_t[sl] @ w_t.T
            grad = student_grad(
                s, t, max_2N[0, sl], log_sum_2N[0, sl], max_2N[1, sl], log_sum_2N[1, sl],
                sum_g_N[sl], grad_loss_N[sl], shard, temperature, beta, term_clip, dtype,
            ).to(w.dtype)  # [chunk, real columns]  # fmt: skip
            real = w[: shard.real]
            if grad_h is not None:
                grad_h[sl] = grad @ real
            if grad_w is not None:
                grad_w[: shard.real] += grad.T @ h_s[sl]
        if grad_h is not None and reduce and group_size(group) > 1:
            dist.all_reduce(grad_h, group=group)  # [N, H]: the vocabulary's partial sums
        return grad_h, None, grad_w, None, None, None, None, None, None, None, None, None


def vocab_parallel_linear_jsd(
    student_hidden_NH: torch.Tensor,
    teacher_hidden_NH: torch.Tensor,
    weight_VH: torch.Tensor,
    *,
    beta: float,
    temperature: float = 1.0,
    vocab_size: int | None = None,
    term_clip: float | None = None,
    group=None,
    chunk_tokens: int | None = None,
    teacher_weight_VH: torch.Tensor | None = None,
    reduce_hidden_grad: bool = True,
    compile: str = "false",
) -> JSDOutput:
    """Per-token JSD_β ``[N]`` (and both entropies) of softmax(h W^T / τ) over the real
    vocabulary, from ``[N, H]`` hidden states and this rank's ``[V/tp, H]`` output-layer shard
    (module doc). Differentiable w.r.t. the student's hidden states and the weight."""
    check_temperature(temperature)
    if not 0.0 <= beta <= 1.0:
        raise ValueError(f"beta must be in [0, 1], got {beta}")
    if term_clip is not None and term_clip <= 0:
        raise ValueError(f"term_clip must be > 0 or None, got {term_clip}")
    if student_hidden_NH.dim() != 2 or student_hidden_NH.shape != teacher_hidden_NH.shape:
        raise ValueError(
            f"hidden states must both be [tokens, hidden], got {tuple(student_hidden_NH.shape)} "
            f"and {tuple(teacher_hidden_NH.shape)}"
        )
    teacher_w = weight_VH if teacher_weight_VH is None else teacher_weight_VH
    if weight_VH.dim() != 2 or weight_VH.shape[1] != student_hidden_NH.shape[1]:
        raise ValueError(
            f"weight {tuple(weight_VH.shape)} must be [vocab shard, {student_hidden_NH.shape[1]}]"
        )
    if teacher_w.shape != weight_VH.shape:
        raise ValueError(f"teacher weight {tuple(teacher_w.shape)} != {tuple(weight_VH.shape)}")
    chunk = chunk_tokens_for(weight_VH.shape[0], chunk_tokens, student_hidden_NH.device)
    loss, hs, ht = _LinearJSD.apply(
        student_hidden_NH,
        teacher_hidden_NH.detach(),
        weight_VH,
        teacher_w.detach(),
        float(beta),
        float(temperature),
        vocab_size,
        term_clip,
        group,
        chunk,
        reduce_hidden_grad,
        normalize(compile),
    )
    return JSDOutput(loss, hs, ht)
