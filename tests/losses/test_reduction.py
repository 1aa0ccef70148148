"""Loss reductions: micro-batches on several DP ranks sum to the global-batch mean (paper eq.
6/8)."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from opsd_megatron.losses import global_normalizer, masked_mean, partial_loss
from opsd_megatron.testing import run_distributed


def _batch():
    g = torch.Generator().manual_seed(0)
    per_token = torch.rand(8, 6, generator=g, dtype=torch.float64)
    lengths = torch.tensor([6, 1, 0, 4, 6, 2, 0, 3])  # two sequences with no response token
    mask = torch.arange(6)[None, :] < lengths[:, None]
    per_token[~mask] = torch.nan  # garbage at masked positions must never leak
    return per_token, mask


def _plain(per_token, mask, mode):
    rows = [per_token[b, mask[b]] for b in range(len(mask)) if mask[b].any()]
    if mode == "token_mean":
        return torch.cat(rows).mean()
    return torch.stack([r.mean() for r in rows]).mean()


@pytest.mark.parametrize("mode", ["sequence_mean", "token_mean"])
def test_single_microbatch_equals_plain_mean(mode):
    per_token, mask = _batch()
    got = partial_loss(per_token, mask, mode, global_normalizer([mask], mode))
    assert torch.allclose(got, _plain(per_token, mask, mode), rtol=1e-12)


def test_fully_masked_batch_gives_zero_not_nan():
    per_token = torch.full((2, 3), torch.nan)
    mask = torch.zeros(2, 3, dtype=torch.bool)
    for mode in ("sequence_mean", "token_mean"):
        assert partial_loss(per_token, mask, mode, global_normalizer([mask], mode)).item() == 0.0
    assert masked_mean(per_token, mask).item() == 0.0


def _dp_rank_fn(mode):
    """Two DP ranks x two micro-batches of 2 sequences each; gradients summed over all of them."""
    per_token, mask = _batch()
    rank = dist.get_rank()
    weights = torch.zeros(8, 6, dtype=torch.float64, requires_grad=True)
    mine = [slice(4 * rank, 4 * rank + 2), slice(4 * rank + 2, 4 * rank + 4)]
    norm = global_normalizer([mask[sl] for sl in mine], mode, dp_group=dist.group.WORLD)
    total = torch.zeros((), dtype=torch.float64)
    for sl in mine:
        contribution = partial_loss(per_token[sl].nan_to_num() + weights[sl], mask[sl], mode, norm)
        contribution.backward()  # gradient accumulation
        total = total + contribution.detach()
    dist.all_reduce(total)
    dist.all_reduce(weights.grad)  # the DP gradient reduction (SUM)
    return total, weights.grad


@pytest.mark.parametrize("mode", ["sequence_mean", "token_mean"])
def test_microbatches_across_data_parallel_ranks_equal_global_mean(mode):
    per_token, mask = _batch()
    weights = torch.zeros(8, 6, dtype=torch.float64, requires_grad=True)
    want = partial_loss(
        per_token.nan_to_num() + weights, mask, mode, global_normalizer([mask], mode)
    )
    want.backward()
    for total, grad in run_distributed(_dp_rank_fn, 2, mode):
        assert torch.allclose(total, want.detach(), rtol=1e-12)
        assert torch.allclose(grad, weights.grad, rtol=1e-12)


def test_bad_mode_and_shapes():
    with pytest.raises(ValueError, match="one of"):
        partial_loss(torch.zeros(2, 2), torch.ones(2, 2), "mean", 1.0)
    with pytest.raises(ValueError, match=r"\[batch, tokens\]"):
        partial_loss(torch.zeros(2, 2), torch.ones(2, 3), "token_mean", 1.0)
