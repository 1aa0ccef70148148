"""Token log-probs and the sampled-token loss against fp64 references, and against megatron-core."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from opsd_megatron.losses import (
    vocab_parallel_jsd,
    vocab_parallel_sampled_token_loss,
    vocab_parallel_token_logprobs,
)
from opsd_megatron.testing import run_distributed
from tests.losses import reference as ref
from tests.losses.cases import PADDED_VOCAB, REAL_VOCAB, shard

TOL = {torch.float64: 1e-10, torch.float32: 1e-5}


def _inputs(dtype, seed=0, with_sampler=False):
    g = torch.Generator().manual_seed(seed)
    s = torch.randn(3, 6, PADDED_VOCAB, generator=g, dtype=torch.float64) * 3
    t = torch.randn(3, 6, PADDED_VOCAB, generator=g, dtype=torch.float64) * 3
    s[..., REAL_VOCAB:] = 40.0
    tokens = torch.randint(0, REAL_VOCAB, (3, 6), generator=g)
    sampler = ref.token_logprobs(s, tokens, 1.2, REAL_VOCAB) + 0.3 * torch.randn(
        3, 6, generator=g, dtype=torch.float64
    )
    return s.to(dtype), t.to(dtype), tokens, (sampler if with_sampler else None)


def _run(tp, group, dtypes=(torch.float64, torch.float32)):
    rank = dist.get_rank() if group is not None else 0
    out = []
    for dtype in dtypes:
        for with_sampler in (False, True):
            s, t, tokens, sampler = _inputs(dtype, with_sampler=with_sampler)
            s_local = shard(s, rank, tp).requires_grad_(True)
            res = vocab_parallel_sampled_token_loss(
                s_local,
                shard(t, rank, tp),
                tokens,
                temperature=1.2,
                vocab_size=REAL_VOCAB,
                group=group,
                sampler_logprobs=sampler,
                importance_ratio_max=1.5,
                chunk_elements=50,
            )
            weights = torch.linspace(0.5, 1.5, res.loss.numel(), dtype=res.loss.dtype).reshape(
                res.loss.shape
            )
            (res.loss * weights).sum().backward()
            out.append((res.loss.detach(), res.advantage, res.importance_weight, s_local.grad))
    return out


def _rank_fn(tp):
    return _run(tp, dist.group.WORLD)


def _check(per_rank, dtypes=(torch.float64, torch.float32)):
    i = 0
    for dtype in dtypes:
        for with_sampler in (False, True):
            s, t, tokens, sampler = _inputs(dtype, with_sampler=with_sampler)
            want, want_grad, _ = ref.value_and_grad(
                ref.sampled_token_loss,
                s[..., :REAL_VOCAB],
                t[..., :REAL_VOCAB],
                tokens,
                1.2,
                sampler,
                1.5,
            )
            loss, adv, weight, _ = per_rank[0][i]
            grad = torch.cat([r[i][3] for r in per_rank], dim=-1)
            want_adv = ref.token_logprobs(t, tokens, 1.2, REAL_VOCAB) - ref.token_logprobs(
                s, tokens, 1.2, REAL_VOCAB
            )
            assert ref.rel_err(loss, want) <= TOL[dtype], (dtype, with_sampler)
            assert ref.rel_err(adv, want_adv) <= TOL[dtype]
            assert ref.rel_err(grad[..., :REAL_VOCAB], want_grad) <= TOL[dtype]
            assert grad[..., REAL_VOCAB:].abs().max() == 0
            if with_sampler:
                assert weight.max() <= 1.5 and weight.min() < 1.5, (
                    "the clip must bind on some tokens only"
                )
            i += 1


def test_sampled_token_loss_tp1():
    _check([_run(1, None)])


def test_sampled_token_loss_tp2():
    _check(run_distributed(_rank_fn, 2, 2))


def test_token_logprobs_reject_bad_tokens():
    logits = torch.randn(2, 3, 8)
    with pytest.raises(ValueError, match=r"token ids must be in \[0, 6\)"):
        vocab_parallel_token_logprobs(logits, torch.full((2, 3), 6), vocab_size=6)
    with pytest.raises(ValueError, match="leading shape"):
        vocab_parallel_token_logprobs(logits, torch.zeros(2, 4, dtype=torch.long))
    with pytest.raises(TypeError, match="token ids"):
        vocab_parallel_token_logprobs(logits, torch.zeros(2, 3))


def _megatron_rank_fn():
    """At TP=2 under megatron's own process groups: our losses vs vocab_parallel_cross_entropy."""
    from megatron.core import parallel_state
    from megatron.core.tensor_parallel import vocab_parallel_cross_entropy

    from opsd_megatron.platform import initialize_model_parallel

    initialize_model_parallel(tensor_model_parallel_size=2)
    group = parallel_state.get_tensor_model_parallel_group()
    rank = parallel_state.get_tensor_model_parallel_rank()
    g = torch.Generator().manual_seed(5)
    logits = torch.randn(4, 3, 64, generator=g) * 3  # megatron layout [s, b, V]
    target = torch.randint(0, 64, (4, 3), generator=g)
    local = shard(logits, rank, 2)

    ce_in = local.clone().requires_grad_(True)
    ce = vocab_parallel_cross_entropy(ce_in, target)
    ce.sum().backward()

    # beta=0 (forward KL) against a one-hot teacher is cross-entropy.
    one_hot = torch.full_like(logits, -torch.inf).scatter_(-1, target[..., None], 0.0)
    jsd_in = local.clone().requires_grad_(True)
    jsd = vocab_parallel_jsd(jsd_in, shard(one_hot, rank, 2), beta=0.0, group=group)
    jsd.sum().backward()

    lp_in = local.clone().requires_grad_(True)
    lp = vocab_parallel_token_logprobs(lp_in, target, group=group)
    (-lp).sum().backward()
    return ce.detach(), ce_in.grad, jsd.detach(), jsd_in.grad, lp.detach(), lp_in.grad


def test_agrees_with_megatron_vocab_parallel_cross_entropy():
    for ce, ce_grad, jsd, jsd_grad, lp, lp_grad in run_distributed(_megatron_rank_fn, 2):
        assert torch.allclose(jsd, ce, rtol=1e-5, atol=1e-6)
        assert torch.allclose(-lp, ce, rtol=1e-5, atol=1e-6)
        assert torch.allclose(jsd_grad, ce_grad, atol=1e-6)
        assert torch.allclose(lp_grad, ce_grad, atol=1e-6)
