"""A model's next-token distributions on one rank, in the two forms the trainer has them, with one
interface so an algorithm writes each loss once and reaches it in one call:

* ``Logits``: this rank's vocab-sharded logits ``[..., V/tp]`` (``loss.fused=false``);
* ``Hidden``: final-norm hidden states ``[..., H]`` with the output layer's ``[V/tp, H]`` shard
  (``loss.fused=true``: logits made one token chunk at a time, never whole; ``linear_*.py``).

``student.jsd(teacher, ...)``, ``.sampled_token(...)``, ``.topk_jsd(...)``,
``.token_logprobs(...)``, ``.entropy(...)``, ``.top1_agreement(...)``: each is one call to its
loss file's public function (math, autograd function and API in that one file). Student and
teacher must have the same form.

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
from opsd_megatron.losses.topk_jsd import TopKJSDOutput, vocab_parallel_topk_jsd


def _same_form(student, teacher, cls) -> None:
    if not isinstance(teacher, cls):
        raise TypeError(
            f"student is {cls.__name__} but the teacher is {type(teacher).__name__}: "
            f"both must be Logits or both Hidden"
        )


@dataclass
class Logits:
    """This rank's vocab-sharded logits ``[..., V/tp]`` (Megatron's padded columns beyond
    ``vocab_size`` ignored)."""

    values: torch.Tensor

    @property
    def token_shape(self) -> torch.Size:
        return self.values.shape[:-1]

    def jsd(
        self, teacher: Logits, *, beta, term_clip=None, temperature=1.0, vocab_size=None,
        group=None, compile="false",
    ) -> JSDOutput:  # fmt: skip
        """Per-token JSD_β and both entropies (``jsd.py``)."""
        _same_form(self, teacher, Logits)
        return vocab_parallel_jsd_with_entropy(
            self.values, teacher.values, beta=beta, temperature=temperature,
            vocab_size=vocab_size, term_clip=term_clip, group=group, compile=compile,
        )  # fmt: skip

    def topk_jsd(self, teacher: Logits, **kw) -> TopKJSDOutput:
        """JSD_β over the teacher's top-K plus a tail bucket (``topk_jsd.py``)."""
        _same_form(self, teacher, Logits)
        return vocab_parallel_topk_jsd(self.values, teacher.values, **kw)

    def sampled_token(
        self, teacher: Logits, tokens, *, baseline="none", temperature=1.0, vocab_size=None,
        group=None,
    ) -> SampledTokenOutput:  # fmt: skip
        """The sampled-token objective (``sampled_token.py``)."""
        _same_form(self, teacher, Logits)
        return vocab_parallel_sampled_token_loss(
            self.values, teacher.values, tokens, baseline=baseline, temperature=temperature,
            vocab_size=vocab_size, group=group,
        )  # fmt: skip

    def token_logprobs(
        self, tokens, *, temperature=1.0, top_k=0, top_p=1.0, vocab_size=None, group=None
    ) -> torch.Tensor:
        """log p(tokens) under the tempered (and top-k / top-p truncated) softmax."""
        return vocab_parallel_token_logprobs(
            self.values, tokens, temperature=temperature, top_k=top_k, top_p=top_p,
            vocab_size=vocab_size, group=group,
        )  # fmt: skip

    def entropy(self, *, temperature=1.0, vocab_size=None, group=None) -> torch.Tensor:
        """Per-token entropy (no gradient)."""
        return vocab_parallel_entropy(
            self.values, temperature=temperature, vocab_size=vocab_size, group=group
        )

    def top1_agreement(self, teacher: Logits, vocab_size=None, group=None) -> torch.Tensor:
        """1 where the two argmaxes agree (no gradient; ``diagnostics.py``)."""
        _same_form(self, teacher, Logits)
        return _top1_from_logits(self.values.detach(), teacher.values, vocab_size, group)


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

    def _chunk_kw(self) -> dict:
        return dict(chunk_tokens=self.chunk_tokens, reduce_hidden_grad=self.reduce_hidden_grad)

    def jsd(
        self, teacher: Hidden, *, beta, term_clip=None, temperature=1.0, vocab_size=None,
        group=None, compile="false",
    ) -> JSDOutput:  # fmt: skip
        """Per-token JSD_β and both entropies, chunk by chunk (``linear_jsd.py``)."""
        _same_form(self, teacher, Hidden)
        out = vocab_parallel_linear_jsd(
            self.flat(), teacher.flat(), self.weight_VH, beta=beta, temperature=temperature,
            vocab_size=vocab_size, term_clip=term_clip, group=group,
            teacher_weight_VH=teacher.weight_VH, compile=compile, **self._chunk_kw(),
        )  # fmt: skip
        return JSDOutput(*(t.reshape(self.token_shape) for t in out))

    def topk_jsd(self, teacher: Hidden, **kw) -> TopKJSDOutput:
        raise ValueError("loss.teacher_top_k needs loss.fused=false (its top-K reads logits)")

    def sampled_token(
        self, teacher: Hidden, tokens, *, baseline="none", temperature=1.0, vocab_size=None,
        group=None,
    ) -> SampledTokenOutput:  # fmt: skip
        """The sampled-token objective, chunk by chunk (``linear_token_logprob.py``)."""
        _same_form(self, teacher, Hidden)
        out = vocab_parallel_linear_sampled_token_loss(
            self.flat(), teacher.flat(), self.weight_VH, tokens.reshape(-1),
            teacher_weight_VH=teacher.weight_VH, baseline=baseline, temperature=temperature,
            vocab_size=vocab_size, group=group, **self._chunk_kw(),
        )  # fmt: skip
        return SampledTokenOutput(*(t.reshape(self.token_shape) for t in out))

    def token_logprobs(
        self, tokens, *, temperature=1.0, top_k=0, top_p=1.0, vocab_size=None, group=None
    ) -> torch.Tensor:
        """log p(tokens) under the tempered softmax (top-k / top-p: ``Logits`` only)."""
        if top_k or top_p < 1.0:
            raise ValueError(
                "loss.fused: token log-probs under top-k / top-p need loss.fused=false"
            )
        lp = vocab_parallel_linear_token_logprobs(
            self.flat(), self.weight_VH, tokens.reshape(-1), temperature=temperature,
            vocab_size=vocab_size, group=group, **self._chunk_kw(),
        )  # fmt: skip
        return lp.reshape(self.token_shape)

    def entropy(self, *, temperature=1.0, vocab_size=None, group=None) -> torch.Tensor:
        """Per-token entropy (no gradient), one chunk of logits at a time."""
        kw = dict(temperature=temperature, vocab_size=vocab_size, group=group)
        return self._per_chunk(lambda x: vocab_parallel_entropy(x, **kw))

    def top1_agreement(self, teacher: Hidden, vocab_size=None, group=None) -> torch.Tensor:
        """1 where the two argmaxes agree (no gradient), one chunk of logits at a time."""
        _same_form(self, teacher, Hidden)
        return self._per_chunk(lambda s, t: _top1_from_logits(s, t, vocab_size, group), teacher)

    @torch.no_grad()
    def _per_chunk(self, fn, *others: Hidden) -> torch.Tensor:
        """``fn`` of this side's (and ``others``') logits per token chunk: never ``[N, V]``."""
        sides = (self, *others)
        flat = [s.flat().detach() for s in sides]
        n, w = flat[0].shape[0], self.weight_VH
        chunk = chunk_tokens_for(w.shape[0], self.chunk_tokens, w.device)
        parts = [
            fn(*(f[i : i + chunk] @ s.weight_VH.detach().T for f, s in zip(flat, sides)))
            for i in range(0, n, chunk)
        ]
        return (torch.cat(parts) if parts else flat[0].new_zeros(0)).reshape(self.token_shape)
