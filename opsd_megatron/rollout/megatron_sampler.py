"""The Megatron-native rollout engine: batched autoregressive sampling with the training model
itself, on CPU or GPU, under TP and PP.

The prompts are prefilled up to the shortest one's length, then each step feeds one position of
every row through the pipeline (forward-only) against megatron's static KV cache
(``models/kv_cache.py``); a row still inside its prompt takes its own next prompt token, so every
row sees exactly its own unpadded context. The last stage samples vocab-parallel (``sampling.py``)
and broadcasts the tokens to the other stages. Seeded per call, so a run is reproducible.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from opsd_megatron.models.forward import forward_logits
from opsd_megatron.models.kv_cache import new_context, sharded_inference_logits
from opsd_megatron.platform.parallel import ParallelGroups, current_groups
from opsd_megatron.rollout.base import RolloutResult
from opsd_megatron.rollout.sampling import sample_next_tokens


class MegatronSampler:
    """Samples with the training model itself (TP/PP, KV cache), seeded per call."""

    def __init__(
        self,
        model,
        *,
        temperature: float,
        top_k: int,
        top_p: float,
        stop_ids: list[int],
        pad_id: int,
        vocab_size: int,
        seed: int = 0,
        groups: ParallelGroups | None = None,
    ):
        """``groups``: where the model sits (default: the initialised layout's)."""
        self.model = model
        self.groups = groups or current_groups()
        self.temperature, self.top_k, self.top_p = temperature, top_k, top_p
        self.stop_ids = torch.tensor(stop_ids, dtype=torch.long)
        self.pad_id, self.vocab_size, self.seed = pad_id, vocab_size, seed
        self.calls = 0

    def _generator(self) -> torch.Generator:
        key = (self.seed, self.calls, self.groups.dp_rank, self.groups.tp_rank)
        return torch.Generator().manual_seed(hash(key) % (2**63))

    def _next(self, logits, b: int, gen):
        """Sample from last-position logits (last stage) and share the tokens with every stage."""
        g = self.groups
        tok, lp = torch.zeros(b, dtype=torch.long), torch.zeros(b, dtype=torch.float32)
        if logits is not None:
            tok, lp = sample_next_tokens(
                logits,
                temperature=self.temperature,
                top_k=self.top_k,
                top_p=self.top_p,
                generator=gen,
                vocab_size=self.vocab_size,
                group=g.tp,
            )
            tok, lp = tok.cpu(), lp.cpu()
        if g.pp_size > 1:
            dist.broadcast(tok, g.pp_last_rank, group=g.pp)
            dist.broadcast(lp, g.pp_last_rank, group=g.pp)
        return tok, lp

    @torch.no_grad()
    def generate(
        self, prompts: list[list[int]], max_new_tokens: int, seeds: list[int] | None = None
    ) -> RolloutResult:
        """Sample after each prompt with the model in eval mode and sequence parallelism off.
        ``seeds`` are not used: the call's stream comes from (seed, calls, DP and TP rank)."""
        from opsd_megatron.models.forward import sequence_parallel_disabled

        with sequence_parallel_disabled(self.model):  # decoding feeds one position at a time
            return self._generate(prompts, max_new_tokens)

    def _generate(self, prompts: list[list[int]], max_new_tokens: int) -> RolloutResult:
        """Prefill the shortest prompt's length, then one position per step with the KV cache;
        rows whose prompt is longer take their own prompt token until it is consumed."""
        gen = self._generator()
        self.calls += 1
        b = len(prompts)
        lengths = torch.tensor([len(p) for p in prompts])
        total = int(lengths.max()) + max_new_tokens
        tokens = torch.full((b, total), self.pad_id, dtype=torch.long)
        for i, p in enumerate(prompts):
            tokens[i, : len(p)] = torch.tensor(p)
        positions = torch.arange(total).expand(b, total)
        generated = torch.zeros(b, dtype=torch.long)
        alive = torch.ones(b, dtype=torch.bool)
        responses, logprobs = [[] for _ in range(b)], [[] for _ in range(b)]
        device = _device(self.model)
        ctx = new_context(b, total)
        start = int(lengths.min())
        was_training = self.model.training
        self.model.eval()
        try:
            with sharded_inference_logits(self.model):
                t = start  # next position to fill
                chunk = slice(0, start)
                while alive.any() and t < total:
                    logits = forward_logits(
                        self.model,
                        tokens[:, chunk].to(device),
                        positions[:, chunk].to(device),
                        inference_context=ctx,
                    )
                    ctx.sequence_len_offset += chunk.stop - chunk.start
                    tok, lp = self._next(None if logits is None else logits[:, -1], b, gen)
                    sampling = alive & (lengths <= t)  # rows past their prompt
                    for i in torch.nonzero(sampling, as_tuple=True)[0].tolist():
                        tokens[i, t] = tok[i]
                        responses[i].append(int(tok[i]))
                        logprobs[i].append(float(lp[i]))
                        generated[i] += 1
                    alive &= ~(sampling & torch.isin(tok, self.stop_ids)) & (
                        generated < max_new_tokens
                    )
                    chunk = slice(t, t + 1)
                    t += 1
        finally:
            self.model.train(was_training)
        finished = [bool(r) and r[-1] in self.stop_ids.tolist() for r in responses]
        return RolloutResult(responses, logprobs, finished)


def _device(model) -> torch.device:
    return next(model.parameters()).device
