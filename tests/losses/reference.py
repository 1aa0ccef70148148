"""Plainly written full-vocabulary fp64 references, independent of the library's derivations.

Gradients come from autograd through these formulas, so they check the hand-written backward of
the library. Padded columns are handled by slicing the real vocabulary, as a user would.
"""

from __future__ import annotations

import math

import torch


def _xlogy(p, diff):
    """p * diff with 0 where p == 0; the inner where keeps autograd free of 0 * inf."""
    return p * torch.where(p > 0, diff, torch.zeros_like(diff))


def log_probs(logits, temperature, vocab_size):
    x = logits.double()[..., :vocab_size] / temperature
    return torch.log_softmax(x, dim=-1)


def jsd(student, teacher, beta, temperature=1.0, vocab_size=None, term_clip=None):
    """Per-token JSD_beta in fp64 over the full vocabulary (TRL GKD convention at the ends)."""
    ls = log_probs(student, temperature, vocab_size)
    lt = log_probs(teacher, temperature, vocab_size)
    ps, pt = ls.exp(), lt.exp()
    if beta == 0:
        terms = _xlogy(pt, lt - ls)
    elif beta == 1:
        terms = _xlogy(ps, ls - lt)
    else:
        mixture = torch.log(
            (beta * pt + (1 - beta) * ps).clamp_min(1e-300)
        )  # 0 only where both are 0
        terms = beta * _xlogy(pt, lt - mixture) + (1 - beta) * _xlogy(ps, ls - mixture)
    if term_clip is not None:
        terms = torch.clamp(terms, max=term_clip)
    return terms.sum(-1)


def entropy(logits, temperature=1.0, vocab_size=None):
    lp = log_probs(logits, temperature, vocab_size)
    return -_xlogy(lp.exp(), lp).sum(-1)


def token_logprobs(logits, tokens, temperature=1.0, vocab_size=None):
    return log_probs(logits, temperature, vocab_size).gather(-1, tokens[..., None])[..., 0]


def sampled_token_loss(
    student, teacher, tokens, temperature=1.0, sampler_logprobs=None, ratio_max=2.0
):
    ls = token_logprobs(student, tokens, temperature)
    lt = token_logprobs(teacher, tokens, temperature)
    adv = (lt - ls).detach()
    w = (
        torch.ones_like(adv)
        if sampler_logprobs is None
        else torch.clamp(torch.exp(ls.detach() - sampler_logprobs.double()), max=ratio_max)
    )
    return -(w * adv) * ls


def value_and_grad(fn, student, *args, **kwargs):
    """fp64 per-token values and d(sum(values * weights))/d(student) with fixed random weights."""
    s = student.detach().double().requires_grad_(True)
    vals = fn(s, *args, **kwargs)
    weights = torch.linspace(0.5, 1.5, vals.numel(), dtype=torch.float64).reshape(vals.shape)
    (vals * weights).sum().backward()
    return vals.detach(), s.grad, weights


def rel_err(a, b, floor=1.0):
    """max |a - b| / max(max |b|, floor): relative for O(1)+ quantities, absolute below ``floor``.

    The floor matters where the true value vanishes (e.g. disjoint supports give a JSD gradient
    of e^-1e4): there both sides are rounding noise and only an absolute bound is meaningful.
    """
    a, b = a.double(), b.double()
    return ((a - b).abs().max() / b.abs().max().clamp(min=floor)).item() if b.numel() else 0.0


__all__ = [
    "jsd",
    "entropy",
    "token_logprobs",
    "sampled_token_loss",
    "value_and_grad",
    "rel_err",
    "math",
]


def truncated_token_logprobs(logits, tokens, temperature, top_k, top_p, vocab_size):
    """log-probs of ``tokens`` under the sampling distribution, the way vLLM 0.32 builds it
    (``v1/sample/ops/topk_topp_sampler.py``: sort ascending, mask below the k-th largest, then mask
    the smallest tokens whose cumulative probability is <= 1 - p, always keeping the largest),
    renormalised; the given token is kept in the support, as the trainer keeps it."""
    z = logits.double()[..., :vocab_size] / temperature
    flat, toks = z.reshape(-1, z.shape[-1]), tokens.reshape(-1)
    out = []
    for row, tok in zip(flat, toks):
        masked = row.clone()
        if top_k:
            kth = torch.sort(row.detach(), descending=True).values[top_k - 1]
            masked = torch.where(row.detach() < kth, -math.inf, masked)
        if top_p < 1:
            order = torch.argsort(masked.detach())
            probs = torch.softmax(masked.detach()[order], -1)
            drop = torch.cumsum(probs, -1) <= 1 - top_p
            drop[-1] = False
            removed = torch.zeros_like(drop)
            removed[order] = drop
            masked = torch.where(removed, -math.inf, masked)
        masked = torch.where(torch.arange(len(row)) == tok, row, masked)
        out.append(torch.log_softmax(masked, -1)[tok])
    return torch.stack(out).reshape(tokens.shape)
