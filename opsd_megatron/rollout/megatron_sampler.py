"""The Megatron-native rollout engine: batched autoregressive sampling with the training model
itself, on CPU or GPU, under TP and PP.

Whole-prompt prefill: the prompts are right-aligned in one ``[B, L]`` batch (left padding) and
prefilled in one forward pass against megatron's static KV cache (``models/kv_cache.py``) with an
explicit mask — causal, and no query ever sees a padding key; then one position per step, for
generated tokens only, the same padding keys masked. megatron applies RoPE by cache position
(megatron-core 0.16.1 ``transformer/attention.py``, static batching), so a row shifted by its
padding sees the same relative positions as unpadded: attention is unchanged. The mask is applied
by megatron's local attention at every step (``dot_product_attention.py``: the mask is always
used); transformer-engine's fused attention runs causal or no-mask kernels with a static cache
and would ignore it, so with TE the sampler prefills only the shortest prompt and feeds the rest
position by position (every row still sees exactly its own context). At PP=1 a step calls the
model directly; PP>1 goes through megatron's forward-only schedule. The last stage samples
vocab-parallel (``sampling.py``) and broadcasts the tokens to the other stages. Seeded per call,
so a run is reproducible.

Every tensor lives on the rank's device (``groups.device``), the generator too; the host sees the
tokens once, at the end, and one count of the rows still decoding per step; at PP=1 the finished
rows leave the batch once enough have (``compact_below``), with the random stream unchanged.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from opsd_megatron.models.build import groups_of
from opsd_megatron.models.decoder import KVDecoder
from opsd_megatron.models.forward import forward_logits
from opsd_megatron.models.kv_cache import new_context, sharded_inference_logits
from opsd_megatron.platform.clock import wall_clock
from opsd_megatron.platform.parallel import ParallelGroups
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
        compact_below: float = 0.75,
    ):
        """``groups``: where the model sits (default: the initialised layout's).
        ``compact_below``: at PP=1, once the rows still decoding are at most this fraction of
        the decoder's batch, the finished rows leave it (their cache too): a batch stops paying
        for rows that ended early while one runs to the limit (0: never)."""
        self.model = model
        self.groups = groups or groups_of(model)
        self.device = self.groups.device
        self.temperature, self.top_k, self.top_p = temperature, top_k, top_p
        self.stop_ids = torch.tensor(stop_ids, dtype=torch.long, device=self.device)
        self.pad_id, self.vocab_size, self.seed = pad_id, vocab_size, seed
        self.calls, self.compact_below = 0, compact_below
        self.whole_prompt = masks_honoured(model)  # else the stepwise path (TE attention)
        self.last_phase_s: dict[str, float] = {}  # the last call's prefill/decode seconds

    def _generator(self) -> torch.Generator:
        """This call's stream, on the rank's device (CUDA noise needs a CUDA generator)."""
        key = (self.seed, self.calls, self.groups.dp_rank, self.groups.tp_rank)
        return torch.Generator(device=self.device).manual_seed(hash(key) % (2**63))

    def _next(self, logits, b: int, gen, rows=None):
        """Sample from last-position logits (last stage) and share the tokens with every stage.
        ``rows``: the batch rows the logits belong to (the others have finished)."""
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
                noise_rows=rows,
                noise_batch=b,
            )
            if rows is not None:  # back to batch rows; finished rows are masked by the caller
                tok = torch.zeros(b, dtype=tok.dtype, device=tok.device).index_copy_(0, rows, tok)
                lp = torch.zeros(b, dtype=lp.dtype, device=lp.device).index_copy_(0, rows, lp)
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
        if not self.whole_prompt:
            return self._generate_stepwise(prompts, max_new_tokens)
        gen = self._generator()
        self.calls += 1
        b, device = len(prompts), self.device
        host_lengths = [len(p) for p in prompts]
        width = max(host_lengths)
        total = width + max_new_tokens
        tokens = torch.full((b, total), self.pad_id, dtype=torch.long)
        for i, p in enumerate(prompts):  # right-aligned: every prompt ends at width - 1
            tokens[i, width - len(p) : width] = torch.tensor(p, dtype=torch.long)
        tokens = tokens.to(device)  # the one host -> device copy of the prompts
        pads = torch.tensor([width - n for n in host_lengths], device=device)
        keys = torch.arange(total, device=device)
        padding_BK = keys[None, :] < pads[:, None]  # True: a padding key, masked for every query
        positions = (keys[None, :] - pads[:, None]).clamp(min=0)
        logprobs_BT, generated, alive = self._buffers(b, total)
        if self.groups.pp_size == 1:  # the whole model here: the lean decoder (decoder.py)
            ctx = KVDecoder(self.model, b, total, device)
        else:
            ctx = new_context(b, total)
        was_training = self.model.training
        self.model.eval()
        try:
            with sharded_inference_logits(self.model):
                causal = keys[None, :width] > keys[:width, None]  # [q, k]: a later key
                itself = keys[None, :width] == keys[:width, None]  # a padding query sees itself
                mask = (causal[None, None] | padding_BK[:, None, None, :width]) & ~itself
                start = wall_clock(device)
                logits = self._forward(tokens[:, :width], positions[:, :width], mask, ctx)
                prefilled = wall_clock(device)
                rows = None  # the batch rows in the decoder (None: all of them)
                for t in range(width, total):
                    last = None if logits is None else logits[:, -1]
                    tok, lp = self._next(last, b, gen, rows)
                    tokens[:, t] = torch.where(alive, tok, self.pad_id)
                    logprobs_BT[:, t] = torch.where(alive, lp, 0.0)
                    generated += alive.long()
                    alive &= ~torch.isin(tok, self.stop_ids) & (generated < max_new_tokens)
                    decoding = int(alive.sum())  # the host's one read per step
                    if t + 1 == total or decoding == 0:
                        break
                    if isinstance(ctx, KVDecoder):
                        rows = self._compact(ctx, alive, rows, decoding)
                    r = slice(None) if rows is None else rows
                    mask = padding_BK[r, None, None, : t + 1]
                    logits = self._forward(tokens[r, t : t + 1], positions[r, t : t + 1], mask, ctx)
                # the call's time split (seconds): the prompts' one pass, then token by token
                done = wall_clock(device)
                self.last_phase_s = {"prefill": prefilled - start, "decode": done - prefilled}
        finally:
            self.model.train(was_training)
        return self._result(tokens, logprobs_BT, generated, [width] * b)

    def _compact(self, ctx: KVDecoder, alive, rows, decoding: int):
        """The decoder's rows after dropping the finished ones, if few enough still decode."""
        held = alive.shape[0] if rows is None else rows.numel()
        if decoding > self.compact_below * held:
            return rows
        live = alive.nonzero()[:, 0]  # every TP rank holds the same tokens: the same rows
        ctx.keep(live if rows is None else torch.searchsorted(rows, live))
        return live

    def _forward(self, tokens_BS, positions_BS, mask, ctx):
        """Logits of the new positions ``[B, S, V/tp]`` (None off the last stage); advances the
        cache. PP=1 calls the model itself: the schedule's per-call work buys nothing there."""
        if isinstance(ctx, KVDecoder):
            return ctx.forward(tokens_BS, positions_BS, ~mask[:, 0])
        if self.groups.pp_size == 1:
            out = self.model(tokens_BS, positions_BS, attention_mask=mask, inference_context=ctx)
        else:
            out = forward_logits(
                self.model, tokens_BS, positions_BS, inference_context=ctx, attention_mask=mask
            )
        ctx.sequence_len_offset += tokens_BS.shape[1]
        return out

    def _buffers(self, b: int, total: int):
        """Per-position log-probs, tokens generated per row, rows still sampling (on device)."""
        d = self.device
        return (
            torch.zeros(b, total, dtype=torch.float32, device=d),
            torch.zeros(b, dtype=torch.long, device=d),
            torch.ones(b, dtype=torch.bool, device=d),
        )

    def _result(self, tokens, logprobs_BT, generated, starts: list[int]) -> RolloutResult:
        """Each row's sampled tokens (from ``starts[i]``) and log-probs, read by the host once."""
        rows, lps = tokens.tolist(), logprobs_BT.tolist()
        stops = set(self.stop_ids.tolist())
        responses, logprobs = [], []
        for i, (n, start) in enumerate(zip(generated.tolist(), starts)):
            responses.append(rows[i][start : start + n])
            logprobs.append(lps[i][start : start + n])
        finished = [bool(r) and r[-1] in stops for r in responses]
        return RolloutResult(responses, logprobs, finished)

    def _generate_stepwise(self, prompts: list[list[int]], max_new_tokens: int) -> RolloutResult:
        """For attention that ignores an explicit mask (TE): prefill the shortest prompt's length,
        then one position per step; rows whose prompt is longer take their own prompt token
        until it is consumed, so no row ever sees padding."""
        gen = self._generator()
        self.calls += 1
        b, device = len(prompts), self.device
        host_lengths = [len(p) for p in prompts]
        total = max(host_lengths) + max_new_tokens
        tokens = torch.full((b, total), self.pad_id, dtype=torch.long)
        for i, p in enumerate(prompts):
            tokens[i, : len(p)] = torch.tensor(p, dtype=torch.long)
        tokens = tokens.to(device)
        lengths = torch.tensor(host_lengths, device=device)
        positions = torch.arange(total, device=device).expand(b, total)
        logprobs_BT, generated, alive = self._buffers(b, total)
        ctx = new_context(b, total)
        start = min(host_lengths)
        was_training = self.model.training
        self.model.eval()
        try:
            with sharded_inference_logits(self.model):
                t = start  # next position to fill
                chunk = slice(0, start)
                began = prefilled = wall_clock(device)
                while t < total and bool(alive.any()):
                    logits = self._forward(tokens[:, chunk], positions[:, chunk], None, ctx)
                    if t == start:
                        prefilled = wall_clock(device)
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
                done = wall_clock(device)
                self.last_phase_s = {"prefill": prefilled - began, "decode": done - prefilled}
        finally:
            self.model.train(was_training)
        return self._result(tokens, logprobs_BT, generated, host_lengths)


def masks_honoured(model) -> bool:
    """Whether the model's attention applies an explicit mask with a KV cache (megatron's local
    spec does; transformer-engine's fused attention does not)."""
    return not any(type(m).__name__ == "TEDotProductAttention" for m in model.modules())
