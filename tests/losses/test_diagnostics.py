"""The per-token diagnostics (losses/diagnostics.py) at TP=1 and TP=2 with padded vocab columns
against full-vocabulary fp64 torch: argmax ids, top-1 agreement, the teacher's log-prob of the
sampled tokens, and the position thirds."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from opsd_megatron.losses.diagnostics import (
    position_thirds,
    teacher_token_logprobs,
    top1_agreement,
    vocab_parallel_argmax,
    vocab_parallel_entropy,
)
from opsd_megatron.testing import run_distributed
from tests.losses import reference as ref
from tests.losses.cases import PADDED_VOCAB, REAL_VOCAB, shard

TEMP = 0.8


def _inputs():
    g = torch.Generator().manual_seed(5)
    s = torch.randn(3, 9, PADDED_VOCAB, generator=g, dtype=torch.float64) * 2
    t = s + torch.randn(s.shape, generator=g, dtype=torch.float64)  # agree on some tokens only
    for x in (s, t):
        x[..., REAL_VOCAB:] = 99.0  # padding garbage above every real logit: must be ignored
    s[0, 0, REAL_VOCAB - 1] = 50.0  # the argmax in the last real column (rank 1's shard at TP2)
    t[0, 0, REAL_VOCAB - 1] = 50.0
    tokens = torch.randint(0, REAL_VOCAB, (3, 9), generator=g)
    return s, t, tokens


def _run(tp, group):
    rank = dist.get_rank() if group is not None else 0
    s, t, tokens = _inputs()
    ls, lt = shard(s, rank, tp), shard(t, rank, tp)
    return (
        vocab_parallel_argmax(ls, REAL_VOCAB, group),
        top1_agreement(ls.float(), lt.float(), REAL_VOCAB, group),
        teacher_token_logprobs(lt, tokens, TEMP, REAL_VOCAB, group),
        vocab_parallel_entropy(lt, TEMP, REAL_VOCAB, group),
    )


def _rank_fn():
    return _run(2, dist.group.WORLD)


@pytest.mark.parametrize("tp", [1, 2])
def test_argmax_agreement_teacher_logprob_and_entropy_equal_full_vocab_fp64(tp):
    results = [_run(1, None)] if tp == 1 else run_distributed(_rank_fn, 2)
    s, t, tokens = _inputs()
    want_ids = s[..., :REAL_VOCAB].argmax(-1)
    want_agree = (want_ids == t[..., :REAL_VOCAB].argmax(-1)).float()
    want_lp = torch.log_softmax(t[..., :REAL_VOCAB] / TEMP, -1).gather(-1, tokens[..., None])[
        ..., 0
    ]
    assert 0 < want_agree.mean() < 1  # the case has both agreeing and disagreeing tokens
    assert want_ids[0, 0] == REAL_VOCAB - 1
    want_h = ref.entropy(t, TEMP, REAL_VOCAB)
    for ids, agree, lp, h in results:  # every rank holds the same per-token results
        assert (h - want_h).abs().max() <= 1e-10
        assert torch.equal(ids, want_ids)
        assert torch.equal(agree, want_agree)
        assert (lp - want_lp).abs().max() <= 1e-10


def test_position_thirds_split_each_response_by_its_own_length():
    mask = torch.zeros(3, 7, dtype=torch.bool)
    for row, n in enumerate((6, 7, 2)):
        mask[row, :n] = True
    first, middle, last = position_thirds(mask)
    as_lists = [
        [m[r, : int(mask[r].sum())].int().tolist() for m in (first, middle, last)] for r in range(3)
    ]
    assert as_lists[0] == [[1, 1, 0, 0, 0, 0], [0, 0, 1, 1, 0, 0], [0, 0, 0, 0, 1, 1]]
    assert as_lists[1] == [[1, 1, 1, 0, 0, 0, 0], [0, 0, 0, 1, 1, 0, 0], [0, 0, 0, 0, 0, 1, 1]]
    assert as_lists[2] == [[1, 0], [0, 1], [0, 0]]  # floor(3i/L): 0, 1
    assert torch.equal(first | middle | last, mask)
    assert not (first & middle).any() and not (middle & last).any()
