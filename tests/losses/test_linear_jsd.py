"""The fused output layer + JSD (losses/linear_jsd.py) against an fp64 reference (logits = h W^T
over the whole padded vocabulary, then tests/losses/reference.jsd, gradients by autograd) and
against the materialized path (h W^T, then vocab_parallel_jsd) at TP=1, 2 and 4: values, the
hidden-state gradient and the weight shard's gradient (tied / full-parameter; every other case a
frozen weight, whose hidden-state gradient the forward computes), β ∈ {0, 0.5, 1},
two temperatures, a term clip and a separate teacher weight, with padded vocab rows and several
token chunks. A dispatch-mode test shows no tensor with more than a chunk of rows of vocab width
is ever created."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
from torch.utils._python_dispatch import TorchDispatchMode

from opsd_megatron.losses import vocab_parallel_jsd
from opsd_megatron.losses.linear_jsd import vocab_parallel_linear_jsd
from opsd_megatron.testing import run_distributed
from tests.losses import reference as ref
from tests.losses.cases import PADDED_VOCAB, REAL_VOCAB

N, H, CHUNK = 11, 6, 4
CASES = [  # beta, temperature, term_clip, separate teacher weight
    (0.5, 1.0, None, False),
    (0.0, 0.7, None, False),
    (1.0, 1.0, None, True),
    (0.5, 0.7, 0.05, True),
]
TOL = {torch.float64: 1e-10, torch.float32: 1e-5}


def _inputs(dtype):
    g = torch.Generator().manual_seed(4)
    h_s = torch.randn(N, H, generator=g, dtype=torch.float64)
    h_t = h_s + 0.5 * torch.randn(N, H, generator=g, dtype=torch.float64)
    w = torch.randn(PADDED_VOCAB, H, generator=g, dtype=torch.float64)
    w_t = w + 0.3 * torch.randn(PADDED_VOCAB, H, generator=g, dtype=torch.float64)
    w[REAL_VOCAB:] = w_t[REAL_VOCAB:] = 5.0  # padding rows: large garbage logits
    return [x.to(dtype) for x in (h_s, h_t, w, w_t)]


def _rows(x, rank, tp):
    width = x.shape[0] // tp
    return x[rank * width : (rank + 1) * width]


def _run(tp, group):
    rank = dist.get_rank() if group is not None else 0
    out = []
    for dtype in (torch.float64, torch.float32):
        for i, (beta, temp, clip, separate) in enumerate(CASES):
            h_s, h_t, w, w_t = _inputs(dtype)
            h = h_s.clone().requires_grad_(True)
            # odd cases: a frozen weight (LoRA), whose hidden-state gradient the forward computes
            shard = _rows(w, rank, tp).clone().requires_grad_(i % 2 == 0)
            res = vocab_parallel_linear_jsd(
                h,
                h_t,
                shard,
                beta=beta,
                temperature=temp,
                vocab_size=REAL_VOCAB,
                term_clip=clip,
                group=group,
                chunk_tokens=CHUNK,
                teacher_weight_VH=_rows(w_t, rank, tp) if separate else None,
            )
            wt = torch.linspace(0.5, 1.5, N, dtype=dtype)
            (res.loss * wt).sum().backward()
            # the materialized path on the same shard
            s = (h_s @ _rows(w, rank, tp).T).requires_grad_(True)
            t = h_t @ _rows(w_t if separate else w, rank, tp).T
            mat = vocab_parallel_jsd(
                s,
                t,
                beta=beta,
                temperature=temp,
                vocab_size=REAL_VOCAB,
                term_clip=clip,
                group=group,
            )
            out.append(
                (
                    dtype,
                    beta,
                    temp,
                    clip,
                    separate,
                    res.loss.detach(),
                    h.grad,
                    shard.grad,
                    mat.detach(),
                )
            )
    return out


def _rank_fn(tp):
    return _run(tp, dist.group.WORLD)


def _reference(beta, temp, clip, separate):
    h_s, h_t, w, w_t = _inputs(torch.float64)
    h, weight = h_s.clone().requires_grad_(True), w.clone().requires_grad_(True)
    t = h_t @ (w_t if separate else w).T
    vals = ref.jsd(h @ weight.T, t, beta, temp, vocab_size=REAL_VOCAB, term_clip=clip)
    (vals * torch.linspace(0.5, 1.5, N, dtype=torch.float64)).sum().backward()
    return vals.detach(), h.grad, weight.grad


@pytest.mark.parametrize("tp", [1, 2, 4])
def test_fused_linear_jsd_equals_fp64_and_the_materialized_path(tp):
    results = [_run(1, None)] if tp == 1 else run_distributed(_rank_fn, tp, tp)
    for rank, per_rank in enumerate(results):
        for dtype, beta, temp, clip, separate, loss, gh, gw, mat in per_rank:
            case = (tp, rank, dtype, beta, temp, clip, separate)
            want, want_gh, want_gw = _reference(beta, temp, clip, separate)
            assert (loss.double() - want).abs().max() <= TOL[dtype], case
            assert (gh.double() - want_gh).abs().max() <= TOL[dtype], case  # summed over TP
            if gw is not None:  # the frozen-weight cases have none
                assert (gw.double() - _rows(want_gw, rank, tp)).abs().max() <= TOL[dtype], case
            assert (loss - mat).abs().max() <= TOL[dtype], case


class _WidestVocabTensor(TorchDispatchMode):
    """Records, over every op's outputs, the most rows of any tensor as wide as the vocab shard."""

    def __init__(self, width, weight_shape):
        super().__init__()
        self.width, self.weight_shape, self.rows = width, weight_shape, 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else [out]:
            if isinstance(t, torch.Tensor) and t.dim() >= 1 and tuple(t.shape) != self.weight_shape:
                if self.width in t.shape:
                    self.rows = max(self.rows, t.numel() // self.width)
        return out


@pytest.mark.parametrize("weight_grad", [True, False])
def test_no_tensor_of_more_than_a_chunk_of_vocab_rows_is_created(weight_grad):
    h_s, h_t, w, _ = _inputs(torch.float32)
    n = 64
    h_s, h_t = h_s.repeat(6, 1)[:n], h_t.repeat(6, 1)[:n]
    h = h_s.clone().requires_grad_(True)
    weight = w.clone().requires_grad_(weight_grad)
    with _WidestVocabTensor(PADDED_VOCAB, tuple(w.shape)) as seen:
        loss = vocab_parallel_linear_jsd(
            h, h_t, weight, beta=0.5, vocab_size=REAL_VOCAB, chunk_tokens=8
        )
        loss.loss.sum().backward()
    assert 0 < seen.rows <= 8, seen.rows
    with _WidestVocabTensor(PADDED_VOCAB, tuple(w.shape)) as seen:  # the mode sees the full logits
        vocab_parallel_jsd(h_s @ w.T, h_t @ w.T, beta=0.5, vocab_size=REAL_VOCAB)
    assert seen.rows >= n
