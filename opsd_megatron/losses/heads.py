"""What the algorithms' losses read a next-token distribution from: this rank's vocab-sharded
logits ``[..., V/tp]`` (``loss.fused=false``), or final-norm hidden states ``[..., H]`` with the
output layer's ``[V/tp, H]`` shard (``Hidden``, ``loss.fused=true``: logits never whole, see
``linear_jsd.py``). Each function here takes either form, so an algorithm writes its loss once.

Legend: H hidden size, V local vocab shard; ``...`` the token dims ([B, R] in the trainer).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from opsd_megatron.losses.diagnostics import top1_agreement as _top1_from_logits
from opsd_megatron.losses.diagnostics import vocab_parallel_entropy
from opsd_megatron.losses.jsd import JSDOutput, vocab_parallel_jsd_with_entropy
from opsd_megatron.losses.linear_jsd import chunk_tokens_for, vocab_parallel_linear_jsd
from opsd_megatron.losses.linear_token_logprob import (
    vocab_parallel_linear_sampled_token_loss,
    vocab_parallel_linear_token_logprobs,
)
from opsd_megatron.losses.sampled_token import (
    SampledTokenOutput,
    vocab_parallel_sampled_token_loss,
)
from opsd_megatron.losses.token_logprob import vocab_parallel_token_logprobs


@dataclass
class Hidden:
    """Hidden states and the output-layer shard that makes this rank's logits of them.
    ``reduce_hidden_grad``: False when the states came through megatron's TP-region mapping,
    whose backward sums the shards' partial gradients (``models/output_head.py``)."""

    states: torch.Tensor  # [..., H]
    weight_VH: torch.Tensor
    chunk_tokens: int | None = None
    reduce_hidden_grad: bool = False

    def flat(self) -> torch.Tensor:
        return self.states.reshape(-1, self.states.shape[-1])

    @property
    def token_shape(self) -> torch.Size:
        return self.states.shape[:-1]


def _fused(student, teacher) -> bool:
    if isinstance(student, Hidden) != isinstance(teacher, Hidden):
        raise TypeError("student and teacher must both be logits or both be Hidden")
    return isinstance(student, Hidden)


def _chunk_kw(h: Hidden) -> dict:
    return dict(chunk_tokens=h.chunk_tokens, reduce_hidden_grad=h.reduce_hidden_grad)


def jsd(
    student,
    teacher,
    *,
    beta,
    term_clip=None,
    temperature=1.0,
    vocab_size=None,
    group=None,
    compile="false",
):
    """Per-token JSD_β and both entropies (``jsd.py`` / ``linear_jsd.py``); ``compile``:
    ``loss.compile`` (``compiled.py``)."""
    if not _fused(student, teacher):
        return vocab_parallel_jsd_with_entropy(
            student,
            teacher,
            beta=beta,
            term_clip=term_clip,
            temperature=temperature,
            vocab_size=vocab_size,
            group=group,
            compile=compile,
        )
    out = vocab_parallel_linear_jsd(
        student.flat(),
        teacher.flat(),
        student.weight_VH,
        beta=beta,
        temperature=temperature,
        vocab_size=vocab_size,
        term_clip=term_clip,
        group=group,
        teacher_weight_VH=teacher.weight_VH,
        compile=compile,
        **_chunk_kw(student),
    )
    shape = student.token_shape
    return JSDOutput(*(t.reshape(shape) for t in out))


def sampled_token(
    student, teacher, tokens, *, baseline="none", temperature=1.0, vocab_size=None, group=None
) -> SampledTokenOutput:
    """The sampled-token objective, with the reverse-KL baseline when asked (``sampled_token.py``)."""
    kw = dict(temperature=temperature, vocab_size=vocab_size, group=group)
    if not _fused(student, teacher):
        return vocab_parallel_sampled_token_loss(student, teacher, tokens, baseline=baseline, **kw)
    out = vocab_parallel_linear_sampled_token_loss(
        student.flat(),
        teacher.flat(),
        student.weight_VH,
        tokens.reshape(-1),
        teacher_weight_VH=teacher.weight_VH,
        baseline=baseline,
        **_chunk_kw(student),
        **kw,
    )
    return SampledTokenOutput(*(t.reshape(student.token_shape) for t in out))


def _detached(h: Hidden) -> Hidden:
    return Hidden(h.states.detach(), h.weight_VH.detach(), h.chunk_tokens, h.reduce_hidden_grad)


def token_logprobs(
    side, tokens, *, temperature=1.0, top_k=0, top_p=1.0, vocab_size=None, group=None
):
    """log p(tokens) under the tempered softmax (top-k / top-p: logits only)."""
    if not isinstance(side, Hidden):
        return vocab_parallel_token_logprobs(
            side,
            tokens,
            temperature=temperature,
            top_k=top_k,
            top_p=top_p,
            vocab_size=vocab_size,
            group=group,
        )
    if top_k or top_p < 1.0:
        raise ValueError("loss.fused: token log-probs under top-k / top-p need loss.fused=false")
    lp = vocab_parallel_linear_token_logprobs(
        side.flat(),
        side.weight_VH,
        tokens.reshape(-1),
        temperature=temperature,
        vocab_size=vocab_size,
        group=group,
        **_chunk_kw(side),
    )
    return lp.reshape(side.token_shape)


@torch.no_grad()
def _per_chunk(fn, *sides: Hidden) -> torch.Tensor:
    """``fn`` of the sides' logits, one token chunk at a time (diagnostics: never ``[N, V]``)."""
    flat = [s.flat() for s in sides]
    n, w = flat[0].shape[0], sides[0].weight_VH
    chunk = chunk_tokens_for(w.shape[0], sides[0].chunk_tokens, w.device)
    parts = [
        fn(*(f[i : i + chunk] @ s.weight_VH.T for f, s in zip(flat, sides)))
        for i in range(0, n, chunk)
    ]
    return (torch.cat(parts) if parts else flat[0].new_zeros(0)).reshape(sides[0].token_shape)


def entropy(side, *, temperature=1.0, vocab_size=None, group=None) -> torch.Tensor:
    """Per-token entropy (no gradient)."""
    kw = dict(temperature=temperature, vocab_size=vocab_size, group=group)
    if not isinstance(side, Hidden):
        return vocab_parallel_entropy(side, **kw)
    return _per_chunk(lambda x: vocab_parallel_entropy(x, **kw), side)


def top1_agreement(student, teacher, vocab_size=None, group=None) -> torch.Tensor:
    """1 where the two argmaxes agree (no gradient; ``diagnostics.py``)."""
    if not _fused(student, teacher):
        return _top1_from_logits(student.detach(), teacher, vocab_size, group)
    return _per_chunk(
        lambda s, t: _top1_from_logits(s, t, vocab_size, group), _detached(student), teacher
    )
