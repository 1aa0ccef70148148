"""The sampled-token objective's control-variate baseline (``baseline="reverse_kl"``): the
advantage equals the fp64 log-ratio plus the per-token reverse KL at TP=1 and TP=2 (padded
vocab); the Monte Carlo mean of its per-sample gradients equals the exact reverse-KL gradient, as
without the baseline, and its variance is lower (printed)."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from opsd_megatron.losses import vocab_parallel_sampled_token_loss
from opsd_megatron.testing import run_distributed
from tests.losses import reference as ref
from tests.losses.cases import PADDED_VOCAB, REAL_VOCAB, shard

TEMP = 0.8


def _inputs():
    g = torch.Generator().manual_seed(2)
    s = torch.randn(4, 5, PADDED_VOCAB, generator=g, dtype=torch.float64) * 2
    t = torch.randn(4, 5, PADDED_VOCAB, generator=g, dtype=torch.float64) * 2
    s[..., REAL_VOCAB:] = t[..., REAL_VOCAB:] = 60.0
    return s, t, torch.randint(0, REAL_VOCAB, (4, 5), generator=g)


def _run(tp, group):
    rank = dist.get_rank() if group is not None else 0
    s, t, tokens = _inputs()
    out = {}
    for baseline in ("none", "reverse_kl"):
        local = shard(s, rank, tp).requires_grad_(True)
        res = vocab_parallel_sampled_token_loss(
            local,
            shard(t, rank, tp),
            tokens,
            temperature=TEMP,
            vocab_size=REAL_VOCAB,
            group=group,
            baseline=baseline,
        )
        res.loss.sum().backward()
        out[baseline] = (res.advantage, local.grad)
    return out


def _rank_fn():
    return _run(2, dist.group.WORLD)


@pytest.mark.parametrize("tp", [1, 2])
def test_advantage_and_gradient_equal_fp64_with_the_reverse_kl_added(tp):
    results = [_run(1, None)] if tp == 1 else run_distributed(_rank_fn, 2)
    s, t, tokens = _inputs()
    log_ratio = ref.token_logprobs(t, tokens, TEMP, REAL_VOCAB) - ref.token_logprobs(
        s, tokens, TEMP, REAL_VOCAB
    )
    kl = ref.jsd(s, t, 1.0, TEMP, vocab_size=REAL_VOCAB)
    for rank, out in enumerate(results):
        for baseline, want_adv in (("none", log_ratio), ("reverse_kl", log_ratio + kl)):
            adv, grad = out[baseline]
            assert (adv - want_adv).abs().max() <= 1e-10, baseline
            x = s.detach().clone().requires_grad_(True)  # -Â·log p_S(ŷ), Â constant
            (-(want_adv * ref.token_logprobs(x, tokens, TEMP, REAL_VOCAB))).sum().backward()
            assert (grad - shard(x.grad, rank, tp)).abs().max() <= 1e-10, baseline
    assert (kl > 1e-2).all()  # the baseline moves every token's advantage


def test_baseline_keeps_the_expected_gradient_and_lowers_its_variance():
    """One state, V=8, 40,000 samples ŷ ~ p_S: per-sample gradients of −Â·log p_S(ŷ)."""
    g = torch.Generator().manual_seed(0)
    s, t = (
        torch.randn(8, generator=g, dtype=torch.float64),
        torch.randn(8, generator=g, dtype=torch.float64) * 2,
    )
    x = s.clone().requires_grad_(True)
    ref.jsd(x[None], t[None], 1.0).sum().backward()  # exact ∇ KL(p_S ‖ p_T)
    exact = x.grad
    m = 40_000
    tokens = torch.multinomial(torch.softmax(s, -1), m, replacement=True, generator=g)
    stats = {}
    for baseline in ("none", "reverse_kl"):
        rows = s.expand(m, 8).clone().requires_grad_(True)  # one copy per sample: per-sample grads
        loss = vocab_parallel_sampled_token_loss(
            rows, t.expand(m, 8), tokens, baseline=baseline
        ).loss
        loss.sum().backward()
        mean, var = rows.grad.mean(0), rows.grad.var(0).sum()
        err = (mean - exact).abs().max().item()
        bound = 5 * (rows.grad.var(0).max() / m).sqrt().item()  # 5 standard errors
        stats[baseline] = (err, bound, var.item())
        assert err <= bound, (baseline, err, bound)
    print(
        "per-sample gradient variance (sum over the vocabulary): none "
        f"{stats['none'][2]:.4f}, reverse_kl {stats['reverse_kl'][2]:.4f} "
        f"({stats['reverse_kl'][2] / stats['none'][2]:.2f}x)"
    )
    assert stats["reverse_kl"][2] <= 0.8 * stats["none"][2], stats
