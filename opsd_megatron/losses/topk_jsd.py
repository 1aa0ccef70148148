r"""JSD_β over the teacher's top-K tokens, vocab-parallel (``loss.teacher_top_k``).

Legend: N tokens (leading dims flattened), V local vocab shard, K the teacher's top-K.

S is the teacher's global top-K at each token (each shard's local top-K values gathered — ``[N,
tp·K]`` — and the K-th largest as a per-token cut-off; ties with it are kept). Both distributions
are then coarsened the same way, and JSD_β (``losses/jsd.py``, same ends and clip) is taken
between the coarse distributions:

* ``tail``: the K entries of S plus one bucket holding the rest of each distribution's mass,
  q_v = p_v for v ∈ S, q_tail = Σ_{u ∉ S} p_u (summed directly, not 1 − Σ_S, so a small tail
  keeps its digits). With K ≥ V the tail is empty and this is the full JSD.
* ``renorm``: S alone, renormalised, q_v = p_v / Σ_{u ∈ S} p_u (the OPSD code's top-k option).

Gradient. The coarse student distribution is a softmax over coarse logits: c_v = s_v/τ for
v ∈ S and c_tail = log Σ_{u ∉ S} exp(s_u/τ). With g = ∂e/∂(log q_S) per coarse entry (JSDMath),
∂D/∂c = g − q_S·Σg, so ∂D/∂s_v = (g_v − q_v Σg)/τ on S, and off S (tail mode)
(g_tail − q_tail Σg)/τ · p_S,u / q_tail^S; renorm passes nothing off S. The tail entry is a
function of per-token scalars, computed identically on every rank and added once after the
reduction. Communication: the softmax statistics, the candidates (per token chunk), one
``[4, N]`` reduction of masses and one of the divergence terms; the backward recomputes each
chunk from per-token statistics and communicates nothing.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from opsd_megatron.losses.jsd import JSDMath
from opsd_megatron.losses.truncation import global_topk_cutoff
from opsd_megatron.losses.validation import check_logits_pair, check_temperature
from opsd_megatron.losses.vocab_parallel import (
    DEFAULT_CHUNK_ELEMENTS,
    MAX_CANDIDATES,
    all_reduce_per_token,
    chunk_log_probs,
    global_softmax_stats,
    resolve_chunk_elements,
    token_chunks,
    vocab_shard,
    working_dtype,
)

MODES = ("tail", "renorm")


class TopKJSDOutput(NamedTuple):
    loss: torch.Tensor  # per token, differentiable w.r.t. the student
    teacher_mass: torch.Tensor  # Σ_{v ∈ S} p_T,v: how much of the teacher the top-K keeps


class _Chunk(NamedTuple):
    ls: torch.Tensor  # student log-probs of the chunk's real columns
    support: torch.Tensor  # in the teacher's top-K
    qs: torch.Tensor  # coarse student log-probs on the support (−inf off it)
    qt: torch.Tensor


def _chunk(student_NV, teacher_NV, sl, st, cut_N, log_m_4N, mode) -> _Chunk:
    """One token chunk's log-probs and coarse log-probs from the per-token statistics
    ``st = (max_2N, log_sum_2N, shard, temperature, dtype)``."""
    max_2N, log_sum_2N, shard, temperature, dtype = st
    ls = chunk_log_probs(
        student_NV[sl], max_2N[0, sl], log_sum_2N[0, sl], shard, temperature, dtype
    )
    lt = chunk_log_probs(
        teacher_NV[sl], max_2N[1, sl], log_sum_2N[1, sl], shard, temperature, dtype
    )
    support = lt >= cut_N[sl, None]
    qs, qt = torch.where(support, ls, -torch.inf), torch.where(support, lt, -torch.inf)
    if mode == "renorm":
        qs, qt = qs - log_m_4N[0, sl, None], qt - log_m_4N[2, sl, None]
    return _Chunk(ls, support, qs, qt)


def _tail_terms(log_m_4N, beta, term_clip):
    """The tail bucket's divergence term and g, per token (the same on every rank)."""
    e, g = JSDMath.clip(*JSDMath.terms(log_m_4N[1, :, None], log_m_4N[3, :, None], beta), term_clip)
    return e[:, 0], g[:, 0]


class _TopKJSD(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx, student_NV, teacher_NV, beta, temperature, k, mode, vocab_size, term_clip, group, chunk
    ):
        dtype = working_dtype(student_NV, teacher_NV)
        shard = vocab_shard(student_NV.shape[1], vocab_size, group)
        n = student_NV.shape[0]
        max_2N, log_sum_2N = global_softmax_stats(
            [student_NV, teacher_NV], shard, temperature, dtype, chunk, group
        )
        st = (max_2N, log_sum_2N, shard, temperature, dtype)
        # the teacher's top-K cut-off on its log-probs, and the masses [S in, S out, T in, T out]
        cut_N = torch.empty(n, dtype=dtype, device=student_NV.device)
        masses_4N = torch.zeros(4, n, dtype=dtype, device=student_NV.device)
        for sl in token_chunks(n, shard.width, chunk):
            lt = chunk_log_probs(
                teacher_NV[sl], max_2N[1, sl], log_sum_2N[1, sl], shard, temperature, dtype
            )
            cut_N[sl] = global_topk_cutoff(lt, k, group)
            c = _chunk(student_NV, teacher_NV, sl, st, cut_N, None, "tail")
            for i, lp in enumerate((c.ls, lt)):
                p = torch.exp(lp)
                masses_4N[2 * i, sl] = torch.where(c.support, p, 0.0).sum(1)
                masses_4N[2 * i + 1, sl] = torch.where(c.support, 0.0, p).sum(1)
        log_m_4N = torch.log(all_reduce_per_token(masses_4N, "sum", group))
        partial_2N = torch.zeros(2, n, dtype=dtype, device=student_NV.device)
        for sl in token_chunks(n, shard.width, chunk):
            c = _chunk(student_NV, teacher_NV, sl, st, cut_N, log_m_4N, mode)
            e, g = JSDMath.clip(*JSDMath.terms(c.qs, c.qt, beta), term_clip)
            partial_2N[0, sl], partial_2N[1, sl] = e.sum(1), g.sum(1)
        loss_N, sum_g_N = all_reduce_per_token(partial_2N, "sum", group)
        if mode == "tail":
            e_tail, g_tail = _tail_terms(log_m_4N, beta, term_clip)
            loss_N, sum_g_N = loss_N + e_tail, sum_g_N + g_tail
        ctx.save_for_backward(student_NV, teacher_NV, max_2N, log_sum_2N, cut_N, log_m_4N, sum_g_N)
        ctx.params = (beta, temperature, mode, term_clip, shard, dtype, chunk)
        teacher_mass = torch.exp(log_m_4N[2])
        ctx.mark_non_differentiable(teacher_mass)
        return loss_N, teacher_mass

    @staticmethod
    def backward(ctx, grad_loss_N, _grad_mass):
        student_NV, teacher_NV, max_2N, log_sum_2N, cut_N, log_m_4N, sum_g_N = ctx.saved_tensors
        beta, temperature, mode, term_clip, shard, dtype, chunk = ctx.params
        grad_NV = torch.zeros_like(student_NV)  # Megatron's padded vocab columns stay 0
        if grad_loss_N is None:
            return (None,) * 10
        st = (max_2N, log_sum_2N, shard, temperature, dtype)
        if mode == "tail":
            _, g_tail = _tail_terms(log_m_4N, beta, term_clip)
            tail_grad_N = (g_tail - torch.exp(log_m_4N[1]) * sum_g_N) / temperature
        for sl in token_chunks(student_NV.shape[0], shard.width, chunk):
            c = _chunk(student_NV, teacher_NV, sl, st, cut_N, log_m_4N, mode)
            _, g = JSDMath.clip(*JSDMath.terms(c.qs, c.qt, beta), term_clip)
            grad = (g - torch.exp(c.qs) * sum_g_N[sl, None]) / temperature
            if mode == "tail":  # off S: the tail's gradient, shared in proportion p_S,u / q_tail
                tail = log_m_4N[1, sl, None]  # −inf: no student mass off S at all
                share = torch.where(torch.isfinite(tail), torch.exp(c.ls - tail), 0.0)
                off = tail_grad_N[sl, None] * share
                grad = torch.where(c.support, grad, off)
            else:
                grad = torch.where(c.support, grad, 0.0)
            grad_NV[sl, : shard.real] = (grad * grad_loss_N[sl, None].to(dtype)).to(grad_NV.dtype)
        return grad_NV, None, None, None, None, None, None, None, None, None


def vocab_parallel_topk_jsd(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    *,
    beta: float,
    k: int,
    mode: str = "tail",
    temperature: float = 1.0,
    vocab_size: int | None = None,
    term_clip: float | None = None,
    group=None,
    chunk_elements: int | None = DEFAULT_CHUNK_ELEMENTS,
) -> TopKJSDOutput:
    """Per-token JSD_β between the coarsened distributions (module doc) ``[...]``, and the
    teacher's mass inside its top-K. Inputs are ``[..., V/tp]`` vocab shards; fp32 math (fp64
    for fp64 input)."""
    check_logits_pair(student_logits, teacher_logits)
    check_temperature(temperature)
    if mode not in MODES:
        raise ValueError(f"top-k mode must be one of {MODES}, got {mode!r}")
    if not 1 <= k <= MAX_CANDIDATES:
        raise ValueError(f"teacher top-k must be in [1, {MAX_CANDIDATES}], got {k}")
    lead, width = student_logits.shape[:-1], student_logits.shape[-1]
    loss, mass = _TopKJSD.apply(
        student_logits.reshape(-1, width),
        teacher_logits.detach().reshape(-1, width),
        float(beta),
        float(temperature),
        int(k),
        mode,
        vocab_size,
        term_clip,
        group,
        resolve_chunk_elements(chunk_elements, student_logits.device),
    )
    return TopKJSDOutput(loss.reshape(lead), mass.reshape(lead))
