"""SFT and GRPO as algorithms of the same trainer: SFT's first loss equals an fp64 HF reference;
GRPO's advantages, clipped surrogate and KL equal plain formulas; zero-variance groups are
skipped."""

from __future__ import annotations

from types import SimpleNamespace

import torch

from opsd_megatron.algorithms.grpo import GRPO, group_advantages
from opsd_megatron.algorithms.step_data import MicroBatch
from opsd_megatron.config import load_config
from opsd_megatron.data.prompts import pack
from opsd_megatron.losses.distributions import Logits
from opsd_megatron.testing import run_distributed
from opsd_megatron.train.cli import _rank_entry
from opsd_megatron.train.resolved import resolve
from tests.train.tiny import RECIPE, hf_initial_model, metrics, overrides


def test_sft_first_loss_matches_reference(tmp_path):
    from opsd_megatron.data.dataset import load_problems
    from opsd_megatron.data.prompts import student_prompt_ids
    from opsd_megatron.data.tokenizer import load_tokenizer

    out = tmp_path / "sft"
    run_distributed(
        _rank_entry,
        2,
        resolve(RECIPE, overrides(out, 2, 1, extra=["algorithm=sft"]), 2),
        timeout=300,
    )
    rows = metrics(out)
    assert rows[0]["generated_tokens"] == 0 and rows[1]["loss"] < rows[0]["loss"]
    cfg = load_config(RECIPE, [f"trainer.output_dir={out}"])
    tok, hf = load_tokenizer(cfg.model.tokenizer), hf_initial_model(cfg)
    problems = load_problems(cfg.data).rows[:4]  # step 0 of a global batch of 4
    per_seq = []
    for p in problems:
        prompt = student_prompt_ids(tok, cfg.data, p["problem"])
        target = tok.encode(p["solution"], add_special_tokens=False) + [tok.eos_token_id]
        with torch.no_grad():
            logits = hf(torch.tensor([prompt + target])).logits[0, len(prompt) - 1 : -1]
        per_seq.append(
            -torch.log_softmax(logits, -1).gather(1, torch.tensor(target)[:, None]).mean()
        )
    want = torch.stack(per_seq).mean().item()
    assert abs(rows[0]["loss"] - want) <= 1e-5 * want, (rows[0]["loss"], want)


def test_group_advantages():
    adv, informative = group_advantages(
        torch.tensor([[1.0, 0.0, 0.0, 1.0], [0.0, 0.0, 0.0, 0.0], [1.0, 1, 1, 0]])
    )
    assert informative.tolist() == [True, False, True]
    assert torch.allclose(adv[0], torch.tensor([1.0, -1.0, -1.0, 1.0]), atol=1e-5)
    assert torch.equal(adv[1], torch.zeros(4))
    assert torch.allclose(adv[2].sum(), torch.tensor(0.0), atol=1e-6) and adv[2, 3] < 0


def test_grpo_loss_equals_plain_formula():
    g = torch.Generator().manual_seed(0)
    v, r = 11, 5
    logits = torch.randn(2, r, v, generator=g, dtype=torch.float64, requires_grad=True)
    tokens = torch.randint(0, v, (2, r), generator=g)
    old = torch.log_softmax(logits.detach() / 0.9, -1).gather(-1, tokens[..., None])[
        ..., 0
    ] + 0.4 * torch.randn(
        2, r, generator=g, dtype=torch.float64
    )  # off-policy enough for clipping to bind
    ref = torch.log_softmax(torch.randn(2, r, v, generator=g, dtype=torch.float64), -1).gather(
        -1, tokens[..., None]
    )[..., 0]
    adv = torch.tensor([1.5, -0.5], dtype=torch.float64)
    grpo = GRPO(
        None,
        SimpleNamespace(clip_eps=0.2, kl_coef=0.1),
        sampling=dict(temperature=0.9),
        reference=None,
        grader=None,
        vocab_size=v,
    )
    mb = MicroBatch(
        pack([[1]] * 2, [[0] * r] * 2, 0, device="cpu"),
        torch.ones(2, r, dtype=torch.bool),
        tokens,
        old,
        True,
        advantages_B=adv,
        reference_logprobs_BR=ref,
    )
    loss, diag = grpo.per_token_loss(Logits(logits), mb, None)
    loss.sum().backward()
    x = logits.detach().clone().requires_grad_(True)
    lp = torch.log_softmax(x / 0.9, -1).gather(-1, tokens[..., None])[..., 0]
    ratio = torch.exp(lp - old)
    want = -torch.minimum(ratio * adv[:, None], ratio.clamp(0.8, 1.2) * adv[:, None]) + 0.1 * (
        torch.exp(ref - lp) - (ref - lp) - 1
    )
    want.sum().backward()
    assert ((ratio < 0.8) | (ratio > 1.2)).any(), "the test must exercise the clip"
    assert torch.allclose(loss, want, atol=1e-10) and torch.allclose(
        logits.grad, x.grad, atol=1e-10
    )
    assert "kl" in diag


def test_grpo_run_counts_and_skips_zero_variance_groups(tmp_path):
    out = tmp_path / "grpo"
    extra = ["algorithm=grpo", "grpo.group_size=2"]
    run_distributed(
        _rank_entry, 2, resolve(RECIPE, overrides(out, 2, 1, extra=extra), 2), timeout=300
    )
    rows = metrics(out)
    for row in rows:  # a random model never answers right: every group has zero reward variance
        assert row["reward"] == 0.0 and row["skipped_groups"] == 2.0
        assert row["loss"] == 0.0 and row["grad_norm"] == 0.0
        assert row["generated_tokens"] > 0


def _sft_prompt_mix():
    from opsd_megatron.algorithms.sft import SFT
    from opsd_megatron.algorithms.step_data import StepData
    from opsd_megatron.config import load_config
    from opsd_megatron.data.dataset import load_problems
    from opsd_megatron.data.tokenizer import load_tokenizer
    from opsd_megatron.platform import initialize_model_parallel

    groups = initialize_model_parallel(1, 1)
    cfg = load_config(
        RECIPE,
        [
            "algorithm=sft",
            "sft.teacher_prompt_fraction=0.5",
            "trainer.global_batch_size=16",
            "trainer.micro_batch_size=16",
        ],
    )
    tok = load_tokenizer(cfg.model.tokenizer)
    source = StepData(
        load_problems(cfg.data).rows,
        16,
        16,
        tok,
        cfg.data,
        sampler=None,
        max_new_tokens=1,
        groups=groups,
    )
    sft = SFT(source, cfg.sft, vocab_size=128)

    def texts_of_step_0():
        return [
            tok.decode(row)
            for mb in sft.score(sft.rollout(0)).micro_batches
            for row in mb.student.tokens_BT.tolist()
        ]

    texts, again = texts_of_step_0(), texts_of_step_0()
    return sum("Reference Solution Begin" in t for t in texts), len(texts), texts == again


def test_sft_mixes_teacher_prompts_deterministically():
    with_reference, total, same = run_distributed(_sft_prompt_mix, 1)[0]
    assert 0 < with_reference < total and same
