"""Token log-probs under the truncated sampling distribution (temperature, top-k, top-p,
renormalised), values and gradients, at TP=1 and TP=2 with padded vocab columns, against an fp64
reference written the way vLLM 0.32 builds its processed log-probs (tests/losses/reference.py)."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from opsd_megatron.losses import vocab_parallel_token_logprobs
from opsd_megatron.testing import run_distributed
from tests.losses import reference as ref
from tests.losses.cases import PADDED_VOCAB, REAL_VOCAB, shard

TEMP = 0.8
CASES = [(5, 1.0), (0, 0.7), (8, 0.8), (1, 1.0), (REAL_VOCAB, 1.0)]
TOL = {torch.float64: 1e-9, torch.float32: 2e-5}


def _inputs(dtype):
    g = torch.Generator().manual_seed(3)
    s = torch.randn(4, 7, PADDED_VOCAB, generator=g, dtype=torch.float64) * 2.5
    s[..., REAL_VOCAB:] = 50.0  # padding garbage larger than every real logit
    tokens = torch.randint(0, REAL_VOCAB, (4, 7), generator=g)
    # most rows sample a likely token (inside the support); some a token outside it
    tokens[:, :5] = torch.topk(s[:, :5, :REAL_VOCAB], 3, dim=-1).indices[..., 2]
    return s.to(dtype), tokens


def _run(tp, group):
    rank = dist.get_rank() if group is not None else 0
    out = []
    for dtype in (torch.float64, torch.float32):
        s, tokens = _inputs(dtype)
        for top_k, top_p in CASES:
            local = shard(s, rank, tp).requires_grad_(True)
            lp = vocab_parallel_token_logprobs(
                local,
                tokens,
                temperature=TEMP,
                top_k=top_k,
                top_p=top_p,
                vocab_size=REAL_VOCAB,
                group=group,
                chunk_elements=60,  # several token chunks, each its own collective
            )
            w = torch.linspace(0.5, 1.5, lp.numel(), dtype=lp.dtype).reshape(lp.shape)
            (lp * w).sum().backward()
            out.append((dtype, top_k, top_p, lp.detach(), local.grad))
    return out


def _check(results, tp):
    for rank, per_rank in enumerate(results):
        for dtype, top_k, top_p, lp, grad in per_rank:
            s, tokens = _inputs(torch.float64)
            want, want_grad, _ = ref.value_and_grad(
                ref.truncated_token_logprobs, s, tokens, TEMP, top_k, top_p, REAL_VOCAB
            )
            err = (lp.double() - want).abs().max().item()
            gerr = (grad.double() - shard(want_grad, rank, tp)).abs().max().item()
            assert torch.isfinite(lp).all() and torch.isfinite(grad).all()
            assert err <= TOL[dtype] and gerr <= TOL[dtype], (dtype, top_k, top_p, err, gerr)
            if (top_k, top_p) != (REAL_VOCAB, 1.0):  # the truncation changes the numbers
                plain = ref.token_logprobs(s, tokens, TEMP, REAL_VOCAB)
                assert (want - plain).abs().max() > 1e-2


def _rank_fn():
    return _run(2, dist.group.WORLD)


@pytest.mark.parametrize("tp", [1, 2])
def test_truncated_logprobs_and_gradients_equal_the_vllm_style_reference(tp):
    if tp == 1:
        _check([_run(1, None)], 1)
    else:
        _check(run_distributed(_rank_fn, 2), 2)
