"""The Megatron-native rollout engine: batched autoregressive sampling with the training model
itself, on CPU or GPU, under TP and PP.

Each step runs the batch (right-padded: with causal attention a row's logits at its own last
position are exactly those of the unpadded row) through the pipeline in forward-only mode; the last
stage samples vocab-parallel (``sampling.py``) and broadcasts the tokens to the other stages.
Seeded per call, so a run is reproducible. No KV cache yet: each step recomputes the prefix,
which is fine for the tiny CPU recipes; GPU runs should use ``rollout.engine=vllm``.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from opsd_megatron.models.forward import forward_logits
from opsd_megatron.rollout.base import RolloutResult
from opsd_megatron.rollout.sampling import sample_next_tokens


class MegatronSampler:
    def __init__(self, model, *, temperature: float, top_k: int, top_p: float, stop_ids: list[int], pad_id: int,
                 vocab_size: int, seed: int = 0):
        self.model = model
        self.temperature, self.top_k, self.top_p = temperature, top_k, top_p
        self.stop_ids = torch.tensor(stop_ids, dtype=torch.long)
        self.pad_id, self.vocab_size, self.seed = pad_id, vocab_size, seed
        self.calls = 0

    def _generator(self) -> torch.Generator:
        from megatron.core import parallel_state as ps

        key = (self.seed, self.calls, ps.get_data_parallel_rank(), ps.get_tensor_model_parallel_rank())
        return torch.Generator().manual_seed(hash(key) % (2**63))

    @torch.no_grad()
    def generate(self, prompts: list[list[int]], max_new_tokens: int) -> RolloutResult:
        from megatron.core import parallel_state as ps

        gen = self._generator()
        self.calls += 1
        b = len(prompts)
        lengths = torch.tensor([len(p) for p in prompts])
        tokens = torch.full((b, int(lengths.max()) + max_new_tokens), self.pad_id, dtype=torch.long)
        for i, p in enumerate(prompts):
            tokens[i, : len(p)] = torch.tensor(p)
        alive = torch.ones(b, dtype=torch.bool)
        responses, logprobs = [[] for _ in range(b)], [[] for _ in range(b)]
        was_training = self.model.training
        self.model.eval()
        try:
            for _ in range(max_new_tokens):
                width = int(lengths.max())
                logits = forward_logits(self.model, tokens[:, :width].to(_device(self.model)))
                next_tok = torch.zeros(b, dtype=torch.long)
                next_lp = torch.zeros(b, dtype=torch.float32)
                if logits is not None:
                    last = logits[torch.arange(b), lengths - 1]
                    next_tok, next_lp = sample_next_tokens(
                        last, temperature=self.temperature, top_k=self.top_k, top_p=self.top_p, generator=gen,
                        vocab_size=self.vocab_size, group=ps.get_tensor_model_parallel_group())
                    next_tok, next_lp = next_tok.cpu(), next_lp.cpu()
                if ps.get_pipeline_model_parallel_world_size() > 1:
                    src = ps.get_pipeline_model_parallel_last_rank()
                    dist.broadcast(next_tok, src, group=ps.get_pipeline_model_parallel_group())
                    dist.broadcast(next_lp, src, group=ps.get_pipeline_model_parallel_group())
                for i in torch.nonzero(alive, as_tuple=True)[0].tolist():
                    responses[i].append(int(next_tok[i]))
                    logprobs[i].append(float(next_lp[i]))
                    tokens[i, lengths[i]] = next_tok[i]
                    lengths[i] += 1
                alive &= ~torch.isin(next_tok, self.stop_ids)
                if not alive.any():
                    break
        finally:
            self.model.train(was_training)
        return RolloutResult(responses, logprobs, [not a for a in alive.tolist()])


def _device(model) -> torch.device:
    return next(model.parameters()).device
