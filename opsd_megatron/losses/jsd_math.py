"""The JSD's local arithmetic (no communication): per-entry terms and their derivative
(``JSDMath``, formulas in ``jsd.py``), and one chunk's forward partial sums and student gradient
from its raw logits and the global softmax statistics — the functions ``loss.compile`` hands to
``torch.compile`` (``compiled.py``); the materialized and fused paths both call them.

Legend: n tokens of one chunk, V the shard's columns (``shard.real`` of them real).
"""

from __future__ import annotations

import math

import torch

from opsd_megatron.losses.vocab_parallel import VocabShard, chunk_log_probs


def _xlogy_terms(p: torch.Tensor, diff: torch.Tensor) -> torch.Tensor:
    """p·diff with 0 where p == 0 (so -inf log-probs of impossible tokens give 0, not NaN)."""
    return torch.where(p > 0, p * diff, 0.0)


class JSDMath:
    """Local per-shard arithmetic; no communication. Inputs are log-probs of a chunk ``[N, V]``."""

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
