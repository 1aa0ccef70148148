"""``loss.fused=true`` (the last stage stops at the final norm; the loss projects hidden states
through the output layer's vocab shard one chunk at a time, the teacher keeps hidden states) gives
the logits path's losses, diagnostics and gradients in real multi-process runs, from the same
rollouts:

* TP2 with sequence parallelism, LoRA: OPSD with token weights and the ref-KL term, then the
  sampled-token objective with its baseline, then SFT;
* PP2, full-parameter training with tied embeddings (the gradient reaches the shared weight on
  both stages) and a frozen-copy teacher (its own output shard): OPSD and GRPO;
* TP2 x PP2, LoRA: OPSD and GRPO with its KL term.

Every trainable parameter's gradient (each rank's shard) and every logged statistic are compared,
and the planner's teacher term against the bytes the teacher pass keeps. Tolerance 1e-5 absolute
(fp32); measured at most 5.3e-7 on gradients (GRPO, full-parameter) and 1.4e-6 on statistics
(the sampled-token objective), with 3-token chunks so every micro-batch crosses chunk boundaries.
Without the contiguous-gradient guard of ``models/output_head.py`` the TP2xPP2 case fails (0.1)."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from opsd_megatron.losses.distributions import Logits
from opsd_megatron.testing import run_distributed
from tests.train.tiny import RECIPE, overrides

TOL = 1e-5


def _both_ways(tp, pp, extra, variants):
    """For each variant (algorithm, loss overrides): stats and gradients with fused off and on."""
    from opsd_megatron.algorithms import build_algorithm
    from opsd_megatron.config import load_config
    from opsd_megatron.losses import global_normalizer
    from opsd_megatron.models.loss_contract import finalize_gradients
    from opsd_megatron.train.components import build_components
    from opsd_megatron.train.optimizer import zero_grads
    from opsd_megatron.train.step import student_pass
    from tests.train.tiny import rank_layout

    cfg = load_config(
        RECIPE,
        overrides(
            "/tmp/unused-fused-test",
            tp,
            pp,
            extra=["loss.chunk_tokens=3", "model.dtype=float32", *extra],
        ),
    )
    c = build_components(cfg, rank_layout(cfg))
    worst = {}
    for algorithm, loss in variants:
        for key, value in loss.items():
            setattr(cfg.loss, key, value)
        results, rollouts, kept = [], None, []
        for fused in (False, True):
            cfg.loss.fused = fused
            run = dataclasses.replace(cfg, algorithm=algorithm)
            alg = build_algorithm(run, c.algorithm.source, c.teacher, c.arch.vocab_size)
            rollouts = rollouts or alg.rollout(0)  # the same sequences both ways
            scored = alg.score(rollouts)
            mbs = scored.micro_batches
            for mb in mbs:  # a random model earns no rewards: fixed advantages, so GRPO has a loss
                if mb.advantages_B is not None:
                    rows, r_max = mb.response_mask_BR.shape
                    mb.advantages_B = torch.linspace(-1.0, 1.0, rows)
                    lengths = torch.tensor(mb.student.response_lengths)
                    mb.response_mask_BR = torch.arange(r_max)[None, :] < lengths[:, None]
            norm = global_normalizer(
                [m.response_mask_BR for m in mbs], cfg.loss.reduction, c.groups.dp
            )
            kept.append(_kept_against_plan(c, run, mbs))
            zero_grads(c.ddp, c.optimizer)
            stats = student_pass(dataclasses.replace(c, cfg=run), alg, mbs, norm)
            finalize_gradients(c.ddp)
            grads = {
                n: p.main_grad.detach().clone()
                for n, p in c.model.named_parameters()
                if p.requires_grad
            }
            results.append((stats.means, grads))
        (s0, g0), (s1, g1) = results
        assert s0.keys() == s1.keys() and g0.keys() == g1.keys()
        name = f"{algorithm}:{loss}"
        worst[name] = {
            "stats": max((abs(s0[k] - s1[k]) for k in s0), default=0.0),
            "grads": max(float((g0[n] - g1[n]).abs().max()) for n in g0),
            "grad_scale": max(float(g0[n].abs().max()) for n in g0),
            # the output layer's shard / the word embeddings it is tied to (full-parameter)
            "output_weight_grad": max(
                (float(g1[n].abs().max()) for n in g1 if "embedding" in n or "output_layer" in n),
                default=None,
            ),
            "stat_keys": sorted(s0),
            "kept": kept,
        }
    return worst


def _kept_against_plan(c, run, mbs) -> tuple[int, int]:
    """Bytes the teacher pass keeps in the micro-batches (logits or hidden states of the response
    rows, the ref-KL view too) and the planner's figure for the same micro-batches."""
    from opsd_megatron.plan_config import plan_input
    from opsd_megatron.planner import plan

    held = sum(
        t.numel() * t.element_size()
        for mb in mbs
        for view in (mb.teacher, mb.reference)
        if view is not None
        for t in [view.values if isinstance(view, Logits) else view.states]
    )
    if not c.groups.is_last_stage or run.algorithm != "opsd":
        return held, 0
    base = plan_input(run, c.layout)
    planned = 0
    for mb in mbs:  # each micro-batch is as wide as its longest response
        p = dataclasses.replace(
            base, micro_batches_per_rank=1, response_len=mb.response_mask_BR.shape[1]
        )
        terms = plan(p)
        planned += terms["teacher_hidden" if run.loss.fused else "teacher_logits"]
    return held, planned


CASES = {
    "tp2_sp_lora": (
        2,
        1,
        ["parallel.sequence_parallel=true"],
        [
            (
                "opsd",
                {"token_weight": "teacher_entropy", "entropy_threshold": 2.0, "ref_kl_coef": 0.3},
            ),
            (
                "opsd",
                {
                    "kind": "sampled_token",
                    "baseline": "reverse_kl",
                    "token_weight": "none",
                    "ref_kl_coef": 0.0,
                },
            ),
            ("sft", {}),
        ],
    ),
    "pp2_full_tied": (
        1,
        2,
        ["lora=null", "teacher.weights=frozen_copy"],
        [("opsd", {}), ("grpo", {})],
    ),
    "tp2pp2_lora": (
        2,
        2,
        ["grpo.kl_coef=0.1", "grpo.group_size=2"],
        [("opsd", {"beta": 0.0}), ("grpo", {})],
    ),
}


@pytest.mark.parametrize("case", list(CASES))
def test_fused_step_equals_the_logits_path(case):
    tp, pp, extra, variants = CASES[case]
    extra = [*extra, "grpo.group_size=2"]
    per_rank = run_distributed(_both_ways, tp * pp, tp, pp, extra, variants)
    for worst in per_rank:
        for name, w in worst.items():
            print(case, name, {k: w[k] for k in ("stats", "grads", "grad_scale")})
            assert w["grads"] <= TOL and w["stats"] <= TOL, (name, w)
    last = per_rank[-1]  # the last stage holds the loss statistics
    assert all("loss" in w["stat_keys"] for w in last.values())
    assert all(w["grad_scale"] > 1e-4 for r in per_rank for w in r.values())  # real gradients
    for worst in per_rank:  # the planner counts what the teacher pass keeps, exactly
        for name, w in worst.items():
            for held, planned in w["kept"]:
                assert held == planned, (name, held, planned)
    if "lora=null" in extra:  # the tied weight trains on both stages (embedding, output layer)
        assert all(w["output_weight_grad"] > 1e-5 for r in per_rank for w in r.values())
