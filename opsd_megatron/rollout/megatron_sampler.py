"""The Megatron-native rollout engine: batched autoregressive sampling with the training model
itself, on CPU or GPU, under TP and PP.

The prompts are prefilled up to the shortest one's length, then each step feeds one position of
every row through the pipeline (forward-only) against megatron's static KV cache
(``models/kv_cache.py``); a row still inside its prompt takes its own next prompt token, so every
row sees exactly its own unpadded context. The last stage samples vocab-parallel (``sampling.py``)
and broadcasts the tokens to the other stages. Seeded per call, so a run is reproducible.

Every tensor lives on the rank's device (``groups.device``), the generator too; the host sees the
tokens once, at the end, and one "any row alive?" flag per step.
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
        self.device = self.groups.device
        self.temperature, self.top_k, self.top_p = temperature, top_k, top_p
        self.stop_ids = torch.tensor(stop_ids, dtype=torch.long, device=self.device)
        self.pad_id, self.vocab_size, self.seed = pad_id, vocab_size, seed
        self.calls = 0

    def _generator(self) -> torch.Generator:
        """This call's stream, on the rank's device (CUDA noise needs a CUDA generator)."""
        key = (self.seed, self.calls, self.groups.dp_rank, self.groups.tp_rank)
        return torch.Generator(device=self.device).manual_seed(hash(key) % (2**63))

    def _next(self, logits, b: int, gen):
        """Sample from last-position logits (last stage) and share the tokens with every stage."""
        g = self.groups
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
        else:
            tok = torch.zeros(b, dtype=torch.long, device=self.device)
            lp = torch.zeros(b, dtype=torch.float32, device=self.device)
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
        b, device = len(prompts), self.device
        host_lengths = [len(p) for p in prompts]
        total = max(host_lengths) + max_new_tokens
        tokens = torch.full((b, total), self.pad_id, dtype=torch.long)
        for i, p in enumerate(prompts):
            tokens[i, : len(p)] = torch.tensor(p, dtype=torch.long)
        tokens = tokens.to(device)  # the one host -> device copy of the prompts
        lengths = torch.tensor(host_lengths, device=device)
        positions = torch.arange(total, device=device).expand(b, total)
        logprobs_BT = torch.zeros(b, total, dtype=torch.float32, device=device)
        generated = torch.zeros(b, dtype=torch.long, device=device)
        alive = torch.ones(b, dtype=torch.bool, device=device)
        ctx = new_context(b, total)
        start = min(host_lengths)
        was_training = self.model.training
        self.model.eval()
        try:
            with sharded_inference_logits(self.model):
                t = start  # next position to fill
                chunk = slice(0, start)
                while t < total and bool(alive.any()):
                    logits = forward_logits(
                        self.model, tokens[:, chunk], positions[:, chunk], inference_context=ctx
                    )
                    ctx.sequence_len_offset += chunk.stop - chunk.start
                    tok, lp = self._next(None if logits is None else logits[:, -1], b, gen)
                    sampling = alive & (lengths <= t)  # rows past their prompt
                    tokens[:, t] = torch.where(sampling, tok, tokens[:, t])
                    logprobs_BT[:, t] = torch.where(sampling, lp, 0.0)
                    generated += sampling.long()
                    alive &= ~(sampling & torch.isin(tok, self.stop_ids)) & (
                        generated < max_new_tokens
                    )
                    chunk = slice(t, t + 1)
                    t += 1
        finally:
            self.model.train(was_training)
        rows, lps = tokens.tolist(), logprobs_BT.tolist()  # the host sees the tokens once
        stops = set(self.stop_ids.tolist())
        responses, logprobs = [], []
        for i, (n, start_i) in enumerate(zip(generated.tolist(), host_lengths)):
            responses.append(rows[i][start_i : start_i + n])
            logprobs.append(lps[i][start_i : start_i + n])
        finished = [bool(r) and r[-1] in stops for r in responses]
        return RolloutResult(responses, logprobs, finished)
