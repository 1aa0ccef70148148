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

The arithmetic (``JSDMath`` and the two chunk kernels, which ``loss.compile`` runs through
``torch.compile``: the ``@compilable`` decorator of ``compiled.py``), the autograd function and
the public functions are all here; ``linear_jsd.py`` reuses the kernels on logits it makes chunk
by chunk from hidden states.

Per-term clip (``term_clip``, the OPSD code's ``jsd_token_clip``): each e_v is replaced by
min(e_v, clip) before summing; clamped terms pass no gradient (their g_v is zero).
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch

from opsd_megatron.losses.compiled import compilable, normalize
from opsd_megatron.losses.validation import check_logits_pair, check_temperature
from opsd_megatron.losses.vocab_parallel import (
    DEFAULT_CHUNK_ELEMENTS,
    VocabShard,
    all_reduce_per_token,
    chunk_log_probs,
    global_softmax_stats,
    resolve_chunk_elements,
    token_chunks,
    vocab_shard,
    working_dtype,
)


# --- the arithmetic: per-entry terms, one chunk's partial sums and student gradient ---
def _xlogy_terms(p: torch.Tensor, diff: torch.Tensor) -> torch.Tensor:
    """p·diff with 0 where p == 0 (so -inf log-probs of impossible tokens give 0, not NaN)."""
    return torch.where(p > 0, p * diff, 0.0)


class JSDMath:
    """Local per-shard arithmetic (no communication) on a chunk's log-probs ``[N, V]``."""

    @staticmethod
    def terms(ls: torch.Tensor, lt: torch.Tensor, beta: float):
        """Per-entry divergence terms e and their derivative g = ∂e/∂(log p_S)."""
        ps, pt = torch.exp(ls), torch.exp(lt)
        if beta == 0.0:
            return _xlogy_terms(pt, lt - ls), -pt
        if beta == 1.0:
            ps_term = _xlogy_terms(ps, ls - lt)
            return ps_term, ps_term + ps
        lm = torch.logaddexp(lt + math.log(beta), ls + math.log1p(-beta))
        student_part = _xlogy_terms(ps, ls - lm)
        e = beta * _xlogy_terms(pt, lt - lm) + (1.0 - beta) * student_part
        return e, (1.0 - beta) * student_part

    @staticmethod
    def clip(e: torch.Tensor, g: torch.Tensor, term_clip: float | None):
        if term_clip is None:
            return e, g
        kept = e <= term_clip
        return torch.where(kept, e, term_clip), torch.where(kept, g, 0.0)

    @staticmethod
    def neg_entropy_terms(lp: torch.Tensor) -> torch.Tensor:
        return _xlogy_terms(torch.exp(lp), lp)

    @staticmethod
    def student_grad(
        ls: torch.Tensor, g: torch.Tensor, sum_g: torch.Tensor, temperature: float
    ) -> torch.Tensor:
        return (g - torch.exp(ls) * sum_g[:, None]) / temperature


@compilable
def jsd_partials(s, t, m_s, z_s, m_t, z_t, shard: VocabShard, temperature, beta, term_clip, dtype):
    """``[4, n]`` per-token sums over a chunk's real columns: divergence, Σg, −H_S, −H_T.
    ``s``/``t``: raw logits ``[n, V]``; ``m_*``/``z_*``: global row max and log-sum ``[n]``."""
    ls = chunk_log_probs(s, m_s, z_s, shard, temperature, dtype)
    lt = chunk_log_probs(t, m_t, z_t, shard, temperature, dtype)
    e, g = JSDMath.clip(*JSDMath.terms(ls, lt, beta), term_clip)
    return torch.stack(
        [
            e.sum(1),
            g.sum(1),
            JSDMath.neg_entropy_terms(ls).sum(1),
            JSDMath.neg_entropy_terms(lt).sum(1),
        ]
    )


@compilable
def jsd_student_grad(
    s,
    t,
    m_s,
    z_s,
    m_t,
    z_t,
    sum_g,
    grad_loss,
    shard: VocabShard,
    temperature,
    beta,
    term_clip,
    dtype,
):
    """∂(grad_loss · JSD)/∂s on a chunk's real columns ``[n, shard.real]`` (in ``dtype``)."""
    ls = chunk_log_probs(s, m_s, z_s, shard, temperature, dtype)
    lt = chunk_log_probs(t, m_t, z_t, shard, temperature, dtype)
    _, g = JSDMath.clip(*JSDMath.terms(ls, lt, beta), term_clip)
    return JSDMath.student_grad(ls, g, sum_g, temperature) * grad_loss[:, None].to(dtype)


# --- the autograd function: global softmax statistics, per-token all-reduces ---


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
        partials = jsd_partials.under(compile_mode, student_NV.device)
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
        student_grad = jsd_student_grad.under(compile_mode, student_NV.device)
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
