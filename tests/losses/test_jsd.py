"""vocab_parallel_jsd against the fp64 full-vocab reference at TP = 1, 2, 4 (real gloo
processes)."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from opsd_megatron.losses import vocab_parallel_jsd, vocab_parallel_jsd_with_entropy
from opsd_megatron.testing import run_distributed
from tests.losses import reference as ref
from tests.losses.cases import REAL_VOCAB, all_cases, make_inputs, shard

# Tolerances on max|err| / max(max|reference|, 1) per quantity (see reference.rel_err):
TOL = {torch.float64: 1e-10, torch.float32: 1e-5}
ABS_ZERO = {torch.float64: 1e-12, torch.float32: 1e-6}  # "identical" case: loss and grad are zero


def _sharded_results(tp: int, cases, group=None):
    rank = dist.get_rank() if group is not None else 0
    results = []
    for i, case in enumerate(cases):
        s_full, t_full = make_inputs(case, seed=i)
        s = shard(s_full, rank, tp).requires_grad_(True)
        t = shard(t_full, rank, tp)
        out = vocab_parallel_jsd_with_entropy(
            s,
            t,
            beta=case.beta,
            temperature=case.temperature,
            vocab_size=REAL_VOCAB,
            term_clip=case.term_clip,
            group=group,
            chunk_elements=case.chunk_elements,
        )
        weights = torch.linspace(0.5, 1.5, out.loss.numel(), dtype=out.loss.dtype).reshape(
            out.loss.shape
        )
        (out.loss * weights).sum().backward()
        results.append((out.loss.detach(), out.student_entropy, out.teacher_entropy, s.grad))
    return results


def _rank_fn(tp, cases):
    return _sharded_results(tp, cases, group=dist.group.WORLD)


def _check(cases, per_rank):
    failures = []
    for i, case in enumerate(cases):
        s_full, t_full = make_inputs(case, seed=i)
        kw = dict(
            beta=case.beta,
            temperature=case.temperature,
            vocab_size=REAL_VOCAB,
            term_clip=case.term_clip,
        )
        want, want_grad, _ = ref.value_and_grad(ref.jsd, s_full, t_full, **kw)
        losses = [r[i][0] for r in per_rank]
        grad = torch.cat([r[i][3] for r in per_rank], dim=-1)
        assert grad[..., REAL_VOCAB:].abs().max() == 0, "padded columns must get no gradient"
        for rank_loss in losses[1:]:
            assert torch.equal(rank_loss, losses[0]), "all TP ranks must return the same loss"
        assert losses[0].dtype == (torch.float64 if case.dtype == torch.float64 else torch.float32)
        if case.kind == "identical":
            errs = (losses[0].abs().max().item(), grad.abs().max().item())
            ok = all(
                e <= ABS_ZERO[case.dtype] for e in errs
            )  # all(): a NaN error fails (max() hid it)
        else:
            errs = (ref.rel_err(losses[0], want), ref.rel_err(grad, want_grad))
            ok = all(e <= TOL[case.dtype] for e in errs)
        ok = ok and bool(torch.isfinite(losses[0]).all()) and bool(torch.isfinite(grad).all())
        ent_errs = (
            ref.rel_err(per_rank[0][i][1], ref.entropy(s_full, case.temperature, REAL_VOCAB)),
            ref.rel_err(per_rank[0][i][2], ref.entropy(t_full, case.temperature, REAL_VOCAB)),
        )
        ok = ok and all(e <= TOL[case.dtype] for e in ent_errs)
        if not ok:
            failures.append(f"{case}: loss/grad err {errs}, entropy err {ent_errs}")
    assert not failures, (
        "\n".join(failures[:10]) + f"\n({len(failures)} of {len(cases)} cases failed)"
    )


def test_tp1_matches_fp64_reference():
    cases = all_cases()
    _check(cases, [_sharded_results(1, cases)])


@pytest.mark.parametrize("tp", [2, 4])
def test_tensor_parallel_matches_fp64_reference(tp):
    cases = all_cases()
    _check(cases, run_distributed(_rank_fn, tp, tp, cases))


def test_bf16_inputs_close_to_reference_on_rounded_values():
    """bf16 logits: math runs in fp32, so the loss matches the fp64 reference of the bf16-rounded
    inputs to 1e-5; the gradient is returned in bf16, so it matches to bf16 precision (1e-2)."""
    g = torch.Generator().manual_seed(3)
    s = (torch.randn(3, 7, 64, generator=g) * 4).to(torch.bfloat16).requires_grad_(True)
    t = (torch.randn(3, 7, 64, generator=g) * 4).to(torch.bfloat16)
    for beta in (0.0, 0.5, 1.0):
        s.grad = None
        loss = vocab_parallel_jsd(s, t, beta=beta, temperature=1.2)
        assert loss.dtype == torch.float32
        weights = torch.linspace(0.5, 1.5, loss.numel()).reshape(loss.shape)
        (loss * weights).sum().backward()
        assert s.grad.dtype == torch.bfloat16
        want, want_grad, _ = ref.value_and_grad(ref.jsd, s.detach(), t, beta=beta, temperature=1.2)
        assert ref.rel_err(loss, want) <= 1e-5
        assert ref.rel_err(s.grad, want_grad) <= 1e-2


def test_teacher_gets_no_gradient():
    s = torch.randn(4, 11, requires_grad=True)
    t = torch.randn(4, 11, requires_grad=True)
    vocab_parallel_jsd(s, t, beta=0.5).sum().backward()
    assert t.grad is None and s.grad is not None


def test_clip_blocks_gradient_of_clamped_terms():
    """With a clip below every term, the loss is clip * V per token and no gradient passes."""
    s = torch.zeros(2, 8, dtype=torch.float64, requires_grad=True)
    t = torch.tensor([[9.0] + [0.0] * 7] * 2, dtype=torch.float64)
    clip = 1e-9
    # forward KL terms: only the first entry is positive (> clip); the rest are negative (kept).
    loss = vocab_parallel_jsd(s, t, beta=0.0, term_clip=clip)
    loss.sum().backward()
    want, want_grad, _ = ref.value_and_grad(ref.jsd, s.detach(), t, beta=0.0, term_clip=clip)
    assert torch.allclose(loss, want, rtol=1e-12)
    assert torch.allclose(
        s.grad, want_grad / torch.linspace(0.5, 1.5, 2, dtype=torch.float64)[:, None], rtol=1e-10
    )


def test_clip_bounds_each_vocabulary_entry_not_the_token_sum():
    """The OPSD code's jsd_token_clip clamps the [B, T, V] terms, not each token's divergence."""
    s = torch.zeros(1, 8, dtype=torch.float64)
    t = torch.tensor([[1.0] * 7 + [-5.0]], dtype=torch.float64)  # 7 entries share the sum
    terms = torch.softmax(t, -1) * (torch.log_softmax(t, -1) - torch.log_softmax(s, -1))
    clip = float(terms.max()) * 1.01  # above every entry, below the token's sum
    full = vocab_parallel_jsd(s, t, beta=0.0)
    assert float(terms.sum()) > clip
    assert torch.allclose(vocab_parallel_jsd(s, t, beta=0.0, term_clip=clip), full, rtol=1e-12)
    # one entry far above the clip: it is capped, the negative entries are not -> below zero
    peaked = torch.tensor([[6.0] + [0.0] * 7], dtype=torch.float64)
    assert float(vocab_parallel_jsd(s, peaked, beta=0.0, term_clip=0.01)) < 0.0


def test_clipped_entry_where_the_teacher_exceeds_the_student_is_pushed_down():
    """Why β=0 + term_clip drove SmolLM2 away from its teacher (docs/real_model.md): a clamped
    entry passes no gradient of its own, so only the softmax normaliser moves its logit — and
    it moves it the wrong way. Teacher 0.9 on entry 0, student 0.6: unclipped, descent raises
    the student's logit there (∂L/∂s_0 = p_S − p_T = −0.3); clipped, it lowers it
    (∂L/∂s_0 = p_S,0·(1 − p_T,0) = +0.06)."""
    rest = torch.full((4,), 0.1 / 4, dtype=torch.float64)
    t = torch.log(torch.cat([torch.tensor([0.9], dtype=torch.float64), rest]))[None]
    s0 = torch.log(torch.cat([torch.tensor([0.6], dtype=torch.float64), rest * 4]))[None]
    grads = []
    for clip in (None, 0.05):
        s = s0.clone().requires_grad_(True)
        vocab_parallel_jsd(s, t, beta=0.0, term_clip=clip).sum().backward()
        grads.append(float(s.grad[0, 0]))
    assert grads[0] == pytest.approx(-0.3, abs=1e-9) and grads[1] == pytest.approx(0.06, abs=1e-9)


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        (dict(beta=1.5), ValueError, "beta"),
        (dict(beta=-0.1), ValueError, "beta"),
        (dict(beta=0.5, temperature=0.0), ValueError, "temperature"),
        (dict(beta=0.5, term_clip=-1.0), ValueError, "term_clip"),
        (dict(beta=0.5, vocab_size=99), ValueError, "vocab_size"),
    ],
)
def test_bad_arguments(kwargs, error, match):
    s, t = torch.randn(2, 8), torch.randn(2, 8)
    with pytest.raises(error, match=match):
        vocab_parallel_jsd(s, t, **kwargs)


def test_bad_tensors():
    with pytest.raises(ValueError, match="same shape"):
        vocab_parallel_jsd(torch.randn(2, 8), torch.randn(2, 9), beta=0.5)
    with pytest.raises(TypeError, match="floating point"):
        vocab_parallel_jsd(torch.ones(2, 8, dtype=torch.long), torch.randn(2, 8), beta=0.5)
    with pytest.raises(TypeError, match="teacher_logits"):
        vocab_parallel_jsd(torch.randn(2, 8), torch.ones(2, 8, dtype=torch.int32), beta=0.5)
