"""Vocab-parallel next-token sampling: temperature, top-k, top-p, without gathering the vocabulary.

Legend: B rows (one next token each), V local vocab shard, K top-k candidates.

* Sampling is Gumbel-max: argmax_v (z_v + g_v), g_v i.i.d. Gumbel(0,1), z = logits/τ. Each rank
  draws noise for its own shard, takes its local max, and one all-reduce picks the winner.
* top-k / top-p: the support of ``losses/truncation.py`` (only ``[B, tp*K]`` candidates and
  per-row masses cross ranks); tokens outside it get −inf before the noise is added.
* The returned log-prob is that of the sampling distribution: log softmax(z̃)[token], z̃ = z with
  the tokens outside the top-k/top-p support at −inf (renormalised over the support) — vLLM's
  ``processed_logprobs``, and what the trainer computes with ``top_k``/``top_p`` for the same token.
* τ = 0 is greedy decoding: the global argmax of the logits (the same local-max + all-reduce,
  without noise; top-k/top-p cannot remove the argmax), its log-prob reported at τ = 1.
"""

from __future__ import annotations

import torch

from opsd_megatron.losses.truncation import log_normalizer, truncate
from opsd_megatron.losses.vocab_parallel import all_reduce_per_token, vocab_shard


def sample_next_tokens(
    logits_BV: torch.Tensor,
    *,
    temperature: float,
    top_k: int = 0,
    top_p: float = 1.0,
    generator: torch.Generator,
    vocab_size: int | None = None,
    group=None,
    noise_rows: torch.Tensor | None = None,
    noise_batch: int | None = None,
):
    """Sample one token per row from vocab-sharded logits; returns (global ids [B], log-probs [B]).
    ``temperature=0``: greedy. ``noise_rows``: these B rows are rows of a ``noise_batch``-row
    batch, and take those rows of that batch's noise — a decoder that dropped its finished rows
    keeps the random stream, so its tokens are those of the full batch."""
    shard = vocab_shard(logits_BV.shape[1], vocab_size, group)
    greedy = temperature == 0
    z = logits_BV[:, : shard.real].float() / (1.0 if greedy else temperature)
    keep = z if greedy else truncate(z, top_k, top_p, group)
    log_z = log_normalizer(keep, group)
    if greedy:
        score = z.double()
    else:
        # the generator lives on the logits' device (a CPU generator cannot draw CUDA noise)
        shape = keep.shape if noise_rows is None else (noise_batch, keep.shape[1])
        u = torch.rand(shape, generator=generator, dtype=torch.float64, device=keep.device)
        u = (u if noise_rows is None else u[noise_rows]).clamp_(1e-300, 1.0)
        score = keep.double() - torch.log(-torch.log(u))
    if score.shape[1] == 0:
        best, idx = (
            score.new_full((score.shape[0],), -torch.inf),
            torch.zeros(score.shape[0], dtype=torch.long, device=score.device),
        )
    else:
        best, idx = score.max(dim=1)
    winner = all_reduce_per_token(best[None].clone(), "max", group)[0]
    mine = (best == winner) & torch.isfinite(best)
    token = torch.where(mine, idx + shard.start, torch.full_like(idx, -1)).double()
    token = all_reduce_per_token(token[None], "max", group)[0].long()
    picked = torch.where(
        mine, keep.gather(1, idx[:, None])[:, 0] if keep.shape[1] else best.float(), 0.0
    )
    logprob = all_reduce_per_token(picked[None].double(), "sum", group)[0] - log_z.double()
    return token, logprob.float()
