r"""GRPO (the paper's RL baseline): G rollouts per problem, binary reward from the grader, group-
normalised advantage A = (r − mean_g) / (std_g + ε), clipped surrogate

    loss_n = −min(ρ_n A, clip(ρ_n, 1−ε_c, 1+ε_c) A) + β_KL · k3(log π_ref − log π),   ρ_n =
    π(ŷ_n)/π_old(ŷ_n)

with π_old the sampler's log-probs (one update per batch) and the optional KL to the initial
policy (adapters off) by the k3 estimator. Groups whose rewards are all equal carry no signal: they
are counted and left out of the loss.
"""

from __future__ import annotations

import torch

from opsd_megatron.algorithms.base import Diagnostic, Rollouts, Scored
from opsd_megatron.algorithms.step_data import MicroBatch, StepData
from opsd_megatron.config import GRPOConfig
from opsd_megatron.data.grading import Grader, reference_answer
from opsd_megatron.losses.distributions import Hidden, Logits
from opsd_megatron.models.teacher import Teacher
from opsd_megatron.platform.parallel import ParallelGroups


def group_advantages(
    rewards_G: torch.Tensor, eps: float = 1e-6
) -> tuple[torch.Tensor, torch.Tensor]:
    """[groups, G] rewards -> (advantages [groups, G], informative [groups])."""
    mean, std = (
        rewards_G.mean(dim=1, keepdim=True),
        rewards_G.std(dim=1, unbiased=False, keepdim=True),
    )
    informative = std[:, 0] > 0
    return torch.where(informative[:, None], (rewards_G - mean) / (std + eps), 0.0), informative


class GRPO:
    """GRPO's phases: G samples per problem, grader rewards, the clipped surrogate (+ optional
    KL)."""

    def __init__(
        self,
        source: StepData,
        grpo: GRPOConfig,
        sampling: dict,
        reference: Teacher | None,
        grader: Grader | None,
        vocab_size: int,
        fused: bool = False,
    ):
        """``sampling``: the distribution the sampler's log-probs are of (temperature, top-k, top-p:
        ``RolloutConfig.logprob_distribution``), in which the ratio's and the KL's log-probs are
        taken; ``reference``: the initial policy for the KL term (the teacher's module);
        ``grader``: the reward; ``fused``: the reference pass hands hidden states to the fused
        log-probs (``loss.fused``)."""
        self.source, self.grpo, self.sampling, self.fused = source, grpo, sampling, fused
        self.reference, self.grader, self.vocab_size = reference, grader, vocab_size
        self.stat_names = ("kl",) if grpo.kl_coef > 0 else ()

    def rollout(self, step: int) -> Rollouts:
        """``grpo.group_size`` samples per problem, on one DP rank."""
        return self.source.sample(step, self.grpo.group_size)

    def score(self, rollouts: Rollouts) -> Scored:
        """Binary rewards from the grader, group-normalised advantages; groups with no reward
        variance are masked out of the loss; reference log-probs for the KL term."""
        tok, g = self.source.tokenizer, self.grpo.group_size
        rewards = torch.tensor(
            [
                float(
                    bool(
                        self.grader.grade(
                            tok.decode(r, skip_special_tokens=True),
                            p.get("answer") or reference_answer(p["solution"]) or "",
                        ).correct
                    )
                )
                for p, r in zip(rollouts.problems, rollouts.responses)
            ],
            device=self.source.groups.device,
        )
        adv, informative = group_advantages(rewards.view(-1, g))
        adv, keep = adv.reshape(-1), informative.repeat_interleave(g)
        mbs = self.source.micro_batches(rollouts.prompts, rollouts.responses, rollouts.logprobs)
        for mb in mbs:
            rows = torch.tensor(mb.rows, device=self.source.groups.device)
            mb.response_mask_BR &= keep[rows, None]
            mb.advantages_B = adv[rows]
            if self.grpo.kl_coef > 0:
                self._reference_logprobs(mb)
        counts = {
            "generated_tokens": float(rollouts.generated_tokens),
            "reward_sum": float(rewards.sum()),
            "rollouts": float(len(rewards)),
            "skipped_groups": float((~informative).sum()),
        }
        return Scored(mbs, counts)

    def _reference_logprobs(self, mb: MicroBatch) -> None:
        """The initial policy's log-probs of the sampled tokens (adapters off / frozen copy)."""
        tokens, positions, r_max = (
            mb.student.tokens_BT,
            mb.student.position_ids_BT,
            mb.response_mask_BR.shape[1],
        )
        if self.fused:
            states, weight = self.reference.hidden(tokens, positions)
            if states is None:
                return
            ref = Hidden(mb.student.response_rows(states, r_max), weight)
        else:
            logits = self.reference.logits(tokens, positions)
            if logits is None:
                return
            ref = Logits(mb.student.response_rows(logits, r_max))
        mb.reference_logprobs_BR = ref.token_logprobs(
            mb.response_tokens_BR,
            **self.sampling,
            vocab_size=self.vocab_size,
            group=self.source.groups.tp,
        )

    def per_token_loss(
        self, student: Logits | Hidden, mb: MicroBatch, groups: ParallelGroups | None
    ):
        """−min(ρA, clip(ρ)A) (+ β_KL·k3) per response token, ρ against the sampler's log-probs."""
        logprobs = student.token_logprobs(
            mb.response_tokens_BR,
            **self.sampling,
            vocab_size=self.vocab_size,
            group=groups.tp if groups is not None else None,
        )
        ratio = torch.exp(logprobs - mb.sampler_logprobs_BR.to(logprobs.dtype))
        adv = mb.advantages_B[:, None].to(logprobs.dtype)
        eps = self.grpo.clip_eps
        loss = -torch.minimum(ratio * adv, ratio.clamp(1 - eps, 1 + eps) * adv)
        diag = {}
        if self.grpo.kl_coef > 0:
            delta = mb.reference_logprobs_BR.to(logprobs.dtype) - logprobs
            kl = torch.exp(delta) - delta - 1
            loss = loss + self.grpo.kl_coef * kl
            diag["kl"] = Diagnostic(kl)
        return loss, diag
