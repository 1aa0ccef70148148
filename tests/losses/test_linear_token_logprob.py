"""Fused output layer + token log-probs and the sampled-token objective from hidden states
(losses/linear_token_logprob.py) against fp64 full-vocabulary references (h W^T, log-softmax,
autograd) and the materialized path, at TP=1 and 2 with padded vocab rows and several chunks:
values, the hidden-state gradient and the weight shard's gradient."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from opsd_megatron.losses import vocab_parallel_sampled_token_loss, vocab_parallel_token_logprobs
from opsd_megatron.losses.linear_token_logprob import (
    vocab_parallel_linear_sampled_token_loss,
    vocab_parallel_linear_token_logprobs,
)
from opsd_megatron.testing import run_distributed
from tests.losses import reference as ref
from tests.losses.cases import REAL_VOCAB
from tests.losses.test_linear_jsd import _inputs, _rows

N = 11
TOL = {torch.float64: 1e-10, torch.float32: 1e-5}
TEMP = 0.8


def _tokens():
    return torch.randint(0, REAL_VOCAB, (N,), generator=torch.Generator().manual_seed(9))


def _run(tp, group):
    rank = dist.get_rank() if group is not None else 0
    out = []
    for dtype in (torch.float64, torch.float32):
        h_s, h_t, w, _ = _inputs(dtype)
        kw = dict(temperature=TEMP, vocab_size=REAL_VOCAB, group=group)
        h, shard = h_s.clone().requires_grad_(True), _rows(w, rank, tp).clone().requires_grad_(True)
        lp = vocab_parallel_linear_token_logprobs(h, shard, _tokens(), chunk_tokens=3, **kw)
        (lp * torch.linspace(0.5, 1.5, N, dtype=dtype)).sum().backward()
        mat = vocab_parallel_token_logprobs(h_s @ _rows(w, rank, tp).T, _tokens(), **kw)
        h2 = h_s.clone().requires_grad_(True)
        st = vocab_parallel_linear_sampled_token_loss(
            h2, h_t, _rows(w, rank, tp), _tokens(), chunk_tokens=4, **kw
        )
        st.loss.sum().backward()
        st_mat = vocab_parallel_sampled_token_loss(
            h_s @ _rows(w, rank, tp).T, h_t @ _rows(w, rank, tp).T, _tokens(), **kw
        )
        out.append(
            (dtype, lp.detach(), h.grad, shard.grad, mat, st.loss.detach(), h2.grad, st_mat.loss)
        )
    return out


def _rank_fn():
    return _run(2, dist.group.WORLD)


@pytest.mark.parametrize("tp", [1, 2])
def test_fused_token_logprobs_and_sampled_token_loss_equal_fp64(tp):
    results = [_run(1, None)] if tp == 1 else run_distributed(_rank_fn, 2)
    h_s, h_t, w, _ = _inputs(torch.float64)
    h, weight = h_s.clone().requires_grad_(True), w.clone().requires_grad_(True)
    want = ref.token_logprobs(h @ weight.T, _tokens(), TEMP, REAL_VOCAB)
    (want * torch.linspace(0.5, 1.5, N, dtype=torch.float64)).sum().backward()
    h3 = h_s.clone().requires_grad_(True)  # sampled-token: −sg[lt − ls]·ls
    ls = ref.token_logprobs(h3 @ w.T, _tokens(), TEMP, REAL_VOCAB)
    lt = ref.token_logprobs(h_t @ w.T, _tokens(), TEMP, REAL_VOCAB)
    want_st = -(lt - ls).detach() * ls
    want_st.sum().backward()
    for rank, per_rank in enumerate(results):
        for dtype, lp, gh, gw, mat, st, gh2, st_mat in per_rank:
            tol = TOL[dtype]
            assert (lp.double() - want.detach()).abs().max() <= tol, (tp, dtype)
            assert (gh.double() - h.grad).abs().max() <= tol, (tp, dtype)  # summed over TP
            assert (gw.double() - _rows(weight.grad, rank, tp)).abs().max() <= tol, (tp, dtype)
            assert (lp - mat).abs().max() <= tol
            # the objective is a product of two log-probs (|loss| up to ~30): relative error
            assert ref.rel_err(st, want_st.detach()) <= tol and ref.rel_err(st, st_mat) <= tol
            assert ref.rel_err(gh2, h3.grad) <= tol, (tp, dtype)
