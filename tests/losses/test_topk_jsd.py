"""JSD_β over the teacher's top-K (losses/topk_jsd.py), tail bucket and renormalised, values and
gradients at TP=1 and TP=2 with padded vocab columns and several token chunks, against an fp64
full-vocabulary reference restricted the same way (coarse logits through tests/losses/reference.jsd
and autograd); with K = V the tail mode equals the full JSD."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from opsd_megatron.losses import vocab_parallel_jsd
from opsd_megatron.losses.topk_jsd import vocab_parallel_topk_jsd
from opsd_megatron.testing import run_distributed
from tests.losses import reference as ref
from tests.losses.cases import PADDED_VOCAB, REAL_VOCAB, shard

TEMP = 0.9
CASES = [  # (beta, k, mode, term_clip)
    (0.5, 5, "tail", None),
    (0.0, 5, "tail", None),
    (1.0, 3, "tail", None),
    (0.5, 5, "renorm", None),
    (0.1, 1, "renorm", None),
    (0.5, 8, "tail", 0.01),
]
TOL = {torch.float64: 1e-10, torch.float32: 2e-5}


def reference_topk_jsd(s, t, beta, k, mode, temperature, term_clip=None, vocab=REAL_VOCAB):
    """fp64: the teacher's top-k indices per token, coarse logits (support, plus the log-sum-exp
    of the rest as the tail), then the plain JSD over them."""
    zs = s.double()[..., :vocab] / temperature
    zt = t.double()[..., :vocab] / temperature
    idx = torch.topk(zt, k, dim=-1).indices
    inside = torch.zeros_like(zt, dtype=torch.bool).scatter(-1, idx, True)

    def coarse(z):
        top = z.gather(-1, idx)
        if mode == "renorm" or k >= vocab:
            return top
        rest = torch.logsumexp(z.masked_fill(inside, -torch.inf), dim=-1, keepdim=True)
        return torch.cat([top, rest], dim=-1)

    return ref.jsd(coarse(zs), coarse(zt), beta, 1.0, term_clip=term_clip)


def _inputs(dtype):
    g = torch.Generator().manual_seed(11)
    s = torch.randn(3, 6, PADDED_VOCAB, generator=g, dtype=torch.float64) * 2
    t = torch.randn(3, 6, PADDED_VOCAB, generator=g, dtype=torch.float64) * 3
    s[..., REAL_VOCAB:] = t[..., REAL_VOCAB:] = 80.0  # padding garbage: never in the top-K
    t[0, 0, REAL_VOCAB - 2], t[0, 0, REAL_VOCAB - 1] = 40.0, 39.0  # the top two: rank 1 at TP2
    return s.to(dtype), t.to(dtype)


def _run(tp, group):
    rank = dist.get_rank() if group is not None else 0
    out = []
    for dtype in (torch.float64, torch.float32):
        s, t = _inputs(dtype)
        for beta, k, mode, clip in CASES + [(0.5, REAL_VOCAB, "tail", None)]:
            local = shard(s, rank, tp).requires_grad_(True)
            res = vocab_parallel_topk_jsd(
                local,
                shard(t, rank, tp),
                beta=beta,
                k=k,
                mode=mode,
                temperature=TEMP,
                vocab_size=REAL_VOCAB,
                term_clip=clip,
                group=group,
                chunk_elements=50,  # several chunks, each its own top-K gather
            )
            w = torch.linspace(0.5, 1.5, res.loss.numel(), dtype=res.loss.dtype)
            (res.loss * w.reshape(res.loss.shape)).sum().backward()
            out.append(
                (dtype, beta, k, mode, clip, res.loss.detach(), local.grad, res.teacher_mass)
            )
    return out


def _rank_fn():
    return _run(2, dist.group.WORLD)


@pytest.mark.parametrize("tp", [1, 2])
def test_topk_jsd_values_and_gradients_equal_the_restricted_fp64_reference(tp):
    results = [_run(1, None)] if tp == 1 else run_distributed(_rank_fn, 2)
    for rank, per_rank in enumerate(results):
        for dtype, beta, k, mode, clip, loss, grad, mass in per_rank:
            s, t = _inputs(torch.float64)
            want, want_grad, _ = ref.value_and_grad(
                reference_topk_jsd, s, t, beta, k, mode, TEMP, clip
            )
            want_grad = shard(want_grad, rank, tp)  # padded columns: 0 in the reference
            case = (dtype, beta, k, mode, clip)
            assert torch.isfinite(loss).all() and torch.isfinite(grad).all(), case
            assert (loss.double() - want).abs().max() <= TOL[dtype], case
            assert (grad.double() - want_grad).abs().max() <= TOL[dtype], case
            zt = t[..., :REAL_VOCAB] / TEMP
            want_mass = torch.softmax(zt, -1).gather(-1, torch.topk(zt, k, -1).indices).sum(-1)
            assert (mass.double() - want_mass).abs().max() <= TOL[dtype], case
            if k == REAL_VOCAB:  # nothing outside the top-K: the full JSD
                full = ref.jsd(s, t, beta, TEMP, vocab_size=REAL_VOCAB)
                assert (loss.double() - full).abs().max() <= TOL[dtype]
            elif mode == "tail":  # the restriction changes the numbers
                assert (want - ref.jsd(s, t, beta, TEMP, vocab_size=REAL_VOCAB)).abs().max() > 1e-3


def test_k_equal_to_the_vocabulary_equals_the_fused_jsd_in_fp32():
    s, t = _inputs(torch.float32)
    full = vocab_parallel_jsd(s, t, beta=0.5, temperature=TEMP, vocab_size=REAL_VOCAB)
    top = vocab_parallel_topk_jsd(
        s, t, beta=0.5, k=REAL_VOCAB, temperature=TEMP, vocab_size=REAL_VOCAB
    )
    assert (full - top.loss).abs().max() <= 1e-6
    with pytest.raises(ValueError, match="top-k mode"):
        vocab_parallel_topk_jsd(s, t, beta=0.5, k=3, mode="bucket")
